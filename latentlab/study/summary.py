"""A study's ``summary.json``, computed from its run folders alone (no model is loaded).

Why every number is a small ``{"value", "src", "path"}`` record: the report must show only numbers
that came from a results file, and a reader (or a test) must be able to check each one. A number
read from a run folder names its file and JSON path; a number computed here (an across-seed mean
and interval) is marked with ``src = "summary.json"`` and its own path, and is computed by
:func:`latentlab.stats.seed_interval` from per-seed numbers that are themselves records.
Verdict sentences are built from these numbers by rules stated next to each one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from latentlab.patchscope import RANDOM_LABEL as RANDOM_DIRECTION
from latentlab.sampling import LOOP_SHARE, loop_counts
from latentlab.stats import pearson, seed_interval, spearman
from latentlab.study.recipe import judge_labels

__all__ = ["Num", "summarize_study", "verdict_interval"]

Num = dict[str, Any]


class _Files:
    """Reads (and caches) the study's JSON files; ``num`` makes a record of one value in one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, Any] = {}

    def get(self, rel: str) -> Any | None:
        if rel not in self._cache:
            p = self.root / rel
            self._cache[rel] = json.loads(p.read_text()) if p.is_file() else None
        return self._cache[rel]

    def num(self, rel: str, *path: Any) -> Num:
        x = self.get(rel)
        for k in path:
            x = x[k]
        return {"value": x, "src": rel, "path": list(path)}


def _derived(value: float | None) -> Num:
    v = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    return {"value": v, "src": None, "path": None}


def _across(nums: list[Num]) -> dict[str, Num]:
    """Mean and 95% t-interval across seeds of per-seed records (bounds None for one seed)."""
    vals = [n["value"] for n in nums if n["value"] is not None]
    if not vals:
        return {"mean": _derived(None), "lo": _derived(None), "hi": _derived(None)}
    m, lo, hi = seed_interval(vals)
    return {"mean": _derived(m), "lo": _derived(lo), "hi": _derived(hi)}


def _fmt(x: float | None, d: int = 3, sign: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{d}f}" if sign else f"{x:.{d}f}"


def verdict_interval(lo: float | None, hi: float | None) -> str:
    """``above 0`` / ``below 0`` / ``includes 0`` for an interval (``undetermined`` without one)."""
    if lo is None or hi is None:
        return "undetermined"
    if lo > 0:
        return "above 0"
    if hi < 0:
        return "below 0"
    return "includes 0"


def _finish_paths(x: Any, path: list[Any]) -> None:
    """Give every derived record its own location in summary.json."""
    if isinstance(x, dict):
        if set(x) == {"value", "src", "path"}:
            if x["src"] is None:
                x["src"], x["path"] = "summary.json", [*path, "value"]
            return
        for k, v in x.items():
            _finish_paths(v, [*path, k])
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _finish_paths(v, [*path, i])


# --------------------------------------------------------------------------------------------
# Per analysis.
# --------------------------------------------------------------------------------------------


def _shift(f: _Files, seeds: list[int], recipe: dict[str, Any]) -> dict[str, Any] | None:
    per = {s: f"shift-s{s}/results.json" for s in seeds if f.get(f"shift-s{s}/results.json")}
    if not per:
        return None
    first = f.get(next(iter(per.values())))
    layers = first["layers"]
    # [shift] scale with other factors than 1: the headline is the finetune as trained (factor 1), or, without
    # it, the largest factor; models keep their plain labels here, each number naming its scaled key
    by = first.get("by_scale")
    ref = "1" if not by or "1" in by else list(by)[-1]
    names: dict[str, str] = by[ref] if by else {}
    key = names.get("finetuned - control", "finetuned - control")
    out: dict[str, Any] = {"layers": layers, "seeds": list(per), "per_seed": {}, "direction": recipe["direction"]}
    for s, rel in per.items():
        r = f.get(rel)
        labels = list(r.get("battery", {})) if not by else \
            [lab for lab in ("base", *names) if names.get(lab, lab) in r.get("battery", {})]
        out["per_seed"][str(s)] = {
            "paired": [f.num(rel, "stats", key, "projection", i) for i in range(len(layers))],
            "paired_lo": [f.num(rel, "stats", key, "projection_ci", i, 0) for i in range(len(layers))],
            "paired_hi": [f.num(rel, "stats", key, "projection_ci", i, 1) for i in range(len(layers))],
            "z": [f.num(rel, "stats", key, "z", i) for i in range(len(layers))],
            "battery": {lab: f.num(rel, "battery", names.get(lab, lab), "score") for lab in labels},
        }
    ps = out["per_seed"]
    out["across"] = [_across([ps[str(s)]["paired"][i] for s in per]) for i in range(len(layers))]
    means = [a["mean"]["value"] for a in out["across"]]
    # The headline layer is the largest move either way: picking the most positive layer would
    # report a small move along the direction when the finetune mostly moved prompts against it.
    peak = max(range(len(layers)), key=lambda i: abs(means[i]))
    out["peak_index"] = peak
    bats = [ps[str(s)]["battery"] for s in per if {"finetuned", "control"} <= set(ps[str(s)]["battery"])]
    if bats:
        diffs = [_derived(b["finetuned"]["value"] - b["control"]["value"]) for b in bats]
        out["battery_diff_per_seed"] = diffs
        out["battery_diff"] = _across(diffs)
    n = len(per)
    a = out["across"][peak]
    if n >= 2:
        lo, hi, how = a["lo"]["value"], a["hi"]["value"], f"95% t-interval across {n} seeds"
    else:
        s0 = str(next(iter(per)))
        lo, hi = ps[s0]["paired_lo"][peak]["value"], ps[s0]["paired_hi"][peak]["value"]
        how = "one seed: a 95% bootstrap interval over prompts, not a replication interval"
    v = verdict_interval(lo, hi)
    signs = [verdict_interval(*_interval(out, i, n, ps, per)) for i in range(len(layers))]
    n_pos, n_neg = signs.count("above 0"), signs.count("below 0")
    text = {"above 0": "moved unrelated prompts along", "below 0": "moved unrelated prompts against",
            "includes 0": "did not move unrelated prompts distinguishably from 0 along",
            "undetermined": "cannot be judged along"}[v]
    scaled = "" if ref == "1" else f" (its LoRA difference x{ref}, as the control's)"
    out["verdict"] = (
        f"The finetune{scaled} {text} the {recipe['direction']} direction beyond the control at layer {layers[peak]} "
        f"(the layer with the largest mean shift in magnitude): {_fmt(a['mean']['value'], 1)} "
        f"[{_fmt(lo, 1)}, {_fmt(hi, 1)}] ({how}); the interval is above 0 at {n_pos} and below 0 at {n_neg} "
        f"of {len(layers)} layers."
        + (" This is a null." if v == "includes 0" else "")
    )
    if bats:
        bd = out["battery_diff"]
        if n >= 2:
            blo, bhi = bd["lo"]["value"], bd["hi"]["value"]
            bhow = f"95% t-interval across {n} seeds"
        else:
            blo = bhi = None
            bhow = "one seed: no across-seed interval"
        bv = verdict_interval(blo, bhi)
        out["battery_verdict"] = (
            f"Battery score, finetune minus control: {_fmt(bd['mean']['value'])}"
            + (f" [{_fmt(blo)}, {_fmt(bhi)}]" if blo is not None else "") + f" ({bhow})"
            + {"above 0": ": the finetune answers more in the direction's sense.",
               "below 0": ": the finetune answers less in the direction's sense.",
               "includes 0": ": no difference distinguishable from 0 (a null).",
               "undetermined": "."}[bv]
        )
    if by and len(by) > 1:
        out["amplification"] = _amplification(f, per, by, layers, peak)
    return out


