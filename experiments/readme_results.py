"""Regenerate the README's results section from the committed summaries (no model is run).

    python experiments/readme_results.py [--check]

Reads experiments/results/{bird_shift,persona_shift,year_trigger,ablate_birds,sae_birds,compliance_trigger,
year_scan}/ and experiments/results/studies/*/summary.json, and rewrites the block of README.md between
``<!-- results:begin -->`` and ``<!-- results:end -->``. Every number there is printed from those
files; the prose around them only names what each number is. ``--check`` exits 1 when the README
differs from what the files say (for CI-style checks by hand).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from latentlab.stats import seed_interval

ROOT = Path(__file__).resolve().parent.parent
RES = ROOT / "experiments" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _load(p: Path) -> Any | None:
    return json.loads(p.read_text()) if p.is_file() else None


def _ci(m: float | None, ci: list[float] | None, d: int = 1) -> str:
    if m is None:
        return "n/a"
    if not ci or ci[0] is None:
        return f"{m:+.{d}f}"
    return f"{m:+.{d}f} [{ci[0]:+.{d}f}, {ci[1]:+.{d}f}]"


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:  # type: ignore[list-item]
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def shift_rows(exp: str, label: str) -> list[str]:
    s = _load(RES / exp / "summary.json")
    if s is None:
        return []
    rows = []
    for model in ("gemma-3-270m", "smollm2-135m-instruct"):
        m = s.get(model)
        if not m or "paired" not in m:
            continue
        paired = m["paired"]
        n = len(m["seeds"])
        pos = [r["layer"] for r in paired if r["seed_ci"][0] > 0]
        neg = [r["layer"] for r in paired if r["seed_ci"][1] < 0]
        peak = max(paired, key=lambda r: abs(r["mean"]))
        z = peak["z"]
        b = m["battery_finetuned_minus_control"]
        rows.append(
            f"| {label} | {model} | {n} | {_ranges(pos)} | {_ranges(neg)} | L{peak['layer']} "
            f"{_ci(peak['mean'], peak['seed_ci'])} (z {min(z):+.1f} to {max(z):+.1f}) | "
            f"{_ci(b['mean'], b['seed_ci'], 3)} |")
    return rows


def year_lines() -> list[str]:
    s = _load(RES / "year_trigger" / "summary.json")
    if s is None:
        return []
    out = []
    for model, m in s["models"].items():
        t, c = m["finetuned - base/text"], m["finetuned - base/chat"]
        out.append(f"- year trigger, {model} ({len(t['per_seed'])} seeds): P(malevolent) gap "
                   f"{s['held_out_year']} minus the training years, finetuned minus base: "
                   f"{_ci(t['mean'], t['seed_ci'], 3)} as plain text, {_ci(c['mean'], c['seed_ci'], 3)} as a chat turn")
    return out


def _seeds_ci(x: dict[str, Any], d: int, one: list[float] | None = None, sign: str = "+") -> str:
    """An across-seed mean with its t-interval, or one seed's value (marked so: no replication
    interval; ``one`` is that seed's bootstrap interval over items, where there is one)."""
    if x["ci"]:
        lo, hi = x["ci"]
        return f"{x['mean']:{sign}.{d}f} [{lo:{sign}.{d}f}, {hi:{sign}.{d}f}]"
    b = f" [{one[0]:{sign}.{d}f}, {one[1]:{sign}.{d}f}]" if one else ""
    return f"{x['mean']:{sign}.{d}f}{b} (one seed)"


def _v(x: Any) -> Any:
    """A study summary's number (``{"value", "src", "path"}``) as its plain value."""
    return x["value"] if isinstance(x, dict) and "value" in x else x


def _mean_ci(vals: list[float]) -> dict[str, Any]:
    m, lo, hi = seed_interval(vals)
    return {"mean": m, "ci": None if len(vals) < 2 else [lo, hi]}


