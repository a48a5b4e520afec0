"""Benchmark: latentlab's generation (KV cache, steering hooks) against Hugging Face ``generate``.

Workload: gemma-3-270m, 8 unrelated prompts (rendered as the model reads them), greedy, 64 and 256
new tokens, one batch. Methods, interleaved within each repeat, best of 2 after a warm-up:

  a. ``latentlab.generate`` unsteered;
  b. ``latentlab.generate`` steered (a random norm-matched vector at layer 6, alpha 0.25, all positions);
  c. HF ``generate`` with its KV cache on a separately loaded plain HF model (no bridge, no hooks),
     same left-padded batch: the speed a researcher would get without latentlab.

Reported: new tokens per second (tokens actually generated, EOS included) and the ratio a / c
(target >= 0.8). Unsteered latentlab output must equal HF's token for token.

    python benchmarks/generate.py
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import benchmark_args, load_timed, provenance, write_results

LENGTHS = (64, 256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = benchmark_args(ap, "generate", markdown)
    from transformers import AutoModelForCausalLM

    import latentlab as ll
    from latentlab.activations import Example, encode, pad_id_of
    from latentlab.arch import stop_token_ids
    from latentlab.data import load_prompts, render_prompt
    from latentlab.interventions import Steer
    from latentlab.stats import random_units

    model, load_s, load_before = load_timed(args.model)
    plain = AutoModelForCausalLM.from_pretrained(model.info.path, dtype=torch.float32).eval()
    prompts = [render_prompt(p, model.tokenizer) for p in load_prompts("unrelated")[: args.n_prompts]]
    layer = model.n_layers // 3
    vec = random_units((model.d_model,), seed=1) * 0.25 * _resid_norm(model, prompts, layer)
    steer = Steer({layer: vec}, "all", "random")
    enc = encode(model, [Example(p) for p in prompts])
    width = max(len(s) for s in enc.ids)
    pad = pad_id_of(model)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(enc.ids):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    stops = sorted(stop_token_ids(model))

    def hf(n: int) -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                 eos_token_id=stops, pad_token_id=pad)
        return time.perf_counter() - t0, _cut(out[:, width:].tolist(), stops)

    def ours(n: int, steered: bool) -> tuple[float, list[list[int]]]:
        seen: list[list[int]] = []
        real = model.tokenizer.decode

        def spy(t: Any, **kw: Any) -> str:
            seen.append(list(t))
            return real(t, **kw)

        model.tokenizer.decode = spy
        try:
            t0 = time.perf_counter()
            ll.generate(model, prompts, [(steer, 1.0) if steered else (None, 0.0)], max_new_tokens=n)
            return time.perf_counter() - t0, seen
        finally:
            model.tokenizer.decode = real

    hf(8), ours(8, False), ours(8, True)  # warm-up
    rows = []
    for n in LENGTHS:
        best: dict[str, float] = {}
        toks: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, fn in (("hf", lambda n=n: hf(n)), ("latentlab", lambda n=n: ours(n, False)),
                             ("latentlab_steered", lambda n=n: ours(n, True))):
                s, out = fn()
                best[name] = min(best.get(name, float("inf")), s)
                toks[name] = sum(len(o) for o in out)
                if name == "hf":
                    ref = out
                elif name == "latentlab" and out != ref:
                    raise SystemExit(f"latentlab's greedy output differs from HF's at {n} new tokens")
        rows.append({
            "new_tokens": n,
            **{f"{k}_s": round(v, 3) for k, v in best.items()},
            **{f"{k}_tok_per_s": round(toks[k] / best[k], 1) for k in best},
            "ratio_unsteered": round(best["hf"] / best["latentlab"], 3),
            "ratio_steered": round(best["hf"] / best["latentlab_steered"], 3),
        })
    result = {
        "workload": {"model": args.model, "n_prompts": len(prompts), "greedy": True, "lengths": list(LENGTHS),
                     "steer_layer": layer, "repeats": args.repeats},
        "load_seconds": round(load_s, 2),
        "rows": rows,
        **provenance(model.device, load_before),
    }
    write_results(args.out, result, markdown)


def _resid_norm(model: Any, prompts: list[str], layer: int) -> float:
    from latentlab.activations import collect

    return float(collect(model, prompts, [layer], "last", progress=False).acts.norm(dim=-1).mean())


def _cut(rows: list[list[int]], stops: list[int]) -> list[list[int]]:
    out = []
    for r in rows:
        k = next((i for i, t in enumerate(r) if t in stops), None)
        out.append(r if k is None else r[: k + 1])
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# Generation: latentlab vs Hugging Face generate ({r['workload']['model']}, "
        f"{r['workload']['n_prompts']} prompts, greedy, {m['device']})",
        "",
        f"Load average before/after: {m['load_average_before']} / {m['load_average_after']} "
        f"({m['cpu_cores']} cores). Ratio = HF seconds / latentlab seconds (target >= 0.8).",
        "",
        "| new tokens | HF tok/s | latentlab tok/s | steered tok/s | ratio | ratio steered |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['new_tokens']} | {row['hf_tok_per_s']} | {row['latentlab_tok_per_s']} | "
            f"{row['latentlab_steered_tok_per_s']} | {row['ratio_unsteered']:.2f}x | {row['ratio_steered']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
