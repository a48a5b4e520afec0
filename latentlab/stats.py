"""Statistics every stage shares: bootstrap intervals, the across-seed t-interval, seeded random
directions and where a real effect falls among them.

Why one home: a finetune moves activations in *every* direction, and battery scores regress toward
0.5 under any perturbation, so every claim latentlab makes is "this direction against random ones,
with an interval". If each stage drew its own random vectors or resampled its own way, two numbers
that should agree (``latentlab shift`` and ``latentlab sae shift`` on the same prompts) would not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.errors import LatentlabError

# t_{0.975} for 1..10 degrees of freedom (seeds are few; scipy is not a dependency for one table).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def bootstrap_means(
    values: Float[Tensor, "n ..."], n_boot: int = 1000, seed: int = 0
) -> Float[Tensor, "n_boot ..."]:
    """Means of ``n_boot`` seeded resamples of the rows of ``values``; every column shares one
    resampling, so intervals of related quantities (e.g. the parts of a decomposition) are paired."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (n_boot, len(values)), generator=g)
    return values[idx].mean(1)


def percentile_ci(means: Float[Tensor, "n_boot ..."]) -> list[tuple[float, float]] | tuple[float, float]:
    """95% percentile interval of bootstrap means: one pair, or one pair per column."""
    lo, hi = means.quantile(0.025, dim=0), means.quantile(0.975, dim=0)
    if lo.ndim == 0:
        return (float(lo), float(hi))
    return [(float(a), float(b)) for a, b in zip(lo.flatten().tolist(), hi.flatten().tolist())]


