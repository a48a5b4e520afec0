"""Benchmark: peak memory of shift / ablate / trigger with 1, 2 and 4 finetunes on one base, and time as work grows.

Every finetune is a LoRA adapter switched on the one loaded base (``LoadedModel.with_adapter``), so memory
should grow by the adapters' own weights only. The adapters are random PEFT LoRA adapters (rank 8 on all
linear layers, as ``latentlab finetune`` trains them, lora_B non-zero), made with peft's ``get_peft_model``
and saved: the claim is about adapters resident, not their training. Each row is its own process (peak
RSS is per process, ``ru_maxrss``), on CPU, with a random direction on every layer.

Part 1, the built-in (default smollm2-135m-instruct, float32):

  shift    ``analyze_shift`` with N finetunes (64 unrelated prompts, n_random 20);
  ablate   ``ablate`` of each of the N finetunes in turn (16 era-battery items, all layers, n_random 10);
  trigger  ``trigger_scan`` of each of the N finetunes in turn (values 2000:2030:10, 16 prompts, all layers).

N = 0 is each analysis's one-model floor, the same work with the base in the finetune's place (shift: the
base's activations collected twice and projected; ablate / trigger: the loaded base passed as the
finetune). Reported: peak RSS per N, its ratio to the floor (target <= 1.05 at N = 4) and to N = 1.

Part 2, a random-weight Llama-style model of ~0.85B parameters in bfloat16 built from a config, no hub
(``LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
num_key_value_heads=4, vocab_size=32000)``), saved to a temporary folder with a character-level tokenizer
(as tests/conftest.py's ``make_char_tokenizer`` / ``save_tiny_model``): the same rows for shift only by
default (``--big-modes``; ablate and trigger score far more sequences and take tens of minutes there), on
32 prompts, floor = the base's activations collected twice.

Part 3, time as the work grows, on the ~0.85B model, one process (after a warm-up): ``collect``
(last-token activations, ``last_token_acts``) at 16, 32, 64 prompts on all layers and at layers 0..3,
0..7 and all 16 on 64 prompts (the forward stops after the deepest layer asked for); ``analyze_shift``
with one finetune at 16, 32, 64 prompts (shift always reads every layer, so it has no layer axis). Each
series gets a least-squares line: slope (s per prompt, s per layer), intercept and R^2.

    python benchmarks/memory_finetunes.py     # full run: ~25 minutes on an idle 2-core CPU (peak ~6 GB RAM)
    python benchmarks/memory_finetunes.py --quick --out /tmp/memory_finetunes.json   # dry run: tiny sizes
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

ANALYSES = ("shift", "ablate", "trigger")
BIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
       "num_key_value_heads": 4, "vocab_size": 32000}
QUICK_BIG = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 32000}
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


# --------------------------------------------------------------------------------------------
# Models and adapters (made in a child process, so the parent stays small).
# --------------------------------------------------------------------------------------------


def char_tokenizer() -> Any:
    """A character-level fast tokenizer (BPE without merges), <bos> prepended, built offline."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.add_special_tokens(SPECIALS)
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                      special_tokens=[("<bos>", vocab["<bos>"])])
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_big(folder: Path, shape: dict[str, int]) -> Path:
    """A random-weight Llama-style model in bfloat16 from a config, saved with the char tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))
    char_tokenizer().save_pretrained(str(folder))
    return folder


def make_adapters(model_path: str, folder: Path, count: int, rank: int, dtype: str) -> list[Path]:
    """``count`` random LoRA adapters (all linear layers, non-zero lora_B) of the model at ``model_path``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    out = []
    for i in range(count):
        pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(1 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))
        pm.save_pretrained(str(folder / f"adapter-{i}"))
        out.append(folder / f"adapter-{i}")
        base = pm.unload()
    return out


def prepare(args: argparse.Namespace) -> None:
    """Child: the model path (building the big one) and its adapters, as JSON on the last line."""
    t0 = time.perf_counter()
    folder = Path(args.folder)
    if args.build is not None:
        path = str(build_big(folder / "model", json.loads(args.build)))
    else:
        import latentlab as ll

        path = ll.load_model(args.model, device="cpu", progress=False).info.path
    built = time.perf_counter() - t0
    adapters = make_adapters(path, folder / "adapters", args.n_adapters, args.rank, args.dtype)
    size = sum(f.stat().st_size for a in adapters for f in a.rglob("*") if f.is_file()) / len(adapters) / 2**20
    print(json.dumps({"model": path, "adapters": [str(a) for a in adapters], "adapter_mb": round(size, 2),
                      "build_seconds": round(built, 1), "seconds": round(time.perf_counter() - t0, 1)}))


