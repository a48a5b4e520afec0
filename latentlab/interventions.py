"""Interventions on the residual stream: add a vector, project a direction out, write a source in.

Why one layer: steering, directional ablation and activation patching are the same mechanism, a
hook at ``blocks.{l}.hook_resid_post`` that changes some rows at some positions. Every stage batches
many *conditions* (an intervention and a coefficient) into one forward pass, each row of the batch
carrying its own change, so an alpha sweep with random controls, or an ablation with ten random
directions, costs one batched pass rather than one call per condition.

- :class:`Steer`: ``t + coeff * v_l`` (``v_l`` = unit direction x typical residual norm at layer l).
- :class:`Ablate`: ``t - ((t . u_l) - m_l) u_l``: the projection on the unit direction is removed
  (``m_l = 0``, mode ``project``) or set to a reference mean (mode ``mean``). The coefficient
  scales the removal (1 = full ablation), so a condition list can mix steering and ablation.
- :func:`patch_hook`: writes a source run's activations (or only their component along a unit
  direction) at chosen positions of chosen rows.

Positions: ``all`` changes every token; ``generated`` changes the last prompt token (which predicts
the first new token) and everything after it. Each hook reads absolute positions, so it is exact
both for a full forward pass and for KV-cached decoding (where later calls see one new token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from latentlab.activations import resid_hook_name
from latentlab.errors import LatentlabError
from latentlab.stats import random_units

Mode = Literal["all", "generated"]
Hook = tuple[str, Callable[..., Any]]


def hook_name(component: str, layer: int) -> str:
    """Hook of a block's residual output (``resid``) or of its attention / MLP output."""
    if component == "resid":
        return resid_hook_name(layer)
    if component in ("attn", "mlp"):
        return f"blocks.{layer}.hook_{component}_out"
    raise LatentlabError(f"unknown component {component!r}", "use resid, attn or mlp")


def _unit_of(direction: Any, layer: int) -> Tensor:
    return direction.unit(layer)


@dataclass
class Steer:
    """Vectors to add (at coefficient 1) per layer, and where: all positions or generated ones only."""

    vectors: dict[int, Float[Tensor, " d_model"]]
    mode: Mode = "all"
    label: str = "steer"

    @classmethod
    def from_direction(cls, direction: Any, layers: int | Sequence[int], mode: Mode = "all") -> Steer:
        """Unit direction x the layer's typical residual norm, so alpha is a fraction of an activation."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        vecs = {layer: _unit_of(direction, layer) * direction.resid_norm(layer) for layer in layers}
        return cls(vecs, mode, direction.name)

    @classmethod
    def random_like(cls, direction: Any, layers: int | Sequence[int], seed: int = 0, mode: Mode = "all") -> Steer:
        """A norm-matched random direction (same scale as the real one), seeded."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        r = random_units((len(layers), direction.vectors.shape[-1]), seed)
        return cls({layer: r[i] * direction.resid_norm(layer) for i, layer in enumerate(layers)}, mode,
                   f"random-{seed}")


