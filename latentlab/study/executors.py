"""How a study's steps run: one after another in this process (:class:`Sequential`), or as Ray tasks on
a local or lab cluster (:class:`RayExecutor`), each as soon as the steps it reads have finished.

Why Ray and not a scheduler of our own: a lab that has GPUs has a cluster manager (SLURM, Kubernetes) on
which Ray runs as one allocation (docs/cluster.md), and Ray already places tasks by CPUs and GPUs, notices
dead workers and carries results back. A step is a (stage, config) pair whose config is rebuilt from the
recipe, so a task needs only the study's settings and the step's key: the worker plans the study again
and runs that step into its own folder, exactly as the in-process runner would.

What stays on the driver (:class:`~latentlab.study.runner.StudyRun`): the checks of finished steps, each
step's turn (skip, not applicable, resume), ``study.json`` and the summary and report. A worker writes
only its step's folder (every step has its own; finetunes are distinct folders) and a marker
``OUT/.running/<key>.json`` saying where it runs, which the driver reads for its progress lines and
removes. A failed step is named with its seed and stage, the steps that read it are not run, every
other branch finishes, and the study then fails with the list; a rerun reuses every finished step.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from latentlab.errors import LatentlabError, first_line
from latentlab.io import ensure_writable_dir, write_json
from latentlab.stages.base import config_record
from latentlab.stages.study import StudyConfig, ray_missing
from latentlab.study.runner import Step, StudyRun, _norm, _rel, plan_steps, step_needs

__all__ = ["Executor", "RayExecutor", "Sequential", "executor_for"]

# Environment a step reads that a remote worker's own environment need not have: the caches (which must
# be on the shared filesystem) and the hub's offline switches.
FORWARDED_ENV = ("LATENTLAB_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_DATASETS_OFFLINE", "XDG_CACHE_HOME")
RUNNING = ".running"


class Executor(Protocol):
    """Runs a study's steps; returns the failures (one line each: the step, its seed and stage, why)."""

    def run(self, study: StudyRun) -> list[str]: ...


class Sequential:
    """Every step in the plan's order, in this process: a step's error stops the study there."""

    def run(self, study: StudyRun) -> list[str]:
        for st in study.steps:
            turn = study.turn(st)
            if turn is None:
                continue
            conf, how = turn
            tag = study.tag(st)
            study.say(f"{tag}: {how}")
            t0 = time.time()
            st.run(conf)
            wall = round(time.time() - t0, 1)
            study.record(st, "done", wall_seconds=wall)
            study.save()
            study.say(f"{tag}: finished in {wall:.0f} s")
        return []


def executor_for(cfg: StudyConfig) -> Executor:
    """The executor a study config asks for (``--executor``, ``--address``, ``--workers``, ...)."""
    if getattr(cfg, "executor", "sequential") == "ray":
        return RayExecutor(address=cfg.address, workers=cfg.workers, gpus_per_step=cfg.gpus_per_step,
                           threads_per_worker=cfg.threads_per_worker)
    return Sequential()


def describe(st: Step) -> str:
    """A step as a failure names it: key, seed and stage."""
    seed = f"seed {st.seed}, " if st.seed is not None else ""
    return f"{st.key} ({seed}stage {st.stage or st.kind})"


