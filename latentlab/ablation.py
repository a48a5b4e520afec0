"""Does a direction *carry* a finetune's behaviour? Directional ablation against random directions.

:func:`ablate` scores a battery in the base, the finetune and (optionally) a control, each with and
without a direction removed from the residual stream at chosen layers (every position), and asks
how much of the finetune's gain survives. One batched :func:`latentlab.scoring.score_conditions`
call per model scores every condition: no ablation, the direction, and ``n_random`` random ones.

What "the fraction removed" means (``fraction``): with ``gain = ft - ref`` (the finetune's battery
score minus the reference's, the base or the control) and ``gain_ablated = ft_abl - ref_abl`` (the
same gap with the direction removed from *both* models),

    fraction = 1 - gain_ablated / gain

1 means no gain survives the ablation, 0 means ablation left the gap as it was. Ablating both models
matters: an A/B battery regresses toward 0.5 under any perturbation, so ablating only the finetune
would read "removing any direction pulls the finetune toward 0.5" as "the direction carried the
gain". That one-sided number is reported too (``fraction_finetune_only = (ft - ft_abl) / gain``),
as in the emergent-misalignment ablations where the base has no behaviour to lose.

Intervals: a paired bootstrap over battery items (one resampling for all models and conditions,
:func:`latentlab.stats.bootstrap_means`); each resample's fraction is a ratio of resampled means.
Random directions: ``n_random`` (>= 10) seeded unit directions per layer
(:meth:`latentlab.interventions.Ablate.random`); ablation removes a *unit* direction's component, so
"norm-matched" is automatic (the direction's length plays no part, only its orientation). Their
fractions are reported as a distribution (all values, mean, 5th / 95th percentiles), with the real
direction's z and percentile among them.

``mode="mean"`` sets the projection to the *base* model's mean projection instead of 0 (the same
values in all three models, so the ablated models differ only in what they do elsewhere). The mean
is taken over every token of the battery prompts except BOS (each prompt's token mean, then the
mean over prompts), because the hook sets *every* position: the reference value should be the
typical projection over positions, not the last prompt token's (where an era reading concentrates,
so its mean would write the base's era reading into every token). BOS is left out because its
residual is an attention sink whose norm is many times the others', which would dominate the mean.
Random directions get their own means: the same mean activation projected on each.

``latentlab ablate`` (:mod:`latentlab.stages.ablate`) runs :func:`ablate` into a run folder.
Preventative ablation / steering *during* finetuning (:func:`~latentlab.interventions.training_hooks`)
uses the same math, in :mod:`latentlab.interventions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import collect
from latentlab.data import BatteryItem, Example
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.interventions import Ablate, Condition
from latentlab.io import read_json
from latentlab.models import LoadedModel, resolve_adapter
from latentlab.scoring import score_conditions
from latentlab.stats import against_random, bootstrap_means, check_finite

__all__ = [
    "MIN_RANDOM",
    "AblationResult",
    "ablate",
    "base_mean_projections",
    "check_same_base",
]

STAGE = "ablate"
MIN_RANDOM = 10
MIN_GAIN = 1e-6  # a gain smaller than this has no meaningful fraction (reported as None, never NaN)
AblateMode = Literal["project", "mean"]

# --------------------------------------------------------------------------------------------
# The reference means for mode="mean".
# --------------------------------------------------------------------------------------------


def base_mean_activation(
    base: LoadedModel, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 16
) -> Float[Tensor, "n_layers d_model"]:
    """The base's mean residual stream over the prompts' tokens (BOS excluded), per layer: the mean
    over prompts of each prompt's token mean (see the module docstring for why all positions)."""
    acts = collect(base, [Example(p) for p in prompts], list(layers), "mean", batch_size=batch_size, progress=False)
    assert acts is not None
    return acts.acts.float().mean(0)


def base_mean_projections(
    mean_act: Float[Tensor, "n_layers d_model"], units: dict[int, Tensor], layers: Sequence[int]
) -> dict[int, float]:
    """Mean projection on each layer's unit direction (linear, so the mean of projections)."""
    return {layer: float(mean_act[i] @ units[layer].float()) for i, layer in enumerate(layers)}


# --------------------------------------------------------------------------------------------
# The ablation experiment.
# --------------------------------------------------------------------------------------------


