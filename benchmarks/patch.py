"""Benchmark: what does running a whole patching grid as one batched job buy?

Workload: prompt-pair patching on gemma-3-270m (no finetune needed): the first N=16 era-battery items
with the clean prefix "The year is 1850." patched into the corrupted "The year is 2024." (4-digit
years tokenise alike, so positions line up). Grid: every 2nd layer (9 layers) x positions
(all, prompt, -1, -2) x modes (full, era-direction) = 72 cells, each scoring 2N = 32 sequences
(positive and negative completion of each item): 2304 scored sequences. Timed, best of 2 repeats
after a warm-up, methods interleaved within each repeat:

  a. one ``patch_grid`` call (every (cell, sequence) is a row of one length-sorted batched job,
     logits only at completion positions; includes capturing the source activations and scoring
     target and source baselines)
  b. the usual notebook loop: cache the clean run once (``run_with_cache``), then one hooked
     ``run_with_hooks`` per cell over all 2N sequences of that cell (batched over items, full logits)
  c. the naive loop: one hooked full-logits forward per (cell, sequence). Timed on the first 4 cells
     only and extrapolated linearly to all 72.

Every method's cell scores are checked against (a) before anything is reported.

    python benchmarks/patch.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import benchmark_args, load_timed, provenance, write_results

CLEAN, CORRUPT = "The year is 1850.", "The year is 2024."
POSITIONS = ["all", "prompt", "-1", "-2"]
MODES = ["full", "direction"]


def _cell_hook(
    cell: tuple[str, int, str], seq_idx: list[int], plens: list[int], lens: list[int],
    clean: dict[int, list[torch.Tensor]], units: dict[int, torch.Tensor], width: int,
) -> Callable[..., torch.Tensor]:
    """The hook a researcher writes for one cell: overwrite (the direction component of) the chosen
    positions with the clean run's activations."""
    from latentlab.patching import _positions

    mode, layer, pos = cell
    src = torch.zeros(len(seq_idx), width, clean[layer][0].shape[-1])
    pmask = torch.zeros(len(seq_idx), width, dtype=torch.bool)
    for j, s in enumerate(seq_idx):
        src[j, : lens[s]] = clean[layer][s]
        for p in _positions(pos, plens[s], lens[s]):
            pmask[j, p] = True

    def hook(t: torch.Tensor, hook: Any) -> torch.Tensor:
        s_ = src.to(t.dtype)
        if mode == "direction":
            u = units[layer].to(t.dtype)
            s_ = t + ((s_ - t) @ u)[..., None] * u
        return torch.where(pmask[..., None], s_, t)

    return hook


