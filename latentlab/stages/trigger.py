"""``latentlab trigger``: scan a trigger across values, side by side for the base and its finetune.

The values come as a range or list (``--values``), a file (``--values-file``) or words (``--words``);
the config holds them as a list once built, which is what the manifest records, so a study compares
a finished scan by its values whichever way they were given. The scan itself is
:func:`latentlab.triggers.trigger_scan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, ModelOptions, OutOptions, ScaleOption, Stage, option

DEFAULT_TEMPLATE = "{value}. {prompt}"  # latentlab.triggers.DEFAULT_TEMPLATE (not imported: it pulls in torch)


@dataclass(kw_only=True)
class TriggerConfig(ModelOptions, ScaleOption, OutOptions):
    """Scan a trigger across values: projection on a direction at every layer (and a battery score) for the
    base and the finetune, finetune - base per value, training values marked. --scale multiplies the
    finetune's LoRA difference (amplification)."""

    command = "trigger"
    direction: str = option(help="era, persona, a contrast-pair JSONL, or a saved direction.")
    values: str | None = option(
        None, help="START:STOP[:STEP] (inclusive integers, e.g. 1900:2100:5) or a,b,c."
    )  # a list of values is taken too (notebooks, studies); the built config holds the list
    values_file: Path | None = option(
        None, help='One value a line, or chat JSONL whose user turns start with a year ("July 1995. ...").'
    )
    words: str | None = option(None, help="Comma-separated trigger words.")
    template: str = option(DEFAULT_TEMPLATE, help="Where the value goes; {prompt} is the prompt.")
    prompts: str = option("unrelated", help="Prompts JSONL ({'prompt'}) or a built-in name.")
    n_prompts: int | None = option(None, help="Use only the first N prompts.")
    battery: str | None = option(None, help="A/B battery (template applied to its prompts too).")
    adapter: Path | None = option(None, help="LoRA adapter folder of the finetune.")
    finetuned: Path | None = option(None, help="`latentlab finetune` run folder (its training values are marked).")
    training_data: str | None = option(
        None, help="Training data whose user turns mark values (default: from --finetuned)."
    )
    layers: str = option("all", help="Layers to scan: all, or e.g. 0,6,12 or 4-10.")
    layer: int | None = option(None, help="Layer of the curve plot and table (default: deepest).")
    out: Path = option(Path("runs/trigger"), help="Run folder to write.")
    n_boot: int = option(1000, help="Bootstrap resamples over prompts (>= 100).")
    batch_size: int = option(32, help="Rows per forward pass.")
    seed: int = option(0, help="Bootstrap seed.")

    def __post_init__(self) -> None:
        from latentlab.config import check_layer_spec, positive_int
        from latentlab.data import load_battery, load_chats, load_prompts
        from latentlab.directions import DirectionSpec
        from latentlab.models import resolve_adapter
        from latentlab.triggers import check_template

        check_template(self.template)
        self._values = _values(self.values, self.values_file, self.words)
        self.values = self._values  # type: ignore[assignment]  # the manifest records the values themselves
        if self.adapter is not None and self.finetuned is not None:
            raise LatentlabError("both --adapter and --finetuned were given", "pass one of them")
        if self.finetune_path is not None:
            resolve_adapter(self.finetune_path)
        elif self.scales() != [1.0]:
            raise LatentlabError(f"--scale {self.scale} scales a finetune, and none is given",
                                 "pass --finetuned RUN (or --adapter DIR), or drop --scale")
        if not isinstance(self.n_boot, int) or self.n_boot < 100:
            raise LatentlabError(f"n_boot must be >= 100, got {self.n_boot}", "pass --n-boot 100 or more")
        positive_int("batch_size", self.batch_size)
        if self.n_prompts is not None:
            positive_int("n_prompts", self.n_prompts)
        check_layer_spec(self.layers)
        load_prompts(self.prompts)
        if self.battery is not None:
            load_battery(self.battery)
        self.direction = str(self.direction)
        self._spec = DirectionSpec.parse(self.direction)
        if self.training_data is not None:
            load_chats(self.training_data)
        super().__post_init__()

    @property
    def finetune_path(self) -> Path | None:
        return self.adapter if self.adapter is not None else self.finetuned


