"""A dictionary of what a finetune changed: a sparse autoencoder trained on (finetune - base) activations.

The logit lens and the patchscope read one vector per layer, the *mean* shift. A finetune can change
several things at once, each on some tokens only; a sparse dictionary of the per-token differences
splits them apart without a hypothesis (the model-diffing recipe of "diff SAEs"). Here:

- **Data**: at one layer, the residual stream of the finetune minus the base's at the same tokens,
  at every position of the unrelated prompts (BOS excluded: an attention sink with a huge norm). The
  finetune is a LoRA view switched on the one loaded base, so the base is loaded once.
- **Dictionary**: a small TopK SAE (expansion 4-8, k small), trained with
  :func:`latentlab.sae.training.train_sae_on_activations`, i.e. sae-lens' own ``SAETrainer``, with
  ``b_dec`` fixed at zero (an unchanged token must decode to zero, and the mean difference is what the
  latents are there to carry; a learnt ``b_dec`` would swallow it). Why sae-lens and not sparsify or
  dictionary_learning: it is the pinned dependency latentlab already trains and reads SAEs with
  (safetensors, a maintained TopK trainer with a dead-latent auxiliary loss), so the difference SAE
  loads like any other. EleutherAI's sparsify is installed from git (the PyPI name ``sparsify`` is
  another project), and dictionary_learning would add a second SAE stack with its own format and
  pins for the same TopK SAE. A crosscoder over both models is not built: the difference SAE asks the
  narrower question (what changed) with one dictionary of d_model inputs.
- **Which latents carry the difference**: latent ``j``'s share is ``sum_t f_j(t) <x_t, d_j> / sum_t
  |x_t|^2`` over the tokens ``t`` (``x_t`` the difference, ``f_j(t) d_j`` the latent's part of its
  reconstruction). The shares, ``b_dec``'s (zero) and the SAE error's add up to exactly 1, so "the top
  3 latents explain 80% of the difference" is an exact statement, not a sum of overlapping parts.
- Each reported latent: its top-activating tokens (prompt, position, context), its logit-lens tokens
  (:func:`latentlab.diff.logit_lens_of_shift`: the decoder direction at its mean size when active,
  added to the base's mean activation at that layer and read through the final norm and unembedding,
  :func:`latentlab.arch.final_logits`), its cosine with known directions (era, persona) placed among
  the |cos| of random unit directions (percentile), and, with a control, the best |cos| match among
  the control dictionary's decoder directions, beside the best |cos| a random direction reaches.

``latentlab diff --dictionary`` (:mod:`latentlab.stages.diff`) runs :func:`difference_dictionary` and
saves each SAE (sae-lens' safetensors + ``cfg.json``, and latentlab's JSON sidecar) in the run folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from latentlab.activations import Example, collect, encode
from latentlab.data import render_prompt
from latentlab.diff import logit_lens_of_shift
from latentlab.direction import Direction
from latentlab.errors import LatentlabError
from latentlab.models import LoadedModel
from latentlab.sae.loading import decoder_vectors, encode_acts, unit_direction
from latentlab.sae.training import MODEL_FACTS, SAETrainConfig, SAETraining, train_sae_on_activations
from latentlab.stats import against_random, check_finite, random_units

if TYPE_CHECKING:
    from sae_lens import SAE

__all__ = ["DifferenceSet", "analyze_dictionary", "difference_dictionary", "latent_shares", "token_differences",
           "train_difference_sae"]

STAGE = "diff --dictionary"
N_RANDOM = 1000  # random unit directions for the |cos| percentile and the chance level of a control match


@dataclass
class DifferenceSet:
    """Per-token activation differences at one layer, and where each token came from."""

    layer: int
    diffs: Float[Tensor, "n_tokens d_model"]  # model - base
    base_acts: Float[Tensor, "n_tokens d_model"]
    example: Int[Tensor, " n_tokens"]  # which prompt
    position: Int[Tensor, " n_tokens"]  # its position in the rendered prompt
    ids: list[list[int]]  # each rendered prompt's token ids
    prompts: list[str]

    def __len__(self) -> int:
        return int(self.diffs.shape[0])


def _token_acts(model: LoadedModel, texts: Sequence[str], layer: int, batch_size: int, progress: bool
                ) -> tuple[Tensor, Tensor, Tensor, bool]:
    """(activations [tokens, d], example index, position) at every token after the BOS, and bos_first."""
    enc = encode(model, [Example(t) for t in texts])
    acts = collect(model, list(texts), [layer], "all", batch_size=batch_size, progress=progress)
    assert acts.offsets is not None
    skip = 1 if enc.bos_first else 0
    rows, ex, pos = [], [], []
    for i in range(len(acts)):
        a = acts.example(i)[skip:, 0]
        rows.append(a.float())
        ex.append(torch.full((a.shape[0],), i))
        pos.append(torch.arange(skip, skip + a.shape[0]))
    return torch.cat(rows), torch.cat(ex), torch.cat(pos), enc.bos_first


def token_differences(
    base: LoadedModel, models: Mapping[str, LoadedModel], prompts: Sequence[str], layer: int, *,
    batch_size: int = 16, progress: bool = False,
) -> dict[str, DifferenceSet]:
    """``{name: model - base}`` at every token (BOS excluded) of the rendered ``prompts`` at ``layer``:
    the base's activations are collected once and shared by every model (views of the same base)."""
    if not prompts:
        raise LatentlabError("no prompts to collect differences on", "pass --prompts with at least one prompt")
    layer = base.check_layers([layer])[0]
    texts = [render_prompt(p, base.tokenizer) for p in prompts]
    ids = encode(base, [Example(t) for t in texts]).ids
    b, ex, pos, _ = _token_acts(base, texts, layer, batch_size, progress)
    check_finite(b, "base activations", STAGE)
    out = {}
    for name, m in models.items():
        a = _token_acts(m, texts, layer, batch_size, progress)[0]
        if a.shape != b.shape:  # pragma: no cover - the views share the base's tokenizer
            raise LatentlabError(f"{name} and the base tokenise the prompts differently", "use views of one base")
        check_finite(a, f"{name} activations", STAGE)
        out[name] = DifferenceSet(layer, a - b, b, ex, pos, ids, list(prompts))
    return out


