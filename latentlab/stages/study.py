"""``latentlab study RECIPE``: a whole experiment from a recipe, resumably, with a report.

The config lives here, as every command's does. The study package (recipe, plan, executors, driver)
imports torch through the checks it shares with the other commands, so this module reaches it only
inside ``__post_init__`` and ``run``, as every stage reaches its algorithm modules: ``latentlab --help``
stays light.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, Stage, StageConfig, config_record, option

if TYPE_CHECKING:
    from latentlab.study.recipe import Recipe

__all__ = ["STAGE", "StudyConfig"]


@dataclass(kw_only=True)
class StudyConfig(StageConfig):
    """Run a study end to end: finetunes (resumed), analyses (finished ones skipped), summary.json and a
    self-contained report.html with plots, intervals, verdicts and provenance.

    The recipe is read and checked on construction (no model loads). ``model`` / ``seeds`` override
    the recipe's. ``report_only`` rebuilds summary.json and report.html from the run folders already
    in ``out`` (no model runs).
    """

    command = "study"
    recipe: str | None = option(None, help="A built-in recipe (see --list) or a recipe .toml.", argument=True)
    model: str | None = option(None, help="Override the recipe's model.", flags=("--model", "-m"))
    seeds: str | None = option(None, help="Override the recipe's seeds, e.g. 0,1,2 or 0-2.")
    out: Path = option(Path("runs/study"), help="Study folder (resumed when it holds this study).")
    report_only: bool = option(False, help="Rebuild summary.json and report.html from the folder; run nothing.")
    list_recipes: bool = option(False, help="List the built-in recipes and exit.", flags=("--list",))
    device: str = option("auto", help="cpu, cuda, cuda:N or auto (CUDA when present).")
    dtype: str = option("float32", help="float32, bfloat16 or float16.")
    executor: str = option("sequential", help="sequential (every step in this process, one after another) or ray "
                           "(each step a Ray task, started once the steps it reads finished; the ray extra).")
    address: str | None = option(None, help="--executor ray: join this running cluster (auto or HOST:PORT); "
                                 "without it, a local cluster on this machine.")
    workers: int | None = option(None, help="--executor ray: steps at once (default: every CPU of a local "
                                 "cluster; as many as a running cluster places).")
    gpus_per_step: float = option(0.0, help="--executor ray: GPUs each step reserves (1: one step per GPU; "
                                  "0: steps see no GPU).")
    threads_per_worker: int = option(1, help="--executor ray: CPUs each step reserves and torch threads it uses.")

    def __post_init__(self) -> None:
        from latentlab.config import check_choice, check_device_dtype, positive_int, run_holds
        from latentlab.study.recipe import load_recipe, parse_seeds
        from latentlab.study.runner import PROSE, STATE, _grown, _step_settings

        super().__post_init__()
        if self.list_recipes:
            return
        self._check_executor(check_choice, positive_int)
        if self.recipe is None:
            raise LatentlabError("no recipe given", "pass a built-in recipe (latentlab study --list) or a .toml file")
        if isinstance(self.seeds, list):
            self.seeds = ",".join(map(str, self.seeds))
        seeds = parse_seeds(self.seeds) if self.seeds is not None else None
        self._recipe = load_recipe(self.recipe, model=self.model, seeds=seeds)
        check_device_dtype(self.device, self.dtype)
        self.out = Path(self.out).expanduser()
        if self.out.exists() and not self.out.is_dir():
            raise LatentlabError(f"--out {self.out} is a file, not a folder", "choose a folder for --out")
        if (self.out / "manifest.json").exists() and run_holds(self.out):
            raise LatentlabError(f"--out {self.out} holds a single-command run, not a study",
                                 "choose another --out for the study")
        state = self.out / STATE
        if state.is_file():
            new = _step_settings(self._recipe.to_dict())
            old = _grown(_step_settings(json.loads(state.read_text()).get("recipe", {})), new)
            diff = sorted(k for k in set(old) | set(new) if k not in PROSE and old.get(k) != new.get(k))
            if diff:
                raise LatentlabError(
                    f"--out {self.out} holds a study of another recipe (differs in {', '.join(diff)})",
                    "choose a new --out, or rerun with the recipe it was started with (seeds and "
                    "[ablation] layers entries may only be added)",
                )
        elif self.report_only:
            raise LatentlabError(f"--report-only: {self.out} holds no study ({STATE} missing)",
                                 "pass the --out of a study that ran")
        anc = self.out
        while not anc.exists():
            anc = anc.parent
        if not os.access(anc, os.W_OK | os.X_OK):
            raise LatentlabError(f"cannot write to {self.out} ({anc} is read-only)", "choose a writable --out")

    def _check_executor(self, check_choice: Any, positive_int: Any) -> None:
        import math

        check_choice(self.executor, ("sequential", "ray"), "--executor")
        if self.executor != "ray":
            given = [flag for flag, v in (("--address", self.address), ("--workers", self.workers),
                                          ("--gpus-per-step", self.gpus_per_step),
                                          ("--threads-per-worker", self.threads_per_worker != 1)) if v]
            if given:
                raise LatentlabError(f"{', '.join(given)} only apply to --executor ray", "add --executor ray")
            return
        missing = ray_missing()
        if missing is not None:
            raise missing
        if self.workers is not None:
            positive_int("workers", self.workers)
        positive_int("threads_per_worker", self.threads_per_worker)
        if not (isinstance(self.gpus_per_step, (int, float)) and math.isfinite(self.gpus_per_step)
                and self.gpus_per_step >= 0):
            raise LatentlabError(f"--gpus-per-step {self.gpus_per_step!r} is not a number >= 0",
                                 "pass e.g. --gpus-per-step 1 (or 0.5 to share a GPU between two steps)")
        if self.device.startswith("cuda") and not self.gpus_per_step:
            raise LatentlabError(f"--device {self.device} with --executor ray, but no GPU is reserved for a step",
                                 "pass --gpus-per-step 1 (a step then sees its own GPU as cuda:0)")

    @property
    def recipe_obj(self) -> Recipe:
        return self._recipe

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in config_record(self).items() if k != "list_recipes"}



def ray_missing() -> LatentlabError | None:
    """The one-line error for ``--executor ray`` without Ray installed (``None`` when it is)."""
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        return None
    return LatentlabError("--executor ray needs the ray package, which is not installed",
                          "pip install 'latentlab[ray]' (the ray extra; make setup installs it)")


def run(cfg: StudyConfig, ctx: Context) -> Any:
    """``--list``: the built-in recipes; otherwise the study, run or resumed, and its report."""
    from latentlab.study.driver import run_study
    from latentlab.study.recipe import builtin_recipes, load_recipe

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