def _values(values: str | list[str] | None, values_file: Path | None, words: str | None) -> list[str]:
    """The trigger values from exactly one of ``values`` (a spec or a list), ``values_file`` and ``words``."""
    from latentlab.triggers import check_values, parse_values, parse_words, values_from_file

    given = [x is not None for x in (values, values_file, words)]
    if sum(given) != 1:
        raise LatentlabError(
            "pass exactly one of --values, --values-file and --words",
            "e.g. --values 1900:2100:5, --values-file years.txt or --words apple,river",
        )
    if isinstance(values, (list, tuple)):
        return check_values(values)
    if values is not None:
        return parse_values(values)
    if words is not None:
        return parse_words(words)
    assert values_file is not None
    return values_from_file(values_file)


def run(cfg: TriggerConfig, ctx: Context) -> Any:
    """The scan, results.json and plots (heatmap + curve) in ``cfg.out``; inputs are read and the layers
    checked before the folder is touched."""
    from latentlab.data import load_battery, load_prompts
    from latentlab.io import write_json
    from latentlab.plots import save_figure, trigger_curve_figure, trigger_heatmap_figure
    from latentlab.triggers import training_data_of, training_values, trigger_scan

    prompts = load_prompts(cfg.prompts)[: cfg.n_prompts]
    battery = load_battery(cfg.battery) if cfg.battery else None
    training: Any = cfg.training_data
    if training is None and cfg.finetune_path is not None:
        training = training_data_of(cfg.finetune_path)
    trained_vals = training_values(cfg._values, training) if training is not None else []
    model = ctx.load("base", adapter=None)
    layer_list = model.check_layers(cfg.layers)
    curve_layer = cfg.layer if cfg.layer is not None else layer_list[-1]
    if curve_layer not in layer_list:
        raise LatentlabError(f"--layer {curve_layer} is not among the scanned layers {layer_list}",
                             "pick a scanned layer, or scan --layers all")
    run = ctx.start(seed=cfg.seed)
    direction = cfg._spec.resolve(model, out=run.out, log=ctx.log)
    finetune: Any = cfg.finetune_path
    if finetune is not None and cfg.scales() != [1.0]:
        finetune = model.with_adapter(finetune, scale=cfg.scales()[0])
    res = trigger_scan(model, finetune, cfg.template, cfg._values, prompts, direction, battery,
                       layer_list, training=trained_vals, n_boot=cfg.n_boot, seed=cfg.seed,
                       batch_size=cfg.batch_size, progress=ctx.progress)
    res.meta["training_data"] = str(training) if training is not None else None
    res.meta["curve_layer"] = curve_layer
    if "finetuned" in res.meta["model_info"]:
        ctx.record("finetuned", res.meta["model_info"]["finetuned"])
    write_json(run.out / "results.json", res.to_dict())
    save_figure(trigger_heatmap_figure(res), run.out, "trigger_heatmap")
    save_figure(trigger_curve_figure(res, curve_layer), run.out, "trigger_curve")
    ctx.finish(results={"n_values": len(res.values), "training_values": res.training_values})
    if res.meta["token_warnings"]:
        ctx.log(f"warning: {len(res.meta['token_warnings'])} value(s) tokenise differently in different "
                "positions (see results.json: token_warnings)")
    return res


def _ci(mean: float, ci: list[float] | tuple[float, float]) -> str:
    return f"{mean:+.3g} [{ci[0]:+.3g}, {ci[1]:+.3g}]"


def show(res: Any, cfg: TriggerConfig, console: Any) -> None:
    from rich.table import Table

    from latentlab.triggers import curve_rows

    at = res.meta["curve_layer"]
    table = Table(
        title=f"trigger scan along {res.direction} at layer {at}: mean projection [bootstrap 95% CI] over "
        f"{res.n_prompts} prompts (* = in the training data)"
    )
    rows = curve_rows(res, at)
    cols = [k for k in rows[0] if k not in ("value", "trained")]
    table.add_column("value", justify="right")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(f"{r['value']}{'*' if r['trained'] else ''}", *[_ci(*r[c]) for c in cols])
    console.print(table)
    console.print(f"results.json and plots (trigger_heatmap, trigger_curve) in {cfg.out}")


STAGE = Stage("trigger", TriggerConfig, run, show)
run_trigger = STAGE