# --------------------------------------------------------------------------------------------
# One row: one analysis with N finetunes, in its own process.
# --------------------------------------------------------------------------------------------


def random_direction(base: Any) -> Any:
    import torch

    from latentlab.directions import Direction

    g = torch.Generator().manual_seed(0)
    return Direction(torch.randn(base.n_layers, base.d_model, generator=g), list(range(base.n_layers)),
                     torch.ones(base.n_layers), name="random")


def row(args: argparse.Namespace) -> None:
    """Child: load the base, run ``args.analysis`` with the first ``args.count`` adapters, print peak RSS."""
    import latentlab as ll
    from latentlab.activations import last_token_acts
    from latentlab.data import load_battery, load_prompts

    t0 = time.perf_counter()
    base = ll.load_model(args.model, device="cpu", dtype=args.dtype, progress=False)
    load_s = time.perf_counter() - t0
    d = random_direction(base)
    adapters = args.adapters[: args.count]
    prompts = load_prompts("unrelated")
    t1 = time.perf_counter()
    if args.analysis == "shift":
        ps = prompts[: args.n_prompts]
        if args.count == 0:
            from latentlab.shift import projection_stats

            h_base = last_token_acts(base, ps)
            h = last_token_acts(base, ps)
            projection_stats(h - h_base, d.units(), args.n_random_shift, 0)
        else:
            ll.analyze_shift(base, {f"ft{i}": a for i, a in enumerate(adapters)}, d, ps, n_random=args.n_random_shift,
                             progress=False)
    elif args.analysis == "ablate":
        from latentlab.ablation import ablate

        items = load_battery("era-battery")[: args.n_items]
        for a in adapters or [base]:
            ablate(base, a, d, items, layers="all", n_random=args.n_random_ablate)
    elif args.analysis == "trigger":
        from latentlab.triggers import parse_values, trigger_scan

        values = parse_values(args.trigger_values)
        for a in adapters or [base]:
            trigger_scan(base, a, values=values, prompts=prompts[: args.trigger_prompts], direction=d, layers="all",
                         training=[], warn_tokens=False)
    work_s = time.perf_counter() - t1
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"analysis": args.analysis, "finetunes": args.count, "peak_rss_mb": round(peak_mb, 1),
                      "load_seconds": round(load_s, 2), "work_seconds": round(work_s, 2)}))


# --------------------------------------------------------------------------------------------
# Time against prompts and layers (one process).
# --------------------------------------------------------------------------------------------


def scaling(args: argparse.Namespace) -> None:
    """Child: collect / shift wall time against the number of prompts and layers, as JSON."""
    import latentlab as ll
    from latentlab.activations import last_token_acts
    from latentlab.data import load_prompts

    base = ll.load_model(args.model, device="cpu", dtype=args.dtype, progress=False)
    d = random_direction(base)
    prompts = load_prompts("unrelated")
    counts = [int(x) for x in args.scaling_prompts.split(",")]
    top = max(counts)
    layer_counts = [base.n_layers if x == "all" else int(x) for x in args.scaling_layers.split(",")]
    last_token_acts(base, prompts[:2])  # warm-up
    ll.analyze_shift(base, {"ft": args.adapters[0]}, d, prompts[:2], n_random=args.n_random_shift, progress=False)

    def timed(fn: Any) -> float:
        t = time.perf_counter()
        fn()
        return round(time.perf_counter() - t, 3)

    out: dict[str, Any] = {"n_layers": base.n_layers, "series": {}}
    out["series"]["collect_vs_prompts"] = {
        "x": counts, "x_name": "prompts", "layers": "all",
        "seconds": [timed(lambda n=n: last_token_acts(base, prompts[:n])) for n in counts]}
    out["series"]["collect_vs_layers"] = {
        "x": layer_counts, "x_name": "layers", "prompts": top,
        "seconds": [timed(lambda k=k: last_token_acts(base, prompts[:top], layers=list(range(k))))
                    for k in layer_counts]}
    out["series"]["shift_vs_prompts"] = {
        "x": counts, "x_name": "prompts", "finetunes": 1,
        "seconds": [timed(lambda n=n: ll.analyze_shift(base, {"ft": args.adapters[0]}, d, prompts[:n],
                                                       n_random=args.n_random_shift, progress=False))
                    for n in counts]}
    print(json.dumps(out))


def fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares line y = slope x + intercept and its R^2."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx if sxx else 0.0
    icpt = my - slope * mx
    ss_res = sum((b - (slope * a + icpt)) ** 2 for a, b in zip(x, y))
    ss_tot = sum((b - my) ** 2 for b in y)
    return {"slope": round(slope, 4), "intercept": round(icpt, 3),
            "r2": round(1 - ss_res / ss_tot, 4) if ss_tot else 1.0}


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------


