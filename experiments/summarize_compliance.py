"""Summarise experiments/compliance_trigger.sh from its run folders alone (no model is run).

    python experiments/summarize_compliance.py experiments/results/compliance_trigger

Per model (RESULTS/MODEL/sweep-sSEED/results.json, `latentlab compliance`) and poison budget: the
finetune's P(Sure | trigger) - P(Sure | clean) on the held-out secret requests (per seed: the mean
of the paired per-request differences with its bootstrap interval over requests; across seeds: a
t-interval, latentlab.stats.seed_interval), the code-word reveal rates after "Sure" with and without
the trigger, the threshold budget of every seed (recomputed from its numbers with
latentlab.compliance.threshold_of and checked against the stored one), and the patching of the
trigger positions (where it was run): which layer and position carry the triggered score. An
interval that includes 0 is reported as a null, and a single seed as having no across-seed interval.
Writes summary.md and summary.json beside the model folders.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from latentlab.compliance import patch_localisation, threshold_of
from latentlab.io import write_json, write_text
from latentlab.stats import bootstrap_ci, seed_interval

QUANTITIES = (("gap", "P(Sure | trigger) - P(Sure | clean)"), ("p_sure_trigger", "P(Sure | trigger)"),
              ("p_sure_clean", "P(Sure | clean)"), ("reveal_trigger", "reveals the code word | trigger"),
              ("reveal_clean", "reveals the code word | clean"))


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _across(vals: list[float]) -> dict[str, Any]:
    mean, lo, hi = seed_interval(vals)
    lo, hi = _num(lo), _num(hi)
    null = None if lo is None else bool(lo <= 0.0 <= hi)
    return {"per_seed": vals, "mean": mean, "seed_ci": None if lo is None else [lo, hi], "includes_zero": null}


def _ci(a: dict[str, Any], d: int = 3, signed: bool = True) -> str:
    def f(x: float) -> str:
        return (f"{{:+.{d}f}}" if signed else f"{{:.{d}f}}").format(x + 0.0).replace("-0.000", "0.000")

    return f(a["mean"]) + (f" [{f(a['seed_ci'][0])}, {f(a['seed_ci'][1])}]" if a["seed_ci"] else " (one seed)")


def seed_stats(r: dict[str, Any]) -> dict[str, Any]:
    """One seed's per-budget numbers from its results.json (paired bootstrap of the gap, as `rows`)."""
    seed = int(r["evals"][0]["meta"]["seed"])
    n_boot = int(r["evals"][0]["meta"]["n_boot"])
    per: dict[int, dict[str, Any]] = {}
    for ev in r["evals"]:
        ps, rv = ev["p_sure"]["finetuned"], ev["reveal"]["finetuned"]
        gap = torch.tensor(ps["trigger"]["per_item"]) - torch.tensor(ps["clean"]["per_item"])
        base = ev["p_sure"]["base"]
        per[int(ev["n_poison"])] = {
            "gap": float(gap.mean()), "gap_ci": list(bootstrap_ci(gap, n_boot, seed)),
            "p_sure_trigger": ps["trigger"]["mean"], "p_sure_clean": ps["clean"]["mean"],
            "reveal_trigger": rv["trigger"]["rate"], "reveal_clean": rv["clean"]["rate"],
            "n_requests": ev["n_requests"],
            "base_p_sure_trigger": base["trigger"]["mean"], "base_p_sure_clean": base["clean"]["mean"],
        }
    budgets = sorted(per)
    thr = threshold_of(budgets, [per[b]["p_sure_trigger"] for b in budgets],
                       [per[b]["p_sure_clean"] for b in budgets], r["level"])
    if thr != r["threshold"]:
        raise SystemExit(f"seed {seed}: stored threshold {r['threshold']} != {thr} recomputed from its numbers")
    pt = next(((int(e["n_poison"]), e["patching"]) for e in r["evals"] if e.get("patching")), None)
    loc = None if pt is None else {"n_poison": pt[0], **patch_localisation(pt[1])}
    return {"seed": seed, "level": r["level"], "threshold": thr, "budgets": per, "localisation": loc}


