"""The commands, one file each: a config dataclass (the CLI, the recipe section, the manifest), a
``run(cfg, ctx)`` and a ``show``. The shared option groups and the run template are in
:mod:`latentlab.stages.base`.

Only this layer imports heavy modules (torch, transformers) lazily, inside ``run``: ``latentlab
--help`` imports every config here and must stay fast. Algorithm modules below it import at the top.
"""

from __future__ import annotations

from latentlab.stages import (
    ablate,
    collect,
    compliance,
    data,
    diff,
    direction,
    find_trigger,
    finetune,
    judge,
    models,
    patch,
    sae,
    sample,
    serve,
    shift,
    steer,
    trigger,
    vectors,
)
from latentlab.stages import study as _study
from latentlab.stages.base import Stage, iter_stages

__all__ = ["STAGES", "stage_named"]

STAGES: list[Stage] = iter_stages(
    [collect, direction, finetune, models, patch, steer, trigger, compliance, data, vectors, diff, ablate, shift, sae,
     serve, sample, judge, find_trigger]
)

STAGES += iter_stages([_study])


def stage_named(name: str) -> Stage:
    """The stage behind ``latentlab NAME`` (``"sae train"`` for a group's command)."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)
