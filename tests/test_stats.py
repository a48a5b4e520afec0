"""latentlab.stats: the one home of intervals and random directions."""

from __future__ import annotations

import math

import pytest
import torch

from latentlab.errors import LatentlabError
from latentlab.stats import (
    against_random,
    antisymmetric,
    bootstrap_ci,
    bootstrap_means,
    check_finite,
    norm_matched,
    percentile_ci,
    random_units,
    seed_interval,
    wilson_interval,
)


def test_random_units_are_seeded_unit_vectors_and_match_the_old_per_layer_draw() -> None:
    r = random_units((3, 5, 64), seed=4)
    assert torch.allclose(r.norm(dim=-1), torch.ones(3, 5))
    assert torch.equal(r, random_units((3, 5, 64), seed=4))
    assert not torch.equal(r, random_units((3, 5, 64), seed=5))
    # the draw steering and patching used to make, one layer at a time from one generator
    g = torch.Generator().manual_seed(4)
    rows = [torch.randn(64, generator=g) for _ in range(5)]
    old = torch.stack([x / x.norm() for x in rows])
    assert torch.allclose(random_units((5, 64), seed=4), old)


def test_norm_matched_keeps_each_rows_norm() -> None:
    like = torch.randn(4, 16) * torch.tensor([[1.0], [10.0], [100.0], [0.5]])
    r = norm_matched(like, 7, seed=0)
    assert r.shape == (7, 4, 16)
    assert torch.allclose(r.norm(dim=-1), like.norm(dim=-1).expand(7, 4))


def test_bootstrap_is_seeded_and_paired_across_columns() -> None:
    v = torch.arange(20.0)[:, None] * torch.tensor([[1.0, 2.0]])
    m = bootstrap_means(v, 200, seed=1)
    assert torch.allclose(m[:, 1], 2 * m[:, 0])  # one resampling shared by both columns
    lo_hi = percentile_ci(m)
    assert len(lo_hi) == 2 and lo_hi[0][0] < 9.5 < lo_hi[0][1]
    assert bootstrap_ci(v[:, 0]) == bootstrap_ci(v[:, 0], seed=0) != bootstrap_ci(v[:, 0], seed=3)
    assert all(math.isnan(x) for x in bootstrap_ci(torch.tensor([1.0])))


def test_seed_interval_uses_t_with_n_minus_1_df() -> None:
    mean, lo, hi = seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-6) and lo < mean
    assert math.isnan(seed_interval([5.0])[1])
    with pytest.raises(LatentlabError):
        seed_interval([])


def test_wilson_and_against_random_and_antisymmetric() -> None:
    lo, hi = wilson_interval(9, 10)
    assert 0.5 < lo < 0.9 < hi <= 1.0
    z, pct = against_random(torch.tensor([5.0, 0.0]), torch.randn(1000, 2, generator=torch.Generator().manual_seed(0)))
    assert z[0] > 4 and pct[0] == 100 and abs(float(z[1])) < 0.2
    assert torch.allclose(antisymmetric(torch.tensor([0.9]), torch.tensor([0.1])), torch.tensor([0.4]))


def test_check_finite_names_the_stage() -> None:
    check_finite(torch.tensor([1.0, 2.0]), "scores", "steering")
    with pytest.raises(LatentlabError, match="patching: scores came out NaN"):
        check_finite(torch.tensor([1.0, float("nan")]), "scores", "patching")
    with pytest.raises(LatentlabError, match="infinite"):
        check_finite([float("inf")], "loss", "finetune")


def test_spearman_gives_ties_their_mean_rank() -> None:
    from latentlab.stats import pearson, ranks, spearman

    assert ranks([3.0, 1.0, 2.0, 2.0]) == [3.0, 0.0, 1.5, 1.5]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None
