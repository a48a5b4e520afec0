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

:func:`screen_dataset` scores training examples *before* training, as in Persona Vectors: the
projection of the training response's activations minus that of the model's own response to the
same prompt.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import collect, last_token_acts
from latentlab.data import BatteryItem, Chat, Example, render_chat
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.models import LoadedModel, load_model
from latentlab.steering import bootstrap_ci, generate, score_conditions


def resolve_adapter(path: str | Path) -> Path:
    """An adapter folder, or a ``latentlab finetune`` run folder holding ``adapter/``."""
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return p
    if (p / "adapter" / "adapter_config.json").exists():
        return p / "adapter"
    raise LatentlabError(
        f"{p} holds no LoRA adapter", "pass the --out folder of `latentlab finetune` or an adapter folder"
    )


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
    proj = (diff * units).sum(-1)  # [n, layers]
    mean_shift = diff.mean(0)  # [layers, d]
    cos = torch.nn.functional.cosine_similarity(mean_shift, units, dim=-1)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn((n_random, *units.shape), generator=g)
    r = r / r.norm(dim=-1, keepdim=True)
    rproj = (mean_shift.unsqueeze(0) * r).sum(-1)  # [n_random, layers]
    real = proj.mean(0)
    z = (real - rproj.mean(0)) / rproj.std(0).clamp_min(1e-12)
    pct = (rproj.abs() < real.abs().unsqueeze(0)).float().mean(0) * 100
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


def battery_score(model: LoadedModel, items: Sequence[BatteryItem]) -> dict[str, Any]:
    s = score_conditions(model, items, [(None, 0.0)])[0]
    return {"score": float(s.mean()), "ci": bootstrap_ci(s), "per_item": s.tolist()}


def analyze_shift(
    base: str,
    finetuned: dict[str, str | Path],
    direction: Direction,
    prompts: Sequence[str],
    battery: Sequence[BatteryItem] | None = None,
    n_random: int = 100,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    controls: dict[str, str | Path] | None = None,
) -> ShiftResult:
    """Shift of each finetune (``{label: adapter or finetune run folder}``) relative to ``base``.

    ``controls`` (``{label: folder}``) are measured the same way, and every finetune is also
    compared with every control on the same prompts, as ``"<finetune> - <control>"`` in ``stats``.
    Controls are stored under labels starting with ``control`` (``"control"`` for a single one
    labelled so, else ``"control:<label>"``); labels in ``finetuned`` that start with ``control``
    count as controls too. Models are loaded one at a time, so memory holds one model plus the
    activations.
    """
    finetuned = dict(finetuned)
    for label, path in (controls or {}).items():
        finetuned[label if label.startswith("control") else f"control:{label}"] = path
    if not prompts:
        raise LatentlabError("no prompts to measure the shift on", "pass --prompts with at least one prompt")
    if n_random < 20:
        raise LatentlabError(f"n_random={n_random} is too few for a percentile", "use at least 20 random directions")
    m = load_model(base, device=device, progress=progress)
    if m.n_layers != len(direction.layers) or direction.layers != list(range(m.n_layers)):
        raise LatentlabError("the direction must cover every layer of the model", "fit it with --layers all")
    h_base = last_token_acts(m, prompts, progress)
    batt = {"base": battery_score(m, battery)} if battery else {}
    info = {"base": m.info.to_dict()}
    del m
    units = direction.units()
    stats = {}
    acts: dict[str, Tensor] = {}
    for label, adapter in finetuned.items():
        ft = load_model(base, adapter=resolve_adapter(adapter), device=device, progress=progress)
        info[label] = ft.info.to_dict()
        h = last_token_acts(ft, prompts, progress)
        stats[label] = projection_stats(h - h_base, units, n_random, seed)
        acts[label] = h
        if battery:
            batt[label] = battery_score(ft, battery)
        del ft
        gc.collect()
    # Paired comparison on the same prompts: what the finetune did beyond its control.
    controls = [k for k in acts if k.startswith("control")]
    for label in [k for k in acts if not k.startswith("control")]:
        for c in controls:
            stats[f"{label} - {c}"] = projection_stats(acts[label] - acts[c], units, n_random, seed)
    return ShiftResult(
        direction.layers,
        direction.name,
        stats,
        batt,
        {
            "models": info,
            "n_prompts": len(prompts),
            "n_random": n_random,
            "seed": seed,
            "direction_meta": direction.meta,
        },
    )


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
    a = collect(model, train_ex, "all", "response_mean", batch_size=batch_size, progress=progress)
    b = collect(model, own_ex, "all", "response_mean", batch_size=batch_size, progress=progress)
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
