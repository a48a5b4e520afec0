"""Plotly figures for every stage, written as HTML (always) and PNG (when Chromium is available).

HTML files share one ``plotly.min.js`` per folder (``include_plotlyjs="directory"``), so a run
folder stays small and opens offline. PNG export (kaleido) needs a Chromium; where there is none we
say so once and keep going, because the HTML holds the same figure.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from latentlab.errors import LatentlabError
from latentlab.io import atomic_path

_PNG_STATE: dict[str, Any] = {"ok": None, "why": ""}
_PLOTLY_JS: dict[str, bytes] = {}  # the bundle, read once

POS_COLOR, NEG_COLOR, RANDOM_COLOR = "#b5542c", "#2c6db5", "#8c8c8c"


PNG_HINT = "for PNGs install a Chromium: `make png` (runs `apt-get install chromium`, as root)"


def _plotly_js() -> bytes:
    if "js" not in _PLOTLY_JS:
        from plotly.offline import get_plotlyjs

        _PLOTLY_JS["js"] = get_plotlyjs().encode("utf-8")
    return _PLOTLY_JS["js"]


def _ensure_plotly_js(folder: Path) -> Path:
    """Write ``folder/plotly.min.js`` atomically unless a whole copy of this plotly's bundle is there.

    Why not plotly's own copy (``write_html(include_plotlyjs="directory")``): it writes the bundle in
    place, so an interrupted first plot leaves a truncated one that breaks every HTML in the folder.
    A copy of another size (truncated by an older latentlab, or another plotly version) is replaced.
    """
    js = _plotly_js()
    target = folder / "plotly.min.js"
    try:
        if target.stat().st_size == len(js):
            return target
    except OSError:
        pass
    with atomic_path(target) as tmp:
        tmp.write_bytes(js)
    return target


def _report_png_skipped(why: str) -> None:
    """Say once per process, on stderr, that PNGs are skipped (a warning would be filtered out)."""
    print(
        f"latentlab: PNG plots skipped: no Chromium for plotly/kaleido ({why}). "
        f"HTML plots are written; {PNG_HINT}.",
        file=sys.stderr,
        flush=True,
    )


def save_figure(fig: go.Figure, folder: str | Path, stem: str, png: bool = True) -> list[Path]:
    """Write ``stem.html`` (and ``stem.png`` if possible) into ``folder``; returns the paths written.

    The list holds only files this call wrote: no PNG where the export failed or was skipped. The
    first failed PNG export in a process is reported once on stderr; later figures skip PNG quietly.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _ensure_plotly_js(folder)  # before the HTML, so an HTML on disk always has its bundle
    html = folder / f"{stem}.html"
    with atomic_path(html) as tmp:
        tmp.write_text(fig.to_html(include_plotlyjs="directory", full_html=True), encoding="utf-8")
    written = [html]
    if png and _PNG_STATE["ok"] is not False:
        target = folder / f"{stem}.png"
        try:
            with atomic_path(target) as tmp:
                fig.write_image(str(tmp), format="png", width=900, height=520, scale=2)
            _PNG_STATE["ok"] = True
            written.append(target)
        except Exception as e:  # kaleido raises several types when Chromium is missing
            lines = str(e).strip().splitlines()
            _PNG_STATE.update(ok=False, why=(lines[0] if lines else type(e).__name__)[:160])
            _report_png_skipped(_PNG_STATE["why"])
    return written


def png_available() -> bool | None:
    """True/False once a PNG export was attempted in this process, None before.

    Commands print "plots (HTML/PNG)" only when this is True, "plots (HTML)" otherwise.
    """
    return _PNG_STATE["ok"]


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(
        title=title,
        xaxis_title=x,
        yaxis_title=y,
        template="plotly_white",
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),
        margin=dict(t=90),
    )
    return fig