@dataclass
class Ablate:
    """Remove the component along a unit direction per layer (or set it to ``means[layer]``)."""

    units: dict[int, Float[Tensor, " d_model"]]
    means: dict[int, float] = field(default_factory=dict)
    mode: Mode = "all"
    label: str = "ablate"

    @classmethod
    def from_direction(
        cls, direction: Any, layers: int | Sequence[int], means: dict[int, float] | None = None, mode: Mode = "all"
    ) -> Ablate:
        layers = [layers] if isinstance(layers, int) else list(layers)
        return cls({layer: _unit_of(direction, layer) for layer in layers}, dict(means or {}), mode, direction.name)

    @classmethod
    def random(
        cls, d_model: int, layers: int | Sequence[int], seed: int = 0, means: dict[int, float] | None = None
    ) -> Ablate:
        """A random unit direction per layer, seeded: the control for "removing any one direction"."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        r = random_units((len(layers), d_model), seed)
        return cls({layer: r[i] for i, layer in enumerate(layers)}, dict(means or {}), "all", f"random-{seed}")

    @property
    def vectors(self) -> dict[int, Tensor]:  # the layers it touches, like Steer.vectors
        return self.units


Intervention = Steer | Ablate
Condition = tuple[Intervention | None, float]


def _position_mask(
    t: Tensor, generated_only: Tensor, starts: Tensor, offset: int
) -> Bool[Tensor, "batch seq"]:
    pos = torch.arange(offset, offset + t.shape[1], device=t.device)[None, :]
    gen = pos >= starts.to(t.device)[:, None]
    return torch.where(generated_only.to(t.device)[:, None], gen, torch.ones_like(gen))


def condition_hooks(
    conditions: Sequence[Condition],
    row_cond: Sequence[int],
    starts: Int[Tensor, " batch"],
    device: torch.device,
    offset: Callable[[], int] | None = None,
) -> list[Hook]:
    """One hook per touched layer, applying each row's own condition (rows with none are untouched).

    ``starts[i]``: row i's first "generated" position (its last prompt token). ``offset()``: the
    absolute position of the first token the current call sees (0 without a KV cache).
    """
    layers = sorted({layer for c, _ in conditions if c is not None for layer in c.vectors})
    hooks: list[Hook] = []
    for layer in layers:
        add: list[Tensor | None] = []
        unit: list[Tensor | None] = []
        mean, scale, gen = [], [], []
        for ci in row_cond:
            iv, coeff = conditions[ci]
            vec = iv.vectors.get(layer) if iv is not None else None
            is_steer = isinstance(iv, Steer) and vec is not None
            is_abl = isinstance(iv, Ablate) and vec is not None
            add.append(vec * coeff if is_steer else None)
            unit.append(vec if is_abl else None)
            mean.append(float(iv.means.get(layer, 0.0)) if is_abl else 0.0)  # type: ignore[union-attr]
            scale.append(float(coeff) if is_abl else 0.0)
            gen.append(iv is not None and iv.mode == "generated")
        if all(a is None for a in add) and all(u is None for u in unit):
            continue
        d = next(v for v in add + unit if v is not None).shape[-1]
        z = torch.zeros(d)
        add_t = torch.stack([a if a is not None else z for a in add]).to(device)
        unit_t = torch.stack([u if u is not None else z for u in unit]).to(device)
        mean_t = torch.tensor(mean, device=device)
        scale_t = torch.tensor(scale, device=device)
        gen_t = torch.tensor(gen, device=device)
        any_abl = any(u is not None for u in unit)

        def hook(
            t: Tensor,
            hook: Any,
            add: Tensor = add_t,
            unit: Tensor = unit_t,
            mean: Tensor = mean_t,
            scale: Tensor = scale_t,
            gen: Tensor = gen_t,
            any_abl: bool = any_abl,
        ) -> Tensor:
            mask = _position_mask(t, gen, starts, offset() if offset else 0)[..., None].to(t.dtype)
            out = t + add[:, None, :].to(t.dtype) * mask
            if any_abl:
                u = unit[:, None, :].to(t.dtype)
                proj = (out * u).sum(-1, keepdim=True)
                removal = (proj - mean.to(t.dtype)[:, None, None]) * u * scale.to(t.dtype)[:, None, None]
                out = out - removal * mask
            return out

        hooks.append((resid_hook_name(layer), hook))
    return hooks


def patch_hook(
    src: Float[Tensor, "batch seq d_model"],
    pmask: Bool[Tensor, "batch seq"],
    unit: Float[Tensor, "batch d_model"],
    use_unit: Bool[Tensor, " batch"],
) -> Callable[..., Tensor]:
    """Write ``src`` at the masked positions: whole (``use_unit`` False) or only its component along
    the row's unit direction, ``t + ((s - t) . u) u`` (``use_unit`` True)."""

    def hook(t: Tensor, hook: Any) -> Tensor:
        s_ = src.to(t.device, t.dtype)
        u = unit.to(t.device, t.dtype)[:, None, :]
        along = t + ((s_ - t) * u).sum(-1, keepdim=True) * u
        new = torch.where(use_unit.to(t.device)[:, None, None], along, s_)
        return torch.where(pmask.to(t.device)[..., None], new, t)

    return hook
