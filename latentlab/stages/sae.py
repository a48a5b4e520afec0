"""``latentlab sae train | latents | shift``: sparse-autoencoder latents (the library is :mod:`latentlab.sae`).

- ``sae train``: a small SAE (sae-lens' trainer) on every token's residual stream at one layer, in
  ``OUT/sae`` (sae-lens' format + a latentlab sidecar), with its statistics and loss curve.
- ``sae latents``: which latents write along a direction, against the chance level of random directions.
- ``sae shift``: which latents a finetune moved on unrelated prompts (against the base and a control),
  and how much of its shift along a direction they carry.

Every input that can be checked without a model (SAE folder, direction file, adapters, prompts) is
checked before a model loads or ``--out`` is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import AdapterOption, Context, ModelOptions, OutOptions, ScaleOption, Stage, option

SAE_HELP = (
    "SAE folder (`latentlab sae train` --out, or sae-lens' cfg.json + sae_weights.safetensors) "
    "or a pretrained release:sae_id (needs the hub)."
)
SAE_LAYER_HELP = "Layer (default: the SAE's own; must match it)."


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _fmt_ci(mean: float, ci: tuple[float, float] | list[float], digits: int = 2) -> str:
    return f"{mean:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


# --------------------------------------------------------------------------------------------
# latentlab sae train
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SAETrainRunConfig(ModelOptions, AdapterOption, OutOptions):
    """Train a small SAE (sae-lens) on every token's residual stream at one layer; writes OUT/sae.

    The SAE's hyper-parameters are this config's own fields (each one CLI option); they are checked,
    and handed to the trainer, as a :class:`latentlab.sae.SAETrainConfig` (:attr:`sae_config`).
    """

    command = "sae train"
    out: Path = option(help="Run folder to write (the SAE goes to OUT/sae).")
    layer: int = option(help="Layer whose residual stream (after the block) the SAE reads.")
    data: list[str] | None = option(
        None,
        help="Built-in name or JSONL, repeatable (default: unrelated). Prompt files are rendered as "
        "`latentlab shift` reads them; contrast pairs give both poles.",
    )
    architecture: str = option("topk", help="topk (sparsity set by --k) or standard (ReLU + L1).")
    d_sae: int | None = option(None, help="Number of latents (default: --expansion x d_model).")
    expansion: int = option(4, help="Latents per residual dimension when --d-sae is not given.")
    k: int = option(32, help="topk: active latents per token.")
    l1_coefficient: float = option(5.0, help="standard: L1 coefficient.", flags=("--l1",))
    steps: int = option(1000, help="Training steps.")
    batch_size: int = option(256, help="Tokens per step.")
    lr: float = option(
        1e-3, help="Adam learning rate (constant, then linear decay to 0 over the last 20% of steps)."
    )
    eval_fraction: float = option(0.1, help="Fraction of examples held out for the statistics.")
    seed: int = option(0, help="Seed (initialisation, data order, held-out split).")
    exclude_bos: bool = option(
        True, help="Leave the BOS position out (an attention sink with a huge norm, not content).", cli=False
    )

    def __post_init__(self) -> None:
        from latentlab.sae.training import SAETrainConfig

        data = ["unrelated"] if self.data is None else self.data
        self.data = [str(d) for d in ([data] if isinstance(data, (str, Path)) else data)]
        if not self.data:
            raise LatentlabError("no data to train the SAE on", "pass --data with a dataset name or JSONL file")
        self._sae = SAETrainConfig(
            architecture=self.architecture,  # type: ignore[arg-type]
            expansion=self.expansion,
            d_sae=self.d_sae,
            k=self.k,
            l1_coefficient=self.l1_coefficient,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            eval_fraction=self.eval_fraction,
            exclude_bos=self.exclude_bos,
            device=self.device,
        )
        super().__post_init__()

    @property
    def sae_config(self) -> Any:
        """The SAE's hyper-parameters as the trainer takes them (:class:`latentlab.sae.SAETrainConfig`)."""
        return self._sae


def run_sae_train_stage(cfg: SAETrainRunConfig, ctx: Context) -> Any:
    """Data files, model and layer are checked before ``cfg.out`` is touched; writes ``out/sae``
    (sae-lens format + sidecar), results.json (statistics, loss curve) and the loss plot."""
    from latentlab.data import read_jsonl
    from latentlab.io import write_json
    from latentlab.plots import loss_figure, save_figure
    from latentlab.sae.training import sae_texts, train_sae

    for src in cfg.data or []:
        read_jsonl(src)  # missing or empty files fail before a model loads
    model = ctx.load()
    layer = model.check_layers([cfg.layer])[0]
    examples, prov = sae_texts(model, cfg.data or [])
    run = ctx.start(seed=cfg.seed)
    res = train_sae(model, examples, layer, config=cfg.sae_config, out=run.out / "sae", meta=prov,
                    progress=ctx.progress)
    write_json(run.out / "results.json", {"stats": res.stats, "losses": res.losses, "sae": res.meta})
    fig = loss_figure([r["loss"] for r in res.losses], len(res.losses), f"SAE training loss, layer {layer}")
    fig.update_layout(yaxis_title="loss (MSE + sparsity/auxiliary, norm-scaled activations)")
    save_figure(fig, run.out, "loss")
    ctx.finish(results={"sae": str(res.path), "stats": res.stats})
    return res


