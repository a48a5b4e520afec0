"""``latentlab steer``: a coefficient sweep of a direction on a battery, against random controls.

The layer is itself a measurement: without ``--layer`` it is chosen by a screen on a dev split of the
battery (:func:`latentlab.steering.choose_layer`) and the scores are reported on the other items, so
the choice does not inflate them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import AdapterOption, Context, ModelOptions, OutOptions, Stage, option
from latentlab.stages.direction import DIRECTION_HELP

if TYPE_CHECKING:
    from latentlab.direction import Direction
    from latentlab.steering import SweepResult

STEER_POSITIONS = ("all", "generated")


@dataclass(kw_only=True)
class SteerConfig(ModelOptions, AdapterOption, OutOptions):
    """Steer with a direction: battery score per coefficient vs a random control, and sample generations.

    Without --layer, the layer is chosen by a screen on every 4th battery item, and the scores are
    reported on the others. A direction fitted from pairs (era, persona, FILE.jsonl) is fitted on every
    layer, or reused from the fit cache.
    """

    command = "steer"
    direction: str = option("era", help=DIRECTION_HELP)
    out: Path = option(Path("runs/steer"), help="Run folder to write.")
    layer: str | None = option(
        None, help="Layer(s) to steer at, e.g. 12 or 10,12. Default: chosen by a layer screen."
    )
    # a comma-separated string on the CLI; __post_init__ makes it a list of floats (as recorded)
    coeffs: str = option("-1,-0.5,-0.25,0,0.25,0.5,1", help="Comma-separated alphas (x typical residual norm).")
    battery: str | None = option(None, help="A/B battery JSONL (default: the direction's built-in battery).")
    prompt: list[str] | None = option(None, help="Prompt for sample generations (repeatable).")
    positions: str = option("all", help="all or generated: where the vector is added.")
    n_random: int = option(1, help="Norm-matched random directions as control.")
    gen_alpha: float = option(0.25, help="|alpha| for the sample generations.")
    max_new_tokens: int = option(24, help="Tokens per sample generation.")
    seed: int = option(0, help="Seed for random controls and sampling.")
    refit: bool = option(False, help="Fit the direction and probes again (default: reuse the cache).")

    def __post_init__(self) -> None:
        from latentlab.config import (
            DEFAULT_BATTERY,
            check_choice,
            check_layer_spec,
            finite_float,
            finite_floats,
            nonnegative_int,
            positive_int,
        )
        from latentlab.directions import DirectionSpec

        self.coeffs = finite_floats(self.coeffs, "--coeffs")  # type: ignore[assignment]
        check_choice(self.positions, STEER_POSITIONS, "--positions")
        nonnegative_int("n_random", self.n_random)
        positive_int("max_new_tokens", self.max_new_tokens)
        self.gen_alpha = finite_float("gen_alpha", self.gen_alpha)
        check_layer_spec(self.layer, "--layer")
        self.prompt = [str(p) for p in self.prompt or []] or None
        self._spec = DirectionSpec.parse(self.direction)  # a bad name or saved file fails before a model loads
        self.direction = self._spec.text
        self.battery = self.battery or DEFAULT_BATTERY.get(self.direction)
        if self.battery is None:
            raise LatentlabError(f"no default battery for --direction {self.direction}", "pass --battery FILE.jsonl")
        self.battery = str(self.battery)
        super().__post_init__()


@dataclass
class SteerRun:
    """What ``latentlab steer`` measured: the sweep at the chosen layers, the screen, the generations."""

    sweep: SweepResult
    direction: Direction
    chosen_layers: list[int]
    layer_screen: dict[int, float] | None
    n_eval_items: int
    generations: list[dict[str, str]]
    gen_alphas: list[float]
    report: Any
    model: str
    out: Path


def run(cfg: SteerConfig, ctx: Context) -> SteerRun:
    """The battery is read (a saved direction was validated with the config) before a model loads; layers
    and width are checked, and the layer screen runs, before ``cfg.out`` is touched."""
    from latentlab.data import load_battery, render_prompt
    from latentlab.generation import generate
    from latentlab.interventions import Condition, Steer
    from latentlab.io import write_json
    from latentlab.models import parse_layers
    from latentlab.plots import layer_screen_figure, probe_accuracy_figure, save_figure, steering_figure
    from latentlab.stats import check_finite
    from latentlab.steering import DEFAULT_GENERATION_PROMPTS, candidate_layers, choose_layer, dev_eval_split, sweep

    say = ctx.log
    items = load_battery(cfg.battery)
    m = ctx.load()
    fixed = None if cfg.layer is None else m.check_layers(parse_layers(cfg.layer, m.n_layers))
    saved = cfg._spec.saved
    if saved is not None:
        saved.check(m, fixed or [])  # width, and the --layer it must have
    else:
        say(f"fitting the {cfg.direction} direction and probes on {m.info.name} ...")
    d, report = cfg._spec.resolve_with_probes(m, refit=cfg.refit, log=ctx.log)
    if fixed is not None:
        d.check(m, fixed)
    eval_items, screen, probe_acc = list(items), None, None
    if fixed is None:  # the screen runs before --out is touched: no candidate layer leaves it as it was
        if report is not None:
            probe_acc = [t if t is not None else c for t, c in zip(report.test_acc, report.cv_acc)]
        cands = [c for c in candidate_layers(m.n_layers, probe_acc) if c in d.layers]
        if cands:
            dev, ev = dev_eval_split(items)
            say(f"screening layers {cands} on {len(dev)} dev battery items "
                f"(reported scores use the other {len(ev)}) ...")
        choice = choose_layer(m, d, items, probe_acc)
        chosen, screen, eval_items = [choice.layer], choice.screen, choice.eval_items
    else:
        chosen = fixed
    run = ctx.start(seed=cfg.seed)
    if report is not None:
        d.save(run.out / "direction")
        report.save(run.out / "probes")
        title = f"{d.name} probe accuracy by layer ({m.info.name})"
        save_figure(probe_accuracy_figure(report, title), run.out, "probe_accuracy")
    if screen is not None:
        save_figure(
            layer_screen_figure(
                list(screen), list(screen.values()), [probe_acc[c] for c in screen] if probe_acc else None, chosen[0]
            ),
            run.out,
            "layer_screen",
        )
        say(f"chosen layer {chosen[0]} (largest score(+0.5) - score(-0.5) on dev items: {screen[chosen[0]]:+.3f})")
    coeffs: list[float] = cfg.coeffs  # type: ignore[assignment]
    mode: Any = cfg.positions
    result = sweep(m, d, eval_items, chosen, coeffs, n_random=cfg.n_random, mode=mode, seed=cfg.seed)
    check_finite(result.scores, "battery scores", "steer")
    check_finite(result.random_scores, "random-direction battery scores", "steer")
    gen_prompts = cfg.prompt or list(DEFAULT_GENERATION_PROMPTS)
    steer_obj = Steer.from_direction(d, chosen, mode)
    gconds: list[Condition] = [(steer_obj, -cfg.gen_alpha), (None, 0.0), (steer_obj, cfg.gen_alpha)]
    rendered = [render_prompt(p, m.tokenizer) for p in gen_prompts]
    gens = generate(m, rendered, gconds, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    generations = [
        {"prompt": p, **{f"alpha={a:+g}": gens[c][i] for c, (_, a) in enumerate(gconds)}}
        for i, p in enumerate(gen_prompts)
    ]
    results = {
        **result.to_dict(),
        "model": m.info.to_dict(),
        "battery": cfg.battery,
        "n_eval_items": len(eval_items),
        "layer_screen": screen,
        "chosen_layers": chosen,
        "direction_meta": d.meta,
        "probes": report.to_dict() if report else None,
        "generations": generations,
    }
    write_json(run.out / "results.json", results)
    save_figure(
        steering_figure(result, f"Steering {d.name} at layer {','.join(map(str, chosen))} ({m.info.name})"),
        run.out,
        "steering",
    )
    ctx.finish(results={"chosen_layers": chosen, "table": result.table()})
    return SteerRun(
        result, d, chosen, screen, len(eval_items), generations, [a for _, a in gconds], report, m.info.name, run.out
    )


def show(res: SteerRun, cfg: SteerConfig, console: Any) -> None:
    from rich.table import Table

    from latentlab.plots import png_available

    name, layers = res.direction.name, ",".join(map(str, res.chosen_layers))
    table = Table(
        title=f"{name} steering at layer {layers} on {res.model}: "
        f"battery score (mean over {res.n_eval_items} items, bootstrap 95% CI)"
    )
    for col in ("alpha", f"{name} direction", "random direction"):
        table.add_column(col, justify="right")
    for row in res.sweep.table():
        r = f"{row['random']:.3f} [{row['random_ci'][0]:.2f}, {row['random_ci'][1]:.2f}]" if "random" in row else "-"
        table.add_row(f"{row['alpha']:+g}", f"{row['score']:.3f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}]", r)
    console.print(table)
    gt = Table(title="sample generations (greedy)", show_lines=True)
    gt.add_column("prompt", max_width=28)
    for a in res.gen_alphas:
        gt.add_column(f"alpha {a:+g}", max_width=36)
    for g in res.generations:
        gt.add_row(g["prompt"], *[g[f"alpha={a:+g}"].strip() for a in res.gen_alphas])
    console.print(gt)
    kinds = "HTML/PNG" if png_available() else "HTML"
    console.print(f"results.json, direction, probes and plots ({kinds}) in {res.out}")


STAGE = Stage("steer", SteerConfig, run, show)
run_steer = STAGE
