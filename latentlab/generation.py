"""Text generation with a KV cache, under the same interventions the battery scores use.

Why Hugging Face's ``generate``: it brings the KV cache, temperature / top-p sampling, per-row
end-of-sequence handling and every family's position and mask rules, so latentlab only adds what is
its own: the residual-stream hooks. The bridge's hooks live inside the wrapped model, so they fire
under ``generate`` as under a plain forward pass; :func:`~latentlab.interventions.condition_hooks`
reads absolute positions, which keeps "steer the generated tokens only" exact with a cache.

Prompts are left-padded, so every row's last prompt token sits at the same position and each
decoding step sees one new token per row. Sampling is seeded and does not disturb the caller's
global RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch

from latentlab.activations import Example, encode, pad_id_of
from latentlab.arch import stop_token_ids
from latentlab.compat import patch_bridge_kv_cache
from latentlab.errors import LatentlabError
from latentlab.interventions import Condition, condition_hooks
from latentlab.models import LoadedModel

MAX_TOP_LOGPROBS = 20


@dataclass
class Generated:
    """One continuation with what an inference API reports about it (``generate_samples(details=True)``).

    Log-probabilities are those of the model's own next-token distribution (log-softmax of the raw
    logits, before temperature and top-p), as vLLM and OpenAI report them: they measure the model, not
    the sampler settings, and never hold the -inf a top-p mask would put there.
    """

    text: str
    token_ids: list[int]  # the generated ids, a final stop token excluded
    logprobs: list[float]  # log p(token_ids[i] | prompt, token_ids[:i])
    finish_reason: str  # "stop" (a stop token ended it) or "length" (max_new_tokens reached)
    n_prompt_tokens: int
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per step: k most likely (id, lp)


def _check(max_new_tokens: int, temperature: float, top_p: float, n: int) -> None:
    if max_new_tokens < 1:
        raise LatentlabError(f"max_new_tokens must be >= 1, got {max_new_tokens}", "pass --max-new-tokens 1 or more")
    if not temperature >= 0:
        raise LatentlabError(f"temperature must be >= 0, got {temperature}", "use 0 (greedy) or a positive value")
    if not 0 < top_p <= 1:
        raise LatentlabError(f"top_p must be in (0, 1], got {top_p}", "use e.g. --top-p 0.9 (1 = off)")
    if n < 1:
        raise LatentlabError(f"n (samples per prompt) must be >= 1, got {n}", "pass --n 1 or more")


@overload
def generate_samples(
    model: LoadedModel, prompts: Sequence[str], conditions: Sequence[Condition] = ..., max_new_tokens: int = ...,
    temperature: float = ..., top_p: float = ..., n: int = ..., seed: int = ..., batch_size: int = ..., *,
    pairs: Sequence[tuple[int, int]] | None = ..., details: Literal[False] = ..., top_logprobs: int = ...,
) -> list[list[list[str]]]: ...


@overload
def generate_samples(
    model: LoadedModel, prompts: Sequence[str], conditions: Sequence[Condition] = ..., max_new_tokens: int = ...,
    temperature: float = ..., top_p: float = ..., n: int = ..., seed: int = ..., batch_size: int = ..., *,
    pairs: Sequence[tuple[int, int]] | None = ..., details: Literal[True], top_logprobs: int = ...,
) -> list[list[list[Generated]]]: ...


def generate_samples(
    model: LoadedModel,
    prompts: Sequence[str],
    conditions: Sequence[Condition] = ((None, 0.0),),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
    details: bool = False,
    top_logprobs: int = 0,
) -> list[list[list[str]]] | list[list[list[Generated]]]:
    """``n`` continuations of each prompt under each condition: ``[condition][prompt][sample]``.

    Greedy when ``temperature == 0`` (then the ``n`` samples are identical); otherwise sampled with
    temperature and top-p from a generator seeded by ``seed``. Each row stops on its own
    end-of-sequence token (the model's generation config and end-of-turn markers).

    ``pairs``: only these ``(condition, prompt)`` index pairs (a server's batch, where each request
    has its own condition); the others are left ``""`` (``None`` with ``details``). ``details``:
    :class:`Generated` records (token ids, per-token log-probabilities, the ``top_logprobs`` most
    likely tokens at each step, finish reason) instead of strings.
    """
    _check(max_new_tokens, temperature, top_p, n)
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise LatentlabError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}",
                             f"ask for at most {MAX_TOP_LOGPROBS}")
    patch_bridge_kv_cache()
    if not prompts:
        return [[] for _ in conditions]
    enc = encode(model, [Example(p) for p in prompts])
    wanted = [(c, p) for c in range(len(conditions)) for p in range(len(prompts))] if pairs is None else list(pairs)
    rows = [(c, p, k) for c, p in wanted for k in range(n)]
    stops = stop_token_ids(model)
    pad = pad_id_of(model)
    out: list[list[list[Any]]] = [[[None if details else ""] * n for _ in prompts] for _ in conditions]
    hf = model.hf_model
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for b0 in range(0, len(rows), batch_size):
            batch = rows[b0 : b0 + batch_size]
            seqs = [enc.ids[p] for _, p, _ in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):  # left padding: every last prompt token at width - 1
                ids[i, width - len(s) :] = torch.tensor(s)
                mask[i, width - len(s) :] = 1
            seen = {"n": 0}
            starts = torch.full((len(seqs),), width - 1)
            hooks = condition_hooks(
                conditions, [c for c, _, _ in batch], starts, model.device, lambda seen=seen: seen["n"]
            )

            def count(_m: Any, args: Any, kwargs: Any, _out: Any, seen: dict[str, int] = seen) -> None:
                x = kwargs.get("input_ids", args[0] if args else None)
                seen["n"] += int(x.shape[1]) if x is not None else 0

            handle = hf.register_forward_hook(count, with_kwargs=True)
            scored = _StepScores(top_logprobs) if details else None
            score_handle = hf.register_forward_hook(scored, with_kwargs=True) if scored is not None else None
            sample = temperature > 0
            try:
                with torch.inference_mode(), model.forward_context(), model.bridge.hooks(fwd_hooks=hooks):
                    gen = hf.generate(
                        input_ids=ids.to(model.device),
                        attention_mask=mask.to(model.device),
                        max_new_tokens=max_new_tokens,
                        do_sample=sample,
                        temperature=temperature if sample else None,
                        top_p=top_p if sample else None,
                        top_k=0 if sample else None,
                        eos_token_id=sorted(stops) or None,
                        pad_token_id=pad,
                        use_cache=True,
                    )
            finally:
                handle.remove()
                if score_handle is not None:
                    score_handle.remove()
            new_rows = gen[:, width:]
            lps, tops = scored.result(new_rows) if scored is not None else (None, None)
            for i, ((c, p, k), row) in enumerate(zip(batch, new_rows.tolist())):
                cut = next((j for j, t in enumerate(row) if t in stops), None)
                new = row if cut is None else row[: cut + 1]
                text = model.tokenizer.decode(new, skip_special_tokens=True)
                if lps is None:
                    out[c][p][k] = text
                    continue
                kept = len(row) if cut is None else cut
                out[c][p][k] = Generated(
                    text, row[:kept], lps[i, :kept].tolist(), "length" if cut is None else "stop", len(enc.ids[p]),
                    [] if tops is None else [list(zip(tops[1][i, j].tolist(), tops[0][i, j].tolist()))
                                             for j in range(kept)],
                )
    return out


class _StepScores:
    """A forward hook on the HF model that keeps, per decoding step, the log-probability of the token
    chosen and the ``k`` most likely ones: never the whole ``[steps, batch, vocab]`` score tensor that
    ``output_scores`` would hold (gigabytes for a 256k vocabulary)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.prev: torch.Tensor | None = None  # the last step's log-softmax [batch, vocab]
        self.chosen: list[torch.Tensor] = []
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, _m: Any, args: Any, kwargs: Any, out: Any) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        if self.prev is not None and x is not None:  # this call's input is the token the last step chose
            self.chosen.append(self.prev.gather(1, x[:, -1:].to(self.prev.device)).squeeze(1))
        logits = out.logits if hasattr(out, "logits") else out[0]
        self.prev = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
        if self.k:
            v, i = self.prev.topk(self.k, dim=-1)
            self.top.append((v, i))

    def result(self, new: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``[batch, steps]`` chosen-token log-probabilities and the top-k (values, ids) ``[batch, steps, k]``."""
        if self.prev is not None and len(self.chosen) < new.shape[1]:
            self.chosen.append(self.prev.gather(1, new[:, len(self.chosen) : len(self.chosen) + 1]
                                                .to(self.prev.device)).squeeze(1))
        lps = torch.stack(self.chosen, 1).cpu()
        if not self.k:
            return lps, None
        return lps, (torch.stack([v for v, _ in self.top], 1).cpu(), torch.stack([i for _, i in self.top], 1).cpu())


def generate(
    model: LoadedModel,
    prompts: Sequence[str],
    conditions: Sequence[Condition] = ((None, 0.0),),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    top_p: float = 1.0,
) -> list[list[str]]:
    """One continuation of each prompt under each condition: ``[condition][prompt]`` strings."""
    res = generate_samples(model, prompts, conditions, max_new_tokens, temperature, top_p, 1, seed)
    return [[s[0] for s in per_prompt] for per_prompt in res]
