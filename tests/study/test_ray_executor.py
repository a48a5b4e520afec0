"""``latentlab study --executor ray``: a tiny study on a local 2-worker Ray cluster equals the sequential run;
a failed step is named with its seed and stage while the other branches finish; a worker killed mid-step
and the study rerun completes, reusing what finished; the cluster is always shut down.

Two clusters in all (each start costs seconds): the first is the executor's own (started and shut down by
the driver, as the CLI does), the second a module fixture the executor joins.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from study_recipes import tiny_recipe

from latentlab.errors import LatentlabError
from latentlab.study import StudyConfig, run_study, without_timings
from latentlab.study.executors import RayExecutor, Sequential, executor_for

# A small object store, no dashboard, worker output kept out of the test's: a bounded cluster.
SMALL = {"object_store_memory": 80 * 2**20, "log_to_driver": False, "include_dashboard": False}
SHIFT = "[shift]\nn_random = 20\n"


def raylets() -> set[int]:
    """Running raylet processes (``ps``), to check a test leaves none of its own."""
    out = subprocess.run(["ps", "-eo", "pid=,comm="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines() if line.split()[1:] == ["raylet"]}


def wait_gone(pids: set[int], timeout: float = 20) -> set[int]:
    deadline = time.time() + timeout
    while (left := pids & raylets()) and time.time() < deadline:
        time.sleep(0.2)
    return left


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


def configs(root: Path) -> dict[str, Any]:
    """Each run folder's manifest config, the study root written as <study>."""
    out = {}
    for m in sorted(root.rglob("manifest.json")):
        if "external" in m.parts:
            continue
        text = json.dumps(json.loads(m.read_text())["config"])
        for r in (str(root.resolve()), str(root)):
            text = text.replace(r, "<study>")
        out[str(m.parent.relative_to(root))] = json.loads(text)
    return out


# --------------------------------------------------------------------------------------------
# The options, before any cluster.
# --------------------------------------------------------------------------------------------


