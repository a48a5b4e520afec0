"""Directions: difference of means / PCA recover a planted direction; save/load; random controls.

Synthetic :class:`ActivationSet` s with a known planted direction test the maths exactly; the tiny
random models test the plumbing (pairs file -> activations -> direction + probes), including
prompted (persona-style) pairs whose poles are answers and are pooled over the response.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from latentlab.activations import ActivationSet, collect, encode
from latentlab.data import Example, Pair, pair_examples
from latentlab.directions import (
    Direction,
    collect_pairs,
    direction_and_probes,
    find_direction,
    fit_direction,
    random_directions,
    resolve_pairs,
)
from latentlab.errors import LatentlabError
from latentlab.io import save_tensors

LAYERS = [0, 3, 5]


def planted_sets(n: int = 200, d: int = 32, signal: float = 3.0, noise: float = 1.0, offset: float = 5.0,
                 seed: int = 0) -> tuple[ActivationSet, ActivationSet, torch.Tensor]:
    """Matched pairs: a shared per-pair offset, independent noise, and ``signal * u[layer]`` on the positives.

    Returns (positive, negative, u) with ``u`` the planted unit direction per layer, ``[n_layers, d]``.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(len(LAYERS), d, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    base = offset * torch.randn(n, len(LAYERS), d, generator=g)  # what the two poles of a pair share
    pos = base + noise * torch.randn(n, len(LAYERS), d, generator=g) + signal * u
    neg = base + noise * torch.randn(n, len(LAYERS), d, generator=g)
    meta = {"model": "synthetic"}
    return (ActivationSet(pos, list(LAYERS), "last", None, dict(meta)),
            ActivationSet(neg, list(LAYERS), "last", None, dict(meta)), u)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


# --------------------------------------------------------------------------------------------
# fit_direction on synthetic activations.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_planted_direction_is_recovered(method: str) -> None:
    pos, neg, u = planted_sets()
    d = fit_direction(pos, neg, method=method, name="planted")  # type: ignore[arg-type]
    assert d.layers == LAYERS and d.vectors.shape == (len(LAYERS), 32)
    assert (d.name, d.method, d.position) == ("planted", method, "last")
    mean_diff = pos.acts.mean(0) - neg.acts.mean(0)
    for j, layer in enumerate(LAYERS):
        assert cos(d.vector(layer), u[j]) > 0.95
        assert cos(d.unit(layer), u[j]) > 0.95
        # both methods point from the negative pole to the positive one, with the mean shift's length
        assert cos(d.vector(layer), mean_diff[j]) > 0.95
        assert float(d.vector(layer).norm()) == pytest.approx(float(mean_diff[j].norm()), rel=1e-5)
    if method == "mean_diff":
        torch.testing.assert_close(d.vectors, mean_diff)
    assert d.meta["n_positive"] == d.meta["n_negative"] == 200 and d.meta["model"] == "synthetic"


def test_pca_sign_follows_mean_difference_either_way() -> None:
    """SVD's sign is arbitrary: swapping the poles must flip the PCA direction too."""
    pos, neg, u = planted_sets(seed=3)
    fwd = fit_direction(pos, neg, "pca")
    rev = fit_direction(neg, pos, "pca")
    for j in range(len(LAYERS)):
        assert cos(fwd.vectors[j], u[j]) > 0.95
        assert cos(rev.vectors[j], u[j]) < -0.95
    torch.testing.assert_close(rev.vectors, -fwd.vectors, rtol=1e-4, atol=1e-5)


def test_pca_ignores_a_large_shared_component() -> None:
    """Uncentred PCA of *paired* differences: what both poles of a pair share cancels out."""
    pos, neg, u = planted_sets(offset=1000.0, seed=5)
    d = fit_direction(pos, neg, "pca")
    assert all(cos(d.vectors[j], u[j]) > 0.95 for j in range(len(LAYERS)))


def test_resid_norms_are_the_mean_activation_norm() -> None:
    pos, neg, _ = planted_sets(n=20)
    d = fit_direction(pos, neg)
    expected = torch.cat([pos.acts, neg.acts]).norm(dim=-1).mean(0)
    torch.testing.assert_close(d.resid_norms, expected)
    for j, layer in enumerate(LAYERS):
        assert d.resid_norm(layer) == pytest.approx(float(expected[j]))
        assert float(d.unit(layer).norm()) == pytest.approx(1.0, abs=1e-6)
        assert cos(d.unit(layer), d.vector(layer)) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(d.units().norm(dim=-1), torch.ones(len(LAYERS)))
    with pytest.raises(LatentlabError, match="has no layer 4"):
        d.vector(4)
    with pytest.raises(LatentlabError, match="has no layer 1"):
        d.resid_norm(1)


def test_unit_of_a_zero_vector_is_finite() -> None:
    d = Direction(torch.zeros(1, 8), [2], torch.ones(1))
    assert torch.isfinite(d.unit(2)).all() and torch.isfinite(d.units()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("pole", ["positive", "negative"])
def test_non_finite_activations_are_refused(bad: float, pole: str) -> None:
    pos, neg, _ = planted_sets(n=10)
    target = pos if pole == "positive" else neg
    target.acts[3, 1, 7] = bad
    for method in ("mean_diff", "pca"):
        with pytest.raises(LatentlabError, match="NaN or inf"):
            fit_direction(pos, neg, method)  # type: ignore[arg-type]


def test_fit_direction_input_errors() -> None:
    pos, neg, _ = planted_sets(n=10)
    other_layers = ActivationSet(neg.acts, [0, 3, 6], "last")
    with pytest.raises(LatentlabError, match="differ in layers or position"):
        fit_direction(pos, other_layers)
    with pytest.raises(LatentlabError, match="differ in layers or position"):
        fit_direction(pos, ActivationSet(neg.acts, list(LAYERS), "mean"))
    with pytest.raises(LatentlabError, match="unknown method"):
        fit_direction(pos, neg, "ica")  # type: ignore[arg-type]
    fewer = ActivationSet(neg.acts[:7], list(LAYERS), "last")
    with pytest.raises(LatentlabError, match="matched pairs"):
        fit_direction(pos, fewer, "pca")
    assert fit_direction(pos, fewer, "mean_diff").meta["n_negative"] == 7  # unpaired is fine for means
    empty = ActivationSet(torch.zeros(0, len(LAYERS), 32), list(LAYERS), "last")
    with pytest.raises(LatentlabError, match="no examples"):
        fit_direction(empty, neg)
    tokens = ActivationSet(pos.acts, list(LAYERS), "all", torch.tensor([0, 4, 10]))
    with pytest.raises(LatentlabError, match="one vector per example"):
        fit_direction(tokens, ActivationSet(neg.acts, list(LAYERS), "all", torch.tensor([0, 4, 10])))


# --------------------------------------------------------------------------------------------
# Saving and loading.
# --------------------------------------------------------------------------------------------


def test_direction_save_load_round_trip(tmp_path: Path) -> None:
    pos, neg, _ = planted_sets(n=12)
    d = fit_direction(pos, neg, "pca", name="era")
    d.meta.update({"dataset": "era", "dataset_hash": "abc123", "n_train_pairs": 12})
    path = d.save(tmp_path / "direction")
    assert path == tmp_path / "direction.safetensors" and path.exists()
    sidecar = json.loads((tmp_path / "direction.json").read_text())
    assert sidecar["name"] == "era" and sidecar["layers"] == LAYERS and sidecar["method"] == "pca"
    assert sidecar["norms"] == pytest.approx(d.vectors.norm(dim=-1).tolist())
    assert sidecar["resid_norms"] == pytest.approx(d.resid_norms.tolist())
    for source in (path, tmp_path, tmp_path / "direction"):  # file, folder, or stem
        back = Direction.load(source)
        assert torch.equal(back.vectors, d.vectors) and torch.equal(back.resid_norms, d.resid_norms)
        assert (back.layers, back.name, back.position, back.method) == (LAYERS, "era", "last", "pca")
        assert back.meta == d.meta  # bookkeeping keys (norms, resid_norms) do not leak into meta
        assert back.resid_norm(5) == d.resid_norm(5)


def test_loading_something_else_is_a_clear_error(tmp_path: Path) -> None:
    save_tensors(tmp_path / "probes", {"coef": torch.zeros(2, 4)}, {"layers": [0, 1]})
    with pytest.raises(LatentlabError, match="is not a latentlab direction"):
        Direction.load(tmp_path / "probes.safetensors")
    with pytest.raises(LatentlabError, match="missing"):
        Direction.load(tmp_path / "nothing-here.safetensors")
    with pytest.raises(LatentlabError, match="missing"):
        Direction.load(tmp_path)  # a folder without direction.safetensors


# --------------------------------------------------------------------------------------------
# Random controls.
# --------------------------------------------------------------------------------------------


def test_random_directions_are_norm_matched_and_seeded() -> None:
    pos, neg, _ = planted_sets(n=12)
    d = fit_direction(pos, neg)
    r = random_directions(d, 5, seed=11)
    assert r.shape == (5, len(LAYERS), 32)
    torch.testing.assert_close(r.norm(dim=-1), d.vectors.norm(dim=-1).expand(5, -1))
    assert torch.equal(r, random_directions(d, 5, seed=11))
    assert not torch.allclose(r, random_directions(d, 5, seed=12))
    # random in 32 dimensions: not aligned with the real direction, nor with each other
    cosines = torch.nn.functional.cosine_similarity(r, d.vectors.expand(5, -1, -1), dim=-1)
    assert cosines.abs().max() < 0.9
    assert cos(r[0, 0], r[1, 0]) < 0.9


# --------------------------------------------------------------------------------------------
# On a tiny random model: pairs file -> direction and probes.
# --------------------------------------------------------------------------------------------

WORDS = "the cat sat on a mat and then ran far away from home to see big red bus old man dog".split()


def marker_pairs(n_train: int = 16, n_test: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Pairs whose positive ends in the marker word ``zebra`` and the negative in ``table``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_train + n_test):
        base = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 7)))
        rows.append({"positive": f"{base} zebra", "negative": f"{base} table", "topic": f"t{i % 3}",
                     "split": "train" if i < n_train else "test"})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def marker_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "marker.jsonl", marker_pairs())