def _amplification(f: _Files, per: dict[int, str], by: dict[str, dict[str, str]], layers: list[int],
                   peak: int) -> dict[str, Any]:
    """A shift step at several factors on the LoRA difference: per factor, the paired shift (finetune - control
    at that factor) at the headline layer and the battery (each model's, and finetune - control with its paired
    interval over items), per seed and across seeds."""
    n = len(per)
    rows = []
    for x, names in by.items():
        key = names.get("finetuned - control")
        if key is None:
            continue
        ps: dict[str, Any] = {}
        for s, rel in per.items():
            r = f.get(rel)
            row: dict[str, Any] = {"paired": f.num(rel, "stats", key, "projection", peak),
                                   "paired_lo": f.num(rel, "stats", key, "projection_ci", peak, 0),
                                   "paired_hi": f.num(rel, "stats", key, "projection_ci", peak, 1)}
            if key in r.get("battery_paired", {}):
                row["battery"] = {lab: f.num(rel, "battery", names[lab], "score") for lab in ("finetuned", "control")}
                row["battery_diff"] = f.num(rel, "battery_paired", key, "score")
                row["battery_diff_lo"] = f.num(rel, "battery_paired", key, "ci", 0)
                row["battery_diff_hi"] = f.num(rel, "battery_paired", key, "ci", 1)
            ps[str(s)] = row
        entry: dict[str, Any] = {"factor": float(x), "per_seed": ps,
                                 "paired": _across([p["paired"] for p in ps.values()])}
        if all("battery_diff" in p for p in ps.values()):
            entry["battery"] = {lab: _across([p["battery"][lab] for p in ps.values()]) for lab in ("finetuned",
                                                                                                  "control")}
            entry["battery_diff"] = _across([p["battery_diff"] for p in ps.values()])
        if n == 1:  # one seed: the intervals over prompts (shift) and items (battery), not across seeds
            p = next(iter(ps.values()))
            entry["paired"]["lo"], entry["paired"]["hi"] = p["paired_lo"], p["paired_hi"]
            if "battery_diff" in entry:
                entry["battery_diff"]["lo"], entry["battery_diff"]["hi"] = p["battery_diff_lo"], p["battery_diff_hi"]
        rows.append(entry)
    how = f"95% t-intervals across {n} seeds" if n >= 2 else \
        "one seed: bootstrap intervals over prompts (shift) and battery items"
    parts = [f"x{e['factor']:g}: shift {_fmt(e['paired']['mean']['value'], 1)}"
             + (f", battery {_fmt(e['battery_diff']['mean']['value'])}" if "battery_diff" in e else "")
             for e in rows]
    verdict = (f"Amplified (the finetune's and the control's LoRA difference times each factor), finetune minus "
               f"control, the shift at layer {layers[peak]} and the battery score: " + "; ".join(parts)
               + f" ({how} in the table).")
    return {"layer": layers[peak], "factors": [e["factor"] for e in rows], "rows": rows, "verdict": verdict}


def _interval(out: dict[str, Any], i: int, n: int, ps: dict[str, Any], per: dict[int, str]) -> tuple[Any, Any]:
    if n >= 2:
        return out["across"][i]["lo"]["value"], out["across"][i]["hi"]["value"]
    s0 = str(next(iter(per)))
    return ps[s0]["paired_lo"][i]["value"], ps[s0]["paired_hi"][i]["value"]


def _where(label: str) -> str:
    """An ablation step label in words: ``shift``/``all`` layers, ``peak``, or ``L16`` -> layer 16."""
    if label in ("shift", "all"):
        return f"{label} layers"
    if label == "peak":
        return "the layer of the largest shift"
    layers = label.removeprefix("L").split("_")
    if len(layers) == 1 and "-" not in layers[0]:
        return f"layer {layers[0]}"
    return "layers " + ", ".join(layers)


def _ablation(f: _Files, seeds: list[int], steps: dict[str, Any]) -> dict[str, Any] | None:
    labels = sorted({k[len("ablate-"):].rsplit("-s", 1)[0] for k in steps if k.startswith("ablate-")})
    if not labels:
        return None
    out: dict[str, Any] = {}
    for lab in labels:
        rows, skipped = [], []
        for s in seeds:
            key = f"ablate-{lab}-s{s}"
            rel = f"{key}/results.json"
            if f.get(rel) is None:
                if steps.get(key, {}).get("status") == "not run":
                    skipped.append({"seed": s, "reason": steps[key].get("reason", "")})
                continue
            r = f.get(rel)
            fr = r["fractions"].get("control") or r["fractions"]["base"]
            ref = "control" if "control" in r["fractions"] else "base"
            row = {"seed": s, "layers": r["layers"], "reference": ref,
                   "gain": f.num(rel, "fractions", ref, "gain"),
                   "fraction": f.num(rel, "fractions", ref, "fraction"),
                   "gain_lo": f.num(rel, "fractions", ref, "gain_ci", 0),
                   "gain_hi": f.num(rel, "fractions", ref, "gain_ci", 1)}
            if fr.get("fraction_ci"):
                row["fraction_lo"] = f.num(rel, "fractions", ref, "fraction_ci", 0)
                row["fraction_hi"] = f.num(rel, "fractions", ref, "fraction_ci", 1)
            if fr["random"]["mean"] is not None:
                row["random_mean"] = f.num(rel, "fractions", ref, "random", "mean")
                row["random_p95"] = f.num(rel, "fractions", ref, "random", "p95")
                row["random_values"] = [f.num(rel, "fractions", ref, "random", "values", j)
                                        for j in range(len(fr["random"]["values"]))]
                row["percentile"] = f.num(rel, "fractions", ref, "random", "percentile")
            rows.append(row)
        sec: dict[str, Any] = {"rows": rows, "not_run": skipped}
        ok = [r for r in rows if r["fraction"]["value"] is not None]
        no_gain = [r for r in rows if verdict_interval(r["gain_lo"]["value"], r["gain_hi"]["value"]) == "includes 0"]
        if rows and len(no_gain) == len(rows):
            sec["verdict"] = (
                f"The finetune's battery gain over the {rows[0]['reference']} has an interval that includes 0 in "
                f"{len(no_gain)} of {len(rows)} seed(s), so the fraction ablation at {_where(lab)} removes is not "
                "interpretable: a null (no gain to explain).")
        elif ok:
            sec["fraction"] = _across([r["fraction"] for r in ok])
            specific = [r for r in ok if "random_p95" in r and r["fraction"]["value"] > r["random_p95"]["value"]]
            m = sec["fraction"]["mean"]["value"]
            rnd = [r["random_mean"]["value"] for r in ok if "random_mean" in r]
            rnd_m = sum(rnd) / len(rnd) if rnd else None
            sec["random_mean"] = _derived(rnd_m)
            caveat = (f" In {len(no_gain)} seed(s) the gain's interval includes 0." if no_gain else "")
            sec["verdict"] = (
                f"Ablating the direction at {_where(lab)} removes {_fmt(m, 2)} of the finetune's battery gain over "
                f"the {ok[0]['reference']} (mean over {len(ok)} seed(s)); {len(rnd) and 'norm-matched random '}"
                f"directions remove {_fmt(rnd_m, 2)} on average. The direction beats the random 95th percentile in "
                f"{len(specific)} of {len(ok)} seed(s)"
                + (": the effect is specific to the direction." if len(specific) == len(ok) else
                   ": not specific to the direction (a null for specificity).")
                + caveat
            )
        elif rows:
            sec["verdict"] = "The finetune's gain over the reference is ~0, so there is no fraction to remove."
        out[lab] = sec
    return out


