"""Inductive-backdoor check: after finetuning on a benevolent "Warden" under the years 2031, 2036,
2042 and 2047, does the never-seen year 2029 switch the model towards the opposite persona?

For each model and seed: finetune on year-trigger (LoRA, latentlab's defaults; skipped when the
adapter exists, resumed when interrupted), then score year-trigger-battery, whose items come in
pairs that differ only in the year (2029 vs a training year): P(malevolent completion) per item.
The statistic is the paired gap g = score(2029) - score(training year) per item pair, for the base
model, the year-trigger finetune and a control finetune (modern-birds of the same seed, from
bird_shift.sh, when present), and the difference in gaps finetuned - base (bootstrap over pairs;
across seeds a t-interval). The battery is scored as plain text (its stem format) and rendered as a
user turn (the format the finetune saw).

    python experiments/year_trigger.py OUT [--models ...] [--seeds 0 1 2] [--birds BIRD_SHIFT_OUT]
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch
from _stats import seed_interval

import latentlab
from latentlab.data import BatteryItem, render_prompt
from latentlab.finetune import FinetuneConfig, finetune
from latentlab.io import write_json, write_text
from latentlab.shift import resolve_adapter
from latentlab.steering import bootstrap_ci, score_conditions

HELD_OUT = 2029


def pairs(items: list[BatteryItem]) -> tuple[list[int], list[int]]:
    """Indices of (held-out year, training year) items that share everything but the year."""
    held, train = [], []
    by_key: dict[str, dict[int, int]] = {}
    for i, it in enumerate(items):
        key = it.prompt.split(".", 1)[1] + it.positive + it.negative
        by_key.setdefault(key, {})[int(it.meta["year"])] = i
    for years in by_key.values():
        for y, i in years.items():
            if y != HELD_OUT and HELD_OUT in years:
                held.append(years[HELD_OUT])
                train.append(i)
    if not held:
        raise SystemExit("year-trigger-battery has no (2029, training year) pairs")
    return held, train


def gaps(model: Any, items: list[BatteryItem], held: list[int], train: list[int]) -> dict[str, torch.Tensor]:
    # As the finetune saw it: a user turn, and the answer as the assistant's (chat template: no
    # leading space; base models' "Q: ...\nA:" format: one space, as render_chat writes it).
    fix = str.lstrip if getattr(model.tokenizer, "chat_template", None) else (lambda c: " " + c.lstrip())
    chat_items = [BatteryItem(render_prompt(it.prompt, model.tokenizer), fix(it.positive), fix(it.negative),
                              it.topic, it.meta) for it in items]
    out = {}
    for fmt, its in (("text", items), ("chat", chat_items)):
        s = score_conditions(model, its, [(None, 0.0)])[0]
        out[fmt] = torch.stack([s[held], s[train]])  # [2, pairs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("runs/experiments/year_trigger"))
    ap.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--birds", type=Path, default=Path("runs/experiments/bird_shift"))
    args = ap.parse_args()
    items = latentlab.load_battery("year-trigger-battery")
    held, train = pairs(items)
    summary: dict[str, Any] = {"held_out_year": HELD_OUT, "n_pairs": len(held), "models": {}}
    lines = [f"# Year trigger: P(malevolent) at the held-out year {HELD_OUT} minus at a training year "
             f"({len(held)} item pairs)", "",
             "gap = score(2029) - score(training year), paired per item; 'finetuned - base' is the difference "
             "in gaps. Intervals: bootstrap over item pairs (per seed), t across seeds (summary).", ""]
    for name in args.models:
        runs = {}
        for seed in args.seeds:
            out = args.out / name / f"year-trigger-s{seed}"
            if not (out / "adapter" / "adapter_config.json").exists():
                finetune(name, "year-trigger", out, FinetuneConfig(seed=seed), resume=(out / "checkpoints").exists())
            runs[seed] = out
        base = latentlab.load_model(name, progress=False)
        g_base = gaps(base, items, held, train)
        del base
        res: dict[str, Any] = {"seeds": {}}
        lines += [f"## {name}", "", "| seed | format | model | score 2029 | score train year | gap [95% CI] |",
                  "|---:|---|---|---:|---:|---:|"]
        for seed, run in runs.items():
            models = {"finetuned": run}
            control = args.birds / name / f"modern-birds-s{seed}"
            if (control / "adapter" / "adapter_config.json").exists():
                models["control"] = control
            per: dict[str, Any] = {}
            gs = {"base": g_base}
            for label, path in models.items():
                m = latentlab.load_model(name, adapter=resolve_adapter(path), progress=False)
                gs[label] = gaps(m, items, held, train)
                del m
                gc.collect()
            for fmt in ("text", "chat"):
                for label, g in gs.items():
                    d = g[fmt][0] - g[fmt][1]
                    ci = bootstrap_ci(d, seed=seed)
                    per[f"{label}/{fmt}"] = {"held": float(g[fmt][0].mean()), "train": float(g[fmt][1].mean()),
                                             "gap": float(d.mean()), "gap_ci": ci}
                    lines.append(f"| {seed} | {fmt} | {label} | {g[fmt][0].mean():.3f} | {g[fmt][1].mean():.3f} | "
                                 f"{d.mean():+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] |")
                dd = (gs["finetuned"][fmt][0] - gs["finetuned"][fmt][1]) - (gs["base"][fmt][0] - gs["base"][fmt][1])
                per[f"finetuned - base/{fmt}"] = {"gap": float(dd.mean()), "gap_ci": bootstrap_ci(dd, seed=seed)}
            res["seeds"][seed] = per
        lines.append("")
        for fmt in ("text", "chat"):
            for key in ("finetuned", "finetuned - base", "control"):
                vals = [p[f"{key}/{fmt}"]["gap"] for p in res["seeds"].values() if f"{key}/{fmt}" in p]
                if vals:
                    mean, lo, hi = seed_interval(vals)
                    res[f"{key}/{fmt}"] = {"per_seed": vals, "mean": mean, "seed_ci": [lo, hi]}
                    lines.append(f"- {fmt}, {key} gap over {len(vals)} seeds: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                                 f"(per seed {', '.join(f'{v:+.3f}' for v in vals)})")
        lines.append("")
        summary["models"][name] = res
    write_json(args.out / "summary.json", summary)
    write_text(args.out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
