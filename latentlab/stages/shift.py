"""``latentlab shift`` and ``latentlab screen``: how far a finetune moved activations along a direction,
and how far its training examples push along it before any training.

Both take a direction the same way (a saved one checked on every layer of the model, a pair source
fitted on every layer through the fit cache and saved into the run folder, so the run is
self-contained), and both are measurements of :mod:`latentlab.shift`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, FinetuneBaseOptions, ModelOptions, OutOptions, Stage, option
from latentlab.stages.direction import DIRECTION_HELP

if TYPE_CHECKING:
    from latentlab.direction import Direction
    from latentlab.models import LoadedModel
    from latentlab.shift import ShiftResult


def _parse_direction(cfg: ShiftConfig | ScreenConfig) -> None:
    """Read the --direction now (a saved one loaded and validated): a bad one fails before a model loads."""
    from latentlab.directions import DirectionSpec

    cfg._spec = DirectionSpec.parse(cfg.direction)
    cfg.direction = cfg._spec.text


def _direction(cfg: ShiftConfig | ScreenConfig, ctx: Context, m: LoadedModel) -> Direction:
    """The direction on ``m``, with every layer of it (a saved one is checked before anything is fitted)."""
    if cfg._spec.saved is not None:
        cfg._spec.saved.check(m)
    return cfg._spec.resolve(m, log=ctx.log)


def _keep_fitted(cfg: ShiftConfig | ScreenConfig, d: Direction, out: Path) -> None:
    """A direction fitted for this run is saved in its folder (a saved one is already a file)."""
    if cfg._spec.saved is None:
        d.save(out / f"direction-{d.name}")


@dataclass(kw_only=True)
class ShiftConfig(FinetuneBaseOptions, OutOptions):
    """Per-layer shift of finetuned (and control) models along a direction on unrelated prompts.

    A finetune moves activations in every direction, so each projection is placed among --n-random
    random unit directions (z-score and percentile). Each finetune is also compared with each control
    on the same prompts (finetuned - control): without it, a shared format shift reads as an effect of
    the direction.

    --scale 0,0.5,1,2,4 measures every finetune and control again with its LoRA difference times each
    factor (amplification: 0 is the base, 1 as trained, 2 twice the change), as finetuned@x2 and
    control@x2, each finetune against each control at the same factor, and the battery per factor.
    """

    command = "shift"
    several_scales = True
    finetuned: list[Path] = option(help="Finetune run folder(s) or adapter folder(s) (repeatable).")
    out: Path = option(Path("runs/shift"), help="Run folder to write.")
    control: list[Path] | None = option(None, help="Control finetune folder(s) (repeatable).")
    direction: str = option("era", help=DIRECTION_HELP)
    prompts: str = option("unrelated", help="Unrelated prompts JSONL ({'prompt'}) or built-in name.")
    battery: str | None = option(None, help="A/B battery (default: the direction's).")
    checkpoints: bool = option(False, help="Analyse every checkpoint of the (single) finetune run.")
    n_random: int = option(100, help="Random unit directions for the percentile.")
    seed: int = option(0, help="Seed for random directions and bootstrap.")

    def __post_init__(self) -> None:
        from latentlab.config import DEFAULT_BATTERY, positive_int

        one = (str, Path)
        self.finetuned = [Path(f) for f in ([self.finetuned] if isinstance(self.finetuned, one) else self.finetuned)]
        self.control = [Path(c) for c in ([self.control] if isinstance(self.control, one) else self.control or [])]
        if not self.finetuned:
            raise LatentlabError("no --finetuned folder", "pass --finetuned with a finetune run or adapter folder")
        if self.checkpoints and len(self.finetuned) != 1:
            raise LatentlabError("--checkpoints takes exactly one --finetuned run", "pass one finetune run folder")
        positive_int("n_random", self.n_random)
        if self.n_random < 20:
            raise LatentlabError(
                f"--n-random {self.n_random} is too few for a percentile", "pass --n-random 20 or more (default 100)"
            )
        names = [p.name for p in self.finetuned] + [p.name for p in self.control]
        if len(names) > 1:
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise LatentlabError(
                    f"two --finetuned or --control folders share the name {', '.join(dup)}, so their results "
                    "would overwrite each other",
                    "give each run folder its own name",
                )
        _parse_direction(self)
        self.battery = self.battery or DEFAULT_BATTERY.get(self.direction)
        super().__post_init__()

    def labels(self) -> tuple[dict[str, Path], dict[str, Path]]:
        """``({label: adapter}, {label: adapter})`` of the finetunes and controls (folders checked)."""
        from latentlab.models import resolve_adapter
        from latentlab.shift import checkpoint_adapters

        if self.checkpoints:
            models = checkpoint_adapters(self.finetuned[0])
        else:
            many = len(self.finetuned) > 1
            models = {f"finetuned:{f.name}" if many else "finetuned": resolve_adapter(f) for f in self.finetuned}
        many = len(self.control or []) > 1
        ctrls = {f"control:{c.name}" if many else "control": resolve_adapter(c) for c in self.control or []}
        return models, ctrls


def run_shift_stage(cfg: ShiftConfig, ctx: Context) -> ShiftResult:
    """Prompts, battery and adapters are read before the base loads; the direction is checked on the base
    (width, every layer) before ``cfg.out`` is touched."""
    from latentlab.data import load_battery, load_prompts
    from latentlab.io import write_json
    from latentlab.plots import amplification_figure, battery_figure, cosine_figure, save_figure, shift_figure
    from latentlab.shift import analyze_shift
    from latentlab.stats import check_finite

    plist = load_prompts(cfg.prompts)
    items = load_battery(cfg.battery) if cfg.battery else None
    models, ctrls = cfg.labels()
    m = ctx.load("base")
    d = _direction(cfg, ctx, m)
    run = ctx.start(seed=cfg.seed)
    _keep_fitted(cfg, d, run.out)
    res = analyze_shift(m, models, d, plist, items, controls=ctrls, n_random=cfg.n_random, seed=cfg.seed,
                        progress=ctx.progress, scales=cfg.scales())
    for label, st in res.stats.items():
        check_finite(st["projection"], f"the projections of {label}", "shift")
    for label, b in res.battery.items():
        check_finite(b["score"], f"the battery score of {label}", "shift")
    write_json(run.out / "results.json", res.to_dict())
    save_figure(shift_figure(res), run.out, "shift")
    save_figure(cosine_figure(res), run.out, "cosine")
    if res.battery:
        save_figure(battery_figure(res.battery, f"{d.name} battery score by model"), run.out, "battery")
    if "scales" in res.meta:
        save_figure(amplification_figure(res), run.out, "amplification")
    labels = [*models, *ctrls]
    ctx.finish(results={"labels": labels if cfg.scales() == [1.0] else
                        [n for by in res.meta["by_scale"].values() for k, n in by.items() if k in labels]})
    return res


def show_shift(res: ShiftResult, cfg: ShiftConfig, console: Any) -> None:
    from rich.table import Table

    table = Table(
        title=f"shift along {res.direction} (mean projection [95% CI], z vs {cfg.n_random} random directions)"
    )
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
    console.print(table)
    if res.battery:
        console.print(
            "battery: "
            + ", ".join(f"{k} {v['score']:.3f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" for k, v in res.battery.items())
        )
    for key, v in res.meta.get("battery_paired", {}).items():
        console.print(f"battery, {key}: {v['score']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]")
    console.print(f"results.json and plots in {cfg.out}")


@dataclass(kw_only=True)
class ScreenConfig(ModelOptions, OutOptions):
    """Score training examples by how far they push along a direction, before any training.

    An example's score is the projection of its response's activations minus that of the model's own
    answer to the same prompt (as in Persona Vectors), so a dataset can be screened before a finetune
    is paid for.
    """

    command = "screen"
    data: str = option(help="Finetuning data (built-in name or chat JSONL).")
    out: Path = option(Path("runs/screen"), help="Run folder to write.")
    direction: str = option("era", help=DIRECTION_HELP)
    layer: int | None = option(None, help="Layer to rank examples at (default: middle layer).")
    top: int = option(8, help="How many top/bottom examples to print.")

    def __post_init__(self) -> None:
        from latentlab.config import nonnegative_int

        self.data = str(self.data)
        _parse_direction(self)
        nonnegative_int("top", self.top)
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise LatentlabError(f"--layer must be an integer, got {self.layer!r}", "pass e.g. --layer 9")
        super().__post_init__()


@dataclass
class ScreenRun:
    """The screen's results (``results.json``) and where examples were ranked."""

    results: dict[str, Any]
    layer: int
    order: list[int]
    scores: list[float]
    direction: str
    out: Path