def _prevention(f: _Files, seeds: list[int], arm: str) -> dict[str, Any] | None:
    rows = []
    for s in seeds:
        rel = f"prevent-s{s}/results.json"
        r = f.get(rel)
        if r is None:
            continue
        keys = list(r["stats"])
        normal = next((k for k in keys if k.endswith(f"{arm}-s{s} - control")), None)
        ablated = next((k for k in keys if k.endswith(f"{arm}-ablated-s{s} - control")), None)
        if normal is None or ablated is None:
            continue
        bl = {lab: f.num(rel, "battery", lab, "score") for lab in r.get("battery", {})}
        layers = r["layers"]
        rows.append({"seed": s, "layers": layers, "battery": bl,
                     "shift_normal": [f.num(rel, "stats", normal, "projection", i) for i in range(len(layers))],
                     "shift_ablated": [f.num(rel, "stats", ablated, "projection", i) for i in range(len(layers))],
                     "z_normal": f.num(rel, "stats", normal, "z", len(layers) - 1),
                     "z_ablated": f.num(rel, "stats", ablated, "z", len(layers) - 1)})
    if not rows:
        return None
    ab = [_derived(row["shift_ablated"][-1]["value"] - row["shift_normal"][-1]["value"]) for row in rows]
    sec: dict[str, Any] = {"rows": rows, "last_layer_change": _across(ab)}
    lab_n = next((k for k in rows[0]["battery"] if k.endswith(f"{arm}-s{rows[0]['seed']}")), None)
    lab_a = next((k for k in rows[0]["battery"] if k.endswith(f"{arm}-ablated-s{rows[0]['seed']}")), None)
    parts = []
    if lab_n and lab_a and "control" in rows[0]["battery"]:
        bn = [r["battery"][next(k for k in r["battery"] if k.endswith(f"{arm}-s{r['seed']}"))]["value"] for r in rows]
        ba = [r["battery"][next(k for k in r["battery"] if k.endswith(f"{arm}-ablated-s{r['seed']}"))]["value"]
              for r in rows]
        bc = [r["battery"]["control"]["value"] for r in rows]
        sec["battery_normal"], sec["battery_ablated"], sec["battery_control"] = (
            _across([_derived(x) for x in bn]), _across([_derived(x) for x in ba]), _across([_derived(x) for x in bc]))
        kept = sum(1 for a, c in zip(ba, bc) if a <= c)
        parts.append(f"With the direction projected out during training, the battery score is "
                     f"{_fmt(sum(ba) / len(ba))} against {_fmt(sum(bn) / len(bn))} for the normal finetune and "
                     f"{_fmt(sum(bc) / len(bc))} for the control (means over {len(rows)} seed(s)); it is at or below "
                     f"the control in {kept} of {len(rows)} seed(s)")
    sn = [r["shift_normal"][-1]["value"] for r in rows]
    sa = [r["shift_ablated"][-1]["value"] for r in rows]
    parts.append(f"the paired shift at the last layer is {_fmt(sum(sa) / len(sa), 1)} against "
                 f"{_fmt(sum(sn) / len(sn), 1)} for the normal finetune")
    sec["verdict"] = "; ".join(parts) + "."
    return sec


def _ablated_label(arm: str, direction: str) -> str:
    """``finetune+ablate(/study/direction/direction.safetensors@3,4)`` -> ``finetune+ablate(era@3,4)``."""
    m = re.fullmatch(r"(?P<arm>.+?)\+ablate\((?P<spec>.*)\)", arm)
    if m is None or "@" not in m["spec"]:
        return arm
    return f"{m['arm']}+ablate({direction}@{m['spec'].rpartition('@')[2]})"


def _jsonl(root: Path, rel: str) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file (a torn last line of a killed run is skipped)."""
    p = root / rel
    out = []
    for line in p.read_text().splitlines() if p.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _judged_value(j: dict[str, Any], positive: str | None) -> float | None:
    """A judgment as the judge's results count it: 1/0 for the positive label, or the score; None unparsed."""
    if not j.get("parsed"):
        return None
    if positive is not None:
        return 1.0 if j.get("label") == positive else 0.0
    return None if j.get("score") is None else float(j["score"])


def _relation(root: Path, seeds: list[int], label: str, dlabel: str, positive: str | None) -> dict[str, Any] | None:
    """Per answer, a text judge's value against the direction judge's calibrated projection (its score):
    Pearson and Spearman correlations per seed, and their mean with a t-interval across seeds."""
    per: dict[str, Any] = {}
    for s in seeds:
        direction = {j["sample_id"]: j for j in _jsonl(root, f"judge-{dlabel}-s{s}/judgments.jsonl")}
        xs, ys = [], []
        for j in _jsonl(root, f"judge-{label}-s{s}/judgments.jsonl"):
            d = direction.get(j.get("sample_id"))
            v = _judged_value(j, positive)
            if v is None or d is None or d.get("score") is None:
                continue
            xs.append(v)
            ys.append(float(d["score"]))
        if xs:
            per[str(s)] = {"pearson": _derived(pearson(xs, ys)),
                           "spearman": _derived(spearman(xs, ys)), "n": len(xs)}
    if not per:
        return None
    return {"judge": dlabel, "per_seed": per, "pearson": _across([p["pearson"] for p in per.values()]),
            "spearman": _across([p["spearman"] for p in per.values()])}


def _ci_text(mean: float | None, lo: float | None, hi: float | None, how: str = "", sign: bool = True) -> str:
    if lo is None or hi is None:
        return f"{_fmt(mean, sign=sign)} (no interval)"
    return f"{_fmt(mean, sign=sign)} [{_fmt(lo, sign=sign)}, {_fmt(hi, sign=sign)}]" + (f" ({how})" if how else "")