@dataclass
class RayExecutor:
    """Each step a Ray task, submitted as soon as the steps it needs have finished.

    ``address``: ``None`` starts a local cluster on this machine (``workers`` CPUs, default all of them,
    and the GPUs Ray sees) and shuts it down at the end; ``"auto"`` or ``"HOST:PORT"`` joins a running
    cluster (``ray start --head``; docs/cluster.md). A driver already connected (``ray.init`` in a
    notebook) is used as it is. ``workers``: at most this many steps at once. ``gpus_per_step``: GPUs
    reserved per step (0: the step sees no GPU and runs on CPU). ``threads_per_worker``: CPUs reserved
    and torch threads per step. ``init``: further ``ray.init`` arguments (tests: a small object store).
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_step: float = 0.0
    threads_per_worker: int = 1
    init: dict[str, Any] = field(default_factory=dict)
    poll_seconds: float = 0.5

    def run(self, study: StudyRun) -> list[str]:
        missing = ray_missing()
        if missing is not None:
            raise missing
        import ray

        schedule = _Schedule(self, study, ray)
        try:
            return schedule.run()
        finally:
            if schedule.started:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Connect (or start a local cluster); True when this call did, so the driver shuts it down."""
        if ray.is_initialized():
            return False
        address = self.address or os.environ.get("RAY_ADDRESS") or None  # Ray's own variable, as ray.init reads it
        kw: dict[str, Any] = dict(self.init)
        if address is None:
            kw.setdefault("num_cpus", (self.workers or 0) * self.threads_per_worker or os.cpu_count() or 1)
            kw.setdefault("include_dashboard", False)
        else:
            kw["address"] = address
        # A local start can time out on a loaded machine (the raylet waits a fixed time for its agents): once more.
        for attempt in (1, 2) if address is None else (2,):
            try:
                ray.init(**kw)
                return True
            except Exception as e:  # ray.init raises bare Exceptions for a start that timed out
                ray.shutdown()
                if attempt == 1:
                    continue
                if address is None:
                    raise LatentlabError(f"could not start a local Ray cluster ({first_line(e)})",
                                         "retry on a less loaded machine, or run without --executor ray") from e
                raise LatentlabError(f"could not connect to the Ray cluster at {address} ({first_line(e)})",
                                     "start one with `ray start --head` (docs/cluster.md), or drop --address for a "
                                     "local cluster") from e
        return True  # pragma: no cover - the loop returns or raises


