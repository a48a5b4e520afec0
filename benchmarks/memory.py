"""Benchmark: peak memory and wall time of ``shift`` and ``patch`` with one base in memory.

Each measurement runs in its own process (peak RSS is per process), on gemma-3-270m on CPU, with two
random LoRA adapters (rank 8 on q/k/v/o, non-zero B) standing in for a finetune and its control:

  one     load the model, collect last-token activations of the prompts (the floor: one model)
  shift   ``analyze_shift`` with a finetune and a control, adapters switched on the one base
  copies  the old way: load the base, then a merged copy per adapter (one at a time), same activations
  score   load the model, score the 8 battery items once (the floor for patching: one model plus the
          unembedding workspace of the completion positions)
  patch   ``patch_grid`` finetune -> base on a few layers, the finetune a view on the base

Reported: peak RSS of each and its ratio to the one-model floor of the same work (shift and copies
to ``one``, patch to ``score``; target <= 1.2), and wall time of shift vs copies.

    python benchmarks/memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import benchmark_args, provenance, write_results

MODES = ("one", "shift", "copies", "score", "patch")


def make_adapters(model_name: str, folder: Path) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import latentlab as ll

    path = ll.load_model(model_name, device="cpu", progress=False).info.path
    out = []
    for seed in (1, 2):
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        pm.save_pretrained(str(folder / f"adapter-{seed}"))
        out.append(folder / f"adapter-{seed}")
    return out


def child(mode: str, model_name: str, adapters: list[str], n_prompts: int) -> None:
    import torch

    import latentlab as ll
    from latentlab.activations import last_token_acts
    from latentlab.data import load_battery, load_prompts
    from latentlab.directions import Direction

    t0 = time.perf_counter()
    prompts = load_prompts("unrelated")[:n_prompts]
    base = ll.load_model(model_name, device="cpu", progress=False)
    d = Direction(torch.randn(base.n_layers, base.d_model), list(range(base.n_layers)), torch.ones(base.n_layers))
    if mode == "one":
        last_token_acts(base, prompts)
    elif mode == "shift":
        ll.analyze_shift(base, {"ft": adapters[0]}, d, prompts, controls={"ctrl": adapters[1]}, n_random=20,
                         progress=False)
    elif mode == "copies":
        h = last_token_acts(base, prompts)
        del base
        for a in adapters:
            m = ll.load_model(model_name, adapter=a, device="cpu", progress=False)
            _ = last_token_acts(m, prompts) - h
            del m
    elif mode == "score":
        from latentlab.scoring import score_conditions

        score_conditions(base, load_battery("era-battery")[:8], [(None, 0.0)])
    elif mode == "patch":
        from latentlab.patching import patch_grid

        ft = base.with_adapter(adapters[0])
        patch_grid(base, load_battery("era-battery")[:8], source=ft, layers=[0, base.n_layers // 2],
                   positions=["all", "-1"], progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "peak_rss_mb": round(peak_mb, 1), "seconds": round(time.perf_counter() - t0, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--child", choices=MODES)
    ap.add_argument("--adapters", nargs="*", default=[])
    if "--child" in sys.argv:
        a = ap.parse_args()
        child(a.child, a.model, a.adapters, a.n_prompts)
        return
    args = benchmark_args(ap, "memory", markdown)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [str(p) for p in make_adapters(args.model, Path(tmp))]
        rows = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--n-prompts",
                   str(args.n_prompts), "--adapters", *adapters]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows[mode] = json.loads(out)
            print(rows[mode], flush=True)
    one = rows["one"]["peak_rss_mb"]
    result: dict[str, Any] = {
        "workload": {"model": args.model, "n_prompts": args.n_prompts, "adapters": "2 x LoRA r8 q/k/v/o (random)"},
        "rows": rows,
        "ratio_to_one": {m: round(rows[m]["peak_rss_mb"] / one, 3) for m in MODES},
        "ratio_to_floor": {
            m: round(rows[m]["peak_rss_mb"] / rows["score" if m == "patch" else "one"]["peak_rss_mb"], 3)
            for m in MODES
        },
        "shift_vs_copies_seconds": [rows["shift"]["seconds"], rows["copies"]["seconds"]],
        **provenance("cpu", load_before),
    }
    write_results(args.out, result, markdown)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# Peak memory with one base in memory ({r['workload']['model']}, {r['workload']['n_prompts']} prompts, CPU)",
        "",
        f"Load average before/after: {m['load_average_before']} / {m['load_average_after']}. "
        "Each row is its own process. Floor: one model doing the same kind of work (`one` for shift and copies, "
        "`score` for patch). Target <= 1.2x the floor.",
        "",
        "| what | peak RSS MB | vs one model | vs its one-model floor | wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, row in r["rows"].items():
        lines.append(
            f"| {mode} | {row['peak_rss_mb']} | {r['ratio_to_one'][mode]:.2f}x | "
            f"{r['ratio_to_floor'][mode]:.2f}x | {row['seconds']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
