"""``latentlab sae ...``: sparse-autoencoder latents (latentlab.sae).

Each command parses its options into the stage's config (which validates itself, so a bad option
fails before any model loads or the --out folder is touched), calls the one library function that
does the run (:func:`latentlab.sae.run_sae_train`, ``run_sae_latents``, ``run_sae_shift``), and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from latentlab.cli._common import (
    AdapterOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OutOpt,
    _command_line,
    app,
    console,
    out_console,
)

# --------------------------------------------------------------------------------------------
# latentlab sae ...: sparse-autoencoder latents (latentlab.sae).
# --------------------------------------------------------------------------------------------

sae_app = typer.Typer(
    no_args_is_help=True,
    help="Sparse-autoencoder latents: train a small SAE, find the latents behind a direction or a finetune's shift.",
)
app.add_typer(sae_app, name="sae")

SaeOpt = Annotated[
    str,
    typer.Option(
        "--sae",
        help="SAE folder (`latentlab sae train` --out, or sae-lens' cfg.json + sae_weights.safetensors) "
        "or a pretrained release:sae_id (needs the hub).",
    ),
]
SaeLayerOpt = Annotated[int | None, typer.Option(help="Layer (default: the SAE's own; must match it).")]


def _fmt_ci(mean: float, ci: tuple[float, float] | list[float], digits: int = 2) -> str:
    return f"{mean:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


@sae_app.command("train")
def sae_train(
    out: Annotated[Path, typer.Option(help="Run folder to write (the SAE goes to OUT/sae).")],
    layer: Annotated[int, typer.Option(help="Layer whose residual stream (after the block) the SAE reads.")],
    data: Annotated[
        list[str] | None,
        typer.Option(
            help="Built-in name or JSONL, repeatable (default: unrelated). Prompt files are rendered as "
            "`latentlab shift` reads them; contrast pairs give both poles."
        ),
    ] = None,
    model: ModelOpt = "gemma-3-270m",
    adapter: AdapterOpt = None,
    architecture: Annotated[str, typer.Option(help="topk (sparsity set by --k) or standard (ReLU + L1).")] = "topk",
    d_sae: Annotated[int | None, typer.Option(help="Number of latents (default: --expansion x d_model).")] = None,
    expansion: Annotated[int, typer.Option(help="Latents per residual dimension when --d-sae is not given.")] = 4,
    k: Annotated[int, typer.Option(help="topk: active latents per token.")] = 32,
    l1: Annotated[float, typer.Option(help="standard: L1 coefficient.")] = 5.0,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Tokens per step.")] = 256,
    lr: Annotated[
        float, typer.Option(help="Adam learning rate (constant, then linear decay to 0 over the last 20% of steps).")
    ] = 1e-3,
    eval_fraction: Annotated[float, typer.Option(help="Fraction of examples held out for the statistics.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed (initialisation, data order, held-out split).")] = 0,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    dtype: DtypeOpt = "float32",
) -> None:
    """Train a small SAE (sae-lens) on every token's residual stream at one layer; writes OUT/sae."""
    from latentlab.sae import SAETrainConfig, SAETrainRunConfig, run_sae_train

    cfg = SAETrainRunConfig(
        out=out,
        layer=layer,
        data=data or ["unrelated"],
        model=model,
        adapter=adapter,
        device=device, device_map=device_map,
        dtype=dtype,
        sae=SAETrainConfig(
            architecture=architecture,  # type: ignore[arg-type]
            expansion=expansion,
            d_sae=d_sae,
            k=k,
            l1_coefficient=l1,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            eval_fraction=eval_fraction,
            device=device,
        ),
    )
    res = run_sae_train(cfg, _command_line())
    table = Table(
        title=f"SAE at layer {res.meta['layer']} of {res.meta['model']['name']}: "
        f"{res.meta['training']['d_sae']} latents ({cfg.sae.architecture})"
    )
    table.add_column("statistic")
    split_names = [s for s in ("train", "eval") if s in res.stats]
    for s in split_names:
        table.add_column("held-out" if s == "eval" else "train", justify="right")
    for key, label in (
        ("explained_variance", "explained variance"),
        ("mse", "MSE per token"),
        ("l0", "L0"),
        ("n_tokens", "tokens"),
    ):
        table.add_row(label, *[_fmt(res.stats[s][key]) for s in split_names])
    out_console.print(table)
    out_console.print(
        f"dead latents (never fire on any token): {res.stats['dead_fraction']:.1%}; loss "
        f"{res.stats['initial_loss']:.3g} -> {res.stats['final_loss']:.3g}; SAE -> {res.path}"
    )


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