@dataclass
class _Schedule:
    """One session's bookkeeping on the driver: which steps wait, run, finished or failed."""

    ex: RayExecutor
    study: StudyRun
    ray: Any
    status: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    started: bool = False  # this driver started (or joined) the cluster: it shuts it down (or leaves)
    _task: Any = None

    def task(self) -> Any:
        """The Ray task, connecting on first use: a rerun whose steps all finished starts no cluster."""
        if self._task is not None:
            return self._task
        ex, ray, study = self.ex, self.ray, self.study
        self.started = ex._connect(ray)
        res = ray.cluster_resources()
        cluster = {"nodes": len([n for n in ray.nodes() if n.get("Alive")]), "cpus": res.get("CPU", 0),
                   "gpus": res.get("GPU", 0)}
        study.state["sessions"][-1]["executor"] = {
            "kind": "ray", "address": ex.address, "workers": ex.workers, "gpus_per_step": ex.gpus_per_step,
            "threads_per_worker": ex.threads_per_worker, "cluster": cluster}
        if ex.gpus_per_step > cluster["gpus"]:
            raise LatentlabError(f"--gpus-per-step {ex.gpus_per_step:g}, but the Ray cluster has {cluster['gpus']:g} "
                                 "GPUs", "pass a --gpus-per-step the cluster can give (docs/cluster.md)")
        study.say(f"ray: {cluster['nodes']} node(s), {cluster['cpus']:g} CPUs, {cluster['gpus']:g} GPUs")
        self._task = ray.remote(_run_step).options(num_cpus=ex.threads_per_worker, num_gpus=ex.gpus_per_step,
                                                   max_retries=0, name="latentlab-study-step")
        return self._task

    def run(self) -> list[str]:
        study, ray, ex = self.study, self.ray, self.ex
        cfg = study.cfg
        needs = step_needs(study.steps)
        markers = cfg.out / RUNNING
        for old in markers.glob("*.json") if markers.is_dir() else []:
            old.unlink(missing_ok=True)  # a killed driver's: its tasks died with it
        job = {"study": _study_fields(cfg), "cwd": os.getcwd(), "threads": ex.threads_per_worker,
               "gpus": ex.gpus_per_step, "markers": str(markers),
               "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
        waiting = list(study.steps)
        for st in waiting:
            self._mark(st, "waiting")
        study.save()
        running: dict[Any, Step] = {}
        seen: set[str] = set()
        while waiting or running:
            self._submit(waiting, running, needs, job)
            if not running:
                # every step whose needs were settled was decided on the driver (skipped, not run, failed);
                # needs name earlier steps, so the first waiting one is always settled by now
                assert not waiting, f"study steps left waiting on nothing: {[st.key for st in waiting]}"
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=ex.poll_seconds)
            self._started(running, markers, seen)
            for ref in ready:
                self._finished(running.pop(ref), ref, markers)
        if markers.is_dir():
            with contextlib.suppress(OSError):
                markers.rmdir()
        # study.json lists the steps in the plan's order, as the sequential runner writes them
        steps = study.state["steps"]
        order = [st.key for st in study.steps if st.key in steps]
        study.state["steps"] = {**{k: steps[k] for k in order}, **{k: v for k, v in steps.items() if k not in order}}
        study.save()
        return self.failures

    # -- scheduling ---------------------------------------------------------------------------------

    def _submit(self, waiting: list[Step], running: dict[Any, Step], needs: dict[str, tuple[str, ...]],
                job: dict[str, Any]) -> None:
        """Decide (and submit) every waiting step whose needs are settled, in the plan's order."""
        study = self.study
        progressed = True
        while progressed:
            progressed = False
            for st in list(waiting):
                bad = [k for k in needs[st.key] if self.status.get(k) in ("failed", "dependency failed")]
                if bad:
                    waiting.remove(st)
                    progressed = True
                    self.status[st.key] = "dependency failed"
                    why = f"dependency failed: {', '.join(bad)}"
                    study.record(st, "not run", reason=why)
                    study.save()
                    study.say(f"{study.tag(st)}: not run ({why})")
                    continue
                if not all(self.status.get(k) in ("done", "not run") for k in needs[st.key]):
                    continue
                if self.ex.workers and len(running) >= self.ex.workers:
                    return
                waiting.remove(st)
                progressed = True
                try:
                    turn = study.turn(st)
                except Exception as e:  # its config could not be built (e.g. an input an earlier step left bad)
                    self._fail(st, first_line(e), _trace(e))
                    continue
                if turn is None:
                    self.status[st.key] = study.state["steps"][st.key]["status"]
                    continue
                conf, how = turn
                ref = self.task().remote({**job, "key": st.key, "how": how, "config": _norm(config_record(conf))})
                running[ref] = st
                self.status[st.key] = "running"
                self._mark(st, "running", how=how, submitted=time.time())
                study.save()
                study.say(f"{study.tag(st)}: {how} (submitted){self._counts()}")

    def _started(self, running: dict[Any, Step], markers: Path, seen: set[str]) -> None:
        """Progress lines for the steps whose worker has picked them up since the last look."""
        by_key = {st.key: st for st in running.values()}
        for key, st in by_key.items():
            if key in seen:
                continue
            where = _read_marker(markers / _marker_name(key))
            if where is None:
                continue
            seen.add(key)
            entry = self.study.state["steps"].setdefault(key, {})
            entry.update({k: where.get(k) for k in ("host", "node", "pid", "started")})
            self.study.save()
            self.study.say(f"{self.study.tag(st)}: started on {where.get('host')} (pid {where.get('pid')})")

    def _finished(self, st: Step, ref: Any, markers: Path) -> None:
        study = self.study
        (markers / _marker_name(st.key)).unlink(missing_ok=True)
        try:
            out = self.ray.get(ref)
        except Exception as e:  # the worker died (killed, out of memory) or Ray lost the task
            self._fail(st, f"its worker died ({type(e).__name__}: {first_line(e)})", None)
            return
        where = {k: out.get(k) for k in ("host", "node", "pid", "started", "finished")}
        if out.get("error"):
            self._fail(st, out["error"], out.get("traceback"), **where)
            return
        wall = round(out["wall_seconds"], 1)
        self.status[st.key] = "done"
        study.record(st, "done", wall_seconds=wall, **where)
        study.save()
        study.say(f"{study.tag(st)}: finished in {wall:.0f} s on {where['host']}{self._counts()}")

    def _fail(self, st: Step, why: str, trace: str | None, **where: Any) -> None:
        self.status[st.key] = "failed"
        self.failures.append(f"{describe(st)}: {why}")
        self.study.record(st, "failed", reason=why, **where, **({"traceback": trace} if trace else {}))
        self.study.save()
        self.study.say(f"{self.study.tag(st)}: failed ({describe(st)}): {why}")

    def _mark(self, st: Step, status: str, **extra: Any) -> None:
        """This session's status of a step in study.json (its other entries kept until it finishes)."""
        entry = self.study.state["steps"].setdefault(st.key, {})
        entry.update(kind=st.kind, out=_rel(st.out, self.study.cfg.out), seed=st.seed, status=status, **extra)

    def _counts(self) -> str:
        """``(done 4, running 2, waiting 5)``: in parentheses, which the CLI's console prints as they are."""
        n = {s: sum(v == s for v in self.status.values()) for s in ("done", "running", "failed")}
        waiting = len(self.study.steps) - len(self.status)
        return (f" (done {n['done']}, running {n['running']}, waiting {waiting}"
                + (f", failed {n['failed']}" if n["failed"] else "") + ")")