def _ci_bars(values: Sequence[float], cis: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Plotly error bars drawing each value's (lo, hi) interval, which need not be symmetric."""
    return dict(
        type="data",
        symmetric=False,
        array=[ci[1] - v for v, ci in zip(values, cis)],
        arrayminus=[v - ci[0] for v, ci in zip(values, cis)],
    )


def _band(fig: go.Figure, x: Sequence[float], lo: Sequence[float], hi: Sequence[float], color: str, name: str) -> None:
    fig.add_trace(
        go.Scatter(
            x=list(x) + list(x)[::-1],
            y=list(hi) + list(lo)[::-1],
            fill="toself",
            mode="lines",
            fillcolor=color,
            opacity=0.18,
            line=dict(width=0),
            hoverinfo="skip",
            showlegend=False,
            name=name,
        )
    )


def probe_accuracy_figure(report: Any, title: str = "Linear probe accuracy by layer") -> go.Figure:
    """Cross-validated and held-out accuracy per layer with 95% Wilson intervals."""
    fig = go.Figure()
    x = report.layers
    _band(fig, x, [c[0] for c in report.cv_ci], [c[1] for c in report.cv_ci], POS_COLOR, "cv")
    fig.add_trace(
        go.Scatter(
            x=x,
            y=report.cv_acc,
            mode="lines+markers",
            name=f"{report.meta.get('folds', 5)}-fold CV",
            line=dict(color=POS_COLOR),
        )
    )
    if any(t is not None for t in report.test_acc):
        _band(fig, x, [c[0] for c in report.test_ci], [c[1] for c in report.test_ci], NEG_COLOR, "test")
        fig.add_trace(
            go.Scatter(
                x=x, y=report.test_acc, mode="lines+markers", name="held-out test split", line=dict(color=NEG_COLOR)
            )
        )
    fig.add_hline(y=0.5, line_dash="dot", line_color=RANDOM_COLOR, annotation_text="chance")
    fig.update_yaxes(range=[0.3, 1.02])
    return _layout(fig, title, "layer (residual stream after block)", "accuracy")


def steering_figure(result: Any, title: str | None = None) -> go.Figure:
    """Battery score vs steering coefficient, direction vs norm-matched random, with bootstrap 95% CIs."""
    rows = result.table()
    x = [r["alpha"] for r in rows]
    fig = go.Figure()
    _band(fig, x, [r["ci"][0] for r in rows], [r["ci"][1] for r in rows], POS_COLOR, "dir")
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[r["score"] for r in rows],
            mode="lines+markers",
            name=f"{result.meta.get('direction', 'direction')} direction",
            line=dict(color=POS_COLOR),
        )
    )
    if "random" in rows[0]:
        _band(fig, x, [r["random_ci"][0] for r in rows], [r["random_ci"][1] for r in rows], RANDOM_COLOR, "rnd")
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[r["random"] for r in rows],
                mode="lines+markers",
                name="norm-matched random direction",
                line=dict(color=RANDOM_COLOR, dash="dash"),
            )
        )
    fig.add_hline(y=0.5, line_dash="dot", line_color="#cccccc")
    fig.update_yaxes(range=[0, 1])
    layers = ",".join(str(v) for v in result.layers)
    return _layout(
        fig,
        title or f"Steering at layer {layers}: battery score vs coefficient",
        "alpha (x typical residual norm)",
        "battery score  P(pos) / (P(pos)+P(neg))",
    )


def layer_screen_figure(
    layers: Sequence[int], spread: Sequence[float], probe_acc: Sequence[float] | None, chosen: int
) -> go.Figure:
    """Steering effect (score at +alpha minus -alpha) per candidate layer, used to pick the default layer."""
    fig = go.Figure()
    fig.add_trace(go.Bar(x=list(layers), y=list(spread), name="score(+a) - score(-a)", marker_color=POS_COLOR))
    if probe_acc is not None:
        fig.add_trace(
            go.Scatter(
                x=list(layers),
                y=list(probe_acc),
                name="probe accuracy",
                yaxis="y2",
                mode="lines+markers",
                line=dict(color=NEG_COLOR),
            )
        )
        fig.update_layout(yaxis2=dict(overlaying="y", side="right", range=[0.3, 1.02], title="probe accuracy"))
    fig.add_vline(x=chosen, line_dash="dot", annotation_text=f"chosen: {chosen}")
    return _layout(fig, "Layer screen for steering", "layer", "steering effect on dev items")


SERIES_COLORS = [POS_COLOR, NEG_COLOR, "#3c9a5f", "#8e5cb5", "#c9a227", "#555555"]


def shift_figure(result: Any, title: str | None = None) -> go.Figure:
    """Mean projection of (finetuned - base) on the direction per layer, each finetune with its
    bootstrap 95% CI, and the 95th percentile of |projection| on random unit directions as a band."""
    fig = go.Figure()
    x = result.layers
    for i, (label, st) in enumerate(result.stats.items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        if i == 0:
            p95 = st["random_abs_p95"]
            _band(fig, x, [-v for v in p95], p95, RANDOM_COLOR, "random")
        _band(fig, x, [c[0] for c in st["projection_ci"]], [c[1] for c in st["projection_ci"]], color, label)
        fig.add_trace(go.Scatter(x=x, y=st["projection"], mode="lines+markers", name=label, line=dict(color=color)))
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="lines",
            line=dict(color=RANDOM_COLOR, width=8),
            opacity=0.3,
            name="random directions (|proj| 95th pct)",
        )
    )
    fig.add_hline(y=0, line_color="#cccccc")
    return _layout(
        fig,
        title or f"Shift along the {result.direction} direction on unrelated prompts",
        "layer",
        "mean projection of (finetuned - base)",
    )