def train_difference_sae(
    diffs: DifferenceSet, config: SAETrainConfig, *, out: str | Path | None = None,
    meta: dict[str, Any] | None = None, model_name: str | None = None, progress: bool = False,
) -> SAETraining:
    """A sae-lens SAE on the differences (``b_dec`` fixed at zero), a seeded tenth of the *prompts* held
    out for the reported statistics (no prompt in both), saved to ``out`` when given."""
    n = len(diffs.prompts)
    g = torch.Generator().manual_seed(config.seed)
    n_eval = int(n * config.eval_fraction) if n >= 10 else 0
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=g)[:n_eval]] = True
    is_held = held[diffs.example]
    if bool((~is_held).sum() == 0):
        raise LatentlabError("no tokens to train the difference dictionary on", "pass more prompts")
    if float(diffs.diffs.norm()) == 0:
        raise LatentlabError("the finetune does not change the activations at this layer (all differences are 0)",
                             "pick another --layer, or check that the adapter is not empty")
    info = {
        "input": "finetuned - base residual stream at every prompt token (BOS excluded)",
        "n_prompts": n,
        "n_prompts_eval": n_eval,
        **(meta or {}),
    }
    return train_sae_on_activations(
        diffs.diffs[~is_held], diffs.layer, config, eval_acts=diffs.diffs[is_held] if n_eval else None, out=out,
        meta=info, model_name=model_name, progress=progress, b_dec="zero",
    )


