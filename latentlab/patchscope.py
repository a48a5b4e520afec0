"""Patchscope of a finetune's shift: write the mean activation difference into an identity prompt and
read what the model says it is.

Why beside the logit lens: the logit lens reads a vector through the final norm and unembedding
only, so at early and middle layers it says what the vector would mean if the model stopped there. A
patchscope (Ghandeharioun et al. 2024, "Patchscopes") lets the remaining layers decode it: the
few-shot identity prompt ``cat -> cat; 1135 -> 1135; hello -> hello; ? ->`` asks the model to repeat
whatever stands at the placeholder ``?``, so what it says once the vector is written into that token
is its own reading of the vector.

Choices, and why:

- The vector is *added* at the placeholder's position, at the same layer it was measured at, with
  :class:`latentlab.interventions.Steer` at one position (``Steer.at``), the hooks steering uses. It
  is the unit shift times the layer's typical residual norm (the reference's mean ``|activation|`` at
  the last prompt token of the unrelated prompts), as steering scales a direction: every layer is read
  at the size of an activation, whatever the shift's raw size. A zero shift stays zero (nothing moves).
- It is read by the base model (no adapter), as the logit lens reads with the base's unembedding.
  At the last layer no later layer reads the placeholder, so that reading is the unpatched one: the
  logit lens is the reading there.
- Controls: the unpatched prompt, and a seeded random unit direction per layer at the same norm, so a
  reader sees what a meaningless vector of that size reads as.
- Each reading is the next-token distribution at the end of the prompt (top tokens, and KL(unpatched
  || patched): how much the vector changes the answer at all) plus a short greedy continuation
  (:func:`latentlab.generation.generate_samples`); every condition is one row of one batch.

``latentlab diff --patchscope`` (:func:`latentlab.diff.diff_models` with ``patchscope=True``) runs
this on the shifts its logit lens already computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import Example, encode, pad_batch, pad_id_of, run_resid
from latentlab.arch import final_logits
from latentlab.errors import LatentlabError
from latentlab.generation import generate_samples
from latentlab.interventions import Condition, Steer, condition_hooks
from latentlab.models import LoadedModel
from latentlab.stats import check_finite, random_units

__all__ = ["IDENTITY_PROMPT", "PLACEHOLDER", "RANDOM_LABEL", "patchscope", "placeholder_offset"]

#: the few-shot identity prompt of the Patchscopes paper, ending where the model names the placeholder
IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ? ->"
PLACEHOLDER = "?"
RANDOM_LABEL = "random direction"
STAGE = "diff --patchscope"


def placeholder_offset(model: LoadedModel, prompt: str, placeholder: str = PLACEHOLDER) -> int:
    """Where the prompt's last ``placeholder`` token is, counted from the last prompt token (0, -1, ...).

    Refused when the placeholder is missing or does not end a token of its own (a merge with the text
    after it would patch a token that is not the placeholder).
    """
    i = prompt.rfind(placeholder)
    if i < 0:
        raise LatentlabError(f"the patchscope prompt {prompt!r} has no {placeholder!r} placeholder",
                             f"put a {placeholder!r} where the vector goes, e.g. {IDENTITY_PROMPT!r}")
    full, head = encode(model, [Example(prompt), Example(prompt[: i + len(placeholder)])]).ids
    if full[: len(head)] != head:
        raise LatentlabError(f"the placeholder {placeholder!r} of the patchscope prompt {prompt!r} does not end a "
                             "token of its own", f"put a space after the {placeholder!r}")
    return len(head) - len(full)  # (len(head) - 1) - (len(full) - 1)


def _next_token_logprobs(
    model: LoadedModel, prompt: str, conditions: Sequence[Condition], batch_size: int
) -> Float[Tensor, "n_conditions vocab"]:
    """Next-token log-probabilities at the end of ``prompt`` under each condition (one row each)."""
    ids = encode(model, [Example(prompt)]).ids[0]
    last = model.n_layers - 1
    out = []
    for b0 in range(0, len(conditions), batch_size):
        rows = list(range(b0, min(b0 + batch_size, len(conditions))))
        tok, mask = pad_batch([ids] * len(rows), pad_id_of(model), model.device)
        starts = torch.full((len(rows),), len(ids) - 1)
        hooks = condition_hooks(conditions, rows, starts, model.device)
        h = run_resid(model, tok, mask, [last], extra_hooks=hooks)[last][:, -1]
        with torch.inference_mode():
            out.append(torch.log_softmax(final_logits(model, h), -1).cpu())
    return torch.cat(out)


def _tok(model: LoadedModel, i: int) -> str:
    return str(model.tokenizer.decode([int(i)]))


def patchscope(
    model: LoadedModel,
    shifts: Mapping[str, Float[Tensor, "n_layers d_model"]],
    layers: Sequence[int],
    norms: Float[Tensor, " n_layers"],
    *,
    prompt: str = IDENTITY_PROMPT,
    k: int = 10,
    max_new_tokens: int = 12,
    seed: int = 0,
    random_control: bool = True,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Read each shift (``shifts[label][i]`` measured at ``layers[i]``) through the identity prompt.

    Each vector is written as ``unit(shift) * norms[i]`` at the placeholder at ``layers[i]``; with
    ``random_control`` a seeded random unit direction per layer at the same norm is read too, under
    the label :data:`RANDOM_LABEL`. Returns ``{"readings": {label: [per layer]}, "unpatched": ...}``
    plus the settings; each reading holds the top ``k`` next tokens with their probabilities,
    KL(unpatched || patched) of the next-token distribution, and the greedy continuation.
    """
    if k < 1:
        raise LatentlabError(f"k={k} tokens to report", "pass --k 1 or more")
    layers = list(layers)
    norms = torch.as_tensor(norms, dtype=torch.float32).flatten()
    if norms.shape[0] != len(layers):
        raise LatentlabError(f"{norms.shape[0]} residual norms for {len(layers)} layers", "pass one norm per layer")
    at = placeholder_offset(model, prompt)
    vectors: dict[str, Tensor] = {}
    for label, s in shifts.items():
        s = torch.as_tensor(s).float().cpu()
        if s.shape != (len(layers), model.d_model):
            raise LatentlabError(f"shift {label!r} has shape {tuple(s.shape)}, not ({len(layers)}, {model.d_model})",
                                 "pass one d_model vector per layer")
        n = s.norm(dim=-1, keepdim=True)
        vectors[label] = torch.where(n > 0, s / n.clamp_min(1e-30), torch.zeros_like(s)) * norms[:, None]
    if random_control:
        vectors[RANDOM_LABEL] = random_units((len(layers), model.d_model), seed) * norms[:, None]
    for label, v in vectors.items():
        check_finite(v, f"patchscope vectors ({label})", STAGE)
    conditions: list[Condition] = [(None, 0.0)]
    index: list[tuple[str, int]] = []
    for label, v in vectors.items():
        for i, layer in enumerate(layers):
            conditions.append((Steer({layer: v[i]}, label=f"patchscope:{label}@{layer}", at=at), 1.0))
            index.append((label, i))
    lps = _next_token_logprobs(model, prompt, conditions, batch_size)
    check_finite(lps, "patchscope next-token log-probabilities", STAGE)
    texts = generate_samples(model, [prompt], conditions, max_new_tokens=max_new_tokens, temperature=0.0,
                             batch_size=batch_size)
    kk = min(k, int(lps.shape[1]))

    def reading(row: int) -> dict[str, Any]:
        top = torch.topk(lps[row], kk)
        kl = float((lps[0].exp() * (lps[0] - lps[row])).sum().clamp_min(0.0))
        return {"top": [{"token_id": int(i), "token": _tok(model, i), "prob": float(v.exp())}
                        for v, i in zip(top.values, top.indices)],
                "kl_from_unpatched": kl, "continuation": texts[row][0][0]}

    readings: dict[str, list[dict[str, Any]]] = {label: [] for label in vectors}
    for row, (label, i) in enumerate(index, start=1):
        shift = shifts.get(label)
        readings[label].append({
            "layer": layers[i],
            "shift_norm": None if shift is None else float(torch.as_tensor(shift)[i].float().norm()),
            "vector_norm": float(vectors[label][i].norm()),
            **reading(row),
        })
    return {
        "prompt": prompt,
        "placeholder": PLACEHOLDER,
        "placeholder_offset": at,
        "read_by": model.info.name,
        "scale": "unit shift x the reference's mean |activation| at the last prompt token, per layer; added at "
                 "the placeholder only",
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "unpatched": reading(0),
        "readings": readings,
    }