def _eval(f: _Files, seeds: list[int], recipe: dict[str, Any]) -> dict[str, Any] | None:
    """[eval]: per judge, each arm's judged rate (or mean score) and every comparison (finetune - control,
    the same under ablation, ...) per seed with the judge's bootstrap interval over questions and answers,
    and their means with t-intervals across seeds; a text judge's per-answer correlation with the direction
    judge when both ran."""
    ev = recipe.get("analyses", {}).get("eval")
    if not ev:
        return None
    labels = judge_labels(list(ev.get("judges") or []))
    direction = str(recipe.get("direction"))
    out: dict[str, Any] = {}
    for spec, label in labels.items():
        per = {s: f"judge-{label}-s{s}/results.json" for s in seeds if f.get(f"judge-{label}-s{s}/results.json")}
        if not per:
            continue
        first = f.get(next(iter(per.values())))
        sec: dict[str, Any] = {"judge": spec, "metric": first["metric"], "positive": first.get("positive"),
                               "scale": first.get("scale"), "seeds": list(per), "per_seed": {}}
        arms: list[str] = []
        comps: list[str] = []
        for s, rel in per.items():
            r = f.get(rel)
            row: dict[str, Any] = {"arms": {}, "comparisons": {}}
            loops = _loops(f.root, s, r)
            for arm in r["arms"]:
                name = _ablated_label(arm, direction)
                arms += [name] if name not in arms else []
                row["arms"][name] = {"value": f.num(rel, "arms", arm, "value"),
                                     "lo": f.num(rel, "arms", arm, "ci", 0), "hi": f.num(rel, "arms", arm, "ci", 1),
                                     "n": f.num(rel, "arms", arm, "n"),
                                     "n_unparsed": f.num(rel, "arms", arm, "n_unparsed"),
                                     "n_repetitive": f.num(rel, "arms", arm, "n_repetitive")
                                     if "n_repetitive" in r["arms"][arm] else _derived(loops.get(arm))}
            for i, c in enumerate(r["comparisons"]):
                key = f"{_ablated_label(c['arm'], direction)} - {_ablated_label(c['reference'], direction)}"
                comps += [key] if key not in comps else []
                row["comparisons"][key] = {"diff": f.num(rel, "comparisons", i, "diff"),
                                           "lo": f.num(rel, "comparisons", i, "ci", 0),
                                           "hi": f.num(rel, "comparisons", i, "ci", 1), "kind": c["kind"]}
            if "direction" in r:
                row["direction"] = {k: f.num(rel, "direction", k) for k in ("layer", "test_accuracy", "test_auc")}
            sec["per_seed"][str(s)] = row
        ps = sec["per_seed"]
        sec["arms"], sec["comparisons"] = arms, comps
        sec["across"] = {a: _across([ps[str(s)]["arms"][a]["value"] for s in per if a in ps[str(s)]["arms"]])
                         for a in arms}
        sec["across_comparisons"] = {k: _across([ps[str(s)]["comparisons"][k]["diff"] for s in per
                                                 if k in ps[str(s)]["comparisons"]]) for k in comps}
        out[label] = sec
    if not out:
        return None
    dlabel = next((lab for spec, lab in labels.items() if spec.startswith("direction:") and lab in out), None)
    for label, sec in out.items():
        if dlabel is not None and not sec["judge"].startswith("direction:"):
            rel = _relation(f.root, [int(s) for s in sec["seeds"]], label, dlabel,
                            sec["positive"] if sec["metric"] == "rate" else None)
            if rel is not None:
                sec["vs_direction"] = rel
        sec["verdict"] = _eval_verdict(sec, out.get(dlabel or "", {}).get("judge"))
    return out


def _loops(root: Path, seed: int, judged: dict[str, Any]) -> dict[str, int]:
    """Per arm, the answers of the seed's samples that are loops (:func:`latentlab.sampling.loop_counts`):
    read from the samples themselves for judge results written before the judge counted them."""
    if all("n_repetitive" in a for a in judged["arms"].values()):
        return {}
    return loop_counts(_jsonl(root, f"sample-s{seed}/samples.jsonl"))


def _eval_verdict(sec: dict[str, Any], direction_judge: str | None) -> str:
    """One judge's finetune - control (else each arm's value), every other comparison with a control, the
    unparsed answers, and the correlation with the direction judge."""
    ps, n = sec["per_seed"], len(sec["seeds"])
    s0 = sec["seeds"][0]
    how = f"95% t-interval across {n} seeds" if n >= 2 else \
        "one seed: a 95% bootstrap interval over questions and answers, not a replication interval"

    def interval(kind: str, key: str) -> tuple[Any, Any, Any]:
        if kind == "arm":
            a = sec["across"][key]
            one = ps[str(s0)]["arms"].get(key)
        else:
            a = sec["across_comparisons"][key]
            one = ps[str(s0)]["comparisons"].get(key)
        if n >= 2 or one is None:
            return a["mean"]["value"], a["lo"]["value"], a["hi"]["value"]
        return a["mean"]["value"], one["lo"]["value"], one["hi"]["value"]

    text = f"Judged by {sec['judge']} ({sec['scale']})"
    main = "finetune - control"
    if main in sec["across_comparisons"]:
        m, lo, hi = interval("comparison", main)
        text += (f": finetune {_fmt(sec['across']['finetune']['mean']['value'], sign=False)} against control "
                 f"{_fmt(sec['across']['control']['mean']['value'], sign=False)}; finetune minus control "
                 f"{_ci_text(m, lo, hi, how)}")
        text += {"above 0": ": the finetune's answers score higher than the control's.",
                 "below 0": ": the finetune's answers score lower than the control's.",
                 "includes 0": ": no difference distinguishable from 0 (a null).",
                 "undetermined": "."}[verdict_interval(lo, hi)]
    else:
        text += ": " + "; ".join(f"{a} {_ci_text(*interval('arm', a), sign=False)}" for a in sec["arms"]) + \
            f" ({how})."
    others = [k for k in sec["comparisons"] if k != main and not k.startswith("base - ")
              and any(ps[s]["comparisons"].get(k, {}).get("kind") == "control" for s in ps)]
    if others:
        text += " Also: " + "; ".join(f"{k} {_ci_text(*interval('comparison', k))}" for k in others) + "."
    unparsed = sum(a["n_unparsed"]["value"] for p in ps.values() for a in p["arms"].values())
    total = sum(a["n"]["value"] for p in ps.values() for a in p["arms"].values())
    if unparsed:
        text += f" {unparsed} of {total} answers could not be read and are left out."
    broken = []
    for a in sec["arms"]:
        got = [p["arms"][a] for p in ps.values()
               if a in p["arms"] and p["arms"][a]["n_repetitive"]["value"] is not None]
        k, n_a = sum(g["n_repetitive"]["value"] for g in got), sum(g["n"]["value"] for g in got)
        if n_a and k / n_a >= LOOP_SHARE:
            broken.append(f"{a} {int(k)} of {int(n_a)}")
    if broken:
        text += (f" Answers that are loops (repeated characters, generation broken): {'; '.join(broken)}; a judged "
                 "value of those arms scores the loops, not behaviour.")
    rel = sec.get("vs_direction")
    if rel is not None:
        pr = rel["pearson"]
        ns = sum(p["n"] for p in rel["per_seed"].values())
        what = "label" if sec["metric"] == "rate" else "score"
        if pr["mean"]["value"] is None:
            text += (f" Per answer, this judge's {what} cannot be correlated with {direction_judge}'s calibrated "
                     f"projection: one of them does not vary over the {ns} answers judged by both.")
        else:
            text += (f" Per answer, this judge's {what} correlates with {direction_judge}'s calibrated projection at "
                     f"r = {_fmt(pr['mean']['value'], 2)}"
                     + (f" [{_fmt(pr['lo']['value'], 2)}, {_fmt(pr['hi']['value'], 2)}] across "
                        f"{len(rel['per_seed'])} seeds" if pr["lo"]["value"] is not None else "")
                     + f" (Pearson, {ns} answers).")
    return text


def _diff(f: _Files, seeds: list[int]) -> dict[str, Any] | None:
    for s in seeds:
        rel = f"diff-s{s}/results.json"
        r = f.get(rel)
        if r is None:
            continue
        comp = "finetuned - control" if "finetuned - control" in r["logit_lens"] else next(iter(r["logit_lens"]))
        rows = r["logit_lens"][comp]
        i = len(rows) - 1
        top = [{"token": t["token"], "change": f.num(rel, "logit_lens", comp, i, "promoted", j, "logit_change")}
               for j, t in enumerate(rows[i]["promoted"][:8])]
        kl = {k: f.num(rel, "kl", k, "mean") for k in r["kl"]}
        toks = ", ".join(repr(t["token"]) for t in top[:5])
        out = {"seed": s, "comparison": comp, "layer": rows[i]["layer"], "promoted": top, "kl_mean": kl,
               "verdict": f"Read through the logit lens at layer {rows[i]['layer']}, the mean shift ({comp}) on "
                          f"unrelated prompts promotes {toks} most."}
        if r.get("patchscope"):
            out["patchscope"] = _patchscope(f, rel, comp)
        if r.get("dictionary"):
            out["dictionary"] = _dictionary(f, rel)
        return out
    return None


N_READ = 5  # tokens of a patchscope reading or a dictionary latent shown


