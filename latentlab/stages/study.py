"""``latentlab study RECIPE``: a whole experiment from a recipe, resumably, with a report.

The config (:class:`latentlab.study.StudyConfig`) lives beside the runner it configures, because the
runner's plan reads it; this file makes it a command and says how the result is shown.
"""

from __future__ import annotations

from typing import Any

from latentlab.stages.base import Context, Stage
from latentlab.study.runner import StudyConfig


def run(cfg: StudyConfig, ctx: Context) -> Any:
    """``--list``: the built-in recipes; otherwise the study, run or resumed, and its report."""
    from latentlab.study import builtin_recipes, load_recipe, run_study

    if cfg.list_recipes:
        return [load_recipe(name) for name in builtin_recipes()]
    return run_study(cfg, ctx.command, progress=ctx.progress, echo=ctx.log)


def show(res: Any, cfg: StudyConfig, console: Any) -> None:
    from rich.table import Table

    if cfg.list_recipes:
        table = Table(title="built-in recipes")
        for c in ("name", "model", "seeds", "analyses"):
            table.add_column(c)
        for r in res:
            table.add_row(r.name, r.model, ",".join(map(str, r.seeds)), ", ".join(r.analyses))
        console.print(table)
        return
    for sec in res.summary["sections"].values():
        for v in ([sec] + list(sec.values()) if isinstance(sec, dict) else []):
            if isinstance(v, dict) and v.get("verdict"):
                console.print(f"- {v['verdict']}", highlight=False)
            if isinstance(v, dict) and v.get("battery_verdict"):
                console.print(f"- {v['battery_verdict']}", highlight=False)
    console.print(f"report: {res.report}\nsummary: {res.out / 'summary.json'}")


STAGE = Stage("study", StudyConfig, run, show)