def cosine_figure(result: Any, title: str | None = None) -> go.Figure:
    """Cosine of each finetune's mean shift vector with the direction, per layer."""
    fig = go.Figure()
    for i, (label, st) in enumerate(result.stats.items()):
        fig.add_trace(
            go.Scatter(
                x=result.layers,
                y=st["cosine"],
                mode="lines+markers",
                name=label,
                line=dict(color=SERIES_COLORS[i % len(SERIES_COLORS)]),
            )
        )
    fig.add_hline(y=0, line_color="#cccccc")
    fig.update_yaxes(range=[-1, 1])
    return _layout(fig, title or f"cos(mean shift, {result.direction} direction)", "layer", "cosine")


def amplification_figure(result: Any) -> go.Figure:
    """A shift run with several --scale factors: each model's battery score by factor (without a battery, its
    projection at the layer where the first model moves most at the largest factor), 95% intervals."""
    fig = go.Figure()
    by = result.meta["by_scale"]
    factors = [float(f) for f in by]
    plain = list(next(iter(by.values())))
    if result.battery:
        for i, lab in enumerate(k for k in plain if " - " not in k):
            sc = [result.battery[by[f][lab]] for f in by]
            fig.add_trace(go.Scatter(x=factors, y=[s["score"] for s in sc], mode="lines+markers", name=lab,
                                     line=dict(color=SERIES_COLORS[i % len(SERIES_COLORS)]),
                                     error_y=_ci_bars([s["score"] for s in sc], [s["ci"] for s in sc])))
        fig.add_hline(y=result.battery["base"]["score"], line=dict(color=RANDOM_COLOR, dash="dot"),
                      annotation_text="base")
        return _layout(fig, f"{result.direction} battery score by factor on the LoRA difference", "factor",
                       "battery score (bootstrap 95% CI)")
    top = result.stats[by[list(by)[-1]][plain[0]]]["projection"]
    j = max(range(len(top)), key=lambda i: abs(top[i]))
    for i, lab in enumerate(plain):
        st = [result.stats[by[f][lab]] for f in by]
        ys = [s["projection"][j] for s in st]
        fig.add_trace(go.Scatter(x=factors, y=ys, mode="lines+markers", name=lab,
                                 line=dict(color=SERIES_COLORS[i % len(SERIES_COLORS)]),
                                 error_y=_ci_bars(ys, [s["projection_ci"][j] for s in st])))
    fig.add_hline(y=0, line_color="#cccccc")
    return _layout(fig, f"shift along {result.direction} at layer {result.layers[j]} by factor on the LoRA difference",
                   "factor", "mean projection (bootstrap 95% CI)")


def battery_figure(scores: dict[str, dict[str, Any]], title: str = "Battery score by model") -> go.Figure:
    labels = list(scores)
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=[scores[k]["score"] for k in labels],
            error_y=_ci_bars([scores[k]["score"] for k in labels], [scores[k]["ci"] for k in labels]),
            marker_color=[SERIES_COLORS[i % len(SERIES_COLORS)] for i in range(len(labels))],
        )
    )
    fig.update_yaxes(range=[0, 1])
    return _layout(fig, title, "model", "battery score (bootstrap 95% CI)")


def loss_figure(
    losses: Sequence[float],
    steps_per_epoch: int,
    title: str = "Training loss",
    others: dict[str, Sequence[float]] | None = None,
    label: str = "loss",
) -> go.Figure:
    """Loss per step, epochs marked; ``others`` adds more runs' curves (e.g. the control finetune)."""
    fig = go.Figure(
        go.Scatter(
            x=list(range(1, len(losses) + 1)), y=list(losses), mode="lines", name=label, line=dict(color=POS_COLOR)
        )
    )
    for name, ys in (others or {}).items():
        fig.add_trace(go.Scatter(x=list(range(1, len(ys) + 1)), y=list(ys), mode="lines", name=name))
    for e in range(steps_per_epoch, len(losses), steps_per_epoch) if steps_per_epoch > 0 else ():
        fig.add_vline(x=e + 0.5, line_dash="dot", line_color="#cccccc")
    return _layout(fig, title, "step", "loss (response tokens)")