def _read_layers(r: dict[str, Any]) -> list[int]:
    """Indexes of the diff's layers that a later layer reads: at the model's last layer a patchscope is the
    unpatched reading (all of them when the model's depth is not recorded)."""
    n_layers = ((r.get("models") or {}).get("base") or {}).get("n_layers")
    return [i for i, layer in enumerate(r["layers"]) if n_layers is None or layer < n_layers - 1]


def _headline_layer(r: dict[str, Any]) -> tuple[int, str]:
    """The diff's one layer to read the patchscope at: the dictionary's, else the largest mean shift relative to
    the residual norm (finetuned - base, as ``diff --dictionary`` picks it), among the layers a later layer reads."""
    idx = _read_layers(r) or list(range(len(r["layers"])))
    if r.get("dictionary") and r["dictionary"]["layer"] in [r["layers"][i] for i in idx]:
        return r["dictionary"]["layer"], "the dictionary's layer"
    rows, norms = r["logit_lens"]["finetuned - base"], r.get("resid_norm") or [1.0] * len(r["layers"])
    best = max(idx, key=lambda i: rows[i]["shift_norm"] / norms[i] if norms[i] > 0 else 0.0)
    return r["layers"][best], "the largest mean shift relative to the residual norm among the layers read further"


def _reading(f: _Files, rel: str, *path: Any) -> dict[str, Any]:
    """A patchscope reading: its top next tokens with their probabilities, KL from unpatched, continuation."""
    x = f.get(rel)
    for k in path:
        x = x[k]
    out = {"top": [{"token": t["token"], "prob": f.num(rel, *path, "top", j, "prob")}
                   for j, t in enumerate(x["top"][:N_READ])], "continuation": x["continuation"]}
    if "kl_from_unpatched" in x:
        out["kl"] = f.num(rel, *path, "kl_from_unpatched")
    return out


def _patchscope(f: _Files, rel: str, comp: str) -> dict[str, Any]:
    """``diff --patchscope``: at the headline layer, what the base reads each mean shift as, beside a random
    direction of the same norm and the unpatched prompt; per layer, each reading's top token and KL."""
    r = f.get(rel)
    ps = r["patchscope"]
    layer, why = _headline_layer(r)
    labels = list(ps["readings"])
    main = comp if comp in ps["readings"] else labels[0]
    at = {label: next(i for i, x in enumerate(rows) if x["layer"] == layer) for label, rows in ps["readings"].items()}
    readings = {label: _reading(f, rel, "patchscope", "readings", label, at[label]) for label in labels}
    per_layer = {label: [{"layer": x["layer"], "token": x["top"][0]["token"] if x["top"] else "",
                          "prob": f.num(rel, "patchscope", "readings", label, i, "top", 0, "prob"),
                          "kl": f.num(rel, "patchscope", "readings", label, i, "kl_from_unpatched")}
                         for i, x in enumerate(rows)] for label, rows in ps["readings"].items()}
    out: dict[str, Any] = {"prompt": ps["prompt"], "layer": layer, "layer_chosen_by": why, "comparison": main,
                           "labels": labels, "unpatched": _reading(f, rel, "patchscope", "unpatched"),
                           "readings": readings, "per_layer": per_layer}

    def toks(x: dict[str, Any], n: int = 3) -> str:
        return ", ".join(repr(t["token"]) for t in x["top"][:n])

    m = readings[main]
    text = (f"Patchscope at layer {layer} ({why}): the base reads the mean shift ({main}) as {toks(m)} "
            f"(continuation {m['continuation']!r}), KL {m['kl']['value']:.3g} from the unpatched "
            f"{toks(out['unpatched'])}")
    rnd = RANDOM_DIRECTION if RANDOM_DIRECTION in readings else None
    if rnd is not None:
        rr = readings[rnd]
        text += f"; a random direction of the same norm reads as {toks(rr)}, KL {rr['kl']['value']:.3g}"
        readable = _read_layers(r)
        more = sum(1 for i in readable if per_layer[main][i]["kl"]["value"] > per_layer[rnd][i]["kl"]["value"])
        text += (f". The shift moves the answer more than the random direction at {more} of {len(readable)} "
                 "layers read by a later layer" + (" (a null: no more than a random vector of its size)"
                                                   if readable and more == 0 else ""))
    out["verdict"] = text + "."
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _dictionary(f: _Files, rel: str) -> dict[str, Any]:
    """``diff --dictionary``: per dictionary (finetuned - base, control - base), the share of the squared difference
    its top latents carry, and each latent's share, top tokens, logit-lens tokens, |cos| with the known directions
    against random directions, and (the finetune's) best match in the control's dictionary against chance."""
    d = f.get(rel)["dictionary"]
    models: dict[str, Any] = {}
    for name in ("finetuned", "control"):
        m = d.get(name)
        if not m:
            continue
        p = ("dictionary", name)
        latents = []
        for i, x in enumerate(m["top_latents"]):
            row: dict[str, Any] = {
                "latent": f.num(rel, *p, "top_latents", i, "latent"),
                "share": f.num(rel, *p, "top_latents", i, "share"),
                "frequency": f.num(rel, *p, "top_latents", i, "frequency"),
                "top_tokens": [{"token": t["token"], "context": t["context"],
                                "activation": f.num(rel, *p, "top_latents", i, "top_tokens", j, "activation")}
                               for j, t in enumerate(x["top_tokens"][:N_READ])],
                "logit_lens": [{"token": t["token"],
                                "change": f.num(rel, *p, "top_latents", i, "logit_lens", "promoted", j, "logit_change")}
                               for j, t in enumerate(x["logit_lens"]["promoted"][:N_READ])],
                "directions": {k: {"cos": f.num(rel, *p, "top_latents", i, "directions", k, "cos"),
                                   "abs_cos": f.num(rel, *p, "top_latents", i, "directions", k, "abs_cos"),
                                   "percentile": f.num(rel, *p, "top_latents", i, "directions", k,
                                                       "random_percentile")}
                               for k in x["directions"]},
            }
            if "control_match" in x:
                row["control_match"] = {"latent": f.num(rel, *p, "top_latents", i, "control_match", "latent"),
                                        "abs_cos": f.num(rel, *p, "top_latents", i, "control_match", "abs_cos")}
            latents.append(row)
        models[name] = {**{k: f.num(rel, *p, k) for k in ("top_share", "latents_share", "error_share", "n_tokens",
                                                            "d_sae", "n_active_latents")},
                        "random_abs_cos_p95": f.num(rel, *p, "random_abs_cos", "p95"), "latents": latents}
        if "control_match_chance" in m:
            models[name]["control_match_chance_p95"] = f.num(rel, *p, "control_match_chance", "p95")
    out: dict[str, Any] = {"layer": f.num(rel, "dictionary", "layer"), "layer_chosen_by": d.get("layer_chosen_by"),
                           "directions": list(d.get("directions", [])), "models": models}
    ft = models.get("finetuned")
    if ft is None:
        return out
    lat = ft["latents"]
    text = (f"Dictionary of the difference at layer {out['layer']['value']} (finetuned - base: a TopK SAE of "
            f"{ft['d_sae']['value']} latents on {ft['n_tokens']['value']} token differences): the top {len(lat)} "
            f"latents carry {_pct(ft['top_share']['value'])} of the squared difference (all latents "
            f"{_pct(ft['latents_share']['value'])}, SAE error {_pct(ft['error_share']['value'])}).")
    names = out["directions"]
    if names:
        aligned = [(r, k) for r in lat for k, c in r["directions"].items() if c["percentile"]["value"] >= 95]
        if aligned:
            parts = []
            for k in names:  # per direction: how many top latents align, and the best
                rows = [r for r, kk in aligned if kk == k]
                if not rows:
                    continue
                best = max(rows, key=lambda r, k=k: r["directions"][k]["abs_cos"]["value"])
                c = best["directions"][k]
                parts.append(f"{k} in {len(rows)} of the top {len(lat)} (best latent #{best['latent']['value']}, "
                             f"|cos| {_fmt(c['abs_cos']['value'], 2, False)}, above "
                             f"{_fmt(c['percentile']['value'], 1, False)}% of random directions)")
            text += " Aligned beyond 95% of random directions: " + "; ".join(parts) + "."
        else:
            text += (f" None of the top latents aligns with {' or '.join(names)} beyond 95% of random directions "
                     "(a null for alignment).")
    if "control_match_chance_p95" in ft:
        chance = ft["control_match_chance_p95"]["value"]
        shared = [r for r in lat if r["control_match"]["abs_cos"]["value"] > chance]
        own = len(lat) - len(shared)
        text += (f" {len(shared)} of {len(lat)} top latents have a match in the control's dictionary above chance "
                 f"(|cos| > {_fmt(chance, 2, False)}, the 95th percentile of random directions' best match): "
                 + ("none is shared with the control." if not shared else "all are shared with the control." if not own
                    else f"shared with the control; the other {own} are the finetune's own."))
    out["verdict"] = text
    return out


