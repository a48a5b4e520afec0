"""What did a finetune change? The logit lens of its mean shift, and per-token KL(base || finetune).

Two model-diffing reads of the same unrelated prompts (the finetune never saw them):

- **Logit lens of the mean shift**, per layer: which tokens the mean activation difference at the
  last prompt token (finetuned - base, and finetuned - control) promotes and suppresses through the
  final norm + unembedding. A difference vector cannot go through the final norm alone (the norm
  divides by the norm of the *whole* residual, so a lone difference would be inflated to the size
  of an activation and lose its scale), so the shift is applied where it acts, at the reference's
  mean activation ``m``: ``final_logits(m + shift) - final_logits(m)``, i.e. the lens of the
  finetune's mean minus the lens of the reference's mean. Values are centred over the vocabulary
  (the common offset says nothing about which token is preferred). The base's final norm and
  unembedding are used for every comparison (LoRA on linear layers leaves both untouched).
- **Per-token KL(reference || finetune)** of the next-token distributions at every position of the
  rendered prompts (the last position predicts the first response token), with the prompts and the
  positions where it is highest: where base and finetune disagree most.

With ``patchscope=True`` the same mean shifts are also read through a patchscope
(:mod:`latentlab.patchscope`: the shift written into an identity prompt, read by the model's later
layers, beside a random direction of the same norm). ``latentlab diff`` (:mod:`latentlab.stages.diff`)
writes all of it into a run folder as results.json and ``diff.html`` (:func:`diff_html`: small
tables), with the difference dictionary of :mod:`latentlab.sae.dictionary` when asked.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import Example, encode, last_token_acts, pad_batch, pad_id_of, run_resid
from latentlab.arch import final_logits
from latentlab.data import render_prompt
from latentlab.errors import LatentlabError
from latentlab.models import LoadedModel, resolve_adapter
from latentlab.patchscope import IDENTITY_PROMPT
from latentlab.patchscope import patchscope as read_patchscope
from latentlab.stats import check_finite

__all__ = ["DiffResult", "diff_html", "diff_models", "kl_per_token", "logit_lens_of_shift"]

STAGE = "diff"


def _tok(model: LoadedModel, i: int) -> str:
    return str(model.tokenizer.decode([int(i)]))


def logit_lens_of_shift(
    model: LoadedModel, ref_mean: Float[Tensor, " d_model"], shift: Float[Tensor, " d_model"], k: int = 10
) -> dict[str, Any]:
    """Top ``k`` promoted / suppressed tokens of ``final_logits(ref + shift) - final_logits(ref)``."""
    dev = model.device
    with torch.inference_mode():
        x = torch.stack([ref_mean, ref_mean + shift]).to(dev)
        logits = final_logits(model, x).float().cpu()
    delta = logits[1] - logits[0]
    delta = delta - delta.mean()
    check_finite(delta, "logit-lens changes", STAGE)
    kk = min(k, int(delta.shape[0]))
    up = torch.topk(delta, kk)
    down = torch.topk(-delta, kk)
    return {
        "shift_norm": float(shift.norm()),
        "promoted": [{"token_id": int(i), "token": _tok(model, i), "logit_change": float(v)}
                     for v, i in zip(up.values, up.indices)],
        "suppressed": [{"token_id": int(i), "token": _tok(model, i), "logit_change": float(-v)}
                       for v, i in zip(down.values, down.indices)],
    }


def _kl_streams(
    models: dict[str, LoadedModel], seqs: Sequence[Sequence[int]], pairs: dict[str, tuple[str, str]],
    batch_size: int,
) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]]]:
    """(KL per position for each pair, each model's top next token per position), one batch at a time.

    Why streaming: the next-token distributions of every position over a 262k vocabulary are
    gigabytes per model on a few hundred prompts; only the KL values and argmaxes are kept.
    """
    n = len(seqs)
    kl: dict[str, list[Tensor]] = {label: [torch.empty(0)] * n for label in pairs}
    top: dict[str, list[Tensor]] = {name: [torch.empty(0)] * n for name in models}
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    for b0 in range(0, n, batch_size):
        idx = order[b0 : b0 + batch_size]
        lps: dict[str, list[Tensor]] = {}
        for name, m in models.items():
            ids, mask = pad_batch([seqs[i] for i in idx], pad_id_of(m), m.device)
            last = m.n_layers - 1
            h = run_resid(m, ids, mask, [last])[last]
            with torch.inference_mode():
                lps[name] = [torch.log_softmax(final_logits(m, h[j, : len(seqs[i])]), -1).cpu()
                             for j, i in enumerate(idx)]
            for j, i in enumerate(idx):
                top[name][i] = lps[name][j].argmax(-1)
        for label, (r, o) in pairs.items():
            for j, i in enumerate(idx):
                kl[label][i] = kl_per_token([lps[r][j]], [lps[o][j]])[0]
    return kl, top


def kl_per_token(
    ref: Sequence[Tensor], other: Sequence[Tensor]
) -> list[Float[Tensor, " seq"]]:
    """KL(ref || other) per position, from matching lists of [len, vocab] log-probabilities."""
    return [(r.exp() * (r - o)).sum(-1).clamp_min(0.0) for r, o in zip(ref, other)]


def _kl_summary(
    model: LoadedModel, prompts: Sequence[str], seqs: Sequence[Sequence[int]], kl: Sequence[Tensor],
    ref_top: Sequence[Tensor], other_top: Sequence[Tensor], k: int,
) -> dict[str, Any]:
    per_prompt = [float(x.mean()) for x in kl]
    flat = [(float(v), p, t) for p, x in enumerate(kl) for t, v in enumerate(x.tolist())]
    flat.sort(key=lambda r: -r[0])
    top_positions = []
    for v, p, t in flat[:k]:
        ids = seqs[p]
        top_positions.append({
            "prompt_index": p,
            "position": t,
            "token": _tok(model, ids[t]),
            "context": str(model.tokenizer.decode(ids[max(0, t - 8) : t + 1])),
            "kl": v,
            "reference_top": _tok(model, int(ref_top[p][t])),
            "finetuned_top": _tok(model, int(other_top[p][t])),
        })
    order = sorted(range(len(prompts)), key=lambda i: -per_prompt[i])[:k]
    all_kl = torch.cat([x for x in kl])
    return {
        "mean": float(all_kl.mean()),
        "last_position_mean": float(torch.stack([x[-1] for x in kl]).mean()),
        "per_prompt_mean": per_prompt,
        "per_prompt_max": [float(x.max()) for x in kl],
        "top_prompts": [{"prompt_index": i, "prompt": prompts[i], "mean_kl": per_prompt[i],
                         "max_kl": float(kl[i].max())} for i in order],
        "top_positions": top_positions,
    }


@dataclass
class DiffResult:
    """``logit_lens[comparison][i]`` for ``layers[i]``; ``kl[comparison]`` (``finetuned`` =
    KL(base || finetune), ``control`` = KL(base || control), ``finetuned vs control`` =
    KL(control || finetune)); ``patchscope`` (:func:`latentlab.patchscope.patchscope` of the same
    shifts) and ``dictionary`` (:func:`latentlab.sae.dictionary.difference_dictionary`) when asked."""

    layers: list[int]
    logit_lens: dict[str, list[dict[str, Any]]]
    kl: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    patchscope: dict[str, Any] | None = None
    dictionary: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        extra = {name: v for name, v in (("patchscope", self.patchscope), ("dictionary", self.dictionary))
                 if v is not None}
        return {"layers": self.layers, "logit_lens": self.logit_lens, "kl": self.kl, **self.meta, **extra}

    def largest_shift_layer(self, comparison: str = "finetuned - base") -> int:
        """The layer where the mean shift is largest relative to the residual norm there (raw norms grow
        with depth, so the raw largest would nearly always be the last layer)."""
        rows, norms = self.logit_lens[comparison], self.meta["resid_norm"]
        rel = [r["shift_norm"] / n if n > 0 else 0.0 for r, n in zip(rows, norms)]
        return self.layers[max(range(len(rel)), key=rel.__getitem__)]


def diff_models(
    base: LoadedModel,
    finetuned: LoadedModel | str | Path,
    prompts: Sequence[str],
    *,
    control: LoadedModel | str | Path | None = None,
    layers: Sequence[int] | str = "all",
    k: int = 10,
    batch_size: int = 16,
    progress: bool = False,
    patchscope: bool = False,
    patchscope_prompt: str = IDENTITY_PROMPT,
    patchscope_tokens: int = 12,
    seed: int = 0,
) -> DiffResult:
    """Logit lens of the mean shift per layer, and per-token KL, of a finetune (and a control) on
    ``prompts`` (rendered for the model, as ``latentlab shift`` reads them); see the module docstring.

    ``patchscope``: the same shifts read through :func:`latentlab.patchscope.patchscope` by the base
    (``patchscope_prompt``, ``patchscope_tokens`` greedy tokens, random control seeded by ``seed``)."""
    if not prompts:
        raise LatentlabError("no prompts to compare the models on", "pass --prompts with at least one prompt")
    if k < 1:
        raise LatentlabError(f"k={k} tokens to report", "pass --k 1 or more")
    layer_list = base.check_layers(layers)

    def view(m: LoadedModel | str | Path, role: str) -> LoadedModel:
        if isinstance(m, LoadedModel):
            return m
        path = resolve_adapter(m)
        return base.with_adapter(path, label=f"{STAGE}:{role}:{path.resolve()}")

    models = {"base": base, "finetuned": view(finetuned, "finetuned")}
    if control is not None:
        models["control"] = view(control, "control")
    acts = {name: last_token_acts(m, prompts, layer_list, progress, batch_size).float() for name, m in models.items()}
    for name, a in acts.items():
        check_finite(a, f"{name} activations", STAGE)
    means = {name: a.mean(0) for name, a in acts.items()}  # [layers, d]
    pairs = {"finetuned - base": ("finetuned", "base")}
    if control is not None:
        pairs["finetuned - control"] = ("finetuned", "control")
        pairs["control - base"] = ("control", "base")
    shifts = {label: means[a] - means[b] for label, (a, b) in pairs.items()}  # [layers, d] each
    lens = {
        label: [
            {"layer": layer, **logit_lens_of_shift(base, means[b][i], shifts[label][i], k)}
            for i, layer in enumerate(layer_list)
        ]
        for label, (a, b) in pairs.items()
    }
    resid_norm = acts["base"].norm(dim=-1).mean(0)  # [layers]: the typical size of an activation there
    scope = None
    if patchscope:
        scope = read_patchscope(base, shifts, layer_list, resid_norm, prompt=patchscope_prompt, k=k,
                                max_new_tokens=patchscope_tokens, seed=seed)
    rendered = [render_prompt(p, base.tokenizer) for p in prompts]
    seqs = encode(base, [Example(r) for r in rendered]).ids
    kl_pairs = {"finetuned": ("base", "finetuned")}
    if control is not None:
        kl_pairs |= {"control": ("base", "control"), "finetuned vs control": ("control", "finetuned")}
    per_token, top = _kl_streams(models, seqs, kl_pairs, batch_size)
    kl = {}
    for label, (r, o) in kl_pairs.items():
        per = per_token[label]
        check_finite(torch.cat(per), f"KL({r} || {o})", STAGE)
        kl[label] = {"reference": r, "model": o, **_kl_summary(base, prompts, seqs, per, top[r], top[o], k)}
    return DiffResult(
        layer_list, lens, kl,
        {"models": {n: m.info.to_dict() for n, m in models.items()}, "n_prompts": len(prompts), "k": k,
         "position": "last prompt token (logit lens); every prompt position (KL)",
         "resid_norm": [float(x) for x in resid_norm]},
        patchscope=scope,
    )


# --------------------------------------------------------------------------------------------
# The HTML view.
# --------------------------------------------------------------------------------------------


def _cells(rows: Sequence[dict[str, Any]], n: int = 5) -> str:
    return " ".join(f"<code>{html.escape(repr(r['token']))}</code>&nbsp;{r['logit_change']:+.2f}" for r in rows[:n])


def _reading_cell(r: dict[str, Any]) -> str:
    top = " ".join(f"<code>{html.escape(repr(t['token']))}</code>&nbsp;{t['prob']:.2f}" for t in r["top"][:5])
    return f"{top}<br><i>{html.escape(repr(r['continuation']))}</i>"


def _patchscope_html(ps: dict[str, Any]) -> list[str]:
    e = html.escape
    parts = [f"<h2>Patchscope of the mean shift</h2><p>Each layer's shift, scaled to the residual norm there, is "
             f"added at the placeholder of <code>{e(repr(ps['prompt']))}</code> at the same layer; the base's top next "
             f"tokens (probability), KL(unpatched || patched) and greedy continuation. Unpatched: "
             f"{_reading_cell(ps['unpatched'])}</p>",
             "<table><tr><th>layer</th>" + "".join(f"<th>{e(label)}</th>" for label in ps["readings"]) + "</tr>"]
    n = len(next(iter(ps["readings"].values())))
    for i in range(n):
        rows = [r[i] for r in ps["readings"].values()]
        parts.append(f"<tr><td>{rows[0]['layer']}</td>" + "".join(
            f"<td>{_reading_cell(r)}<br>KL {r['kl_from_unpatched']:.3g}</td>" for r in rows) + "</tr>")
    parts.append("</table>")
    return parts


def _dictionary_html(dic: dict[str, Any]) -> list[str]:
    e = html.escape
    parts = []
    for name in ("finetuned", "control"):
        d = dic.get(name)
        if d is None:
            continue
        parts.append(f"<h2>Dictionary of the difference: {e(name)} - base at layer {dic['layer']}</h2>"
                     f"<p>A TopK SAE ({d['d_sae']} latents, {d['n_active_latents']} active) on {d['n_tokens']} token "
                     f"differences. Share: the part of the squared difference each latent's reconstruction explains "
                     f"(all latents {d['latents_share']:.1%}, SAE error {d['error_share']:.1%}). Random directions' "
                     f"|cos| with a latent: median {d['random_abs_cos']['median']:.3f}, 99th percentile "
                     f"{d['random_abs_cos']['p99']:.3f}.</p>")
        ctrl = "control_match_chance" in d
        head = ["latent", "share", "frequency", "top tokens (context)", "logit lens", "cos with directions"]
        if ctrl:
            head.append(f"best control match (random p95 {d['control_match_chance']['p95']:.2f})")
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        for r in d["top_latents"]:
            toks = "<br>".join(f"<code>{e(repr(t['context']))}</code> {t['activation']:.3g}"
                               for t in r["top_tokens"][:4])
            cos = "<br>".join(f"{e(n)} {c['cos']:+.3f} (random pct {c['random_percentile']:.0f})"
                              for n, c in r["directions"].items())
            cells = [str(r["latent"]), f"{r['share']:.1%}", f"{r['frequency']:.2%}", toks,
                     _cells(r["logit_lens"]["promoted"]) + "<br>" + _cells(r["logit_lens"]["suppressed"]), cos]
            if ctrl:
                m = r["control_match"]
                cells.append(f"#{m['latent']} cos {m['cos']:+.3f}")
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    return parts


def diff_html(res: DiffResult, title: str = "What the finetune changed") -> str:
    """A small self-contained HTML page of the logit-lens and KL tables."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "th{background:#f4f4f4}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for label, rows in res.logit_lens.items():
        parts.append(f"<h2>Logit lens of the mean shift: {e(label)}</h2><p>final_logits(mean + shift) - "
                     "final_logits(mean) at the last prompt token, centred over the vocabulary.</p>")
        parts.append("<table><tr><th>layer</th><th>|shift|</th><th>promoted</th><th>suppressed</th></tr>")
        for r in rows:
            parts.append(f"<tr><td>{r['layer']}</td><td>{r['shift_norm']:.3g}</td><td>{_cells(r['promoted'])}</td>"
                         f"<td>{_cells(r['suppressed'])}</td></tr>")
        parts.append("</table>")
    if res.patchscope is not None:
        parts += _patchscope_html(res.patchscope)
    if res.dictionary is not None:
        parts += _dictionary_html(res.dictionary)
    for kl in res.kl.values():
        parts.append(f"<h2>KL({e(kl['reference'])} || {e(kl['model'])}) per token</h2>"
                     f"<p>mean {kl['mean']:.4g} nats per position; at the last prompt token "
                     f"{kl['last_position_mean']:.4g}</p>")
        parts.append("<table><tr><th>prompt</th><th>mean KL</th><th>max KL</th></tr>")
        for r in kl["top_prompts"]:
            parts.append(f"<tr><td>{e(r['prompt'])}</td><td>{r['mean_kl']:.4g}</td><td>{r['max_kl']:.4g}</td></tr>")
        parts.append("</table><table><tr><th>context (position)</th><th>KL</th><th>reference's top</th>"
                     "<th>finetune's top</th></tr>")
        for r in kl["top_positions"]:
            parts.append(f"<tr><td><code>{e(repr(r['context']))}</code> ({r['position']})</td><td>{r['kl']:.4g}</td>"
                         f"<td><code>{e(repr(r['reference_top']))}</code></td>"
                         f"<td><code>{e(repr(r['finetuned_top']))}</code></td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