def monitor_figure(
    steps: Sequence[int],
    projections: Sequence[Sequence[float]],
    layers: Sequence[int],
    name: str,
    show_layers: Sequence[int] | None = None,
) -> go.Figure:
    """Mean projection on a direction (relative to step 0) vs training step, one line per layer
    (``show_layers`` picks a subset: 30 lines are hard to read)."""
    if not projections:
        raise LatentlabError(
            f"no monitor data for the {name} direction", "finetune with monitor= and monitor_prompts= (or --monitor)"
        )
    fig = go.Figure()
    base = projections[0]
    keep = [(j, layer) for j, layer in enumerate(layers) if show_layers is None or layer in show_layers]
    for i, (j, layer) in enumerate(keep):
        fig.add_trace(
            go.Scatter(
                x=list(steps),
                y=[p[j] - base[j] for p in projections],
                mode="lines+markers",
                name=f"L{layer}",
                line=dict(color=f"hsl({int(260 * i / max(1, len(keep) - 1))},60%,45%)"),
            )
        )
    fig.add_hline(y=0, line_color="#cccccc")
    return _layout(
        fig,
        f"Projection on the {name} direction during training (vs step 0)",
        "step",
        "mean projection change (monitor prompts)",
    )


def patch_heatmap_figure(result: Any, mode: str = "full", title: str | None = None) -> go.Figure:
    """Normalised patching effect (0 = target, 1 = source), layer x position class."""
    mi = result.modes.index(mode)
    z = result.effect[mi].T.tolist()  # rows = positions
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=result.layers,
            y=result.positions,
            colorscale="RdBu",
            reversescale=True,
            zmid=0,
            zmin=-1,
            zmax=1,
            colorbar=dict(title="effect"),
        )
    )
    fig.update_yaxes(autorange="reversed")
    return _layout(
        fig,
        title or f"Patching {result.meta.get('component', 'resid')} ({mode}): 0 = target, 1 = source",
        "layer",
        "position (from the prompt's end)",
    )


def patch_modes_figure(results: Sequence[Any], position: str = "all", title: str | None = None) -> go.Figure:
    """Effect per layer for full, direction-only and random-direction patches at one position class."""
    fig = go.Figure()
    styles = {"full": (POS_COLOR, "solid"), "direction": (NEG_COLOR, "solid"), "random": (RANDOM_COLOR, "dash")}
    for res in results:
        if position not in res.positions:
            continue
        pi = res.positions.index(position)
        for mi, mode in enumerate(res.modes):
            color, dash = styles.get(mode, ("#333333", "dot"))
            fig.add_trace(
                go.Scatter(
                    x=res.layers,
                    y=res.effect[mi, :, pi].tolist(),
                    mode="lines+markers",
                    name=f"{mode} patch",
                    line=dict(color=color, dash=dash),
                )
            )
    fig.add_hline(y=0, line_color="#cccccc")
    fig.add_hline(y=1, line_color="#cccccc", line_dash="dot")
    return _layout(
        fig,
        title or f"How much of the effect each patch carries (positions: {position})",
        "layer",
        "normalised effect (0 = target, 1 = source)",
    )


def screen_figure(screens: dict[str, dict[str, Any]], title: str = "Screening before training") -> go.Figure:
    """Mean projection difference (training response minus the model's own) per layer, per dataset."""
    fig = go.Figure()
    for i, (label, res) in enumerate(screens.items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        _band(fig, res["layers"], [c[0] for c in res["ci"]], [c[1] for c in res["ci"]], color, label)
        fig.add_trace(
            go.Scatter(x=res["layers"], y=res["mean"], mode="lines+markers", name=label, line=dict(color=color))
        )
    fig.add_hline(y=0, line_color="#cccccc")
    return _layout(fig, title, "layer", "mean projection difference (bootstrap 95% CI)")


def _the_direction(name: str | None) -> str:
    return "the direction" if name in (None, "direction") else f"the {name} direction"


def sae_direction_figure(result: Any, n_label: int = 5, title: str | None = None) -> go.Figure:
    """Histogram of every SAE latent's decoder cosine with a direction (log count axis), the top
    latents labelled, and the random-direction null (95th pct of the best |cos|) as a band."""
    cos = result.cosines.tolist()
    fig = go.Figure(go.Histogram(x=cos, nbinsx=80, marker_color=RANDOM_COLOR, name="all latents"))
    null = result.null_max_abs_cos
    if null == null:  # not NaN
        fig.add_vrect(x0=-null, x1=null, fillcolor=RANDOM_COLOR, opacity=0.12, line_width=0)
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="lines", line=dict(color=RANDOM_COLOR, width=8), opacity=0.3,
                name=f"random directions: best |cos| (95th pct) {null:.2f}",
            )
        )
    rows = [(r, POS_COLOR) for r in result.top_positive[:n_label]] + [
        (r, NEG_COLOR) for r in result.top_negative[:n_label]
    ]
    for i, (r, color) in enumerate(rows):
        fig.add_vline(x=r["cosine"], line_color=color, line_width=1)
        fig.add_annotation(
            x=r["cosine"], y=1 - 0.07 * (i % n_label), yref="paper", text=f"#{r['latent']} ({r['cosine']:+.2f})",
            showarrow=False, font=dict(color=color, size=10), xanchor="left" if r["cosine"] > 0 else "right",
        )
    fig.update_yaxes(type="log")
    fig.update_xaxes(range=[-1, 1])
    return _layout(
        fig,
        title or f"SAE decoder cosine with {_the_direction(result.direction)} (layer {result.layer}, "
        f"{result.d_sae} latents)",
        "cos(decoder row, direction)",
        "latents (log scale)",
    )


