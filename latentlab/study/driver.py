"""A study from start to end: check the plan against what the folder holds, run the steps through an
executor, then write ``summary.json`` and ``report.html``.

Why its own module: the plan (:mod:`~latentlab.study.runner`) is what every executor reads, and the
executors (:mod:`~latentlab.study.executors`) import it; the driver sits above both, so nothing below
it imports upward.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlab.errors import LatentlabError
from latentlab.io import ensure_writable_dir, read_json, write_json
from latentlab.stages.study import StudyConfig
from latentlab.study.executors import Executor, executor_for
from latentlab.study.report import write_report
from latentlab.study.runner import (
    STATE,
    NotApplicable,
    StudyRun,
    _config_dict,
    _defaults,
    _differs,
    _finetune_state,
    _finished,
    _norm,
    _roots,
    external_runs,
    plan_steps,
)
from latentlab.study.summary import summarize_study

__all__ = ["StudyResult", "run_study"]


@dataclass
class StudyResult:
    out: Path
    summary: dict[str, Any]
    report: Path
    steps: list[dict[str, Any]]



def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None



def run_study(config: StudyConfig, command: str | None = None, progress: bool = True,
              echo: Callable[[str], None] | None = None, executor: Executor | None = None) -> StudyResult:
    """Run (or resume) every step, then write ``summary.json`` and ``report.html`` from the run folders.

    ``executor``: how the steps run (default: the config's ``--executor``, in-process one after another
    unless ``ray``). The checks, study.json, summary and report are the driver's, whichever runs them.
    """
    cfg = config
    executor = executor or executor_for(cfg)
    say = echo or (lambda s: None)
    r = cfg.recipe_obj
    steps = [] if cfg.report_only else plan_steps(cfg)
    ensure_writable_dir(cfg.out)
    state_path = cfg.out / STATE
    prev = read_json(state_path) if state_path.is_file() else {}
    old_roots = _roots(prev["config"]["out"]) + _roots(prev.get("root", cfg.out)) if prev else _roots(cfg.out)
    new_roots = _roots(cfg.out)
    state: dict[str, Any] = {
        "root": str(cfg.out.expanduser().resolve()),
        "recipe": _norm(r.to_dict()),
        "config": cfg.to_dict(),
        "command": command or "latentlab.run_study",
        "started": prev.get("started", time.time()),
        "sessions": [*prev.get("sessions", []), {"started": time.time(), "load_average_start": _load_avg()}],
        "steps": prev.get("steps", {}),
        "external_runs": external_runs(cfg),
    }
    # External finetunes' manifests and results are copied in, so the study folder alone (and a
    # copy of its light files) carries their provenance.
    for key, path in state["external_runs"].items():
        for name in ("manifest.json", "results.json"):
            src = Path(path) / name
            if src.is_file():
                ensure_writable_dir(cfg.out / "external" / key)
                write_json(cfg.out / "external" / key / name, read_json(src))
    # Every finished step is checked against the plan before anything runs or loads.
    for st in steps:
        if _finished(st):
            try:
                conf = st.make()
            except NotApplicable:
                continue
            if st.finetune:
                _finetune_state(st, conf, old_roots, new_roots)  # a finished finetune of other settings is refused
                continue
            recorded = read_json(st.out / "manifest.json").get("config", {})
            diff = _differs(recorded, _config_dict(conf), old_roots, new_roots, _defaults(conf))
            if diff:
                raise LatentlabError(
                    f"{st.out} holds a finished {st.kind} run with other settings (differs in {', '.join(diff)})",
                    _rerun_fix(diff, recorded),
                )
    write_json(state_path, state)
    t_all = time.time()
    failures = executor.run(StudyRun(cfg, steps, state, state_path, old_roots, new_roots, say)) if steps else []
    state["sessions"][-1].update(wall_seconds=round(time.time() - t_all, 1), load_average_end=_load_avg())
    write_json(state_path, state)
    if failures:
        raise LatentlabError(
            f"{len(failures)} study step{'s' if len(failures) > 1 else ''} failed: {'; '.join(failures)}",
            "fix the cause and rerun the same command: finished steps are reused, the rest run "
            f"(study.json in {cfg.out} records each step)",
        )
    summary = summarize_study(cfg.out)
    write_json(cfg.out / "summary.json", summary)
    report = write_report(cfg.out, summary)
    return StudyResult(cfg.out, summary, report, [dict(key=k, **v) for k, v in state["steps"].items()])


_PLACEMENT = ("device", "dtype", "device_map")  # where a step ran, not what it computed


def _rerun_fix(diff: list[str], recorded: dict[str, Any]) -> str:
    """The fix for a finished step of other settings: where only the placement differs (a study
    started with ``--device cpu`` and resumed without it), the flags that resume it as it was."""
    if set(diff) <= set(_PLACEMENT):
        flags = " ".join(f"--{k.replace('_', '-')} {recorded[k]}" for k in diff if recorded.get(k) is not None)
        if flags:
            return f"resume with {flags}, as the study was started"
    return "choose a new --out for this recipe, or delete that folder to rerun it"
