"""Shared by the SAE tests: SAEs built by hand, where the right answer is known exactly.

A decoder row planted along the direction must top :func:`direction_latents`; with orthonormal
decoder rows and ``W_enc = W_dec^T`` the SAE encodes ``sum_j c_j d_j`` (c >= 0) to exactly ``c``, so
a finetune that adds ``c * d_j`` must show up as latent j moving by c, and a shift outside the
decoder's span must land in the SAE-error term, not in any latent.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from latentlab.directions import Direction

WORDS = "the cat sat on a mat and then ran far away from home to see big red bus old man dog".split()
D_IN, LAYER = 64, 2  # the tiny Gemma's width; any of its 4 layers


def phrases(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 12))) for _ in range(n)]


def make_sae(d_sae: int = 32, d_in: int = D_IN, hook: str | None = f"blocks.{LAYER}.hook_resid_post",
             orthonormal: bool = True, seed: int = 0, **meta: Any) -> Any:
    """A sae-lens StandardSAE with known weights: orthonormal decoder rows, W_enc = W_dec^T, no biases."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, **meta)))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, max(d_sae, d_in), generator=g)
    if orthonormal:
        q, _ = torch.linalg.qr(w)  # [d_in, d_in], orthonormal columns
        dec = q[:, :d_sae].T.contiguous()
    else:
        dec = torch.randn(d_sae, d_in, generator=g)
        dec = dec / dec.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(dec)
        sae.W_enc.copy_(dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def full_direction(vec: torch.Tensor, n_layers: int = 4, name: str = "marker") -> Direction:
    """A Direction over every layer of the tiny Gemma, ``vec`` at LAYER and noise elsewhere."""
    vectors = torch.randn(n_layers, vec.shape[0], generator=torch.Generator().manual_seed(5))
    vectors[LAYER] = vec
    return Direction(vectors, list(range(n_layers)), torch.ones(n_layers), name=name)


def planted(n: int = 40, seed: int = 0) -> dict[str, Any]:
    """Base activations that the orthonormal SAE encodes exactly, plus a component outside its span."""
    sae = make_sae(d_sae=32)
    g = torch.Generator().manual_seed(seed)
    dec = sae.W_dec.detach()
    codes = torch.rand(n, 32, generator=g) * 2 + 0.5  # every latent on
    codes[:, 5] = -1e-3  # latent 5 is off in the base model (just below the ReLU: float noise cannot fire it)
    outside = torch.randn(n, D_IN, generator=g)
    outside = outside - (outside @ dec.T) @ dec  # orthogonal to every decoder row
    base = codes @ dec + outside
    v = torch.randn(D_IN, generator=g)
    v = v - dec.T @ (dec @ v)
    return {"sae": sae, "dec": dec, "base": base, "v": v / v.norm(), "g": g}
