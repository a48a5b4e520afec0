"""Interventions on the residual stream: add a vector, project a direction out, write a source in.

Why one module: steering, directional ablation and activation patching are the same mechanism, a
hook on the residual stream after a block that changes some rows at some positions, at inference
(TransformerBridge hook points) and during finetuning (forward hooks on the HF decoder blocks). The
per-tensor math is written once (:func:`add_vector`, :func:`project_out`) and both kinds of hook
call it, so a steering coefficient or an ablation means the same thing in both.

At inference every stage batches many *conditions* (an intervention and a coefficient) into one
forward pass, each row of the batch carrying its own change, so an alpha sweep with random
controls, or an ablation with ten random directions, costs one batched pass rather than one call
per condition.

- :class:`Steer`: ``t + coeff * v_l`` (``v_l`` = unit direction x typical residual norm at layer l).
- :class:`Ablate`: ``t - ((t . u_l) - m_l) u_l``: the projection on the unit direction is removed
  (``m_l = 0``, mode ``project``) or set to a reference mean (mode ``mean``). The coefficient
  scales the removal (1 = full ablation), so a condition list can mix steering and ablation.
- :func:`patch_hook`: writes a source run's activations (or only their component along a unit
  direction) at chosen positions of chosen rows.
- :func:`training_hooks` with :func:`parse_intervention`: preventative ablation / steering *during*
  finetuning (``latentlab finetune --ablate era@all --steer era:-0.5@10,12``), on a plain or peft HF
  model, autograd-transparent.

Positions: ``all`` changes every token; ``generated`` changes the last prompt token (which predicts
the first new token) and everything after it; ``Steer.at`` changes one prompt position only. Each
hook reads absolute positions, so it is exact both for a full forward pass and for KV-cached
decoding (where later calls see one new token).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from latentlab.activations import resid_hook_name
from latentlab.arch import decoder_blocks, text_config
from latentlab.direction import Direction
from latentlab.errors import LatentlabError
from latentlab.models import parse_layers, select_layers
from latentlab.stats import random_units

Mode = Literal["all", "generated"]
Hook = tuple[str, Callable[..., Any]]


# --------------------------------------------------------------------------------------------
# The per-tensor math, shared by the bridge hooks and the training hooks.
# --------------------------------------------------------------------------------------------


def add_vector(
    t: Float[Tensor, "*shape d_model"],
    vector: Float[Tensor, "*#shape d_model"],
    mask: Float[Tensor, "*#shape 1"] | None = None,
) -> Float[Tensor, "*shape d_model"]:
    """Steering: ``t + vector`` (times ``mask``, 1 where a position is changed and 0 where not)."""
    v = vector.to(t.device, t.dtype)
    return t + (v if mask is None else v * mask)


def project_out(
    t: Float[Tensor, "*shape d_model"],
    unit: Float[Tensor, "*#shape d_model"],
    mean: Float[Tensor, "*#shape 1"] | None = None,
    scale: Float[Tensor, "*#shape 1"] | None = None,
    mask: Float[Tensor, "*#shape 1"] | None = None,
) -> Float[Tensor, "*shape d_model"]:
    """Directional ablation: ``t - ((t . u) - mean) u * scale`` (times ``mask``).

    Defaults (no mean, scale 1, no mask) remove the component along the unit ``u`` everywhere; a
    ``mean`` sets it to that value instead, ``scale`` < 1 removes only part of it. Autograd-
    transparent, so gradients flow through the edited stream during training.
    """
    u = unit.to(t.device, t.dtype)
    proj = (t * u).sum(-1, keepdim=True)
    if mean is not None:
        proj = proj - mean.to(t.device, t.dtype)
    removal = proj * u
    if scale is not None:
        removal = removal * scale.to(t.device, t.dtype)
    return t - (removal if mask is None else removal * mask)


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
    """Vectors to add (at coefficient 1) per layer, and where: all positions or generated ones only.

    ``at``: only that one prompt position instead, counted from the last prompt token (0: the last
    prompt token, -1: the one before): a patchscope writes its vector into one token of its prompt
    (:mod:`latentlab.patchscope`), and no later token sees it except through attention.
    """

    vectors: dict[int, Float[Tensor, " d_model"]]
    mode: Mode = "all"
    label: str = "steer"
    at: int | None = None

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
    t: Tensor, generated_only: Tensor, starts: Tensor, offset: int, at: Tensor | None = None
) -> Bool[Tensor, "batch seq"]:
    pos = torch.arange(offset, offset + t.shape[1], device=t.device)[None, :]
    gen = pos >= starts.to(t.device)[:, None]
    mask = torch.where(generated_only.to(t.device)[:, None], gen, torch.ones_like(gen))
    if at is None:
        return mask
    at = at.to(t.device)[:, None]  # a row's one position relative to its start (Steer.at); NO_AT: by mode
    return torch.where(at != NO_AT, pos == starts.to(t.device)[:, None] + at, mask)


NO_AT = 1 << 30  # a row whose Steer has no ``at`` (positions by its mode)


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
        mean, scale, gen, at = [], [], [], []
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
            at.append(iv.at if is_steer and iv.at is not None else NO_AT)  # type: ignore[union-attr]
        if all(a is None for a in add) and all(u is None for u in unit):
            continue
        d = next(v for v in add + unit if v is not None).shape[-1]
        z = torch.zeros(d)
        add_t = torch.stack([a if a is not None else z for a in add]).to(device)
        unit_t = torch.stack([u if u is not None else z for u in unit]).to(device)
        mean_t = torch.tensor(mean, device=device)
        scale_t = torch.tensor(scale, device=device)
        gen_t = torch.tensor(gen, device=device)
        at_t = torch.tensor(at, device=device) if any(a != NO_AT for a in at) else None
        any_abl = any(u is not None for u in unit)

        def hook(
            t: Tensor,
            hook: Any,
            add: Tensor = add_t,
            unit: Tensor = unit_t,
            mean: Tensor = mean_t,
            scale: Tensor = scale_t,
            gen: Tensor = gen_t,
            at: Tensor | None = at_t,
            any_abl: bool = any_abl,
        ) -> Tensor:
            mask = _position_mask(t, gen, starts, offset() if offset else 0, at)[..., None].to(t.dtype)
            out = add_vector(t, add[:, None, :], mask)
            if any_abl:
                out = project_out(out, unit[:, None, :], mean[:, None, None], scale[:, None, None], mask)
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


# --------------------------------------------------------------------------------------------
# Preventative ablation / steering during finetuning.
# --------------------------------------------------------------------------------------------


@dataclass
class InterventionSpec:
    """A parsed ``--ablate`` / ``--steer`` string: direction source, coefficient, layers."""

    kind: Literal["ablate", "steer"]
    direction: str
    coeff: float
    layers: str  # "all" or a layer list ("10,12", "4-8")


_SPEC = re.compile(r"^(?P<dir>[^:@]+?)(?::(?P<coeff>[^@]*))?(?:@(?P<layers>.*))?$")


def parse_intervention(text: str, kind: Literal["ablate", "steer"]) -> InterventionSpec:
    """Parse ``era@all``, ``era@10,12`` (ablate) or ``era:-0.5``, ``dir.safetensors:0.25@4-8`` (steer).

    Ablation takes no coefficient (it removes the whole component); steering needs one. Layers
    default to all; their range is checked against the model later (:func:`training_hooks`).
    """
    flag = f"--{kind}"
    example = "era@all or era@10,12" if kind == "ablate" else "era:-0.5 or era:-0.5@10,12"
    m = _SPEC.match(text.strip())
    if m is None or not m.group("dir").strip():
        raise LatentlabError(f"cannot read {flag} {text!r}", f"write it as {example}")
    coeff_s, layers = m.group("coeff"), (m.group("layers") or "all").strip() or "all"
    if kind == "ablate":
        if coeff_s is not None:
            raise LatentlabError(f"{flag} {text!r} has a coefficient, but ablation removes the whole component",
                                 f"write it as {example} (steer with --steer era:-0.5)")
        coeff = 1.0
    else:
        if coeff_s is None or not coeff_s.strip():
            raise LatentlabError(f"{flag} {text!r} has no coefficient", f"write it as {example}")
        try:
            coeff = float(coeff_s)
        except ValueError:
            raise LatentlabError(f"{flag} {text!r}: {coeff_s!r} is not a number", f"write it as {example}") from None
        if coeff != coeff or abs(coeff) == float("inf"):
            raise LatentlabError(f"{flag} {text!r}: the coefficient must be finite", f"write it as {example}")
    try:
        parse_layers(layers, 1)
    except LatentlabError:
        raise LatentlabError(f"{flag} {text!r}: cannot read the layers {layers!r}", f"write it as {example}") from None
    return InterventionSpec(kind, m.group("dir").strip(), coeff, layers)


@contextlib.contextmanager
def training_hooks(
    hf_model: torch.nn.Module,
    ablate: Sequence[tuple[Direction, str | Sequence[int]]] = (),
    steer: Sequence[tuple[Direction, float, str | Sequence[int]]] = (),
) -> Iterator[list[Any]]:
    """Forward hooks on the decoder blocks' outputs (the residual stream after each block) of a plain
    or peft HF model, for the duration of the ``with`` block (training included: they are autograd-
    transparent, so gradients flow through the edited stream).

    ``ablate``: ``(direction, layers)``: the component along the unit direction is projected out at
    every position (as :class:`Ablate`). ``steer``: ``(direction, coeff, layers)``: ``coeff x unit x
    the direction's residual norm at that layer`` is added at every position (as :class:`Steer`).
    Steering is applied before ablation at a layer that has both. Yields the hook handles.
    """
    blocks = decoder_blocks(hf_model)
    n = len(blocks)
    d_model = int(getattr(text_config(hf_model.config), "hidden_size", 0) or 0)
    add: dict[int, Tensor] = {}
    units: dict[int, list[Tensor]] = {}
    for d, coeff, layers in steer:
        d.validate()
        for layer, v in Steer.from_direction(d, select_layers(layers, n)).vectors.items():
            add[layer] = add[layer] + v * float(coeff) if layer in add else v * float(coeff)
    for d, layers in ablate:
        d.validate()
        for layer, u in Ablate.from_direction(d, select_layers(layers, n)).units.items():
            units.setdefault(layer, []).append(u)
    for vecs in [list(add.values()), [u for us in units.values() for u in us]]:
        for v in vecs:
            if d_model and v.shape[-1] != d_model:
                raise LatentlabError(
                    f"a direction has width {v.shape[-1]}, but the model has hidden size {d_model}",
                    "use a direction fitted on this base model",
                )

    def make_hook(layer: int) -> Any:
        def hook(_m: torch.nn.Module, _args: Any, out: Any) -> Any:
            t = out[0] if isinstance(out, tuple) else out
            if layer in add:
                t = add_vector(t, add[layer])
            for u in units.get(layer, []):
                t = project_out(t, u)
            return (t, *out[1:]) if isinstance(out, tuple) else t

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in sorted(set(add) | set(units))]
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
