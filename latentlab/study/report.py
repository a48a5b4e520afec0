"""``report.html``: one self-contained page for a study, rendered from ``summary.json`` alone.

Why self-contained: a report is what gets shared (mail, a lab wiki, an offline laptop), so plotly's
bundle is inlined once and nothing is fetched. Why every number is a ``<span class="num">`` with
``data-src``/``data-path``/``data-value``: the page can be checked against the files it came from
(the test suite does so), and a reader can find the run folder behind any number.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from latentlab.io import write_text
from latentlab.plots import (
    study_ablation_figure,
    study_battery_figure,
    study_compliance_figure,
    study_eval_figure,
    study_shift_figure,
    study_trigger_figure,
)

__all__ = ["render_report", "write_report"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em} td,th{border:1px solid #ddd;padding:3px 8px}
th{background:#f5f5f5;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.verdict{background:#f6f3ee;border-left:4px solid #b5542c;padding:.6em 1em;margin:1em 0}
.null{border-left-color:#8c8c8c} .meta{color:#666;font-size:.9em} details{margin:1em 0}
code{background:#f3f3f3;padding:0 3px}
"""


def _num(rec: dict[str, Any] | None, d: int = 3, sign: bool = True) -> str:
    """A number cell's inner HTML, traceable to its file (``data-src``) and JSON path."""
    if rec is None or rec.get("value") is None:
        return "n/a"
    v = rec["value"]
    text = (f"{v:+.{d}f}" if sign else f"{v:.{d}f}") if isinstance(v, float) else str(v)
    return (f"<span class='num' data-src='{html.escape(str(rec['src']))}' "
            f"data-path='{html.escape(json.dumps(rec['path']))}' data-value='{html.escape(repr(v))}' "
            f"data-digits='{d if isinstance(v, float) else 0}'>{text}</span>")


def _ci(mean: Any, lo: Any, hi: Any, d: int = 3, sign: bool = True) -> str:
    if lo is None or hi is None or lo.get("value") is None:
        return _num(mean, d, sign)
    return f"{_num(mean, d, sign)} [{_num(lo, d, sign)}, {_num(hi, d, sign)}]"


def _verdict(text: str | None) -> str:
    if not text:
        return ""
    cls = "verdict null" if "null" in text else "verdict"
    return f"<p class='{cls}'>{html.escape(text)}</p>"


def _fig(fig: Any) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td class='n'>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _shift_html(sec: dict[str, Any]) -> str:
    seeds = list(sec["per_seed"])
    head = ["layer", "mean over seeds [95% t-CI]"] + [f"seed {s} [95% CI over prompts]" for s in seeds] + [
        f"z seed {s}" for s in seeds]
    rows = []
    for i, layer in enumerate(sec["layers"]):
        a = sec["across"][i]
        cells = [str(layer), _ci(a["mean"], a["lo"], a["hi"], 1)]
        cells += [_ci(sec["per_seed"][s]["paired"][i], sec["per_seed"][s]["paired_lo"][i],
                      sec["per_seed"][s]["paired_hi"][i], 1) for s in seeds]
        cells += [_num(sec["per_seed"][s]["z"][i], 1) for s in seeds]
        rows.append(cells)
    parts = ["<h2>Shift on unrelated prompts</h2>", _verdict(sec.get("verdict")), _fig(study_shift_figure(sec))]
    if sec.get("battery_verdict"):
        labels = list(sec["per_seed"][seeds[0]]["battery"])
        brows = [[f"seed {s}"] + [_num(sec["per_seed"][s]["battery"].get(lab), 3, False) for lab in labels]
                 for s in seeds]
        bd = sec["battery_diff"]
        parts += ["<h3>Battery</h3>", _verdict(sec["battery_verdict"]), _table(["seed", *labels], brows),
                  f"<p>finetuned - control, mean over seeds: {_ci(bd['mean'], bd['lo'], bd['hi'])}</p>",
                  _fig(study_battery_figure(sec))]
    if sec.get("amplification"):
        parts.append(_amplification_html(sec["amplification"]))
    parts += ["<details><summary>per-layer table</summary>", _table(head, rows), "</details>"]
    return "".join(parts)


