"""Checks every stage config runs in ``__post_init__``, before any model loads or a folder is touched.

Why one module: every command takes the same kinds of options (counts, coefficient lists, device
and dtype, layer lists, an output folder), and each must fail the same way, with one
:class:`~latentlab.errors.LatentlabError` naming the option and the fix, whether it came from the
command line or from a notebook building the config by hand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentlab.adapters import format_scale
from latentlab.data import BUILTIN_DATASETS
from latentlab.errors import LatentlabError
from latentlab.io import read_json
from latentlab.models import parse_layers, resolve_device, resolve_dtype

__all__ = [
    "DEFAULT_BATTERY",
    "adapter_scales",
    "check_choice",
    "check_device_dtype",
    "check_layer_spec",
    "check_out",
    "finite_floats",
    "nonnegative_int",
    "positive_int",
    "run_holds",
]

# The built-in A/B battery that goes with each built-in direction.
DEFAULT_BATTERY = {"era": "era-battery", "persona": "persona-battery", "warden": "warden"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def positive_int(name: str, value: Any, flag: str | None = None) -> int:
    """``value`` as an int >= 1, else one error naming the option."""
    return _int_at_least(name, value, 1, flag)


def nonnegative_int(name: str, value: Any, flag: str | None = None) -> int:
    """``value`` as an int >= 0, else one error naming the option."""
    return _int_at_least(name, value, 0, flag)


def _int_at_least(name: str, value: Any, minimum: int, flag: str | None) -> int:
    flag = flag or _flag(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LatentlabError(
            f"{flag} must be an integer >= {minimum}, got {value!r}", f"pass {flag} {minimum} or more"
        )
    return value


def finite_float(name: str, value: Any, flag: str | None = None) -> float:
    flag = flag or _flag(name)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LatentlabError(f"cannot read {flag} {value!r} as a number", f"pass a finite number to {flag}") from None
    if not math.isfinite(v):
        raise LatentlabError(f"{flag} must be finite, got {value!r}", f"pass a finite number to {flag}")
    return v


def finite_floats(spec: str | Sequence[Any], flag: str, example: str = "-1,-0.5,0,0.5,1") -> list[float]:
    """A comma-separated string (or a sequence) of finite numbers, at least one."""
    parts = [p.strip() for p in spec.split(",") if p.strip()] if isinstance(spec, str) else list(spec)
    if not parts:
        raise LatentlabError(f"{flag} is empty", f"pass at least one number, e.g. {flag} {example}")
    out = []
    for p in parts:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise LatentlabError(f"cannot read {flag} {spec!r}", f"use e.g. {flag} {example}") from None
        if not math.isfinite(v):
            raise LatentlabError(f"{flag} holds {p!r}, which is not a finite number", f"use e.g. {flag} {example}")
        out.append(v)
    return out


def adapter_scales(spec: str | Sequence[Any], flag: str = "--scale") -> list[float]:
    """Factors on a finetune's LoRA difference: finite, >= 0, distinct, at least one (``0,0.5,1,2,4``)."""
    example = "0,0.5,1,2,4"
    out = finite_floats(str(spec) if isinstance(spec, (int, float)) else spec, flag, example)
    for v in out:
        if v < 0:
            raise LatentlabError(f"{flag} holds {format_scale(v)}: a factor on a finetune's difference must be >= 0",
                                 f"use factors >= 0, e.g. {flag} {example} (0 = the base, 1 = as trained)")
    if len(set(out)) != len(out):
        raise LatentlabError(f"{flag} repeats a factor ({', '.join(map(format_scale, out))})", "list each factor once")
    return out


def check_choice(value: str, choices: Sequence[str], flag: str, what: str | None = None) -> str:
    """``value`` is one of ``choices``; the error reads "unknown WHAT 'x'" or "FLAG 'x' is not one of ..."."""
    if value not in choices:
        problem = f"unknown {what} {value!r}" if what else f"{flag} {value!r} is not one of {', '.join(choices)}"
        raise LatentlabError(problem, f"use {flag} {' or '.join(choices) if len(choices) < 3 else ', '.join(choices)}")
    return value


def check_device_dtype(device: str, dtype: str | None) -> None:
    """A device and dtype :func:`latentlab.load_model` accepts (a CUDA device only where one exists)."""
    try:
        resolve_device(device)
    except RuntimeError:  # torch's own message for an unknown device type is a paragraph
        raise LatentlabError(f"unknown device {device!r}", "use --device cpu, cuda, cuda:N or auto") from None
    if dtype is not None:
        resolve_dtype(dtype)


