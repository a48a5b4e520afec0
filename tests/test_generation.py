"""Generation with a KV cache: exactly the tokens of a cache-free decode under the same hooks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from latentlab.activations import Example, encode, pad_batch, pad_id_of, run_resid
from latentlab.arch import final_logits, stop_token_ids
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.generation import generate, generate_samples
from latentlab.interventions import Ablate, Condition, Steer, condition_hooks

PROMPTS = ["Q: hello there\nA:", "Q: what year is it?\nA:", "Tell me", "a much longer prompt than the others, yes"]


def cache_free(model: Any, prompts: list[str], conditions: list[Condition], n_new: int) -> list[list[list[int]]]:
    """The reference: right-padded, every step re-runs the whole sequence (latentlab's old decoder)."""
    enc = encode(model, [Example(p) for p in prompts])
    rows = [(c, p) for c in range(len(conditions)) for p in range(len(prompts))]
    seqs = [list(enc.ids[p]) for _, p in rows]
    starts = torch.tensor([len(enc.ids[p]) - 1 for _, p in rows])
    stops = stop_token_ids(model)
    done = [False] * len(rows)
    last = model.n_layers - 1
    for _ in range(n_new):
        tok, mask = pad_batch(seqs, pad_id_of(model), model.device)
        hooks = condition_hooks(conditions, [c for c, _ in rows], starts, model.device)
        h = run_resid(model, tok, mask, [last], extra_hooks=hooks)[last]
        nxt = final_logits(model, h[torch.arange(len(seqs)), mask.sum(1) - 1]).argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                seqs[i].append(t)
                done[i] = t in stops
    out: list[list[list[int]]] = [[[] for _ in prompts] for _ in conditions]
    for (c, p), s in zip(rows, seqs):
        out[c][p] = s[len(enc.ids[p]) :]
    return out


def _spy(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    seen: list[list[int]] = []
    real = model.tokenizer.decode

    def decode(ids: Any, **kw: Any) -> str:
        seen.append(list(ids))
        return real(ids, **kw)

    monkeypatch.setattr(model.tokenizer, "decode", decode)
    return seen


def _direction(model: Any, seed: int = 5) -> Direction:
    from latentlab.activations import collect

    acts = collect(model, ["one two three", "four five", "six"], "all", "last", progress=False)
    g = torch.Generator().manual_seed(seed)
    return Direction(torch.randn(model.n_layers, model.d_model, generator=g), list(range(model.n_layers)),
                     acts.acts.norm(dim=-1).mean(0), "rand")


@pytest.mark.parametrize("model_name", ["tiny_gemma", "tiny_llama"])
@pytest.mark.parametrize("mode", ["all", "generated"])
def test_cached_greedy_equals_cache_free(model_name: str, mode: str, request: pytest.FixtureRequest,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = request.getfixturevalue(model_name)
    d = _direction(model)
    steer = Steer.from_direction(d, [0, 1], mode)  # type: ignore[arg-type]
    abl = Ablate.from_direction(d, [1])
    conds: list[Condition] = [(None, 0.0), (steer, 1.5), (steer, -1.5), (abl, 1.0)]
    want = cache_free(model, PROMPTS, conds, 7)
    seen = _spy(model, monkeypatch)
    generate(model, PROMPTS, conds, max_new_tokens=7)
    got = [seen[c * len(PROMPTS) : (c + 1) * len(PROMPTS)] for c in range(len(conds))]
    assert got == want
    assert want[1] != want[0]  # the steering really changes the continuation


def test_n_samples_seeded_and_top_p_tiny_is_greedy(tiny_gemma: Any) -> None:
    a = generate_samples(tiny_gemma, PROMPTS[:2], max_new_tokens=6, temperature=3.0, n=4, seed=1)
    assert len(a) == 1 and len(a[0]) == 2 and all(len(s) == 4 for s in a[0])
    assert a == generate_samples(tiny_gemma, PROMPTS[:2], max_new_tokens=6, temperature=3.0, n=4, seed=1)
    assert len(set(a[0][0])) > 1  # a hot random model: the samples differ
    assert a != generate_samples(tiny_gemma, PROMPTS[:2], max_new_tokens=6, temperature=3.0, n=4, seed=2)
    greedy = generate(tiny_gemma, PROMPTS[:2], max_new_tokens=6)
    nucleus = generate_samples(tiny_gemma, PROMPTS[:2], max_new_tokens=6, temperature=1.0, top_p=1e-6, n=2)
    assert [s[0] for s in nucleus[0]] == greedy[0] and [s[1] for s in nucleus[0]] == greedy[0]
    state = torch.get_rng_state()
    generate_samples(tiny_gemma, PROMPTS[:1], max_new_tokens=3, temperature=1.0, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the caller's global RNG is left alone


def test_each_row_stops_on_its_own_stop_token(tiny_gemma: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    free = cache_free(tiny_gemma, PROMPTS, [(None, 0.0)], 6)[0]
    stop = free[0][1]  # make row 0's second token a stop token
    monkeypatch.setattr("latentlab.generation.stop_token_ids", lambda m: {stop})
    seen = _spy(tiny_gemma, monkeypatch)
    generate(tiny_gemma, PROMPTS, max_new_tokens=6)
    for ids, ref in zip(seen, free):
        cut = next((i for i, t in enumerate(ref) if t == stop), None)
        assert ids == (ref if cut is None else ref[: cut + 1])
    assert len(seen[0]) == 2


def test_bad_generation_arguments(tiny_gemma: Any) -> None:
    for kw, msg in (({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"),
                    ({"top_p": 0.0}, "top_p"), ({"n": 0}, "samples")):
        with pytest.raises(LatentlabError, match=msg):
            generate_samples(tiny_gemma, PROMPTS, **kw)  # type: ignore[arg-type]
    assert generate(tiny_gemma, [], [(None, 0.0), (None, 0.0)]) == [[], []]


def test_details_and_pairs(tiny_gemma: Any) -> None:
    """``details``: the same texts, plus ids and log-probabilities of the raw next-token distribution;
    ``pairs``: only the asked (condition, prompt) rows."""
    d = _direction(tiny_gemma)
    conds: list[Condition] = [(None, 0.0), (Steer.from_direction(d, [0, 1]), 2.0)]
    plain = generate_samples(tiny_gemma, PROMPTS[:2], conds, max_new_tokens=5)
    det = generate_samples(tiny_gemma, PROMPTS[:2], conds, max_new_tokens=5, details=True, top_logprobs=2)
    assert [[[g.text for g in s] for s in c] for c in det] == plain
    g = det[0][1][0]
    enc = encode(tiny_gemma, [Example(PROMPTS[1])])
    assert g.n_prompt_tokens == len(enc.ids[0]) and len(g.logprobs) == len(g.token_ids) == len(g.top_logprobs)
    with torch.no_grad():
        lp = torch.log_softmax(tiny_gemma.hf_model(torch.tensor([enc.ids[0] + g.token_ids])).logits[0].float(), -1)
    start = len(enc.ids[0]) - 1
    assert g.logprobs == pytest.approx([float(lp[start + j, t]) for j, t in enumerate(g.token_ids)], abs=1e-4)
    assert [t for t, _ in g.top_logprobs[0]] == lp[start].topk(2).indices.tolist()
    only = generate_samples(tiny_gemma, PROMPTS[:2], conds, max_new_tokens=5, pairs=[(1, 0)])
    assert only == [[[""], [""]], [plain[1][0], [""]]]
    with pytest.raises(LatentlabError, match="top_logprobs"):
        generate_samples(tiny_gemma, PROMPTS[:1], details=True, top_logprobs=21)