def _amplification_html(amp: dict[str, Any]) -> str:
    """The shift and the battery per factor on the LoRA difference (finetune and control scaled alike)."""
    rows = []
    for e in amp["rows"]:
        b = e.get("battery") or {}
        rows.append([f"x{e['factor']:g}", _ci(e["paired"]["mean"], e["paired"]["lo"], e["paired"]["hi"], 1),
                     _ci(b["finetuned"]["mean"], b["finetuned"]["lo"], b["finetuned"]["hi"]) if b else "n/a",
                     _ci(b["control"]["mean"], b["control"]["lo"], b["control"]["hi"]) if b else "n/a",
                     _ci(e["battery_diff"]["mean"], e["battery_diff"]["lo"], e["battery_diff"]["hi"])
                     if "battery_diff" in e else "n/a"])
    return "".join(["<h3>Amplification</h3>", _verdict(amp["verdict"]),
                    _table(["factor", f"shift at layer {amp['layer']}, finetuned - control", "battery: finetuned",
                            "battery: control", "battery: finetuned - control"], rows)])


def _ablation_html(secs: dict[str, Any]) -> str:
    parts = ["<h2>Ablation: does the direction carry the behaviour?</h2>"]
    for lab, sec in secs.items():
        parts.append(f"<h3>layers: {html.escape(lab)}</h3>")
        parts.append(_verdict(sec.get("verdict")))
        rows = []
        for r in sec["rows"]:
            ls = r["layers"]
            rows.append([str(r["seed"]), html.escape(f"{ls[0]}-{ls[-1]}" if len(ls) > 1 else str(ls[0])),
                         _num(r["gain"]), _ci(r["fraction"], r.get("fraction_lo"), r.get("fraction_hi"), 2),
                         _num(r.get("random_mean"), 2), _num(r.get("random_p95"), 2),
                         _num(r.get("percentile"), 0, False)])
        parts.append(_table(["seed", "layers", "gain over reference", "fraction removed [95% CI]",
                             "random: mean", "random: 95th pct", "percentile among random"], rows))
        for nr in sec.get("not_run", []):
            parts.append(f"<p class='meta'>seed {nr['seed']}: not run ({html.escape(nr['reason'])})</p>")
    if any(sec["rows"] for sec in secs.values()):
        parts.append(_fig(study_ablation_figure(secs)))
    return "".join(parts)


def _eval_html(secs: dict[str, Any]) -> str:
    parts = ["<h2>Behaviour: judged answers</h2>"]
    for sec in secs.values():
        seeds = list(sec["per_seed"])
        parts += [f"<h3>{html.escape(sec['judge'])} ({html.escape(str(sec.get('scale') or sec['metric']))})</h3>",
                  _verdict(sec.get("verdict"))]
        head = ["arm", "mean over seeds [95% t-CI]", *[f"seed {s} [95% CI over questions, answers]" for s in seeds],
                "unparsed / loops / answers"]
        rows = []
        for a in sec["arms"]:
            x = sec["across"][a]
            cells = [html.escape(a), _ci(x["mean"], x["lo"], x["hi"], sign=False)]
            cells += [_ci(p["arms"][a]["value"], p["arms"][a]["lo"], p["arms"][a]["hi"], sign=False)
                      if a in p["arms"] else "n/a" for p in sec["per_seed"].values()]
            cells.append(", ".join(f"{_num(p['arms'][a]['n_unparsed'], 0, False)} / "
                                   f"{_num(p['arms'][a]['n_repetitive'], 0, False)} / "
                                   f"{_num(p['arms'][a]['n'], 0, False)}"
                                   for p in sec["per_seed"].values() if a in p["arms"]))
            rows.append(cells)
        parts.append(_table(head, rows))
        if sec["comparisons"]:
            crows = []
            for k in sec["comparisons"]:
                x = sec["across_comparisons"][k]
                crows.append([html.escape(k), _ci(x["mean"], x["lo"], x["hi"])]
                             + [_ci(p["comparisons"][k]["diff"], p["comparisons"][k]["lo"], p["comparisons"][k]["hi"])
                                if k in p["comparisons"] else "n/a" for p in sec["per_seed"].values()])
            parts.append(_table(["difference", "mean over seeds [95% t-CI]", *[f"seed {s} [95% CI]" for s in seeds]],
                                crows))
        dirs = [(s, p["direction"]) for s, p in sec["per_seed"].items() if "direction" in p]
        if dirs:
            parts.append("<p class='meta'>Held-out separation of the calibrated projection: " + "; ".join(
                f"seed {s}: layer {_num(d['layer'], 0, False)}, accuracy {_num(d['test_accuracy'], 2, False)}, "
                f"AUC {_num(d['test_auc'], 2, False)}" for s, d in dirs) + "</p>")
        rel = sec.get("vs_direction")
        if rel:
            rrows = [[f"seed {s}", _num(p["pearson"], 2), _num(p["spearman"], 2), str(p["n"])]
                     for s, p in rel["per_seed"].items()]
            rrows.append(["mean over seeds", _ci(rel["pearson"]["mean"], rel["pearson"]["lo"], rel["pearson"]["hi"], 2),
                          _ci(rel["spearman"]["mean"], rel["spearman"]["lo"], rel["spearman"]["hi"], 2), ""])
            parts += [f"<p>Per answer, against {html.escape(rel['judge'])}'s calibrated projection:</p>",
                      _table(["", "Pearson r", "Spearman rho", "answers"], rrows)]
        parts.append(_fig(study_eval_figure(sec)))
    return "".join(parts)