def run_screen_stage(cfg: ScreenConfig, ctx: Context) -> ScreenRun:
    """The data is read before a model loads; the layer and the direction (width, every layer) are checked
    before the screen runs or ``cfg.out`` is touched."""
    from latentlab.data import load_chats
    from latentlab.io import write_json
    from latentlab.plots import save_figure, screen_figure
    from latentlab.shift import screen_dataset
    from latentlab.stats import check_finite

    chats = load_chats(cfg.data)
    m = ctx.load()
    li = m.check_layers([cfg.layer if cfg.layer is not None else m.n_layers // 2])[0]
    d = _direction(cfg, ctx, m)
    run = ctx.start()
    _keep_fitted(cfg, d, run.out)
    res = screen_dataset(m, chats, d, progress=ctx.progress)
    check_finite(res["per_example"], "the per-example projection differences", "screen")
    col = d.layers.index(li)
    scores = [row[col] for row in res["per_example"]]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    res["ranked_at_layer"] = li
    res["ranking"] = [
        {
            "score": scores[i],
            "prompt": res["prompts"][i],
            "response": res["responses"][i],
            "own_response": res["own_responses"][i],
        }
        for i in order
    ]
    write_json(run.out / "results.json", res)
    save_figure(
        screen_figure({cfg.data: res}, f"{cfg.data}: push along {d.name} before training ({m.info.name})"),
        run.out,
        "screen",
    )
    ctx.finish(results={"layer": li, "dataset_mean": res["mean"][col], "ci": res["ci"][col]})
    return ScreenRun(res, li, order, scores, d.name, run.out)


def show_screen(res: ScreenRun, cfg: ScreenConfig, console: Any) -> None:
    from rich.table import Table

    r, li, col = res.results, res.layer, res.results["layers"].index(res.layer)
    lo, hi = r["ci"][col]
    console.print(f"{cfg.data}: mean projection difference at layer {li}: {r['mean'][col]:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    t = Table(title=f"examples pushing most (+) and least (-) along {res.direction} at layer {li}")
    for c in ("score", "response", "model's own"):
        t.add_column(c)
    for i in res.order[: cfg.top] + res.order[-cfg.top :]:
        t.add_row(f"{res.scores[i]:+.1f}", r["responses"][i][:40], r["own_responses"][i][:40])
    console.print(t)


STAGES = [
    Stage("shift", ShiftConfig, run_shift_stage, show_shift),
    Stage("screen", ScreenConfig, run_screen_stage, show_screen),
]
run_shift, run_screen = STAGES
