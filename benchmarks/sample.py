"""Benchmark: in-process sampling (``latentlab sample``'s engine) against Hugging Face ``generate`` sampling.

Workload: smollm2-135m-instruct, the first 8 built-in era questions (rendered with the chat template),
4 samples per question, temperature 1, top-p 1 (no top-k), 48 new tokens at most, one batch of 32 rows.
Methods, interleaved within each repeat, best of 2 after a warm-up:

  a. ``latentlab.sampling.local_samples`` over one arm (the base), batch size 32: the unit layout, seeds,
     hooks context and row bookkeeping of ``latentlab sample``, with the KV-cache generator;
  b. HF ``generate(do_sample=True, temperature=1, top_p=1, top_k=0)`` on a separately loaded plain HF model
     (no bridge, no hooks), the same token ids left-padded into the same 32-row batch (each question
     repeated 4 times in a row, as latentlab lays them out);
  c. the same HF ``generate`` call on latentlab's own model (``model.hf_model``: the HF model with the
     TransformerLens bridge's components inside, which latentlab's hooks need) and none of latentlab's
     bookkeeping: where c is as slow as a, the gap to b is the bridge's (its attention is reimplemented
     in Python to fire its hooks), not latentlab's.

Sampled answers differ between the two (different random streams), so each side counts the tokens it
actually generated (up to and including a stop token) and the comparison is new tokens per second.
Reported: tokens/s of each, the ratio a / b (target >= 0.85) and c / b (the bridge's share of the gap).

    python benchmarks/sample.py            # full run: ~2 minutes on an idle 2-core CPU
    python benchmarks/sample.py --quick --out /tmp/sample.json   # dry run: 2 questions x 2 samples x 8 tokens
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import benchmark_args, load_timed, provenance, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-questions", type=int, default=8)
    ap.add_argument("--n", type=int, default=4, help="samples per question")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a tiny dry run (2 questions x 2 samples x 8 tokens)")
    args = benchmark_args(ap, "sample", markdown)
    if args.quick:
        args.n_questions, args.n, args.max_new_tokens, args.repeats = 2, 2, 8, 1
    from transformers import AutoModelForCausalLM

    from latentlab.activations import Example, encode, pad_id_of
    from latentlab.arch import stop_token_ids
    from latentlab.arms import Arm, prepared_arms
    from latentlab.data import render_prompt
    from latentlab.sampling import load_questions, local_samples

    model, load_s, load_before = load_timed(args.model)
    plain = AutoModelForCausalLM.from_pretrained(model.info.path, dtype=torch.float32).eval()
    questions = load_questions("era-questions")[: args.n_questions]
    rows = len(questions) * args.n
    prepared = prepared_arms(model, [Arm("base")])

    prompts = [render_prompt(list(q.messages), model.tokenizer) for q in questions]
    enc = encode(model, [Example(p) for p in prompts])
    seqs = [s for s in enc.ids for _ in range(args.n)]  # prompt-major, as generate_samples lays rows out
    width = max(len(s) for s in seqs)
    pad = pad_id_of(model)
    ids = torch.full((rows, width), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    stops = sorted(stop_token_ids(model))

    def hf(n_new: int, seed: int, on: Any = plain) -> tuple[float, int]:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = on.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=True,
                              temperature=1.0, top_p=1.0, top_k=0, eos_token_id=stops, pad_token_id=pad)
        s = time.perf_counter() - t0
        return s, sum(_generated(r, stops) for r in out[:, width:].tolist())

    def ours(n_new: int, seed: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        got = local_samples(model, prepared, questions, args.n, 1.0, 1.0, n_new, seed, batch_size=rows)
        s = time.perf_counter() - t0
        if len(got) != rows:
            raise SystemExit(f"local_samples returned {len(got)} rows, expected {rows}")
        return s, sum(r["n_tokens"] + (r["finish_reason"] == "stop") for r in got)

    def hf_bridge(n_new: int, seed: int) -> tuple[float, int]:
        return hf(n_new, seed, model.hf_model)

    hf(4, 0), ours(4, 0), hf_bridge(4, 0)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {"hf": [], "latentlab": [], "hf-bridge": []}
    for rep in range(args.repeats):
        for name, fn in (("hf", hf), ("latentlab", ours), ("hf-bridge", hf_bridge)):
            s, toks = fn(args.max_new_tokens, 1 + rep)
            runs[name].append({"seconds": round(s, 3), "new_tokens": toks, "tok_per_s": round(toks / s, 1)})
            print(name, runs[name][-1], flush=True)
    best = {k: max(v, key=lambda r: r["tok_per_s"]) for k, v in runs.items()}
    result = {
        "workload": {"model": args.model, "questions": "era-questions", "n_questions": len(questions),
                     "samples_per_question": args.n, "rows_per_batch": rows, "max_new_tokens": args.max_new_tokens,
                     "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repeats": args.repeats, "quick": args.quick},
        "load_seconds": round(load_s, 2),
        "runs": runs,
        "best": best,
        "ratio": round(best["latentlab"]["tok_per_s"] / best["hf"]["tok_per_s"], 3),
        "ratio_bridge": round(best["hf-bridge"]["tok_per_s"] / best["hf"]["tok_per_s"], 3),
        **provenance(model.device, load_before),
    }
    write_results(args.out, result, markdown)


def _generated(row: list[int], stops: list[int]) -> int:
    """Tokens a row really generated: up to and including its first stop token (the rest is padding)."""
    k = next((i for i, t in enumerate(row) if t in stops), None)
    return len(row) if k is None else k + 1


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["workload"]
    lines = [
        f"# Sampling: latentlab (in process) vs Hugging Face generate ({w['model']}, {w['n_questions']} questions "
        f"x {w['samples_per_question']} samples, temperature {w['temperature']}, {w['max_new_tokens']} new tokens, "
        f"{m['device']})",
        "",
        f"Load average before/after: {m['load_average_before']} / {m['load_average_after']} ({m['cpu_cores']} cores, "
        f"{m['torch_threads']} torch threads). One batch of {w['rows_per_batch']} left-padded rows each way; tokens "
        "counted as generated (a stop token included). Best of "
        f"{w['repeats']}. Ratio = latentlab tok/s / HF tok/s (target >= 0.85).",
        "",
        "| method | new tokens | seconds | tok/s |",
        "|---|---:|---:|---:|",
    ]
    names = {"hf": "HF generate, plain HF model", "latentlab": "latentlab (local_samples)",
             "hf-bridge": "HF generate on latentlab's bridged model"}
    for name in ("hf", "latentlab", "hf-bridge"):
        if name in r["best"]:
            b = r["best"][name]
            lines.append(f"| {names[name]} | {b['new_tokens']} | {b['seconds']} | {b['tok_per_s']} |")
    lines += ["", f"Ratio: **{r['ratio']:.2f}x**" + (" (quick dry run: not a measurement)" if w.get("quick") else "")]
    if "ratio_bridge" in r:
        lines += ["", f"HF generate on the bridged model / on the plain model: {r['ratio_bridge']:.2f}x (the bridge's "
                  "share of the gap; latentlab's own bookkeeping is the rest)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