def bootstrap_ci(values: Float[Tensor, " n"], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (seeded, so results are reproducible)."""
    if len(values) < 2:
        return (float("nan"), float("nan"))
    means = bootstrap_means(values, n_boot, seed)
    return (float(means.quantile(0.025)), float(means.quantile(0.975)))


def cluster_mean(groups: Sequence[Float[Tensor, " n_q"]]) -> float:
    """Mean of the per-cluster means of the clusters that hold values (each cluster weighs the same);
    NaN when none does. The point estimate :func:`two_level_bootstrap` resamples."""
    means = [float(g.double().mean()) for g in groups if len(g)]
    return sum(means) / len(means) if means else math.nan


def two_level_bootstrap(
    values: Sequence[Sequence[Float[Tensor, " n_q"]]], n_boot: int = 1000, seed: int = 0, chunk: int = 100
) -> Float[Tensor, "n_groups n_boot"]:
    """Bootstrap :func:`cluster_mean` of several groups (arms) whose values fall in shared clusters
    (questions): ``values[group][cluster]`` is a 1-D tensor, possibly empty.

    Each resample draws the clusters with replacement, the same draw for every group, then each drawn
    cluster's values with replacement within each group. Why two levels: answers to one question are
    not independent (a model answers one question alike), so resampling answers alone pretends there
    are more independent observations than there are questions. Why one cluster draw for all groups:
    ``boot[a] - boot[b]`` is then the paired bootstrap of the difference, which cancels how hard each
    question is. A cluster a group holds no values for drops out of that group's resample; a resample
    that drew none with values is NaN (use ``nanquantile``).
    """
    if not values:
        return torch.empty(0, n_boot, dtype=torch.float64)
    n_q = len(values[0])
    if any(len(v) != n_q for v in values):
        raise LatentlabError("every group needs the same clusters for a paired bootstrap", "pass one list per group")
    if n_q == 0:
        return torch.full((len(values), n_boot), math.nan, dtype=torch.float64)
    qdraw = torch.randint(0, n_q, (n_boot, n_q), generator=torch.Generator().manual_seed(seed))
    out = torch.empty(len(values), n_boot, dtype=torch.float64)
    for a, groups in enumerate(values):
        counts = torch.tensor([len(v) for v in groups])
        width = max(int(counts.max()), 1)
        mat = torch.zeros(n_q, width, dtype=torch.float64)
        for q, v in enumerate(groups):
            mat[q, : len(v)] = v.double()
        g = torch.Generator().manual_seed(seed * 1_000_003 + a + 1)  # the within-cluster draws of group a
        for b0 in range(0, n_boot, chunk):
            qd = qdraw[b0 : b0 + chunk]  # [b, n_q]
            c = counts[qd]
            u = torch.rand((*qd.shape, width), generator=g, dtype=torch.float64)
            idx = (u * c[..., None]).long().clamp_max(width - 1)
            picked = mat[qd[..., None].expand_as(idx), idx]
            mask = torch.arange(width)[None, None, :] < c[..., None]
            qmean = (picked * mask).sum(-1) / c.clamp_min(1)
            present = c > 0
            out[a, b0 : b0 + chunk] = (qmean * present).sum(-1) / present.sum(-1)
    return out


def nan_percentile_ci(means: Float[Tensor, " n_boot"]) -> tuple[float, float]:
    """95% percentile interval of bootstrap statistics, ignoring NaN resamples (NaN if all are)."""
    m = means[~torch.isnan(means)]
    if len(m) == 0:
        return (math.nan, math.nan)
    return (float(m.quantile(0.025)), float(m.quantile(0.975)))


def seed_interval(vals: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval across seeds (n - 1 degrees of freedom); NaN bounds for one seed.

    Seeds are the replication unit of a finetuning experiment, so this is the interval for "does
    this finetune do it"; bootstraps over prompts only say the effect is consistent across prompts.
    """
    n = len(vals)
    if n == 0:
        raise LatentlabError("no values for an across-seed interval", "run at least one seed")
    mean = sum(vals) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = T975[min(n - 1, len(T975)) - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good at small n and near 0 or 1)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def random_units(shape: Sequence[int], seed: int = 0) -> Float[Tensor, "*batch d"]:
    """Seeded Gaussian directions normalised along the last axis: ``shape = (..., d_model)``.

    A Gaussian draw is uniform on the sphere, so these are the unbiased "any direction" control.
    Scale them to a real direction's norm with :func:`norm_matched`.
    """
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(tuple(shape), generator=g)
    return r / r.norm(dim=-1, keepdim=True)


def norm_matched(
    like: Float[Tensor, "*layers d"], n: int, seed: int = 0
) -> Float[Tensor, "n *layers d"]:
    """``n`` seeded random directions per row of ``like``, each with that row's norm."""
    r = random_units((n, *like.shape), seed)
    return r * like.norm(dim=-1, keepdim=True).unsqueeze(0)


def against_random(
    real: Float[Tensor, " k"], random: Float[Tensor, "n_random k"]
) -> tuple[Float[Tensor, " k"], Float[Tensor, " k"]]:
    """(z, percentile of |real| among |random|) per column: how unusual the real effect is.

    z is signed, against the random effects' mean and spread; the percentile compares magnitudes.
    """
    z = (real - random.mean(0)) / random.std(0).clamp_min(1e-12)
    pct = (random.abs() < real.abs().unsqueeze(0)).float().mean(0) * 100
    return z, pct


def antisymmetric(score_plus: Tensor, score_minus: Tensor) -> Tensor:
    """(score(+a) - score(-a)) / 2: the part of a steering effect that is not regression to 0.5.

    Any perturbation pulls an A/B battery toward 0.5 whichever way it points; only the part that
    flips sign with the vector says the direction itself carries the behaviour.
    """
    return (score_plus - score_minus) / 2


def check_finite(values: Tensor | float | Sequence[float], what: str, stage: str) -> None:
    """Raise a clear error naming the stage when a result is NaN or infinite (never write NaN to JSON).

    Typical causes: a float16 overflow, or a broken adapter.
    """
    t = values if isinstance(values, Tensor) else torch.as_tensor(values, dtype=torch.float64)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise LatentlabError(
            f"{stage}: {what} came out NaN or infinite (a float16 overflow, or a broken adapter?)",
            "run with --dtype float32 or bfloat16, and check the adapter",
        )


def ranks(x: Sequence[float]) -> list[float]:
    """0-based ranks of ``x``; ties share their mean rank (as Spearman's correlation needs)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's correlation; None under 3 points or when either side is constant."""
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on mean-tied ranks); None as :func:`pearson`."""
    return pearson(ranks(x), ranks(y))
