"""Which SAE latents a finetune switched on or off on unrelated prompts (:func:`latent_shift`).

Per latent, the mean activation change (finetuned - base, paired over prompts) with a seeded
bootstrap 95% CI and the firing-frequency change; and an exact decomposition of the shift's
projection on the direction, ``(x_ft - x_base) . u = sum_j delta_f_j (d_j . u) + delta_err . u``,
into the top-k latents, the other latents, and the SAE's reconstruction error. A control finetune
is compared the same way and directly (``finetuned - control``), as in :mod:`latentlab.shift`:
without it, a shared format shift reads as an era latent.

The bootstrap is :func:`latentlab.stats.bootstrap_means` with the seed ``latentlab shift`` uses,
so the projection interval here is the one that command reports for the same prompts.

:func:`analyze_latent_shift` takes the *loaded* base model; the finetune and the control are
adapters applied to that same base (``LoadedModel.with_adapter``), so one copy of the weights is in
memory. :func:`latent_shift` is in small steps: the paired changes (:func:`_changes`), the projection
on the direction (:func:`_project`), the ranking (:func:`_rank`) and the bootstrap intervals of the
top latents (:func:`_top_rows`). ``latentlab sae shift`` is :mod:`latentlab.stages.sae`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab import activations
from latentlab.direction import Direction
from latentlab.errors import LatentlabError
from latentlab.models import BUILTINS, LoadedModel, load_model, resolve_adapter
from latentlab.sae.loading import (
    check_acts,
    check_sae,
    decoder_vectors,
    encode_acts,
    require_at_least,
    resolve_layer,
    sae_summary,
    unit_direction,
)
from latentlab.stats import bootstrap_means, check_finite, percentile_ci

if TYPE_CHECKING:
    from sae_lens import SAE

STAGE = "sae shift"
MIN_BOOT = 100  # fewer resamples give no usable 2.5th / 97.5th percentile


def _column_cis(means: Float[Tensor, "n_boot m"]) -> list[tuple[float, float]]:
    return cast("list[tuple[float, float]]", percentile_ci(means))  # [n_boot, m]: one pair per column


# --------------------------------------------------------------------------------------------
# Which latents did a finetune move?
# --------------------------------------------------------------------------------------------


@dataclass
class LatentShift:
    """Per-latent activation changes for each comparison (``finetuned``, ``control``,
    ``finetuned - control``), the top latents and the decomposition of the projection shift."""

    layer: int
    direction: str | None
    primary: str  # the comparison latents are ranked by
    mean_change: dict[str, Float[Tensor, " d_sae"]]
    freq_before: dict[str, Float[Tensor, " d_sae"]]
    freq_after: dict[str, Float[Tensor, " d_sae"]]
    decoder_cos: Float[Tensor, " d_sae"] | None
    decoder_norm: Float[Tensor, " d_sae"]
    top: list[dict[str, Any]]  # ranked latents with per-comparison stats and CIs
    decomposition: dict[str, dict[str, Any]]  # per comparison; empty without a direction
    k: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def comparisons(self) -> list[str]:
        return list(self.mean_change)

    @property
    def d_sae(self) -> int:
        return int(self.decoder_norm.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "direction": self.direction,
            "primary": self.primary,
            "comparisons": self.comparisons,
            "d_sae": self.d_sae,
            "k": self.k,
            "top": self.top,
            "decomposition": self.decomposition,
            **self.meta,
        }

    def tensors(self) -> dict[str, Tensor]:
        """Every per-latent array, for ``latentlab.io.save_tensors`` (keys ``<comparison>.<stat>``)."""
        out: dict[str, Tensor] = {"decoder_norm": self.decoder_norm}
        if self.decoder_cos is not None:
            out["decoder_cos"] = self.decoder_cos
        for label in self.comparisons:
            key = label.replace(" ", "")
            out[f"{key}.mean_change"] = self.mean_change[label]
            out[f"{key}.freq_before"] = self.freq_before[label].clone()  # comparisons share models' tensors
            out[f"{key}.freq_after"] = self.freq_after[label].clone()
        return out


def latent_shift(
    sae: SAE[Any],
    base_acts: Float[Tensor, "n d_model"],
    finetuned_acts: Float[Tensor, "n d_model"],
    direction: Direction | Float[Tensor, " d_model"] | None = None,
    k: int = 20,
    control_acts: Float[Tensor, "n d_model"] | None = None,
    layer: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> LatentShift:
    """Which SAE latents a finetune moved on the same prompts, and how much of the shift along
    ``direction`` they carry.

    All activations are of the same prompts in the same order (e.g. the unrelated prompts at the
    last prompt token, as :mod:`latentlab.shift` reads them) at the SAE's layer. Changes are paired
    per prompt; CIs are percentile bootstraps over prompts (seeded, one resampling shared by every
    latent), unadjusted for the number of latents: read them for the top latents, not as a test of
    all of them. Latents are ranked by |mean change| x decoder norm (the size of the change they make
    to the residual stream), in ``finetuned - control`` when a control is given, else ``finetuned``.

    The decomposition is exact for an affine decoder: the projection shift equals the latent term
    (``sum_j mean_change_j * (d_j . u)``) plus the error term (the shift the SAE does not
    reconstruct). ``top_k_term`` is the part carried by the k latents contributing most along u.
    """
    require_at_least("k", k, 1, "--k")
    require_at_least("n_boot", n_boot, MIN_BOOT, "--n-boot")
    layer = resolve_layer(sae, layer)
    sets = {"base": base_acts, "finetuned": finetuned_acts}
    if control_acts is not None:
        sets["control"] = control_acts
    n = _check_paired(sae, sets)
    dec = decoder_vectors(sae).cpu()
    dec_norm = dec.norm(dim=-1)
    unit, name = None, None
    if direction is not None:
        unit, name, _ = unit_direction(direction, layer, int(sae.cfg.d_in))
    dec_cos = None if unit is None else (dec @ unit) / dec_norm.clamp_min(1e-12)
    x = {key: v.float().cpu() for key, v in sets.items()}
    f = {key: encode_acts(sae, v) for key, v in x.items()}
    pairs = {"finetuned": ("finetuned", "base")}
    if control_acts is not None:
        pairs |= {"control": ("control", "base"), "finetuned - control": ("finetuned", "control")}
    primary = "finetuned - control" if control_acts is not None else "finetuned"

    # One resampling of the prompts for every latent and term (seeded as `latentlab shift` seeds its
    # bootstrap, so projection CIs match its numbers).
    def boot(x: Tensor) -> Tensor:
        return bootstrap_means(x, n_boot, seed)

    mean_change, f_before, f_after = _changes(f, pairs)
    along = None if unit is None else dec @ unit  # [d_sae]: d_j . u
    decomposition: dict[str, dict[str, Any]] = {}
    if along is not None and dec_cos is not None and unit is not None:
        decomposition = _project(x, f, pairs, mean_change, along, dec_cos, unit, k, boot)
    order = _rank(mean_change[primary], dec_norm, k)
    for label, dec_part in decomposition.items():
        assert along is not None
        dec_part["top_k_by_change_term"] = float((mean_change[label] * along)[order].sum())
    top = _top_rows(order, dec_norm, dec_cos, f, pairs, mean_change, f_before, f_after, boot)
    l0 = {key: float((v > 0).float().sum(-1).mean()) for key, v in f.items()}
    _check_results(mean_change, top, pairs, decomposition, name)
    return LatentShift(
        layer=layer,
        direction=name,
        primary=primary,
        mean_change=mean_change,
        freq_before=f_before,
        freq_after=f_after,
        decoder_cos=dec_cos,
        decoder_norm=dec_norm,
        top=top,
        decomposition=decomposition,
        k=k,
        meta={"n_prompts": n, "n_boot": n_boot, "seed": seed, "l0": l0, "sae": sae_summary(sae)},
    )


Pairs = dict[str, tuple[str, str]]  # comparison label -> (after, before): "control": ("control", "base")


def _check_paired(sae: SAE[Any], sets: dict[str, Tensor]) -> int:
    """The number of prompts, once every set is of the SAE's width, finite, and of the same (>= 2) prompts."""
    for name, acts in sets.items():
        check_acts(acts, sae, f"{name} activations")
    base = sets["base"]
    n = base.shape[0]
    if n == 0:
        raise LatentlabError("no prompts to measure the shift on", "pass --prompts with at least one prompt")
    if n < 2:
        raise LatentlabError(
            "one prompt gives no interval for the shift", "pass --prompts with at least two prompts (dozens for a CI)"
        )
    if any(a.shape != base.shape for a in sets.values()):
        raise LatentlabError(
            "base, finetuned and control activations differ in shape "
            + str({k_: tuple(v.shape) for k_, v in sets.items()}),
            "collect all of them on the same prompts at the same layer",
        )
    return n


