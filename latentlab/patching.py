"""Activation patching: where does a finetune's effect live, and does it run through a direction?

A *source* run (the finetuned model, or a clean prompt) donates activations to a *target* run (the
base model, or a corrupted prompt) at one layer and a set of positions; the battery score of the
patched target is normalised so 0 = target and 1 = source.

- ``mode='full'`` replaces the activation; ``'direction'`` replaces only its component along a unit
  direction (t + ((s - t) . u) u); ``'random'`` does the same along a random unit direction, the
  control for "any one-dimensional patch would do".
- Positions are classes: ``all`` (every token), ``prompt`` (every prompt token), and ``-k`` (the
  k-th prompt token from the end, ``-1`` = the last prompt token). Relative positions let prompts of
  different lengths share one grid.
- Every (cell, item, completion) is a row; all rows run batched, each carrying its own patch mask,
  so a layer x position grid costs a few batched passes, not one forward pass per cell.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import pad_batch, pad_id_of, run_resid
from latentlab.data import BatteryItem
from latentlab.errors import LatentlabError
from latentlab.interventions import Hook, hook_name, patch_hook
from latentlab.models import LoadedModel
from latentlab.progress import progress as progress_bar
from latentlab.scoring import battery_sequences, score_conditions, sequence_logprobs
from latentlab.stats import bootstrap_ci, check_finite, random_units

Component = Literal["resid", "attn", "mlp"]
Mode = Literal["full", "direction", "random"]
DEFAULT_POSITIONS = ("all", "prompt", "-1", "-2", "-3", "-4")


def check_positions(positions: Sequence[str]) -> list[str]:
    """Validate position classes: ``all``, ``prompt`` or a negative offset from the prompt's end."""
    out = [p.strip() for p in positions if p.strip()]
    if not out:
        raise LatentlabError("no positions to patch", "pass e.g. --positions all,prompt,-1")
    for p in out:
        if p in ("all", "prompt"):
            continue
        try:
            k = int(p)
        except ValueError:
            raise LatentlabError(
                f"unknown position {p!r}", "use all, prompt, or -1, -2, ... (from the prompt's end)"
            ) from None
        if k >= 0:
            raise LatentlabError(
                f"position {p!r} counts from the prompt's start, which patches nothing here",
                "use negative offsets from the prompt's end: -1 is the last prompt token",
            )
    return out


def _positions(spec: str, plen: int, length: int) -> list[int]:
    if spec == "all":
        return list(range(length))
    if spec == "prompt":
        return list(range(plen))
    try:
        k = int(spec)
    except ValueError:
        raise LatentlabError(
            f"unknown position {spec!r}", "use all, prompt, or -1, -2, ... (from the prompt's end)"
        ) from None
    if plen + k < 0:
        return []  # prompt too short for this offset: the cell patches nothing for this item
    return [plen + k]


def capture(
    model: LoadedModel,
    seqs: Sequence[Sequence[int]],
    layers: Sequence[int],
    component: str = "resid",
    batch_size: int = 16,
) -> dict[int, list[Float[Tensor, "seq d_model"]]]:
    """Activations at ``component`` of every layer, every position, for each sequence (on CPU)."""
    out: dict[int, list[Tensor]] = {layer: [None] * len(seqs) for layer in layers}  # type: ignore[list-item]
    pad = pad_id_of(model)
    for b0 in range(0, len(seqs), batch_size):
        batch = list(seqs[b0 : b0 + batch_size])
        ids, mask = pad_batch(batch, pad, model.device)
        store: dict[int, Tensor] = {}

        def make(layer: int, store: dict[int, Tensor] = store) -> Callable[..., Tensor]:
            def hook(t: Tensor, hook: Any) -> Tensor:
                store[layer] = t.detach()
                return t

            return hook

        hooks = [(hook_name(component, layer), make(layer)) for layer in layers]
        run_resid(model, ids, mask, [max(layers)], extra_hooks=hooks)
        for layer in layers:
            for j, s in enumerate(batch):
                out[layer][b0 + j] = store[layer][j, : len(s)].float().cpu()
    return out


@dataclass
class PatchResult:
    """Normalised effect (0 = target, 1 = source) per (mode, layer, position class)."""

    layers: list[int]
    positions: list[str]
    modes: list[str]
    effect: Float[Tensor, "modes layers positions"]
    score: Float[Tensor, "modes layers positions"]
    target_score: float
    source_score: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "positions": self.positions,
            "modes": self.modes,
            "effect": self.effect.tolist(),
            "score": self.score.tolist(),
            "target_score": self.target_score,
            "source_score": self.source_score,
            **self.meta,
        }


def _unit_vectors(mode: str, layers: Sequence[int], direction: Any, d_model: int, seed: int) -> dict[int, Tensor]:
    if mode == "full":
        return {}
    if mode == "direction":
        if direction is None:
            raise LatentlabError("direction-only patching needs a direction", "pass --direction")
        return {layer: direction.unit(layer) for layer in layers}
    r = random_units((len(layers), d_model), seed)
    return {layer: r[i] for i, layer in enumerate(layers)}


