"""Benchmark: a 3-seed study run sequentially against ``--executor ray`` with 2 workers of 1 thread each.

Workload: a recipe written by this script into a temporary folder: smollm2-135m-instruct, seeds 0, 1, 2,
direction era; [finetune] old-birds with the modern-birds control, max_steps 4 (otherwise the built-in
LoRA settings); [shift] n_random 20 on the first 64 built-in unrelated prompts (the recipe's top-level
``prompts``, a subset file written beside it). 10 steps: the direction fit and 6 finetunes, then 3 shifts.

Both runs are the CLI (``latentlab study RECIPE --out DIR --device cpu``), each into a fresh folder, each
a subprocess with OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1, so the sequential run uses one torch thread as
each Ray step does (and the float sums are the same):

  sequential  the default executor: every step in one process, one after another;
  ray         ``--executor ray --workers 2 --threads-per-worker 1``: a local 2-CPU Ray cluster started and
              shut down by the driver (its start is in the wall time).

Each run fits era in its own ``direction`` step (in the Ray run, beside the finetunes, which do not
read it). Reported: each run's wall time, the sum of its steps' own wall
times, the ratio sequential / ray, and whether summary.json's numbers are identical (its ``sections``
compared with every ``wall_seconds`` dropped; provenance and timings ignored).

    python benchmarks/study_executor.py            # full run: ~8 minutes on an idle 2-core CPU
    python benchmarks/study_executor.py --quick --out /tmp/study_executor.json   # dry run: 2 seeds, 1 step
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import benchmark_args, provenance, write_results


def recipe(folder: Path, model: str, seeds: list[int], max_steps: int, n_prompts: int, n_random: int) -> Path:
    from latentlab.data import load_prompts

    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in load_prompts("unrelated")[:n_prompts]))
    path = folder / "bench-executor.toml"
    path.write_text(
        f'name = "bench-executor"\nmodel = "{model}"\nseeds = {json.dumps(seeds)}\ndirection = "era"\n'
        f'prompts = "{prompts}"\n\n[finetune]\ndata = "old-birds"\ncontrol = "modern-birds"\nmax_steps = {max_steps}\n'
        f"\n[shift]\nn_random = {n_random}\n"
    )
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_study_cli(rec: Path, out: Path, extra: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "latentlab.cli", "study", str(rec), "--out", str(out), "--device", "cpu", *extra]
    t0 = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env()).returncode
    s = time.perf_counter() - t0
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{' '.join(cmd)} failed (status {code}):\n{tail}")
    return s


def differences(a: Any, b: Any, where: str = "sections") -> list[str]:
    """Paths where two JSON values differ (the first few are reported)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{where}.{k}") if k in a and k in b else [f"{where}.{k}"]
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def steps_of(out: Path) -> dict[str, Any]:
    steps = json.loads((out / "study.json").read_text())["steps"]
    return {k: {"status": s.get("status"), "wall_seconds": s.get("wall_seconds"), "host": s.get("host"),
                "pid": s.get("pid")} for k, s in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--n-random", type=int, default=20)
    ap.add_argument("--keep", type=Path, default=None, help="write the two study folders here (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="a tiny dry run (2 seeds, 1 finetune step, 8 prompts)")
    args = benchmark_args(ap, "study_executor", markdown)
    if args.quick:
        args.seeds, args.max_steps, args.n_prompts = "0,1", 1, 8
    seeds = [int(s) for s in args.seeds.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-executor-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for d in ("sequential", "ray"):
            if (root / d).exists():
                raise SystemExit(f"{root / d} exists: the runs need fresh folders")
        rec = recipe(root, args.model, seeds, args.max_steps, args.n_prompts, args.n_random)
        walls = {
            "sequential": run_study_cli(rec, root / "sequential", [], root / "sequential.log"),
        }
        print(f"sequential: {walls['sequential']:.1f} s", flush=True)
        walls["ray"] = run_study_cli(rec, root / "ray", ["--executor", "ray", "--workers", "2",
                                                         "--threads-per-worker", "1"], root / "ray.log")
        print(f"ray: {walls['ray']:.1f} s", flush=True)
        from latentlab.study import without_timings

        summaries = {k: json.loads((root / k / "summary.json").read_text()) for k in walls}
        diff = differences(without_timings(summaries["sequential"]["sections"]),
                           without_timings(summaries["ray"]["sections"]))
        steps = {k: steps_of(root / k) for k in walls}
        ray_log = [ln for ln in (root / "ray.log").read_text().splitlines() if ln.startswith("ray:")][:10]
    result = {
        "workload": {"model": args.model, "seeds": seeds, "finetune": "old-birds vs control modern-birds",
                     "max_steps": args.max_steps, "shift_n_random": args.n_random, "n_prompts": args.n_prompts,
                     "n_steps": len(steps["sequential"]), "threads": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 (both runs)",
                     "sequential": "latentlab study RECIPE --device cpu",
                     "ray": "latentlab study RECIPE --device cpu --executor ray --workers 2 --threads-per-worker 1",
                     "quick": args.quick},
        "wall_seconds": {k: round(v, 1) for k, v in walls.items()},
        "step_seconds_sum": {k: round(sum(s["wall_seconds"] or 0 for s in v.values()), 1) for k, v in steps.items()},
        "ratio": round(walls["sequential"] / walls["ray"], 3),
        "summary_numbers_identical": not diff,
        "summary_differences": diff[:20],
        "steps": steps,
        "ray_log": ray_log,
        **provenance("cpu", load_before),
    }
    write_results(args.out, result, markdown)


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["workload"]
    lines = [
        f"# Study executors: sequential vs Ray, 2 workers x 1 thread ({w['model']}, seeds {w['seeds']}, "
        f"{w['n_steps']} steps, CPU)",
        "",
        f"Load average before/after: {m['load_average_before']} / {m['load_average_after']} ({m['cpu_cores']} cores). "
        f"Finetunes {w['finetune']}, max_steps {w['max_steps']}; shift n_random {w['shift_n_random']} on "
        f"{w['n_prompts']} prompts. {w['threads']}. Each run fits era in its own step. "
        "Ratio = sequential wall / Ray wall (Ray's cluster start included).",
        "",
        "| executor | wall s | sum of steps' wall s |",
        "|---|---:|---:|",
    ]
    for k in ("sequential", "ray"):
        lines.append(f"| {k} | {r['wall_seconds'][k]} | {r['step_seconds_sum'][k]} |")
    same = "identical" if r["summary_numbers_identical"] else \
        f"DIFFERENT ({len(r['summary_differences'])}+ paths, e.g. {', '.join(r['summary_differences'][:3])})"
    lines += ["", f"Ratio: **{r['ratio']:.2f}x**. Summary numbers (summary.json sections, wall times dropped): "
              f"**{same}**." + (" (quick dry run: not a measurement)" if w.get("quick") else "")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