@dataclass
class AblationResult:
    """Battery scores with/without ablation per model, and the fraction of the gain ablation removes.

    ``scores[model]``: ``plain`` / ``ablated`` (mean and bootstrap CI), ``per_item_plain`` /
    ``per_item_ablated``, ``random_ablated`` (mean score under each random direction).
    ``fractions[reference]`` (``base``, and ``control`` when given): ``gain``, ``gain_ablated``,
    ``fraction`` (+ ``fraction_ci``), ``fraction_finetune_only`` (+ CI), and ``random``: the
    fractions of the random directions (``values``, ``mean``, ``p5``, ``p95``, ``z``, ``percentile``).
    """

    direction: str
    layers: list[int]
    mode: str
    scores: dict[str, dict[str, Any]]
    fractions: dict[str, dict[str, Any]]
    means: dict[int, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "layers": self.layers,
            "mode": self.mode,
            "scores": self.scores,
            "fractions": self.fractions,
            "means": None if self.means is None else {str(k): v for k, v in self.means.items()},
            **self.meta,
        }


def _ci(values: Tensor) -> list[float] | None:
    ok = values[torch.isfinite(values)]
    if len(ok) < 10:
        return None
    return [float(ok.quantile(0.025)), float(ok.quantile(0.975))]


def _fraction(ft: Tensor, ft_abl: Tensor, ref: Tensor, ref_abl: Tensor) -> tuple[float | None, float | None]:
    """(fraction removed, one-sided fraction) from per-item (or resampled mean) scores."""
    gain = float(ft.mean() - ref.mean())
    if abs(gain) < MIN_GAIN:
        return None, None
    return 1 - float(ft_abl.mean() - ref_abl.mean()) / gain, float(ft.mean() - ft_abl.mean()) / gain


def _fractions_vs(s: dict[str, Tensor], ref: str, n_boot: int, seed: int) -> dict[str, Any]:
    """Fractions of the finetune's gain over ``ref`` that ablation removes, with paired bootstrap
    intervals, for the direction (condition 1) and every random direction (conditions 2...)."""
    ft, rf = s["finetuned"], s[ref]  # [conditions, items]
    gain = ft[0] - rf[0]
    frac, one_sided = _fraction(ft[0], ft[1], rf[0], rf[1])
    # One resampling of items for every column: paired across models and conditions.
    cols = torch.stack([ft[0], ft[1], rf[0], rf[1]], dim=1)  # [items, 4]
    bm = bootstrap_means(cols, n_boot, seed)  # [n_boot, 4]
    g = bm[:, 0] - bm[:, 2]
    with torch.no_grad():
        safe = g.abs() >= MIN_GAIN
        b_frac = torch.where(safe, 1 - (bm[:, 1] - bm[:, 3]) / g.where(safe, torch.ones_like(g)), torch.nan)
        b_one = torch.where(safe, (bm[:, 0] - bm[:, 1]) / g.where(safe, torch.ones_like(g)), torch.nan)
    rand = [_fraction(ft[0], ft[c], rf[0], rf[c])[0] for c in range(2, ft.shape[0])]
    out: dict[str, Any] = {
        "reference": ref,
        "gain": float(gain.mean()),
        "gain_ci": [float(bm[:, 0].sub(bm[:, 2]).quantile(q)) for q in (0.025, 0.975)],
        "gain_ablated": float((ft[1] - rf[1]).mean()),
        "gain_ablated_ci": [float((bm[:, 1] - bm[:, 3]).quantile(q)) for q in (0.025, 0.975)],
        "fraction": frac,
        "fraction_ci": _ci(b_frac) if frac is not None else None,
        "fraction_finetune_only": one_sided,
        "fraction_finetune_only_ci": _ci(b_one) if one_sided is not None else None,
    }
    if frac is None or any(r is None for r in rand):
        out["random"] = {"values": rand, "mean": None, "p5": None, "p95": None, "z": None, "percentile": None}
        out["warning"] = f"the finetune's gain over the {ref} is ~0: no fraction to remove"
        return out
    r = torch.tensor(rand, dtype=torch.float64)
    z, pct = against_random(torch.tensor([frac], dtype=torch.float64), r[:, None])
    out["random"] = {
        "values": rand,
        "mean": float(r.mean()),
        "p5": float(r.quantile(0.05)),
        "p95": float(r.quantile(0.95)),
        "z": float(z[0]),
        "percentile": float(pct[0]),
    }
    return out