@torch.no_grad()
def latent_shares(sae: SAE[Any], x: Float[Tensor, "n d"], chunk: int = 1024) -> dict[str, Any]:
    """Each latent's share of ``sum_t |x_t|^2`` (``sum_t f_j(t) <x_t, d_j>``, normalised), how often it
    fires, its mean activation when firing, and the shares of ``b_dec`` and of the SAE error: the
    latents', ``b_dec``'s and the error's shares add up to 1."""
    dec = decoder_vectors(sae)  # [d_sae, d]
    b_dec = sae.b_dec.detach().float().cpu()
    d_sae = dec.shape[0]
    num = torch.zeros(d_sae, dtype=torch.float64)
    fired = torch.zeros(d_sae, dtype=torch.float64)
    act_sum = torch.zeros(d_sae, dtype=torch.float64)
    total = float((x.double() ** 2).sum())
    b_part = float((x.double() @ b_dec.double()).sum())
    for i in range(0, x.shape[0], chunk):
        xc = x[i : i + chunk].float()
        f = encode_acts(sae, xc)
        num += (f * (xc @ dec.T)).double().sum(0)
        fired += (f > 0).double().sum(0)
        act_sum += f.double().sum(0)
    shares = (num / total).float() if total > 0 else torch.zeros(d_sae)
    check_finite(shares, "latent shares", STAGE)
    b_share = b_part / total if total > 0 else 0.0
    return {
        "shares": shares,
        "frequency": (fired / max(x.shape[0], 1)).float(),
        "mean_activation": (act_sum / fired.clamp_min(1)).float(),
        "b_dec_share": b_share,
        "error_share": 1.0 - float(shares.sum()) - b_share,
        "squared_norm": total,
    }


def _top_tokens(base: LoadedModel, diffs: DifferenceSet, acts: Tensor, n: int) -> list[dict[str, Any]]:
    top = torch.topk(acts, min(n, acts.shape[0]))
    out = []
    for v, t in zip(top.values.tolist(), top.indices.tolist()):
        if v <= 0:
            break
        p, q = int(diffs.example[t]), int(diffs.position[t])
        ids = diffs.ids[p]
        out.append({"prompt_index": p, "prompt": diffs.prompts[p], "position": q,
                    "token": str(base.tokenizer.decode([ids[q]])),
                    "context": str(base.tokenizer.decode(ids[max(0, q - 8) : q + 1])), "activation": float(v)})
    return out


def _units(directions: Mapping[str, Direction | Tensor], layer: int, d: int) -> dict[str, Tensor]:
    return {name: unit_direction(v, layer, d)[0] for name, v in directions.items()}


