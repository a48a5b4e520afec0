"""The stage commands: models, collect, direction, probe, steer, finetune, shift, screen.

Each stage command parses its options into the stage's config (which validates itself, so a bad
option fails before a model loads or --out is touched), calls the one library function that does the
run (``run_collect``, ``run_direction``, ``run_probe``, ``run_steer``, ``run_finetune``, ``run_shift``,
``run_screen``: a notebook calls the same with the same config), and prints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from latentlab.cli._common import (
    AlphaOpt,
    BatchSizeOpt,
    CheckpointEveryOpt,
    DeviceMapOpt,
    DeviceOpt,
    DirectionOpt,
    EpochsOpt,
    LrOpt,
    MaxStepsOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    RankOpt,
    TargetModulesOpt,
    _command_line,
    app,
    console,
    out_console,
)


@app.command()
def finetune(
    data: Annotated[str, typer.Option(help="old-birds, modern-birds, persona-facts, year-trigger, or a chat JSONL.")],
    out: OutOpt,
    model: ModelOpt = "gemma-3-270m",
    rank: RankOpt = 8,
    alpha: AlphaOpt = 16,
    lr: LrOpt = 2e-4,
    epochs: EpochsOpt = 3,
    batch_size: BatchSizeOpt = 8,
    target_modules: TargetModulesOpt = "all-linear",
    checkpoint_every: CheckpointEveryOpt = 20,
    max_steps: MaxStepsOpt = None,
    seed: Annotated[int, typer.Option(help="Seed (LoRA init and data order).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the newest complete checkpoint in OUT.")] = False,
    monitor: Annotated[str | None, typer.Option(help="Directions to record at checkpoints, e.g. era,persona.")] = None,
    monitor_prompts: Annotated[str, typer.Option(help="Prompts for --monitor.")] = "unrelated",
    n_monitor: Annotated[int, typer.Option(help="How many monitor prompts.")] = 64,
    ablate: Annotated[
        list[str] | None,
        typer.Option(help="Project a direction out during training only, e.g. era@all or era@8-17 (repeatable)."),
    ] = None,
    steer: Annotated[
        list[str] | None,
        typer.Option(help="Add a direction during training only, e.g. era:-0.5@8-17 (preventative steering)."),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str | None, typer.Option(help="float32 or bfloat16 (default: bfloat16 on CUDA, float32 on CPU).")
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a LoRA adapter (peft) with checkpoints, --resume, loss curve and optional latent monitoring."""
    from latentlab.finetune import FinetuneConfig, FinetuneRunConfig, run_finetune

    cfg = FinetuneRunConfig(
        data=data,
        out=out,
        model=model,
        finetune=FinetuneConfig(
            rank=rank,
            alpha=alpha,
            lr=lr,
            epochs=epochs,
            batch_size=batch_size,
            target_modules=target_modules,
            seed=seed,
            checkpoint_every=checkpoint_every,
            max_steps=max_steps,
            ablate=list(ablate or []),
            steer=list(steer or []),
        ),
        resume=resume,
        monitor=monitor,
        monitor_prompts=monitor_prompts,
        n_monitor=n_monitor,
        device=device,
        dtype=dtype,
        overwrite=overwrite,
    )
    try:
        res = run_finetune(cfg, _command_line())
    except KeyboardInterrupt:
        console.print(
            f"interrupted: complete checkpoints are in {cfg.out / 'checkpoints'}; "
            "continue with the same command plus --resume"
        )
        sys.exit(130)
    out_console.print(
        f"adapter -> {res.adapter} ({len(res.losses)} steps, final loss {res.losses[-1]:.3f}, {res.seconds:.0f} s)"
    )


@app.command()
def shift(
    finetuned: Annotated[list[Path], typer.Option(help="Finetune run folder(s) or adapter folder(s) (repeatable).")],
    out: OutOpt = Path("runs/shift"),
    base: Annotated[str, typer.Option(help="Base model the adapters were trained on.")] = "gemma-3-270m",
    control: Annotated[list[Path] | None, typer.Option(help="Control finetune folder(s) (repeatable).")] = None,
    direction: DirectionOpt = "era",
    prompts: Annotated[str, typer.Option(help="Unrelated prompts JSONL ({'prompt'}) or built-in name.")] = "unrelated",
    battery: Annotated[str | None, typer.Option(help="A/B battery (default: the direction's).")] = None,
    checkpoints: Annotated[bool, typer.Option(help="Analyse every checkpoint of the (single) finetune run.")] = False,
    n_random: Annotated[int, typer.Option(help="Random unit directions for the percentile.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed for random directions and bootstrap.")] = 0,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Per-layer shift of finetuned (and control) models along a direction on unrelated prompts."""
    from latentlab.shift import ShiftConfig, run_shift

    cfg = ShiftConfig(
        finetuned=finetuned,
        out=out,
        base=base,
        control=control or [],
        direction=direction,
        prompts=prompts,
        battery=battery,
        checkpoints=checkpoints,
        n_random=n_random,
        seed=seed,
        device=device, device_map=device_map,
        overwrite=overwrite,
    )
    res = run_shift(cfg, _command_line())
    table = Table(title=f"shift along {res.direction} (mean projection [95% CI], z vs {n_random} random directions)")
    table.add_column("layer", justify="right")
    for label in res.stats:
        table.add_column(label, justify="right")
        table.add_column("cos", justify="right")
    for i, layer in enumerate(res.layers):
        cells = []
        for st in res.stats.values():
            lo, hi = st["projection_ci"][i]
            cells += [
                f"{st['projection'][i]:+.1f} [{lo:+.1f}, {hi:+.1f}] z={st['z'][i]:+.1f}",
                f"{st['cosine'][i]:+.2f}",
            ]
        table.add_row(str(layer), *cells)
    out_console.print(table)
    if res.battery:
        out_console.print(
            "battery: "
            + ", ".join(f"{k} {v['score']:.3f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" for k, v in res.battery.items())
        )
    out_console.print(f"results.json and plots in {cfg.out}")


@app.command()
def screen(
    data: Annotated[str, typer.Option(help="Finetuning data (built-in name or chat JSONL).")],
    out: OutOpt = Path("runs/screen"),
    model: ModelOpt = "gemma-3-270m",
    direction: DirectionOpt = "era",
    layer: Annotated[int | None, typer.Option(help="Layer to rank examples at (default: middle layer).")] = None,
    top: Annotated[int, typer.Option(help="How many top/bottom examples to print.")] = 8,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Score training examples by how far they push along a direction, before any training."""
    from latentlab.shift import ScreenConfig, run_screen

    cfg = ScreenConfig(data, out, model, direction, layer, top, device, "float32", overwrite, device_map=device_map)
    res = run_screen(cfg, _command_line())
    r, li, col = res.results, res.layer, res.results["layers"].index(res.layer)
    lo, hi = r["ci"][col]
    out_console.print(f"{data}: mean projection difference at layer {li}: {r['mean'][col]:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    t = Table(title=f"examples pushing most (+) and least (-) along {res.direction} at layer {li}")
    for c in ("score", "response", "model's own"):
        t.add_column(c)
    for i in res.order[:top] + res.order[-top:]:
        t.add_row(f"{res.scores[i]:+.1f}", r["responses"][i][:40], r["own_responses"][i][:40])
    out_console.print(t)