def _prevention_html(sec: dict[str, Any]) -> str:
    rows = []
    labels = list(sec["rows"][0]["battery"])
    for r in sec["rows"]:
        rows.append([str(r["seed"])] + [_num(r["battery"].get(lab), 3, False) for lab in labels]
                    + [_num(r["shift_normal"][-1], 1), _num(r["z_normal"], 1), _num(r["shift_ablated"][-1], 1),
                       _num(r["z_ablated"], 1)])
    head = ["seed", *[f"battery: {lab}" for lab in labels], "paired shift, last layer: normal", "z",
            "ablated in training", "z"]
    return "".join(["<h2>Prevention: the direction projected out during finetuning</h2>",
                    _verdict(sec.get("verdict")), _table(head, rows)])


def _diff_html(sec: dict[str, Any]) -> str:
    rows = [[f"<code>{html.escape(repr(t['token']))}</code>", _num(t["change"], 2)] for t in sec["promoted"]]
    kl = "; ".join(f"{html.escape(k)}: {_num(v, 4, False)}" for k, v in sec["kl_mean"].items())
    parts = [f"<h2>What the finetune changed (seed {sec['seed']})</h2>", _verdict(sec.get("verdict")),
             _table(["token promoted", "logit change"], rows), f"<p>mean per-token KL (nats): {kl}</p>"]
    if sec.get("patchscope"):
        parts.append(_patchscope_html(sec["patchscope"]))
    if sec.get("dictionary"):
        parts.append(_dictionary_html(sec["dictionary"]))
    return "".join(parts)


def _code(text: str) -> str:
    return f"<code>{html.escape(repr(text))}</code>"


def _tokens(top: list[dict[str, Any]], key: str, d: int = 2, sign: bool = False) -> str:
    """Tokens, each with its number (a probability, a logit change)."""
    return " ".join(f"{_code(t['token'])}&nbsp;{_num(t[key], d, sign)}" for t in top)


