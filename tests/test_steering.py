"""Steering on tiny random models: exact no-ops, batching invariance, and a brute-force reference.

The battery score of an item is ``P(pos) / (P(pos) + P(neg))`` with ``P`` the product of the
completion tokens' probabilities. ``score_conditions`` computes it with an early-stopped forward and
the final norm + unembedding applied only at completion positions; here it is recomputed the slow,
obvious way from the bridge's full logits, one unpadded sequence at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from latentlab.activations import pad_batch, resid_hook_name, run_resid
from latentlab.arch import final_logits
from latentlab.data import BatteryItem
from latentlab.directions import Direction, find_direction
from latentlab.errors import LatentlabError
from latentlab.generation import generate
from latentlab.interventions import Condition, Steer, condition_hooks
from latentlab.scoring import score_conditions
from latentlab.stats import bootstrap_ci
from latentlab.steering import SweepResult, candidate_layers, screen_layers, sweep

ITEMS = [  # completions of similar length, so a random model's scores are not saturated at 0 or 1
    BatteryItem("Q: the dog saw a", " cat", " cot"),
    BatteryItem("He rode to town on his", " horse", " house"),
    BatteryItem("x", " y", " z"),
    BatteryItem("The quickest way to cross the ocean is by", " ship", " shop"),
    BatteryItem("Letters took weeks by", " mail", " email"),
    BatteryItem("Q: the dog saw a", " zebra", " table"),
]
PROMPTS = ["Q: hello there\nA:", "Q: what year is it?\nA:", "Tell me"]


@pytest.fixture(scope="module")
def gemma_dir_direction(tiny_gemma: Any) -> Direction:
    """A direction fitted on the tiny Gemma (marker-word pairs), with the model's real residual norms."""
    from latentlab.data import Pair

    pairs = [Pair(f"the cat {w} zebra", f"the cat {w} table") for w in ("sat", "ran", "is", "saw", "big")]
    return find_direction(tiny_gemma, pairs, progress=False)


@pytest.fixture(scope="module")
def llama_direction(tiny_llama: Any) -> Direction:
    """An arbitrary direction for the tiny Llama (random vectors, its real residual norms)."""
    from latentlab.activations import collect

    acts = collect(tiny_llama, ["one two three", "four five", "six"], "all", "last", progress=False)
    assert acts is not None
    g = torch.Generator().manual_seed(5)
    return Direction(torch.randn(3, 48, generator=g), [0, 1, 2], acts.acts.norm(dim=-1).mean(0), "rand")


# --------------------------------------------------------------------------------------------
# Brute-force reference.
# --------------------------------------------------------------------------------------------


