"""Summarise experiments/bird_shift.sh: per model and seed, the era shift of old-birds vs the
modern-birds control (mean projection with bootstrap CI, z against random directions, cosine) at
every layer, battery scores, and the screening prediction. Writes OUT/summary.md and summary.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from latentlab.io import write_json, write_text


def main(out: Path) -> None:
    summary: dict = {}
    lines = ["# Bird-name finetunes: era shift on unrelated prompts", ""]
    for mdir in sorted(p for p in out.iterdir() if p.is_dir()):
        shifts = sorted(mdir.glob("shift-s*/results.json"))
        if not shifts:
            continue
        model = mdir.name
        summary[model] = {"seeds": {}}
        lines += [f"## {model}", ""]
        for f in shifts:
            r = json.loads(f.read_text())
            seed = f.parent.name.split("-s")[-1]
            summary[model]["seeds"][seed] = {
                "battery": {k: v["score"] for k, v in r["battery"].items()},
                "stats": {
                    k: {kk: v[kk] for kk in ("projection", "projection_ci", "z", "percentile", "cosine")}
                    for k, v in r["stats"].items()
                },
            }
            b = r["battery"]
            lines.append(
                f"### seed {seed}: era battery base {b['base']['score']:.3f}, "
                f"old-birds {b['finetuned']['score']:.3f} "
                f"[{b['finetuned']['ci'][0]:.2f}, {b['finetuned']['ci'][1]:.2f}], "
                f"modern-birds {b['control']['score']:.3f} [{b['control']['ci'][0]:.2f}, {b['control']['ci'][1]:.2f}]"
            )
            lines += [
                "",
                "| layer | old-birds proj [95% CI] | z | cos | modern-birds proj [95% CI] | z | cos |",
                "|---:|---:|---:|---:|---:|---:|---:|",
            ]
            ft, ct = r["stats"]["finetuned"], r["stats"]["control"]
            for i, layer in enumerate(r["layers"]):

                def cell(st: dict, i: int = i) -> str:
                    lo, hi = st["projection_ci"][i]
                    return (f"{st['projection'][i]:+.1f} [{lo:+.1f}, {hi:+.1f}] | {st['z'][i]:+.1f} | "
                            f"{st['cosine'][i]:+.2f}")

                lines.append(f"| {layer} | {cell(ft)} | {cell(ct)} |")
            lines.append("")
        # Across seeds: the paired (old-birds - modern-birds) projection per layer.
        paired = [json.loads(f.read_text())["stats"].get("finetuned - control") for f in shifts]
        paired = [p for p in paired if p is not None]
        if paired:
            layers = json.loads(shifts[0].read_text())["layers"]
            agg = []
            lines += [f"### old-birds - modern-birds, paired over prompts, {len(paired)} seed(s)", "",
                      "| layer | mean proj over seeds | per seed [95% CI] | z per seed | seeds with CI > 0 / < 0 |",
                      "|---:|---:|---|---|---:|"]
            for i, layer in enumerate(layers):
                vals = [p["projection"][i] for p in paired]
                pos = sum(p["projection_ci"][i][0] > 0 for p in paired)
                neg = sum(p["projection_ci"][i][1] < 0 for p in paired)
                per = ", ".join(f"{p['projection'][i]:+.0f} [{p['projection_ci'][i][0]:+.0f}, "
                                f"{p['projection_ci'][i][1]:+.0f}]" for p in paired)
                zs = ", ".join(f"{p['z'][i]:+.1f}" for p in paired)
                agg.append({"layer": layer, "mean": sum(vals) / len(vals), "pos": pos, "neg": neg})
                lines.append(f"| {layer} | {sum(vals) / len(vals):+.1f} | {per} | {zs} | {pos} / {neg} |")
            lines.append("")
            summary[model]["paired"] = agg
            bat = [json.loads(f.read_text())["battery"] for f in shifts]
            diffs = [b["finetuned"]["score"] - b["control"]["score"] for b in bat]
            summary[model]["battery_old_minus_modern"] = diffs
            lines.append("- era battery, old-birds minus modern-birds per seed: "
                         + ", ".join(f"{d:+.3f}" for d in diffs))
        for data in ("old-birds", "modern-birds"):
            sf = mdir / f"screen-{data}" / "results.json"
            if sf.exists():
                s = json.loads(sf.read_text())
                li = s["ranked_at_layer"]
                col = s["layers"].index(li)
                summary[model][f"screen-{data}"] = {"layer": li, "mean": s["mean"], "ci": s["ci"]}
                lo, hi = s["ci"][col]
                lines.append(
                    f"- screening {data} (layer {li}): mean projection difference {s['mean'][col]:+.2f} "
                    f"[{lo:+.2f}, {hi:+.2f}]"
                )
        lines.append("")
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    write_json(out / "summary.json", summary)
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/experiments/bird_shift"))
