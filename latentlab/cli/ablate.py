"""``latentlab ablate``: does a direction carry a finetune's behaviour (latentlab.ablation).

Each command parses its options into the stage's config (which validates itself, so a bad option
fails before any model loads or the --out folder is touched), calls the one library function that
does the run, and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from latentlab.cli._common import DeviceMapOpt, DeviceOpt, DtypeOpt, OutOpt, _command_line, app, out_console

BaseOpt = Annotated[str, typer.Option(help="Base model the adapters were trained on.")]
FinetunedOpt = Annotated[Path, typer.Option(help="Finetune run folder or adapter folder.")]
ControlOpt = Annotated[Path | None, typer.Option(help="Control finetune run or adapter folder (same base).")]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.0%}"


@app.command("ablate")
def ablate_cmd(
    finetuned: FinetunedOpt,
    out: OutOpt = Path("runs/ablate"),
    base: BaseOpt = "gemma-3-270m",
    control: ControlOpt = None,
    direction: Annotated[
        str, typer.Option(help="era, persona, a contrast-pair JSONL, or a saved direction .safetensors.")
    ] = "era",
    layers: Annotated[str, typer.Option(help="Layers to ablate at: all, or e.g. 8-17 or 10,12.")] = "all",
    mode: Annotated[str, typer.Option(help="project (remove the component) or mean (set it to the base's mean).")]
    = "project",
    n_random: Annotated[int, typer.Option(help="Random unit directions for the chance level (>= 10).")] = 10,
    battery: Annotated[str | None, typer.Option(help="A/B battery (default: the direction's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the random directions and the bootstrap.")] = 0,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples over items (>= 100).")] = 1000,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    dtype: DtypeOpt = "float32",
) -> None:
    """Ablate a direction in the base, the finetune and the control: how much of the finetune's battery
    gain does it remove, against random directions?"""
    from latentlab.ablation import AblateConfig, run_ablate

    cfg = AblateConfig(
        finetuned=finetuned, out=out, base=base, control=control, direction=direction, layers=layers, mode=mode,
        n_random=n_random, battery=battery, seed=seed, n_boot=n_boot, device=device, device_map=device_map, dtype=dtype,
    )
    res = run_ablate(cfg, _command_line())
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
    out_console.print(table)
    for ref, f in res.fractions.items():
        ci = f["fraction_ci"] or [None, None]
        rnd = f["random"]
        out_console.print(
            f"gain over {ref} {f['gain']:+.3f} -> {f['gain_ablated']:+.3f} ablated: fraction removed "
            f"{_pct(f['fraction'])} [{_pct(ci[0])}, {_pct(ci[1])}]; random directions {_pct(rnd['mean'])} "
            f"(5-95%: {_pct(rnd['p5'])} to {_pct(rnd['p95'])})" + (f"; {f['warning']}" if "warning" in f else "")
        )
    out_console.print(f"results.json and the ablation plot in {cfg.out}")