def test_direction_and_probes_on_tiny_model(tiny_gemma: Any, marker_file: Path) -> None:
    d, report = direction_and_probes(tiny_gemma, marker_file, layers="all", progress=False)
    assert d.name == "marker" and d.layers == [0, 1, 2, 3] and d.vectors.shape == (4, 64)
    assert d.position == "last" and d.method == "mean_diff"
    assert torch.isfinite(d.vectors).all() and (d.resid_norms > 0).all()
    assert d.meta["n_train_pairs"] == 16 and d.meta["n_test_pairs"] == 8
    assert d.meta["dataset"] == str(marker_file) and len(d.meta["dataset_hash"]) == 16
    assert d.meta["n_positive"] == 16  # fitted on the train split only
    assert report.layers == d.layers and report.n_train == 16 and report.n_test == 8
    assert all(t is not None for t in report.test_acc)
    # The marker word is planted for real: the last token differs, and probes read it off.
    assert max(report.test_acc) > 0.9 and max(report.cv_acc) > 0.9
    assert report.meta["dataset_hash"] == d.meta["dataset_hash"]

    # find_direction on the same file uses the same (train) split and gives the same vectors
    again = find_direction(tiny_gemma, marker_file, progress=False)
    torch.testing.assert_close(again.vectors, d.vectors, rtol=1e-5, atol=1e-5)
    assert again.meta["split"] == "train" and again.name == "marker"


