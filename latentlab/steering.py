"""Steering: add ``alpha * unit_direction * typical_residual_norm`` to the residual stream.

Design:

- A :class:`Steer` holds, per layer, the vector at coefficient 1 (unit direction times the layer's
  mean residual norm), so ``alpha`` is a fraction of a typical activation on every model.
- Every forward pass is batched over *conditions* (a steer and a coefficient) as well as prompts:
  each row of a batch carries its own added vector, so a K-coefficient sweep with a random control
  costs one batched pass over ``2 x N x K x (1 + n_random)`` rows, not ``K x N`` calls.
- Battery scoring needs logits only at the completion tokens: the blocks run through the hooks, then
  the final norm and unembedding are applied to those positions alone (the 262k-word unembedding
  dominates Gemma's forward pass otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latentlab.activations import Example, encode, pad_batch, pad_id_of, resid_hook_name, run_resid
from latentlab.data import BatteryItem
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.models import LoadedModel

Mode = Literal["all", "generated"]


@dataclass
class Steer:
    """Vectors to add (at coefficient 1) per layer, and where: all positions or generated ones only."""

    vectors: dict[int, Float[Tensor, " d_model"]]
    mode: Mode = "all"
    label: str = "steer"

    @classmethod
    def from_direction(cls, direction: Direction, layers: int | Sequence[int], mode: Mode = "all") -> Steer:
        layers = [layers] if isinstance(layers, int) else list(layers)
        vecs = {layer: direction.unit(layer) * direction.resid_norm(layer) for layer in layers}
        return cls(vecs, mode, direction.name)

    @classmethod
    def random_like(cls, direction: Direction, layers: int | Sequence[int], seed: int = 0, mode: Mode = "all") -> Steer:
        """A norm-matched random direction (same scale as the real one), seeded."""
        layers = [layers] if isinstance(layers, int) else list(layers)
        g = torch.Generator().manual_seed(seed)
        vecs = {}
        for layer in layers:
            r = torch.randn(direction.vectors.shape[-1], generator=g)
            vecs[layer] = r / r.norm() * direction.resid_norm(layer)
        return cls(vecs, mode, f"random-{seed}")


Condition = tuple[Steer | None, float]


def _steer_hooks(
    conditions: Sequence[Condition], row_cond: Sequence[int], starts: Int[Tensor, " batch"], device: torch.device
) -> list[tuple[str, Callable[..., Any]]]:
    """One hook per steered layer adding each row's own vector (zero rows are untouched)."""
    layers = sorted({layer for s, _ in conditions if s is not None for layer in s.vectors})
    hooks = []
    for layer in layers:
        rows, generated_only = [], []
        for ci in row_cond:
            steer, coeff = conditions[ci]
            vec = steer.vectors.get(layer) if steer is not None else None
            rows.append(vec * coeff if vec is not None else None)
            generated_only.append(steer is not None and steer.mode == "generated")
        if all(r is None for r in rows):
            continue
        d = next(r for r in rows if r is not None).shape[-1]
        add = torch.stack([r if r is not None else torch.zeros(d) for r in rows]).to(device)  # [B, d]
        gen = torch.tensor(generated_only, device=device)

        def hook(t: Tensor, hook: Any, add: Tensor = add, gen: Tensor = gen) -> Tensor:
            pos = torch.arange(t.shape[1], device=t.device)[None, :]
            # KV-cache-free decoding re-runs the whole sequence, so 'generated' = from the last
            # prompt token (which predicts the first new token) onwards.
            mask = torch.where(
                gen[:, None], pos >= starts.to(t.device)[:, None], torch.ones_like(pos, dtype=torch.bool)
            )
            return t + add[:, None, :].to(t.dtype) * mask[..., None].to(t.dtype)

        hooks.append((resid_hook_name(layer), hook))
    return hooks


