"""``latentlab ablate``: does a direction carry a finetune's behaviour? Its battery gain with the direction
ablated in the base, the finetune and the control, against random directions.

The measurement (both models ablated, paired bootstrap, the random-direction distribution, ``mean``
mode) is :mod:`latentlab.ablation`; this stage checks everything it can before the base loads (the
adapters, the saved direction's layers, the battery), switches each finetune's LoRA on the one loaded
base, and writes results.json, the plot and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, FinetunedOptions, OutOptions, Stage, option

if TYPE_CHECKING:
    from latentlab.ablation import AblationResult

MODES = ("project", "mean")
MIN_BOOT = 100


@dataclass(kw_only=True)
class AblateConfig(FinetunedOptions, OutOptions):
    """Ablate a direction in the base, the finetune and the control: how much of the finetune's battery gain does
    it remove, against random directions?

    --finetuned and --control are adapter folders or `latentlab finetune` run folders of the model. --direction is a
    saved .safetensors (checked before the model loads), or era, persona or a pair JSONL fitted on the model.
    """

    command = "ablate"
    out: Path = option(Path("runs/ablate"), help="Run folder to write.")
    direction: str = option("era", help="era, persona, a contrast-pair JSONL, or a saved direction .safetensors.")
    layers: str = option("all", help="Layers to ablate at: all, or e.g. 8-17 or 10,12.")
    mode: str = option("project", help="project (remove the component) or mean (set it to the base's mean).")
    n_random: int = option(10, help="Random unit directions for the chance level (>= 10).")
    battery: str | None = option(None, help="A/B battery (default: the direction's).")
    seed: int = option(0, help="Seed for the random directions and the bootstrap.")
    n_boot: int = option(1000, help="Bootstrap resamples over items (>= 100).")
    batch_size: int = option(32, help="Battery sequences per forward pass.", cli=False)

    def __post_init__(self) -> None:
        from latentlab.ablation import MIN_RANDOM, check_same_base
        from latentlab.config import DEFAULT_BATTERY, check_layer_spec
        from latentlab.data import load_battery
        from latentlab.directions import DirectionSpec
        from latentlab.models import resolve_adapter

        self.layers = str(self.layers)
        if self.mode not in MODES:
            raise LatentlabError(f"unknown --mode {self.mode!r}", "use --mode project or --mode mean")
        if self.n_random < MIN_RANDOM:
            raise LatentlabError(
                f"--n-random {self.n_random} is too few random directions for a distribution",
                f"use --n-random {MIN_RANDOM} or more",
            )
        if self.n_boot < MIN_BOOT:
            raise LatentlabError(f"--n-boot {self.n_boot} is too few resamples", f"use --n-boot {MIN_BOOT} or more")
        check_layer_spec(self.layers)  # the syntax now; the range once the model's depth is known
        ft = resolve_adapter(Path(self.finetuned))
        if self.control is not None:
            check_same_base(ft, resolve_adapter(Path(self.control)))
        self._spec = DirectionSpec.parse(self.direction)
        self._check_saved_layers()
        name = self._spec.saved.name if self._spec.saved is not None else str(self.direction)
        self.battery = self.battery or DEFAULT_BATTERY.get(name)
        if self.battery is None:
            raise LatentlabError(
                f"no default battery for the {name} direction", "pass --battery (an A/B JSONL or a built-in name)"
            )
        self._items = load_battery(self.battery)
        super().__post_init__()

    def _check_saved_layers(self) -> None:
        """A saved direction must cover the layers asked for (known now, before the model's depth is)."""
        from latentlab.models import parse_layers

        d = self._spec.saved
        if d is None or self.layers.strip() == "all":
            return
        want = parse_layers(self.layers, max(d.layers) + 1)
        missing = [layer for layer in want if layer >= 0 and layer not in d.layers]
        if missing:
            raise LatentlabError(
                f"the {d.name} direction in {self.direction} lacks layer(s) {', '.join(map(str, missing[:8]))} "
                f"(has {d.layers[0]}-{d.layers[-1]})",
                "choose --layers the direction has, or refit it with --layers all",
            )


def run(cfg: AblateConfig, ctx: Context) -> AblationResult:
    """Everything checkable is checked (config, base load, layers, direction layers, adapters' base) before
    ``cfg.out`` is touched; a pair-source direction is fitted once the run folder exists and saved into it."""
    from latentlab.ablation import STAGE, ablate
    from latentlab.io import write_json
    from latentlab.models import resolve_adapter
    from latentlab.plots import ablation_figure, save_figure

    base = ctx.load("base")
    layers = base.check_layers(cfg.layers)
    if cfg._spec.saved is not None:
        cfg._spec.saved.check(base, layers)
    # Views refuse an adapter of another base (recorded fingerprint) before the run folder exists.
    ft = base.with_adapter(cfg.finetuned, label=f"{STAGE}:finetuned:{resolve_adapter(cfg.finetuned).resolve()}",
                           scale=cfg.scales()[0])
    ctx.record("finetuned", ft)
    ctrl = None
    if cfg.control is not None:
        ctrl = base.with_adapter(cfg.control, label=f"{STAGE}:control:{resolve_adapter(cfg.control).resolve()}",
                                 scale=cfg.scales()[0])
        ctx.record("control", ctrl)
    run = ctx.start(seed=cfg.seed)
    d = cfg._spec.resolve(base, out=run.out, log=ctx.log)
    res = ablate(
        base, ft, d, cfg._items, control=ctrl, layers=layers, mode=cfg.mode,  # type: ignore[arg-type]
        n_random=cfg.n_random, seed=cfg.seed, n_boot=cfg.n_boot, batch_size=cfg.batch_size, progress=ctx.progress,
    )
    write_json(run.out / "results.json", res.to_dict())
    save_figure(ablation_figure(res), run.out, "ablation")
    summary = {ref: {k: f[k] for k in ("gain", "fraction", "fraction_ci")} for ref, f in res.fractions.items()}
    ctx.finish(results=summary)
    return res


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.0%}"


def show(res: AblationResult, cfg: AblateConfig, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"battery score with the {res.direction} direction ablated ({res.mode}, layers "
                  f"{res.layers[0]}-{res.layers[-1]}; bootstrap 95% CI over {res.meta['n_items']} items)")
    for col in ("model", "no ablation", "ablated", f"{res.meta['n_random']} random (mean)"):
        table.add_column(col, justify="right")
    for name, s in res.scores.items():
        r = s["random_ablated"]
        table.add_row(
            name,
            f"{s['plain']['score']:.3f} [{s['plain']['ci'][0]:.2f}, {s['plain']['ci'][1]:.2f}]",
            f"{s['ablated']['score']:.3f} [{s['ablated']['ci'][0]:.2f}, {s['ablated']['ci'][1]:.2f}]",
            f"{sum(r) / len(r):.3f}",
        )
    console.print(table)
    for ref, f in res.fractions.items():
        ci = f["fraction_ci"] or [None, None]
        rnd = f["random"]
        console.print(
            f"gain over {ref} {f['gain']:+.3f} -> {f['gain_ablated']:+.3f} ablated: fraction removed "
            f"{_pct(f['fraction'])} [{_pct(ci[0])}, {_pct(ci[1])}]; random directions {_pct(rnd['mean'])} "
            f"(5-95%: {_pct(rnd['p5'])} to {_pct(rnd['p95'])})" + (f"; {f['warning']}" if "warning" in f else "")
        )
    console.print(f"results.json and the ablation plot in {cfg.out}")


STAGE = Stage("ablate", AblateConfig, run, show)
run_ablate = STAGE
