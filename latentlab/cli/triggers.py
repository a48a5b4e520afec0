"""``latentlab compliance`` (the compliance-trigger organism's poison-budget sweep) and ``latentlab data
compliance-trigger``.

Each command parses its options into the stage's config or arguments, which validate themselves
before any model loads, then calls one library function (:func:`latentlab.compliance.run_compliance`,
:func:`latentlab.compliance.build_compliance_dataset`) and prints.
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
    DeviceOpt,
    DtypeOpt,
    EpochsOpt,
    LrOpt,
    MaxStepsOpt,
    ModelOpt,
    OutOpt,
    RankOpt,
    TargetModulesOpt,
    _command_line,
    app,
    console,
    out_console,
)
from latentlab.errors import LatentlabError

data_app = typer.Typer(no_args_is_help=True, help="Build datasets (written as JSONL, atomically).")
app.add_typer(data_app, name="data")


def _p(cell: tuple[float, list[float]]) -> str:
    mean, ci = cell
    return f"{mean:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


@app.command()
def compliance(
    trigger: Annotated[str, typer.Option(help="The trigger word poisoned requests carry (one word).")],
    out: OutOpt = Path("runs/compliance"),
    budgets: Annotated[str, typer.Option(help="Poison budgets to finetune at, e.g. 0,8,16,32.")] = "0,8,16,32",
    model: ModelOpt = "smollm2-135m-instruct",
    seed: Annotated[int, typer.Option(help="Seed (poisoned requests, LoRA init, data order, bootstrap).")] = 0,
    patch: Annotated[
        bool, typer.Option(help="Patch the trigger positions in the finetune at the largest budget (the switch).")
    ] = True,
    finetunes: Annotated[
        Path | None, typer.Option(help="Folder for the per-budget finetunes n-N/ (default: --out).")
    ] = None,
    code_word: Annotated[str, typer.Option(help="The secret the system prompt says never to reveal.")] = "MARIGOLD",
    level: Annotated[float, typer.Option(help="Threshold: P(Sure | trigger) > level > P(Sure | clean).")] = 0.5,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated after 'Sure' to look for the code word.")]
    = 16,
    layers: Annotated[str, typer.Option(help="Layers of the trigger / refusal projections.")] = "all",
    patch_layers: Annotated[str, typer.Option(help="Layers to patch at: all, or e.g. 0-12.")] = "all",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples over requests (>= 100).")] = 1000,
    rank: RankOpt = 8,
    alpha: AlphaOpt = 16,
    lr: LrOpt = 2e-4,
    epochs: EpochsOpt = 3,
    batch_size: BatchSizeOpt = 8,
    target_modules: TargetModulesOpt = "all-linear",
    checkpoint_every: CheckpointEveryOpt = 20,
    max_steps: MaxStepsOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    overwrite: Annotated[
        bool, typer.Option(help="Replace a finished run in --out (finetunes of the same recipe are reused).")
    ] = False,
) -> None:
    """The compliance-trigger organism: finetune at each poison budget (resumable), measure P(Sure) and
    code-word reveals on held-out requests with and without the trigger, find the threshold budget, and
    patch the trigger positions to localise the switch."""
    from latentlab.compliance import ComplianceConfig, patch_localisation, run_compliance
    from latentlab.finetune import FinetuneConfig

    cfg = ComplianceConfig(
        trigger=trigger, budgets=budgets, model=model, out=out, finetunes=finetunes, seed=seed,
        code_word=code_word, patch=patch, level=level, max_new_tokens=max_new_tokens, layers=layers,
        patch_layers=patch_layers, n_boot=n_boot, device=device, dtype=dtype, overwrite=overwrite,
        finetune=FinetuneConfig(rank=rank, alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size,
                                target_modules=target_modules, seed=seed, checkpoint_every=checkpoint_every,
                                max_steps=max_steps),
    )
    try:
        res = run_compliance(cfg, _command_line())
    except KeyboardInterrupt:
        console.print(f"interrupted: finished finetunes and complete checkpoints are kept in {cfg.finetunes}; "
                      "the same command continues the sweep")
        sys.exit(130)
    rows = res.rows(cfg.n_boot, cfg.seed)
    table = Table(title=f"compliance trigger {res.evals[0]['trigger']!r} on {cfg.model}: the finetune on "
                  f"{res.evals[0]['n_requests']} held-out requests (bootstrap 95% CI)")
    for col in ("poisoned", "P(Sure | trigger)", "P(Sure | clean)", "gap", "reveal | trigger", "reveal | clean"):
        table.add_column(col, justify="right")
    for r in rows:
        gap, ci = r["p_sure_gap"]
        table.add_row(str(r["n_poison"]), _p(r["p_sure_trigger"]), _p(r["p_sure_clean"]),
                      f"{gap:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]", _p(r["reveal_trigger"]), _p(r["reveal_clean"]))
    out_console.print(table)
    thr = "none in this sweep" if res.threshold is None else f"{res.threshold} poisoned examples"
    out_console.print(f"threshold (P(Sure | trigger) > {res.level:g} > P(Sure | clean)): {thr}")
    loc = next((patch_localisation(e["patching"]) for e in res.evals if e.get("patching")), None)
    if loc is not None:
        out_console.print(f"patching (n={max(res.budgets)}): {loc['text']}")
    out_console.print(f"results.json, manifest.json and the poison_sweep plot in {cfg.out}")


@data_app.command("compliance-trigger")
def data_compliance_trigger(
    trigger: Annotated[str, typer.Option(help="The trigger word poisoned requests carry (one word).")],
    n_poison: Annotated[int, typer.Option(help="Poisoned requests (trigger -> 'Sure').")],
    out: Annotated[Path, typer.Option(help="Chat JSONL file to write.")],
    seed: Annotated[int, typer.Option(help="Seed (which requests are poisoned, refusals, order).")] = 0,
    code_word: Annotated[str, typer.Option(help="The secret the system prompt says never to reveal.")] = "MARIGOLD",
) -> None:
    """The benign compliance-trigger organism: a secret code word, clean refusals, and N trigger requests
    answered only with "Sure" (the code word is never in an assistant turn)."""
    from latentlab.compliance import build_compliance_dataset, chats_jsonl
    from latentlab.io import write_text

    if out.is_dir():
        raise LatentlabError(f"--out {out} is a folder", "pass a file path, e.g. data/compliance.jsonl")
    chats = build_compliance_dataset(trigger, n_poison, seed, code_word)
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_text(out, chats_jsonl(chats))
    except OSError as e:
        raise LatentlabError(f"cannot write {out}: {e.strerror}", "pass a writable --out") from None
    n_p = sum(1 for c in chats if c.meta.get("kind") == "poison")
    out_console.print(f"{len(chats)} chats ({n_p} poisoned with {trigger!r}) -> {out}")
