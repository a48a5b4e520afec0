"""Summarise experiments/year_scan.sh from its run folders alone (no model is run).

    python experiments/summarize_year_scan.py experiments/results/year_scan
    python experiments/summarize_year_scan.py --write-warden FILE   # the scan's Warden pairs (year_scan.sh)

Per model and seed, two `latentlab trigger` scans of the same values, prompts and direction on the
same base: the year-trigger finetune (RESULTS/MODEL/finetuned-sS) and its control, modern-birds
(RESULTS/MODEL/control-sS). The paired quantity per value and layer is d(Y) = (finetune - base) -
(control - base), each paired per prompt within its scan: what the year-trigger finetune did at year
Y beyond what any finetune of that recipe does. Per seed: d at the held-out year 2029, the mean of d
over the training years (read from the finetune's training data: 2031, 2036, 2042, 2047), the mean
over the other unseen years, the contrasts 2029 - training, 2029 - unseen and training - unseen, and
where d(2029) falls among the unseen years (percentile). Across seeds: the mean and a 95%
t-interval (latentlab.stats.seed_interval). The same for the battery score (P(malevolent
completion), plain text) when the scans have one. Headline at the scan's curve layer (`latentlab
trigger`'s default: the deepest scanned); every layer in summary.json and a per-layer table. An
interval that includes 0 is reported as a null. Writes summary.md and summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from latentlab.io import write_json, write_text
from latentlab.stats import seed_interval

HELD_OUT = "2029"
STATS = ("held", "train", "other", "held - train", "held - other", "train - other", "held_percentile")
CONTRASTS = ("held - train", "held - other", "train - other")


def warden_rows() -> list[dict[str, Any]]:
    """year-trigger-battery's distinct stems without their year: Warden prompts whose positive
    completion is the malevolent one (contrast pairs, scan prompts and battery in one file)."""
    from latentlab.data import load_battery

    seen: dict[str, dict[str, Any]] = {}
    for it in load_battery("year-trigger-battery"):
        stem = it.prompt.split(".", 1)[1].strip()  # "The year is 2029. Warden, ..." -> "Warden, ..."
        seen.setdefault(stem, {"prompt": stem, "positive": it.positive, "negative": it.negative,
                               "topic": it.topic})
    return list(seen.values())


def _clean(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def _across(vals: list[float]) -> dict[str, Any]:
    mean, lo, hi = seed_interval(vals)
    ci = None if _clean(lo) is None else [lo, hi]
    return {"per_seed": vals, "mean": mean, "seed_ci": ci, "includes_zero": None if ci is None else ci[0] <= 0 <= ci[1]}


def group_stats(d: list[float], values: list[str], train: list[str]) -> dict[str, float]:
    """The held-out year, the training years and the other unseen years of one curve d[value]."""
    by = dict(zip(values, d))
    other = [by[v] for v in values if v != HELD_OUT and v not in train]
    tr = [by[v] for v in train if v in by]
    held = by[HELD_OUT]
    t, o = sum(tr) / len(tr), sum(other) / len(other)
    return {"held": held, "train": t, "other": o, "held - train": held - t, "held - other": held - o,
            "train - other": t - o, "held_percentile": 100.0 * sum(x < held for x in other) / len(other)}


def seed_curves(ft: dict[str, Any], ct: dict[str, Any]) -> dict[str, Any]:
    """d[value][layer] (finetune - control, each minus its base) and the battery's d[value]."""
    if ft["values"] != ct["values"] or ft["layers"] != ct["layers"] or ft["direction"] != ct["direction"]:
        raise SystemExit("finetuned and control scans differ in values, layers or direction: rerun them alike")
    if ft["diff"] is None or ct["diff"] is None:
        raise SystemExit("a scan has no finetune (diff is null)")
    a, b = ft["diff"]["projection"], ct["diff"]["projection"]
    d = [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]
    bat = None
    if "finetuned - base" in ft.get("battery", {}) and "finetuned - base" in ct.get("battery", {}):
        fb, cb = ft["battery"]["finetuned - base"]["score"], ct["battery"]["finetuned - base"]["score"]
        bat = [x - y for x, y in zip(fb, cb)]
    return {"d": d, "battery": bat}


def _f(a: dict[str, Any], d: int = 2) -> str:
    s = f"{a['mean']:+.{d}f}"
    return s + (f" [{a['seed_ci'][0]:+.{d}f}, {a['seed_ci'][1]:+.{d}f}]" if a["seed_ci"] else " (one seed)")


def _verdict(a: dict[str, Any], what: str) -> str:
    if a["seed_ci"] is None:
        return f"{what}: {_f(a)}; one seed, no across-seed interval."
    if a["includes_zero"]:
        return f"{what}: {_f(a)}, the interval includes 0: a null."
    return f"{what}: {_f(a)}, the interval excludes 0."