def _changes(f: dict[str, Tensor], pairs: Pairs) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Per comparison: each latent's mean activation change, and its firing frequency before and after.

    Full [n, d_sae] differences are never materialised: a 262k-latent SAE would need GBs for them.
    """
    mean_f = {key: v.mean(0) for key, v in f.items()}
    fires = {key: (v > 0).float().mean(0) for key, v in f.items()}
    mean_change, f_before, f_after = {}, {}, {}
    for label, (a, b) in pairs.items():
        mean_change[label] = mean_f[a] - mean_f[b]  # paired per prompt: the mean of the differences
        f_before[label], f_after[label] = fires[b], fires[a]
    return mean_change, f_before, f_after


def _project(
    x: dict[str, Tensor],
    f: dict[str, Tensor],
    pairs: Pairs,
    mean_change: dict[str, Tensor],
    along: Float[Tensor, " d_sae"],
    dec_cos: Float[Tensor, " d_sae"],
    unit: Float[Tensor, " d"],
    k: int,
    boot: Callable[[Tensor], Tensor],
) -> dict[str, dict[str, Any]]:
    """Per comparison, the shift's projection on ``unit`` split into latent and SAE-error terms (:func:`_decompose`)."""
    out = {}
    for label, (a, b) in pairs.items():
        latent_per_prompt = f[a] @ along - f[b] @ along  # sum_j delta_f_j (d_j . u), per prompt
        contrib = mean_change[label] * along
        out[label] = _decompose(x[a] - x[b], latent_per_prompt, contrib, dec_cos, unit, k, boot)
    return out