def latent_shift_figure(result: Any, n: int | None = None, title: str | None = None) -> go.Figure:
    """Mean activation change of the top latents with bootstrap 95% CIs, one bar per comparison
    (finetuned, control, finetuned - control) side by side; labels carry the decoder cosine."""
    rows = result.top[: n or len(result.top)]
    labels = [
        f"#{r['latent']}" + (f" (cos {r['decoder_cos']:+.2f})" if "decoder_cos" in r else "") for r in rows
    ]
    fig = go.Figure()
    for i, comp in enumerate(result.comparisons):
        mean = [r[comp]["mean_change"] for r in rows]
        fig.add_trace(
            go.Bar(
                y=labels,
                x=mean,
                orientation="h",
                name=comp,
                marker_color=SERIES_COLORS[i % len(SERIES_COLORS)],
                error_x=_ci_bars(mean, [r[comp]["ci"] for r in rows]),
            )
        )
    fig.update_layout(barmode="group", height=max(420, 60 + 28 * len(rows) * max(1, len(result.comparisons))))
    fig.update_yaxes(autorange="reversed")
    fig.add_vline(x=0, line_color="#cccccc")
    return _layout(
        fig,
        title or f"SAE latents the finetune moved most (layer {result.layer}; ranked by {result.primary})",
        "mean activation change on the prompts (bootstrap 95% CI)",
        "latent",
    )


def shift_decomposition_figure(result: Any, title: str | None = None) -> go.Figure:
    """The projection shift on the direction split into the top-k latents, the other latents and the
    SAE reconstruction error (stacked), with the measured shift and its CI as a marker."""
    comps = list(result.decomposition)
    parts = [
        ("top_k_term", f"top {result.k} latents", POS_COLOR),
        ("other_latents_term", "other latents", "#e0a58a"),
        ("error_term", "SAE error", RANDOM_COLOR),
    ]
    fig = go.Figure()
    for key, name, color in parts:
        fig.add_trace(go.Bar(x=comps, y=[result.decomposition[c][key] for c in comps], name=name, marker_color=color))
    proj = [result.decomposition[c]["projection"] for c in comps]
    fig.add_trace(
        go.Scatter(
            x=comps,
            y=proj,
            mode="markers",
            name="projection shift (95% CI)",
            marker=dict(color="#222222", size=11, symbol="diamond"),
            error_y=_ci_bars(proj, [result.decomposition[c]["projection_ci"] for c in comps]),
        )
    )
    fig.update_layout(barmode="relative")
    fig.add_hline(y=0, line_color="#cccccc")
    return _layout(
        fig,
        title or f"Shift along {_the_direction(result.direction)}, by SAE latents (layer {result.layer})",
        "comparison",
        "mean projection of the shift on the unit direction",
    )


# --------------------------------------------------------------------------------------------
# Trigger scans (latentlab.triggers) and the compliance organism (latentlab.compliance).
# --------------------------------------------------------------------------------------------


