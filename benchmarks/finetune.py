"""Benchmark: ``latentlab.finetune`` steps/s against a plain peft + torch loop on the same batches.

Workload: gemma-3-270m, LoRA r8 on all linear layers, AdamW lr 2e-4, batch 8, the old-birds chats
(the bird experiment's setting), N steps. The plain loop is what one writes by hand: the same
tokenised rows, the same batch order (``latentlab.finetune``'s seeded epoch order), the same loss;
no checkpoints, no resume bookkeeping. latentlab saves one checkpoint (at the last step) and its
time includes it. Best of 2, alternating, after a 2-step warm-up of each. Target: ratio >= 0.95.

    python benchmarks/finetune.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import benchmark_args, provenance, write_results


def plain_loop(name: str, steps: int, batch_size: int, seed: int = 0) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import latentlab as ll
    from latentlab.activations import pad_batch
    from latentlab.data import bird_chats
    from latentlab.finetune import IGNORE, _epoch_order, _tokenise

    path = ll.load_model(name, device="cpu", progress=False).info.path
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(seed)
    pm = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-4)
    rows = _tokenise(bird_chats("old"), tok, 256)
    order = _epoch_order(len(rows), seed, 0)
    pm.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = [rows[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        ids, mask = pad_batch([b[0] for b in batch], tok.pad_token_id or 0, torch.device("cpu"))
        labels = torch.full_like(ids, IGNORE)
        for j, (_, lab) in enumerate(batch):
            labels[j, : len(lab)] = torch.tensor(lab)
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def latentlab_loop(name: str, steps: int, batch_size: int) -> float:
    from latentlab.data import bird_chats
    from latentlab.finetune import FinetuneConfig, finetune

    with tempfile.TemporaryDirectory() as tmp:
        cfg = FinetuneConfig(max_steps=steps, batch_size=batch_size, checkpoint_every=10_000)
        res = finetune(name, bird_chats("old"), Path(tmp) / "ft", cfg, device="cpu", progress=False)
    return res.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = benchmark_args(ap, "finetune", markdown)
    load_before = os.getloadavg()
    plain_loop(args.model, 2, args.batch_size)
    latentlab_loop(args.model, 2, args.batch_size)
    best = {"plain": float("inf"), "latentlab": float("inf")}
    for _ in range(args.repeats):
        best["plain"] = min(best["plain"], plain_loop(args.model, args.steps, args.batch_size))
        best["latentlab"] = min(best["latentlab"], latentlab_loop(args.model, args.steps, args.batch_size))
    result: dict[str, Any] = {
        "workload": {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "lora": "r8 all-linear",
                     "data": "old-birds", "repeats": args.repeats},
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "steps_per_s": {k: round(args.steps / v, 3) for k, v in best.items()},
        "ratio": round(best["plain"] / best["latentlab"], 3),
        **provenance("cpu", load_before),
    }
    write_results(args.out, result, markdown)


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["workload"]
    return (
        f"# Finetuning throughput ({w['model']}, LoRA {w['lora']}, batch {w['batch_size']}, "
        f"{w['steps']} steps, CPU)\n\n"
        f"Load average before/after: {m['load_average_before']} / {m['load_average_after']}.\n\n"
        "| loop | seconds | steps/s |\n|---|---:|---:|\n"
        f"| plain peft + torch | {r['seconds']['plain']} | {r['steps_per_s']['plain']} |\n"
        f"| latentlab.finetune | {r['seconds']['latentlab']} | {r['steps_per_s']['latentlab']} |\n\n"
        f"Ratio latentlab / plain: **{r['ratio']:.2f}x** (target >= 0.95).\n"
    )


if __name__ == "__main__":
    main()