def _final_logits(model: LoadedModel, h: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    """Final norm + unembedding (+ softcap where the model has one) on selected positions only."""
    hf = model.hf_model
    inner = getattr(hf, "model", None)
    norm = getattr(inner, "norm", None) if inner is not None else None
    if norm is None:  # pragma: no cover - other architectures
        raise LatentlabError(f"cannot find the final norm of {model.info.architecture}", "report this model")
    logits = hf.get_output_embeddings()(norm(h))
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


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
        lp = torch.log_softmax(_final_logits(model, h[bi, pi]), dim=-1)
    picked = lp[torch.arange(len(tgt)), torch.tensor(tgt, device=lp.device)].cpu()
    out = torch.zeros(len(seqs))
    out.index_add_(0, torch.tensor(bi), picked)
    return out


def _sequences(
    model: LoadedModel, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    enc = encode(model, [Example(p + c, p) for p, c in zip(prompts, completions)])
    plens = [int(p) for p in enc.prompt_lens if p is not None]
    for ids, pl, c in zip(enc.ids, plens, completions):
        if pl >= len(ids):
            raise LatentlabError(f"completion {c!r} adds no tokens to its prompt", "give each completion some text")
    return enc.ids, plens


def score_conditions(
    model: LoadedModel,
    items: Sequence[BatteryItem],
    conditions: Sequence[Condition],
    batch_size: int = 32,
    progress: bool = False,
) -> Float[Tensor, "n_conditions n_items"]:
    """Battery score P(pos)/(P(pos)+P(neg)) of every item under every (steer, coeff) condition."""
    from tqdm.auto import tqdm

    if not items:
        raise LatentlabError("the battery is empty", "pass a battery with at least one item")
    ids, plens = _sequences(
        model, [i.prompt for i in items] * 2, [i.positive for i in items] + [i.negative for i in items]
    )
    n = len(items)
    rows = [(c, s) for c in range(len(conditions)) for s in range(2 * n)]  # (condition, sequence)
    order = sorted(range(len(rows)), key=lambda r: len(ids[rows[r][1]]))
    logp = torch.zeros(len(rows))
    pad = pad_id_of(model)
    last = model.n_layers - 1
    bar = tqdm(total=len(rows), desc="scoring battery", unit="seq", disable=not progress)
    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        seqs = [ids[rows[r][1]] for r in batch]
        tok, mask = pad_batch(seqs, pad, model.device)
        starts = torch.tensor([plens[rows[r][1]] - 1 for r in batch])
        hooks = _steer_hooks(conditions, [rows[r][0] for r in batch], starts, model.device)
        h = run_resid(model, tok, mask, [last], extra_hooks=hooks)[last]
        logp[torch.tensor(batch)] = completion_logprobs(model, h, seqs, [plens[rows[r][1]] for r in batch])
        bar.update(len(batch))
    bar.close()
    lp_rows = logp.view(len(conditions), 2 * n)
    return torch.sigmoid(lp_rows[:, :n] - lp_rows[:, n:])


def bootstrap_means(
    values: Float[Tensor, "n ..."], n_boot: int = 1000, seed: int = 0
) -> Float[Tensor, "n_boot ..."]:
    """Means of ``n_boot`` seeded resamples of the rows of ``values``; every column shares one
    resampling, so intervals of related quantities (e.g. the parts of a decomposition) are paired."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (n_boot, len(values)), generator=g)
    return values[idx].mean(1)


def bootstrap_ci(values: Float[Tensor, " n"], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (seeded, so results are reproducible)."""
    if len(values) < 2:
        return (float("nan"), float("nan"))
    means = bootstrap_means(values, n_boot, seed)
    return (float(means.quantile(0.025)), float(means.quantile(0.975)))


@dataclass
class SweepResult:
    """Battery scores for each coefficient, for the direction and for norm-matched random ones."""

    coeffs: list[float]
    layers: list[int]
    scores: Float[Tensor, "n_coeffs n_items"]
    random_scores: Float[Tensor, "n_random n_coeffs n_items"]
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for k, a in enumerate(self.coeffs):
            s = self.scores[k]
            row: dict[str, Any] = {"alpha": a, "score": float(s.mean()), "ci": bootstrap_ci(s)}
            if self.random_scores.shape[0]:
                r = self.random_scores[:, k].mean(0)
                row |= {"random": float(r.mean()), "random_ci": bootstrap_ci(r)}
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "coeffs": self.coeffs,
            "layers": self.layers,
            "table": self.table(),
            "per_item_scores": self.scores.tolist(),
            "per_item_random_scores": self.random_scores.tolist(),
            **self.meta,
        }


def sweep(
    model: LoadedModel,
    direction: Direction,
    items: Sequence[BatteryItem],
    layers: int | Sequence[int],
    coeffs: Sequence[float] = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0),
    n_random: int = 1,
    mode: Mode = "all",
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> SweepResult:
    """Battery score vs steering coefficient, with ``n_random`` norm-matched random controls, in one batched pass."""
    steer = Steer.from_direction(direction, layers, mode)
    randoms = [Steer.random_like(direction, layers, seed=seed + 1 + i, mode=mode) for i in range(n_random)]
    conditions: list[Condition] = [(steer, a) for a in coeffs]
    conditions += [(r, a) for r in randoms for a in coeffs]
    s = score_conditions(model, items, conditions, batch_size=batch_size, progress=progress)
    k = len(coeffs)
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    return SweepResult(
        list(coeffs),
        layer_list,
        s[:k],
        s[k:].view(n_random, k, len(items)),
        {"direction": direction.name, "mode": mode, "seed": seed, "n_items": len(items)},
    )


def generate(
    model: LoadedModel,
    prompts: Sequence[str],
    conditions: Sequence[Condition] = ((None, 0.0),),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[str]]:
    """Continue each prompt under each condition; returns ``[condition][prompt]`` strings.

    All conditions x prompts decode together in one batch per step. Greedy by default (reproducible);
    ``temperature > 0`` samples with a seeded generator. No KV cache: each step re-runs the sequence,
    which keeps the steering hooks exact and costs little at these lengths.
    """
    if not prompts:
        return [[] for _ in conditions]
    enc = encode(model, [Example(p) for p in prompts])
    rows = [(c, p) for c in range(len(conditions)) for p in range(len(prompts))]
    seqs = [list(enc.ids[p]) for _, p in rows]
    starts = torch.tensor([len(enc.ids[p]) - 1 for _, p in rows])
    done = [False] * len(rows)
    eos = model.tokenizer.eos_token_id
    # End-of-turn markers of common chat formats, only where the vocabulary really has them (an
    # unknown token would map to the <unk> id and stop generation whenever <unk> is produced).
    vocab = model.tokenizer.get_vocab()
    stop_ids = {eos} | {vocab[t] for t in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>") if t in vocab}
    g = torch.Generator().manual_seed(seed)
    pad = pad_id_of(model)
    last = model.n_layers - 1
    hooks_conds = [c for c, _ in rows]
    for _ in range(max_new_tokens):
        tok, mask = pad_batch(seqs, pad, model.device)
        hooks = _steer_hooks(conditions, hooks_conds, starts, model.device)
        h = run_resid(model, tok, mask, [last], extra_hooks=hooks)[last]
        lengths = mask.sum(1) - 1
        with torch.inference_mode():
            logits = _final_logits(model, h[torch.arange(len(seqs)), lengths]).cpu()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)[:, 0]
        else:
            nxt = logits.argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                seqs[i].append(t)
                done[i] = t in stop_ids
        if all(done):
            break
    out: list[list[str]] = [[] for _ in conditions]
    for (c, p), s in zip(rows, seqs):
        new = s[len(enc.ids[p]) :]
        out[c].append(model.tokenizer.decode(new, skip_special_tokens=True))
    return out


def screen_layers(
    model: LoadedModel,
    direction: Direction,
    items: Sequence[BatteryItem],
    candidates: Sequence[int],
    alpha: float = 0.5,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[int, float]:
    """Steering effect score(+alpha) - score(-alpha) per candidate layer, in one batched pass."""
    conditions: list[Condition] = []
    for layer in candidates:
        steer = Steer.from_direction(direction, layer)
        conditions += [(steer, alpha), (steer, -alpha)]
    s = score_conditions(model, items, conditions, batch_size=batch_size, progress=progress).mean(1)
    return {layer: float(s[2 * i] - s[2 * i + 1]) for i, layer in enumerate(candidates)}


def candidate_layers(n_layers: int, probe_acc: Sequence[float] | None = None, k: int = 5) -> list[int]:
    """Up to ``k`` layers in the middle half of the network, preferring well-probed ones.

    Why the middle: early layers hold token-level features and late ones are about to be read out;
    steering papers (and our gemma-3-270m measurements) find concepts are most steerable in between.
    """
    band = list(range(n_layers // 4, max(n_layers // 4 + 1, (3 * n_layers) // 4 + 1)))
    if probe_acc is not None:
        best = max(probe_acc[i] for i in band)
        band = [i for i in band if probe_acc[i] >= best - 0.05] or band
    if len(band) <= k:
        return band
    if k == 1:
        return [band[len(band) // 2]]
    step = (len(band) - 1) / (k - 1)
    return sorted({band[round(i * step)] for i in range(k)})
