"""Loading and checking SAEs: folders and pretrained releases (safetensors only), the layer an SAE
reads, and decoder vectors that follow ``decode``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_helpers import D_IN, LAYER, make_sae

from latentlab.errors import LatentlabError
from latentlab.sae import check_sae, decoder_vectors, load_sae, sae_layer


def test_load_sae_errors(tmp_path: Path) -> None:
    with pytest.raises(LatentlabError, match="does not exist"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentlabError, match="holds no SAE"):
        load_sae(tmp_path / "empty")
    make_sae().save_model(tmp_path / "s")
    sae = load_sae(tmp_path / "s", layer=LAYER, d_model=D_IN)
    assert sae_layer(sae) == LAYER and "latentlab" not in sae.cfg.metadata  # no sidecar: not ours, still fine
    with pytest.raises(LatentlabError, match="width 64.*width 48"):
        load_sae(tmp_path / "s", d_model=48)
    with pytest.raises(LatentlabError, match=r"trained on layer 2 \(hook .*\), not layer 3.*--layer 2"):
        load_sae(tmp_path / "s", layer=3)
    (tmp_path / "s" / "cfg.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LatentlabError, match="cannot load the SAE"):
        load_sae(tmp_path / "s")


def test_pretrained_release_offline_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LatentlabError) as e:
        load_sae("no-such-release:layer_1")
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    with pytest.raises(LatentlabError, match="pickled"):
        load_sae("qwen-scope-3-1.7b-base-w32k-l50:anything")  # refused before any download


@pytest.mark.parametrize(
    ("hook", "layer"),
    [("blocks.2.hook_resid_post", 2), ("blocks.3.hook_resid_pre", 2), (None, None)],
)
def test_sae_layer_reads_the_hook(hook: str | None, layer: int | None) -> None:
    assert sae_layer(make_sae(hook=hook)) == layer


@pytest.mark.parametrize("hook", ["blocks.2.hook_mlp_out", "blocks.2.attn.hook_z", "blocks.0.hook_resid_pre"])
def test_sae_on_another_hook_is_refused(hook: str) -> None:
    with pytest.raises(LatentlabError, match="not the residual stream"):
        sae_layer(make_sae(hook=hook))


def test_transcoder_is_refused() -> None:
    with pytest.raises(LatentlabError, match="transcoder"):
        check_sae(make_sae(hook_name_out="blocks.2.hook_mlp_out"))


def test_decoder_vectors_follow_decode() -> None:
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    topk = TopKSAE(TopKSAEConfig(d_in=8, d_sae=12, k=3, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        topk.W_dec.mul_(torch.linspace(0.5, 3, 12)[:, None])
    dec = decoder_vectors(topk)
    assert torch.allclose(dec.norm(dim=-1), torch.ones(12), atol=1e-5)  # decode divides by the row norm
    std = StandardSAE(StandardSAEConfig(d_in=8, d_sae=12))
    assert torch.equal(decoder_vectors(std), std.W_dec)
    # a residual-stream mean in b_dec (gemma's reaches 6e3) must not read as a nonlinear decoder
    with torch.no_grad():
        topk.b_dec.fill_(6000.0)
    assert torch.allclose(decoder_vectors(topk).norm(dim=-1), torch.ones(12), atol=1e-5)
    ln = StandardSAE(StandardSAEConfig(d_in=8, d_sae=12, normalize_activations="layer_norm"))
    with pytest.raises(LatentlabError, match="normalises"):
        decoder_vectors(ln)