def _patchscope_html(ps: dict[str, Any]) -> str:
    """The headline layer's readings (each shift, the random direction, unpatched), then every layer's top token."""
    un = ps["unpatched"]
    rows = [[html.escape(label), _tokens(x["top"], "prob"), _num(x.get("kl"), 4, False), _code(x["continuation"])]
            for label, x in ps["readings"].items()]
    rows.append(["unpatched", _tokens(un["top"], "prob"), "", _code(un["continuation"])])
    labels = ps["labels"]
    lrows = [[str(ps["per_layer"][labels[0]][i]["layer"])]
             + [f"{_code(ps['per_layer'][lab][i]['token'])}&nbsp;{_num(ps['per_layer'][lab][i]['prob'], 2, False)}, "
                f"KL {_num(ps['per_layer'][lab][i]['kl'], 4, False)}" for lab in labels]
             for i in range(len(ps["per_layer"][labels[0]]))]
    return "".join([
        f"<h3>Patchscope: what the base reads the mean shift as (layer {ps['layer']})</h3>",
        _verdict(ps.get("verdict")),
        f"<p class='meta'>Each shift, scaled to the residual norm there, added at the placeholder of "
        f"{_code(ps['prompt'])} at layer {ps['layer']} ({html.escape(ps['layer_chosen_by'])}); top next tokens "
        "(probability), KL(unpatched || patched) and the greedy continuation.</p>",
        _table(["vector", "top next tokens", "KL from unpatched", "continuation"], rows),
        "<details><summary>every layer: top next token, KL from unpatched</summary>",
        _table(["layer", *labels], lrows), "</details>",
    ])


def _dictionary_html(dic: dict[str, Any]) -> str:
    """Per dictionary (finetuned - base, control - base): its top latents with their share of the squared
    difference, top tokens, logit lens, |cos| with the known directions and (the finetune's) best control match."""
    parts = [f"<h3>Dictionary of the difference (layer {_num(dic['layer'])})</h3>", _verdict(dic.get("verdict"))]
    for name, m in dic["models"].items():
        ctrl = "control_match_chance_p95" in m
        head = ["latent", "share", "frequency", "top tokens (context)", "logit lens (promoted)",
                *[f"|cos| {d} (percentile among random)" for d in dic["directions"]]]
        if ctrl:
            head.append("best control match: latent, |cos|")
        rows = []
        for r in m["latents"]:
            toks = "<br>".join(f"{_code(t['context'])} {_num(t['activation'], 2, False)}" for t in r["top_tokens"])
            cells = [_num(r["latent"]), _num(r["share"], 3, False), _num(r["frequency"], 3, False), toks,
                     _tokens(r["logit_lens"], "change", 2, True)]
            cos = r["directions"]
            cells += [f"{_num(cos[d]['abs_cos'], 3, False)} ({_num(cos[d]['percentile'], 1, False)})"
                      if d in cos else "n/a" for d in dic["directions"]]
            if ctrl:
                cells.append(f"#{_num(r['control_match']['latent'])}, {_num(r['control_match']['abs_cos'], 3, False)}")
            rows.append(cells)
        parts += [f"<p>{html.escape(name)} - base: {_num(m['d_sae'])} latents ({_num(m['n_active_latents'])} active) "
                  f"on {_num(m['n_tokens'])} token differences; the top latents carry "
                  f"{_num(m['top_share'], 3, False)} of the squared difference (all latents "
                  f"{_num(m['latents_share'], 3, False)}, SAE error {_num(m['error_share'], 3, False)}); random "
                  f"directions' |cos| 95th percentile {_num(m['random_abs_cos_p95'], 3, False)}"
                  + (f"; chance of a control match (95th percentile) {_num(m['control_match_chance_p95'], 3, False)}"
                     if ctrl else "") + ".</p>", _table(head, rows)]
    return "".join(parts)