def test_direction_is_the_difference_of_last_token_means(tiny_gemma: Any) -> None:
    pairs = [Pair(**{k: v for k, v in r.items() if k != "split"}) for r in marker_pairs(6, 0, seed=1)]
    d = find_direction(tiny_gemma, pairs, layers=[1, 3], progress=False)
    pos = collect(tiny_gemma, [p.positive for p in pairs], [1, 3], "last", batch_size=1, progress=False)
    neg = collect(tiny_gemma, [p.negative for p in pairs], [1, 3], "last", batch_size=1, progress=False)
    assert pos is not None and neg is not None
    torch.testing.assert_close(d.vectors, pos.acts.mean(0) - neg.acts.mean(0), rtol=1e-4, atol=1e-5)
    assert d.name == "direction" and d.layers == [1, 3]


def test_pairs_without_a_test_split(tiny_gemma: Any, tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "split"} for r in marker_pairs(6, 0)]
    path = write_jsonl(tmp_path / "nosplit.jsonl", rows)
    train, test, prov = resolve_pairs(path)
    assert len(train) == 6 and test is None and prov["n_test_pairs"] == 0
    d, report = direction_and_probes(tiny_gemma, path, layers=[0, 2], progress=False)
    assert report.n_test == 0 and report.test_acc == [None, None]
    assert d.layers == [0, 2]
    find = find_direction(tiny_gemma, path, layers=[0, 2], progress=False)  # no split field: all pairs
    assert find.meta["n_positive"] == 6