def _adapter_view(base: LoadedModel, model: LoadedModel | str | Path, role: str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return base.with_adapter(resolve_adapter(model), label=f"{STAGE}:{role}:{resolve_adapter(model).resolve()}")


def ablate(
    base: LoadedModel,
    finetuned: LoadedModel | str | Path,
    direction: Direction,
    items: Sequence[BatteryItem],
    *,
    control: LoadedModel | str | Path | None = None,
    layers: Sequence[int] | str | int = "all",
    mode: AblateMode = "project",
    n_random: int = MIN_RANDOM,
    seed: int = 0,
    n_boot: int = 1000,
    batch_size: int = 32,
    progress: bool = False,
) -> AblationResult:
    """Score ``items`` in base, finetune (and control), each with/without ``direction`` removed at
    ``layers`` (every position), against ``n_random`` random directions; see the module docstring.

    ``finetuned`` / ``control``: an adapter folder or ``latentlab finetune`` run folder (switched on
    the loaded ``base`` with :meth:`LoadedModel.with_adapter`), or an already loaded model.
    """
    if mode not in ("project", "mean"):
        raise LatentlabError(f"unknown ablation mode {mode!r}", "use --mode project or --mode mean")
    if n_random < MIN_RANDOM:
        raise LatentlabError(
            f"n_random={n_random} random directions are too few for a distribution",
            f"use --n-random {MIN_RANDOM} or more",
        )
    if len(items) < 2:
        raise LatentlabError("the battery needs at least two items for an interval", "pass a larger --battery")
    layer_list = base.check_layers([layers] if isinstance(layers, int) else layers)
    direction.check(base, layer_list)
    models = {"base": base, "finetuned": _adapter_view(base, finetuned, "finetuned")}
    if control is not None:
        models["control"] = _adapter_view(base, control, "control")
    units = {layer: direction.unit(layer) for layer in layer_list}
    randoms = [Ablate.random(base.d_model, layer_list, seed=seed * 1000 + i) for i in range(n_random)]
    means = None
    real = Ablate.from_direction(direction, layer_list)
    if mode == "mean":
        mean_act = base_mean_activation(base, sorted({i.prompt for i in items}), layer_list)
        check_finite(mean_act, "the base's mean activations", STAGE)
        means = base_mean_projections(mean_act, units, layer_list)
        real = Ablate.from_direction(direction, layer_list, means=means)
        for r in randoms:
            r.means = base_mean_projections(mean_act, r.units, layer_list)
    conditions: list[Condition] = [(None, 0.0), (real, 1.0), *((r, 1.0) for r in randoms)]
    s = {
        name: score_conditions(m, items, conditions, batch_size=batch_size, progress=progress).double()
        for name, m in models.items()
    }
    for name, v in s.items():
        check_finite(v, f"{name} battery scores", STAGE)
    scores = {}
    for name, v in s.items():
        plain_ci = [float(x) for x in _ci(bootstrap_means(v[0], n_boot, seed)) or [float("nan")] * 2]
        abl_ci = [float(x) for x in _ci(bootstrap_means(v[1], n_boot, seed)) or [float("nan")] * 2]
        scores[name] = {
            "plain": {"score": float(v[0].mean()), "ci": plain_ci},
            "ablated": {"score": float(v[1].mean()), "ci": abl_ci},
            "random_ablated": v[2:].mean(1).tolist(),
            "per_item_plain": v[0].tolist(),
            "per_item_ablated": v[1].tolist(),
        }
    refs = ["base"] + (["control"] if control is not None else [])
    fractions = {ref: _fractions_vs(s, ref, n_boot, seed) for ref in refs}
    return AblationResult(
        direction=direction.name,
        layers=layer_list,
        mode=mode,
        scores=scores,
        fractions=fractions,
        means=means,
        meta={
            "models": {name: m.info.to_dict() for name, m in models.items()},
            "n_items": len(items),
            "n_random": n_random,
            "random_seeds": [seed * 1000 + i for i in range(n_random)],
            "n_boot": n_boot,
            "seed": seed,
            "positions": "all",
            "direction_meta": direction.meta,
        },
    )


# --------------------------------------------------------------------------------------------
# A finetune and its control must share their base.
# --------------------------------------------------------------------------------------------


def _recorded_base(adapter: Path) -> str | None:
    p = adapter / "latentlab_adapter.json"
    if not p.exists():
        return None
    fp = read_json(p).get("base_fingerprint")
    return fp if isinstance(fp, str) else None


def check_same_base(finetuned: Path, control: Path) -> None:
    """Refuse a control trained on another base than the finetune (from their recorded fingerprints)."""
    a, b = _recorded_base(finetuned), _recorded_base(control)
    if a is not None and b is not None and a != b:
        raise LatentlabError(
            f"the control {control} was trained on another base model than the finetune {finetuned} "
            f"(base fingerprints {b} vs {a})",
            "pass a control finetuned from the same base model",
        )