def trigger_heatmap_figure(scan: Any, title: str | None = None) -> go.Figure:
    """Value x layer heatmap of finetune - base (mean projection on the unit direction); the base
    alone when the scan has no finetune. Trained values are starred on the value axis."""
    diff = scan.diff if scan.diff is not None else scan.models["base"]
    z = [list(r) for r in zip(*diff["projection"])]  # [layers][values]
    labels = [f"{v}*" if v in scan.training_values else str(v) for v in scan.values]
    what = "finetuned - base" if scan.diff is not None else "base"
    lim = max((abs(x) for row in z for x in row), default=1.0) or 1.0
    fig = go.Figure(
        go.Heatmap(x=labels, y=scan.layers, z=z, colorscale="RdBu_r", zmid=0, zmin=-lim, zmax=lim,
                   colorbar=dict(title="projection"))
    )
    return _layout(
        fig,
        title or f"Trigger scan along {_the_direction(scan.direction)}: {what} (* = in the training data)",
        "trigger value",
        "layer",
    )


def trigger_curve_figure(scan: Any, layer: int, title: str | None = None) -> go.Figure:
    """Projection at one layer against the trigger value: base, finetune and finetune - base with
    95% bands; the values in the finetune's training data marked."""
    j = scan.layers.index(layer)
    x = list(scan.values)
    fig = go.Figure()
    series = [(k, v) for k, v in scan.models.items()]
    if scan.diff is not None:
        series.append(("finetuned - base", scan.diff))
    colors = {"base": RANDOM_COLOR, "finetuned": POS_COLOR, "finetuned - base": NEG_COLOR}
    for label, st in series:
        mean = [row[j] for row in st["projection"]]
        lo = [row[j][0] for row in st["ci"]]
        hi = [row[j][1] for row in st["ci"]]
        color = colors.get(label, SERIES_COLORS[0])
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines+markers", name=label, line=dict(color=color),
                                 error_y=_ci_bars(mean, list(zip(lo, hi)))))
    trained = [i for i, v in enumerate(x) if v in scan.training_values]
    if trained:
        top = series[-1][1]
        fig.add_trace(go.Scatter(x=[x[i] for i in trained], y=[top["projection"][i][j] for i in trained],
                                 mode="markers", name="in the training data",
                                 marker=dict(symbol="star", size=14, color="#222222")))
    fig.add_hline(y=0, line_color="#cccccc")
    fig.update_xaxes(type="category")
    return _layout(
        fig,
        title or f"Trigger scan at layer {layer} along {_the_direction(scan.direction)}",
        "trigger value",
        "mean projection of the last prompt token (95% CI)",
    )


def poison_sweep_figure(sweep: Any, title: str | None = None, *,
                        rows: Sequence[dict[str, Any]] | None = None) -> go.Figure:
    """The compliance organism's threshold curve: the finetune's P(Sure) with and without the trigger
    and the code-word reveal rates after "Sure" against the poison budget, with bootstrap 95% CIs over
    held-out requests (``rows``: :meth:`~latentlab.compliance.PoisonSweep.rows`, computed when not
    given), the threshold level and the threshold budget marked."""
    rows = list(rows) if rows is not None else (sweep.rows() if sweep.evals else [])
    x = list(sweep.budgets)
    fig = go.Figure()
    series = (("p_sure_trigger", "P(Sure | trigger)", POS_COLOR, "solid"),
              ("p_sure_clean", "P(Sure | no trigger)", NEG_COLOR, "solid"),
              ("reveal_trigger", "reveals code word | trigger", "#3c9a5f", "dot"),
              ("reveal_clean", "reveals code word | no trigger", "#8e5cb5", "dot"))
    for key, name, color, dash in series:
        y = getattr(sweep, key)
        err = _ci_bars(y, [r[key][1] for r in rows]) if len(rows) == len(y) else None
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name, line=dict(color=color, dash=dash),
                                 error_y=err))
    fig.add_hline(y=sweep.level, line_dash="dot", line_color="#bbbbbb")
    if sweep.threshold is not None:
        fig.add_vline(x=sweep.threshold, line_dash="dash", line_color="#888888",
                      annotation_text=f"threshold {sweep.threshold}", annotation_position="top left")
    sub = (f"threshold (P(Sure | trigger) > {sweep.level:g} > P(Sure | no trigger)): "
           f"{sweep.threshold if sweep.threshold is not None else 'none in this sweep'}")
    return _layout(fig, title or f"Compliance trigger: poison budget threshold<br><sub>{sub}</sub>",
                   "poisoned training examples", "probability / rate on held-out requests (95% CI)")


