"""Run folders: every command writes ``manifest.json`` beside its results.

Why: a plot in a paper draft must be traceable to the exact command, weights, adapter, data, seed
and package versions that produced it, months later.
"""

from __future__ import annotations

import json
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from latentlab.errors import LatentlabError
from latentlab.finetune import latest_checkpoint
from latentlab.io import ensure_writable_dir, read_json, write_json

TRACKED_PACKAGES = (
    "latentlab",
    "torch",
    "transformers",
    "transformer-lens",
    "sae-lens",
    "peft",
    "scikit-learn",
    "numpy",
    "safetensors",
    "plotly",
    "kaleido",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _gpu_names(devices: list[str]) -> str | None:
    """The names of the CUDA devices among ``devices`` ("cuda" is the current one), or None."""
    names: dict[str, None] = {}
    for dev in devices:
        try:
            d = torch.device(dev)
            if d.type == "cuda":
                index = d.index if d.index is not None else torch.cuda.current_device()
                names[torch.cuda.get_device_name(index)] = None
        except (RuntimeError, ValueError, AssertionError):  # an unknown device string or index
            continue
    return ", ".join(names) or None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """An output folder and its manifest; call :meth:`finish` when the results are written."""

    out: Path
    command: str
    config: dict[str, Any]
    seed: int | None = None
    models: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, out: str | Path, command: str, config: dict[str, Any], seed: int | None = None) -> Run:
        run = cls(ensure_writable_dir(out), command, config, seed)
        if seed is not None:
            seed_everything(seed)
        run._write(status="running")
        return run

    def add_model(self, role: str, info: Any) -> None:
        """Record a model's facts (name, fingerprints, adapter) under ``role`` (base, finetuned, ...)."""
        self.models[role] = info.to_dict() if hasattr(info, "to_dict") else dict(info)
        self._write(status="running")

    def finish(self, **extra: Any) -> Path:
        return self._write(status="complete", **extra)

    def fail(self, error: str) -> Path | None:
        """Mark the run failed, with the error's first line, so the folder says why it holds no results.

        Never raises: the caller re-raises the original error, and a full disk may refuse this write too
        (the manifest then still says running, as after a kill).
        """
        line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "unknown error")
        try:
            return self._write(status="failed", error=line)
        except (OSError, LatentlabError):
            return None

    def devices(self) -> list[str]:
        """The devices the recorded models ran on (their ``device`` and any device-map entries)."""
        seen: dict[str, None] = {}
        for info in self.models.values():
            if not isinstance(info, dict):
                continue
            if info.get("device"):
                seen[str(info["device"])] = None
            for dev in (info.get("device_map") or {}).values():
                seen[str(dev)] = None
        return list(seen)

    def _write(self, status: str, **extra: Any) -> Path:
        devices = self.devices()
        cuda_available = torch.cuda.is_available()
        manifest = {
            "command": self.command,
            "argv": sys.argv,
            "status": status,
            "config": self.config,
            "seed": self.seed,
            "models": self.models,
            # the device the models ran on (None before a model is added); several: comma-separated
            "device": ",".join(devices) if devices else None,
            "cuda_available": cuda_available,
            "gpu": _gpu_names(devices) if cuda_available else None,
            "started": datetime.fromtimestamp(self.started, tz=timezone.utc).isoformat(),
            "wall_seconds": round(time.time() - self.started, 2),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": package_versions(),
            **extra,
        }
        return write_json(self.out / "manifest.json", manifest)


SETTINGS_FILE = "settings.json"
RunState = Literal["new", "resume", "done"]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "settings": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def finetune_progress(folder: str | Path) -> RunState:
    """What ``folder`` holds of a finetune by its files alone: ``done`` (its adapter), ``resume`` (a
    complete checkpoint and no adapter) or ``new`` (neither); :func:`run_state` then checks its record."""
    folder = Path(folder)
    if (folder / "adapter" / "adapter_config.json").exists():
        return "done"
    return "resume" if latest_checkpoint(folder) is not None else "new"


def run_state(
    folder: str | Path,
    expected: Mapping[str, Any],
    overwrite: bool = False,
    *,
    record: str | Callable[[Path], Any] = SETTINGS_FILE,
    fix: str = "use a new --out, the same options as before, or pass --overwrite to retrain it",
) -> RunState:
    """What to do with a folder meant to hold a finetune made with ``expected``: ``done`` (its adapter is
    finished: reuse it), ``resume`` (a complete checkpoint and no adapter: continue from it) or ``new``
    (nothing there yet: train it).

    Why one function: reuse a finished finetune, resume an interrupted one, refuse a changed one is the
    same decision wherever finetunes are kept (a poison sweep's budgets, a study's arms), and a finetune
    must never be reused or continued unless it is known to have been made with the same settings.

    ``record``: where the folder's settings were written before it was trained (a JSON file in it), or
    a function reading them from the folder (None when there are none). A finetune (adapter or complete
    checkpoint) whose record is missing or differs raises :class:`LatentlabError` naming what differs,
    unless ``overwrite``, which makes it ``new``: the caller trains it again (and removes the old adapter
    first, so an interrupted retraining cannot leave it behind as ``done``).
    """
    folder = Path(folder)
    held = finetune_progress(folder)
    if held == "new":
        return "new"
    try:
        if callable(record):
            recorded = record(folder)
        else:
            recorded = read_json(folder / record) if (folder / record).is_file() else None
    except (OSError, ValueError):
        recorded = None
    want = json.loads(json.dumps(dict(expected), default=str))
    if recorded != want:
        if overwrite:
            return "new"
        if recorded is None:
            what = "no record of how it was made"
        else:
            old, new = _flat(recorded), _flat(want)
            what = "differs in " + ", ".join(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))
        raise LatentlabError(f"{folder} holds a finetune made with another recipe ({what})", fix)
    return held
