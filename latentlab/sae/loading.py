"""Loading and checking SAEs, and the checks every SAE analysis shares.

SAEs are read with :func:`load_sae` (a folder, or a pretrained ``release:sae_id`` passed through to
sae-lens). Weights are safetensors only: releases whose sae-lens loader unpickles ``.pt`` files are
refused, and nothing here runs remote code.

An SAE for another layer or model produces plausible-looking latents, so every analysis checks
that the SAE reads ``blocks.{layer}.hook_resid_post`` of a model of its width
(:func:`check_sae`), and that a direction has that width and is finite and nonzero at that layer
(:func:`unit_direction`), before anything is computed. The decomposition of a shift into latents
needs the decoder to be affine in the latents (:func:`decoder_vectors` refuses the others).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.direction import Direction
from latentlab.errors import LatentlabError, first_line
from latentlab.io import read_json
from latentlab.models import resolve_device

if TYPE_CHECKING:  # sae-lens costs seconds to import: only when an SAE is really used
    from sae_lens import SAE


SIDECAR = "latentlab_sae.json"
CFG_FILE = "cfg.json"  # sae-lens' on-disk names
WEIGHTS_FILE = "sae_weights.safetensors"
# sae-lens loaders that read pickled .pt weights (torch.load): latentlab never unpickles.
PICKLE_LOADERS = {"connor_rob_hook_z", "goodfire", "deepseek_r1", "qwen_scope", "dictionary_learning_1"}
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


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


def resolve_layer(sae: SAE[Any], layer: int | None) -> int:
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
    check_acts(acts, sae, "activations")
    sae.eval()
    out = []
    for i in range(0, acts.shape[0], chunk):
        x = acts[i : i + chunk].to(sae.W_dec.device, sae.W_dec.dtype)
        f = sae.encode(x)
        out.append((f.to_dense() if f.is_sparse else f).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, int(sae.cfg.d_sae))


def check_acts(acts: Tensor, sae: SAE[Any], what: str) -> None:
    if acts.ndim != 2 or acts.shape[-1] != int(sae.cfg.d_in):
        raise LatentlabError(
            f"{what} have shape {tuple(acts.shape)}, but the SAE reads [n, {sae.cfg.d_in}] vectors",
            "pass activations of one layer of the model the SAE was trained on",
        )
    if not torch.isfinite(acts).all():
        raise LatentlabError(f"{what} contain NaN or inf", "check the model dtype (try --dtype float32)")


def unit_direction(direction: Direction | Tensor, layer: int, d_in: int) -> tuple[Float[Tensor, " d_in"], str, float]:
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
        raise LatentlabError(
            f"the {name} direction at layer {layer} is all zero or not finite (NaN/inf, norm {norm})",
            "refit the direction (`latentlab direction`), or pass another direction file",
        )
    return v.cpu() / norm, name, norm


def sae_summary(sae: SAE[Any]) -> dict[str, Any]:
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


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The latentlab sidecar of an SAE folder (None for an SAE latentlab did not train)."""
    side = resolve_sae_dir(path) / SIDECAR
    return read_json(side) if side.is_file() else None


# --------------------------------------------------------------------------------------------
# Checks of the inputs the commands take, run before any model loads.
# --------------------------------------------------------------------------------------------


def require_at_least(name: str, value: float, minimum: float, flag: str) -> None:
    """``value >= minimum`` (and finite), else one clear error naming the option."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum):
        raise LatentlabError(f"{name} must be >= {minimum:g}, got {value}", f"pass {flag} {minimum:g} or more")
