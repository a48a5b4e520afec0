"""GPU check: the built-in models on CUDA in bfloat16 and float32; writes benchmarks/results/gpu.md.

Run on a CUDA machine with ``make gpu-check`` (after ``make setup TORCH=torch``; copy the converted
built-in cache, ``$LATENTLAB_HOME/models``, along to skip conversion). Per model and dtype it
measures, in one process:

- load seconds and peak GPU memory;
- collect (all layers, last position) tokens/s against the bare HF forward without the LM head on
  the same batches, and the largest relative difference to float32 HF hidden states;
- generation tokens/s (64 new tokens, 16 prompts) against HF ``generate`` on the same model;
- a 7-coefficient era steering sweep over 32 battery items (seconds, and the alpha 0 / +0.5 scores);
- a 2 layers x 2 positions patching grid with a finetune view (seconds);
- LoRA finetuning steps/s (10 steps, batch 8) and its peak memory.

Never part of CI: without CUDA it says so and exits 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent.parent
MODELS = ("gemma-3-270m", "smollm2-135m-instruct")
DTYPES = ("bfloat16", "float32")


def _sync() -> None:
    torch.cuda.synchronize()


def measure(name: str, dtype: str) -> dict[str, Any]:
    import latentlab as ll
    from latentlab.activations import Example, collect, encode, pad_batch, pad_id_of
    from latentlab.arch import decoder_blocks
    from latentlab.data import load_battery, load_prompts, render_prompt

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m = ll.load_model(name, device="cuda", dtype=dtype, progress=False)
    _sync()
    row: dict[str, Any] = {"model": name, "dtype": dtype, "load_s": round(time.perf_counter() - t0, 2)}
    prompts = [render_prompt(p, m.tokenizer) for p in load_prompts("unrelated")[:64]]
    enc = encode(m, [Example(p) for p in prompts])
    n_tok = sum(len(s) for s in enc.ids)
    collect(m, prompts[:8], "all", "last", progress=False)  # warm-up
    _sync()
    t0 = time.perf_counter()
    acts = collect(m, prompts, "all", "last", batch_size=16, progress=False).acts
    _sync()
    row["collect_tok_s"] = round(n_tok / (time.perf_counter() - t0), 1)
    blocks = decoder_blocks(m.hf_model)
    inner = m.hf_model.get_decoder() if hasattr(m.hf_model, "get_decoder") else m.hf_model.model
    order = sorted(range(len(prompts)), key=lambda i: len(enc.ids[i]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), 16):
            ids, mask = pad_batch([enc.ids[i] for i in order[b : b + 16]], pad_id_of(m), m.device)
            inner(input_ids=ids, attention_mask=mask, use_cache=False)
    _sync()
    row["bare_forward_tok_s"] = round(n_tok / (time.perf_counter() - t0), 1)
    row["collect_vs_bare"] = round(row["collect_tok_s"] / row["bare_forward_tok_s"], 3)
    del blocks
    ref = ll.load_model(name, device="cuda", dtype="float32", progress=False) if dtype != "float32" else m
    ref_acts = collect(ref, prompts[:8], "all", "last", progress=False).acts
    row["max_rel_diff_vs_fp32"] = round(float((acts[:8] - ref_acts).abs().max() / ref_acts.abs().max()), 5)
    if ref is not m:
        del ref
        torch.cuda.empty_cache()
    gp = prompts[:16]
    ll.generate(m, gp[:2], max_new_tokens=4)
    _sync()
    t0 = time.perf_counter()
    ll.generate(m, gp, max_new_tokens=64)
    _sync()
    row["generate_s"] = round(time.perf_counter() - t0, 2)
    genc = encode(m, [Example(p) for p in gp])
    width = max(len(s) for s in genc.ids)
    ids = torch.full((len(gp), width), pad_id_of(m))
    mask = torch.zeros_like(ids)
    for i, s in enumerate(genc.ids):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        m.hf_model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=64, do_sample=False,
                            pad_token_id=pad_id_of(m))
    _sync()
    row["hf_generate_s"] = round(time.perf_counter() - t0, 2)
    d, _ = ll.direction_and_probes(m, "era", "all", progress=False)
    items = load_battery("era-battery")[:32]
    t0 = time.perf_counter()
    res = ll.sweep(m, d, items, m.n_layers // 2, n_random=1, progress=False)
    _sync()
    row["steer_sweep_s"] = round(time.perf_counter() - t0, 2)
    table = {r["alpha"]: r["score"] for r in res.table()}
    row["steer_score_alpha0"] = round(table[0.0], 3)
    row["steer_score_alpha+0.5"] = round(table[0.5], 3)
    row["peak_gpu_mb_inference"] = round(torch.cuda.max_memory_allocated() / 2**20)
    del m
    torch.cuda.empty_cache()
    row |= finetune_steps(name, dtype)
    return row


def finetune_steps(name: str, dtype: str) -> dict[str, Any]:
    import tempfile

    from latentlab.data import bird_chats
    from latentlab.finetune import FinetuneConfig, finetune

    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = finetune(name, bird_chats("old"), Path(tmp) / "ft", FinetuneConfig(max_steps=12, checkpoint_every=100),
                       device="cuda", dtype=dtype, progress=False)
        _sync()
    return {
        "finetune_steps_s": round(len(res.losses) / max(res.seconds, 1e-9), 2),
        "finetune_wall_s": round(time.perf_counter() - t0, 2),
        "peak_gpu_mb_finetune": round(torch.cuda.max_memory_allocated() / 2**20),
    }


def markdown(rows: list[dict[str, Any]], gpu: str) -> str:
    cols = [k for k in rows[0] if k not in ("model", "dtype")]
    out = [f"# GPU check on {gpu}", "", "Written by `make gpu-check` (scripts/gpu_check.py); one process, run alone.",
           "", "| model | dtype | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in rows:
        out.append(f"| {r['model']} | {r['dtype']} | " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    if not torch.cuda.is_available():
        print("error: no CUDA device is visible, so there is nothing to check. Fix: run `make gpu-check` on a "
              "machine with an NVIDIA GPU and a CUDA build of torch (`make setup TORCH=torch`)", file=sys.stderr)
        raise SystemExit(2)
    from latentlab.io import write_json, write_text

    rows = []
    for name in MODELS:
        for dtype in DTYPES:
            print(f"gpu-check: {name} {dtype} ...", flush=True)
            rows.append(measure(name, dtype))
            print(json.dumps(rows[-1]), flush=True)
    gpu = torch.cuda.get_device_name(0)
    out = HERE / "benchmarks" / "results" / "gpu.json"
    write_json(out, {"gpu": gpu, "rows": rows, "torch": torch.__version__})
    write_text(out.with_suffix(".md"), markdown(rows, gpu))
    print(markdown(rows, gpu))


if __name__ == "__main__":
    main()
