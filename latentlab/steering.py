"""Steering: add ``alpha * unit_direction * typical_residual_norm`` to the residual stream.

Design:

- A :class:`~latentlab.interventions.Steer` holds, per layer, the vector at coefficient 1 (unit
  direction times the layer's mean residual norm), so ``alpha`` is a fraction of a typical
  activation on every model.
- A K-coefficient sweep with random controls is one batched pass over
  ``2 x N x K x (1 + n_random)`` rows (:func:`latentlab.scoring.score_conditions`), not ``K x N`` calls.
- Random directions only pull a battery toward 0.5; compare them on the antisymmetric part
  ``(score(+a) - score(-a)) / 2`` (:meth:`SweepResult.antisymmetric`).
- Which layer to steer at is itself a measurement: :func:`screen_layers` on a dev split of the
  battery (:func:`dev_eval_split`), so the reported scores on the other items are not inflated by
  the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from jaxtyping import Float
from torch import Tensor

from latentlab.data import BatteryItem
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.generation import generate
from latentlab.interventions import Condition, Mode, Steer
from latentlab.models import LoadedModel
from latentlab.scoring import score_conditions
from latentlab.stats import antisymmetric, bootstrap_ci, check_finite

__all__ = [
    "DEFAULT_GENERATION_PROMPTS",
    "Steer",
    "SweepResult",
    "candidate_layers",
    "dev_eval_split",
    "generate",
    "score_conditions",
    "screen_layers",
    "sweep",
]

T = TypeVar("T")

# Everyday questions for the side-by-side generations: no era or persona words in them, so any
# old-fashioned (or captain-like) turn in the answer comes from the steering vector.
DEFAULT_GENERATION_PROMPTS = (
    "How would you send an urgent message to a relative who lives far away?",
    "What invention has changed daily life the most?",
    "Describe a typical evening at home.",
)


def dev_eval_split(items: Sequence[T], every: int = 4) -> tuple[list[T], list[T]]:
    """(dev, eval): every ``every``-th item screens layers, the rest are reported.

    Why: choosing the layer on the items you report inflates the reported effect.
    """
    if every < 2:
        raise ValueError("every must be >= 2")
    dev = list(items[::every])
    ev = [it for i, it in enumerate(items) if i % every != 0]
    return dev, ev


@dataclass
class SweepResult:
    """Battery scores for each coefficient, for the direction and for norm-matched random ones."""

    coeffs: list[float]
    layers: list[int]
    scores: Float[Tensor, "n_coeffs n_items"]
    random_scores: Float[Tensor, "n_random n_coeffs n_items"]
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for k, a in enumerate(self.coeffs):
            s = self.scores[k]
            row: dict[str, Any] = {"alpha": a, "score": float(s.mean()), "ci": bootstrap_ci(s)}
            if self.random_scores.shape[0]:
                r = self.random_scores[:, k].mean(0)
                row |= {"random": float(r.mean()), "random_ci": bootstrap_ci(r)}
            rows.append(row)
        return rows

    def antisymmetric(self) -> list[dict[str, Any]]:
        """(score(+a) - score(-a)) / 2 per |a| for the direction and each random one (item means).

        The direction's signature: any push pulls the battery toward 0.5, only this part flips sign.
        """
        rows = []
        for a in sorted({abs(c) for c in self.coeffs if c != 0}):
            if a not in self.coeffs or -a not in self.coeffs:
                continue
            i, j = self.coeffs.index(a), self.coeffs.index(-a)
            d = antisymmetric(self.scores[i], self.scores[j])
            row: dict[str, Any] = {"alpha": a, "direction": float(d.mean()), "ci": bootstrap_ci(d)}
            if self.random_scores.shape[0]:
                r = antisymmetric(self.random_scores[:, i], self.random_scores[:, j]).mean(1)
                row["random"] = r.tolist()
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "coeffs": self.coeffs,
            "layers": self.layers,
            "table": self.table(),
            "antisymmetric": self.antisymmetric(),
            "per_item_scores": self.scores.tolist(),
            "per_item_random_scores": self.random_scores.tolist(),
            **self.meta,
        }


def sweep(
    model: LoadedModel,
    direction: Direction,
    items: Sequence[BatteryItem],
    layers: int | Sequence[int],
    coeffs: Sequence[float] = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0),
    n_random: int = 1,
    mode: Mode = "all",
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> SweepResult:
    """Battery score vs steering coefficient, with ``n_random`` norm-matched random controls, in one batched pass."""
    steer = Steer.from_direction(direction, layers, mode)
    randoms = [Steer.random_like(direction, layers, seed=seed + 1 + i, mode=mode) for i in range(n_random)]
    conditions: list[Condition] = [(steer, a) for a in coeffs]
    conditions += [(r, a) for r in randoms for a in coeffs]
    s = score_conditions(model, items, conditions, batch_size=batch_size, progress=progress)
    k = len(coeffs)
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    return SweepResult(
        list(coeffs),
        layer_list,
        s[:k],
        s[k:].view(n_random, k, len(items)),
        {"direction": direction.name, "mode": mode, "seed": seed, "n_items": len(items)},
    )


def screen_layers(
    model: LoadedModel,
    direction: Direction,
    items: Sequence[BatteryItem],
    candidates: Sequence[int],
    alpha: float = 0.5,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[int, float]:
    """Steering effect score(+alpha) - score(-alpha) per candidate layer, in one batched pass."""
    conditions: list[Condition] = []
    for layer in candidates:
        steer = Steer.from_direction(direction, layer)
        conditions += [(steer, alpha), (steer, -alpha)]
    s = score_conditions(model, items, conditions, batch_size=batch_size, progress=progress).mean(1)
    return {layer: float(s[2 * i] - s[2 * i + 1]) for i, layer in enumerate(candidates)}


def candidate_layers(n_layers: int, probe_acc: Sequence[float] | None = None, k: int = 5) -> list[int]:
    """Up to ``k`` layers in the middle half of the network, preferring well-probed ones.

    Why the middle: early layers hold token-level features and late ones are about to be read out;
    steering papers (and our gemma-3-270m measurements) find concepts are most steerable in between.
    """
    band = list(range(n_layers // 4, max(n_layers // 4 + 1, (3 * n_layers) // 4 + 1)))
    if probe_acc is not None:
        best = max(probe_acc[i] for i in band)
        band = [i for i in band if probe_acc[i] >= best - 0.05] or band
    if len(band) <= k:
        return band
    if k == 1:
        return [band[len(band) // 2]]
    step = (len(band) - 1) / (k - 1)
    return sorted({band[round(i * step)] for i in range(k)})


# --------------------------------------------------------------------------------------------
# Which layer to steer at: a screen on dev items, reported scores on the others.
# --------------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """The chosen layer, the screen's score(+alpha) - score(-alpha) per candidate, and the split."""

    layer: int
    screen: dict[int, float]
    dev_items: list[BatteryItem]
    eval_items: list[BatteryItem]