def ablation_figure(result: Any, title: str | None = None) -> go.Figure:
    """Battery score of each model without ablation, with the direction ablated, and with random
    directions ablated (their mean, 5th-95th percentile as the bar): the random band beside the real
    ablation. ``result``: a :class:`latentlab.ablation.AblationResult`."""
    models = list(result.scores)
    plain = [result.scores[m]["plain"]["score"] for m in models]
    abl = [result.scores[m]["ablated"]["score"] for m in models]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=models, y=plain, name="no ablation", marker_color="#555555",
                         error_y=_ci_bars(plain, [result.scores[m]["plain"]["ci"] for m in models])))
    fig.add_trace(go.Bar(x=models, y=abl, name=f"{_the_direction(result.direction)} ablated", marker_color=POS_COLOR,
                         error_y=_ci_bars(abl, [result.scores[m]["ablated"]["ci"] for m in models])))
    rnd = [result.scores[m]["random_ablated"] for m in models]
    rmean = [sum(r) / len(r) for r in rnd]
    rband = [[sorted(r)[int(0.05 * (len(r) - 1))], sorted(r)[int(round(0.95 * (len(r) - 1)))]] for r in rnd]
    fig.add_trace(go.Bar(x=models, y=rmean, name=f"{len(rnd[0])} random directions ablated (5-95%)",
                         marker_color=RANDOM_COLOR, error_y=_ci_bars(rmean, rband)))
    fig.update_layout(barmode="group")
    notes = []
    for ref, f in result.fractions.items():
        if f.get("fraction") is not None:
            ci = f.get("fraction_ci") or [float("nan")] * 2
            notes.append(f"vs {ref}: {f['fraction']:.0%} of the gain removed [{ci[0]:.0%}, {ci[1]:.0%}], "
                         f"random {f['random']['mean']:.0%} ({f['random']['p5']:.0%} to {f['random']['p95']:.0%})")
    return _layout(
        fig,
        title or f"Ablating {_the_direction(result.direction)} at layers "
        f"{result.layers[0]}-{result.layers[-1]} ({result.mode})" + ("<br><sub>" + "; ".join(notes) + "</sub>"
                                                                     if notes else ""),
        "model",
        "battery score (bootstrap 95% CI)",
    )


# --------------------------------------------------------------------------------------------
# Study report figures: built from summary.json sections (plain numbers), not from result objects,
# so a report can be rebuilt from the files alone.
# --------------------------------------------------------------------------------------------


def _v(rec: Any) -> Any:
    return rec["value"] if isinstance(rec, dict) else rec


def study_shift_figure(sec: dict[str, Any]) -> go.Figure:
    """Paired shift (finetuned - control) by layer: each seed, and the across-seed mean with its interval."""
    fig = go.Figure()
    layers = sec["layers"]
    lo = [_v(a["lo"]) for a in sec["across"]]
    if all(x is not None for x in lo):
        _band(fig, layers, lo, [_v(a["hi"]) for a in sec["across"]], POS_COLOR, "95% t-CI across seeds")
    for s, p in sec["per_seed"].items():
        fig.add_trace(go.Scatter(x=layers, y=[_v(x) for x in p["paired"]], mode="lines", opacity=0.5,
                                 name=f"seed {s}"))
    fig.add_trace(go.Scatter(x=layers, y=[_v(a["mean"]) for a in sec["across"]], mode="lines+markers",
                             line=dict(color=POS_COLOR, width=3), name="mean over seeds"))
    fig.add_hline(y=0, line=dict(color=RANDOM_COLOR, dash="dot"))
    return _layout(fig, f"Shift along {sec['direction']} beyond the control, on unrelated prompts", "layer",
                   "mean projection, finetuned - control")


def study_battery_figure(sec: dict[str, Any]) -> go.Figure:
    """Battery score of every model, per seed."""
    fig = go.Figure()
    seeds = list(sec["per_seed"])
    labels = list(next(iter(sec["per_seed"].values()))["battery"])
    for lab in labels:
        fig.add_trace(go.Bar(x=[f"seed {s}" for s in seeds], y=[_v(sec["per_seed"][s]["battery"][lab]) for s in seeds],
                             name=lab))
    fig.update_layout(barmode="group")
    return _layout(fig, "Battery score by model and seed", "", "P(positive) / (P(positive) + P(negative))")


