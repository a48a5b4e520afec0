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
from typing import Any

import torch

from latentlab.activations import Example, encode, pad_id_of
from latentlab.arch import stop_token_ids
from latentlab.compat import patch_bridge_kv_cache
from latentlab.errors import LatentlabError
from latentlab.interventions import Condition, condition_hooks
from latentlab.models import LoadedModel


def _check(max_new_tokens: int, temperature: float, top_p: float, n: int) -> None:
    if max_new_tokens < 1:
        raise LatentlabError(f"max_new_tokens must be >= 1, got {max_new_tokens}", "pass --max-new-tokens 1 or more")
    if not temperature >= 0:
        raise LatentlabError(f"temperature must be >= 0, got {temperature}", "use 0 (greedy) or a positive value")
    if not 0 < top_p <= 1:
        raise LatentlabError(f"top_p must be in (0, 1], got {top_p}", "use e.g. --top-p 0.9 (1 = off)")
    if n < 1:
        raise LatentlabError(f"n (samples per prompt) must be >= 1, got {n}", "pass --n 1 or more")


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
) -> list[list[list[str]]]:
    """``n`` continuations of each prompt under each condition: ``[condition][prompt][sample]``.

    Greedy when ``temperature == 0`` (then the ``n`` samples are identical); otherwise sampled with
    temperature and top-p from a generator seeded by ``seed``. Each row stops on its own
    end-of-sequence token (the model's generation config and end-of-turn markers).
    """
    _check(max_new_tokens, temperature, top_p, n)
    patch_bridge_kv_cache()
    if not prompts:
        return [[] for _ in conditions]
    enc = encode(model, [Example(p) for p in prompts])
    rows = [(c, p, k) for c in range(len(conditions)) for p in range(len(prompts)) for k in range(n)]
    stops = stop_token_ids(model)
    pad = pad_id_of(model)
    out: list[list[list[str]]] = [[[""] * n for _ in prompts] for _ in conditions]
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
            for (c, p, k), row in zip(batch, gen[:, width:].tolist()):
                cut = next((i for i, t in enumerate(row) if t in stops), None)
                new = row if cut is None else row[: cut + 1]
                out[c][p][k] = model.tokenizer.decode(new, skip_special_tokens=True)
    return out


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
