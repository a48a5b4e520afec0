"""Layer selections ('all', '0,4-6,-1', lists with negatives) -> sorted, range-checked indices.

Pure functions without torch, so a config can check a ``--layers`` string before any model loads.
"""

from __future__ import annotations

from collections.abc import Sequence

from latentlab.errors import LatentlabError


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

