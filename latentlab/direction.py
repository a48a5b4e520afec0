"""A direction in the residual stream: per-layer vectors and the typical residual norm at each layer.

Why a leaf module: every part of latentlab that steers, ablates, projects, saves or exports reads a
:class:`Direction`, and none of that should import how one is fitted (:mod:`latentlab.directions`)
or exported (:mod:`latentlab.vectors`). The residual norms travel with the vectors because steering
must be scaled by them (Gemma's residual norms are in the thousands: a raw unit vector does
nothing, a raw difference vector is arbitrary). The sidecar says how to apply the vectors (hook
point, add/ablate, scale, layer map) so a file taken to another tool is not applied at the wrong site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.errors import LatentlabError
from latentlab.io import load_tensors, save_tensors

__all__ = ["HOOK_POINT", "SCALE_CONVENTION", "Direction", "hook_point", "layer_map", "sidecar_fields"]

HOOK_POINT = "blocks.{l}.hook_resid_post"
SCALE_CONVENTION = "alpha x unit x typical residual norm"

def hook_point(layer: int) -> str:
    return HOOK_POINT.format(l=layer)


def layer_map(layers: Sequence[int]) -> list[dict[str, Any]]:
    """For each latentlab layer: its hook, llama.cpp / repeng tensor name and HF hidden_states index."""
    return [
        {
            "layer": int(layer),
            "hook_point": hook_point(int(layer)),
            "llama_cpp": f"direction.{int(layer)}" if layer >= 1 else None,  # llama.cpp rejects direction.0
            "repeng_layer": int(layer),
            "hf_hidden_states_index": int(layer) + 1,
        }
        for layer in layers
    ]


def sidecar_fields(direction: Direction) -> dict[str, Any]:
    """What a saved direction's sidecar records so it can travel: hook point, operations, scale, layer map."""
    return {
        "hook_point": HOOK_POINT,
        "operation": {
            "add": "resid + alpha * unit_l * resid_norm_l (latentlab steer; llama.cpp control vector)",
            "ablate": "resid - ((resid . unit_l) - m_l) * unit_l (m_l = 0 projects out, or a reference mean)",
        },
        "scale_convention": SCALE_CONVENTION,
        "layer_map": layer_map(direction.layers),
    }



@dataclass
class Direction:
    """Per-layer direction vectors (positive pole minus negative pole)."""

    vectors: Float[Tensor, "n_layers d_model"]
    layers: list[int]
    resid_norms: Float[Tensor, " n_layers"]
    name: str = "direction"
    position: str = "last"
    method: str = "mean_diff"
    meta: dict[str, Any] = field(default_factory=dict)

    def _col(self, layer: int) -> int:
        if layer not in self.layers:
            raise LatentlabError(
                f"the {self.name} direction has no layer {layer} (has {self.layers[0]}-{self.layers[-1]})",
                "refit the direction at that layer",
            )
        return self.layers.index(layer)

    def vector(self, layer: int) -> Float[Tensor, " d_model"]:
        return self.vectors[self._col(layer)]

    def unit(self, layer: int) -> Float[Tensor, " d_model"]:
        v = self.vector(layer)
        return v / v.norm().clamp_min(1e-12)

    def resid_norm(self, layer: int) -> float:
        """Mean L2 norm of the residual stream at this layer (at the direction's position)."""
        return float(self.resid_norms[self._col(layer)])

    def units(self) -> Float[Tensor, "n_layers d_model"]:
        return self.vectors / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def validate(self, source: str | Path | None = None) -> Direction:
        """Refuse NaN/inf or all-zero vectors (a broken fit or file): they would steer or project nothing."""
        where = f" in {source}" if source is not None else ""
        if not bool(torch.isfinite(self.vectors).all()):
            raise LatentlabError(f"the {self.name} direction{where} holds NaN or infinite values", "refit it")
        zero = [layer for layer, n in zip(self.layers, self.vectors.norm(dim=-1).tolist()) if n == 0.0]
        if zero:
            raise LatentlabError(
                f"the {self.name} direction{where} is all zeros at layer(s) {zero[:6]}", "refit the direction"
            )
        if self.vectors.shape[0] != len(self.layers):
            raise LatentlabError(f"the {self.name} direction{where} is malformed (vectors != layers)", "refit it")
        return self

    def check(self, model: Any, layers: Sequence[int] | None = None) -> Direction:
        """Usable on ``model`` (a LoadedModel): same width, and every layer in ``layers`` (default: all)."""
        self.validate()
        d = self.vectors.shape[-1]
        if d != model.d_model:
            raise LatentlabError(
                f"the {self.name} direction has width {d}, but {model.info.name} has d_model {model.d_model}",
                "use a direction fitted on this model",
            )
        need = list(range(model.n_layers)) if layers is None else list(layers)
        missing = [layer for layer in need if layer not in self.layers]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise LatentlabError(
                f"the {self.name} direction lacks layer(s) {shown} of {model.info.name}",
                "fit it with --layers all, or choose layers it has",
            )
        return self

    def save(self, path: str | Path) -> Path:
        """Tensors + sidecar; the sidecar says how to use them (hook point, add/ablate, scale, layer map)
        so a file taken to another tool cannot be applied at the wrong site silently."""
        meta = {
            **self.meta,
            **sidecar_fields(self),
            "name": self.name,
            "layers": self.layers,
            "position": self.position,
            "method": self.method,
            "norms": self.vectors.norm(dim=-1).tolist(),
            "resid_norms": self.resid_norms.tolist(),
        }
        return save_tensors(path, {"vectors": self.vectors, "resid_norms": self.resid_norms}, meta)

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        p = Path(path)
        if p.is_dir():
            p = p / "direction.safetensors"
        t, meta = load_tensors(p)
        for k in ("name", "layers", "position", "method"):
            if k not in meta:
                raise LatentlabError(
                    f"{p} is not a latentlab direction (sidecar lacks {k!r})",
                    "pass a file written by `latentlab direction`",
                )
        name, layers, position, method = (meta.pop(k) for k in ("name", "layers", "position", "method"))
        for key in ("norms", "resid_norms", "hook_point", "operation", "scale_convention", "layer_map"):
            meta.pop(key, None)  # bookkeeping the sidecar carries for readers; save() rewrites it
        if "vectors" not in t or "resid_norms" not in t:
            raise LatentlabError(f"{p} is not a latentlab direction (no vectors tensor)", "pass a direction file")
        return cls(t["vectors"], layers, t["resid_norms"], name, position, method, meta).validate(p)
