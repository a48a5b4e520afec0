"""``latentlab study RECIPE``: a whole experiment from a recipe, resumably, with a report.

Parses options into :class:`latentlab.study.StudyConfig` (which reads and checks the recipe before
any model loads), calls :func:`latentlab.study.run_study`, prints where the report is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from latentlab.cli._common import DeviceOpt, DtypeOpt, _command_line, app, console, out_console


@app.command()
def study(
    recipe: Annotated[str | None, typer.Argument(help="A built-in recipe (see --list) or a recipe .toml.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Override the recipe's model.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Override the recipe's seeds, e.g. 0,1,2 or 0-2.")] = None,
    out: Annotated[Path, typer.Option(help="Study folder (resumed when it holds this study).")] = Path("runs/study"),
    report_only: Annotated[
        bool, typer.Option(help="Rebuild summary.json and report.html from the folder; run nothing.")
    ] = False,
    list_recipes: Annotated[bool, typer.Option("--list", help="List the built-in recipes and exit.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Run a study end to end: finetunes (resumed), analyses (finished ones skipped), summary.json and a
    self-contained report.html with plots, intervals, verdicts and provenance."""
    from latentlab.errors import LatentlabError
    from latentlab.study import StudyConfig, builtin_recipes, load_recipe, run_study

    if list_recipes:
        table = Table(title="built-in recipes")
        for c in ("name", "model", "seeds", "analyses"):
            table.add_column(c)
        for name in builtin_recipes():
            r = load_recipe(name)
            table.add_row(name, r.model, ",".join(map(str, r.seeds)), ", ".join(r.analyses))
        out_console.print(table)
        return
    if recipe is None:
        raise LatentlabError("no recipe given", "pass a built-in recipe (latentlab study --list) or a .toml file")
    cfg = StudyConfig(recipe=recipe, out=out, model=model, seeds=seeds, device=device, dtype=dtype,
                      report_only=report_only)
    res = run_study(cfg, _command_line(), echo=lambda s: console.print(s, highlight=False))
    for sec in res.summary["sections"].values():
        for v in ([sec] + list(sec.values()) if isinstance(sec, dict) else []):
            if isinstance(v, dict) and v.get("verdict"):
                out_console.print(f"- {v['verdict']}", highlight=False)
            if isinstance(v, dict) and v.get("battery_verdict"):
                out_console.print(f"- {v['battery_verdict']}", highlight=False)
    out_console.print(f"report: {res.report}\nsummary: {res.out / 'summary.json'}")
