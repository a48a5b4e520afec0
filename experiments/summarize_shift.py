"""Summarise a shift experiment (experiments/bird_shift.sh, experiments/persona_shift.sh): per model
and seed, the shift of the finetune vs its control along the direction (mean projection with
bootstrap CI, z against random directions, cosine) at every layer, battery scores, the across-seed
summary, and the screening prediction checked against the measured shift. Writes OUT/summary.md,
OUT/summary.json and OUT/paired-MODEL.png (+ .html); the PNG is skipped, with a warning, where
plotly's kaleido finds no Chromium.

Reads only OUT/MODEL/shift-sSEED/results.json and OUT/MODEL/screen-DATA/results.json, the run
folders the experiment scripts write, so `make summaries` regenerates the committed summaries from
the committed files.

    python experiments/summarize_shift.py OUT [--finetuned old-birds --control modern-birds --direction era]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from latentlab.io import write_json, write_text
from latentlab.plots import save_figure
from latentlab.stats import bootstrap_ci, bootstrap_means, seed_interval


def screening_check(screens: dict[str, dict], model_summary: dict, names: tuple[str, str]) -> list[str]:
    """Does the pre-training screen predict the measured shift?

    With both screens, the prediction is finetuned - control: paired per example when the datasets
    share prompts line by line (old/modern birds), else unpaired; it is compared with the measured
    paired shift. With the finetune's screen alone, its mean is compared with the measured
    finetuned - base shift. Intervals: bootstrap over examples (prediction), t across seeds
    (measurement). Reported: sign agreement where both intervals exclude 0, and the Pearson
    correlation of the two layer profiles."""
    ft = torch.tensor(screens["finetuned"]["per_example"])  # [examples, layers]

    def boot(x: torch.Tensor, seed: int = 0) -> torch.Tensor:  # [boot, layers]
        return bootstrap_means(x, 2000, seed)

    if "control" in screens:
        ct = torch.tensor(screens["control"]["per_example"])
        paired = ft.shape == ct.shape and screens["finetuned"]["prompts"] == screens["control"]["prompts"]
        pred = ft.mean(0) - ct.mean(0)
        boots = boot(ft - ct) if paired else boot(ft) - boot(ct, seed=1)
        label = f"{names[0]} - {names[1]}" + (" (paired per example)" if paired else " (unpaired)")
        rows = model_summary["paired"]
        meas = [row["mean"] for row in rows]
        meas_ci = [row["seed_ci"] for row in rows]
    else:
        pred, boots, label = ft.mean(0), boot(ft), f"{names[0]} - base"
        per_seed = [st["stats"]["finetuned"]["projection"] for st in model_summary["seeds"].values()]
        cols = [seed_interval(list(v)) for v in zip(*per_seed)]
        meas = [c[0] for c in cols]
        meas_ci = [[c[1], c[2]] for c in cols]
    lo, hi = boots.quantile(0.025, dim=0), boots.quantile(0.975, dim=0)
    m = torch.tensor(meas)
    m_lo = torch.tensor([c[0] for c in meas_ci])
    m_hi = torch.tensor([c[1] for c in meas_ci])
    pred_sign = torch.where(lo > 0, 1, torch.where(hi < 0, -1, 0))
    meas_sign = torch.where(m_lo > 0, 1, torch.where(m_hi < 0, -1, 0))
    both = (pred_sign != 0) & (meas_sign != 0)
    agree = int(((pred_sign == meas_sign) & both).sum())
    r = float(torch.corrcoef(torch.stack([pred, m]))[0, 1])
    model_summary["screening_check"] = {
        "compares": label, "predicted": pred.tolist(), "predicted_ci": torch.stack([lo, hi], 1).tolist(),
        "measured": meas, "measured_seed_ci": meas_ci,
        "sign_agree": agree, "sign_decided_both": int(both.sum()), "pearson_r_across_layers": r,
    }
    layers = screens["finetuned"]["layers"]
    out = ["", f"#### screening prediction vs measured shift: {label}", "",
           "| layer | predicted by screen [95% CI over examples] | measured [95% t-CI across seeds] |",
           "|---:|---:|---:|"]
    for i, layer in enumerate(layers):
        out.append(f"| {layer} | {pred[i]:+.1f} [{lo[i]:+.1f}, {hi[i]:+.1f}] | {meas[i]:+.1f} "
                   f"[{meas_ci[i][0]:+.1f}, {meas_ci[i][1]:+.1f}] |")
    out += ["", f"- sign agrees at {agree} of the {int(both.sum())} layers where both intervals exclude 0; "
            f"Pearson r of the two layer profiles = {r:+.2f}"]
    return out


def seeds_figure(model: str, paired: list[dict], seeds: list[str], names: tuple[str, str], direction: str) -> Any:
    """Per-seed paired shift (finetuned - control) and its z against random directions, by layer."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = [row["layer"] for row in paired]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"projection on {direction} (seed mean, 95% t-CI)", "z vs random directions, per seed"))
    mean = [row["mean"] for row in paired]
    lo = [row["seed_ci"][0] for row in paired]
    hi = [row["seed_ci"][1] for row in paired]
    fig.add_trace(go.Scatter(x=layers + layers[::-1], y=hi + lo[::-1], fill="toself", line={"width": 0},
                             fillcolor="rgba(181,84,44,0.2)", name="95% t-CI across seeds"), row=1, col=1)
    fig.add_trace(go.Scatter(x=layers, y=mean, mode="lines+markers", line={"color": "#b5542c"},
                             name="mean over seeds"), row=1, col=1)
    for k, seed in enumerate(seeds):
        fig.add_trace(go.Scatter(x=layers, y=[row["z"][k] for row in paired], mode="lines+markers",
                                 name=f"seed {seed}", opacity=0.7), row=1, col=2)
    for col in (1, 2):
        fig.add_hline(y=0, line={"color": "#8c8c8c", "dash": "dot"}, row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_layout(title=f"{model}: {names[0]} - {names[1]} on unrelated prompts", template="plotly_white")
    return fig


def main(out: Path, ft_name: str, ctl_name: str, direction: str) -> None:
    summary: dict = {"finetuned": ft_name, "control": ctl_name, "direction": direction}
    lines = [f"# {ft_name} finetunes vs {ctl_name}: {direction} shift on unrelated prompts", ""]
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
                f"### seed {seed}: {direction} battery base {b['base']['score']:.3f}, "
                f"{ft_name} {b['finetuned']['score']:.3f} "
                f"[{b['finetuned']['ci'][0]:.2f}, {b['finetuned']['ci'][1]:.2f}], "
                f"{ctl_name} {b['control']['score']:.3f} [{b['control']['ci'][0]:.2f}, {b['control']['ci'][1]:.2f}]"
            )
            lines += [
                "",
                f"| layer | {ft_name} proj [95% CI] | z | cos | {ctl_name} proj [95% CI] | z | cos |",
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
        # Across seeds: the paired (finetuned - control) projection per layer.
        with_paired = [(f.parent.name.split("-s")[-1], json.loads(f.read_text())["stats"].get("finetuned - control"))
                       for f in shifts]
        paired_seeds = [seed for seed, p in with_paired if p is not None]
        paired = [p for _, p in with_paired if p is not None]
        if paired:
            layers = json.loads(shifts[0].read_text())["layers"]
            agg = []
            lines += [f"### {ft_name} - {ctl_name}, paired over prompts, {len(paired)} seed(s)", "",
                      "The per-seed intervals are bootstraps over prompts (they say the shift is consistent "
                      "across prompts); seeds are the replication unit, so the across-seed interval "
                      "(t, n - 1 df) is the one to read for 'does this finetune do it'.", "",
                      "| layer | mean over seeds [95% t-CI across seeds] | per seed [95% CI over prompts] | "
                      "z per seed (percentile among random directions) | seeds with CI > 0 / < 0 |",
                      "|---:|---:|---|---|---:|"]
            for i, layer in enumerate(layers):
                vals = [p["projection"][i] for p in paired]
                mean, lo, hi = seed_interval(vals)
                pos = sum(p["projection_ci"][i][0] > 0 for p in paired)
                neg = sum(p["projection_ci"][i][1] < 0 for p in paired)
                per = ", ".join(f"{p['projection'][i]:+.0f} [{p['projection_ci'][i][0]:+.0f}, "
                                f"{p['projection_ci'][i][1]:+.0f}]" for p in paired)
                zs = ", ".join(f"{p['z'][i]:+.1f} ({p['percentile'][i]:.0f})" for p in paired)
                agg.append({"layer": layer, "mean": mean, "seed_ci": [lo, hi], "pos": pos, "neg": neg,
                            "z": [p["z"][i] for p in paired], "percentile": [p["percentile"][i] for p in paired]})
                lines.append(f"| {layer} | {mean:+.1f} [{lo:+.1f}, {hi:+.1f}] | {per} | {zs} | {pos} / {neg} |")
            lines.append("")
            summary[model]["paired"] = agg
            save_figure(seeds_figure(model, agg, paired_seeds, (ft_name, ctl_name), direction), out,
                        f"paired-{model}")
            bat = [json.loads(f.read_text())["battery"] for f in shifts]
            diffs = [b["finetuned"]["score"] - b["control"]["score"] for b in bat]
            d_mean, d_lo, d_hi = seed_interval(diffs)
            summary[model]["battery_finetuned_minus_control"] = {
                "per_seed": diffs, "mean": d_mean, "seed_ci": [d_lo, d_hi]
            }
            item_cis = [  # finetuned - control, paired over the same battery items
                bootstrap_ci(torch.tensor(b["finetuned"]["per_item"]) - torch.tensor(b["control"]["per_item"]), 2000)
                for b in bat
            ]
            summary[model]["battery_finetuned_minus_control"]["per_seed_item_ci"] = item_cis
            lines.append(f"- {direction} battery, {ft_name} minus {ctl_name} per seed [95% CI, paired over items]: "
                         + ", ".join(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, (lo, hi) in zip(diffs, item_cis))
                         + f"; mean {d_mean:+.3f} [{d_lo:+.3f}, {d_hi:+.3f}] across seeds")
        screens = {}
        for role, data in (("finetuned", ft_name), ("control", ctl_name)):
            sf = mdir / f"screen-{data}" / "results.json"
            if sf.exists():
                s = json.loads(sf.read_text())
                screens[role] = s
                li = s["ranked_at_layer"]
                col = s["layers"].index(li)
                summary[model][f"screen-{data}"] = {"layer": li, "mean": s["mean"], "ci": s["ci"]}
                lo, hi = s["ci"][col]
                lines.append(
                    f"- screening {data} (layer {li}): mean projection difference {s['mean'][col]:+.2f} "
                    f"[{lo:+.2f}, {hi:+.2f}]"
                )
        if "finetuned" in screens and ("paired" in summary[model] or "control" not in screens):
            lines += screening_check(screens, summary[model], (ft_name, ctl_name))
        lines.append("")
    write_text(out / "summary.md", "\n".join(lines) + "\n")
    write_json(out / "summary.json", summary)
    print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("experiments/results/bird_shift"))
    ap.add_argument("--finetuned", default="old-birds", help="name of the finetune (for labels and screen-NAME)")
    ap.add_argument("--control", default="modern-birds", help="name of the control finetune")
    ap.add_argument("--direction", default="era")
    a = ap.parse_args()
    main(a.out, a.finetuned, a.control, a.direction)