def patch_grid(
    target: LoadedModel,
    items: Sequence[BatteryItem],
    source: LoadedModel | None = None,
    source_items: Sequence[BatteryItem] | None = None,
    layers: Sequence[int] | str | None = "all",
    positions: Sequence[str] = DEFAULT_POSITIONS,
    modes: Sequence[Mode] = ("full",),
    direction: Any = None,
    component: Component = "resid",
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> PatchResult:
    """Patch source activations into the target run for every (mode, layer, position) cell.

    Model-to-model: ``source`` is another model (e.g. the finetune), same items. Prompt pairs on one
    model: ``source=None`` and ``source_items`` holds the clean prompts (same token lengths as the
    corrupted ``items``).
    """
    positions = check_positions(positions)
    if component not in ("resid", "attn", "mlp"):
        raise LatentlabError(f"unknown component {component!r}", "use resid, attn or mlp")
    src_model = source or target
    src_items = source_items or items
    if len(src_items) != len(items):
        raise LatentlabError("clean and corrupted batteries differ in length", "pair every item")
    layer_list = target.check_layers(layers)
    n = len(items)
    t_ids, t_plens = battery_sequences(target, items)
    s_ids, s_plens = battery_sequences(src_model, src_items)
    for a, b, pa, pb in zip(t_ids, s_ids, t_plens, s_plens):
        if len(a) != len(b) or pa != pb:
            raise LatentlabError(
                "source and target sequences tokenise to different lengths, so positions do not line up",
                "use clean/corrupted prompts with the same number of tokens (e.g. two 4-digit years)",
            )
    src_acts = capture(src_model, s_ids, layer_list, component, batch_size)
    units = {m: _unit_vectors(m, layer_list, direction, target.d_model, seed) for m in modes}
    cells = [(m, li, p) for m in modes for li in layer_list for p in positions]
    rows = [(c, s) for c in range(len(cells)) for s in range(2 * n)]
    order = sorted(range(len(rows)), key=lambda r: len(t_ids[rows[r][1]]))
    logp = torch.zeros(len(rows))
    bar = progress_bar(total=len(rows), desc="patching", unit="seq", disable=not progress)

    def score_batch(seq_idx: list[int], hooks: list[Hook]) -> Tensor:
        return sequence_logprobs(target, [t_ids[s] for s in seq_idx], [t_plens[s] for s in seq_idx], hooks)

    for b0 in range(0, len(order), batch_size):
        batch = order[b0 : b0 + batch_size]
        seq_idx = [rows[r][1] for r in batch]
        width = max(len(t_ids[s]) for s in seq_idx)
        hooks = []
        for layer in layer_list:
            members = [j for j, r in enumerate(batch) if cells[rows[r][0]][1] == layer]
            if not members:
                continue
            src = torch.zeros(len(batch), width, target.d_model)
            pmask = torch.zeros(len(batch), width, dtype=torch.bool)
            unit = torch.zeros(len(batch), target.d_model)
            use_unit = torch.zeros(len(batch), dtype=torch.bool)
            for j in members:
                mode, _, pos = cells[rows[batch[j]][0]]
                s = seq_idx[j]
                a = src_acts[layer][s]
                src[j, : a.shape[0]] = a
                for p in _positions(pos, t_plens[s], len(t_ids[s])):
                    pmask[j, p] = True
                if mode != "full":
                    unit[j] = units[mode][layer]
                    use_unit[j] = True

            hooks.append((hook_name(component, layer), patch_hook(src, pmask, unit, use_unit)))
        logp[torch.tensor(batch)] = score_batch(seq_idx, hooks)
        bar.update(len(batch))
    bar.close()
    t_lp = torch.cat([score_batch(list(range(b, min(2 * n, b + batch_size))), []) for b in range(0, 2 * n, batch_size)])
    target_scores = torch.sigmoid(t_lp[:n] - t_lp[n:])
    source_scores = score_conditions(src_model, src_items, [(None, 0.0)], batch_size=batch_size)[0]
    check_finite(logp, "patched log-probabilities", "patching")
    per = logp.view(len(cells), 2 * n)
    cell_scores = torch.sigmoid(per[:, :n] - per[:, n:]).mean(1)
    t_mean, s_mean = float(target_scores.mean()), float(source_scores.mean())
    denom = s_mean - t_mean
    effect = (cell_scores - t_mean) / denom if abs(denom) > 1e-6 else torch.full_like(cell_scores, float("nan"))
    shape = (len(modes), len(layer_list), len(positions))
    return PatchResult(
        layer_list,
        list(positions),
        list(modes),
        effect.view(shape),
        cell_scores.view(shape),
        t_mean,
        s_mean,
        {
            "component": component,
            "n_items": n,
            "target_ci": bootstrap_ci(target_scores),
            "source_ci": bootstrap_ci(source_scores),
            "seed": seed,
            "small_gap": abs(denom) < 0.02,
        },
    )


def prefixed(items: Sequence[BatteryItem], prefix: str) -> list[BatteryItem]:
    """The battery with a context prefix (e.g. 'The year is 1850.') before every prompt."""
    return [BatteryItem(f"{prefix} {i.prompt}", i.positive, i.negative, i.topic, i.meta) for i in items]