def _find_trigger_html(sec: dict[str, Any]) -> str:
    """The expected strings' ranks per seed, each seed's top candidates and best-ranked training values, the null."""
    per = sec["per_seed"]

    screened = any("prescreen" in p for p in per.values())

    def row(s: str, r: dict[str, Any]) -> list[str]:
        mark = " *" if r["trained"] else ""
        rank = _num(r["rank"]) + ("" if r.get("scanned", True) else " (not scanned)")
        cells = [str(s), _code(r["candidate"]) + mark, rank, _num(r["effect"], 4), _num(r["z"], 2),
                 _num(r["percentile"], 1, False)]
        return cells + ([_num(r["first_order_rank"]) if "first_order_rank" in r else "-"] if screened else [])

    head = ["seed", "candidate", "rank", "effect", "z", "percentile in the null"] + (
        ["first-order rank (of the vocabulary)"] if screened else [])
    parts = ["<h2>Trigger search</h2>", _verdict(sec.get("verdict"))]
    meta = [f"seed {s}: {html.escape(p['metric_text'])}, template {_code(p['template'])}, "
            f"{_num(p['n_candidates'])} candidates ({html.escape(str(p['candidates']))}), {_num(p['n_prompts'])} "
            f"prompts; null: {html.escape(str(p['null']['kind']))} (n {_num(p['null']['n'])}"
            + (f", mean {_num(p['null']['mean'], 4)}, sd {_num(p['null']['sd'], 4, False)}, 95th percentile "
               f"{_num(p['null']['p95'], 4)}" if "mean" in p["null"] else "") + ")" for s, p in per.items()]
    parts.append("<p class='meta'>" + "<br>".join(meta) + "</p>")
    exp = [row(s, r) for s, p in per.items() for r in p["expected"]]
    if exp:
        parts += ["<h3>Expected strings</h3>", _table(head, exp)]
    parts += ["<h3>Top candidates (* = in the training data)</h3>",
              _table(head, [row(s, r) for s, p in per.items() for r in p["top"]])]
    trained = [row(s, r) for s, p in per.items() for r in p["training_values"]]
    if trained:
        n = "; ".join(f"seed {s}: {p['n_training_values']} in all" for s, p in per.items())
        parts += [f"<details><summary>training values, best-ranked first ({html.escape(n)})</summary>",
                  _table(head, trained), "</details>"]
    return "".join(parts)


def _trigger_html(sec: dict[str, Any]) -> str:
    parts = ["<h2>Trigger scan</h2>", _verdict(sec.get("verdict")), _verdict(sec.get("battery_verdict")),
             *[_verdict(h.get("verdict")) for h in sec.get("held_out", [])], _fig(study_trigger_figure(sec))]
    if "gap" in sec:
        bg = sec.get("battery_gap")
        rows = [[html.escape(str(v)) + (" *" if v in sec["training_values"] else ""),
                 _ci(g["mean"], g["lo"], g["hi"], 1)] + ([_ci(bg[i]["mean"], bg[i]["lo"], bg[i]["hi"])] if bg else [])
                for i, (v, g) in enumerate(zip(sec["values"], sec["gap"]))]
        head = ["value", "projection: (finetuned - base) - (control - base), mean over seeds"]
        head += ["battery: the same difference"] if bg else []
        parts += ["<details open><summary>per value (* = training value)</summary>", _table(head, rows), "</details>"]
    return "".join(parts)


def _compliance_html(sec: dict[str, Any]) -> str:
    rows = []
    for s, r in sec["per_seed"].items():
        for i, b in enumerate(r["budgets"]):
            rows.append([str(s), str(b), _num(r["p_sure_trigger"][i], 3, False), _num(r["p_sure_clean"][i], 3, False),
                         _num(r["reveal_trigger"][i], 3, False), _num(r["reveal_clean"][i], 3, False)])
    parts = ["<h2>Compliance trigger</h2>", _verdict(sec.get("verdict")), _fig(study_compliance_figure(sec)),
             _table(["seed", "budget", "P(Sure | trigger)", "P(Sure | clean)", "reveal | trigger",
                     "reveal | clean"], rows)]
    for s, r in sec["per_seed"].items():
        loc = r.get("localisation")
        if loc:
            lrows = [[str(layer), _num(loc["by_trigger_tokens"][i], 2), _num(loc["by_last_token"][i], 2)]
                     for i, layer in enumerate(loc["layers"])]
            parts += [f"<h3>Where the switch lives (seed {s}, largest budget): fraction of the triggered score "
                      "recovered by patching</h3>", _table(["layer", "trigger tokens", "last prompt token"], lrows)]
    return "".join(parts)


def _finetunes_html(sec: dict[str, Any]) -> str:
    rows = [[html.escape(k), _num(v["final_loss"], 3, False), _num(v["steps"]), _num(v["wall_seconds"], 0, False)]
            for k, v in sec.items()]
    return "<h2>Finetunes</h2>" + _table(["run", "final loss", "steps", "wall seconds"], rows)