def reference_scores(model: Any, items: list[BatteryItem], steer: Steer | None = None, coeff: float = 0.0
                     ) -> torch.Tensor:
    """Scores from the bridge's full logits, one unpadded sequence at a time, steering by a plain hook."""
    tok = model.tokenizer

    def logp(prompt: str, completion: str) -> float:
        ids = tok(prompt + completion)["input_ids"]
        plen = len(tok(prompt)["input_ids"])  # character tokenizer: no merge across the boundary
        hooks = []
        if steer is not None:
            for layer, vec in steer.vectors.items():
                def add(t: torch.Tensor, hook: Any, vec: torch.Tensor = vec) -> torch.Tensor:
                    out = t.clone()
                    first = plen - 1 if steer.mode == "generated" else 0
                    out[:, first:] += coeff * vec
                    return out

                hooks.append((resid_hook_name(layer), add))
        with torch.inference_mode():
            logits = model.bridge.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks, return_type="logits")[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        return sum(float(lp[p, ids[p + 1]]) for p in range(plen - 1, len(ids) - 1))

    return torch.tensor([1 / (1 + math.exp(-(logp(i.prompt, i.positive) - logp(i.prompt, i.negative))))
                         for i in items])


@pytest.mark.parametrize("model_name", ["tiny_gemma", "tiny_llama"])
def test_battery_score_matches_brute_force(model_name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(model_name)
    d = request.getfixturevalue("gemma_dir_direction" if model_name == "tiny_gemma" else "llama_direction")
    s_all = Steer.from_direction(d, 1)
    s_gen = Steer.from_direction(d, [0, 2], mode="generated")
    got = score_conditions(model, ITEMS, [(None, 0.0), (s_all, 0.7), (s_gen, -1.5)], batch_size=4)
    assert got.shape == (3, len(ITEMS)) and ((got > 0) & (got < 1)).all()
    torch.testing.assert_close(got[0], reference_scores(model, ITEMS), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], reference_scores(model, ITEMS, s_all, 0.7), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2], reference_scores(model, ITEMS, s_gen, -1.5), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_name", ["tiny_gemma", "tiny_llama"])
def test_final_logits_equal_the_bridge_logits(model_name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(model_name)
    ids = torch.tensor([model.tokenizer("Some text to check, 123.")["input_ids"]])
    mask = torch.ones_like(ids)
    last = model.n_layers - 1
    h = run_resid(model, ids, mask, [last])[last]
    with torch.inference_mode():
        full = model.bridge(ids, return_type="logits")[0].float()
        positions = [0, 5, ids.shape[1] - 1]
        mine = final_logits(model, h[0, positions])
    assert mine.shape == (3, model.info.d_vocab) and mine.dtype == torch.float32
    torch.testing.assert_close(mine, full[positions], rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# No-ops and batching.
# --------------------------------------------------------------------------------------------


def test_coefficient_zero_changes_nothing(tiny_gemma: Any, gemma_dir_direction: Direction) -> None:
    steer = Steer.from_direction(gemma_dir_direction, [1, 2])
    base = score_conditions(tiny_gemma, ITEMS, [(None, 0.0)])
    zero = score_conditions(tiny_gemma, ITEMS, [(steer, 0.0)])
    assert torch.equal(base, zero)  # the hook runs and adds exact zeros
    gens_none = generate(tiny_gemma, PROMPTS, [(None, 0.0)], max_new_tokens=4)
    gens_zero = generate(tiny_gemma, PROMPTS, [(steer, 0.0)], max_new_tokens=4)
    assert gens_none == gens_zero
    # within one batched call too (other rows do get vectors), up to float noise
    both = score_conditions(tiny_gemma, ITEMS, [(None, 0.0), (steer, 0.0), (steer, 3.0)])
    torch.testing.assert_close(both[0], both[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(both[0], base[0], rtol=0, atol=1e-6)


def test_a_large_coefficient_changes_scores(tiny_gemma: Any, gemma_dir_direction: Direction) -> None:
    steer = Steer.from_direction(gemma_dir_direction, 1)
    s = score_conditions(tiny_gemma, ITEMS, [(None, 0.0), (steer, 4.0), (steer, -4.0)])
    assert (s[1] - s[0]).abs().max() > 1e-2 and (s[2] - s[0]).abs().max() > 1e-2
    assert not torch.allclose(s[1], s[2], atol=1e-3)


def test_batched_sweep_equals_one_condition_at_a_time(tiny_gemma: Any, gemma_dir_direction: Direction) -> None:
    d = gemma_dir_direction
    s1, s2 = Steer.from_direction(d, 1), Steer.from_direction(d, 2)
    s12 = Steer.from_direction(d, [1, 2], mode="generated")
    rnd = Steer.random_like(d, 1, seed=3)
    conditions: list[Condition] = [(s1, -1.0), (None, 0.0), (s1, 0.5), (s2, 1.0), (s12, 0.8), (rnd, 1.0)]
    together = score_conditions(tiny_gemma, ITEMS, conditions, batch_size=7)  # batches mix conditions
    for k, cond in enumerate(conditions):
        alone = score_conditions(tiny_gemma, ITEMS, [cond], batch_size=32)
        torch.testing.assert_close(together[k], alone[0], rtol=0, atol=1e-5)
    one_by_one = score_conditions(tiny_gemma, ITEMS, conditions, batch_size=1)
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Where the vector is added.
# --------------------------------------------------------------------------------------------


def _resid_with(model: Any, ids: list[int], steer: Steer | None, start: int, layers: list[int]) -> dict[int, Any]:
    tok, mask = pad_batch([ids], 0, model.device)
    hooks = condition_hooks([(steer, 1.0)], [0], torch.tensor([start]), model.device) if steer is not None else []
    return run_resid(model, tok, mask, layers, extra_hooks=hooks)


def test_generated_mode_leaves_prompt_positions_alone(tiny_gemma: Any, gemma_dir_direction: Direction) -> None:
    ids = tiny_gemma.tokenizer("Q: which year is it now?\nA: it is")["input_ids"]
    start = 12  # first steered position (the last prompt token)
    vec = gemma_dir_direction.unit(1) * gemma_dir_direction.resid_norm(1)
    clean = _resid_with(tiny_gemma, ids, None, start, [1, 3])
    gen = _resid_with(tiny_gemma, ids, Steer({1: vec}, "generated"), start, [1, 3])
    everywhere = _resid_with(tiny_gemma, ids, Steer({1: vec}, "all"), start, [1, 3])
    # generated: positions before `start` are untouched at the steered layer and (causally) after it
    for layer in (1, 3):
        assert torch.equal(gen[layer][0, :start], clean[layer][0, :start])
    torch.testing.assert_close(gen[1][0, start:] - clean[1][0, start:], vec.expand(len(ids) - start, -1),
                               rtol=1e-5, atol=1e-4)
    assert (gen[3][0, start:] - clean[3][0, start:]).norm(dim=-1).min() > 1e-3
    # all: every position gets the vector
    torch.testing.assert_close(everywhere[1][0] - clean[1][0], vec.expand(len(ids), -1), rtol=1e-5, atol=1e-4)
    assert (everywhere[3][0, :start] - clean[3][0, :start]).norm(dim=-1).min() > 1e-3


def test_unsteered_layers_and_rows_are_untouched(tiny_gemma: Any, gemma_dir_direction: Direction) -> None:
    steer = Steer.from_direction(gemma_dir_direction, 2)
    hooks = condition_hooks([(None, 0.0), (steer, 1.0)], [0, 1], torch.tensor([3, 3]), tiny_gemma.device)
    assert [name for name, _ in hooks] == [resid_hook_name(2)]  # one hook, only at the steered layer
    assert condition_hooks([(None, 0.0)], [0, 0], torch.tensor([1, 1]), tiny_gemma.device) == []
    ids = tiny_gemma.tokenizer("same text twice")["input_ids"]
    tok, mask = pad_batch([ids, ids], 0, tiny_gemma.device)
    out = run_resid(tiny_gemma, tok, mask, [1, 2], extra_hooks=hooks)
    assert torch.equal(out[1][0], out[1][1])  # before the steered layer
    torch.testing.assert_close(out[2][1] - out[2][0], steer.vectors[2].expand(len(ids), -1), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Steer objects and random controls.
# --------------------------------------------------------------------------------------------


def test_steer_from_direction_scales_by_residual_norm(gemma_dir_direction: Direction) -> None:
    d = gemma_dir_direction
    s = Steer.from_direction(d, [0, 3], mode="generated")
    assert sorted(s.vectors) == [0, 3] and s.mode == "generated" and s.label == d.name
    for layer in (0, 3):
        assert float(s.vectors[layer].norm()) == pytest.approx(d.resid_norm(layer), rel=1e-5)
        assert float(torch.nn.functional.cosine_similarity(s.vectors[layer], d.vector(layer), dim=0)) == \
            pytest.approx(1.0, abs=1e-5)
    with pytest.raises(LatentlabError, match="no layer 9"):
        Steer.from_direction(d, 9)


def test_random_like_is_norm_matched_and_seeded(gemma_dir_direction: Direction) -> None:
    d = gemma_dir_direction
    r = Steer.random_like(d, [1, 2], seed=4)
    assert sorted(r.vectors) == [1, 2] and r.label == "random-4" and r.mode == "all"
    for layer in (1, 2):
        assert float(r.vectors[layer].norm()) == pytest.approx(d.resid_norm(layer), rel=1e-5)
        assert abs(float(torch.nn.functional.cosine_similarity(r.vectors[layer], d.vector(layer), dim=0))) < 0.7
    again = Steer.random_like(d, [1, 2], seed=4)
    other = Steer.random_like(d, [1, 2], seed=5)
    assert all(torch.equal(r.vectors[k], again.vectors[k]) for k in (1, 2))
    assert not any(torch.allclose(r.vectors[k], other.vectors[k]) for k in (1, 2))
    assert not torch.allclose(r.vectors[1] / r.vectors[1].norm(), r.vectors[2] / r.vectors[2].norm())
    assert Steer.random_like(d, 1, seed=4, mode="generated").mode == "generated"


# --------------------------------------------------------------------------------------------
# Sweeps, bootstrap, layer screen.
# --------------------------------------------------------------------------------------------


def test_bootstrap_ci_is_seeded_and_sane() -> None:
    v = torch.rand(30, generator=torch.Generator().manual_seed(0))
    a = bootstrap_ci(v)
    assert a == bootstrap_ci(v) == bootstrap_ci(v, seed=0)
    assert a != bootstrap_ci(v, seed=1)
    assert a[0] < float(v.mean()) < a[1] and 0 <= a[0] and a[1] <= 1
    assert bootstrap_ci(v, n_boot=4000)[1] - bootstrap_ci(v, n_boot=4000)[0] < 0.3
    assert bootstrap_ci(torch.full((10,), 0.25)) == pytest.approx((0.25, 0.25))
    assert all(math.isnan(x) for x in bootstrap_ci(torch.tensor([0.3])))


def test_sweep_table_and_controls(tiny_gemma: Any, gemma_dir_direction: Direction) -> None:
    d = gemma_dir_direction
    coeffs = [-2.0, 0.0, 2.0]
    res = sweep(tiny_gemma, d, ITEMS, 1, coeffs, n_random=2, seed=7, progress=False)
    assert isinstance(res, SweepResult) and res.coeffs == coeffs and res.layers == [1]
    assert res.scores.shape == (3, len(ITEMS)) and res.random_scores.shape == (2, 3, len(ITEMS))
    assert res.meta == {"direction": d.name, "mode": "all", "seed": 7, "n_items": len(ITEMS)}
    # same numbers as scoring the conditions by hand (random controls use seeds seed+1, seed+2)
    steer = Steer.from_direction(d, 1)
    r1, r2 = Steer.random_like(d, 1, seed=8), Steer.random_like(d, 1, seed=9)
    manual = score_conditions(tiny_gemma, ITEMS, [(steer, a) for a in coeffs] + [(r, a) for r in (r1, r2)
                                                                                   for a in coeffs])
    torch.testing.assert_close(res.scores, manual[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(res.random_scores, manual[3:].view(2, 3, -1), rtol=0, atol=1e-5)
    # at alpha 0 the direction and the random controls are all the unsteered model
    torch.testing.assert_close(res.scores[1], res.random_scores[0, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(res.random_scores[0, 1], res.random_scores[1, 1], rtol=0, atol=1e-6)

    table = res.table()
    assert [row["alpha"] for row in table] == coeffs
    for k, row in enumerate(table):
        assert row["score"] == pytest.approx(float(res.scores[k].mean()))
        assert row["ci"][0] <= row["score"] <= row["ci"][1]
        assert row["random"] == pytest.approx(float(res.random_scores[:, k].mean()))
        assert row["random_ci"][0] <= row["random"] <= row["random_ci"][1]
    out = res.to_dict()
    assert out["table"] == table and out["per_item_scores"] == res.scores.tolist() and out["direction"] == d.name
    assert len(out["per_item_random_scores"]) == 2

    no_random = sweep(tiny_gemma, d, ITEMS[:2], [1, 2], [0.5], n_random=0, progress=False)
    assert no_random.random_scores.shape[0] == 0 and "random" not in no_random.table()[0]


def test_screen_layers_one_value_per_candidate(tiny_gemma: Any, gemma_dir_direction: Direction) -> None:
    d = gemma_dir_direction
    screen = screen_layers(tiny_gemma, d, ITEMS, [3, 1, 2], alpha=1.0)
    assert list(screen) == [3, 1, 2] and all(isinstance(v, float) and -1 < v < 1 for v in screen.values())
    s = score_conditions(tiny_gemma, ITEMS, [(Steer.from_direction(d, 1), 1.0), (Steer.from_direction(d, 1), -1.0)])
    assert screen[1] == pytest.approx(float(s[0].mean() - s[1].mean()), abs=1e-5)


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 5, 8, 12, 18, 26, 30, 62])
def test_candidate_layers_stay_in_the_middle(n_layers: int) -> None:
    lo, hi = n_layers // 4, max(n_layers // 4, 3 * n_layers // 4)
    for k in (1, 3, 5):
        c = candidate_layers(n_layers, k=k)
        assert c and len(c) <= max(k, 1) and c == sorted(set(c))
        assert all(lo <= layer <= hi for layer in c), (n_layers, c)
        if k >= 2 and hi - lo + 1 >= k:
            assert c[0] == lo and c[-1] == hi  # the band's ends are screened
    probe = [0.6] * n_layers
    best = min(hi, lo + 1)
    probe[best] = 0.9
    assert candidate_layers(n_layers, probe) == [best]  # only the well-probed layers
    probe[lo] = 0.87
    assert candidate_layers(n_layers, probe) == sorted({lo, best})


def test_candidate_layers_known_values() -> None:
    assert candidate_layers(18) == [4, 6, 8, 11, 13]
    assert candidate_layers(4) == [1, 2, 3]
    acc = [0.99] * 4 + [0.7] * 6 + [0.8, 0.82, 0.79, 0.5] + [0.99] * 4  # only band layers count
    assert candidate_layers(18, acc) == [10, 11, 12]


# --------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------


def test_empty_battery_and_empty_completion(tiny_gemma: Any) -> None:
    with pytest.raises(LatentlabError, match="battery is empty"):
        score_conditions(tiny_gemma, [], [(None, 0.0)])
    with pytest.raises(LatentlabError, match="adds no tokens"):
        score_conditions(tiny_gemma, [BatteryItem("prompt", "", " b")], [(None, 0.0)])


# --------------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], list[list[int]]]:
    """Spy on tokenizer.decode to see the generated token ids."""
    def spy(model: Any) -> list[list[int]]:
        seen: list[list[int]] = []
        real = model.tokenizer.decode

        def decode(ids: Any, **kw: Any) -> str:
            seen.append(list(ids))
            return real(ids, **kw)

        monkeypatch.setattr(model.tokenizer, "decode", decode)
        return seen

    return spy


@pytest.mark.parametrize("model_name", ["tiny_gemma", "tiny_llama"])
def test_generate_shape_and_length(model_name: str, request: pytest.FixtureRequest,
                                   decoded: Callable[[Any], list[list[int]]]) -> None:
    model = request.getfixturevalue(model_name)
    d = request.getfixturevalue("gemma_dir_direction" if model_name == "tiny_gemma" else "llama_direction")
    steer = Steer.from_direction(d, 1)
    conds: list[Condition] = [(steer, -3.0), (None, 0.0), (steer, 3.0)]
    seen = decoded(model)
    out = generate(model, PROMPTS, conds, max_new_tokens=6)
    assert len(out) == 3 and all(len(row) == len(PROMPTS) and all(isinstance(s, str) for s in row) for row in out)
    assert len(seen) == 3 * len(PROMPTS)
    eos = model.tokenizer.eos_token_id
    for ids in seen:
        assert 1 <= len(ids) <= 6
        assert len(ids) == 6 or ids[-1] in (eos, model.tokenizer.unk_token_id)  # ran to the limit or stopped
    assert generate(model, PROMPTS, conds, max_new_tokens=6) == out  # greedy: reproducible
    assert generate(model, [], conds) == [[], [], []]


def test_generate_matches_prompt_by_prompt(tiny_gemma: Any, gemma_dir_direction: Direction,
                                           decoded: Callable[[Any], list[list[int]]]) -> None:
    """Batching prompts of different lengths (right padding) does not change greedy continuations."""
    steer = Steer.from_direction(gemma_dir_direction, 2)
    seen = decoded(tiny_gemma)
    batched = generate(tiny_gemma, PROMPTS, [(steer, 2.0)], max_new_tokens=5)
    batched_ids = list(seen)
    seen.clear()
    for i, p in enumerate(PROMPTS):
        assert generate(tiny_gemma, [p], [(steer, 2.0)], max_new_tokens=5)[0][0] == batched[0][i]
    assert seen == batched_ids


def test_sampling_is_seeded(tiny_gemma: Any, decoded: Callable[[Any], list[list[int]]]) -> None:
    seen = decoded(tiny_gemma)
    generate(tiny_gemma, PROMPTS[:2], max_new_tokens=8, temperature=5.0, seed=1)
    first = list(seen)
    seen.clear()
    generate(tiny_gemma, PROMPTS[:2], max_new_tokens=8, temperature=5.0, seed=1)
    assert seen == first
    seen.clear()
    generate(tiny_gemma, PROMPTS[:2], max_new_tokens=8, temperature=5.0, seed=2)
    assert seen != first  # a hot random model: a different seed draws different tokens


def test_choose_layer_screens_dev_items_and_reports_the_rest(tiny_gemma: Any, gemma_dir_direction: Direction) -> None:
    from latentlab.steering import choose_layer, dev_eval_split

    items = ITEMS * 2
    choice = choose_layer(tiny_gemma, gemma_dir_direction, items)
    dev, ev = dev_eval_split(items)
    assert choice.dev_items == dev and choice.eval_items == ev and len(dev) + len(ev) == len(items)
    assert list(choice.screen) == [c for c in candidate_layers(tiny_gemma.n_layers) if c in gemma_dir_direction.layers]
    assert choice.screen == screen_layers(tiny_gemma, gemma_dir_direction, dev, list(choice.screen))
    assert choice.layer == max(choice.screen, key=lambda k: choice.screen[k])
    partial = Direction(gemma_dir_direction.vectors[:1], [0], gemma_dir_direction.resid_norms[:1], "partial")
    with pytest.raises(LatentlabError, match="no candidate layer"):
        choose_layer(tiny_gemma, partial, items)
