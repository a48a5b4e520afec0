"""Sparse-autoencoder latents behind a direction and behind a finetune's shift (sae-lens SAEs).

Three questions, one function each:

- :func:`direction_latents`: which SAE latents write along the era / persona direction? Cosine of
  the unit direction with every decoder row, the top positive and negative latents, and a null:
  the largest |cosine| a *random* direction reaches (with thousands of latents, some latent is
  always a little aligned with anything).
- :func:`latent_shift`: which latents did a finetune switch on or off on unrelated prompts? Per
  latent, the mean activation change (finetuned - base, paired over prompts) with a seeded
  bootstrap 95% CI and the firing-frequency change; and an exact decomposition of the shift's
  projection on the direction, ``(x_ft - x_base) . u = sum_j delta_f_j (d_j . u) + delta_err . u``,
  into the top-k latents, the other latents, and the SAE's reconstruction error. A control finetune
  is compared the same way and directly (``finetuned - control``), as in :mod:`latentlab.shift`:
  without it, a shared format shift reads as an era latent.
- :func:`train_sae`: no pretrained SAE exists offline for the built-in models, so train a small one
  on the residual stream at one layer. The training step is sae-lens' own (``SAETrainer.step`` on a
  ``TopKTrainingSAE`` / ``StandardTrainingSAE``: its loss, auxiliary dead-latent loss, Adam, LR
  schedule, gradient clipping, activation-norm scaling folded into the weights at the end), fed
  from an in-memory iterator of activation batches; latentlab only writes the outer loop so it can
  show the loss in a progress bar and keep the loss curve. The SAE is saved in sae-lens' format
  (``cfg.json`` + ``sae_weights.safetensors``), so ``SAE.load_from_disk`` reads it, plus a latentlab
  sidecar ``latentlab_sae.json`` (model fingerprint, layer, data hash, training statistics).

SAEs are read with :func:`load_sae` (a folder, or a pretrained ``release:sae_id`` passed through to
sae-lens). Weights are safetensors only: releases whose sae-lens loader unpickles ``.pt`` files are
refused, and nothing here runs remote code.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.directions import Direction
from latentlab.errors import LatentlabError, first_line
from latentlab.io import read_json, replace_dir, sha256_text, write_json
from latentlab.steering import bootstrap_means

if TYPE_CHECKING:  # sae-lens costs seconds to import: only when an SAE is really used
    from sae_lens import SAE

    from latentlab.data import Example
    from latentlab.models import LoadedModel

SIDECAR = "latentlab_sae.json"
CFG_FILE = "cfg.json"  # sae-lens' on-disk names
WEIGHTS_FILE = "sae_weights.safetensors"
# sae-lens loaders that read pickled .pt weights (torch.load): latentlab never unpickles.
PICKLE_LOADERS = {"connor_rob_hook_z", "goodfire", "deepseek_r1", "qwen_scope", "dictionary_learning_1"}
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")
Architecture = Literal["topk", "standard"]


# --------------------------------------------------------------------------------------------
# Loading and checking an SAE.
# --------------------------------------------------------------------------------------------


def resolve_sae_dir(path: str | Path) -> Path:
    """An SAE folder (``cfg.json`` + ``sae_weights.safetensors``), or a ``latentlab sae train`` run
    folder holding one in ``sae/``."""
    p = Path(path)
    if not p.exists():
        raise LatentlabError(
            f"SAE folder {p} does not exist",
            "pass the --out folder of `latentlab sae train`, a folder with cfg.json + sae_weights.safetensors, "
            "or a pretrained release:sae_id",
        )
    for cand in (p, p / "sae"):
        if (cand / CFG_FILE).is_file() and (cand / WEIGHTS_FILE).is_file():
            return cand
    raise LatentlabError(
        f"{p} holds no SAE ({CFG_FILE} + {WEIGHTS_FILE} missing: an interrupted run?)",
        "pass the --out folder of `latentlab sae train` or re-run it",
    )


def load_sae(
    path: str | Path,
    device: str = "cpu",
    layer: int | None = None,
    d_model: int | None = None,
) -> SAE[Any]:
    """Load an SAE saved in sae-lens' format (or ``release:sae_id``, passed to ``SAE.from_pretrained``).

    With ``layer`` and ``d_model`` (a model's), the SAE must read ``blocks.{layer}.hook_resid_post``
    and have ``d_in == d_model``: an SAE for another layer or model fails here, clearly, instead of
    producing plausible-looking latents. A latentlab sidecar, if present, is attached as
    ``sae.cfg.metadata["latentlab"]``.
    """
    from sae_lens import SAE

    from latentlab.models import resolve_device

    dev = str(resolve_device(device))
    spec = str(path)
    if not Path(spec).exists() and ":" in spec:
        sae = _load_pretrained(spec, dev)
    else:
        folder = resolve_sae_dir(path)
        try:
            sae = SAE.load_from_disk(str(folder), device=dev)
        except Exception as e:  # bad JSON, unknown architecture, missing tensors: sae-lens raises many types
            raise LatentlabError(
                f"cannot load the SAE in {folder} ({first_line(e)})",
                "pass a folder written by sae-lens' save_model or `latentlab sae train`",
            ) from None
        side = folder / SIDECAR
        if side.is_file():
            sae.cfg.metadata["latentlab"] = read_json(side)
    check_sae(sae, layer=layer, d_model=d_model)
    return sae


def _load_pretrained(spec: str, device: str) -> SAE[Any]:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name

    release, sae_id = spec.split(":", 1)
    unknown_fix = "check the release and SAE id (sae-lens' pretrained_saes.yaml lists them), or pass an SAE folder"
    try:
        loader = get_conversion_loader_name(release)
    except Exception as e:
        raise LatentlabError(f"cannot load pretrained SAE {spec} ({first_line(e)})", unknown_fix) from None
    if loader in PICKLE_LOADERS:
        raise LatentlabError(
            f"pretrained SAE release {release!r} stores pickled .pt weights (sae-lens loader {loader!r})",
            "latentlab reads safetensors only: convert the SAE to sae-lens' format and pass its folder",
        )
    try:
        return SAE.from_pretrained(release, sae_id, device=device)
    except OSError:  # no network, offline mode, not in the HF cache (requests / huggingface_hub errors)
        raise LatentlabError(
            f"cannot download pretrained SAE {spec}: the Hugging Face hub is unreachable and the SAE is not cached",
            "on a machine without internet, train one with `latentlab sae train` and pass its folder "
            "(or copy an SAE folder with cfg.json + sae_weights.safetensors here)",
        ) from None
    except Exception as e:  # unknown ids (ValueError) and conversion problems
        raise LatentlabError(f"cannot load pretrained SAE {spec} ({first_line(e)})", unknown_fix) from None


def sae_layer(sae: SAE[Any]) -> int | None:
    """The model layer whose ``hook_resid_post`` the SAE reads (None when its config does not say).

    ``blocks.{L+1}.hook_resid_pre`` is the same tensor as ``blocks.{L}.hook_resid_post`` and maps to L.
    """
    meta = sae.cfg.metadata
    if meta.get("hook_name_out") is not None:
        raise LatentlabError(
            f"this SAE is a transcoder ({meta.get('hook_name')} -> {meta.get('hook_name_out')})",
            "use an SAE that reconstructs the residual stream (blocks.L.hook_resid_post)",
        )
    hook = meta.get("hook_name")
    if hook is None:
        return None
    m = _RESID_HOOK.match(str(hook))
    layer = None if m is None else (int(m[1]) if m[2] == "post" else int(m[1]) - 1)
    if layer is None or layer < 0:
        raise LatentlabError(
            f"this SAE reads {hook!r}, not the residual stream after a block",
            "use an SAE trained on blocks.L.hook_resid_post (e.g. `latentlab sae train --layer L`)",
        )
    return layer


def check_sae(sae: SAE[Any], layer: int | None = None, d_model: int | None = None) -> int | None:
    """Check the SAE fits a model of width ``d_model`` at ``layer``; returns the SAE's own layer."""
    own = sae_layer(sae)
    if d_model is not None and int(sae.cfg.d_in) != int(d_model):
        raise LatentlabError(
            f"the SAE reads vectors of width {sae.cfg.d_in}, but the model's residual stream has width {d_model}",
            "use an SAE trained on this model",
        )
    if layer is not None and own is not None and own != layer:
        raise LatentlabError(
            f"the SAE was trained on layer {own} (hook {sae.cfg.metadata.get('hook_name')}), not layer {layer}",
            f"pass --layer {own}, or train an SAE at layer {layer} with `latentlab sae train --layer {layer}`",
        )
    return own


def _resolve_layer(sae: SAE[Any], layer: int | None) -> int:
    own = check_sae(sae, layer=layer)
    out = layer if layer is not None else own
    if out is None:
        raise LatentlabError("the SAE's config names no hook, so its layer is unknown", "pass the layer explicitly")
    return out


@torch.no_grad()
def decoder_vectors(sae: SAE[Any]) -> Float[Tensor, "d_sae d_in"]:
    """What one unit of each latent adds to the reconstruction: ``decode(e_j) - decode(0)``.

    Usually ``W_dec``; TopK SAEs with ``rescale_acts_by_decoder_norm`` divide by the row norm. The
    decomposition of a shift into latents needs the decoder to be affine in the latents, so SAEs
    that normalise inputs at run time (layer_norm, unfolded scaling) are refused, and the result is
    checked against ``decode`` on three latents.
    """
    cfg = sae.cfg
    if cfg.normalize_activations != "none" or cfg.reshape_activations != "none":
        raise LatentlabError(
            f"this SAE normalises or reshapes its input at run time "
            f"(normalize_activations={cfg.normalize_activations!r}, reshape_activations={cfg.reshape_activations!r}),"
            " so latent contributions depend on the input",
            "fold the normalisation into the weights (sae-lens fold_activation_norm_scaling_factor) or retrain",
        )
    dec = sae.W_dec.detach().float()
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        dec = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d_sae = dec.shape[0]
    probe_idx = sorted({0, d_sae // 2, d_sae - 1})
    probe = torch.zeros(len(probe_idx), d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    probe[torch.arange(len(probe_idx)), probe_idx] = 1.0
    zero = sae.decode(torch.zeros_like(probe[:1]))
    got = (sae.decode(probe) - zero).float()
    want = dec[probe_idx]
    # decode(e_j) - decode(0) cancels b_dec, which on a residual stream can be ~1e4 (float32 leaves
    # ~1e-3 of it): the tolerance covers that rounding, far below what a nonlinear decoder would do.
    eps = torch.finfo(sae.W_dec.dtype).eps
    atol = 8 * eps * float(zero.abs().max()) + 1e-5 * float(want.abs().max().clamp_min(1e-12))
    if not torch.allclose(got, want, rtol=1e-3, atol=atol):
        raise LatentlabError(
            f"the decoder of this {cfg.architecture()} SAE is not linear in its latents",
            "use a standard, topk, jumprelu or gated SAE",
        )
    return dec


@torch.no_grad()
def encode_acts(sae: SAE[Any], acts: Float[Tensor, "n d_in"], chunk: int = 1024) -> Float[Tensor, "n d_sae"]:
    """SAE latent activations of ``acts`` (in chunks, float32, on the CPU)."""
    _check_acts(acts, sae, "activations")
    sae.eval()
    out = []
    for i in range(0, acts.shape[0], chunk):
        x = acts[i : i + chunk].to(sae.W_dec.device, sae.W_dec.dtype)
        f = sae.encode(x)
        out.append((f.to_dense() if f.is_sparse else f).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, int(sae.cfg.d_sae))


def _check_acts(acts: Tensor, sae: SAE[Any], what: str) -> None:
    if acts.ndim != 2 or acts.shape[-1] != int(sae.cfg.d_in):
        raise LatentlabError(
            f"{what} have shape {tuple(acts.shape)}, but the SAE reads [n, {sae.cfg.d_in}] vectors",
            "pass activations of one layer of the model the SAE was trained on",
        )
    if not torch.isfinite(acts).all():
        raise LatentlabError(f"{what} contain NaN or inf", "check the model dtype (try --dtype float32)")


def _unit_direction(direction: Direction | Tensor, layer: int, d_in: int) -> tuple[Float[Tensor, " d_in"], str, float]:
    """(unit vector, name, original norm) of a Direction at ``layer`` or of a raw vector."""
    if isinstance(direction, Direction):
        v, name = direction.vector(layer).float(), direction.name
    else:
        v, name = torch.as_tensor(direction).float().flatten(), "direction"
    if v.shape[-1] != d_in:
        raise LatentlabError(
            f"the {name} direction has width {v.shape[-1]}, but the SAE reads width {d_in}",
            "use a direction fitted on the model the SAE was trained on",
        )
    norm = float(v.norm())
    if not math.isfinite(norm) or norm == 0:
        raise LatentlabError(f"the {name} direction at layer {layer} is zero or not finite", "refit the direction")
    return v.cpu() / norm, name, norm


# --------------------------------------------------------------------------------------------
# Which latents write along a direction?
# --------------------------------------------------------------------------------------------


@dataclass
class DirectionLatents:
    """Decoder (and encoder) cosines of every latent with one direction at one layer."""

    layer: int
    direction: str
    cosines: Float[Tensor, " d_sae"]
    encoder_cosines: Float[Tensor, " d_sae"]
    k: int
    null_max_abs_cos: float  # 95th percentile over random directions of max_j |cos|
    n_random: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(self.cosines.shape[0])

    def _rows(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        return [
            {
                "latent": int(j),
                "cosine": float(self.cosines[j]),
                "encoder_cosine": float(self.encoder_cosines[j]),
                "above_null": abs(float(self.cosines[j])) > self.null_max_abs_cos,
            }
            for j in idx
        ]

    @property
    def top_positive(self) -> list[dict[str, Any]]:
        k = min(self.k, self.d_sae)
        return self._rows(torch.topk(self.cosines, k).indices.tolist())

    @property
    def top_negative(self) -> list[dict[str, Any]]:
        k = min(self.k, self.d_sae)
        return self._rows(torch.topk(-self.cosines, k).indices.tolist())

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "direction": self.direction,
            "d_sae": self.d_sae,
            "k": self.k,
            "top_positive": self.top_positive,
            "top_negative": self.top_negative,
            "null_max_abs_cos": self.null_max_abs_cos,
            "n_random": self.n_random,
            "n_above_null": int((self.cosines.abs() > self.null_max_abs_cos).sum()),
            **self.meta,
        }


def direction_latents(
    sae: SAE[Any],
    direction: Direction | Float[Tensor, " d_model"],
    layer: int | None = None,
    k: int = 10,
    n_random: int = 200,
    seed: int = 0,
) -> DirectionLatents:
    """Latents whose decoder rows point along (or against) ``direction`` at ``layer``.

    ``layer`` defaults to the SAE's own layer and must match it. ``encoder_cosines`` says which
    latents *read* the direction (cosine with the encoder column), which need not be the latents
    that write it. The null is the 95th percentile, over ``n_random`` seeded random directions, of
    the best |cosine| any latent reaches: a latent above it is more aligned than chance.
    """
    if k < 1:
        raise LatentlabError(f"k must be >= 1, got {k}", "pass --k 1 or more")
    layer = _resolve_layer(sae, layer)
    d_in = int(sae.cfg.d_in)
    unit, name, norm = _unit_direction(direction, layer, d_in)
    dec = decoder_vectors(sae).cpu()
    dec_unit = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    enc = sae.W_enc.detach().float().cpu().T  # [d_sae, d_in]
    enc_unit = enc / enc.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_random, d_in, generator=g)
    r = r / r.norm(dim=-1, keepdim=True)
    null = float("nan")
    if n_random > 0:  # in chunks: a 1M-latent SAE times 200 directions would not fit in memory
        best = torch.cat([(r[i : i + 16] @ dec_unit.T).abs().amax(-1) for i in range(0, n_random, 16)])
        null = float(best.quantile(0.95))
    return DirectionLatents(
        layer=layer,
        direction=name,
        cosines=dec_unit @ unit,
        encoder_cosines=enc_unit @ unit,
        k=k,
        null_max_abs_cos=null,
        n_random=n_random,
        meta={"direction_norm": norm, "seed": seed, "sae": _sae_summary(sae)},
    )


def _sae_summary(sae: SAE[Any]) -> dict[str, Any]:
    meta = sae.cfg.metadata
    side = meta.get("latentlab") or {}
    return {
        "architecture": sae.cfg.architecture(),
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "hook_name": meta.get("hook_name"),
        "model_name": meta.get("model_name"),
        "base_fingerprint": side.get("model", {}).get("base_fingerprint"),
        "training_stats": side.get("stats"),
    }


# --------------------------------------------------------------------------------------------
# Which latents did a finetune move?
# --------------------------------------------------------------------------------------------


def _ci(means: Float[Tensor, "n_boot m"]) -> list[tuple[float, float]]:
    if means.shape[0] == 0:
        return [(float("nan"), float("nan"))] * means.shape[1]
    q = torch.quantile(means, torch.tensor([0.025, 0.975]), dim=0)
    return [(float(q[0, j]), float(q[1, j])) for j in range(means.shape[1])]


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
    if k < 1:
        raise LatentlabError(f"k must be >= 1, got {k}", "pass --k 1 or more")
    layer = _resolve_layer(sae, layer)
    sets = {"base": base_acts, "finetuned": finetuned_acts}
    if control_acts is not None:
        sets["control"] = control_acts
    for name, acts in sets.items():
        _check_acts(acts, sae, f"{name} activations")
    n = base_acts.shape[0]
    if n == 0:
        raise LatentlabError("no prompts to measure the shift on", "pass --prompts with at least one prompt")
    if any(a.shape != base_acts.shape for a in sets.values()):
        raise LatentlabError(
            "base, finetuned and control activations differ in shape "
            + str({k_: tuple(v.shape) for k_, v in sets.items()}),
            "collect all of them on the same prompts at the same layer",
        )
    dec = decoder_vectors(sae).cpu()
    dec_norm = dec.norm(dim=-1)
    unit, name = None, None
    if direction is not None:
        unit, name, _ = _unit_direction(direction, layer, int(sae.cfg.d_in))
    dec_cos = None if unit is None else (dec @ unit) / dec_norm.clamp_min(1e-12)
    x = {key: v.float().cpu() for key, v in sets.items()}
    f = {key: encode_acts(sae, v) for key, v in x.items()}
    pairs = {"finetuned": ("finetuned", "base")}
    if control_acts is not None:
        pairs |= {"control": ("control", "base"), "finetuned - control": ("finetuned", "control")}
    primary = "finetuned - control" if control_acts is not None else "finetuned"
    # One resampling of the prompts for every latent and term (seeded as `latentlab shift` seeds its
    # bootstrap, so projection CIs match its numbers); fewer than 2 prompts: no interval.
    def boot(x: Tensor) -> Tensor:
        return bootstrap_means(x, n_boot, seed) if n >= 2 else x.new_zeros(0, *x.shape[1:])

    # Full [n, d_sae] differences are never materialised: a 262k-latent SAE would need GBs for them.
    mean_f = {key: v.mean(0) for key, v in f.items()}
    fires = {key: (v > 0).float().mean(0) for key, v in f.items()}
    along = None if unit is None else dec @ unit  # [d_sae]: d_j . u
    mean_change, f_before, f_after, decomposition = {}, {}, {}, {}
    for label, (a, b) in pairs.items():
        mean_change[label] = mean_f[a] - mean_f[b]  # paired per prompt: the mean of the differences
        f_before[label], f_after[label] = fires[b], fires[a]
        if along is not None and dec_cos is not None and unit is not None:
            latent_per_prompt = f[a] @ along - f[b] @ along  # sum_j delta_f_j (d_j . u), per prompt
            contrib = mean_change[label] * along
            decomposition[label] = _decompose(x[a] - x[b], latent_per_prompt, contrib, dec_cos, unit, k, boot)
    size = mean_change[primary].abs() * dec_norm
    order = torch.argsort(size, descending=True)[: min(k, int(size.shape[0]))].tolist()
    for label, dec_part in decomposition.items():
        assert along is not None
        dec_part["top_k_by_change_term"] = float((mean_change[label] * along)[order].sum())
    top = []
    for rank, j in enumerate(order, start=1):
        row: dict[str, Any] = {"rank": rank, "latent": j, "decoder_norm": float(dec_norm[j])}
        if dec_cos is not None:
            row["decoder_cos"] = float(dec_cos[j])
        top.append(row)
    for label, (a, b) in pairs.items():
        means = boot(f[a][:, order] - f[b][:, order])  # bootstrap means of the paired changes, [n_boot, k]
        for row, (lo, hi) in zip(top, _ci(means)):
            j = row["latent"]
            row[label] = {
                "mean_change": float(mean_change[label][j]),
                "ci": (lo, hi),
                "freq_before": float(f_before[label][j]),
                "freq_after": float(f_after[label][j]),
                "freq_change": float(f_after[label][j] - f_before[label][j]),
            }
    l0 = {key: float((v > 0).float().sum(-1).mean()) for key, v in f.items()}
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
        meta={"n_prompts": n, "n_boot": n_boot, "seed": seed, "l0": l0, "sae": _sae_summary(sae)},
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
    cis = _ci(boot(torch.stack([proj, latent, error], 1)))
    return {
        "projection": total,
        "projection_ci": cis[0],
        "latent_term": float(latent.mean()),
        "latent_term_ci": cis[1],
        "error_term": float(error.mean()),
        "error_term_ci": cis[2],
        "top_k_term": top_term,
        "other_latents_term": float(latent.mean()) - top_term,
        "top_k_share": top_term / total if abs(total) > 1e-12 else float("nan"),
        "top_k_latents": [
            {"latent": int(j), "contribution": float(contrib[j]), "decoder_cos": float(dec_cos[j])} for j in top
        ],
    }


# --------------------------------------------------------------------------------------------
# Activations for the shift: one layer, last prompt token, models loaded one at a time.
# --------------------------------------------------------------------------------------------


def prompt_acts(
    model: LoadedModel, prompts: Sequence[str], layer: int, progress: bool = False
) -> Float[Tensor, "n d_model"]:
    """Residual stream after ``layer`` at the last prompt token (prompts rendered for this model),
    as :func:`latentlab.shift.last_token_acts` reads it; the forward stops after ``layer``."""
    from latentlab.activations import collect
    from latentlab.data import render_prompt

    rendered = [render_prompt(p, model.tokenizer) for p in prompts]
    acts = collect(model, rendered, [layer], "last", progress=progress)
    assert acts is not None
    return acts.layer(layer)


def analyze_latent_shift(
    base: str,
    finetuned: str | Path,
    sae: SAE[Any],
    prompts: Sequence[str],
    direction: Direction | None = None,
    control: str | Path | None = None,
    layer: int | None = None,
    k: int = 20,
    n_boot: int = 1000,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> LatentShift:
    """:func:`latent_shift` from models: ``base`` and finetune (and control) adapters or
    ``latentlab finetune`` run folders, loaded one at a time so memory holds one model."""
    import gc

    from latentlab.models import load_model
    from latentlab.shift import resolve_adapter

    if not prompts:
        raise LatentlabError("no prompts to measure the shift on", "pass --prompts with at least one prompt")
    layer = _resolve_layer(sae, layer)
    adapters = {"finetuned": resolve_adapter(finetuned)}
    if control is not None:
        adapters["control"] = resolve_adapter(control)
    acts: dict[str, Tensor] = {}
    info: dict[str, Any] = {}
    for label, adapter in (("base", None), *adapters.items()):
        m = load_model(base, adapter=adapter, device=device, progress=progress)
        m.check_layers([layer])
        check_sae(sae, layer=layer, d_model=m.d_model)
        info[label] = m.info.to_dict()
        acts[label] = prompt_acts(m, prompts, layer, progress)
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


# --------------------------------------------------------------------------------------------
# Training a small SAE with sae-lens.
# --------------------------------------------------------------------------------------------


@dataclass
class SAETrainConfig:
    """SAE hyper-parameters. Defaults are for a CPU: ``d_sae = 4 x d_model`` (2560 latents on
    gemma-3-270m), TopK with k=32, 1000 steps of 256 tokens: ~2-3 min on 2 cores at d_model 640.

    Why 4x and not the usual 8-32x: the offline data here is small (the 241 unrelated prompts are
    ~5k tokens), and a wider SAE on so few tokens mostly adds dead latents. With more text, raise
    ``expansion`` (and ``steps``). TopK is the default because its sparsity is set directly (no
    L1 coefficient to tune); ``architecture="standard"`` is the ReLU + L1 SAE.
    """

    architecture: Architecture = "topk"
    expansion: int = 4
    d_sae: int | None = None  # overrides expansion
    k: int = 32  # topk: active latents per token
    l1_coefficient: float = 5.0  # standard: sparsity penalty (inputs scaled to norm sqrt(d_model))
    steps: int = 1000
    batch_size: int = 256  # tokens per step
    lr: float = 1e-3  # constant, then linear decay to 0 over the last 20% of steps (sae-lens' scheduler)
    seed: int = 0
    eval_fraction: float = 0.1  # examples held out for the reported statistics
    exclude_bos: bool = True  # the BOS position is an attention sink with a huge norm, not content
    device: str = "cpu"  # where the SAE trains (cpu, cuda, auto); it is saved and returned on the CPU


@dataclass
class SAETraining:
    """A trained SAE (as reloaded from sae-lens' format), its loss curve and statistics."""

    sae: Any  # sae_lens.SAE, the inference SAE (norm scaling folded in)
    losses: list[dict[str, float]]  # per step: loss, mse_loss, (l1_loss | auxiliary_reconstruction_loss), l0
    stats: dict[str, Any]
    meta: dict[str, Any]  # the sidecar
    path: Path | None = None


def activation_batches(
    acts: Float[Tensor, "n d"], batch_size: int, seed: int = 0
) -> Iterator[Float[Tensor, "batch d"]]:
    """Endless shuffled batches of token activations (a fresh permutation per epoch, seeded).

    This is sae-lens' ``DataProvider`` protocol (an iterator of ``[batch, d_in]`` tensors). Only
    full batches are yielded: sae-lens counts every step as ``batch_size`` samples.
    """
    n = acts.shape[0]
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[i : i + batch_size]]


def reconstruction_stats(sae: SAE[Any], acts: Float[Tensor, "n d"], chunk: int = 2048) -> dict[str, float]:
    """MSE (sum over dimensions, mean over tokens), explained variance, L0 and dead-latent fraction.

    Explained variance is ``1 - SSE / SST`` with SST around the mean of ``acts``; a latent is dead
    here when it never fires on ``acts``.
    """
    return _stats_and_fired(sae, acts, chunk)[0]


@torch.no_grad()
def _stats_and_fired(sae: SAE[Any], acts: Tensor, chunk: int = 2048) -> tuple[dict[str, float], Tensor]:
    """:func:`reconstruction_stats` and which latents fired, from one encoding pass (the training
    summary combines the train and held-out masks instead of encoding everything again)."""
    sae.eval()
    sse, l0_sum, n = 0.0, 0.0, acts.shape[0]
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    mean = acts.float().mean(0)
    sst = float(((acts.float() - mean) ** 2).sum())
    for i in range(0, n, chunk):
        x = acts[i : i + chunk].to(sae.W_dec.device, sae.W_dec.dtype)
        f = sae.encode(x)
        f = f.to_dense() if f.is_sparse else f
        rec = sae.decode(f)
        sse += float(((rec.float() - x.float()) ** 2).sum())
        active = (f > 0).cpu()
        l0_sum += float(active.float().sum())
        fired |= active.any(0)
    stats = {
        "mse": sse / max(n, 1),
        "explained_variance": 1.0 - sse / sst if sst > 0 else float("nan"),
        "l0": l0_sum / max(n, 1),
        "dead_fraction": float((~fired).float().mean()),
        "n_tokens": int(n),
    }
    return stats, fired


def _make_training_sae(
    cfg: SAETrainConfig, d_in: int, d_sae: int, hook_name: str, model_name: str | None, device: str
) -> Any:
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook_name, model_name=model_name, prepend_bos=True)
    common = {
        "d_in": d_in,
        "d_sae": d_sae,
        "normalize_activations": "expected_average_only_in",
        "metadata": meta,
        "device": device,
    }
    if cfg.architecture == "topk":
        if not 1 <= cfg.k <= d_sae:
            raise LatentlabError(f"k={cfg.k} must be between 1 and d_sae={d_sae}", "pass a smaller --k")
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))
    if cfg.architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common))
    raise LatentlabError(f"unknown SAE architecture {cfg.architecture!r}", "use topk or standard")