def _study_fields(cfg: StudyConfig) -> dict[str, Any]:
    """What a worker needs to plan the same study (in-process there: no executor options)."""
    return {"recipe": str(cfg.recipe), "model": cfg.model, "seeds": cfg.seeds, "out": str(cfg.out),
            "device": cfg.device, "dtype": cfg.dtype}


def _marker_name(key: str) -> str:
    return key.replace("/", "_").replace(":", "_") + ".json"


def _read_marker(path: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _trace(e: BaseException) -> str | None:
    if isinstance(e, LatentlabError):
        return None  # a user's problem with its fix: the message is the whole story
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)[-12:])


def _run_step(job: dict[str, Any]) -> dict[str, Any]:
    """The Ray task: plan the study again in this worker, build the step's config, check it is the one the
    driver planned, and run the stage into the step's folder. Errors come back as a line (and a traceback
    for a bug), so the driver never unpickles a library's exception."""
    t0 = time.time()
    where: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "started": t0, "node": None}
    with contextlib.suppress(Exception):
        import ray

        where["node"] = ray.get_runtime_context().get_node_id()
    os.environ.update(job["env"])
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    if not job["gpus"]:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # no GPU reserved for this step: it must not take one
    marker = Path(job["markers"]) / _marker_name(job["key"])
    try:
        ensure_writable_dir(marker.parent)
        write_json(marker, {"key": job["key"], **where})
        try:
            os.chdir(job["cwd"])
        except OSError as e:
            raise LatentlabError(f"the study's working folder {job['cwd']} is not on {where['host']}",
                                 "run the study from a folder on the shared filesystem (docs/cluster.md)") from e
        import torch

        torch.set_num_threads(job["threads"])
        steps = {st.key: st for st in plan_steps(StudyConfig(**job["study"]))}
        st = steps[job["key"]]
        conf = st.make()
        got = _norm(config_record(conf))
        if got != job["config"]:
            diff = sorted(k for k in set(got) | set(job["config"]) if got.get(k) != job["config"].get(k))
            raise LatentlabError(f"{where['host']} planned step {job['key']} with other settings than the driver "
                                 f"(differs in {', '.join(diff)})",
                                 "put the study folder, the recipe and its files on a filesystem every node "
                                 "shares, at the same path (docs/cluster.md)")
        st.run(conf)
        return {**where, "wall_seconds": time.time() - t0, "finished": time.time(), "error": None}
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the driver as a line
        return {**where, "finished": time.time(), "error": first_line(e) if str(e) else type(e).__name__,
                "traceback": _trace(e)}
    finally:
        marker.unlink(missing_ok=True)
