"""Benchmark: how close does ``latentlab.collect`` get to the bare forward pass?

Measured in one process, on the *same* token batches (64 synthetic prompts x ~25 tokens, batch 16,
right-padded, sorted by length exactly as ``collect`` sorts them), best of 3 repeats after a
warm-up, methods interleaved within each repeat so machine noise hits all of them alike:

  a. ``latentlab.collect``: all layers, last position (end to end: tokenise, forward, pool)
  b. the bare HF forward pass without the LM head, ``model.hf_model.model(...)``: the limit
     (b2: the same on a separately loaded plain HF model, without the bridge's module wrappers)
  c. the bridge's ``run_with_cache`` with ``names_filter`` on the resid_post hooks
  d. the HF forward pass *with* the LM head (the logits), for scale

Then the memory of streaming: peak RSS growth of ``collect(..., out=tmp, shard_size=64,
load=False)`` on 256 vs 1024 examples, each in a fresh process (psutil sampling of the RSS every
5 ms, relative to the RSS after loading the model and a warm-up collect), to show memory does not
grow with the number of examples.

    python benchmarks/collect.py                       # gemma-3-270m
    python benchmarks/collect.py --model smollm2-135m-instruct --out benchmarks/results/collect-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _common import load_timed, provenance, write_results

HERE = Path(__file__).resolve().parent

WORDS = {
    "det": ["the", "a", "every", "one", "that", "our", "his", "her"],
    "adj": ["old", "quiet", "early", "distant", "small", "bright", "heavy", "careful", "modern", "busy"],
    "noun": ["farmer", "letter", "train", "river", "doctor", "market", "village", "teacher", "ship",
             "garden", "machine", "window", "soldier", "kitchen", "newspaper", "engine", "bridge"],
    "verb": ["carried", "watched", "found", "opened", "followed", "repaired", "described", "sold",
             "painted", "crossed", "visited", "remembered"],
    "prep": ["near", "behind", "across", "beside", "under", "after", "before", "through"],
    "tail": ["at dawn", "in the winter", "last week", "by the harbour", "on market day", "before supper",
             "without a word", "for the first time"],
}


def synthetic_text(rng: random.Random, min_words: int) -> str:
    """English-like sentences from a fixed grammar: deterministic for a given rng."""
    sentences: list[str] = []
    n = 0
    while n < min_words:
        w = WORDS
        s = (f"{rng.choice(w['det'])} {rng.choice(w['adj'])} {rng.choice(w['noun'])} {rng.choice(w['verb'])} "
             f"{rng.choice(w['det'])} {rng.choice(w['noun'])} {rng.choice(w['prep'])} {rng.choice(w['det'])} "
             f"{rng.choice(w['noun'])} {rng.choice(w['tail'])}.")
        sentences.append(s[0].upper() + s[1:])
        n += len(s.split())
    return " ".join(sentences)


def make_prompts(tokenizer: Any, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts of ``tokens`` tokens (BOS included), cut at a word boundary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = synthetic_text(rng, tokens * 2).split()
        text = words[0]
        for w in words[1:]:
            longer = text + " " + w
            if len(tokenizer(longer)["input_ids"]) > tokens:
                break
            text = longer
        out.append(text)
    return out


def same_batches(model: Any, texts: list[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches ``collect`` runs: one shard, examples sorted by length, right-padded."""
    from latentlab.activations import encode, pad_batch, pad_id_of
    from latentlab.data import as_examples

    enc = encode(model, as_examples(texts, model.tokenizer))
    order = sorted(range(len(texts)), key=lambda i: len(enc.ids[i]))
    pad = pad_id_of(model)
    return [pad_batch([enc.ids[i] for i in order[b:b + batch_size]], pad, model.device)
            for b in range(0, len(order), batch_size)]