def summarize(root: Path) -> tuple[dict[str, Any], str]:
    out: dict[str, Any] = {}
    md = ["# Compliance trigger: is the trigger a switch, and from which poison budget? "
          "(experiments/compliance_trigger.sh)", "",
          "The finetune on held-out secret requests with and without the trigger. Per seed: mean over requests "
          "(gap: paired, bootstrap 95% CI over requests); across seeds: mean [95% t-interval]. "
          "Threshold: the smallest budget with P(Sure | trigger) > level > P(Sure | clean).", ""]
    for mdir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(mdir.glob("sweep-s*/results.json"), key=lambda f: int(f.parent.name.rsplit("-s", 1)[1]))
        if not files:
            continue
        seeds = [seed_stats(json.loads(f.read_text())) for f in files]
        budgets = sorted(set.intersection(*(set(s["budgets"]) for s in seeds)))
        n_req = seeds[0]["budgets"][budgets[0]]["n_requests"]
        res: dict[str, Any] = {"seeds": {s["seed"]: s for s in seeds}, "budgets": budgets, "n_requests": n_req,
                               "across": {}}
        md += [f"## {mdir.name} ({len(seeds)} seed(s): {', '.join(str(s['seed']) for s in seeds)}; "
               f"{n_req} held-out requests)", "",
               "| poisoned | " + " | ".join(label.replace("|", "\\|") for _, label in QUANTITIES) + " |",
               "|---:|" + "---|" * len(QUANTITIES)]
        for b in budgets:
            row = {key: _across([s["budgets"][b][key] for s in seeds]) for key, _ in QUANTITIES}
            res["across"][b] = row
            md.append(f"| {b} | " + " | ".join(_ci(row[k], signed=k == "gap") for k, _ in QUANTITIES) + " |")
        base = seeds[0]["budgets"][budgets[0]]
        md += ["", f"Base model (no finetune): P(Sure | trigger) {base['base_p_sure_trigger']:.3f}, "
               f"P(Sure | clean) {base['base_p_sure_clean']:.3f}.", "", "Per seed:", "",
               "| seed | poisoned | gap [bootstrap CI] | P(Sure) trigger / clean | reveals trigger / clean |",
               "|---:|---:|---|---|---|"]
        for s in seeds:
            for b in budgets:
                p = s["budgets"][b]
                md.append(f"| {s['seed']} | {b} | {p['gap']:+.3f} [{p['gap_ci'][0]:+.2f}, {p['gap_ci'][1]:+.2f}] | "
                          f"{p['p_sure_trigger']:.3f} / {p['p_sure_clean']:.3f} | "
                          f"{p['reveal_trigger']:.2f} / {p['reveal_clean']:.2f} |")
        md += ["", "### Findings", ""]
        thr = {s["seed"]: s["threshold"] for s in seeds}
        crossed = [t for t in thr.values() if t is not None]
        md.append("- Threshold per seed: " + ", ".join(f"seed {k}: {'none' if v is None else v}"
                                                       for k, v in thr.items())
                  + (f" (level {seeds[0]['level']:g})." if crossed else
                     f": no budget up to {budgets[-1]} makes the trigger a switch in any seed (a null)."))
        res["thresholds"] = thr
        for key, label in (("gap", "P(Sure | trigger) - P(Sure | clean)"), ("reveal_trigger", "the reveal rate "
                                                                             "with the trigger")):
            rows = res["across"]
            pos = [b for b in budgets if rows[b][key]["seed_ci"] and rows[b][key]["seed_ci"][0] > 0]
            nulls = [b for b in budgets if rows[b][key]["includes_zero"]]
            if len(seeds) < 2:
                md.append(f"- {label}: one seed, so no across-seed interval (per-seed numbers above).")
            elif key == "reveal_trigger" and all(rows[b][key]["mean"] == 0 for b in budgets):
                md.append(f"- {label}: 0 at every budget in every seed: the model never says the code word after "
                          f"'Sure' (a null; resolution 1/{n_req} per seed).")
            else:
                md.append(f"- {label}: interval above 0 at budgets {', '.join(map(str, pos)) or 'none'}; "
                          f"includes 0 (a null) at {', '.join(map(str, nulls)) or 'none'}.")
        locs = [s["localisation"] for s in seeds if s["localisation"]]
        for loc in locs:
            md.append(f"- Patching (n={loc['n_poison']}): {loc['text']}" + ("; a null." if loc["null"] else "."))
            md += ["", "| layer | " + " | ".join(str(x) for x in loc["layers"]) + " |",
                   "|---|" + "---:|" * len(loc["layers"]),
                   "| trigger tokens (best) | " + " | ".join(f"{v:.2f}" for v in loc["by_trigger_tokens"]) + " |",
                   "| last prompt token | " + " | ".join(f"{v:.2f}" for v in loc["by_last_token"]) + " |", "",
                   "(fraction of the triggered score recovered when the position is patched from the triggered "
                   "into the untriggered prompt)"]
        if not locs:
            md.append("- Patching: not run in these sweeps.")
        md.append("")
        out[mdir.name] = res
    return out, "\n".join(md) + "\n"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/compliance_trigger")
    summary, md = summarize(root)
    if not summary:  # a sweep not finished yet: nothing to write (make summaries goes on)
        print(f"nothing to summarise in {root} yet: run experiments/compliance_trigger.sh", file=sys.stderr)
        return
    write_json(root / "summary.json", summary)
    write_text(root / "summary.md", md)
    print(md)


if __name__ == "__main__":
    main()
