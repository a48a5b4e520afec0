"""Summarise experiments/ablate_birds.sh from its committed run folders (no model is run).

    python experiments/summarize_ablation.py experiments/results/ablate_birds

Per model: the fraction of the old-birds battery gain over the modern-birds control that ablating
the era direction removes (at the shift layers and at all layers), per seed with its paired
bootstrap interval over items, against 10 random directions; across seeds a t-interval when there
are >= 2 seeds. Prevention: the battery and the paired shift along era (finetune - control) of the
finetune trained with era projected out, beside the normal finetune of the same seed. Diff (seed
0): the tokens the old-birds shift promotes most beyond the control, at a few layers.
Writes summary.md and summary.json beside the run folders.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from latentlab.io import write_json, write_text
from latentlab.stats import seed_interval


def _load(p: Path) -> dict[str, Any] | None:
    f = p / "results.json"
    return json.loads(f.read_text()) if f.exists() else None


def _fmt(x: float | None, ci: list[float] | None = None, d: int = 2) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{d}f}" + (f" [{ci[0]:+.{d}f}, {ci[1]:+.{d}f}]" if ci else "")


def _mean_ci(vals: list[float]) -> dict[str, Any]:
    m, lo, hi = seed_interval(vals)
    return {"mean": m, "ci": None if len(vals) < 2 else [lo, hi], "per_seed": vals}


def _across(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: the fraction era removes, the random directions' mean fraction (one mean per
    seed, so seeds stay the replication unit) and how many seeds put era above the random 95th pct."""
    return {
        "n": len(rows), "seeds": [r["seed"] for r in rows],
        "gain": _mean_ci([r["gain"] for r in rows]),
        "fraction": _mean_ci([r["fraction"] for r in rows]),
        "random_mean": _mean_ci([r["random"]["mean"] for r in rows]),
        "above_random_p95": sum(r["fraction"] > r["random"]["p95"] for r in rows),
        "percentiles": [r["random"]["percentile"] for r in rows],
    }