def rss_sampler() -> tuple[Any, Any]:
    """Start sampling this process's RSS; return (stop() -> peak bytes, current() -> bytes)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the dev environment
        import resource

        def current_max() -> int:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        return (lambda: current_max()), current_max
    proc = psutil.Process()
    peak = {"v": proc.memory_info().rss}
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            peak["v"] = max(peak["v"], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=loop, daemon=True)
    t.start()

    def finish() -> int:
        stop.set()
        t.join()
        return max(peak["v"], proc.memory_info().rss)

    return finish, lambda: proc.memory_info().rss


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: peak RSS growth of a streamed collect of ``args.memory_child`` examples."""
    import gc

    import latentlab

    model = latentlab.load_model(args.model, device="cpu", progress=False)
    texts = make_prompts(model.tokenizer, args.memory_child, args.tokens, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        latentlab.collect(model, texts[:32], layers="all", position="last", batch_size=args.batch_size,
                          out=Path(tmp) / "warm", shard_size=64, load=False, progress=False)
        gc.collect()
        stop, current = rss_sampler()
        base = current()
        t0 = time.perf_counter()
        latentlab.collect(model, texts, layers="all", position="last", batch_size=args.batch_size,
                          out=Path(tmp) / "acts", shard_size=64, load=False, progress=False)
        seconds = time.perf_counter() - t0
        peak = stop()
        index = json.loads((Path(tmp) / "acts" / "activations.json").read_text())
        on_disk = sum(p.stat().st_size for p in (Path(tmp) / "acts").iterdir())
    print(json.dumps({
        "n_examples": args.memory_child,
        "n_tokens": index["n_tokens"],
        "shards": len(index["shards"]),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(index["n_tokens"] / seconds, 1),
        "rss_before_mb": round(base / 2**20, 1),
        "peak_rss_growth_mb": round((peak - base) / 2**20, 1),
        "activations_on_disk_mb": round(on_disk / 2**20, 1),
        "rss_method": "psutil sampling every 5 ms" if "psutil" in sys.modules else "getrusage ru_maxrss",
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-sizes", default="256,1024", help="example counts for the memory test ('' skips it)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "collect.json")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args)
        return

    import latentlab

    model, load_s, load_before = load_timed(args.model)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model.info.path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    texts = make_prompts(model.tokenizer, args.n_prompts, args.tokens)
    batches = same_batches(model, texts, args.batch_size)
    n_tokens = int(sum(int(m.sum()) for _, m in batches))
    resid_names = {f"blocks.{i}.hook_resid_post" for i in range(model.n_layers)}

    def run_collect() -> None:
        acts = latentlab.collect(model, texts, layers="all", position="last", batch_size=args.batch_size,
                                 progress=False)
        assert acts.meta["n_tokens"] == n_tokens  # the very same tokens as the other methods

    def run_hf_no_head() -> None:
        with torch.inference_mode():
            for ids, mask in batches:
                model.hf_model.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def run_plain_hf_no_head() -> None:
        with torch.inference_mode():
            for ids, mask in batches:
                plain.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def run_with_cache() -> None:
        with torch.inference_mode():
            for ids, mask in batches:
                _, cache = model.bridge.run_with_cache(ids, attention_mask=mask,
                                                       names_filter=lambda n: n in resid_names)
                assert len(cache) == model.n_layers

    def run_hf_with_head() -> None:
        with torch.inference_mode():
            for ids, mask in batches:
                model.hf_model(input_ids=ids, attention_mask=mask, use_cache=False)

    methods = {
        "a_latentlab_collect": run_collect,
        "b_hf_forward_no_lm_head": run_hf_no_head,
        "b2_plain_hf_forward_no_lm_head": run_plain_hf_no_head,
        "c_bridge_run_with_cache": run_with_cache,
        "d_hf_forward_with_lm_head": run_hf_with_head,
    }
    times: dict[str, list[float]] = {k: [] for k in methods}
    log(f"{args.model}: {len(texts)} prompts, {n_tokens} tokens, {len(batches)} batches; warm-up")
    for fn in methods.values():  # warm-up
        fn()
    for rep in range(args.repeats):
        log(f"repeat {rep + 1}/{args.repeats}")
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    speed = {
        name: {"best_s": round(min(ts), 3), "tokens_per_s": round(n_tokens / min(ts), 1),
               "all_s": [round(x, 3) for x in ts]}
        for name, ts in times.items()
    }
    ratio = speed["a_latentlab_collect"]["tokens_per_s"] / speed["b_hf_forward_no_lm_head"]["tokens_per_s"]

    log(f"speed: collect {speed['a_latentlab_collect']['tokens_per_s']} tok/s, "
        f"bare forward {speed['b_hf_forward_no_lm_head']['tokens_per_s']} tok/s (ratio {ratio:.2f})")
    memory: list[dict[str, Any]] = []
    result = {
        "benchmark": "collect",
        "model": args.model,
        "model_info": {k: model.info.to_dict()[k] for k in ("n_layers", "d_model", "d_vocab", "dtype",
                                                             "base_fingerprint")},
        "workload": {"n_prompts": args.n_prompts, "tokens_per_prompt_target": args.tokens,
                     "n_tokens": n_tokens, "batch_size": args.batch_size, "n_batches": len(batches),
                     "repeats": args.repeats, "statistic": "best of repeats after one warm-up",
                     "layers": "all", "position": "last"},
        "speed": speed,
        "ratio_collect_over_hf_no_lm_head": round(ratio, 3),
        "memory": memory,
        "model_load_s": round(load_s, 1),
        **provenance(model.device, load_before),
    }
    write_results(args.out, result, markdown)  # the speed results are kept even if a memory run fails
    for n in [int(x) for x in args.memory_sizes.split(",") if x.strip()]:
        log(f"memory: streaming {n} examples in a fresh process")
        proc = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
             "--batch-size", str(args.batch_size), "--memory-child", str(n)],
            capture_output=True, text=True, check=True,
        )
        memory.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log(f"memory: {memory[-1]}")
        result.update(provenance(model.device, load_before))  # load average after, again
        write_results(args.out, result, markdown)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def markdown(r: dict[str, Any]) -> str:
    w, m = r["workload"], r["machine"]
    lines = [
        f"# collect benchmark: {r['model']}",
        "",
        f"{w['n_prompts']} prompts x ~{w['tokens_per_prompt_target']} tokens ({w['n_tokens']} tokens), "
        f"batch {w['batch_size']}, all {r['model_info']['n_layers']} layers, last position; the same batches "
        f"for every method; {w['statistic']} ({w['repeats']}). {m['cpu_cores']} CPU cores, "
        f"{m['torch_threads']} torch threads, device {m['device']}; load average "
        f"{m['load_average_before'][0]} before, {m['load_average_after'][0]} after.",
        "",
        "| method | best s | tokens/s |",
        "|---|---:|---:|",
    ]
    labels = {
        "a_latentlab_collect": "a. `latentlab.collect` (all layers, last)",
        "b_hf_forward_no_lm_head": "b. HF forward, no LM head (`hf_model.model`): the limit",
        "b2_plain_hf_forward_no_lm_head": "b2. same, plain HF model (no bridge wrappers)",
        "c_bridge_run_with_cache": "c. bridge `run_with_cache` (resid_post filter)",
        "d_hf_forward_with_lm_head": "d. HF forward with the LM head (logits)",
    }
    for k, v in r["speed"].items():
        lines.append(f"| {labels.get(k, k)} | {v['best_s']:.2f} | {v['tokens_per_s']:.0f} |")
    lines += ["", f"**collect / bare forward (a/b): {r['ratio_collect_over_hf_no_lm_head']:.2f}**", ""]
    if r["memory"]:
        lines += [
            "Streaming memory: `collect(..., out=tmp, shard_size=64, load=False)`, each size in a fresh process.",
            "",
            "| examples | tokens | shards | peak RSS growth MB | on disk MB | tokens/s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for x in r["memory"]:
            lines.append(f"| {x['n_examples']} | {x['n_tokens']} | {x['shards']} | {x['peak_rss_growth_mb']:.1f} "
                         f"| {x['activations_on_disk_mb']:.1f} | {x['tokens_per_s']:.0f} |")
        lines += ["", f"RSS measured by {r['memory'][0]['rss_method']}, relative to the RSS after loading the model "
                      "and a warm-up collect."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