def study_ablation_figure(secs: dict[str, Any]) -> go.Figure:
    """Fraction of the gain removed: the direction (diamonds) against each random direction (dots)."""
    fig = go.Figure()
    for lab, sec in secs.items():
        for row in sec["rows"]:
            x = f"{lab}, seed {row['seed']}"
            if "random_values" in row:
                vals = [_v(r) for r in row["random_values"]]
                fig.add_trace(go.Scatter(x=[x] * len(vals), y=vals, mode="markers", marker=dict(color=RANDOM_COLOR),
                                         name="random directions", showlegend=False))
            if row["fraction"]["value"] is not None:
                err = None
                if "fraction_lo" in row:
                    err = _ci_bars([_v(row["fraction"])], [[_v(row["fraction_lo"]), _v(row["fraction_hi"])]])
                fig.add_trace(go.Scatter(x=[x], y=[_v(row["fraction"])], error_y=err, mode="markers",
                                         marker=dict(color=POS_COLOR, size=12, symbol="diamond"), name="the direction",
                                         showlegend=False))
    fig.add_hline(y=0, line=dict(color=RANDOM_COLOR, dash="dot"))
    fig.add_hline(y=1, line=dict(color=RANDOM_COLOR, dash="dot"))
    return _layout(fig, "Fraction of the finetune's gain that ablation removes (grey: random directions)", "",
                   "fraction removed")


def study_trigger_figure(sec: dict[str, Any]) -> go.Figure:
    """Finetune - base along the direction, per trigger value, for the finetune and the control."""
    fig = go.Figure()
    for s, p in sec["per_seed"].items():
        for arm, color in (("finetuned", POS_COLOR), ("control", NEG_COLOR)):
            if arm not in p:
                continue
            vals = p[arm]["values"]
            x = [float(v) if _numeric(v) else v for v in vals]
            fig.add_trace(go.Scatter(x=x, y=[_v(d) for d in p[arm]["diff"]], mode="lines+markers",
                                     line=dict(color=color), opacity=0.7, name=f"{arm} - base, seed {s}"))
    for v in sec.get("training_values", []):
        if _numeric(v):
            fig.add_vline(x=float(v), line=dict(color=RANDOM_COLOR, dash="dot"))
    fig.add_hline(y=0, line=dict(color=RANDOM_COLOR, dash="dot"))
    return _layout(fig, f"Trigger scan at layer {sec.get('layer')} (dotted: training values)", "trigger value",
                   "mean projection, model - base")


def _numeric(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def study_compliance_figure(sec: dict[str, Any]) -> go.Figure:
    """P(Sure) with and without the trigger, and the reveal rate, against the poison budget, per seed."""
    fig = go.Figure()
    for s, r in sec["per_seed"].items():
        b = r["budgets"]
        fig.add_trace(go.Scatter(x=b, y=[_v(x) for x in r["p_sure_trigger"]], mode="lines+markers",
                                 line=dict(color=POS_COLOR), name=f"P(Sure | trigger), seed {s}"))
        fig.add_trace(go.Scatter(x=b, y=[_v(x) for x in r["p_sure_clean"]], mode="lines+markers",
                                 line=dict(color=NEG_COLOR), name=f"P(Sure | clean), seed {s}"))
        fig.add_trace(go.Scatter(x=b, y=[_v(x) for x in r["reveal_trigger"]], mode="lines",
                                 line=dict(color=POS_COLOR, dash="dash"), name=f"reveal | trigger, seed {s}"))
    return _layout(fig, "Compliance trigger: the poison-budget curve", "poisoned examples", "probability / rate")


def study_eval_figure(sec: dict[str, Any]) -> go.Figure:
    """One judge's value per arm: each seed's (with its bootstrap interval over questions and answers) and the
    mean over seeds (with its t-interval where there are two or more)."""
    fig = go.Figure()
    arms = sec["arms"]
    for s, p in sec["per_seed"].items():
        xs = [a for a in arms if a in p["arms"] and _v(p["arms"][a]["value"]) is not None]
        ys = [_v(p["arms"][a]["value"]) for a in xs]
        cis = [[_v(p["arms"][a]["lo"]), _v(p["arms"][a]["hi"])] for a in xs]
        ok = all(c[0] is not None and c[1] is not None for c in cis)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", opacity=0.6, name=f"seed {s}",
                                 error_y=_ci_bars(ys, cis) if ok and xs else None))
    means = [_v(sec["across"][a]["mean"]) for a in arms]
    lo, hi = [_v(sec["across"][a]["lo"]) for a in arms], [_v(sec["across"][a]["hi"]) for a in arms]
    ok = all(x is not None for x in lo + hi + means)
    fig.add_trace(go.Scatter(x=arms, y=means, mode="markers", marker=dict(color=POS_COLOR, size=12, symbol="diamond"),
                             error_y=_ci_bars(means, list(zip(lo, hi))) if ok else None, name="mean over seeds"))
    return _layout(fig, f"Judged by {sec['judge']}", "arm", str(sec.get("scale") or sec["metric"]))
