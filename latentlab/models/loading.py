"""Load a model (built-in, hub id or local folder, optionally + LoRA) as a hooked TransformerBridge.

One entry point, :func:`load_model`, returns a :class:`LoadedModel`: the bridge (TransformerLens
hooks), the tokenizer, and :class:`ModelInfo` facts that every result records (layer count, width,
fingerprints of the base weights and of the adapter) so a result can always be traced back to the
exact weights that produced it.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentlab import arch
from latentlab.adapters import AdapterNeedsMerge, LoraBank, check_scale
from latentlab.errors import LatentlabError, first_line
from latentlab.io import fingerprint_weights, read_json, sha256_file
from latentlab.models.builtin import BUILTINS, DEFAULT_MODEL, ensure_builtin
from latentlab.models.devices import (
    _check_placement,
    _first_device,
    _oom_error,
    resolve_device,
    resolve_device_map,
    resolve_dtype,
)
from latentlab.models.layers import select_layers


@dataclass
class ModelInfo:
    """Facts about a loaded model that every result records."""

    name: str
    path: str
    architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    device: str
    dtype: str
    base_fingerprint: str
    adapter: str | None = None
    adapter_fingerprint: str | None = None
    has_chat_template: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    family: str | None = None  # the text config's model_type (llama, gemma3_text, gpt2, ...)
    source_architecture: str | None = None  # the checkpoint's class when only its language model is loaded
    device_map: dict[str, str] | None = None  # module -> device, when loaded with a device map

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A hooked model and its tokenizer: what every latentlab stage takes as input."""

    bridge: Any  # transformer_lens.model_bridge.TransformerBridge
    tokenizer: Any
    info: ModelInfo
    lora: Any = field(default=None, repr=False)  # latentlab.adapters.LoraBank shared by views of one base
    adapter_label: str | None = None  # the adapter this view switches on (None: the base itself)
    adapter_scale: float = 1.0  # the factor on the adapter's difference (1: as trained)

    def forward_context(self) -> Any:
        """Context every forward pass runs in: switches this view's adapter on (or all off)."""
        if self.lora is None:
            return contextlib.nullcontext()
        return self.lora.activate(self.adapter_label, self.adapter_scale)

    def with_adapter(self, adapter: str | Path, label: str | None = None, scale: float = 1.0) -> LoadedModel:
        """This base plus a LoRA adapter, sharing the base weights (no second copy).

        The view's forward passes add the adapter's ``s B A x`` through hooks; the base's own
        passes (and other views') stay untouched. Use it to compare a base with several finetunes
        and controls in the memory of one model. ``adapter``: a PEFT folder or a ``latentlab
        finetune`` run folder. ``scale``: a factor on the difference, ``scale * s B A x`` (0: the
        base exactly; 1: as trained, bit for bit; 2: the finetune's change amplified twofold); views
        of one adapter at several factors share its weights. A family whose adapter must be merged
        (fused QKV) merges ``scale * s B A`` into its copy.
        """
        scale = check_scale(scale)
        path = resolve_adapter(adapter)
        check_adapter(path, self.info.name, self.info.base_fingerprint)
        if self.adapter_label is not None or self.info.adapter is not None:
            raise LatentlabError(
                f"{self.info.name} already carries adapter {self.info.adapter}", "call with_adapter on the base model"
            )
        if self.lora is None:
            self.lora = LoraBank(self.hf_model)
        label = label or f"{path.resolve()}"
        try:
            self.lora.add(label, path)
        except AdapterNeedsMerge as e:
            # Fused-QKV families (GPT-2, Phi-3, GPT-NeoX): the bridge computes q/k/v from the fused
            # weight, so a hook on it never fires. A merged copy is exact; it costs a second copy.
            warnings.warn(f"latentlab: {e.problem}; merging it into a second copy of the weights", stacklevel=2)
            return load_model(
                self.info.path, adapter=path, device=self.info.device, dtype=self.info.dtype, progress=False,
                adapter_scale=scale,
            )
        info = ModelInfo(
            **{**self.info.to_dict(), "adapter": str(path), "adapter_fingerprint": adapter_fingerprint(path)}
        )
        info.extra = _scale_extra(info.extra, scale)
        return LoadedModel(self.bridge, self.tokenizer, info, self.lora, label, scale)

    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    @property
    def d_model(self) -> int:
        return self.info.d_model

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    @property
    def hf_model(self) -> torch.nn.Module:
        """The underlying Hugging Face model (same weights the hooks see)."""
        return self.bridge.original_model

    @property
    def weights_key(self) -> dict[str, Any]:
        """What this view computes with: the base weights, the adapter, its scale (absent at 1) and the dtype.
        The identity of anything cached from its activations (a direction fit, a judge's calibration, a KV
        cache): two views with equal keys compute the same thing, whatever their labels or paths."""
        key = {"base": self.info.base_fingerprint, "adapter": self.info.adapter_fingerprint, "dtype": self.info.dtype}
        if self.adapter_scale != 1:  # an amplified finetune is other weights (absent at 1: older keys still match)
            key["adapter_scale"] = self.adapter_scale
        return key

    def check_layers(self, layers: list[int] | str | None) -> list[int]:
        """Normalise a layer selection ('all', None, list with negatives) and range-check it."""
        return select_layers(layers, self.n_layers, self.info.name)

    def __repr__(self) -> str:
        i = self.info
        ad = f", adapter={i.adapter!r}" if i.adapter else ""
        ad += f", adapter_scale={self.adapter_scale:g}" if self.adapter_scale != 1 else ""
        return f"LoadedModel({i.name!r}{ad}, n_layers={i.n_layers}, d_model={i.d_model}, device={i.device})"