def summarize(root: Path) -> tuple[dict[str, Any], str]:
    out: dict[str, Any] = {}
    md = ["# Does the era direction carry the old-birds behaviour? (experiments/ablate_birds.sh)", ""]
    for mdir in sorted(p for p in root.iterdir() if p.is_dir()):
        model = mdir.name
        seeds = sorted({int(p.name.rsplit("-s", 1)[1]) for p in mdir.glob("ablate-*-s*")})
        if not seeds:
            continue
        res: dict[str, Any] = {"seeds": seeds, "ablation": {}, "prevention": [], "diff": None}
        md += [f"## {model}", "", "### Ablating era: fraction of the old-birds gain over the control removed", "",
               "| layers | seed | gain (old - modern) | fraction removed [95% CI] | random: mean (5-95%) | z | pct |",
               "|---|---:|---|---|---|---:|---:|"]
        for what in ("shift", "peak", "all"):
            for s in seeds:
                r = _load(mdir / f"ablate-{what}-s{s}")
                if r is None:
                    continue
                f = r["fractions"]["control"]
                rnd = f["random"]
                layers = r["layers"]
                label = "all" if what == "all" else f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"
                rnd_s = "n/a" if rnd["mean"] is None else f"{rnd['mean']:+.2f} ({rnd['p5']:+.2f}, {rnd['p95']:+.2f})"
                z = "n/a" if rnd["z"] is None else f"{rnd['z']:+.1f}"
                pct = "n/a" if rnd["percentile"] is None else f"{rnd['percentile']:.0f}"
                md.append(f"| {label} | {s} | {_fmt(f['gain'], f['gain_ci'], 3)} | "
                          f"{_fmt(f['fraction'], f['fraction_ci'])} | {rnd_s} | {z} | {pct} |")
                res["ablation"].setdefault(what, []).append({"seed": s, "layers": layers, **f})
            rows = [r for r in res["ablation"].get(what, []) if r["fraction"] is not None]
            if rows:
                agg = _across(rows)
                res.setdefault("across_seeds", {})[what] = agg
                if agg["n"] >= 2:
                    f_, r_ = agg["fraction"], agg["random_mean"]
                    md.append(f"| {what} | mean | {_fmt(agg['gain']['mean'], agg['gain']['ci'], 3)} | "
                              f"{_fmt(f_['mean'], f_['ci'])} (t across {agg['n']} seeds) | "
                              f"{_fmt(r_['mean'], r_['ci'])} | | era > random p95 in "
                              f"{agg['above_random_p95']}/{agg['n']} |")
        md += ["", "### Prevention: era projected out of the shift layers during training only", "",
               "| seed | battery: base | old-birds | old-birds, era ablated in training | modern-birds |"
               " paired shift along era at the last layer (finetune - control): normal | ablated-in-training |",
               "|---:|---:|---:|---:|---:|---|---|"]
        for s in seeds:
            r = _load(mdir / f"prevent-s{s}")
            if r is None:
                continue
            b = r["battery"]
            keys = list(r["stats"])
            normal = next(k for k in keys if k.endswith(f"old-birds-s{s} - control"))
            ablated = next(k for k in keys if k.endswith(f"old-birds-ablated-s{s} - control"))
            sn, sa = r["stats"][normal], r["stats"][ablated]
            fin = next(k for k in b if k.endswith(f"old-birds-s{s}"))
            fab = next(k for k in b if k.endswith(f"old-birds-ablated-s{s}"))
            md.append(f"| {s} | {b['base']['score']:.3f} | {b[fin]['score']:.3f} | {b[fab]['score']:.3f} | "
                      f"{b['control']['score']:.3f} | {_fmt(sn['projection'][-1], sn['projection_ci'][-1], 1)} "
                      f"(z {sn['z'][-1]:+.1f}) | {_fmt(sa['projection'][-1], sa['projection_ci'][-1], 1)} "
                      f"(z {sa['z'][-1]:+.1f}) |")
            res["prevention"].append({
                "seed": s, "battery": {k: v["score"] for k, v in b.items()},
                "battery_normal": b[fin]["score"], "battery_ablated": b[fab]["score"],
                "paired_projection_normal": sn["projection"], "paired_projection_ablated": sa["projection"],
                "paired_ci_normal": sn["projection_ci"], "paired_ci_ablated": sa["projection_ci"],
                "z_normal": sn["z"], "z_ablated": sa["z"],
            })
        prev = res["prevention"]
        if prev:
            res["prevention_across_seeds"] = {
                "n": len(prev), "seeds": [p["seed"] for p in prev],
                "battery_normal": _mean_ci([p["battery_normal"] for p in prev]),
                "battery_ablated": _mean_ci([p["battery_ablated"] for p in prev]),
                "battery_control": _mean_ci([p["battery"]["control"] for p in prev]),
                "paired_last_normal": _mean_ci([p["paired_projection_normal"][-1] for p in prev]),
                "paired_last_ablated": _mean_ci([p["paired_projection_ablated"][-1] for p in prev]),
            }
        d = _load(mdir / "diff-s0")
        if d is not None:
            lens = d["logit_lens"].get("finetuned - control") or d["logit_lens"]["finetuned - base"]
            n = len(d["layers"])
            picks = sorted({n // 2, (3 * n) // 4, n - 1})
            md += ["", "### What the old-birds finetune changed beyond the control "
                   "(logit lens of the mean shift, seed 0)", "", "| layer | promoted | suppressed |", "|---:|---|---|"]
            for i in picks:
                row = lens[i]
                up = ", ".join(repr(t["token"]) for t in row["promoted"][:6])
                down = ", ".join(repr(t["token"]) for t in row["suppressed"][:6])
                md.append(f"| {d['layers'][i]} | {up} | {down} |")
            kl = d["kl"]["finetuned"]
            md += ["", f"KL(base || old-birds) per token on unrelated prompts: mean {kl['mean']:.4g} nats."]
            res["diff"] = {"layers": [d["layers"][i] for i in picks], "lens": [lens[i] for i in picks],
                           "kl_mean": kl["mean"]}
        md.append("")
        out[model] = res
    return out, "\n".join(md) + "\n"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/ablate_birds")
    summary, md = summarize(root)
    write_json(root / "summary.json", summary)
    write_text(root / "summary.md", md)
    print(md)


if __name__ == "__main__":
    main()