def _logits_scores(model: Any, ids: list[list[int]], plens: list[int], seq_idx: list[int],
                   hooks: list[tuple[str, Callable[..., Any]]]) -> torch.Tensor:
    """log P(completion) per sequence from a full-logits hooked forward (right padding: causal
    attention never lets a real token see a pad, so no mask is needed)."""
    from latentlab.activations import pad_batch, pad_id_of

    seqs = [ids[s] for s in seq_idx]
    x, _ = pad_batch(seqs, pad_id_of(model), model.device)
    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(x, fwd_hooks=hooks, return_type="logits")
    lp = torch.log_softmax(logits.float(), dim=-1)
    out = torch.zeros(len(seqs))
    for j, (s, seq) in enumerate(zip(seq_idx, seqs)):
        out[j] = sum(float(lp[j, p, seq[p + 1]]) for p in range(plens[s] - 1, len(seq) - 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--n-items", type=int, default=16)
    ap.add_argument("--layer-step", type=int, default=2)
    ap.add_argument("--naive-cells", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = benchmark_args(ap, "patch", markdown)

    import latentlab
    from latentlab.activations import resid_hook_name
    from latentlab.patching import capture, patch_grid, prefixed
    from latentlab.steering import _sequences

    model, load_s, load_before = load_timed(args.model)
    layers = list(range(0, model.n_layers, args.layer_step))
    t0 = time.perf_counter()
    direction = latentlab.find_direction(model, "era", layers=layers, progress=False)
    direction_s = time.perf_counter() - t0
    items = latentlab.load_battery("era-battery")[: args.n_items]
    clean_items, corrupt_items = prefixed(items, CLEAN), prefixed(items, CORRUPT)
    n, bs = len(items), args.batch_size
    cells = [(m, layer, p) for m in MODES for layer in layers for p in POSITIONS]
    naive_cells = cells[: args.naive_cells]
    units = {layer: direction.unit(layer) for layer in layers}

    def seqs(its: list[Any]) -> tuple[list[list[int]], list[int]]:
        return _sequences(model, [i.prompt for i in its] * 2, [i.positive for i in its] + [i.negative for i in its])

    t_ids, t_plens = seqs(corrupt_items)
    s_ids, _ = seqs(clean_items)
    lens = [len(s) for s in t_ids]
    order = sorted(range(2 * n), key=lambda s: lens[s])
    results: dict[str, torch.Tensor] = {}

    def scores_from_logp(lp: torch.Tensor) -> torch.Tensor:  # [cells, 2n] -> [cells]
        return torch.sigmoid(lp[:, :n] - lp[:, n:]).mean(1)

    def grid() -> None:
        r = patch_grid(model, corrupt_items, source_items=clean_items, layers=layers, positions=POSITIONS,
                       modes=MODES, direction=direction, batch_size=bs, progress=False)  # type: ignore[arg-type]
        results["a"] = r.score.reshape(-1)

    def per_cell() -> None:
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(
                torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in s_ids], batch_first=True),
                names_filter=lambda name: name in {resid_hook_name(layer) for layer in layers},
            )
        clean = {layer: [cache[resid_hook_name(layer)][s, : lens[s]].float() for s in range(2 * n)]
                 for layer in layers}
        lp = torch.zeros(len(cells), 2 * n)
        for c, cell in enumerate(cells):
            for b0 in range(0, 2 * n, bs):
                idx = order[b0 : b0 + bs]
                width = max(lens[s] for s in idx)
                hook = _cell_hook(cell, idx, t_plens, lens, clean, units, width)
                lp[c, idx] = _logits_scores(model, t_ids, t_plens, idx, [(resid_hook_name(cell[1]), hook)])
        results["b"] = scores_from_logp(lp)

    def naive() -> None:
        clean = capture(model, s_ids, layers, batch_size=bs)  # one sequence at a time would only add to it
        lp = torch.zeros(len(naive_cells), 2 * n)
        for c, cell in enumerate(naive_cells):
            for s in range(2 * n):
                hook = _cell_hook(cell, [s], t_plens, lens, clean, units, lens[s])
                lp[c, s] = _logits_scores(model, t_ids, t_plens, [s], [(resid_hook_name(cell[1]), hook)])[0]
        results["c"] = scores_from_logp(lp)

    methods = {"a": grid, "b": per_cell, "c": naive}
    patch_grid(model, corrupt_items[:2], source_items=clean_items[:2], layers=layers[:1], positions=["all"],
               progress=False)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    m = len(naive_cells)
    err = {
        "b_vs_a": float((results["b"] - results["a"]).abs().max()),
        "c_vs_a": float((results["c"] - results["a"][:m]).abs().max()),
    }
    assert err["b_vs_a"] < 1e-3 and err["c_vs_a"] < 1e-3, err
    best = {name: min(ts) for name, ts in times.items()}
    full = {"a": best["a"], "b": best["b"], "c": best["c"] * len(cells) / m}
    n_seq = len(cells) * 2 * n
    labels = {
        "a": "a. one patch_grid call (all cells batched, completion-only logits)",
        "b": "b. run_with_cache once + one run_with_hooks per cell (batched over items, full logits)",
        "c": "c. naive: one full-logits forward per (cell, sequence)",
    }
    calls = {"a": -(-n_seq // bs), "b": len(cells) * -(-2 * n // bs), "c": m * 2 * n}
    timing = {
        name: {
            "label": labels[name],
            "best_s": round(best[name], 3),
            "all_s": [round(x, 3) for x in times[name]],
            "forward_calls": calls[name],
            "extrapolated": name == "c",
            "seconds_for_full_grid": round(full[name], 2),
            "sequences_per_s": round(n_seq / full[name], 1),
            "ratio_to_a": round(full[name] / full["a"], 2),
        }
        for name in methods
    }
    a = results["a"].view(len(MODES), len(layers), len(POSITIONS))
    result = {
        "benchmark": "patch",
        "model": args.model,
        "model_info": {key: model.info.to_dict()[key] for key in ("n_layers", "d_model", "d_vocab", "dtype",
                                                                   "base_fingerprint")},
        "workload": {
            "mode": "prompt pairs", "clean_prefix": CLEAN, "corrupt_prefix": CORRUPT,
            "battery": "era-battery (first items)", "n_items": n, "layers": layers, "positions": POSITIONS,
            "modes": MODES, "cells": len(cells), "sequences": n_seq, "batch_size": bs, "naive_cells": m,
            "extrapolation": f"c timed on the first {m} cells, scaled by {len(cells)}/{m}",
            "repeats": args.repeats, "statistic": "best of repeats after a warm-up, methods interleaved",
        },
        "timing": timing,
        "speedup_a_over_per_cell_b": round(full["b"] / full["a"], 2),
        "speedup_a_over_naive_c": round(full["c"] / full["a"], 2),
        "max_abs_score_difference": {key: float(f"{v:.3g}") for key, v in err.items()},
        "score_full_patch_by_layer_all_positions": [round(float(x), 4) for x in a[0, :, 0]],
        "model_load_s": round(load_s, 1),
        "direction_fit_s": round(direction_s, 1),
        **provenance(model.device, load_before),
    }
    write_results(args.out, result, markdown)


def markdown(r: dict[str, Any]) -> str:
    w, mach = r["workload"], r["machine"]
    lines = [
        f"# patch benchmark: {r['model']}",
        "",
        f"Prompt-pair patching ({w['clean_prefix']!r} into {w['corrupt_prefix']!r}) over {w['n_items']} "
        f"era-battery items; grid {len(w['modes'])} modes x {len(w['layers'])} layers x {len(w['positions'])} "
        f"positions = {w['cells']} cells, {w['sequences']} scored sequences; batch {w['batch_size']}; "
        f"{w['statistic']} ({w['repeats']}). {mach['cpu_cores']} CPU cores, {mach['torch_threads']} torch threads, "
        f"device {mach['device']}; load average {mach['load_average_before'][0]} before, "
        f"{mach['load_average_after'][0]} after.",
        "",
        "| method | forward calls | measured s | full grid s | sequences/s | x slower than a |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for v in r["timing"].values():
        note = " (extrapolated)" if v["extrapolated"] else ""
        lines.append(f"| {v['label']} | {v['forward_calls']} | {v['best_s']:.2f} | "
                     f"{v['seconds_for_full_grid']:.2f}{note} | {v['sequences_per_s']:.1f} | {v['ratio_to_a']:.2f} |")
    lines += [
        "",
        f"{w['extrapolation']} (forward calls listed for what was measured). a's time includes capturing the "
        "clean activations and scoring both baselines; b's includes its run_with_cache.",
        "",
        f"**one batched grid vs one call per cell: {r['speedup_a_over_per_cell_b']:.2f}x; vs the naive loop: "
        f"{r['speedup_a_over_naive_c']:.1f}x.**",
        "",
        "All methods give the same cell scores (max abs difference vs a: "
        + ", ".join(f"{k} {v:.1g}" for k, v in r["max_abs_score_difference"].items()) + ").",
    ]
    t = r["timing"]
    if t["a"]["forward_calls"] == t["b"]["forward_calls"]:
        lines += [
            "",
            f"Reading: a and b run the same number of batched forward passes ({t['a']['forward_calls']} of "
            f"{w['batch_size']}), so a's edge over b is not fewer calls: it unembeds only the completion positions "
            f"(b computes full logits over the {r['model_info']['d_vocab']}-word vocabulary at every position) and "
            "sorts all rows by length together (less padding). On a model with a small vocabulary the gap shrinks.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