def show_sae_train(res: Any, cfg: SAETrainRunConfig, console: Any) -> None:
    from rich.table import Table

    table = Table(
        title=f"SAE at layer {res.meta['layer']} of {res.meta['model']['name']}: "
        f"{res.meta['training']['d_sae']} latents ({cfg.architecture})"
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
    console.print(table)
    console.print(
        f"dead latents (never fire on any token): {res.stats['dead_fraction']:.1%}; loss "
        f"{res.stats['initial_loss']:.3g} -> {res.stats['final_loss']:.3g}; SAE -> {res.path}"
    )


# --------------------------------------------------------------------------------------------
# latentlab sae latents
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SAELatentsConfig(ModelOptions, OutOptions):
    """Which SAE latents write along a direction: decoder cosines, top latents, chance level.

    A saved direction is used as it is (no model loads); era, persona or a pair JSONL is fitted on
    --model first.
    """

    command = "sae latents"
    sae: str = option(help=SAE_HELP)
    direction: str = option(help="Saved direction .safetensors, or era, persona or a pair JSONL (fitted on --model).")
    out: Path = option(Path("runs/sae-latents"), help="Run folder to write.")
    layer: int | None = option(None, help=SAE_LAYER_HELP)
    k: int = option(10, help="Top latents to report on each side.")
    n_random: int = option(200, help="Random directions for the chance level of |cos| (>= 20).")
    seed: int = option(0, help="Seed for the random directions.")

    def __post_init__(self) -> None:
        from latentlab.directions import DirectionSpec
        from latentlab.sae.latents import MIN_RANDOM
        from latentlab.sae.loading import require_at_least

        self.sae, self.direction = str(self.sae), str(self.direction)
        require_at_least("k", self.k, 1, "--k")
        require_at_least("n_random", self.n_random, MIN_RANDOM, "--n-random")
        self._spec = DirectionSpec.parse(self.direction)
        super().__post_init__()


def run_sae_latents_stage(cfg: SAELatentsConfig, ctx: Context) -> Any:
    """Every input is checked before a model loads (only to fit the direction) or ``cfg.out`` is touched."""
    from latentlab.io import save_tensors, write_json
    from latentlab.plots import sae_direction_figure, save_figure
    from latentlab.sae.latents import direction_latents
    from latentlab.sae.loading import check_sae, load_sae, resolve_layer, unit_direction

    sae = load_sae(cfg.sae, device=cfg.device, layer=cfg.layer)
    layer = resolve_layer(sae, cfg.layer)
    spec = cfg._spec
    model = None
    if spec.saved is not None:
        unit_direction(spec.saved, layer, int(sae.cfg.d_in))
    else:
        model = ctx.load()
        model.check_layers([layer])
        check_sae(sae, layer=layer, d_model=model.d_model)
    run = ctx.start(seed=cfg.seed)
    d = spec.saved if model is None else spec.resolve(model, out=run.out, log=ctx.log)
    res = direction_latents(sae, d, layer, k=cfg.k, n_random=cfg.n_random, seed=cfg.seed)
    write_json(run.out / "results.json", res.to_dict())
    save_tensors(
        run.out / "latents",
        {"cosines": res.cosines, "encoder_cosines": res.encoder_cosines},
        {"layer": res.layer, "direction": res.direction, "sae": cfg.sae},
    )
    save_figure(sae_direction_figure(res), run.out, "direction_latents")
    ctx.finish(results={"layer": res.layer, "top_positive": res.top_positive[:3], "top_negative": res.top_negative[:3]})
    return res


def show_sae_latents(res: Any, cfg: SAELatentsConfig, console: Any) -> None:
    from rich.table import Table

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
    console.print(table)
    console.print(f"* above the random-direction chance level; results.json, latents.safetensors and plot in {cfg.out}")


# --------------------------------------------------------------------------------------------
# latentlab sae shift
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SAEShiftConfig(ModelOptions, ScaleOption, OutOptions):
    """Which SAE latents a finetune moved on unrelated prompts (vs base and vs a control), and how much of its
    shift along a direction they carry.

    --finetuned and --control are adapter folders or `latentlab finetune` run folders of --model (the
    base, also --base); both are applied in turn to the one loaded base, their LoRA difference times --scale.
    """

    command = "sae shift"
    finetuned: Path = option(help="Finetune run folder or adapter folder.")
    sae: str = option(help=SAE_HELP)
    out: Path = option(Path("runs/sae-shift"), help="Run folder to write.")
    control: Path | None = option(None, help="Control finetune run or adapter folder.")
    direction: str | None = option(
        None, help="Direction to decompose the shift along (saved .safetensors, era, persona)."
    )
    prompts: str = option("unrelated", help="Unrelated prompts JSONL ({'prompt'}) or built-in name.")
    layer: int | None = option(None, help=SAE_LAYER_HELP)
    k: int = option(20, help="Top latents to report.")
    n_boot: int = option(1000, help="Bootstrap resamples for the CIs (>= 100).")
    seed: int = option(0, help="Seed for the bootstrap.")

    def __post_init__(self) -> None:
        from latentlab.directions import DirectionSpec
        from latentlab.sae.loading import require_at_least
        from latentlab.sae.shift import MIN_BOOT

        self.sae, self.prompts = str(self.sae), str(self.prompts)
        require_at_least("k", self.k, 1, "--k")
        require_at_least("n_boot", self.n_boot, MIN_BOOT, "--n-boot")
        if self.direction is not None:
            self.direction = str(self.direction)
        self._spec = None if self.direction is None else DirectionSpec.parse(self.direction)
        super().__post_init__()


def run_sae_shift_stage(cfg: SAEShiftConfig, ctx: Context) -> Any:
    """Prompts, adapters, SAE and a saved direction are checked, and the base loaded, before ``cfg.out`` is touched."""
    from latentlab.data import load_prompts
    from latentlab.io import save_tensors, write_json
    from latentlab.models import resolve_adapter
    from latentlab.plots import latent_shift_figure, save_figure, shift_decomposition_figure
    from latentlab.sae.loading import check_sae, load_sae, resolve_layer, unit_direction
    from latentlab.sae.shift import analyze_latent_shift

    prompts = load_prompts(cfg.prompts)
    resolve_adapter(cfg.finetuned)
    if cfg.control is not None:
        resolve_adapter(cfg.control)
    sae = load_sae(cfg.sae, device=cfg.device, layer=cfg.layer)
    layer = resolve_layer(sae, cfg.layer)
    spec = cfg._spec
    if spec is not None and spec.saved is not None:
        unit_direction(spec.saved, layer, int(sae.cfg.d_in))
    base = ctx.load("base")
    base.check_layers([layer])
    check_sae(sae, layer=layer, d_model=base.d_model)
    run = ctx.start(seed=cfg.seed)
    d = None if spec is None else spec.resolve(base, out=run.out, log=ctx.log)
    res = analyze_latent_shift(
        base, cfg.finetuned, sae, prompts, d, cfg.control, layer,
        k=cfg.k, n_boot=cfg.n_boot, seed=cfg.seed, progress=ctx.progress, scale=cfg.scales()[0],
    )
    write_json(run.out / "results.json", res.to_dict())
    save_tensors(run.out / "latent_shift", res.tensors(), {"layer": res.layer, "comparisons": res.comparisons})
    save_figure(latent_shift_figure(res), run.out, "latent_shift")
    if res.decomposition:
        save_figure(shift_decomposition_figure(res), run.out, "decomposition")
    for role, info in res.meta["models"].items():
        ctx.record(role, info)
    ctx.finish(results={"layer": res.layer, "top": res.top[:5], "decomposition": res.decomposition})
    return res


def show_sae_shift(res: Any, cfg: SAEShiftConfig, console: Any) -> None:
    from rich.console import Console
    from rich.table import Table

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
    console.print(table)
    for label, dec in res.decomposition.items():
        console.print(
            f"{label}: projection on {res.direction} {_fmt_ci(dec['projection'], dec['projection_ci'])} = "
            f"top {res.k} latents {dec['top_k_term']:+.2f} + other latents {dec['other_latents_term']:+.2f} "
            f"+ SAE error {dec['error_term']:+.2f}"
        )
    if "warning" in res.meta:
        Console(stderr=True).print(f"warning: {res.meta['warning']}")  # as every warning: on stderr
    console.print(f"results.json, latent_shift.safetensors and plots in {cfg.out}")


STAGES = [
    Stage("sae train", SAETrainRunConfig, run_sae_train_stage, show_sae_train),
    Stage("sae latents", SAELatentsConfig, run_sae_latents_stage, show_sae_latents),
    Stage("sae shift", SAEShiftConfig, run_sae_shift_stage, show_sae_shift),
]
run_sae_train, run_sae_latents, run_sae_shift = STAGES
