"""Studies: a recipe (TOML) run end to end into one folder, with ``summary.json`` and ``report.html``.

:mod:`~latentlab.study.recipe` parses and checks recipes (each table a stage config),
:mod:`~latentlab.study.runner` plans and runs the steps (each an ordinary run folder),
:mod:`~latentlab.study.summary` computes the summary from the files alone, and
:mod:`~latentlab.study.report` renders it. The command's config, :class:`StudyConfig`, lives with the
other commands' in :mod:`latentlab.stages.study` and is re-exported here. Names are imported on first
use, so ``latentlab --help`` (which reads the study config) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ANALYSES": "recipe",
    "Recipe": "recipe",
    "builtin_recipes": "recipe",
    "load_recipe": "recipe",
    "parse_seeds": "recipe",
    "render_report": "report",
    "write_report": "report",
    "StudyConfig": "latentlab.stages.study",
    "StudyResult": "driver",
    "plan_steps": "runner",
    "run_study": "driver",
    "shift_layers": "runner",
    "summarize_study": "summary",
    "without_timings": "summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f"latentlab.study.{module}"), name)
    raise AttributeError(f"module 'latentlab.study' has no attribute {name!r}")
