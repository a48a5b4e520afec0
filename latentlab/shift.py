"""Did a finetune move activations along a direction on *unrelated* prompts? And can we predict it?

:func:`analyze_shift` compares each finetuned model with the base on the same prompts (last prompt
token, every layer) and reports per layer:

- the mean projection of (finetuned - base) on the unit direction, with a bootstrap 95% interval
  over prompts;
- the cosine of the mean shift vector with the direction;
- where the projection falls among ``n_random`` random unit directions (z-score and percentile of
  its magnitude): a finetune moves activations a lot in *every* direction, so a projection only
  means something relative to random ones;
- the battery score of every model.

The control finetune (same format, no 19th century) is analysed the same way, and each finetune is
also compared with each control directly (``"finetuned - control"``, paired over prompts): without
it, a shared format shift reads as an era effect (see DESIGN.md, layers 3-11 on gemma-3-270m).

Amplification (``scales``): every finetune and control is measured again with its LoRA difference
times each factor (``finetuned@x2``; the label itself at factor 1), each finetune against each
control at the same factor, so what a finetune learned can be exaggerated beside its control's.

:func:`screen_dataset` scores training examples *before* training, as in Persona Vectors: the
projection of the training response's activations minus that of the model's own response to the
same prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import collect, last_token_acts
from latentlab.adapters import check_scale, format_scale, scaled_name
from latentlab.data import BatteryItem, Chat, Example, render_chat
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.generation import generate
from latentlab.models import LoadedModel, resolve_adapter
from latentlab.scoring import battery_score
from latentlab.stats import against_random, bootstrap_ci, check_finite, random_units

__all__ = [
    "ShiftResult",
    "analyze_shift",
    "battery_score",
    "checkpoint_adapters",
    "projection_stats",
    "resolve_adapter",
    "screen_dataset",
]


def checkpoint_adapters(run: str | Path) -> dict[str, Path]:
    """Adapters of every complete checkpoint of a finetune run, by label ``step-000020``."""
    ck = Path(run) / "checkpoints"
    found = {p.name: p / "adapter" for p in sorted(ck.glob("step-*")) if (p / "trainer_state.json").exists()}
    if not found:
        raise LatentlabError(f"{run} has no complete checkpoints", "pass the --out folder of `latentlab finetune`")
    return found


def projection_stats(
    diff: Float[Tensor, "n layers d"],
    units: Float[Tensor, "layers d"],
    n_random: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-layer projection of a shift on unit directions, against random unit directions."""
    check_finite(diff, "activation differences", "shift")
    proj = (diff * units).sum(-1)  # [n, layers]
    mean_shift = diff.mean(0)  # [layers, d]
    cos = torch.nn.functional.cosine_similarity(mean_shift, units, dim=-1)
    r = random_units((n_random, *units.shape), seed)
    rproj = (mean_shift.unsqueeze(0) * r).sum(-1)  # [n_random, layers]
    real = proj.mean(0)
    z, pct = against_random(real, rproj)
    return {
        "projection": real.tolist(),
        "projection_ci": [bootstrap_ci(proj[:, i], seed=seed) for i in range(proj.shape[1])],
        "cosine": cos.tolist(),
        "shift_norm": mean_shift.norm(dim=-1).tolist(),
        "random_abs_mean": rproj.abs().mean(0).tolist(),
        "random_abs_p95": rproj.abs().quantile(0.95, dim=0).tolist(),
        "z": z.tolist(),
        "percentile": pct.tolist(),
    }


@dataclass
class ShiftResult:
    """Per-layer shift statistics for each finetuned model against the base."""

    layers: list[int]
    direction: str
    stats: dict[str, dict[str, Any]]
    battery: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "direction": self.direction,
            "stats": self.stats,
            "battery": self.battery,
            **self.meta,
        }


