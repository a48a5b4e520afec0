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

Two steps. Scoring (needs the models) writes, per model and seed, RESULTS/MODEL/sSEED/results.json
(per-item scores at the held-out and the training year, by model and format) and manifest.json;
the finetunes themselves go to RUNS/MODEL/year-trigger-sSEED (their results.json and manifest.json
are copied to RESULTS/MODEL/year-trigger-sSEED). The summary (RESULTS/summary.md, summary.json)
is computed from those files alone:

    python experiments/year_trigger.py [--results experiments/results/year_trigger] [--runs DIR]
        [--models ...] [--seeds 0 1 2] [--birds runs/experiments/bird_shift]
    python experiments/year_trigger.py --summarize-only [--results experiments/results/year_trigger]

Results committed before the per-seed files existed hold only summary.json: for a model with no
per-seed results.json, --summarize-only takes the per-seed statistics from the existing
summary.json and recomputes the across-seed intervals and summary.md from them.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from latentlab.data import BatteryItem, render_prompt
from latentlab.io import read_json, write_json, write_text
from latentlab.stats import bootstrap_ci, seed_interval

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
    from latentlab.steering import score_conditions

    fix = str.lstrip if getattr(model.tokenizer, "chat_template", None) else (lambda c: " " + c.lstrip())
    chat_items = [BatteryItem(render_prompt(it.prompt, model.tokenizer), fix(it.positive), fix(it.negative),
                              it.topic, it.meta) for it in items]
    out = {}
    for fmt, its in (("text", items), ("chat", chat_items)):
        s = score_conditions(model, its, [(None, 0.0)])[0]
        out[fmt] = torch.stack([s[held], s[train]])  # [2, pairs]
    return out


FORMATS = ("text", "chat")


def finetune_run(name: str, seed: int, run: Path, keep: Path) -> None:
    """``latentlab finetune`` (defaults: LoRA r8, all linear layers, lr 2e-4, 3 epochs), skipped when
    the adapter exists, resumed when interrupted; its results.json and manifest.json go to ``keep``."""
    if not (run / "adapter" / "adapter_config.json").exists():
        cmd = [sys.executable, "-m", "latentlab.cli", "finetune", "--data", "year-trigger", "--model", name,
               "--seed", str(seed), "--out", str(run)]
        if (run / "checkpoints").exists():
            cmd.append("--resume")
        subprocess.run(cmd, check=True)
    keep.mkdir(parents=True, exist_ok=True)
    for f in ("results.json", "manifest.json"):
        if (run / f).exists():
            shutil.copy2(run / f, keep / f)


def score_seed(name: str, seed: int, adapters: dict[str, Path], items: list[BatteryItem], held: list[int],
               train: list[int], out: Path) -> None:
    """Per-item scores of base and adapters at the held-out and training years -> out/results.json."""
    import latentlab
    from latentlab.runs import Run
    from latentlab.shift import resolve_adapter

    run = Run.start(out, "python " + " ".join(sys.argv),
                    {"model": name, "battery": "year-trigger-battery", "held_out_year": HELD_OUT,
                     "adapters": {k: str(v) for k, v in adapters.items()}}, seed=seed)
    scores: dict[str, Any] = {}
    for label, path in {"base": None, **adapters}.items():
        m = latentlab.load_model(name, adapter=resolve_adapter(path) if path else None, progress=False)
        run.add_model(label, m.info)
        g = gaps(m, items, held, train)
        scores[label] = {fmt: {"held": g[fmt][0].tolist(), "train": g[fmt][1].tolist()} for fmt in FORMATS}
        del m
        gc.collect()
    write_json(out / "results.json", {"model": name, "seed": seed, "held_out_year": HELD_OUT,
                                      "pairs": {"held": held, "train": train}, "scores": scores})
    run.finish()


def seed_stats(r: dict[str, Any]) -> dict[str, Any]:
    """One seed's gaps (mean over item pairs, bootstrap CI seeded by the seed) from its results.json."""
    seed, per = r["seed"], {}
    sc = {label: {fmt: torch.stack([torch.tensor(v[fmt]["held"]), torch.tensor(v[fmt]["train"])])
                  for fmt in FORMATS} for label, v in r["scores"].items()}
    for fmt in FORMATS:
        for label, g in sc.items():
            d = g[fmt][0] - g[fmt][1]
            per[f"{label}/{fmt}"] = {"held": float(g[fmt][0].mean()), "train": float(g[fmt][1].mean()),
                                     "gap": float(d.mean()), "gap_ci": bootstrap_ci(d, seed=seed)}
        dd = (sc["finetuned"][fmt][0] - sc["finetuned"][fmt][1]) - (sc["base"][fmt][0] - sc["base"][fmt][1])
        per[f"finetuned - base/{fmt}"] = {"gap": float(dd.mean()), "gap_ci": bootstrap_ci(dd, seed=seed)}
    return per


