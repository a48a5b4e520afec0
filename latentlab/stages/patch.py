"""``latentlab patch``: activation patching, layer x position, of a finetune into its base (or of clean
prompts into corrupted ones), with a direction-only grid against a random-direction control.

The algorithm (batched patch grids, position classes, normalised effects) is :mod:`latentlab.patching`;
this stage reads the battery, the adapter and the direction, runs the grids and writes the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, ModelOptions, OutOptions, Stage, option

if TYPE_CHECKING:
    from latentlab.patching import PatchResult

COMPONENTS = ("resid", "attn", "mlp")


@dataclass(kw_only=True)
class PatchConfig(ModelOptions, OutOptions):
    """Activation patching, layer x position: finetuned -> base (or clean -> corrupted prompts).

    Model-to-model: --finetuned (a finetune run or adapter folder of the model) is patched into the base (--reverse:
    the base into the finetune). Prompt pairs: --clean-prefix and --corrupt-prefix on the one model. Effects are
    normalised so 0 is the target run and 1 the source run; with --direction, a second grid patches only the
    component along that direction, next to a random direction as the control.
    """

    command = "patch"
    out: Path = option(Path("runs/patch"), help="Run folder to write.")
    model: str = option("gemma-3-270m", help="Base model (target run).", flags=("--base", "--model", "-m"))
    finetuned: Path | None = option(None, help="Finetune run or adapter folder (source run).")
    battery: str = option("era", help="era, persona or an A/B battery JSONL.")
    direction: str | None = option(None, help="Also patch only along this direction (era, persona, FILE).")
    reverse: bool = option(False, help="Patch base activations into the finetuned run instead.")
    clean_prefix: str | None = option(None, help="Prompt-pair mode: prefix of the clean (source) prompts.")
    corrupt_prefix: str | None = option(None, help="Prompt-pair mode: prefix of the corrupted (target) prompts.")
    layers: str = option("all", help="e.g. all or 0-10.")
    # a comma-separated string on the CLI; a list of position classes once checked (so the manifest holds a list)
    positions: str = option("all,prompt,-1,-2,-3,-4", help="Position classes: all, prompt, -1, -2, ...")
    component: str = option("resid", help="resid, attn or mlp output.")
    n_items: int = option(24, help="Battery items to use (the first N).")
    seed: int = option(0, help="Seed for the random-direction control.")

    def __post_init__(self) -> None:
        from latentlab.config import check_choice, check_layer_spec, positive_int
        from latentlab.directions import DirectionSpec
        from latentlab.patching import check_positions

        p = self.positions
        self.positions = check_positions(p.split(",") if isinstance(p, str) else [str(x) for x in p])  # type: ignore[assignment]
        check_choice(self.component, COMPONENTS, "--component", "component")
        positive_int("n_items", self.n_items)
        check_layer_spec(self.layers)
        pair_mode = self.clean_prefix is not None or self.corrupt_prefix is not None
        if pair_mode and (self.clean_prefix is None or self.corrupt_prefix is None):
            raise LatentlabError("prompt-pair patching needs both --clean-prefix and --corrupt-prefix", "pass both")
        if not pair_mode and self.finetuned is None:
            raise LatentlabError(
                "nothing to patch from", "pass --finetuned DIR, or --clean-prefix and --corrupt-prefix"
            )
        self._spec = None if self.direction is None else DirectionSpec.parse(self.direction)
        super().__post_init__()

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
    out: Path


def run(cfg: PatchConfig, ctx: Context) -> PatchRun:
    """Battery, adapter and a saved direction are read before the base loads; layers and direction are
    checked before ``cfg.out`` is touched."""
    from latentlab.config import DEFAULT_BATTERY
    from latentlab.data import load_battery
    from latentlab.io import write_json
    from latentlab.models import resolve_adapter
    from latentlab.patching import patch_grid, prefixed
    from latentlab.plots import patch_heatmap_figure, patch_modes_figure, save_figure
    from latentlab.stats import check_finite

    items = load_battery(DEFAULT_BATTERY.get(cfg.battery, cfg.battery))[: cfg.n_items]
    adapter = None if cfg.pair_mode else resolve_adapter(cfg.finetuned)
    pos = list(cfg.positions)
    m = ctx.load("base")
    layer_list = m.check_layers(cfg.layers)
    d = None
    if cfg._spec is not None:
        d = cfg._spec.resolve(m, log=ctx.log).check(m, layer_list)
    run = ctx.start(seed=cfg.seed)
    run.config["n_items"] = len(items)  # the manifest records the items used (the first n_items of the battery)
    if d is not None and cfg._spec is not None and cfg._spec.saved is None:
        d.save(run.out / f"direction-{d.name}")
    src, tgt, src_items, tgt_items = None, m, None, items
    if cfg.pair_mode:
        src_items, tgt_items = prefixed(items, cfg.clean_prefix or ""), prefixed(items, cfg.corrupt_prefix or "")
        labels = ("clean prompt", "corrupted prompt")
    else:
        ft = m.with_adapter(adapter)  # type: ignore[arg-type]  # one base in memory, LoRA switched on
        ctx.record("finetuned", ft)
        src, tgt = (m, ft) if cfg.reverse else (ft, m)
        labels = ("base", "finetuned") if cfg.reverse else ("finetuned", "base")
    component = cfg.component
    full = patch_grid(
        tgt, tgt_items, source=src, source_items=src_items, layers=layer_list, positions=pos,
        component=component, seed=cfg.seed, progress=ctx.progress,  # type: ignore[arg-type]
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
            direction=d, component=component, seed=cfg.seed, progress=ctx.progress,  # type: ignore[arg-type]
        )
        check_finite(along.score, "the direction-only patched scores", "patch")
        results["direction_only"] = along.to_dict()
        parts.append(along)
    save_figure(patch_modes_figure(parts, "all" if "all" in pos else pos[0]), run.out, "by_layer")
    write_json(run.out / "results.json", results)
    ctx.finish(results={"target_score": full.target_score, "source_score": full.source_score})
    return PatchRun(full, along, labels[0], labels[1], layer_list, run.out)


def show(res: PatchRun, cfg: PatchConfig, console: Any) -> None:
    from rich.table import Table

    full, src, tgt, pos = res.full, res.source, res.target, cfg.positions
    console.print(
        f"battery score: {tgt} (target) {full.target_score:.3f}, {src} (source) "
        f"{full.source_score:.3f}" + ("  [gap < 0.02: normalised effects are noise]" if full.meta["small_gap"] else "")
    )
    table = Table(title=f"normalised effect by layer (0 = {tgt}, 1 = {src})")
    table.add_column("layer", justify="right")
    for p in pos:
        table.add_column(f"full@{p}", justify="right")
    a = res.along
    if a is not None:
        for p in a.positions:
            table.add_column(f"dir@{p}", justify="right")
            table.add_column(f"rand@{p}", justify="right")
    for li, layer in enumerate(res.layers):
        cells = [f"{float(full.effect[0, li, pi]):+.2f}" for pi in range(len(pos))]
        if a is not None:
            for pi in range(len(a.positions)):
                cells += [f"{float(a.effect[0, li, pi]):+.2f}", f"{float(a.effect[1, li, pi]):+.2f}"]
        table.add_row(str(layer), *cells)
    console.print(table)
    console.print(f"results.json, heatmap and by-layer plots in {res.out}")


STAGE = Stage("patch", PatchConfig, run, show)
run_patch = STAGE