def _rank(change: Float[Tensor, " d_sae"], dec_norm: Float[Tensor, " d_sae"], k: int) -> list[int]:
    """The k latents whose change moves the residual stream most: |mean change| x decoder norm."""
    size = change.abs() * dec_norm
    return torch.argsort(size, descending=True)[: min(k, int(size.shape[0]))].tolist()


def _top_rows(
    order: list[int],
    dec_norm: Tensor,
    dec_cos: Tensor | None,
    f: dict[str, Tensor],
    pairs: Pairs,
    mean_change: dict[str, Tensor],
    f_before: dict[str, Tensor],
    f_after: dict[str, Tensor],
    boot: Callable[[Tensor], Tensor],
) -> list[dict[str, Any]]:
    """One row per ranked latent: its decoder facts and, per comparison, the change with its bootstrap CI."""
    top = []
    for rank, j in enumerate(order, start=1):
        row: dict[str, Any] = {"rank": rank, "latent": j, "decoder_norm": float(dec_norm[j])}
        if dec_cos is not None:
            row["decoder_cos"] = float(dec_cos[j])
        top.append(row)
    for label, (a, b) in pairs.items():
        means = boot(f[a][:, order] - f[b][:, order])  # bootstrap means of the paired changes, [n_boot, k]
        for row, (lo, hi) in zip(top, _column_cis(means)):
            j = row["latent"]
            row[label] = {
                "mean_change": float(mean_change[label][j]),
                "ci": (lo, hi),
                "freq_before": float(f_before[label][j]),
                "freq_after": float(f_after[label][j]),
                "freq_change": float(f_after[label][j] - f_before[label][j]),
            }
    return top


def _check_results(
    mean_change: dict[str, Tensor],
    top: list[dict[str, Any]],
    pairs: Pairs,
    decomposition: dict[str, dict[str, Any]],
    name: str | None,
) -> None:
    """NaN or inf anywhere in what is reported is one clear error (a float16 overflow, a broken SAE)."""
    check_finite(torch.stack(list(mean_change.values())), "mean latent activation changes", STAGE)
    check_finite([v for row in top for lab in pairs for v in row[lab]["ci"]], "latent change intervals", STAGE)
    for label, part in decomposition.items():
        terms = [part[key] for key in ("projection", "latent_term", "error_term", "top_k_term")]
        check_finite(
            [*terms, *part["projection_ci"], *part["latent_term_ci"], *part["error_term_ci"]],
            f"the {label} decomposition along {name}",
            STAGE,
        )


