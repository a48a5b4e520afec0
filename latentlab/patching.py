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
    from tqdm.auto import tqdm

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
    bar = tqdm(total=len(rows), desc="patching", unit="seq", disable=not progress)

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


# --------------------------------------------------------------------------------------------
# latentlab patch: config -> run folder.
# --------------------------------------------------------------------------------------------


@dataclass
class PatchConfig:
    """What ``latentlab patch`` takes; validated on construction, recorded whole in the manifest.

    Model-to-model: ``finetuned`` (a finetune run or adapter folder of ``base``) patched into the base
    (``reverse``: base into finetuned). Prompt pairs: ``clean_prefix`` and ``corrupt_prefix`` on ``base``.
    ``positions``: ``all``, ``prompt`` and negative offsets from the prompt's end ('-1' = last prompt token).
    """

    out: Any = "runs/patch"
    base: str = "gemma-3-270m"
    finetuned: Any = None
    battery: str = "era"
    direction: str | None = None
    reverse: bool = False
    clean_prefix: str | None = None
    corrupt_prefix: str | None = None
    layers: str = "all"
    positions: Any = DEFAULT_POSITIONS
    component: str = "resid"
    n_items: int = 24
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    overwrite: bool = False
    device_map: str | None = None  # "auto" (accelerate): spread a model too big for one device

    def __post_init__(self) -> None:
        from pathlib import Path

        from latentlab.config import (
            check_choice,
            check_device_dtype,
            check_direction_spec,
            check_layer_spec,
            check_out,
            positive_int,
        )

        pos = self.positions.split(",") if isinstance(self.positions, str) else [str(p) for p in self.positions]
        self.positions = check_positions(pos)
        check_choice(self.component, ("resid", "attn", "mlp"), "--component", "component")
        positive_int("n_items", self.n_items)
        check_layer_spec(self.layers)
        check_device_dtype(self.device, self.dtype)
        pair_mode = self.clean_prefix is not None or self.corrupt_prefix is not None
        if pair_mode and (self.clean_prefix is None or self.corrupt_prefix is None):
            raise LatentlabError("prompt-pair patching needs both --clean-prefix and --corrupt-prefix", "pass both")
        if not pair_mode and self.finetuned is None:
            raise LatentlabError(
                "nothing to patch from", "pass --finetuned DIR, or --clean-prefix and --corrupt-prefix"
            )
        if self.direction is not None:
            check_direction_spec(self.direction)
        self.finetuned = None if self.finetuned is None else Path(self.finetuned)
        self.out = check_out(self.out, self.overwrite)

    @property
    def pair_mode(self) -> bool:
        return self.clean_prefix is not None


@dataclass
class PatchRun:
    """The full-activation grid, the direction-only grid (with ``direction``), and who was patched into whom."""

    full: PatchResult
    along: PatchResult | None
    source: str
    target: str
    layers: list[int]
    out: Any


def run_patch(config: PatchConfig, command: str | None = None, progress: bool = True) -> PatchRun:
    """``latentlab patch``: battery, adapter and a saved direction are read before the base loads;
    layers and direction are checked before ``config.out`` is touched."""
    from dataclasses import asdict

    from latentlab.config import DEFAULT_BATTERY
    from latentlab.data import load_battery
    from latentlab.directions import Direction, direction_spec, fit_or_use
    from latentlab.io import write_json
    from latentlab.models import load_model, resolve_adapter
    from latentlab.plots import patch_heatmap_figure, patch_modes_figure, save_figure
    from latentlab.runs import Run

    cfg = config
    items = load_battery(DEFAULT_BATTERY.get(cfg.battery, cfg.battery))[: cfg.n_items]
    adapter = None if cfg.pair_mode else resolve_adapter(cfg.finetuned)
    spec = None if cfg.direction is None else direction_spec(cfg.direction)
    pos = list(cfg.positions)
    m = load_model(cfg.base, device=cfg.device, dtype=cfg.dtype, device_map=cfg.device_map, progress=progress)
    layer_list = m.check_layers(cfg.layers)
    if isinstance(spec, Direction):
        spec.check(m, layer_list)
    d = None if spec is None else fit_or_use(m, spec)[0]
    # the manifest records the items used (the first n_items of the battery)
    run = Run.start(cfg.out, command or "latentlab.run_patch", {**asdict(cfg), "n_items": len(items)}, seed=cfg.seed)
    run.add_model("base", m.info)
    if d is not None and not isinstance(spec, Direction):
        d.save(run.out / f"direction-{d.name}")
    src, tgt, src_items, tgt_items = None, m, None, items
    if cfg.pair_mode:
        src_items, tgt_items = prefixed(items, cfg.clean_prefix or ""), prefixed(items, cfg.corrupt_prefix or "")
        labels = ("clean prompt", "corrupted prompt")
    else:
        ft = m.with_adapter(adapter)  # type: ignore[arg-type]  # one base in memory, LoRA switched on
        run.add_model("finetuned", ft.info)
        src, tgt = (m, ft) if cfg.reverse else (ft, m)
        labels = ("base", "finetuned") if cfg.reverse else ("finetuned", "base")
    component = cfg.component
    full = patch_grid(
        tgt, tgt_items, source=src, source_items=src_items, layers=layer_list, positions=pos,
        component=component, seed=cfg.seed, progress=progress,  # type: ignore[arg-type]
    )
    check_finite(full.score, "the patched battery scores", "patch")
    results: dict[str, Any] = {"full": full.to_dict(), "source": labels[0], "target": labels[1]}
    save_figure(
        patch_heatmap_figure(
            full, "full", f"Patching {labels[0]} -> {labels[1]} ({component}): 0 = {labels[1]}, 1 = {labels[0]}"
        ),
        run.out,
        "heatmap",
    )
    parts = [full]
    along = None
    if d is not None:
        along = patch_grid(
            tgt, tgt_items, source=src, source_items=src_items, layers=layer_list,
            positions=[p for p in ("all", "prompt") if p in pos] or pos[:1], modes=("direction", "random"),
            direction=d, component=component, seed=cfg.seed, progress=progress,  # type: ignore[arg-type]
        )
        check_finite(along.score, "the direction-only patched scores", "patch")
        results["direction_only"] = along.to_dict()
        parts.append(along)
    save_figure(patch_modes_figure(parts, "all" if "all" in pos else pos[0]), run.out, "by_layer")
    write_json(run.out / "results.json", results)
    run.finish(results={"target_score": full.target_score, "source_score": full.source_score})
    return PatchRun(full, along, labels[0], labels[1], layer_list, run.out)