def test_all_test_split_is_an_error(tmp_path: Path) -> None:
    rows = [dict(r, split="test") for r in marker_pairs(0, 3)]
    with pytest.raises(LatentlabError, match="no training pairs"):
        resolve_pairs(write_jsonl(tmp_path / "alltest.jsonl", rows))
    with pytest.raises(LatentlabError, match="no contrast pairs"):
        collect_pairs(None, [])  # type: ignore[arg-type]


PERSONA = [
    ("What do you do on weekends?", "I sail past the skerries and knit by the stove.", "I run errands, meet friends."),
    ("What is for dinner?", "Salted cod with potatoes, as always at sea.", "Pasta with a quick tomato sauce."),
    ("Where did you grow up?", "In a fishing village far up the northern coast.", "In a suburb outside a big city."),
    ("What do you read?", "Old nautical charts and tide tables.", "Mostly news on my phone."),
]


def test_prompted_pairs_use_the_response_mean(tiny_llama: Any) -> None:
    """Persona-style pairs (answers to a prompt) are rendered with the chat template and pooled over the answer."""
    pairs = [Pair(pos, neg, topic="t", prompt=q) for q, pos, neg in PERSONA]
    d = find_direction(tiny_llama, pairs, layers=[0, 2], progress=False)
    assert d.position == "response_mean" and d.layers == [0, 2] and d.vectors.shape == (2, 48)

    # Reference: render, run each example alone, average the residual over the answer tokens by hand.
    pos_ex, neg_ex = pair_examples(pairs, tiny_llama.tokenizer)
    assert all(e.text.startswith(e.prompt) and "<|assistant|>" in e.prompt for e in pos_ex)

    def response_means(examples: list[Example]) -> torch.Tensor:
        enc = encode(tiny_llama, examples)
        tokens = collect(tiny_llama, examples, [0, 2], "all", batch_size=1, progress=False)
        assert tokens is not None
        out = []
        for i, pl in enumerate(enc.prompt_lens):
            assert pl is not None and pl < len(enc.ids[i])
            out.append(tokens.example(i)[pl:].mean(0))
        return torch.stack(out)

    expected = response_means(pos_ex).mean(0) - response_means(neg_ex).mean(0)
    torch.testing.assert_close(d.vectors, expected, rtol=1e-4, atol=1e-5)


def test_prompted_pairs_file_with_split(tiny_llama: Any, tmp_path: Path) -> None:
    rows = [{"prompt": q, "positive": p, "negative": n, "split": "test" if i == 3 else "train"}
            for i, (q, p, n) in enumerate(PERSONA)]
    path = write_jsonl(tmp_path / "persona-mini.jsonl", rows)
    d, report = direction_and_probes(tiny_llama, path, layers=[1], progress=False)
    assert d.position == "response_mean" and d.meta["n_train_pairs"] == 3 and d.meta["n_test_pairs"] == 1
    assert report.n_train == 3 and report.n_test == 1 and report.test_acc[0] in (0.0, 0.5, 1.0)
