"""``latentlab direction`` and ``latentlab probe``: fit a direction from contrast pairs, and probe it by layer.

Both fit from one collection of the pairs (train split: the direction; held-out split: the probes'
test accuracy), so they share their config and their first half.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import AdapterOption, Context, ModelOptions, OutOptions, Stage, option

METHODS = ("mean_diff", "pca")
FIT_POSITIONS = ("last", "mean")
DIRECTION_HELP = "era, persona, a contrast-pair JSONL, or a saved direction .safetensors."


@dataclass(kw_only=True)
class DirectionConfig(ModelOptions, AdapterOption, OutOptions):
    """Fit a direction (difference of means per layer) from contrast pairs; writes OUT/direction.safetensors."""

    command = "direction"
    direction: str = option("era", help=DIRECTION_HELP)
    out: Path = option(Path("runs/direction"), help="Run folder to write.")
    layers: str = option("all", help="e.g. 0,6,12 or all.")
    position: str = option("last", help="last or mean (pairs with a prompt use the response mean).")
    method: str = option("mean_diff", help="mean_diff or pca.")

    def __post_init__(self) -> None:
        from latentlab.config import check_choice, check_layer_spec
        from latentlab.directions import DirectionSpec

        check_choice(self.method, METHODS, "--method", "method")
        check_choice(self.position, FIT_POSITIONS, "--position", "position")
        check_layer_spec(self.layers)
        if Path(str(self.direction)).suffix == ".safetensors":
            raise LatentlabError(
                "--direction is a saved direction; this command fits one", "pass era, persona or a pair FILE.jsonl"
            )
        self.direction = str(self.direction)
        self._spec = DirectionSpec.parse(self.direction)
        super().__post_init__()


@dataclass(kw_only=True)
class ProbeConfig(DirectionConfig):
    """Fit a logistic-regression probe per layer; k-fold and held-out accuracy, plot by layer."""

    command = "probe"
    out: Path = option(Path("runs/probe"), help="Run folder to write.")
    position: str = option("last", help="last or mean.")
    method: str = option("mean_diff", help="mean_diff (probes are fitted on the mean-difference collection).",
                         cli=False)
    test: Path | None = option(None, help="Extra contrast-pair JSONL to score the fitted probes on.")

    def __post_init__(self) -> None:
        from latentlab.data import load_pairs

        super().__post_init__()
        self._extra = load_pairs(self.test) if self.test is not None else None


@dataclass
class FitRun:
    """A fitted direction and its probes, and the run folder they were written to."""

    direction: Any
    report: Any
    out: Path
    model: str
    results: dict[str, Any] = field(default_factory=dict)


def _fit(cfg: DirectionConfig, ctx: Context) -> tuple[Any, Any, Any]:
    from latentlab.directions import direction_and_probes
    from latentlab.stats import check_finite

    m = ctx.load()
    layers = m.check_layers(cfg.layers)
    d, report = direction_and_probes(m, cfg._spec.text, layers, cfg.position, cfg.method,  # type: ignore[arg-type]
                                     progress=ctx.progress)
    check_finite(d.vectors, "the direction vectors", cfg.command)
    ctx.start()
    return m, d, report


def run_direction_stage(cfg: DirectionConfig, ctx: Context) -> FitRun:
    m, d, report = _fit(cfg, ctx)
    assert ctx.run is not None
    d.save(ctx.run.out / "direction")
    results = {"layers": d.layers, "norms": d.vectors.norm(dim=-1).tolist(), "best_probe_layer": report.best_layer}
    ctx.finish(results=results)
    return FitRun(d, report, ctx.run.out, m.info.name, results)


def run_probe_stage(cfg: ProbeConfig, ctx: Context) -> FitRun:
    from latentlab.directions import collect_pairs
    from latentlab.io import write_json
    from latentlab.plots import probe_accuracy_figure, save_figure

    m, d, report = _fit(cfg, ctx)
    assert ctx.run is not None
    out = ctx.run.out
    results = report.to_dict()
    if cfg._extra is not None:
        ep, en = collect_pairs(m, cfg._extra, d.layers, cfg.position)
        results["user_test"] = [{"layer": layer, "acc": a, "ci": ci}
                                for layer, (a, ci) in zip(d.layers, report.score(ep, en))]
    report.save(out / "probes")
    write_json(out / "results.json", results)
    save_figure(probe_accuracy_figure(report, f"{d.name} probe accuracy by layer ({m.info.name})"), out,
                "probe_accuracy")
    ctx.finish(results={"best_layer": report.best_layer})
    return FitRun(d, report, out, m.info.name, results)


def show_direction(res: FitRun, cfg: DirectionConfig, console: Any) -> None:
    d = res.direction
    console.print(f"{d.name} direction over {len(d.layers)} layers -> {res.out / 'direction.safetensors'}"
                  f" (best held-out probe layer {res.report.best_layer})")


def probe_table(report: Any) -> Any:
    """Probe accuracy by layer as a rich table (k-fold and held-out, 95% Wilson intervals)."""
    from rich.table import Table

    table = Table(title="probe accuracy by layer (95% Wilson CI)")
    for col in ("layer", "k-fold CV", "held-out test"):
        table.add_column(col, justify="right")
    for i, layer in enumerate(report.layers):
        cv = f"{report.cv_acc[i]:.2f} [{report.cv_ci[i][0]:.2f}, {report.cv_ci[i][1]:.2f}]"
        t = report.test_acc[i]
        ts = f"{t:.2f} [{report.test_ci[i][0]:.2f}, {report.test_ci[i][1]:.2f}]" if t is not None else "-"
        table.add_row(str(layer), cv, ts)
    return table


def show_probe(res: FitRun, cfg: ProbeConfig, console: Any) -> None:
    console.print(probe_table(res.report))
    console.print(f"best held-out layer: {res.report.best_layer}; results, probes and plot in {res.out}")


STAGES = [
    Stage("direction", DirectionConfig, run_direction_stage, show_direction),
    Stage("probe", ProbeConfig, run_probe_stage, show_probe),
]
run_direction, run_probe = STAGES
