"""Load a model (built-in, hub id or local folder, optionally + LoRA) as a hooked TransformerBridge.

Split by concern, each importing only downward (``layers`` and ``devices`` <- ``builtin`` <-
``loading``, which alone knows :mod:`latentlab.arch` and :mod:`latentlab.adapters`):

- :mod:`~latentlab.models.builtin`: the built-in GGUF models, their converted cache, ``list_models``;
- :mod:`~latentlab.models.devices`: device, dtype and device-map checks, placement and OOM messages;
- :mod:`~latentlab.models.layers`: layer selections (``'all'``, ``'0,4-6,-1'``) without torch;
- :mod:`~latentlab.models.loading`: :func:`load_model`, :class:`LoadedModel`, :class:`ModelInfo`, adapters.

Every public name is re-exported here; a test that replaces a function must patch the submodule
that looks it up (``latentlab.models.builtin._locate_gguf``), except ``load_model`` and
``list_models``, which their callers import from this package at call time.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # before transformers / huggingface_hub load

from latentlab.models.builtin import (  # noqa: E402
    BUILTINS,
    CACHE_FORMAT,
    DEFAULT_MODEL,
    BuiltinSpec,
    builtin_available,
    builtin_cache_dir,
    cache_status,
    ensure_builtin,
    latentlab_home,
    list_models,
)
from latentlab.models.devices import DTYPES, resolve_device, resolve_device_map, resolve_dtype  # noqa: E402
from latentlab.models.layers import parse_layers, select_layers  # noqa: E402
from latentlab.models.loading import (  # noqa: E402
    LoadedModel,
    ModelInfo,
    adapter_fingerprint,
    check_adapter,
    load_hf,
    load_model,
    resolve_adapter,
    resolve_source,
)

__all__ = [
    "BUILTINS",
    "CACHE_FORMAT",
    "DEFAULT_MODEL",
    "DTYPES",
    "BuiltinSpec",
    "LoadedModel",
    "ModelInfo",
    "adapter_fingerprint",
    "builtin_available",
    "builtin_cache_dir",
    "cache_status",
    "check_adapter",
    "ensure_builtin",
    "latentlab_home",
    "list_models",
    "load_hf",
    "load_model",
    "parse_layers",
    "resolve_adapter",
    "resolve_device",
    "resolve_device_map",
    "resolve_dtype",
    "resolve_source",
    "select_layers",
]