def _decompose(
    dx: Float[Tensor, "n d"],
    latent: Float[Tensor, " n"],
    contrib: Float[Tensor, " d_sae"],
    dec_cos: Float[Tensor, " d_sae"],
    unit: Float[Tensor, " d"],
    k: int,
    boot: Callable[[Tensor], Tensor],
) -> dict[str, Any]:
    """Projection shift on ``unit`` = latent term + SAE-error term, per prompt, with bootstrap CIs.

    ``latent``: each prompt's latent term; ``contrib``: each latent's mean contribution along u.
    """
    proj = dx @ unit  # [n]
    error = proj - latent  # what the SAE does not reconstruct (b_dec cancels in the difference)
    kk = min(k, int(contrib.shape[0]))
    top = torch.argsort(contrib.abs(), descending=True)[:kk]
    top_term = float(contrib[top].sum())
    total = float(proj.mean())
    cis = _column_cis(boot(torch.stack([proj, latent, error], 1)))
    return {
        "projection": total,
        "projection_ci": cis[0],
        "latent_term": float(latent.mean()),
        "latent_term_ci": cis[1],
        "error_term": float(error.mean()),
        "error_term_ci": cis[2],
        "top_k_term": top_term,
        "other_latents_term": float(latent.mean()) - top_term,
        "top_k_share": top_term / total if abs(total) > 1e-12 else None,  # no shift: no share (never NaN in JSON)
        "top_k_latents": [
            {"latent": int(j), "contribution": float(contrib[j]), "decoder_cos": float(dec_cos[j])} for j in top
        ],
    }


def with_adapter(base: LoadedModel, adapter: Path, scale: float = 1.0) -> LoadedModel:
    """``base`` with a LoRA adapter (its difference times ``scale``): ``base.with_adapter`` (a view sharing
    the base weights) where :class:`~latentlab.models.LoadedModel` has it, else a merged copy loaded like ``base``."""
    view = getattr(base, "with_adapter", None)
    if view is not None:
        # No role label: a bank label names one adapter for the life of the base, and the same base
        # may later be compared with another "finetuned" adapter; the default label is the adapter's path.
        return cast("LoadedModel", view(adapter) if scale == 1 else view(adapter, scale=scale))
    source = base.info.name if base.info.name in BUILTINS else base.info.path
    return load_model(source, adapter=adapter, device=base.info.device, dtype=base.info.dtype, progress=False,
                      adapter_scale=scale)


def analyze_latent_shift(
    base: LoadedModel,
    finetuned: str | Path,
    sae: SAE[Any],
    prompts: Sequence[str],
    direction: Direction | None = None,
    control: str | Path | None = None,
    layer: int | None = None,
    k: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    scale: float = 1.0,
) -> LatentShift:
    """:func:`latent_shift` from models: the loaded ``base``, and the finetune (and control) as
    adapters or ``latentlab finetune`` run folders applied to that same base, one at a time.

    Activations are the residual stream after ``layer`` at the last prompt token
    (:func:`latentlab.activations.last_token_acts`, prompts rendered for the model), as
    ``latentlab shift`` reads them. ``scale``: a factor on both adapters' difference (amplification).
    """
    if not prompts:
        raise LatentlabError("no prompts to measure the shift on", "pass --prompts with at least one prompt")
    layer = resolve_layer(sae, layer)
    base.check_layers([layer])
    check_sae(sae, layer=layer, d_model=base.d_model)
    adapters = {"finetuned": resolve_adapter(finetuned)}
    if control is not None:
        adapters["control"] = resolve_adapter(control)
    info: dict[str, Any] = {"base": base.info.to_dict()}
    acts: dict[str, Tensor] = {"base": activations.last_token_acts(base, prompts, [layer], progress)[:, 0]}
    for label, adapter in adapters.items():
        m = with_adapter(base, adapter, scale)
        info[label] = m.info.to_dict()
        acts[label] = activations.last_token_acts(m, prompts, [layer], progress)[:, 0]
        del m
        gc.collect()
    res = latent_shift(
        sae, acts["base"], acts["finetuned"], direction, k, acts.get("control"), layer, n_boot=n_boot, seed=seed
    )
    res.meta["models"] = info
    if direction is not None:
        res.meta["direction_meta"] = direction.meta
    side = sae.cfg.metadata.get("latentlab") or {}
    trained_on = side.get("model", {}).get("base_fingerprint")
    if trained_on is not None and trained_on != info["base"]["base_fingerprint"]:
        res.meta["warning"] = "the SAE was trained on a different base model (fingerprints differ)"
    return res