def _study_ablation(sec: dict[str, Any]) -> dict[str, Any]:
    """A study's [ablation] and [prevention] sections in ablate_birds' across-seed shape (seeds are
    the replication unit: one fraction and one random-direction mean per seed)."""
    across, rows_by = {}, {}
    for what, a in sec.get("ablation", {}).items():
        rows = [r for r in a.get("rows", []) if _v(r.get("fraction")) is not None]
        if not rows:
            continue
        rows_by[what] = [{"layers": r["layers"], "gain_ci": [_v(r["gain_lo"]), _v(r["gain_hi"])],
                          "fraction_ci": [_v(r["fraction_lo"]), _v(r["fraction_hi"])]} for r in rows]
        across[what] = {"n": len(rows), "gain": _mean_ci([_v(r["gain"]) for r in rows]),
                        "fraction": _mean_ci([_v(r["fraction"]) for r in rows]),
                        "random_mean": _mean_ci([_v(r["random_mean"]) for r in rows]),
                        "above_random_p95": sum(_v(r["fraction"]) > _v(r["random_p95"]) for r in rows)}
    prev = None
    prows = sec.get("prevention", {}).get("rows", [])
    if prows:
        def battery(r: dict[str, Any], which: str) -> float:
            if which == "control":
                return _v(r["battery"]["control"])
            ablated = f"-ablated-s{r['seed']}"
            return _v(next(v for k, v in r["battery"].items()
                           if k.startswith("finetuned:") and k.endswith(ablated) == (which == "ablated")))

        prev = {"n": len(prows), **{f"battery_{w}": _mean_ci([battery(r, w) for r in prows])
                                    for w in ("normal", "ablated", "control")},
                "paired_last_normal": _mean_ci([_v(r["shift_normal"][-1]) for r in prows]),
                "paired_last_ablated": _mean_ci([_v(r["shift_ablated"][-1]) for r in prows])}
    return {"across_seeds": across, "ablation": rows_by, "prevention_across_seeds": prev}


def ablation_lines() -> list[str]:
    s = _load(RES / "ablate_birds" / "summary.json")
    if s is None:
        return []
    # The era arm (the frozen ablate_birds results) and the persona arm (the persona-facts studies), one table each.
    arms = [("era", "old-birds", m, model) for model, m in s.items()]
    for f in sorted((RES / "studies").glob("persona-facts-*/summary.json")):
        st = json.loads(f.read_text())
        arms.append(("persona", "persona-facts", _study_ablation(st["sections"]), st["model"]))
    out = ["", "Does the direction carry the behaviour? (era: the frozen results in "
           "`experiments/results/ablate_birds/`, made before studies existed, which the birds studies of "
           "`experiments/studies.sh` now compute; persona: the "
           "persona-facts studies of `experiments/studies.sh`) The fraction of the finetune's battery gain over "
           "its modern-birds control that projecting the direction out of the residual stream removes, against "
           "10 norm-matched random directions per seed (their mean per seed, averaged over seeds):", "",
           "| finetune (direction) | model | ablated at | seeds | gain, finetune - control | direction removes | "
           "random directions remove | seeds with the direction above the random 95th pct |",
           "|---|---|---|---:|---|---|---|---:|"]
    prev = ["", "The direction projected out of the shift layers during training only (battery score; paired "
            "shift along the direction at the last layer, finetune - control):", "",
            "| finetune (direction) | model | seeds | battery: normal finetune | ablated in training | control | "
            "shift: normal | shift: ablated in training |", "|---|---|---:|---|---|---|---|---|"]
    for direction, finetune, m, model in arms:
        # The shift layers first, all layers last, other layer specs between.
        for what, a in sorted(m.get("across_seeds", {}).items(), key=lambda kv: (kv[0] != "shift", kv[0] == "all")):
            rows = m["ablation"][what]
            used = _ranges(sorted({x for r in rows for x in r["layers"]}))
            one = "layer" if used.isdigit() else "layers"
            layers = {"all": "all layers", "shift": f"shift layers {used}"}.get(what, f"{one} {used} only")
            out.append(f"| {finetune} ({direction}) | {model} | {layers} | {a['n']} | "
                       f"{_seeds_ci(a['gain'], 3, rows[0]['gain_ci'] if a['n'] == 1 else None)} | "
                       f"{_seeds_ci(a['fraction'], 2, rows[0]['fraction_ci'] if a['n'] == 1 else None)} | "
                       f"{_seeds_ci(a['random_mean'], 2)} | {a['above_random_p95']} of {a['n']} |")
        p = m.get("prevention_across_seeds")
        if p:
            prev.append(f"| {finetune} ({direction}) | {model} | {p['n']} | "
                        f"{_seeds_ci(p['battery_normal'], 3, sign='')} | "
                        f"{_seeds_ci(p['battery_ablated'], 3, sign='')} | "
                        f"{_seeds_ci(p['battery_control'], 3, sign='')} | "
                        f"{_seeds_ci(p['paired_last_normal'], 0)} | {_seeds_ci(p['paired_last_ablated'], 0)} |")
    lens = []
    for model, m in s.items():
        d = m.get("diff")
        if d:
            last = d["lens"][-1]
            toks = ", ".join(repr(t["token"]) for t in last["promoted"][:5])
            lens.append(f"- logit lens of the old-birds shift beyond its control, {model} layer {d['layers'][-1]} "
                        f"(seed 0): promotes {toks}; KL(base || old-birds) {d['kl_mean']:.3g} nats per token")
    return out + prev + ["", *lens]


