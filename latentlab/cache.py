"""Work done once: fitted directions and probes cached under ``$LATENTLAB_HOME/directions``.

Why: ``latentlab steer --direction era`` used to refit the era direction and its probes on every
run (720 texts at every layer plus 18 cross-validated probes: seconds on a 270M model, minutes of GPU
time on a 32B one). A fit is a pure function of the weights, the data and the options, so the key
is exactly those: base and adapter fingerprints, the dataset's hash, layers, position, method and
dtype. A cache entry is a folder written whole and renamed into place; a damaged one is refitted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentlab.data import dataset_hash
from latentlab.directions import Direction, direction_and_probes
from latentlab.io import make_temp_dir, replace_dir, sha256_text, write_json
from latentlab.models import LoadedModel, latentlab_home
from latentlab.probes import ProbeReport

CACHE_VERSION = 1


def cache_key(model: LoadedModel, source: str | Path, layers: Sequence[int], position: str, method: str) -> str:
    """The fit's identity: same key, same direction and probes."""
    parts = {
        "v": CACHE_VERSION,
        "base": model.info.base_fingerprint,
        "adapter": model.info.adapter_fingerprint,
        "data": dataset_hash(source),
        "layers": list(layers),
        "position": position,
        "method": method,
        "dtype": model.info.dtype,
    }
    return sha256_text(json.dumps(parts, sort_keys=True))[:20]


def fitted_direction(
    model: LoadedModel,
    source: str | Path,
    layers: Sequence[int] | str | None = "all",
    position: str = "last",
    method: str = "mean_diff",
    refit: bool = False,
    progress: bool = True,
) -> tuple[Direction, ProbeReport, bool]:
    """(direction, probes, reused?) for ``direction_and_probes(model, source, ...)``, from the cache
    when this exact fit was done before (``refit=True`` forces a new fit and replaces the entry)."""
    layer_list = model.check_layers(layers)
    key = cache_key(model, source, layer_list, position, method)
    folder = latentlab_home() / "directions" / key
    if not refit and (folder / "done.json").exists():
        try:
            return Direction.load(folder / "direction"), ProbeReport.load(folder / "probes"), True
        except Exception:  # noqa: BLE001 - any damage (truncated safetensors, bad JSON): refit and replace
            pass
    d, report = direction_and_probes(model, source, layer_list, position, method, progress=progress)  # type: ignore[arg-type]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(folder.parent, f".{key}.tmp-")
    d.save(tmp / "direction")
    report.save(tmp / "probes")
    write_json(tmp / "done.json", {"model": model.info.name, "source": str(source), "key": key})
    replace_dir(tmp, folder)
    return d, report, False


def clear(what: str = "directions") -> int:
    """Remove cached fits; returns how many entries were removed."""
    import shutil

    root = latentlab_home() / what
    if not root.exists():
        return 0
    entries = [p for p in root.iterdir() if p.is_dir()]
    for p in entries:
        shutil.rmtree(p, ignore_errors=True)
    return len(entries)


def describe(reused: bool, name: str, model: Any) -> str:
    """The one line a command prints so the user knows whether work was redone."""
    if reused:
        return f"reusing the cached {name} direction and probes for {model.info.name} (--refit to fit again)"
    return f"fitted the {name} direction and probes on {model.info.name} (cached for next time)"