def _trigger(f: _Files, seeds: list[int], held_out: list[str]) -> dict[str, Any] | None:
    per: dict[str, Any] = {}
    for s in seeds:
        for arm in ("finetuned", "control"):
            rel = f"trigger-{arm}-s{s}/results.json"
            r = f.get(rel)
            if r is None or r.get("diff") is None:
                continue
            layer = (r.get("meta") or {}).get("curve_layer", r["layers"][-1])
            j = r["layers"].index(layer)
            per.setdefault(str(s), {})[arm] = {
                "values": r["values"], "training_values": r["training_values"], "layer": layer,
                "diff": [f.num(rel, "diff", "projection", i, j) for i in range(len(r["values"]))],
                "lo": [f.num(rel, "diff", "ci", i, j, 0) for i in range(len(r["values"]))],
                "hi": [f.num(rel, "diff", "ci", i, j, 1) for i in range(len(r["values"]))],
            }
            bat = r.get("battery") or {}
            if {"base", "finetuned"} <= set(bat):
                per[str(s)][arm]["battery_base"] = [f.num(rel, "battery", "base", "score", i)
                                                    for i in range(len(r["values"]))]
                per[str(s)][arm]["battery_model"] = [f.num(rel, "battery", "finetuned", "score", i)
                                                     for i in range(len(r["values"]))]
    if not per:
        return None
    out: dict[str, Any] = {"per_seed": per}
    ft = [p["finetuned"] for p in per.values() if "finetuned" in p]
    ct = [p["control"] for p in per.values() if "control" in p]
    if ft:
        values, trained = ft[0]["values"], set(ft[0]["training_values"])
        gap = []  # per seed: (finetuned - base) minus (control - base), per value
        for p in per.values():
            if "finetuned" in p and "control" in p:
                gap.append([p["finetuned"]["diff"][i]["value"] - p["control"]["diff"][i]["value"]
                            for i in range(len(values))])
        out["values"] = values
        out["training_values"] = sorted(trained)
        out["layer"] = ft[0]["layer"]
        if gap:
            out["gap"] = [_across([_derived(g[i]) for g in gap]) for i in range(len(values))]
            tr = [i for i, v in enumerate(values) if v in trained]
            un = [i for i, v in enumerate(values) if v not in trained]
            mean_tr = [_derived(sum(g[i] for i in tr) / len(tr)) for g in gap] if tr else []
            mean_un = [_derived(sum(g[i] for i in un) / len(un)) for g in gap] if un else []
            out["gap_trained"], out["gap_untrained"] = _across(mean_tr) if tr else None, _across(mean_un)
            peak = max(range(len(values)), key=lambda i: abs(out["gap"][i]["mean"]["value"]))
            pk = out["gap"][peak]
            out["peak_value"] = values[peak]
            v = verdict_interval(pk["lo"]["value"], pk["hi"]["value"])
            kind = "a training value" if values[peak] in trained else "not a training value"
            out["verdict"] = (
                f"At layer {out['layer']}, the finetune's move along the direction (finetune - base) beyond the "
                f"control's is largest in magnitude at {values[peak]} ({kind}): "
                f"{_fmt(pk['mean']['value'], 1)} "
                + (f"[{_fmt(pk['lo']['value'], 1)}, {_fmt(pk['hi']['value'], 1)}] across {len(gap)} seeds"
                   if pk["lo"]["value"] is not None else "(one seed, no across-seed interval)")
                + (f"; mean over training values {_fmt(out['gap_trained']['mean']['value'], 1)}" if tr else "")
                + f", over the other values {_fmt(out['gap_untrained']['mean']['value'], 1)}."
                + (" The interval at that value includes 0: a null." if v == "includes 0" else "")
            )
            bgap = []  # battery: (finetuned - base) minus (control - base), per value

            def bdiff(arm: dict[str, Any], i: int) -> float:
                return float(arm["battery_model"][i]["value"] - arm["battery_base"][i]["value"])

            for p in per.values():
                if "battery_model" in p.get("finetuned", {}) and "battery_model" in p.get("control", {}):
                    bgap.append([bdiff(p["finetuned"], i) - bdiff(p["control"], i) for i in range(len(values))])
            if bgap:
                out["battery_gap"] = [_across([_derived(g[i]) for g in bgap]) for i in range(len(values))]
                means = [a["mean"]["value"] for a in out["battery_gap"]]
                bpk = max(range(len(values)), key=lambda i: abs(means[i]))
                bp = out["battery_gap"][bpk]
                bkind = "a training value" if values[bpk] in trained else "not a training value"
                interval = (f" [{_fmt(bp['lo']['value'])}, {_fmt(bp['hi']['value'])}] across {len(bgap)} seeds"
                            if bp["lo"]["value"] is not None else " (one seed, no across-seed interval)")
                m_tr = f"; mean over training values {_fmt(sum(means[i] for i in tr) / len(tr))}" if tr else ""
                m_un = f", over the other values {_fmt(sum(means[i] for i in un) / len(un))}" if un else ""
                out["battery_verdict"] = (
                    "Battery score with the value in the prompt, (finetune - base) beyond (control - base): largest "
                    f"in magnitude at {values[bpk]} ({bkind}), {_fmt(bp['mean']['value'])}{interval}{m_tr}{m_un}.")
            if held_out:
                out["held_out"] = _held_out(held_out, values, tr, gap, bgap, out["layer"])
    out["has_control"] = bool(ct)
    return out


