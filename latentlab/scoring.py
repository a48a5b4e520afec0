"""Completion log-probabilities and A/B battery scores, under any list of interventions.

Why one home: steering, shift, patching, ablation and trigger scans all score the same batteries;
if each stage tokenised completions or unembedded its own way, their numbers would not be
comparable. Two choices make it fast:

- Every (condition, item, completion) is a row of one length-sorted batched pass, each row with its
  own intervention (see :mod:`latentlab.interventions`).
- Only the completion positions are unembedded: the blocks run through the hooks, then the final
  norm and unembedding (:func:`latentlab.arch.final_logits`) are applied to those positions alone
  (Gemma's 262k-word unembedding dominates its forward pass otherwise).

Score = P(positive) / (P(positive) + P(negative)) = sigmoid(log P(pos) - log P(neg)), from the full
log-probability of each completion given the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import Example, encode, pad_batch, pad_id_of, run_resid
from latentlab.arch import final_logits
from latentlab.data import BatteryItem
from latentlab.errors import LatentlabError
from latentlab.interventions import Condition, Hook, condition_hooks
from latentlab.models import LoadedModel
from latentlab.progress import progress as progress_bar
from latentlab.stats import bootstrap_ci, check_finite


def completion_logprobs(
    model: LoadedModel, h: Float[Tensor, "batch seq d_model"], seqs: Sequence[Sequence[int]], plens: Sequence[int]
) -> Float[Tensor, " batch"]:
    """log P(completion | prompt) per row, from the last block's residual stream ``h``.

    Only the completion positions are unembedded (final norm + head), not the whole sequence.
    """
    bi, pi, tgt = [], [], []
    for j, (ids, plen) in enumerate(zip(seqs, plens)):
        for p in range(plen - 1, len(ids) - 1):
            bi.append(j)
            pi.append(p)
            tgt.append(ids[p + 1])
    with torch.inference_mode():
        lp = torch.log_softmax(final_logits(model, h[bi, pi]), dim=-1)
    picked = lp[torch.arange(len(tgt)), torch.tensor(tgt, device=lp.device)].cpu()
    out = torch.zeros(len(seqs))
    out.index_add_(0, torch.tensor(bi), picked)
    return out


def completion_sequences(
    model: LoadedModel, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + completion and each prompt's length (tokenised as every stage does)."""
    enc = encode(model, [Example(p + c, p) for p, c in zip(prompts, completions)])
    plens = [int(p) for p in enc.prompt_lens if p is not None]
    for ids, pl, c in zip(enc.ids, plens, completions):
        if pl >= len(ids):
            raise LatentlabError(f"completion {c!r} adds no tokens to its prompt", "give each completion some text")
    return enc.ids, plens


def battery_sequences(model: LoadedModel, items: Sequence[BatteryItem]) -> tuple[list[list[int]], list[int]]:
    """Sequences of a battery: the N positive completions, then the N negative ones."""
    if not items:
        raise LatentlabError("the battery is empty", "pass a battery with at least one item")
    return completion_sequences(
        model, [i.prompt for i in items] * 2, [i.positive for i in items] + [i.negative for i in items]
    )


def sequence_logprobs(
    model: LoadedModel, seqs: Sequence[Sequence[int]], plens: Sequence[int], hooks: Sequence[Hook] = ()
) -> Float[Tensor, " batch"]:
    """log P(completion | prompt) of one padded batch under ``hooks``."""
    tok, mask = pad_batch(seqs, pad_id_of(model), model.device)
    h = run_resid(model, tok, mask, [model.n_layers - 1], extra_hooks=hooks)[model.n_layers - 1]
    return completion_logprobs(model, h, seqs, plens)


def score_conditions(
    model: LoadedModel,
    items: Sequence[BatteryItem],
    conditions: Sequence[Condition],
    batch_size: int = 32,
    progress: bool = False,
) -> Float[Tensor, "n_conditions n_items"]:
    """Battery score P(pos)/(P(pos)+P(neg)) of every item under every (intervention, coeff) condition."""
    ids, plens = battery_sequences(model, items)
    n = len(items)
    rows = [(c, s) for c in range(len(conditions)) for s in range(2 * n)]  # (condition, sequence)
    order = sorted(range(len(rows)), key=lambda r: len(ids[rows[r][1]]))
    logp = torch.zeros(len(rows))
    bar = progress_bar(total=len(rows), desc="scoring battery", unit="seq", disable=not progress)
    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        seqs = [ids[rows[r][1]] for r in batch]
        starts = torch.tensor([plens[rows[r][1]] - 1 for r in batch])
        hooks = condition_hooks(conditions, [rows[r][0] for r in batch], starts, model.device)
        logp[torch.tensor(batch)] = sequence_logprobs(model, seqs, [plens[rows[r][1]] for r in batch], hooks)
        bar.update(len(batch))
    bar.close()
    check_finite(logp, "completion log-probabilities", "battery scoring")
    lp_rows = logp.view(len(conditions), 2 * n)
    return torch.sigmoid(lp_rows[:, :n] - lp_rows[:, n:])


def battery_score(model: LoadedModel, items: Sequence[BatteryItem], batch_size: int = 32) -> dict[str, Any]:
    """A model's plain battery score: mean, bootstrap 95% interval, per-item scores."""
    s = score_conditions(model, items, [(None, 0.0)], batch_size=batch_size)[0]
    return {"score": float(s.mean()), "ci": bootstrap_ci(s), "per_item": s.tolist()}