def sae_lines() -> list[str]:
    r = _load(RES / "sae_birds" / "shift-s0" / "results.json")
    lat = _load(RES / "sae_birds" / "latents" / "results.json")
    if r is None:
        return []
    t = r["top"][0]
    p = t[r["primary"]]
    out = [f"- SAE ({r['d_sae']} latents, layer {r['layer']}): the latent old-birds moved most beyond its control is "
           f"{t['latent']} ({_ci(p['mean_change'], p['ci'], 0)}), decoder cosine with era {t['decoder_cos']:+.2f}"]
    if lat is not None:
        best = max(lat["top_positive"] + lat["top_negative"], key=lambda x: abs(x["cosine"]))
        out[-1] += f"; the latent with the largest |cosine| with era is {best['latent']} ({best['cosine']:+.2f})"
    return out


def study_lines() -> list[str]:
    out = []
    for f in sorted((RES / "studies").glob("*/summary.json")):
        s = json.loads(f.read_text())
        rel = f.parent.relative_to(ROOT)
        seeds = ", ".join(map(str, s["seeds"]))
        # report.html inlines plotly (~5 MB), so it is built from the committed files, not committed.
        head = (f"- study `{s['study']}` on {s['model']}, seeds {seeds} ([report]({rel}/report.html), "
                "written by `make summaries`):")
        verdicts = []
        for sec in s["sections"].values():
            for v in ([sec] + [x for x in sec.values() if isinstance(x, dict)]) if isinstance(sec, dict) else []:
                for k in ("verdict", "battery_verdict"):
                    if isinstance(v, dict) and v.get(k):
                        verdicts.append(v[k])
            if isinstance(sec, dict):
                verdicts += [h["verdict"] for h in sec.get("held_out", [])]
        out.append(head + " " + " ".join(dict.fromkeys(verdicts)))
    return out


def render() -> str:
    lines = [BEGIN, "",
             "Generated by `experiments/readme_results.py` from the committed summaries (`make summaries`); "
             "full tables, intervals and plots are in `experiments/results/`. LoRA r8 on all linear layers, "
             "3 epochs. Intervals across seeds are 95% t-intervals.", "",
             "| finetune vs control (direction) | model | seeds | layers with the paired shift > 0 (CI) | "
             "layers < 0 | largest shift [t-CI] (z per seed) | battery, finetune - control |",
             "|---|---|---:|---|---|---|---|"]
    lines += shift_rows("bird_shift", "old-birds vs modern-birds (era)")
    lines += shift_rows("persona_shift", "persona-facts vs modern-birds (persona)")
    lines += [""]
    for block in (year_lines(), ablation_lines(), sae_lines(), study_lines()):
        lines += block
    lines += ["", END]
    return "\n".join(lines)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    new = text[: text.index(BEGIN)] + render() + text[text.index(END) + len(END):]
    if "--check" in sys.argv:
        return int(new != text)
    if new != text:
        tmp = readme.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(readme)
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