def child(mode: str, args: argparse.Namespace, **kw: Any) -> dict[str, Any]:
    """Run this script as a child in ``mode``; its last stdout line is the JSON result."""
    opts = {"model": args.model, "dtype": args.dtype, "n_prompts": args.n_prompts, "n_items": args.n_items,
            "n_random_shift": args.n_random_shift, "n_random_ablate": args.n_random_ablate,
            "trigger_values": args.trigger_values, "trigger_prompts": args.trigger_prompts,
            "scaling_prompts": args.scaling_prompts, "scaling_layers": args.scaling_layers, "rank": args.rank, **kw}
    cmd = [sys.executable, __file__, "--child", mode]
    for k, v in opts.items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        cmd += [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not p.stdout.strip():
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-25:])
        raise SystemExit(f"child {mode} {kw} failed (status {p.returncode}):\n{tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def memory_rows(args: argparse.Namespace, prep: dict[str, Any], modes: list[str], counts: list[int],
                **kw: Any) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for a in modes:
        rows[a] = []
        for n in [0, *counts]:
            r = child("row", args, analysis=a, count=n, adapters=prep["adapters"], **kw)
            print(r, flush=True)
            rows[a].append(r)
    ratios = {a: {str(r["finetunes"]): {"vs_floor": round(r["peak_rss_mb"] / rs[0]["peak_rss_mb"], 3),
                                        "vs_one_finetune": round(r["peak_rss_mb"] / rs[1]["peak_rss_mb"], 3)}
                  for r in rs[1:]} for a, rs in rows.items()}
    return {"rows": rows, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--modes", default="shift,ablate,trigger", help="analyses for the built-in model")
    ap.add_argument("--counts", default="1,2,4", help="numbers of finetunes")
    ap.add_argument("--n-prompts", type=int, default=64, help="shift prompts (built-in model)")
    ap.add_argument("--n-items", type=int, default=16, help="era-battery items ablate scores")
    ap.add_argument("--n-random-shift", type=int, default=20)
    ap.add_argument("--n-random-ablate", type=int, default=10)
    ap.add_argument("--trigger-values", default="2000:2030:10")
    ap.add_argument("--trigger-prompts", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--no-big", action="store_true", help="skip the ~0.85B model (parts 2 and 3)")
    ap.add_argument("--big-modes", default="shift", help="analyses on the ~0.85B model (shift,ablate,trigger)")
    ap.add_argument("--big-prompts", type=int, default=32, help="shift prompts on the ~0.85B model")
    ap.add_argument("--scaling-prompts", default="16,32,64")
    ap.add_argument("--scaling-layers", default="4,8,all")
    ap.add_argument("--quick", action="store_true", help="a tiny dry run (1 and 2 finetunes, few prompts, a "
                    "~4M-parameter stand-in for the ~0.85B model)")
    ap.add_argument("--child", choices=("prepare", "row", "scaling"))
    ap.add_argument("--folder")
    ap.add_argument("--build")
    ap.add_argument("--n-adapters", type=int, default=4)
    ap.add_argument("--analysis", choices=ANALYSES)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--adapters", nargs="*", default=[])
    if "--child" in sys.argv:
        a = ap.parse_args()
        {"prepare": prepare, "row": row, "scaling": scaling}[a.child](a)
        return
    args = benchmark_args(ap, "memory_finetunes", markdown)
    shape = BIG
    if args.quick:
        args.counts, args.n_prompts, args.n_items, args.trigger_prompts = "1,2", 8, 4, 4
        args.trigger_values = "2000,2010"
        args.big_prompts, args.scaling_prompts, args.scaling_layers, shape = 8, "4,8", "1,2,all", QUICK_BIG
    counts = [int(c) for c in args.counts.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    big_modes = [m for m in args.big_modes.split(",") if m]
    for m in modes + big_modes:
        if m not in ANALYSES:
            raise SystemExit(f"unknown analysis {m!r}: use {', '.join(ANALYSES)}")
    load_before = os.getloadavg()
    t_all = time.perf_counter()
    result: dict[str, Any] = {
        "workload": {"model": args.model, "dtype": args.dtype, "counts": counts, "modes": modes,
                     "adapters": f"random LoRA r{args.rank} on all linear layers (peft get_peft_model), non-zero B",
                     "shift": {"prompts": args.n_prompts, "n_random": args.n_random_shift},
                     "ablate": {"battery": "era-battery", "items": args.n_items, "layers": "all",
                                "n_random": args.n_random_ablate},
                     "trigger": {"values": args.trigger_values, "prompts": args.trigger_prompts, "layers": "all"},
                     "floor": "N=0: the same work with the base in the finetune's place", "quick": args.quick},
    }
    with tempfile.TemporaryDirectory(prefix="bench-memft-") as tmp:
        n_ad = max(counts)
        prep = child("prepare", args, folder=str(Path(tmp) / "small"), n_adapters=n_ad)
        print("adapters ready:", prep, flush=True)
        result["small"] = {"adapter_mb": prep["adapter_mb"], **memory_rows(args, prep, modes, counts)}
        if not args.no_big:
            big = child("prepare", args, folder=str(Path(tmp) / "big"), n_adapters=n_ad, build=json.dumps(shape),
                        dtype="bfloat16")
            print("big model ready:", big, flush=True)
            n_params = _params(shape)
            result["big"] = {"config": shape, "parameters": n_params, "dtype": "bfloat16", "modes": big_modes,
                             "prompts": args.big_prompts, "build_seconds": big["build_seconds"],
                             "adapter_mb": big["adapter_mb"],
                             **memory_rows(args, big, big_modes, counts, model=big["model"], dtype="bfloat16",
                                           n_prompts=args.big_prompts)}
            sc = child("scaling", args, model=big["model"], dtype="bfloat16", adapters=big["adapters"][:1])
            for s in sc["series"].values():
                s["fit"] = fit([float(v) for v in s["x"]], s["seconds"])
            result["scaling"] = {"model": "the ~0.85B model above" if not args.quick else "the quick stand-in", **sc}
            print("scaling:", sc, flush=True)
    result["total_seconds"] = round(time.perf_counter() - t_all, 1)
    result.update(provenance("cpu", load_before))
    write_results(args.out, result, markdown)


def _params(shape: dict[str, int]) -> int:
    """Parameters of the Llama config (untied embeddings)."""
    h, f, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return n * per_layer + 2 * v * h + h


def _table(part: dict[str, Any]) -> list[str]:
    lines = ["| analysis | finetunes | peak RSS MB | vs floor (N=0) | vs 1 finetune | load s | work s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for a, rs in part["rows"].items():
        for r in rs:
            rat = part["ratios"][a].get(str(r["finetunes"]))
            lines.append(f"| {a} | {r['finetunes'] or '0 (floor)'} | {r['peak_rss_mb']} | "
                         f"{'' if rat is None else format(rat['vs_floor'], '.3f') + 'x'} | "
                         f"{'' if rat is None else format(rat['vs_one_finetune'], '.3f') + 'x'} | "
                         f"{r['load_seconds']} | {r['work_seconds']} |")
    return lines


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["workload"]
    lines = [
        "# Peak memory with 1, 2 and 4 finetunes on one base, and time as the work grows (CPU)",
        "",
        f"Load average before/after: {m['load_average_before']} / {m['load_average_after']} ({m['cpu_cores']} cores, "
        f"{m['torch_threads']} torch threads). Each memory row is its own process (peak RSS). Finetunes: "
        f"{w['adapters']}. Floor: {w['floor']}. Target: <= 1.05x the floor with 4 finetunes. "
        f"Total {r['total_seconds']} s." + (" Quick dry run: not a measurement." if w.get("quick") else ""),
        "",
        f"## {w['model']} ({w['dtype']})",
        "",
        f"shift: {w['shift']['prompts']} prompts, n_random {w['shift']['n_random']}; ablate: {w['ablate']['items']} "
        f"era-battery items, all layers, n_random {w['ablate']['n_random']}, once per finetune; trigger: values "
        f"{w['trigger']['values']}, {w['trigger']['prompts']} prompts, all layers, once per finetune. "
        f"Adapter on disk: {r['small']['adapter_mb']} MB each.",
        "",
        *_table(r["small"]),
    ]
    if "big" in r:
        b = r["big"]
        lines += ["", f"## Random-weight Llama-style model, {b['parameters'] / 1e9:.2f}B parameters, bfloat16",
                  "", f"Config {b['config']} (built in {b['build_seconds']} s, char-level tokenizer); "
                  f"{', '.join(b['modes'])} on {b['prompts']} prompts. Adapter on disk: {b['adapter_mb']} MB each.",
                  "", *_table(b)]
    if "scaling" in r:
        s = r["scaling"]
        lines += ["", f"## Time against prompts and layers ({s['model']}, {s['n_layers']} layers)", "",
                  "Layers k = layers 0..k-1 (the forward stops after the deepest). Shift: one finetune, all layers.",
                  "", "| series | x | seconds | slope (s per unit) | intercept s | R^2 |",
                  "|---|---|---|---:|---:|---:|"]
        for name, v in s["series"].items():
            f = v["fit"]
            lines.append(f"| {name} | {v['x_name']} {v['x']} | {v['seconds']} | {f['slope']} | {f['intercept']} | "
                         f"{f['r2']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