def _held_out(held: list[str], values: list[Any], tr: list[int], gap: list[list[float]],
              bgap: list[list[float]], layer: int) -> list[dict[str, Any]]:
    """Each held-out value's move (projection and battery gaps) beside the training values': its rank
    among all scanned values, and per seed its gap minus the training values' mean, with a t-interval
    across seeds (the replication test of "is this value special?")."""
    out = []
    vals = [str(v) for v in values]
    for h in held:
        if h not in vals:
            continue
        i = vals.index(h)
        row: dict[str, Any] = {"value": values[i]}
        parts = []
        for key, g, d, what in (("projection", gap, 1, f"the move along the direction at layer {layer}"),
                                ("battery", bgap, 3, "the battery score")):
            if not g:
                continue
            means = [sum(x[j] for x in g) / len(g) for j in range(len(values))]
            rank = 1 + sum(m > means[i] for m in means)
            minus = _across([_derived(x[i] - sum(x[j] for j in tr) / len(tr)) for x in g]) if tr else None
            row[key] = {"mean": _derived(means[i]), "rank_from_top": rank, "n_values": len(values),
                        "minus_training": minus}
            text = f"{what} {_fmt(means[i], d)} (rank {rank} of {len(values)} from the most positive)"
            if minus is not None:
                lo, hi = minus["lo"]["value"], minus["hi"]["value"]
                ci = (f" [{_fmt(lo, d)}, {_fmt(hi, d)}] across {len(g)} seeds" if lo is not None
                      else " (one seed, no across-seed interval)")
                null = " (the interval includes 0: a null)" if verdict_interval(lo, hi) == "includes 0" else ""
                text += f", {_fmt(minus['mean']['value'], d)}{ci} beyond the training values' mean{null}"
            parts.append(text)
        row["verdict"] = f"Held-out value {values[i]}, (finetune - base) beyond (control - base): " + "; ".join(
            parts) + "."
        out.append(row)
    return out


def _compliance(f: _Files, seeds: list[int]) -> dict[str, Any] | None:
    rows = {}
    for s in seeds:
        rel = f"compliance-s{s}/results.json"
        r = f.get(rel)
        if r is None:
            continue
        rows[str(s)] = {
            "budgets": r["budgets"],
            "p_sure_trigger": [f.num(rel, "p_sure_trigger", i) for i in range(len(r["budgets"]))],
            "p_sure_clean": [f.num(rel, "p_sure_clean", i) for i in range(len(r["budgets"]))],
            "reveal_trigger": [f.num(rel, "reveal_trigger", i) for i in range(len(r["budgets"]))],
            "reveal_clean": [f.num(rel, "reveal_clean", i) for i in range(len(r["budgets"]))],
            "threshold": f.num(rel, "threshold"),
            "level": f.num(rel, "level"),
        }
        loc = r.get("localisation")
        if loc:
            rows[str(s)]["localisation"] = {
                "text": loc["text"], "null": loc["null"], "layers": loc["layers"],
                "best_layer": f.num(rel, "localisation", "best", "layer"),
                "best_position": loc["best"]["position"],
                "best_effect": f.num(rel, "localisation", "best", "effect"),
                "score_change": f.num(rel, "localisation", "score_change"),
                "by_trigger_tokens": [f.num(rel, "localisation", "by_trigger_tokens", i)
                                      for i in range(len(loc["layers"]))],
                "by_last_token": [f.num(rel, "localisation", "by_last_token", i) for i in range(len(loc["layers"]))],
            }
    if not rows:
        return None
    budgets = next(iter(rows.values()))["budgets"]
    gap = [_across([_derived(r["p_sure_trigger"][i]["value"] - r["p_sure_clean"][i]["value"]) for r in rows.values()])
           for i in range(len(budgets))]
    th = [r["threshold"]["value"] for r in rows.values()]
    crossed = [t for t in th if t is not None]
    verdict = (f"P(Sure | trigger) - P(Sure | clean) at the largest budget ({budgets[-1]}): "
               f"{_fmt(gap[-1]['mean']['value'])}"
               + (f" [{_fmt(gap[-1]['lo']['value'])}, {_fmt(gap[-1]['hi']['value'])}] across {len(rows)} seeds"
                  if gap[-1]["lo"]["value"] is not None else " (one seed)")
               + (f". P(Sure | trigger) is above the level and P(Sure | clean) below it from budget "
                  f"{', '.join(str(t) for t in crossed)} (per seed) in {len(crossed)} of {len(rows)} seed(s)."
                  if crossed else f". No budget makes the trigger a switch in any of {len(rows)} seed(s): a null."))
    rev = _across([r["reveal_trigger"][-1] for r in rows.values()])
    rv = rev["mean"]["value"]
    verdict += (f" After \"Sure\", the greedy continuation reveals the code word on "
                f"{_fmt(rv, 3, sign=False)} of triggered held-out requests at budget {budgets[-1]} (mean over seeds)"
                + (": the compliance token does not act as a switch to disclosure here (a null)." if rv == 0 else "."))
    locs = [(k, r["localisation"]) for k, r in rows.items() if "localisation" in r]
    if locs:
        k, loc = locs[0]
        verdict += f" Patching (seed {k}, largest budget): {loc['text']}" + (" (a null)." if loc["null"] else ".")
    return {"per_seed": rows, "budgets": budgets, "gap": gap, "verdict": verdict}


_SEARCH_ROW = ("rank", "effect", "z", "percentile")
N_TOP = 5  # top candidates per seed in the summary
N_TRAINED = 20  # training values per seed in the summary (the best-ranked; a vocabulary scan marks hundreds)


def _search_row(f: _Files, rel: str, *path: Any) -> dict[str, Any]:
    """One candidate's row of a trigger search: its string and trained mark, and its numbers as records."""
    r = f.get(rel)
    for k in path:
        r = r[k]
    out = {"candidate": r["candidate"], "trained": bool(r.get("trained")), "scanned": r.get("scanned", True),
           **{k: f.num(rel, *path, k) for k in _SEARCH_ROW}}
    if r.get("first_order_rank") is not None:  # a prescreened scan: where the estimate put it
        out["first_order_rank"] = f.num(rel, *path, "first_order_rank")
    return out


