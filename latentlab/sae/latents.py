"""Which SAE latents write along the era / persona direction (:func:`direction_latents`).

Cosine of the unit direction with every decoder row, the top positive and negative latents, and a
null: the largest |cosine| a *random* direction reaches (with thousands of latents, some latent is
always a little aligned with anything). The random directions are :func:`latentlab.stats.random_units`,
the same seeded draw every stage compares against.

``latentlab sae latents`` (the run folder around it) is :mod:`latentlab.stages.sae`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.direction import Direction
from latentlab.sae.loading import decoder_vectors, require_at_least, resolve_layer, sae_summary, unit_direction
from latentlab.stats import check_finite, random_units

if TYPE_CHECKING:
    from sae_lens import SAE

STAGE = "sae latents"
MIN_RANDOM = 20  # fewer random directions give no usable 95th percentile

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
    require_at_least("k", k, 1, "--k")
    require_at_least("n_random", n_random, MIN_RANDOM, "--n-random")
    layer = resolve_layer(sae, layer)
    d_in = int(sae.cfg.d_in)
    unit, name, norm = unit_direction(direction, layer, d_in)
    dec = decoder_vectors(sae).cpu()
    dec_unit = dec / dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    enc = sae.W_enc.detach().float().cpu().T  # [d_sae, d_in]
    enc_unit = enc / enc.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = random_units((n_random, d_in), seed)
    # in chunks: a 1M-latent SAE times 200 directions would not fit in memory
    best = torch.cat([(r[i : i + 16] @ dec_unit.T).abs().amax(-1) for i in range(0, n_random, 16)])
    null = float(best.quantile(0.95))
    cosines, encoder_cosines = dec_unit @ unit, enc_unit @ unit
    check_finite(cosines, "decoder cosines", STAGE)
    check_finite(encoder_cosines, "encoder cosines", STAGE)
    check_finite(null, "the random-direction chance level", STAGE)
    return DirectionLatents(
        layer=layer,
        direction=name,
        cosines=cosines,
        encoder_cosines=encoder_cosines,
        k=k,
        null_max_abs_cos=null,
        n_random=n_random,
        meta={"direction_norm": norm, "seed": seed, "sae": sae_summary(sae)},
    )
