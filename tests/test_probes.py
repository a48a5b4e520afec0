"""Linear probes: Wilson intervals, planted signal vs pure noise, grouped CV, save/load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentlab.activations import ActivationSet
from latentlab.errors import LatentlabError
from latentlab.probes import ProbeReport, fit_probes, wilson_interval

LAYERS = [1, 4]


def make_sets(n: int, d: int = 16, signal: float = 0.0, offset: float = 0.0, seed: int = 0
              ) -> tuple[ActivationSet, ActivationSet, torch.Tensor]:
    """(positive, negative, u): pairs sharing a per-pair offset; positives shifted by ``signal * u``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(len(LAYERS), d, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    base = offset * torch.randn(n, len(LAYERS), d, generator=g)
    pos = base + torch.randn(n, len(LAYERS), d, generator=g) + signal * u
    neg = base + torch.randn(n, len(LAYERS), d, generator=g)
    return ActivationSet(pos, list(LAYERS), "last"), ActivationSet(neg, list(LAYERS), "last"), u


# --------------------------------------------------------------------------------------------
# Wilson interval.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("correct", "n", "lo", "hi"),
    [
        (50, 100, 0.4038, 0.5962),
        (0, 10, 0.0, 0.2775),  # upper bound z^2 / (n + z^2)
        (10, 10, 0.7225, 1.0),
        (8, 10, 0.4902, 0.9433),
        (1, 1, 0.2065, 1.0),
        (95, 100, 0.8882, 0.9785),
    ],
)
def test_wilson_interval_known_values(correct: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(correct, n)
    assert got == pytest.approx((lo, hi), abs=5e-4)
    assert 0.0 <= got[0] <= correct / n <= got[1] <= 1.0


def test_wilson_interval_edge_cases() -> None:
    assert all(np.isnan(v) for v in wilson_interval(0, 0))
    # symmetric around 1/2, narrower with more data, wider at higher confidence
    lo, hi = wilson_interval(30, 100)
    assert (1 - hi, 1 - lo) == pytest.approx(wilson_interval(70, 100))
    assert np.diff(wilson_interval(500, 1000)) < np.diff(wilson_interval(50, 100))
    assert np.diff(wilson_interval(50, 100, z=2.58)) > np.diff(wilson_interval(50, 100))


# --------------------------------------------------------------------------------------------
# fit_probes: signal vs noise.
# --------------------------------------------------------------------------------------------


def test_planted_signal_is_decoded() -> None:
    pos, neg, _ = make_sets(60, signal=6.0, seed=1)
    tpos, tneg, _ = make_sets(30, signal=6.0, seed=1)  # same seed: the same planted u (and other noise)
    r = fit_probes(pos, neg, tpos, tneg)
    assert r.layers == LAYERS and r.n_train == 60 and r.n_test == 30
    for j in range(len(LAYERS)):
        assert r.cv_acc[j] > 0.95 and r.test_acc[j] is not None and r.test_acc[j] > 0.95
        assert r.cv_ci[j][0] <= r.cv_acc[j] <= r.cv_ci[j][1]
        assert r.cv_ci[j] == pytest.approx(wilson_interval(round(r.cv_acc[j] * 120), 120))
        assert r.test_ci[j] == pytest.approx(wilson_interval(round(r.test_acc[j] * 60), 60))
    assert r.meta == {"folds": 5, "C": 1.0}
    assert r.coef is not None and r.coef.shape == (2, 16) and r.intercept is not None and r.intercept.shape == (2,)


def test_pure_noise_is_at_chance() -> None:
    """No signal: accuracy is at chance. One CV estimate scatters more than a binomial (folds are
    correlated), so several independent noise datasets are pooled; their Wilson intervals contain 0.5."""
    cv_correct = test_correct = total = 0
    for seed in range(3):
        pos, neg, _ = make_sets(60, seed=10 + seed)
        tpos, tneg, _ = make_sets(60, seed=20 + seed)
        r = fit_probes(pos, neg, tpos, tneg)
        for j in range(len(LAYERS)):
            t = r.test_acc[j]
            assert t is not None and 0.3 < r.cv_acc[j] < 0.7 and 0.3 < t < 0.7
            cv_correct += round(r.cv_acc[j] * 120)
            test_correct += round(t * 120)
            total += 120
    cv_lo, cv_hi = wilson_interval(cv_correct, total)
    test_lo, test_hi = wilson_interval(test_correct, total)
    assert cv_lo < 0.5 < cv_hi and test_lo < 0.5 < test_hi, (cv_correct, test_correct, total)


def test_probe_weights_match_the_sklearn_pipeline() -> None:
    """coef/intercept fold the StandardScaler into raw units: predict() equals the pipeline's output."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pos, neg, u = make_sets(40, signal=1.5, seed=4)
    r = fit_probes(pos, neg, c=0.5)
    probs = r.predict(pos)
    assert probs.shape == (40, len(LAYERS)) and ((probs >= 0) & (probs <= 1)).all()
    for j, layer in enumerate(LAYERS):
        x = torch.cat([pos.layer(layer), neg.layer(layer)]).numpy()
        y = np.r_[np.ones(40), np.zeros(40)]
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000, random_state=0)).fit(x, y)
        expected = ref.predict_proba(pos.layer(layer).numpy())[:, 1]
        np.testing.assert_allclose(probs[:, j].numpy(), expected, atol=1e-5)
        assert r.coef is not None
        assert float(torch.nn.functional.cosine_similarity(r.coef[j], u[j], dim=0)) > 0.5  # weight follows u


def test_score_on_new_pairs() -> None:
    pos, neg, _ = make_sets(50, signal=4.0, seed=5)
    r = fit_probes(pos, neg)
    new_pos, new_neg, _ = make_sets(20, signal=4.0, seed=5)
    scores = r.score(new_pos, new_neg)
    assert len(scores) == len(LAYERS)
    for acc, (lo, hi) in scores:
        assert acc > 0.95 and lo <= acc <= hi
    # swapping the poles inverts the probe's verdicts
    for (acc, _), (acc_swapped, _) in zip(scores, r.score(new_neg, new_pos)):
        assert acc_swapped == pytest.approx(1 - acc)
    # manual count for one layer
    p, n = r.predict(new_pos)[:, 0], r.predict(new_neg)[:, 0]
    assert scores[0][0] == (int((p > 0.5).sum()) + int((n <= 0.5).sum())) / 40


def test_report_without_weights() -> None:
    pos, _, _ = make_sets(4)
    r = ProbeReport([1], [0.5], [(0.2, 0.8)], [None], [None], 4, 0)
    with pytest.raises(LatentlabError, match="no fitted probes"):
        r.predict(pos)
    with pytest.raises(LatentlabError, match="no fitted probes"):
        r.save("unused")
    assert r.best_layer == 1 and r.to_dict()["test_acc"] == [None]


def test_best_layer_prefers_held_out_and_breaks_ties_early() -> None:
    r = ProbeReport([0, 1, 2, 3], [0.9, 0.99, 0.7, 0.7], [(0, 1)] * 4, [0.8, 0.75, 0.8, 0.6], [(0, 1)] * 4, 5, 5)
    assert r.best_layer == 0  # held-out beats CV; tie between 0 and 2 goes to the earlier layer
    r_cv = ProbeReport([2, 5], [0.6, 0.8], [(0, 1)] * 2, [None, None], [None, None], 5, 0)
    assert r_cv.best_layer == 5


def test_fewer_than_two_pairs_is_an_error() -> None:
    pos, neg, _ = make_sets(1)
    with pytest.raises(LatentlabError, match="at least 2 pairs"):
        fit_probes(pos, neg)
    pos2, neg2, _ = make_sets(2, signal=3.0)
    r = fit_probes(pos2, neg2)  # two pairs is the minimum: two folds
    assert r.meta["folds"] == 2 and r.n_train == 2


def test_non_finite_activations_are_refused() -> None:
    pos, neg, _ = make_sets(6)
    neg.acts[0, 1, 0] = float("nan")
    with pytest.raises(LatentlabError, match="layer 4 contain NaN"):
        fit_probes(pos, neg)


# --------------------------------------------------------------------------------------------
# Grouped cross-validation.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def recorded_splits(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every split fit_probes' cross-validation makes (GroupKFold, with the groups it gets)."""
    import sklearn.model_selection as ms

    calls: list[dict[str, Any]] = []
    real = ms.GroupKFold

    class Recording(real):  # type: ignore[misc, valid-type]
        def split(self, X: Any, y: Any = None, groups: Any = None) -> Any:  # noqa: N803 - sklearn's names
            folds = list(super().split(X, y, groups))
            calls.append({"n_splits": self.n_splits, "groups": np.asarray(groups), "folds": folds})
            yield from folds

    monkeypatch.setattr(ms, "GroupKFold", Recording)
    return calls


def test_cv_folds_never_split_a_pair(recorded_splits: list[dict[str, Any]]) -> None:
    n = 13
    pos, neg, _ = make_sets(n, signal=2.0, offset=50.0, seed=6)
    r = fit_probes(pos, neg, folds=4)
    assert r.meta["folds"] == 4
    assert len(recorded_splits) == len(LAYERS)  # one grouped CV per layer
    for call in recorded_splits:
        assert call["n_splits"] == 4 and len(call["folds"]) == 4
        np.testing.assert_array_equal(call["groups"], np.r_[np.arange(n), np.arange(n)])  # row i and n+i: pair i
        seen = np.concatenate([test for _, test in call["folds"]])
        assert sorted(seen.tolist()) == list(range(2 * n))  # every row is held out exactly once
        for train, test in call["folds"]:
            train_pairs, test_pairs = set(train % n), set(test % n)
            assert not train_pairs & test_pairs, "a pair sits on both sides of a split"
            assert len(test) == 2 * len(test_pairs)  # both poles of each held-out pair are held out


def test_folds_capped_by_pair_count(recorded_splits: list[dict[str, Any]]) -> None:
    pos, neg, _ = make_sets(3, signal=2.0)
    r = fit_probes(pos, neg, folds=10)
    assert r.meta["folds"] == 3 and all(c["n_splits"] == 3 for c in recorded_splits)


def test_grouped_cv_with_large_pair_offsets_is_deterministic() -> None:
    """Each pair shares a huge offset; only the small planted shift separates the poles.

    Grouped folds hold out whole pairs, so the probe must learn the shift (not the pair), and it can:
    the offsets are common to both poles. Results are deterministic (no shuffling, seeded solver).
    """
    pos, neg, u = make_sets(40, signal=6.0, seed=7)
    g = torch.Generator().manual_seed(70)
    offsets = 30.0 * torch.randn(40, len(LAYERS), 16, generator=g)  # 5x the shift, 30x the noise
    offsets -= (offsets * u).sum(-1, keepdim=True) * u  # shared by both poles, orthogonal to the signal
    pos.acts += offsets
    neg.acts += offsets
    a = fit_probes(pos, neg)
    b = fit_probes(pos, neg)
    assert a.cv_acc == b.cv_acc and a.cv_ci == b.cv_ci
    assert a.coef is not None and b.coef is not None and torch.equal(a.coef, b.coef)
    assert min(a.cv_acc) > 0.95


# --------------------------------------------------------------------------------------------
# Save / load.
# --------------------------------------------------------------------------------------------


def test_probe_report_round_trip(tmp_path: Path) -> None:
    pos, neg, _ = make_sets(20, signal=2.0, seed=8)
    tpos, tneg, _ = make_sets(10, signal=2.0, seed=9)
    r = fit_probes(pos, neg, tpos, tneg, folds=4, c=2.0)
    r.meta["dataset"] = "synthetic"
    path = r.save(tmp_path / "probes")
    assert path == tmp_path / "probes.safetensors" and path.exists()
    side = json.loads((tmp_path / "probes.json").read_text())
    assert side["best_layer"] == r.best_layer and side["n_train_pairs"] == 20 and side["dataset"] == "synthetic"

    back = ProbeReport.load(path)
    assert back.layers == r.layers and back.cv_acc == r.cv_acc and back.test_acc == r.test_acc
    assert [tuple(c) for c in back.cv_ci] == [tuple(c) for c in r.cv_ci]
    assert [tuple(c) for c in back.test_ci if c] == [tuple(c) for c in r.test_ci if c]
    assert (back.n_train, back.n_test, back.best_layer) == (20, 10, r.best_layer)
    assert back.meta == {"folds": 4, "C": 2.0, "dataset": "synthetic"}
    assert back.coef is not None and r.coef is not None and torch.equal(back.coef, r.coef)
    torch.testing.assert_close(back.predict(tpos), r.predict(tpos))
    assert back.score(tpos, tneg) == r.score(tpos, tneg)
    assert back.to_dict() == json.loads(json.dumps(r.to_dict()))