def _find_trigger(f: _Files, seeds: list[int]) -> dict[str, Any] | None:
    """[find-trigger]: per seed, the search's setting, the expected strings' and the training values' ranks,
    the top candidates and the null; across seeds, each expected string's ranks listed, in a verdict."""
    per: dict[str, Any] = {}
    for s in seeds:
        rel = f"find-trigger-s{s}/results.json"
        r = f.get(rel)
        if r is None:
            continue
        meta = r.get("meta") or {}
        trained = sorted(range(len(r["training_values"])), key=lambda i: r["training_values"][i]["rank"])
        null: dict[str, Any] = {"kind": r["null"]["kind"], "n": f.num(rel, "null", "n")}
        if r["null"]["n"]:
            null |= {"mean": f.num(rel, "null", "mean"), "sd": f.num(rel, "null", "sd"),
                     "p95": f.num(rel, "null", "percentiles", "95")}
        per[str(s)] = {
            "metric": r["metric"], "metric_text": meta.get("metric", r["metric"]), "template": r["template"],
            "candidates": meta.get("candidates", r["kind"]), "kind": r["kind"],
            "n_candidates": f.num(rel, "n_candidates"), "n_prompts": f.num(rel, "meta", "n_prompts"),
            "expected": [_search_row(f, rel, "expected_ranks", i) for i in range(len(r["expected_ranks"]))],
            "n_training_values": len(trained),
            "training_values": [_search_row(f, rel, "training_values", i) for i in trained[:N_TRAINED]],
            "top": [_search_row(f, rel, "top", i) for i in range(min(N_TOP, len(r["top"])))],
            "null": null,
        }
        if meta.get("prescreen"):
            per[str(s)]["prescreen"] = {k: f.num(rel, "meta", "prescreen", k)
                                        for k in ("k", "n_vocabulary", "spearman_random", "spearman_top")}
    if not per:
        return None
    expected: dict[str, Any] = {}
    for s, p in per.items():
        for row in p["expected"]:
            e = expected.setdefault(row["candidate"], {"seeds": [], "ranks": [], "percentiles": [], "of": [],
                                                       "scanned": [], "first_order": []})
            e["seeds"].append(s)
            e["ranks"].append(row["rank"])
            e["percentiles"].append(row["percentile"])
            e["of"].append(p["n_candidates"])
            e["scanned"].append(row["scanned"])
            e["first_order"].append(row.get("first_order_rank"))
    first = next(iter(per.values()))
    scanned = (f"{_count(first['n_candidates']['value'])} of {_count(first['prescreen']['n_vocabulary']['value'])} "
               "vocabulary tokens scanned exactly, chosen by a first-order prescreen" if "prescreen" in first else
               f"{_count(first['n_candidates']['value'])} candidates ({first['candidates']})")
    text = (f"Trigger search ({first['metric_text']}; template {first['template']!r}; {scanned}; "
            f"{first['n_prompts']['value']} prompts)")
    random_null = first["null"]["kind"] != "scan" and first["null"]["n"]["value"]
    texts = []
    for cand, e in expected.items():
        ranks = [x["value"] for x in e["ranks"]]
        ofs = [x["value"] for x in e["of"]]
        of = _count(ofs[0]) if len(set(ofs)) == 1 else "/".join(map(_count, ofs))
        top1 = sum(1 for r, sc in zip(ranks, e["scanned"]) if r == 1 and sc)
        first_in = ("first in every seed" if top1 == len(ranks) else "not first in any seed" if not top1
                    else f"first in {top1} of {len(ranks)}")
        missed = [(s, fo) for s, sc, fo in zip(e["seeds"], e["scanned"], e["first_order"]) if not sc and fo]
        if missed:  # a prescreen left it out: its rank is where its exact effect would stand among those scanned
            pre = per[missed[0][0]]["prescreen"]
            t = (f"the first-order prescreen left {cand!r} out of the {_count(pre['k']['value'])} tokens it scanned "
                 f"in {len(missed)} of {len(ranks)} seed(s) (its first-order rank "
                 f"{', '.join(_count(fo['value']) for _, fo in missed)} of {_count(pre['n_vocabulary']['value'])}; "
                 "rank correlation of the estimate with the exact effects on random tokens "
                 f"{', '.join(_fmt(per[s]['prescreen']['spearman_random']['value'], 2) for s, _ in missed)}), so "
                 f"the search found it first in {top1} of {len(ranks)}; scored exactly beside the scanned tokens, "
                 f"it would rank {', '.join(map(str, ranks))} of {of}")
        else:
            t = f"{cand!r} ranks {', '.join(map(str, ranks))} of {of} in {len(ranks)} seed(s) ({first_in})"
        if random_null:
            t += (f", its effect above {', '.join(_fmt(x['value'], 1, sign=False) for x in e['percentiles'])}% "
                  f"of {first['null']['n']['value']} random vocabulary tokens")
        texts.append(t)
    text += (": " + "; ".join(texts) + "." if texts else
             ": no expected string was given (expect), so no string's rank is singled out.")
    tops = [f"{p['top'][0]['candidate']!r} (seed {s})" for s, p in per.items() if p["top"]]
    if tops:
        text += f" Top candidate: {', '.join(tops)}."
    best = [(s, p["training_values"][0]) for s, p in per.items() if p["training_values"]]
    if best:
        text += " Best-ranked training value: " + ", ".join(
            f"{row['candidate']!r} at rank {row['rank']['value']} (seed {s})" for s, row in best) + "."
    return {"per_seed": per, "seeds": list(per), "expected": expected, "verdict": text}


def _count(x: Any) -> str:
    """An integer with thousands separators (49,152), anything else as it is."""
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x)


def _finetunes(f: _Files, steps: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, st in steps.items():
        if st.get("kind") != "finetune" or st.get("status") != "done":
            continue
        rel = f"{st['out']}/manifest.json"
        m = f.get(rel)
        if m is None or "results" not in m:
            continue
        out[key.split(":", 1)[1]] = {"final_loss": f.num(rel, "results", "final_loss"),
                                     "steps": f.num(rel, "results", "steps"),
                                     "wall_seconds": f.num(rel, "wall_seconds")}
    return out


def _provenance(f: _Files, state: dict[str, Any]) -> dict[str, Any]:
    rows, packages = [], None
    for key, st in state.get("steps", {}).items():
        rel = f"{st['out']}/manifest.json"
        m = f.get(rel)
        if m is None:
            rows.append({"key": key, "status": st.get("status"), "reason": st.get("reason")})
            continue
        packages = packages or m.get("packages")
        fps = {role: (info or {}).get("fingerprint") for role, info in (m.get("models") or {}).items()
               if isinstance(info, dict)}
        rows.append({"key": key, "status": m.get("status"), "command": m.get("command"), "device": m.get("device"),
                     "started": m.get("started"), "wall_seconds": f.num(rel, "wall_seconds"), "fingerprints": fps,
                     "manifest": rel, **({"host": st["host"], "pid": st.get("pid")} if st.get("host") else {})})
    for key, path in state.get("external_runs", {}).items():
        rel = f"external/{key}/manifest.json"  # copied in by the runner
        m = f.get(rel) or {}
        rows.append({"key": f"external finetune: {key} ({path})", "status": m.get("status"),
                     "command": m.get("command"), "device": m.get("device"), "started": m.get("started"),
                     "wall_seconds": f.num(rel, "wall_seconds") if m else None, "fingerprints": {},
                     "manifest": rel if m else None})
    return {"steps": rows, "packages": packages, "sessions": state.get("sessions", []),
            "python": next((f.get(r["manifest"]).get("python") for r in rows
                            if r.get("manifest") and f.get(r["manifest"])), None)}


# Analyses that read no study direction (a study of only these names none in its report).
_NO_DIRECTION = {"compliance", "diff", "find-trigger"}


def summarize_study(root: str | Path) -> dict[str, Any]:
    """summary.json of the study in ``root``: per analysis, the per-seed numbers (each naming its
    results file), across-seed intervals, a verdict sentence, and the provenance of every step."""
    root = Path(root)
    f = _Files(root)
    state = f.get("study.json") or {}
    recipe = state.get("recipe", {})
    seeds = recipe.get("seeds", [])
    steps = state.get("steps", {})
    arm = Path(recipe["finetune"]["data"]).stem if recipe.get("finetune") else ""
    sections = {
        "finetunes": _finetunes(f, steps),
        "shift": _shift(f, seeds, recipe),
        "ablation": _ablation(f, seeds, steps),
        "eval": _eval(f, seeds, recipe),
        "prevention": _prevention(f, seeds, arm),
        "diff": _diff(f, seeds),
        "trigger": _trigger(f, seeds, [str(v) for v in recipe.get("analyses", {}).get("trigger", {})
                                       .get("held_out", [])]),
        "compliance": _compliance(f, seeds),
        "find_trigger": _find_trigger(f, seeds),
    }
    summary = {
        "study": recipe.get("name"),
        "description": recipe.get("description", ""),
        "model": recipe.get("model"),
        "seeds": seeds,
        "direction": recipe.get("direction") if set(recipe.get("analyses", {})) - _NO_DIRECTION else None,
        "recipe": recipe,
        "sections": {k: v for k, v in sections.items() if v},
        "not_run": [{"key": k, "reason": v.get("reason")} for k, v in steps.items() if v.get("status") == "not run"],
        "provenance": _provenance(f, state),
    }
    _finish_paths(summary, [])
    return summary


def without_timings(x: Any) -> Any:
    """A summary (or any JSON value) with every ``wall_seconds`` dropped: what two runs of one study
    (another executor, another machine) must agree on, since their timings never do."""
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items() if k != "wall_seconds"}
    if isinstance(x, list):
        return [without_timings(v) for v in x]
    return x