@sae_app.command("latents")
def sae_latents(
    sae: SaeOpt,
    direction: Annotated[
        str, typer.Option(help="Saved direction .safetensors, or era, persona or a pair JSONL (fitted on --model).")
    ],
    out: OutOpt = Path("runs/sae-latents"),
    layer: SaeLayerOpt = None,
    k: Annotated[int, typer.Option(help="Top latents to report on each side.")] = 10,
    n_random: Annotated[int, typer.Option(help="Random directions for the chance level of |cos| (>= 20).")] = 200,
    model: ModelOpt = "gemma-3-270m",
    seed: Annotated[int, typer.Option(help="Seed for the random directions.")] = 0,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    dtype: DtypeOpt = "float32",
) -> None:
    """Which SAE latents write along a direction: decoder cosines, top latents, chance level."""
    from latentlab.sae import SAELatentsConfig, run_sae_latents

    cfg = SAELatentsConfig(
        sae=sae,
        direction=direction,
        out=out,
        layer=layer,
        k=k,
        n_random=n_random,
        model=model,
        seed=seed,
        device=device, device_map=device_map,
        dtype=dtype,
    )
    res = run_sae_latents(cfg, _command_line())
    table = Table(
        title=f"SAE latents along the {res.direction} direction at layer {res.layer} ({res.d_sae} latents); "
        f"chance level of the best |cos|: {res.null_max_abs_cos:.2f}"
    )
    for col in ("rank", "latent (+)", "cos", "enc cos", "latent (-)", "cos ", "enc cos "):
        table.add_column(col, justify="right")
    for i, (p, q) in enumerate(zip(res.top_positive, res.top_negative), start=1):
        mark = {True: "*", False: ""}
        table.add_row(
            str(i),
            f"#{p['latent']}{mark[p['above_null']]}",
            f"{p['cosine']:+.3f}",
            f"{p['encoder_cosine']:+.3f}",
            f"#{q['latent']}{mark[q['above_null']]}",
            f"{q['cosine']:+.3f}",
            f"{q['encoder_cosine']:+.3f}",
        )
    out_console.print(table)
    out_console.print(
        f"* above the random-direction chance level; results.json, latents.safetensors and plot in {cfg.out}"
    )


@sae_app.command("shift")
def sae_shift(
    finetuned: Annotated[Path, typer.Option(help="Finetune run folder or adapter folder.")],
    sae: SaeOpt,
    out: OutOpt = Path("runs/sae-shift"),
    base: Annotated[str, typer.Option(help="Base model the adapters were trained on.")] = "gemma-3-270m",
    control: Annotated[Path | None, typer.Option(help="Control finetune run or adapter folder.")] = None,
    direction: Annotated[
        str | None, typer.Option(help="Direction to decompose the shift along (saved .safetensors, era, persona).")
    ] = None,
    prompts: Annotated[str, typer.Option(help="Unrelated prompts JSONL ({'prompt'}) or built-in name.")] = "unrelated",
    layer: SaeLayerOpt = None,
    k: Annotated[int, typer.Option(help="Top latents to report.")] = 20,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs (>= 100).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed for the bootstrap.")] = 0,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    dtype: DtypeOpt = "float32",
) -> None:
    """Which SAE latents a finetune moved on unrelated prompts (vs base and vs a control), and how much of
    its shift along a direction they carry."""
    from latentlab.sae import SAEShiftConfig, run_sae_shift

    cfg = SAEShiftConfig(
        finetuned=finetuned,
        sae=sae,
        out=out,
        base=base,
        control=control,
        direction=direction,
        prompts=prompts,
        layer=layer,
        k=k,
        n_boot=n_boot,
        seed=seed,
        device=device, device_map=device_map,
        dtype=dtype,
    )
    res = run_sae_shift(cfg, _command_line())
    table = Table(
        title=f"SAE latents moved most at layer {res.layer} (ranked by {res.primary}; "
        f"mean activation change \\[bootstrap 95% CI] over {res.meta['n_prompts']} prompts)"
    )
    table.add_column("rank", justify="right")
    table.add_column("latent", justify="right")
    if res.decoder_cos is not None:
        table.add_column(f"cos({res.direction})", justify="right")
    for label in res.comparisons:
        table.add_column(label, justify="right")
    table.add_column(f"firing {res.comparisons[0]}", justify="right")
    for row in res.top:
        cells = [str(row["rank"]), f"#{row['latent']}"]
        if res.decoder_cos is not None:
            cells.append(f"{row['decoder_cos']:+.2f}")
        cells += [_fmt_ci(row[c]["mean_change"], row[c]["ci"]) for c in res.comparisons]
        first = row[res.comparisons[0]]
        cells.append(f"{first['freq_before']:.2f} -> {first['freq_after']:.2f}")
        table.add_row(*cells)
    out_console.print(table)
    for label, dec in res.decomposition.items():
        out_console.print(
            f"{label}: projection on {res.direction} {_fmt_ci(dec['projection'], dec['projection_ci'])} = "
            f"top {res.k} latents {dec['top_k_term']:+.2f} + other latents {dec['other_latents_term']:+.2f} "
            f"+ SAE error {dec['error_term']:+.2f}"
        )
    if "warning" in res.meta:
        console.print(f"warning: {res.meta['warning']}")
    out_console.print(f"results.json, latent_shift.safetensors and plots in {cfg.out}")