def train_sae_on_activations(
    acts: Float[Tensor, "n_tokens d_model"],
    layer: int,
    config: SAETrainConfig | None = None,
    eval_acts: Float[Tensor, "n_eval d_model"] | None = None,
    out: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> SAETraining:
    """Train an SAE on token activations of one layer with sae-lens' ``SAETrainer``.

    The batches come from :func:`activation_batches`; sae-lens estimates the activation-norm
    scale on them, trains in that scale and folds it into the weights, so the saved SAE reads raw
    activations. ``b_dec`` starts at the data mean (as sae-lens' ``b_dec_init_method="mean"`` did
    before 6.0): residual streams have a large mean, and learning it from zero wastes most of a
    short CPU run. With ``out``, the SAE is written to a temporary folder and renamed into place.
    """
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from tqdm.auto import tqdm

    from latentlab.models import resolve_device

    cfg = config or SAETrainConfig()
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise LatentlabError(
            f"no token activations to train on (shape {tuple(acts.shape)})", "pass data with at least one token"
        )
    if not torch.isfinite(acts).all():
        raise LatentlabError("activations contain NaN or inf", "check the model dtype (try --dtype float32)")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise LatentlabError(
            f"steps, batch size and lr must be positive (got {cfg.steps}, {cfg.batch_size}, {cfg.lr})",
            "pass positive --steps, --batch-size and --lr",
        )
    acts = acts.float().cpu()
    n_tokens, d_in = acts.shape
    d_sae = int(cfg.d_sae or cfg.expansion * d_in)
    if d_sae < 1:
        raise LatentlabError(f"d_sae must be >= 1 (got {d_sae})", "pass a positive --d-sae or --expansion")
    batch = min(cfg.batch_size, n_tokens)  # a tiny dataset: every step sees all of it, reshuffled
    hook_name = f"blocks.{layer}.hook_resid_post"
    torch.manual_seed(cfg.seed)  # sae-lens initialises with the global RNG
    device = str(resolve_device(cfg.device))
    training_sae = _make_training_sae(cfg, d_in, d_sae, hook_name, model_name, device)
    decay = max(1, cfg.steps // 5)
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=cfg.steps * batch,
            train_batch_size_samples=batch,
            lr=cfg.lr,
            lr_end=cfg.lr / 10,  # unused by the constant schedule, but sae-lens requires it set
            lr_decay_steps=decay if cfg.steps > decay else 0,
            device=device,
            dead_feature_window=max(1, min(1000, cfg.steps // 4)),
            feature_sampling_window=max(1, cfg.steps),
            n_batches_for_norm_estimate=max(1, min(100, n_tokens // batch)),
        ),
        training_sae,
        activation_batches(acts, batch, cfg.seed),
    )
    # What SAETrainer.fit() does, with a progress bar that shows the loss and a kept loss curve.
    t0 = time.time()
    trainer.activation_scaler.estimate_scaling_factor(
        d_in, trainer.data_provider, trainer.cfg.n_batches_for_norm_estimate
    )
    scale = float(trainer.activation_scaler.scaling_factor or 1.0)
    with torch.no_grad():
        training_sae.b_dec.copy_((acts.mean(0) * scale).to(training_sae.b_dec.device))
    losses: list[dict[str, float]] = []
    bar = tqdm(total=cfg.steps, desc=f"SAE layer {layer} ({cfg.architecture}, {d_sae} latents)", disable=not progress)
    for _ in range(cfg.steps):
        trainer.maybe_reset_sparsity()
        step = trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1
        with torch.no_grad():
            fa = step.feature_acts.to_dense() if step.feature_acts.is_sparse else step.feature_acts
            row = {"loss": float(step.loss.detach())}
            row |= {name: float(v.detach()) for name, v in step.losses.items()}
            row["l0"] = float((fa > 0).float().sum(-1).mean())
        if not math.isfinite(row["loss"]):
            bar.close()
            raise LatentlabError(f"SAE training diverged (loss {row['loss']} at step {len(losses) + 1})", "lower --lr")
        losses.append(row)
        if len(losses) % 10 == 1 or len(losses) == cfg.steps:
            bar.set_postfix(loss=f"{row['loss']:.3g}", mse=f"{row['mse_loss']:.3g}", l0=f"{row['l0']:.0f}")
        bar.update(1)
    bar.close()
    training_sae.fold_activation_norm_scaling_factor(scale)
    trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()
    if cfg.architecture == "standard":
        training_sae.fold_W_dec_norm()  # exact for ReLU SAEs: unit decoder rows, so changes compare across latents
    training_sae.to("cpu")
    training_sae.cfg.device = "cpu"
    seconds = time.time() - t0

    # Save in sae-lens' inference format, reload it (what you get is what is on disk), then measure.
    tmp_root = Path(tempfile.mkdtemp(prefix=".sae-", dir=None if out is None else _parent(out)))
    try:
        training_sae.save_inference_model(str(tmp_root))
        from sae_lens import SAE

        sae = SAE.load_from_disk(str(tmp_root), device="cpu")
        train_stats, fired = _stats_and_fired(sae, acts)
        stats: dict[str, Any] = {"train": train_stats}
        if eval_acts is not None and eval_acts.shape[0] > 0:
            stats["eval"], fired_eval = _stats_and_fired(sae, eval_acts.float().cpu())
            fired |= fired_eval
        stats["dead_fraction"] = float((~fired).float().mean())  # never fires on any token, train or held out
        stats["reported_on"] = "eval" if "eval" in stats else "train"
        first = losses[: max(1, len(losses) // 10)]
        last = losses[-max(1, len(losses) // 10) :]
        stats["final_loss"] = sum(r["loss"] for r in last) / len(last)
        stats["initial_loss"] = sum(r["loss"] for r in first) / len(first)
        sidecar = {
            "format": "latentlab-sae/1",
            "layer": layer,
            "hook_name": hook_name,
            "position": "all tokens" + (" except BOS" if cfg.exclude_bos else ""),
            **(meta or {}),
            "n_tokens_train": n_tokens,
            "n_tokens_eval": 0 if eval_acts is None else int(eval_acts.shape[0]),
            "activations_hash": _tensor_hash(acts),
            "training": {
                **asdict(cfg),
                "d_sae": d_sae,
                "d_in": d_in,
                "batch_size_used": batch,
                "norm_scaling_factor": scale,
                "seconds": round(seconds, 2),
                "trainer": "sae_lens.SAETrainer",
                "sae_lens_l0": sae.cfg.metadata.get("l0"),
            },
            "stats": stats,
        }
        write_json(tmp_root / SIDECAR, sidecar)
        sae.cfg.metadata["latentlab"] = sidecar
        path = None
        if out is not None:
            path = Path(out)
            replace_dir(tmp_root, path)
    finally:
        if tmp_root.exists():
            shutil.rmtree(tmp_root, ignore_errors=True)
    return SAETraining(sae=sae, losses=losses, stats=stats, meta=sidecar, path=path)


def _parent(out: str | Path) -> Path:
    from latentlab.io import ensure_writable_dir

    return ensure_writable_dir(Path(out).parent)


def _tensor_hash(t: Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def sae_texts(model: LoadedModel, sources: str | Path | Sequence[str | Path]) -> tuple[list[Example], dict[str, Any]]:
    """Texts to train an SAE on, rendered the way the analyses read them, and their provenance.

    Prompt files (``{"prompt"}`` lines, e.g. ``unrelated``) are rendered with
    :func:`latentlab.data.render_prompt`, as ``latentlab shift`` renders them, so the SAE sees the
    distribution it is later used on; contrast pairs (``era``, ``persona``) give both poles;
    text and chat files are used as :func:`latentlab.collect` reads them.
    """
    from latentlab.data import (
        Example,
        as_examples,
        dataset_hash,
        load_pairs,
        load_prompts,
        pair_examples,
        read_jsonl,
        render_prompt,
    )

    srcs = [sources] if isinstance(sources, (str, Path)) else list(sources)
    if not srcs:
        raise LatentlabError("no data to train the SAE on", "pass --data with a dataset name or JSONL file")
    examples: list[Example] = []
    names, hashes, kinds = [], [], []
    for src in srcs:
        row = read_jsonl(src)[0]
        if "positive" in row and "negative" in row:
            pos, neg = pair_examples(load_pairs(src), model.tokenizer)
            examples += pos + neg
            kinds.append("pairs")
        elif "prompt" in row and "completion" not in row and "text" not in row:
            examples += [Example(render_prompt(p, model.tokenizer)) for p in load_prompts(src)]
            kinds.append("prompts")
        else:
            examples += as_examples(src if isinstance(src, Path) else str(src), model.tokenizer)
            kinds.append("texts")
        names.append(str(src))
        hashes.append(dataset_hash(src))
    return examples, {"datasets": names, "dataset_hashes": hashes, "dataset_kinds": kinds}


def train_sae(
    model: LoadedModel,
    texts: Any,
    layer: int,
    d_sae: int | None = None,
    config: SAETrainConfig | None = None,
    out: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> SAETraining:
    """Train an SAE on ``model``'s residual stream after block ``layer``, every token of ``texts``.

    ``texts``: anything :func:`latentlab.collect` takes (strings, Examples, a JSONL path or built-in
    name); :func:`sae_texts` renders prompt files and contrast pairs first. Activations are held in
    memory (n_tokens x d_model float32: 100k tokens of gemma-3-270m are 256 MB). A held-out
    ``config.eval_fraction`` of the *examples* (not tokens, so no text is in both) gives the
    reported statistics. Defaults: see :class:`SAETrainConfig`. With ``out``, the folder holds
    sae-lens' ``cfg.json`` + ``sae_weights.safetensors`` and the sidecar ``latentlab_sae.json``.
    """
    from latentlab.activations import collect, encode
    from latentlab.data import as_examples

    cfg = config or SAETrainConfig()
    if d_sae is not None:
        cfg = SAETrainConfig(**{**asdict(cfg), "d_sae": d_sae})
    layer = model.check_layers([layer])[0]
    examples = as_examples(texts, model.tokenizer)
    if not examples:
        raise LatentlabError("no texts to train the SAE on", "pass data with at least one example")
    bos_first = encode(model, examples).bos_first
    acts = collect(model, examples, [layer], "all", batch_size=batch_size, progress=progress)
    assert acts is not None and acts.offsets is not None
    n = len(acts)
    g = torch.Generator().manual_seed(cfg.seed)
    n_eval = int(n * cfg.eval_fraction) if n >= 10 else 0
    eval_ids = set(torch.randperm(n, generator=g)[:n_eval].tolist())
    train_rows, eval_rows = [], []
    skip = 1 if (cfg.exclude_bos and bos_first) else 0
    for i in range(n):
        rows = acts.example(i)[skip:, 0]
        (eval_rows if i in eval_ids else train_rows).append(rows)
    train = torch.cat(train_rows) if train_rows else torch.zeros(0, model.d_model)
    held = torch.cat(eval_rows) if eval_rows else None
    text_hash = sha256_text("\x1e".join(ex.text for ex in examples))[:16]
    info: dict[str, Any] = {
        "model": {
            k: getattr(model.info, k)
            for k in (
                "name",
                "path",
                "architecture",
                "n_layers",
                "d_model",
                "base_fingerprint",
                "adapter",
                "adapter_fingerprint",
            )
        },
        "n_examples": n,
        "n_examples_eval": n_eval,
        "data_hash": text_hash,
        "excluded_bos": bool(skip),
    }
    if isinstance(texts, (str, Path)):
        from latentlab.data import dataset_hash

        info |= {"datasets": [str(texts)], "dataset_hashes": [dataset_hash(texts)]}
    return train_sae_on_activations(
        train,
        layer,
        cfg,
        eval_acts=held,
        out=out,
        meta=info | (meta or {}),
        model_name=model.info.name,
        progress=progress,
    )


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The latentlab sidecar of an SAE folder (None for an SAE latentlab did not train)."""
    side = resolve_sae_dir(path) / SIDECAR
    return read_json(side) if side.is_file() else None


__all__ = [
    "DirectionLatents",
    "LatentShift",
    "SAETrainConfig",
    "SAETraining",
    "activation_batches",
    "analyze_latent_shift",
    "check_sae",
    "decoder_vectors",
    "direction_latents",
    "encode_acts",
    "latent_shift",
    "load_sae",
    "prompt_acts",
    "read_sidecar",
    "reconstruction_stats",
    "resolve_sae_dir",
    "sae_layer",
    "sae_texts",
    "train_sae",
    "train_sae_on_activations",
]