def check_layer_spec(spec: str | Sequence[int] | None, flag: str = "--layers") -> None:
    """The syntax of a layer list ('0,6,12', '4-10', 'all', '-1'); the range is checked on the model."""
    if spec is None or not isinstance(spec, str):
        return
    if spec.strip() == "" and flag == "--layer":
        raise LatentlabError("--layer is empty", "pass e.g. --layer 12, or leave it out for the layer screen")
    parse_layers(spec, 1 << 20)  # "cannot read layer list ..." on a bad spec


def check_direction_spec(spec: str | Path, flag: str = "--direction") -> str:
    """The form of a --direction: era, persona, a pair ``.jsonl`` or a saved ``.safetensors`` (not read here)."""
    s = str(spec)
    if Path(s).suffix in (".safetensors", ".jsonl") or s in BUILTIN_DATASETS:
        return s
    raise LatentlabError(
        f"{flag} {s!r} is neither a built-in (era, persona) nor a .jsonl contrast-pair file",
        "pass era, persona, FILE.jsonl, or a saved direction FILE.safetensors",
    )


def run_holds(out: Path) -> str | None:
    """The status in ``out/manifest.json`` ('complete', 'running', ...) when ``out`` holds a latentlab run."""
    m = out / "manifest.json"
    if not m.is_file():
        return None
    try:
        status = read_json(m).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return str(status) if status else None


# The keys every latentlab manifest.json has (latentlab.runs.Run); another tool's manifest lacks them.
_MANIFEST_KEYS = ("command", "status", "config")


def _latentlab_manifest(out: Path) -> dict[str, Any] | None:
    """``out/manifest.json`` when it is readable and written by latentlab, else None."""
    try:
        m = read_json(out / "manifest.json")
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or any(k not in m for k in _MANIFEST_KEYS) or not isinstance(m["command"], str):
        return None
    return m


def _same_command(recorded: str, command: str) -> bool:
    """Whether a manifest's ``command`` was written by ``command`` ("collect", "sae train"): from the CLI
    ("latentlab collect --data ..."), a notebook ("latentlab.run_collect") or a study step."""
    words = command.split()
    if recorded in ("latentlab.run_" + "_".join(words), f"latentlab study: {command}"):
        return True
    tokens = recorded.split()
    if not tokens or tokens[0] != "latentlab":
        return False
    rest = tokens[1:]
    while rest and rest[0].startswith("-"):  # global flags before the command (--debug)
        rest = rest[1:]
    return rest[: len(words)] == words


def _entries(p: Path) -> list[Path]:
    try:
        return list(p.iterdir())
    except OSError:  # unreadable: the write check below says so
        return []


def check_out(out: str | Path, overwrite: bool = False, command: str | None = None) -> Path:
    """An output folder that can be written: missing, empty, or an unfinished latentlab run (of ``command``
    when given, e.g. "collect"), unless ``overwrite``.

    Why: a run writes manifest.json and results.json, so it must not write into a finished run, another
    command's run, or a folder of files latentlab did not write. Hidden entries (.DS_Store,
    .ipynb_checkpoints, a crashed write's temp file) do not count. Nothing is created here: a refused run
    leaves the file system as it was.
    """
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise LatentlabError(f"--out {p} is a file, not a folder", "choose a folder for --out")
    if p.is_dir() and not overwrite and run_holds(p) == "complete":
        raise LatentlabError(
            f"--out {p} already holds a finished latentlab run (manifest.json, status complete)",
            "choose a new --out, or pass --overwrite to replace it",
        )
    names = sorted(e.name for e in _entries(p) if not e.name.startswith(".")) if p.is_dir() and not overwrite else []
    if names:
        m = _latentlab_manifest(p)
        if m is None:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise LatentlabError(
                f"--out {p} is not empty and holds no latentlab run ({shown})",
                "choose a new or empty --out, or pass --overwrite to write into it",
            )
        if command is not None and not _same_command(m["command"], command):
            raise LatentlabError(
                f"--out {p} holds an unfinished run of another command ({m['command'][:80]!r}), not {command}",
                "choose a new --out, or pass --overwrite to replace it",
            )
    anc = p
    while not anc.exists():
        anc = anc.parent
    import os

    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise LatentlabError(
            f"cannot write to output folder {p} ({anc} is {'not a folder' if not anc.is_dir() else 'read-only'})",
            "choose a folder you can write to with --out",
        )
    return p
