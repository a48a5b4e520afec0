"""The stage commands not yet generated from a stage config: finetune.

Each parses its options into the stage's config (which validates itself, so a bad option fails
before a model loads or --out is touched), calls the one library function that does the run
(``run_finetune``: a notebook calls the same with the same config), and prints.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from latentlab.cli._common import (
    AlphaOpt,
    BatchSizeOpt,
    CheckpointEveryOpt,
    DeviceOpt,
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