def analyze_dictionary(
    base: LoadedModel,
    sae: SAE[Any],
    diffs: DifferenceSet,
    *,
    directions: Mapping[str, Direction | Tensor] | None = None,
    control: SAE[Any] | None = None,
    n_latents: int = 10,
    k: int = 10,
    n_tokens: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """The latents carrying the most of the difference, each with its share, top-activating tokens,
    logit-lens tokens, cosine with each known direction (and its percentile among random directions'
    |cos|) and, with a ``control`` dictionary, its best |cos| match among the control's decoder rows."""
    if n_latents < 1:
        raise LatentlabError(f"{n_latents} latents to report", "report 1 or more")
    dec = decoder_vectors(sae)
    d = dec.shape[1]
    if d != base.d_model:
        raise LatentlabError(f"the dictionary reads width {d}, but the model has d_model {base.d_model}",
                             "train it on this model's differences")
    sh = latent_shares(sae, diffs.diffs)
    order = [j for j in torch.argsort(sh["shares"], descending=True).tolist() if sh["shares"][j] > 0][:n_latents]
    units = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    known = _units(directions or {}, diffs.layer, d)
    rand = random_units((N_RANDOM, d), seed)
    ref_mean = diffs.base_acts.mean(0)
    ctrl_units = None
    chance = None
    if control is not None:
        cd = decoder_vectors(control)
        ctrl_units = cd / cd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        best_random = (rand @ ctrl_units.T).abs().max(-1).values  # [N_RANDOM]
        chance = {"median": float(best_random.median()), "p95": float(torch.quantile(best_random, 0.95)),
                  "n_random": N_RANDOM}
    f_top = encode_acts(sae, diffs.diffs)[:, order] if order else torch.zeros(len(diffs), 0)
    rows = []
    for c, j in enumerate(order):
        u = units[j]
        size = float(sh["mean_activation"][j]) * float(dec[j].norm())  # the latent's typical contribution
        lens = logit_lens_of_shift(base, ref_mean, u * size, k)
        rand_cos = rand @ u  # [N_RANDOM]
        cos_rows = {}
        for name, v in known.items():
            cs = float(u @ v)
            _, pct = against_random(torch.tensor([cs]), rand_cos[:, None])
            cos_rows[name] = {"cos": cs, "abs_cos": abs(cs), "random_percentile": float(pct[0])}
        row: dict[str, Any] = {
            "latent": int(j),
            "share": float(sh["shares"][j]),
            "frequency": float(sh["frequency"][j]),
            "mean_activation": float(sh["mean_activation"][j]),
            "contribution_norm": size,
            "top_tokens": _top_tokens(base, diffs, f_top[:, c], n_tokens),
            "logit_lens": {"promoted": lens["promoted"], "suppressed": lens["suppressed"]},
            "directions": cos_rows,
        }
        if ctrl_units is not None:
            cc = ctrl_units @ u
            m = int(cc.abs().argmax())
            row["control_match"] = {"latent": m, "cos": float(cc[m]), "abs_cos": abs(float(cc[m]))}
        rows.append(row)
    rand_abs = (rand @ units[order[0]]).abs() if order else torch.zeros(1)
    out: dict[str, Any] = {
        "layer": diffs.layer,
        "n_tokens": len(diffs),
        "n_prompts": len(diffs.prompts),
        "squared_norm": sh["squared_norm"],
        "latents_share": float(sh["shares"].sum()),
        "top_share": float(sum(r["share"] for r in rows)),
        "b_dec_share": sh["b_dec_share"],
        "error_share": sh["error_share"],
        "n_active_latents": int((sh["frequency"] > 0).sum()),
        "d_sae": int(dec.shape[0]),
        "random_abs_cos": {"median": float(rand_abs.median()), "p95": float(torch.quantile(rand_abs, 0.95)),
                           "p99": float(torch.quantile(rand_abs, 0.99)), "n_random": N_RANDOM},
        "top_latents": rows,
    }
    if chance is not None:
        out["control_match_chance"] = chance
    return out


def difference_dictionary(
    base: LoadedModel,
    finetuned: LoadedModel,
    prompts: Sequence[str],
    layer: int,
    *,
    control: LoadedModel | None = None,
    directions: Mapping[str, Direction | Tensor] | None = None,
    config: SAETrainConfig | None = None,
    out: str | Path | None = None,
    n_latents: int = 10,
    k: int = 10,
    batch_size: int = 16,
    progress: bool = False,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Train the difference dictionary of ``finetuned`` (and of ``control``) against ``base`` at ``layer``
    and analyse it (:func:`analyze_dictionary`); with ``out``, each SAE is saved in
    ``out/dictionary-finetuned`` (and ``out/dictionary-control``). See the module docstring."""
    cfg = config or SAETrainConfig(expansion=4, k=8, steps=1000)
    models = {"finetuned": finetuned} | ({"control": control} if control is not None else {})
    diffs = token_differences(base, models, prompts, layer, batch_size=batch_size, progress=progress)
    saes: dict[str, SAETraining] = {}
    for name, ds in diffs.items():
        if log is not None:
            log(f"training the {name} - base dictionary at layer {ds.layer} on {len(ds)} tokens")
        facts = {f: getattr(models[name].info, f, None) for f in MODEL_FACTS}
        saes[name] = train_difference_sae(
            ds, cfg, out=None if out is None else Path(out) / f"dictionary-{name}",
            meta={"model": facts, "difference": f"{name} - base"}, model_name=base.info.name, progress=progress)
    res: dict[str, Any] = {}
    for name, ds in diffs.items():
        other = saes.get("control") if name == "finetuned" else None
        res[name] = analyze_dictionary(base, saes[name].sae, ds, directions=directions,
                                       control=None if other is None else other.sae, n_latents=n_latents, k=k,
                                       seed=cfg.seed)
        res[name]["sae"] = {"path": None if saes[name].path is None else saes[name].path.name,
                            "architecture": cfg.architecture, "d_sae": res[name]["d_sae"], "k": cfg.k,
                            "steps": cfg.steps, "stats": saes[name].stats}
    return {"layer": diffs["finetuned"].layer, "directions": sorted(directions or {}), **res}
