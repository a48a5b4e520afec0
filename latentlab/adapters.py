"""LoRA adapters switched on one loaded base: compare base, finetunes and controls in one copy.

Why not merged copies: each merged finetune is a full copy of the weights (two copies of 64 GB to
patch a 32B model, one load of minutes per finetune). A LoRA adapter is ``W x + s B A x`` on a
few linear layers, so latentlab keeps the base once and adds ``s B (A x)`` with a forward hook on
each adapted layer, only while a model view that owns that adapter runs
(:meth:`LoadedModel.forward_context`). Base rows stay exactly the base.

Why hooks and not peft's ``set_adapter``: the TransformerBridge wraps the HF model's linear layers in
place, so peft can no longer inject its LoRA layers after the bridge is built; hooks on the wrapped
layers' original modules see exactly what peft's layers would. The result equals peft's merge up
to float rounding (tested). Supported: plain LoRA (``lora_A``/``lora_B``, rsLoRA scaling, per-module
rank and alpha patterns) on linear and GPT-2 Conv1D layers; anything else (DoRA, embedding LoRA)
is refused with a pointer to ``load_model(adapter=...)``, which merges with peft itself.

Amplification: a view may carry a factor on the adapter's difference (``W x + f s B A x``): 0 is the
base exactly, 1 the finetune as trained (bit for bit), 2 twice what the finetune changed. It
exaggerates what a finetune learned (model diffing's amplification), so a weak effect can be read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentlab.errors import LatentlabError
from latentlab.io import read_json

_WRAPPED = "._original_component"


def check_scale(scale: Any, what: str = "adapter scale") -> float:
    """A finite factor >= 0 on a LoRA difference (a negative one would be another model, not more of this one)."""
    try:
        v = float(scale)
    except (TypeError, ValueError):
        raise LatentlabError(f"the {what} {scale!r} is not a number", "pass a factor >= 0, e.g. 2") from None
    if isinstance(scale, bool) or not math.isfinite(v) or v < 0:
        raise LatentlabError(f"the {what} must be a finite number >= 0, got {scale!r}",
                             "pass a factor >= 0, e.g. 0 (the base), 1 (as trained) or 2")
    return v


def format_scale(scale: float) -> str:
    """A factor as labels and records write it: ``2``, ``0.5`` (never ``2.0``), exact enough to read back."""
    return str(int(scale)) if float(scale).is_integer() else repr(float(scale))


def scaled_name(name: str, scale: float) -> str:
    """``name`` at factor ``scale``: the name itself at 1 (as trained, so today's labels stay), else ``name@x2``."""
    return name if scale == 1 else f"{name}@x{format_scale(scale)}"


class AdapterNeedsMerge(LatentlabError):
    """The adapter adapts layers the bridge does not call as modules (a fused QKV the bridge splits),
    so hooks cannot switch it on: the caller falls back to a merged copy."""


def _fused_attention_prefixes(hf_model: torch.nn.Module) -> list[str]:
    """HF names of attention blocks the bridge computes from fused weights without calling them."""
    out = []
    for name, mod in hf_model.named_modules():
        if "JointQKV" in type(mod).__name__:
            out.append(name.replace(_WRAPPED, "") + ".")
    return out


def _leaf_modules(hf_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Leaf modules by their HF name (the bridge's ``_original_component`` hops removed)."""
    out = {}
    for name, mod in hf_model.named_modules():
        if next(mod.children(), None) is None and getattr(mod, "weight", None) is not None:
            out[name.replace(_WRAPPED, "")] = mod
    return out


def _module_name(key: str) -> tuple[str, str]:
    """(module name, 'A' or 'B') of a saved peft key ``base_model.model.<module>.lora_A.weight``."""
    m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
    if m is None:
        raise LatentlabError(
            f"adapter tensor {key!r} is not a LoRA A/B weight (DoRA or embedding LoRA?)",
            "load it with load_model(..., adapter=DIR), which merges it with peft",
        )
    return m.group(1), m.group(2)


@dataclass
class _Adapter:
    weights: dict[str, tuple[Tensor, Tensor, float]]  # module name -> (A [r, in], B [out, r], scale)
    path: Path


@dataclass
class LoraBank:
    """Adapters attached to one base model; at most one is active during a forward pass, at a factor
    ``active_scale`` on its difference (the view's, so one adapter's weights serve every factor)."""

    hf_model: torch.nn.Module
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    active: str | None = None
    active_scale: float = 1.0
    _handles: dict[str, Any] = field(default_factory=dict)
    _modules: dict[str, torch.nn.Module] | None = None

    def modules(self) -> dict[str, torch.nn.Module]:
        if self._modules is None:
            self._modules = _leaf_modules(self.hf_model)
        return self._modules

    def add(self, label: str, path: Path) -> None:
        """Read a PEFT LoRA folder and hook every layer it adapts (the hooks are idle until active)."""
        from safetensors.torch import load_file

        if label in self.adapters:
            return
        cfg = read_json(path / "adapter_config.json")
        if cfg.get("use_dora"):
            raise LatentlabError(f"{path} is a DoRA adapter", "load it with load_model(..., adapter=DIR) to merge it")
        weights_file = path / "adapter_model.safetensors"
        if not weights_file.exists():
            raise LatentlabError(
                f"{path} has no adapter_model.safetensors (latentlab never unpickles .bin files)",
                "re-save the adapter with peft's save_pretrained(safe_serialization=True)",
            )
        tensors = load_file(str(weights_file))
        parts: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            mod, ab = _module_name(key)
            parts.setdefault(mod, {})[ab] = t
        modules = self.modules()
        missing = sorted(m for m in parts if m not in modules)
        fused = _fused_attention_prefixes(self.hf_model)
        unhookable = sorted(m for m in parts if any(m.startswith(f) for f in fused))
        if missing or unhookable:
            shown = (missing or unhookable)[:4]
            raise AdapterNeedsMerge(
                f"adapter {path} adapts modules the bridge does not call as modules: {', '.join(shown)}",
                "it is merged into a copy instead",
            )
        r_default, a_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
        rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        weights = {}
        for mod, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise LatentlabError(f"adapter {path} has an incomplete LoRA pair at {mod}", "re-save the adapter")
            r = _pattern(rank_pat, mod, r_default)
            alpha = _pattern(alpha_pat, mod, a_default)
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            target = modules[mod]
            fin, fout = getattr(target, "in_features", None), getattr(target, "out_features", None)
            fits = ab["A"].shape[-1] == fin and ab["B"].shape[0] == fout
            if isinstance(fin, int) and isinstance(fout, int) and not fits:
                # an adapter of another base whose module names happen to match: refused now, not at a forward pass
                raise LatentlabError(
                    f"adapter {path} does not fit this base model: {mod} maps {fin} -> {fout} features, the "
                    f"adapter's LoRA pair {ab['A'].shape[-1]} -> {ab['B'].shape[0]}",
                    "load the adapter with the base model it was trained on",
                )
            weights[mod] = (ab["A"].to(target.weight.device), ab["B"].to(target.weight.device), scale)
        self.adapters[label] = _Adapter(weights, path)
        for mod in weights:
            if mod not in self._handles:
                self._handles[mod] = modules[mod].register_forward_hook(self._hook(mod))

    def _hook(self, mod: str) -> Any:
        def hook(_m: torch.nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
            if self.active is None or self.active_scale == 0:  # factor 0: the base's own output, exactly
                return None
            w = self.adapters[self.active].weights.get(mod)
            if w is None:
                return None
            a, b, scale = w
            if self.active_scale != 1:  # factor 1 computes exactly what it always did
                scale = scale * self.active_scale
            x = args[0]
            delta = (x.to(a.dtype) @ a.T) @ b.T
            return out + (delta * scale).to(out.dtype)

        return hook

    @contextmanager
    def activate(self, label: str | None, scale: float = 1.0) -> Iterator[None]:
        """Switch adapter ``label`` on (None: all off) at factor ``scale`` for the enclosed passes."""
        previous = self.active, self.active_scale
        self.active, self.active_scale = label, scale
        try:
            yield
        finally:
            self.active, self.active_scale = previous


def _pattern(pattern: dict[str, Any], module: str, default: float) -> Any:
    """peft's rank/alpha patterns: the first key that matches the end of the module name."""
    for key, value in pattern.items():
        if re.search(rf"(^|\.){key}$", module) or re.fullmatch(key, module):
            return value
    return default