def summarize(results: Path) -> None:
    """RESULTS/summary.md and summary.json from RESULTS/MODEL/sSEED/results.json (or, for a model
    without them, from the per-seed statistics of an existing summary.json)."""
    old = read_json(results / "summary.json") if (results / "summary.json").exists() else {}
    per_model: dict[str, dict[str, Any]] = {}
    n_pairs = old.get("n_pairs")
    for mdir in sorted(p for p in results.iterdir() if p.is_dir()):
        files = sorted(mdir.glob("s[0-9]*/results.json"), key=lambda f: int(f.parent.name[1:]))
        if files:
            raw = [read_json(f) for f in files]
            per_model[mdir.name] = {r["seed"]: seed_stats(r) for r in raw}
            n_pairs = len(raw[0]["pairs"]["held"])
    for name, res in old.get("models", {}).items():
        if name not in per_model:
            per_model[name] = res["seeds"]
    if not per_model:
        raise SystemExit(f"nothing to summarise in {results}: run the scoring step first")
    summary: dict[str, Any] = {"held_out_year": HELD_OUT, "n_pairs": n_pairs, "models": {}}
    lines = [f"# Year trigger: P(malevolent) at the held-out year {HELD_OUT} minus at a training year "
             f"({n_pairs} item pairs)", "",
             "gap = score(2029) - score(training year), paired per item; 'finetuned - base' is the difference "
             "in gaps. Intervals: bootstrap over item pairs (per seed), t across seeds (summary).", ""]
    for name in sorted(per_model):
        seeds = per_model[name]
        res: dict[str, Any] = {"seeds": seeds}
        lines += [f"## {name}", "", "| seed | format | model | score 2029 | score train year | gap [95% CI] |",
                  "|---:|---|---|---:|---:|---:|"]
        for seed, per in seeds.items():
            for key, st in per.items():
                if key.startswith("finetuned - base/"):
                    continue
                label, fmt = key.split("/")
                ci = st["gap_ci"]
                lines.append(f"| {seed} | {fmt} | {label} | {st['held']:.3f} | {st['train']:.3f} | "
                             f"{st['gap']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] |")
        lines.append("")
        for fmt in FORMATS:
            for key in ("finetuned", "finetuned - base", "control"):
                vals = [p[f"{key}/{fmt}"]["gap"] for p in seeds.values() if f"{key}/{fmt}" in p]
                if vals:
                    mean, lo, hi = seed_interval(vals)
                    res[f"{key}/{fmt}"] = {"per_seed": vals, "mean": mean, "seed_ci": [lo, hi]}
                    lines.append(f"- {fmt}, {key} gap over {len(vals)} seeds: {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                                 f"(per seed {', '.join(f'{v:+.3f}' for v in vals)})")
        lines.append("")
        summary["models"][name] = res
    write_json(results / "summary.json", summary)
    write_text(results / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=Path("experiments/results/year_trigger"))
    ap.add_argument("--runs", type=Path, default=Path("runs/experiments/year_trigger"),
                    help="where the finetunes (adapters, checkpoints) go")
    ap.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--birds", type=Path, default=Path("runs/experiments/bird_shift"),
                    help="bird_shift.sh's finetune runs (the modern-birds controls)")
    ap.add_argument("--summarize-only", action="store_true", help="only rebuild the summary from RESULTS")
    args = ap.parse_args()
    if not args.summarize_only:
        import latentlab

        items = latentlab.load_battery("year-trigger-battery")
        held, train = pairs(items)
        for name in args.models:
            for seed in args.seeds:
                out = args.results / name / f"s{seed}"
                if (out / "results.json").exists():
                    continue
                run = args.runs / name / f"year-trigger-s{seed}"
                finetune_run(name, seed, run, args.results / name / f"year-trigger-s{seed}")
                adapters = {"finetuned": run}
                control = args.birds / name / f"modern-birds-s{seed}"
                if (control / "adapter" / "adapter_config.json").exists():
                    adapters["control"] = control
                score_seed(name, seed, adapters, items, held, train, out)
    summarize(args.results)


if __name__ == "__main__":
    main()