def choose_layer(
    model: LoadedModel,
    direction: Direction,
    items: Sequence[BatteryItem],
    probe_acc: Sequence[float] | None = None,
    every: int = 4,
    alpha: float = 0.5,
    k: int = 5,
    progress: bool = False,
) -> LayerChoice:
    """Screen :func:`candidate_layers` (those the direction has) on a dev split of ``items``
    (:func:`dev_eval_split`) and pick the layer with the largest steering effect; report on ``eval_items``."""
    dev, ev = dev_eval_split(items, every)
    if not dev or not ev:
        raise LatentlabError(
            f"{len(items)} battery items are too few to screen layers on a dev split",
            "pass --layer, or a battery with at least 2 items",
        )
    wanted = candidate_layers(model.n_layers, probe_acc, k)
    cands = [c for c in wanted if c in direction.layers]
    if not cands:
        raise LatentlabError(
            f"no candidate layer for the layer screen: it looks at layers {wanted}, the {direction.name} "
            f"direction has {direction.layers}",
            "pass --layer with a layer the direction has, or fit the direction on more layers",
        )
    screen = screen_layers(model, direction, dev, cands, alpha=alpha, progress=progress)
    check_finite(list(screen.values()), "the layer-screen scores", "steer")
    return LayerChoice(max(screen, key=lambda c: screen[c]), screen, dev, ev)