def _provenance_html(prov: dict[str, Any], not_run: list[dict[str, Any]]) -> str:
    rows = []
    where = any(r.get("host") for r in prov["steps"])  # a study run by --executor ray: which worker ran each step
    for r in prov["steps"]:
        fps = ", ".join(f"{k}: {str(v)[:12]}" for k, v in (r.get("fingerprints") or {}).items() if v)
        ran = [html.escape(f"{r['host']} (pid {r.get('pid')})" if r.get("host") else "")] if where else []
        rows.append([html.escape(r["key"]), html.escape(str(r.get("status"))), html.escape(str(r.get("device"))),
                     *ran, _num(r.get("wall_seconds"), 0, False) if r.get("wall_seconds") else "",
                     html.escape(str(r.get("started") or "")), html.escape(fps),
                     f"<code>{html.escape(r.get('manifest') or r.get('reason') or '')}</code>"])
    pk = ", ".join(f"{k} {v}" for k, v in (prov.get("packages") or {}).items() if v)
    sess = "; ".join(
        f"session {i + 1}: {s.get('wall_seconds', '?')} s, load average {s.get('load_average_start')} -> "
        f"{s.get('load_average_end')}" + _executor_words(s.get("executor"))
        for i, s in enumerate(prov.get("sessions", [])))
    nr = "".join(f"<li>{html.escape(x['key'])}: {html.escape(str(x['reason']))}</li>" for x in not_run)
    return "".join([
        "<h2>Provenance</h2>",
        f"<p class='meta'>Python {html.escape(str(prov.get('python')))}; {html.escape(pk)}</p>",
        f"<p class='meta'>{html.escape(sess)}</p>",
        (f"<p>Steps not run:</p><ul>{nr}</ul>" if nr else ""),
        _table(["step", "status", "device", *(["ran on"] if where else []), "wall s", "started", "fingerprints",
                "manifest"], rows),
    ])


def _executor_words(ex: dict[str, Any] | None) -> str:
    """A session run by --executor ray, in words (nothing for the in-process runner)."""
    if not ex:
        return ""
    c = ex.get("cluster") or {}
    return (f", on Ray ({ex.get('address') or 'local cluster'}: {c.get('nodes')} node(s), {c.get('cpus') or 0:g} CPUs, "
            f"{c.get('gpus') or 0:g} GPUs; {ex.get('gpus_per_step') or 0:g} GPUs and {ex.get('threads_per_worker')} "
            "threads per step)")


def render_report(summary: dict[str, Any]) -> str:
    """The report page's HTML (plotly's bundle inlined once)."""
    from plotly.offline import get_plotlyjs

    s = summary["sections"]
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>latentlab study: {e(str(summary['study']))}</title><style>{_CSS}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>Study: {e(str(summary['study']))}</h1>",
        f"<p class='meta'>model {e(str(summary['model']))}; seeds {e(', '.join(map(str, summary['seeds'])))}"
        + (f"; direction {e(str(summary['direction']))}" if summary.get("direction") else "") + "</p>",
        f"<p>{e(summary.get('description') or '')}</p>",
        "<p class='meta'>Every number on this page links to the run folder it came from (hover: data-src). "
        "Intervals across seeds are 95% t-intervals; within a seed, 95% bootstrap intervals.</p>",
    ]
    renderers = [("shift", _shift_html), ("ablation", _ablation_html), ("eval", _eval_html),
                 ("prevention", _prevention_html),
                 ("diff", _diff_html), ("trigger", _trigger_html), ("compliance", _compliance_html),
                 ("find_trigger", _find_trigger_html), ("finetunes", _finetunes_html)]
    for key, fn in renderers:
        if key in s:
            parts.append(fn(s[key]))
    parts.append(_provenance_html(summary["provenance"], summary.get("not_run", [])))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(root: str | Path, summary: dict[str, Any]) -> Path:
    """Write ``root/report.html`` atomically."""
    p = Path(root) / "report.html"
    write_text(p, render_report(summary))
    return p