def resolve_source(name_or_path: str, progress: bool) -> tuple[str, Path | str, str | None]:
    """Return (display name, path or hub id, known fingerprint)."""
    if name_or_path in BUILTINS:
        path = ensure_builtin(name_or_path, progress=progress)
        return name_or_path, path, read_json(path / "latentlab_cache.json")["weights_fingerprint"]
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise LatentlabError(
                f"{p} is not a Hugging Face model folder (no config.json)",
                "pass a folder written by save_pretrained, a hub id, or one of: " + ", ".join(BUILTINS),
            )
        return p.name, p, None
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return name_or_path, name_or_path, None  # a hub id; transformers resolves it (cache/offline)
    raise LatentlabError(
        f"unknown model {name_or_path!r}",
        f"use a built-in ({', '.join(BUILTINS)}), a Hugging Face hub id, or a local model folder",
    )


def load_hf(
    source: Path | str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    device_map: str | dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> tuple[Any, Any]:
    """(HF causal LM, tokenizer), weights read straight in ``dtype`` onto ``device`` / ``device_map``.

    No float32 CPU copy on the way: transformers materialises each tensor once, in the target dtype,
    on its target device (accelerate's device map when given). A multimodal checkpoint
    (``Gemma3ForConditionalGeneration``) comes back as its language model (:func:`arch.language_model_of`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # latentlab shows its own progress; a bar per load is noise
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "eager", "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif device is not None and device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}  # straight onto the GPU, never a CPU copy first
    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        # Eager attention: the bridge's attention-pattern hooks need it, and on CPU with short
        # prompts it costs nothing measurable (benchmarks/collect.py).
        try:
            model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
        except ValueError as e:
            if "Unrecognized configuration class" not in str(e):
                raise
            from transformers import AutoModelForImageTextToText  # multimodal without a causal-LM mapping

            model = AutoModelForImageTextToText.from_pretrained(str(source), **kwargs)
    except torch.OutOfMemoryError as e:
        raise _oom_error(e, f"loading {source!s} in {str(dtype).replace('torch.', '')}") from None
    except (OSError, ValueError) as e:  # ValueError: a config or tokenizer transformers cannot read
        raise LatentlabError(
            f"cannot load model {source!s}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}",
            "check the name; this machine has no model hub, so use a local folder or a built-in",
        ) from None
    _check_placement(model)
    model = arch.language_model_of(model)
    # A folder without tokenizer files still "loads" in transformers 5: an empty tokenizer that maps
    # every word to <unk>. Activations of that are silently meaningless.
    probe = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    if not probe or (tok.unk_token_id is not None and all(i == tok.unk_token_id for i in probe)):
        raise LatentlabError(
            f"the tokenizer of {source!s} turns ordinary text into unknown tokens (are its tokenizer files missing?)",
            "save the tokenizer into the model folder (tokenizer.save_pretrained(folder))",
        )
    return model, tok


def adapter_fingerprint(adapter: Path) -> str:
    h = hashlib.sha256()
    for fname in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = adapter / fname
        if p.exists():
            h.update(fname.encode())
            h.update(sha256_file(p).encode())
    return h.hexdigest()[:16]


def _check_adapter_base_name(adapter: Path, base_name: str) -> None:
    """Warn when a foreign adapter (no latentlab fingerprint) names another base model.

    Shapes alone cannot tell gemma-3-270m from gemma-3-270m-it, and peft merges whatever fits; the
    name in adapter_config.json is the only evidence left, and names are unreliable (local folders,
    renamed checkpoints), so this warns rather than refuses.
    """
    recorded = read_json(adapter / "adapter_config.json").get("base_model_name_or_path")
    if not isinstance(recorded, str) or not recorded:
        return
    mine = Path(base_name).name.lower()
    theirs = Path(recorded).name.lower()
    if theirs != mine:
        warnings.warn(
            f"latentlab: adapter {adapter} names {recorded!r} as its base, not {base_name!r}; the shapes fit, so it "
            "is merged anyway. Check that this is the base model it was trained on.",
            stacklevel=3,
        )


def resolve_adapter(path: str | Path) -> Path:
    """An adapter folder, or a ``latentlab finetune`` run folder holding ``adapter/``."""
    p = Path(path).expanduser()
    if (p / "adapter_config.json").exists():
        return p
    if (p / "adapter" / "adapter_config.json").exists():
        return p / "adapter"
    if not p.exists():
        raise LatentlabError(f"adapter folder {p} does not exist", "pass the --out folder of `latentlab finetune`")
    raise LatentlabError(
        f"{p} holds no LoRA adapter (no adapter_config.json)",
        "pass the --out folder of `latentlab finetune` or an adapter folder (PEFT's save_pretrained)",
    )


def check_adapter(adapter: Path, base_name: str, base_fp: str) -> None:
    """Refuse an adapter folder that is missing, not LoRA, or recorded as trained on another base."""
    if not adapter.is_dir():
        raise LatentlabError(
            f"adapter folder {adapter} does not exist", "pass the folder written by `latentlab finetune`"
        )
    if not (adapter / "adapter_config.json").exists():
        raise LatentlabError(
            f"{adapter} is not a LoRA adapter folder (no adapter_config.json)",
            "pass the folder written by `latentlab finetune` or PEFT's save_pretrained",
        )
    manifest = adapter / "latentlab_adapter.json"
    if manifest.exists():
        recorded = read_json(manifest).get("base_fingerprint")
        if recorded and recorded != base_fp:
            raise LatentlabError(
                f"adapter {adapter} was trained on another base model (fingerprint {recorded}, "
                f"this base {base_name} is {base_fp})",
                "load the adapter with the base model it was trained on",
            )


def _scale_extra(extra: dict[str, Any], scale: float) -> dict[str, Any]:
    """``ModelInfo.extra`` recording a factor on the adapter (none at 1: records stay as they were)."""
    out = {k: v for k, v in extra.items() if k != "adapter_scale"}
    return out if scale == 1 else {**out, "adapter_scale": scale}


def _merge_adapter(model: Any, adapter: Path, base_name: str, base_fp: str, scale: float = 1.0) -> Any:
    """Merge a PEFT LoRA adapter into ``model`` (a fresh copy, so a base loaded elsewhere is untouched),
    its difference times ``scale`` (peft's per-module ``scaling``, before the merge)."""
    from peft import PeftModel

    check_adapter(adapter, base_name, base_fp)
    manifest = adapter / "latentlab_adapter.json"
    targets = read_json(adapter / "adapter_config.json").get("target_modules")
    if isinstance(targets, (list, tuple)):
        missing = arch.missing_lora_targets(model, list(targets))
        if missing:
            raise LatentlabError(
                f"adapter {adapter} targets modules {', '.join(sorted(missing))}, which {base_name} "
                f"({arch.family(model.config)}) does not have",
                "load the adapter with the base model it was trained on",
            )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter))
        except (RuntimeError, ValueError, KeyError) as e:
            raise LatentlabError(
                f"adapter {adapter} does not fit {base_name}: {first_line(e)}",
                "load the adapter with the base model it was trained on",
            ) from None
    for w in caught:
        msg = str(w.message)
        if "missing adapter keys" in msg.lower() or "unexpected" in msg.lower():
            raise LatentlabError(
                f"adapter {adapter} does not fit {base_name}: {msg.splitlines()[0][:200]}",
                "load the adapter with the base model it was trained on",
            )
    if not manifest.exists():
        _check_adapter_base_name(adapter, base_name)
    if scale != 1:
        from peft.tuners.lora import LoraLayer

        for mod in peft_model.modules():
            if isinstance(mod, LoraLayer):
                for name in mod.scaling:
                    mod.scaling[name] *= scale
    return peft_model.merge_and_unload()


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    adapter: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    device_map: str | dict[str, Any] | None = None,
    adapter_scale: float = 1.0,
) -> LoadedModel:
    """Load a built-in name, hub id or local HF folder (+ optional LoRA adapter) as a hooked model.

    Each call builds its own copy of the weights, so a base and its finetune can be loaded side by
    side without the merge touching the base.

    ``device``: 'auto'/None = CUDA when present, else CPU. ``dtype``: None = bfloat16 on CUDA,
    float32 on CPU. ``device_map``: an accelerate device map ('auto' spreads a model too big for one
    GPU over all GPUs; or a dict module name -> device); weights are read straight in ``dtype`` onto
    their devices. Hooks and early stopping work across devices; offload to disk/meta, or to CPU
    next to GPUs, is refused (the bridge's components would not see the offloaded weights).
    A multimodal checkpoint (Gemma 3 4B-27B) loads as its language model. ``adapter_scale``: a
    factor on the adapter's difference before it is merged (0: the base; 1: as trained).
    """
    from transformer_lens.model_bridge import TransformerBridge

    adapter_scale = check_scale(adapter_scale)
    if adapter is None and adapter_scale != 1:
        raise LatentlabError(f"adapter_scale={adapter_scale:g} without an adapter", "pass adapter=DIR too")

    dmap = resolve_device_map(device_map)
    dev = resolve_device(device)
    if dmap is not None and device is None and isinstance(dmap, str) and dmap not in ("auto", "balanced",
                                                                                     "balanced_low_0", "sequential"):
        dev = torch.device(dmap)
    dt = resolve_dtype(dtype, dev if dmap is None else ("cuda" if torch.cuda.is_available() else "cpu"))
    name, source, base_fp = resolve_source(name_or_path, progress)
    model, tok = load_hf(source, dt, trust_remote_code, device_map=dmap, device=dev)
    if base_fp is None:
        base_fp = fingerprint_weights(source) if isinstance(source, Path) else str(source)
    adapter_path, adapter_fp = None, None
    try:
        if adapter is not None:
            adapter_path = Path(adapter).expanduser()
            model = _merge_adapter(model, adapter_path, name, base_fp, adapter_scale)
            adapter_fp = adapter_fingerprint(adapter_path)
        if dmap is None:
            model = model.to(dev)  # a no-op when the weights were loaded onto dev
        model = model.eval()
    except torch.OutOfMemoryError as e:
        raise _oom_error(e, f"placing {name} on {dev}") from None
    placed = getattr(model, "hf_device_map", None)
    if dmap is not None:
        dev = _first_device(model)
        if not placed:  # transformers records no map when everything landed on one device
            placed = dict(dmap) if isinstance(dmap, dict) else {"": str(dmap)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(str(source), hf_model=model, tokenizer=tok, dtype=dt)
    bridge.eval()
    arch.patch_bridge(bridge, dt)
    cfg = arch.text_config(model.config)
    source_arch = getattr(model.config, "latentlab_source_architecture", None)
    info = ModelInfo(
        name=name,
        path=str(source),
        architecture=arch.architecture_name(model),
        n_layers=int(cfg.num_hidden_layers),
        d_model=int(cfg.hidden_size),
        d_vocab=int(cfg.vocab_size),
        device=str(dev),
        dtype=str(dt).replace("torch.", ""),
        base_fingerprint=base_fp,
        adapter=str(adapter_path) if adapter_path else None,
        adapter_fingerprint=adapter_fp,
        has_chat_template=bool(getattr(bridge.tokenizer, "chat_template", None)),
        family=arch.family(model.config),
        source_architecture=source_arch,
        device_map={k: str(v) for k, v in placed.items()} if placed else None,
        extra=_scale_extra({}, adapter_scale),
    )
    return LoadedModel(bridge=bridge, tokenizer=bridge.tokenizer, info=info, adapter_scale=adapter_scale)

