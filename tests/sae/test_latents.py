"""Which SAE latents write along a direction (:func:`direction_latents`): a planted decoder row, the
random-direction chance level, and the ``sae latents`` config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_helpers import D_IN, LAYER, full_direction, make_sae

from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.sae import direction_latents
from latentlab.stages.sae import SAELatentsConfig


def test_direction_latents_finds_the_planted_latent() -> None:
    sae = make_sae(d_sae=256, orthonormal=False, seed=1)
    u = torch.randn(D_IN, generator=torch.Generator().manual_seed(2))
    u = u / u.norm()
    with torch.no_grad():
        sae.W_dec[7] = 3.0 * u  # writes the direction (norm does not matter for a cosine)
        sae.W_dec[3] = -0.5 * u  # writes against it
        sae.W_enc[:, 7] = u  # and reads it
    res = direction_latents(sae, full_direction(5 * u), k=3)
    assert res.layer == LAYER and res.direction == "marker" and res.d_sae == 256
    pos, neg = res.top_positive, res.top_negative
    assert pos[0]["latent"] == 7 and pos[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert pos[0]["encoder_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert neg[0]["latent"] == 3 and neg[0]["cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert pos[0]["above_null"] and neg[0]["above_null"]
    assert 0.2 < res.null_max_abs_cos < 0.9  # 256 random rows in 64 dims: some |cos| by chance
    assert not pos[1]["above_null"] and not neg[1]["above_null"]  # the rest are chance
    d = res.to_dict()
    assert d["n_above_null"] == 2 and d["top_positive"][0]["latent"] == 7 and len(d["top_negative"]) == 3
    json.dumps(d)
    # a raw vector works too, and the sign flips the roles
    flipped = direction_latents(sae, -u, layer=LAYER, k=1)
    assert flipped.top_positive[0]["latent"] == 3 and flipped.top_negative[0]["latent"] == 7


def test_direction_latents_errors() -> None:
    sae = make_sae()
    with pytest.raises(LatentlabError, match=r"trained on layer 2 .*, not layer 1"):
        direction_latents(sae, torch.randn(D_IN), layer=1)
    with pytest.raises(LatentlabError, match="width 48"):
        direction_latents(sae, torch.randn(48))
    with pytest.raises(LatentlabError, match="zero"):
        direction_latents(sae, torch.zeros(D_IN))
    with pytest.raises(LatentlabError, match="layer is unknown"):
        direction_latents(make_sae(hook=None), torch.randn(D_IN))
    with pytest.raises(LatentlabError, match="no layer 2"):
        Direction(torch.randn(1, D_IN), [0], torch.ones(1)).vector(2)


def test_random_directions_are_the_shared_seeded_draw() -> None:
    """direction_latents' chance level uses stats.random_units: the old inline draw, bit for bit."""
    sae = make_sae(d_sae=128, orthonormal=False, seed=4)
    res = direction_latents(sae, torch.randn(D_IN), layer=LAYER, n_random=50, seed=3)
    r = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(3))
    r = r / r.norm(dim=-1, keepdim=True)
    dec = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    assert res.null_max_abs_cos == float((r @ dec.T).abs().amax(-1).quantile(0.95))
    with pytest.raises(LatentlabError, match="n_random must be >= 20"):
        direction_latents(sae, torch.randn(D_IN), n_random=0)


def test_the_command_config_validates_itself(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(LatentlabError, match="k must be >= 1"):
        SAELatentsConfig(sae="s", direction="era", k=0, out=out)
    with pytest.raises(LatentlabError, match="n_random must be >= 20.*--n-random 20"):
        SAELatentsConfig(sae="s", direction="era", n_random=5, out=out)
    with pytest.raises(LatentlabError, match="unknown dtype"):
        SAELatentsConfig(sae="s", direction="era", dtype="float8", out=out)
    with pytest.raises(LatentlabError, match="no-such.safetensors"):  # a bad direction fails before a model loads
        SAELatentsConfig(sae="s", direction=str(tmp_path / "no-such.safetensors"), out=out)