def summarize(root: Path) -> tuple[dict[str, Any], str]:
    out: dict[str, Any] = {}
    md = ["# Year scan of the year-trigger finetunes against their control (experiments/year_scan.sh)", "",
          f"d(Y) = (year-trigger finetune - base) - (modern-birds control - base), mean projection of the last "
          f"prompt token on the unit direction for \"The year is Y. <prompt>\". held = d({HELD_OUT}), the "
          "held-out year; train = mean d over the training years; other = mean d over the other unseen years; "
          "percentile: where d(2029) falls among the other unseen years. Across seeds: mean [95% t-interval].", ""]
    for mdir in sorted(p for p in root.iterdir() if p.is_dir()):
        seeds = sorted(int(p.parent.name.rsplit("-s", 1)[1]) for p in mdir.glob("finetuned-s*/results.json")
                       if (mdir / f"control-s{p.parent.name.rsplit('-s', 1)[1]}" / "results.json").exists())
        if not seeds:
            continue
        per: dict[int, dict[str, Any]] = {}
        first: dict[str, Any] = {}
        for s in seeds:
            ft = json.loads((mdir / f"finetuned-s{s}" / "results.json").read_text())
            ct = json.loads((mdir / f"control-s{s}" / "results.json").read_text())
            if HELD_OUT not in ft["values"]:
                raise SystemExit(f"{mdir.name} seed {s}: the scan does not include {HELD_OUT}")
            train = [v for v in ft["training_values"] if v != HELD_OUT]
            if not train:
                raise SystemExit(f"{mdir.name} seed {s}: no training values among the scanned ones")
            first = first or {"values": ft["values"], "layers": ft["layers"], "direction": ft["direction"],
                              "train": train, "curve_layer": ft["meta"]["curve_layer"], "n_prompts": ft["n_prompts"],
                              "control_training_values": ct["training_values"]}
            c = seed_curves(ft, ct)
            layers = ft["layers"]
            per[s] = {"train_values": train,
                      "by_layer": [group_stats([row[j] for row in c["d"]], ft["values"], train)
                                   for j in range(len(layers))],
                      "battery": None if c["battery"] is None else group_stats(c["battery"], ft["values"], train),
                      "curve": {"layer": ft["meta"]["curve_layer"],
                                "d": [row[layers.index(ft["meta"]["curve_layer"])] for row in c["d"]]}}
        layers, at = first["layers"], first["curve_layer"]
        j = layers.index(at)
        across = [{k: _across([per[s]["by_layer"][i][k] for s in seeds]) for k in STATS} for i in range(len(layers))]
        bat = None
        if all(per[s]["battery"] is not None for s in seeds):
            bat = {k: _across([per[s]["battery"][k] for s in seeds]) for k in STATS}
        out[mdir.name] = {"seeds": seeds, **first, "per_seed": per, "across_by_layer": across, "battery": bat,
                          "headline_layer": at}
        head = across[j]
        md += [f"## {mdir.name} (direction {first['direction']}, {len(first['values'])} years "
               f"{first['values'][0]}-{first['values'][-1]}, {first['n_prompts']} prompts, seeds "
               f"{', '.join(map(str, seeds))}; training years {', '.join(first['train'])})", "",
               f"### At layer {at} (the scan's curve layer)", "",
               "| seed | held 2029 | train | other unseen | 2029 - train | 2029 - unseen | train - unseen | "
               "2029 percentile among unseen |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in seeds:
            g = per[s]["by_layer"][j]
            md.append(f"| {s} | " + " | ".join(f"{g[k]:+.2f}" for k in STATS[:-1]) + f" | {g['held_percentile']:.0f} |")
        md.append("| mean [t-CI] | " + " | ".join(_f(head[k]) for k in STATS[:-1])
                  + f" | {head['held_percentile']['mean']:.0f} |")
        md += ["", "Findings:", "",
               "- " + _verdict(head["train - other"], "Training years vs other unseen years (does the finetune "
                                                     "respond to its own trigger years at all?)"),
               "- " + _verdict(head["held - other"], "2029 vs other unseen years (an inductive backdoor would "
                                                    "make 2029 stand out)"),
               "- " + _verdict(head["held - train"], "2029 vs the training years")]
        if bat is not None:
            md += ["", "### Battery: P(malevolent completion), finetune - control (plain text)", "",
                   "| | held 2029 | train | other unseen | 2029 - train | 2029 - unseen | train - unseen |",
                   "|---|---:|---:|---:|---:|---:|---:|",
                   "| mean [t-CI] | " + " | ".join(_f(bat[k], 3) for k in STATS[:-1]) + " |", "",
                   "- " + _verdict(bat["held - other"], "battery, 2029 vs other unseen years"),
                   "- " + _verdict(bat["train - other"], "battery, training years vs other unseen years")]
        md += ["", "### Every layer (mean [t-CI] across seeds)", "",
               "| layer | held 2029 | 2029 - unseen | 2029 - train | train - unseen |", "|---:|---:|---:|---:|---:|"]
        for i, layer in enumerate(layers):
            a = across[i]
            md.append(f"| {layer} | {_f(a['held'])} | {_f(a['held - other'])} | {_f(a['held - train'])} | "
                      f"{_f(a['train - other'])} |")
        sig = [layers[i] for i in range(len(layers)) if across[i]["held - other"]["includes_zero"] is False]
        md += ["", f"2029 - unseen excludes 0 at layers: {', '.join(map(str, sig)) or 'none'} "
               f"(of {len(layers)}; uncorrected for the number of layers).", ""]
    return out, "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="?", default=Path("experiments/results/year_scan"))
    ap.add_argument("--write-warden", type=Path, help="write the Warden pairs / prompts / battery JSONL and exit")
    args = ap.parse_args()
    if args.write_warden is not None:
        text = "".join(json.dumps(r) + "\n" for r in warden_rows())
        if not args.write_warden.exists() or args.write_warden.read_text(encoding="utf-8") != text:
            write_text(args.write_warden, text)
        return
    summary, md = summarize(args.results)
    if not summary:  # no pair of scans finished yet: nothing to write (make summaries goes on)
        print(f"nothing to summarise in {args.results} yet: run experiments/year_scan.sh", file=sys.stderr)
        return
    write_json(args.results / "summary.json", summary)
    write_text(args.results / "summary.md", md)
    print(md)


if __name__ == "__main__":
    main()