def analyze_shift(
    base: LoadedModel,
    finetuned: Mapping[str, str | Path],
    direction: Direction,
    prompts: Sequence[str],
    battery: Sequence[BatteryItem] | None = None,
    controls: Mapping[str, str | Path] | None = None,
    n_random: int = 100,
    seed: int = 0,
    progress: bool = True,
    scales: Sequence[float] = (1.0,),
) -> ShiftResult:
    """Shift of each finetune (``{label: adapter or finetune run folder}``) relative to ``base``.

    ``controls`` (``{label: folder}``) are measured the same way, and every finetune is also
    compared with every control on the same prompts, as ``"<finetune> - <control>"`` in ``stats``.
    Every adapter is switched on the one loaded base (:meth:`LoadedModel.with_adapter`), so memory
    holds one model plus the activations, whatever the number of finetunes.

    ``scales``: factors on every adapter's difference. Each model is measured at each factor under
    :func:`~latentlab.adapters.scaled_name` (``finetuned@x2``; the plain label at 1, so the default
    result is today's), each finetune against each control at the same factor. With any factor but
    a lone 1 the result also holds ``scales``, ``by_scale`` (factor -> {plain label: its key at that
    factor}) and, with a battery and controls, ``battery_paired``: finetune minus control per factor,
    the mean over battery items with a paired bootstrap interval.
    """
    scales = [check_scale(x) for x in scales]
    if not scales or len(set(scales)) != len(scales):
        raise LatentlabError(f"scales {scales} must be distinct factors, at least one", "pass e.g. scales=[0, 1, 2]")
    controls = dict(controls or {})
    clash = sorted(set(finetuned) & set(controls))
    if clash:
        raise LatentlabError(f"labels used for both a finetune and a control: {clash}", "give each model its own label")
    if not prompts:
        raise LatentlabError("no prompts to measure the shift on", "pass --prompts with at least one prompt")
    if n_random < 20:
        raise LatentlabError(f"n_random={n_random} is too few for a percentile", "use at least 20 random directions")
    direction.check(base)
    adapters = {label: resolve_adapter(p) for label, p in {**finetuned, **controls}.items()}
    h_base = last_token_acts(base, prompts, progress=progress)
    batt = {"base": battery_score(base, battery)} if battery else {}
    info = {"base": base.info.to_dict()}
    units = direction.units()
    stats = {}
    by_scale: dict[str, dict[str, str]] = {}
    paired_battery: dict[str, dict[str, Any]] = {}
    for x in scales:
        acts: dict[str, Tensor] = {}
        names = by_scale[format_scale(x)] = {label: scaled_name(label, x) for label in adapters}
        for label, adapter in adapters.items():
            # one bank label per adapter: its weights serve every factor
            ft = base.with_adapter(adapter, label=f"shift:{label}:{adapter}", scale=x)
            info[names[label]] = ft.info.to_dict()
            h = last_token_acts(ft, prompts, progress=progress)
            stats[names[label]] = projection_stats(h - h_base, units, n_random, seed)
            acts[label] = h
            if battery:
                batt[names[label]] = battery_score(ft, battery)
        # Paired comparison on the same prompts: what the finetune did beyond its control.
        for label in finetuned:
            for c in controls:
                key = f"{names[label]} - {names[c]}"
                names[f"{label} - {c}"] = key
                stats[key] = projection_stats(acts[label] - acts[c], units, n_random, seed)
                if battery:
                    d = torch.tensor(batt[names[label]]["per_item"]) - torch.tensor(batt[names[c]]["per_item"])
                    paired_battery[key] = {"score": float(d.mean()), "ci": bootstrap_ci(d, seed=seed)}
    meta: dict[str, Any] = {
        "models": info,
        "controls": list(controls),
        "n_prompts": len(prompts),
        "n_random": n_random,
        "seed": seed,
        "direction_meta": direction.meta,
    }
    if scales != [1.0]:  # the default result keeps today's layout
        meta.update(scales=scales, by_scale=by_scale)
        if paired_battery:
            meta["battery_paired"] = paired_battery
    return ShiftResult(direction.layers, direction.name, stats, batt, meta)


def screen_dataset(
    model: LoadedModel,
    chats: Sequence[Chat],
    direction: Direction,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Projection difference per training example (Persona Vectors): how far the training response
    sits along the direction compared with what the model itself would have answered.

    Returns per-layer dataset means with bootstrap intervals and per-example scores.
    """
    if not chats:
        raise LatentlabError("no training examples to screen", "pass a non-empty --data file")
    prompts = [render_chat(c, model.tokenizer).prompt or "" for c in chats]
    own = generate(model, prompts, max_new_tokens=max_new_tokens)[0]
    if not model.info.has_chat_template:  # base models run on into the next "Q:" line
        own = [o.split("\n")[0] for o in own]
    train_ex = [render_chat(c, model.tokenizer) for c in chats]
    own_ex = [Example(p + o, p) for p, o in zip(prompts, own)]
    direction.check(model, direction.layers)  # width and layer range, with the usual one-line error
    # The direction's own layers (one fitted on some layers screens those), not all of them.
    a = collect(model, train_ex, direction.layers, "response_mean", batch_size=batch_size, progress=progress)
    b = collect(model, own_ex, direction.layers, "response_mean", batch_size=batch_size, progress=progress)
    units = direction.units()
    scores = ((a.acts - b.acts) * units).sum(-1)  # [n, layers]
    return {
        "layers": direction.layers,
        "mean": scores.mean(0).tolist(),
        "ci": [bootstrap_ci(scores[:, i]) for i in range(scores.shape[1])],
        "per_example": scores.tolist(),
        "own_responses": own,
        "responses": [c.response for c in chats],
        "prompts": [c.messages[-2][1] if len(c.messages) > 1 else "" for c in chats],
    }
