"""Studies: a recipe (TOML) run end to end into one folder, with ``summary.json`` and ``report.html``.

:mod:`~latentlab.study.recipe` parses and checks recipes, :mod:`~latentlab.study.runner` plans and
runs the steps (each an ordinary run folder), :mod:`~latentlab.study.summary` computes the summary
from the files alone, and :mod:`~latentlab.study.report` renders it.
"""

from latentlab.study.recipe import ANALYSES, Recipe, builtin_recipes, load_recipe, parse_seeds
from latentlab.study.report import render_report, write_report
from latentlab.study.runner import StudyConfig, StudyResult, plan_steps, run_study, shift_layers
from latentlab.study.summary import summarize_study

__all__ = [
    "ANALYSES",
    "Recipe",
    "StudyConfig",
    "StudyResult",
    "builtin_recipes",
    "load_recipe",
    "parse_seeds",
    "plan_steps",
    "render_report",
    "run_study",
    "shift_layers",
    "summarize_study",
    "write_report",
]