def test_executor_options_are_checked_before_anything_runs(trainable_gemma_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    rec = tiny_recipe(tmp_path, trainable_gemma_dir, SHIFT)
    out = str(tmp_path / "s")
    code, _, err = run_cli(monkeypatch, capsys, "study", str(rec), "--out", out, "--workers", "2")
    assert_one_line_error(code, err, "--executor ray")
    code, _, err = run_cli(monkeypatch, capsys, "study", str(rec), "--out", out, "--executor", "ray",
                           "--device", "cuda", "--workers", "2")
    assert_one_line_error(code, err, "--gpus-per-step")
    code, _, err = run_cli(monkeypatch, capsys, "study", str(rec), "--out", out, "--executor", "dask")
    assert_one_line_error(code, err, "--executor")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    code, _, err = run_cli(monkeypatch, capsys, "study", str(rec), "--out", out, "--executor", "ray")
    assert_one_line_error(code, err, "latentlab[ray]")
    assert not (tmp_path / "s").exists()
    monkeypatch.undo()
    cfg = StudyConfig(recipe=str(rec), out=out, executor="ray", workers=2, gpus_per_step=0.5, device="cpu")
    assert executor_for(cfg) == RayExecutor(workers=2, gpus_per_step=0.5)
    assert isinstance(executor_for(StudyConfig(recipe=str(rec), out=out)), Sequential)


# --------------------------------------------------------------------------------------------
# The executor's own local cluster: the same study as the sequential runner's.
# --------------------------------------------------------------------------------------------


def test_ray_study_equals_the_sequential_study(trainable_gemma_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    rec = tiny_recipe(tmp_path, trainable_gemma_dir, SHIFT + "[diff]\nk = 5\n", seeds="[0, 1]")
    seq, par = tmp_path / "seq", tmp_path / "ray"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker runs (threads_per_worker=1): the same float sums
    try:
        a = run_study(StudyConfig(recipe=str(rec), out=seq, device="cpu"), echo=print, executor=Sequential())
    finally:
        torch.set_num_threads(threads)
    before = raylets()
    capsys.readouterr()
    b = run_study(StudyConfig(recipe=str(rec), out=par, device="cpu", executor="ray", workers=2), echo=print,
                  executor=RayExecutor(workers=2, init=SMALL))
    said = lines(capsys)
    assert not ray.is_initialized() and not wait_gone(raylets() - before), "the driver left its cluster running"

    # the same run folders, manifests' configs and summary numbers
    assert configs(seq) == configs(par) and len(configs(par)) == 8
    assert without_timings(a.summary["sections"]) == without_timings(b.summary["sections"])
    assert json.loads((par / "summary.json").read_text())["sections"] == b.summary["sections"]
    assert not (par / ".running").exists()

    # study.json: every step done, where and when it ran; two steps ran at once
    state = json.loads((par / "study.json").read_text())
    steps = state["steps"]
    assert list(steps) == list(json.loads((seq / "study.json").read_text())["steps"])  # the plan's order
    assert all(s["status"] == "done" and s["host"] and s["pid"] for s in steps.values())
    spans = sorted((s["started"], s["finished"]) for s in steps.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "no two steps overlapped"
    ex = state["sessions"][-1]["executor"]
    assert ex["kind"] == "ray" and ex["cluster"]["cpus"] == 2
    assert any(": started on " in s for s in said) and any("(done 8, running 0, waiting 0)" in s for s in said)
    assert "ran on" in b.report.read_text()  # the report's provenance names the worker of each step

    # a rerun reuses every finished step and starts no cluster
    run_study(StudyConfig(recipe=str(rec), out=par, device="cpu"), echo=print, executor=RayExecutor(workers=2))
    said = lines(capsys)
    assert sum("done already, skipped" in s for s in said) == 8 and not any(s.startswith("ray:") for s in said)


# --------------------------------------------------------------------------------------------
# A cluster the executor joins (and does not shut down).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    import ray

    before = raylets()
    try:
        assert RayExecutor(init={"num_cpus": 2, **SMALL})._connect(ray)  # a start that timed out is retried once
        yield ray
    finally:
        ray.shutdown()
        assert not wait_gone(raylets() - before), "a raylet outlived the test cluster"


def test_a_failed_step_names_seed_and_stage_and_the_other_branches_finish(
        ray_cluster: Any, trainable_gemma_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The battery (read by shift and ablate only, when they run) lacks a field: shift fails in its worker,
    the ablation that reads the shift's layers is not run, diff and the finetunes finish."""
    rec = tiny_recipe(tmp_path, trainable_gemma_dir,
                      SHIFT + '[ablation]\nlayers = ["shift"]\nn_random = 10\n[diff]\nk = 5\n', bad_battery=True)
    out = tmp_path / "s"
    with pytest.raises(LatentlabError, match=r"1 study step failed: shift-s0 \(seed 0, stage shift\): .*negative"):
        run_study(StudyConfig(recipe=str(rec), out=out, device="cpu"), echo=print, executor=RayExecutor(workers=2))
    assert ray_cluster.is_initialized()  # joined, not started: left running
    steps = json.loads((out / "study.json").read_text())["steps"]
    assert {k: s["status"] for k, s in steps.items()} == {
        "direction": "done", "finetune:old-s0": "done", "finetune:new-s0": "done", "shift-s0": "failed",
        "ablate-shift-s0": "not run", "diff-s0": "done"}
    assert steps["ablate-shift-s0"]["reason"] == "dependency failed: shift-s0"
    assert "negative" in steps["shift-s0"]["reason"]
    assert not (out / "summary.json").exists()
    said = lines(capsys)
    assert any("shift-s0: failed (shift-s0 (seed 0, stage shift))" in s for s in said)


def test_a_killed_worker_then_a_rerun_completes(ray_cluster: Any, trainable_gemma_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The worker training finetune:old-s0 is killed once it wrote a checkpoint: that step fails (the shift
    that reads it is not run), the rest finish; the rerun resumes the finetune and reuses the rest."""
    rec = tiny_recipe(tmp_path, trainable_gemma_dir, SHIFT, max_steps=40, epochs=20, checkpoint_every=2)
    out = tmp_path / "s"
    marker = out / ".running" / "finetune_old-s0.json"
    killed: dict[str, Any] = {}

    def kill_mid_step() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            if marker.is_file() and list((out / "finetunes" / "old-s0").glob("checkpoints/step-*/trainer_state.json")):
                try:
                    pid = json.loads(marker.read_text())["pid"]
                except (OSError, ValueError):
                    continue
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_mid_step, daemon=True)
    killer.start()
    cfg = StudyConfig(recipe=str(rec), out=out, device="cpu")
    with pytest.raises(LatentlabError, match=r"finetune:old-s0 \(seed 0, stage finetune\): its worker died"):
        run_study(cfg, echo=print, executor=RayExecutor(workers=2))
    killer.join(timeout=5)
    assert killed, "the finetune finished before it could be killed"
    steps = json.loads((out / "study.json").read_text())["steps"]
    assert {k: s["status"] for k, s in steps.items()} == {
        "direction": "done", "finetune:old-s0": "failed", "finetune:new-s0": "done", "shift-s0": "not run"}
    assert not (out / "finetunes" / "old-s0" / "adapter").exists()
    capsys.readouterr()

    res = run_study(StudyConfig(recipe=str(rec), out=out, device="cpu"), echo=print, executor=RayExecutor(workers=2))
    said = lines(capsys)
    assert any("direction: done already, skipped" in s for s in said)
    assert any("finetune:new-s0: done already, skipped" in s for s in said)
    assert any("finetune:old-s0: resuming" in s for s in said)  # from the checkpoint the killed worker wrote
    assert {s["status"] for s in json.loads((out / "study.json").read_text())["steps"].values()} == {"done"}
    assert res.summary["sections"]["shift"]
