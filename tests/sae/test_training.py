"""SAE training with sae-lens on a tiny model: the loss, the on-disk round trip, seeds, the statistics,
and the ``sae train`` config (its fields are the SAE's hyper-parameters, checked as an SAETrainConfig)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_helpers import D_IN, LAYER, full_direction, make_sae, phrases

from latentlab.errors import LatentlabError
from latentlab.sae import (
    SAETrainConfig,
    SAETraining,
    analyze_latent_shift,
    latent_shift,
    load_sae,
    read_sidecar,
    reconstruction_stats,
    sae_layer,
    train_sae,
    train_sae_on_activations,
)
from latentlab.stages.base import config_record
from latentlab.stages.sae import SAETrainRunConfig


@pytest.fixture(scope="module")
def trained(tiny_gemma: Any, tmp_path_factory: pytest.TempPathFactory) -> SAETraining:
    out = tmp_path_factory.mktemp("sae") / "run" / "sae"
    cfg = SAETrainConfig(steps=120, batch_size=128, k=8, expansion=4, lr=3e-3, seed=0)
    return train_sae(tiny_gemma, phrases(60), LAYER, config=cfg, out=out, progress=False)


def test_training_reduces_the_loss_and_reconstructs(trained: SAETraining) -> None:
    mse = [r["mse_loss"] for r in trained.losses]
    assert len(mse) == 120 and all(r["l0"] <= 8 for r in trained.losses)  # TopK: at most k latents fire
    first, last = sum(mse[:10]) / 10, sum(mse[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    st = trained.stats
    assert st["reported_on"] == "eval" and st["eval"]["n_tokens"] > 0  # 6 of 60 phrases held out
    assert st["train"]["explained_variance"] > 0.6 and st["eval"]["explained_variance"] > 0.4
    assert st["train"]["l0"] == pytest.approx(8.0)
    assert 0.0 <= st["dead_fraction"] < 0.9


def test_trained_sae_round_trips_through_sae_lens_format(trained: SAETraining, tiny_gemma: Any) -> None:
    from sae_lens import SAE

    path = trained.path
    assert path is not None
    names = {p.name for p in path.iterdir()}
    assert names == {"cfg.json", "sae_weights.safetensors", "latentlab_sae.json"}  # no pickles, no temp files
    assert not list(path.parent.glob(".sae-*"))
    direct = SAE.load_from_disk(str(path))  # sae-lens reads it by itself
    mine = load_sae(path.parent, layer=LAYER, d_model=tiny_gemma.d_model)  # the run folder resolves to sae/
    assert type(mine).__name__ == "TopKSAE" and sae_layer(mine) == LAYER
    for sae in (direct, mine):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(sae, name), getattr(trained.sae, name)), name
    x = torch.randn(5, D_IN) * 3
    assert torch.allclose(mine.encode(x), trained.sae.encode(x))
    side = read_sidecar(path)
    assert side is not None and side == mine.cfg.metadata["latentlab"]
    assert side["layer"] == LAYER and side["hook_name"] == f"blocks.{LAYER}.hook_resid_post"
    assert side["model"]["base_fingerprint"] == tiny_gemma.info.base_fingerprint
    assert side["training"]["d_sae"] == 4 * D_IN and side["training"]["trainer"] == "sae_lens.SAETrainer"
    assert len(side["data_hash"]) == 16 and side["excluded_bos"] is True
    assert side["stats"]["eval"]["explained_variance"] == trained.stats["eval"]["explained_variance"]
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"  # the norm scaling is folded into the weights
    n_tokens = sum(len(tiny_gemma.tokenizer(t)["input_ids"]) for t in phrases(60))
    assert side["n_tokens_train"] + side["n_tokens_eval"] == n_tokens - 60  # every token but the 60 BOS


def test_training_is_seeded(tiny_gemma: Any) -> None:
    acts = torch.randn(300, D_IN, generator=torch.Generator().manual_seed(1)) * 4 + 1
    cfg = SAETrainConfig(steps=5, batch_size=64, d_sae=32, k=4, seed=3)
    a = train_sae_on_activations(acts, 1, cfg, progress=False)
    b = train_sae_on_activations(acts, 1, cfg, progress=False)
    c = train_sae_on_activations(acts, 1, SAETrainConfig(**{**cfg.__dict__, "seed": 4}), progress=False)
    assert torch.equal(a.sae.W_dec, b.sae.W_dec) and not torch.equal(a.sae.W_dec, c.sae.W_dec)
    assert a.stats["reported_on"] == "train" and a.path is None


def test_standard_architecture_learns_planted_features() -> None:
    """ReLU + L1 on sparse combinations of 16 unit features: it must reconstruct them, and its
    decoder rows are folded to unit norm so activation changes compare across latents."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(16, D_IN, generator=g)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    codes = (torch.rand(2000, 16, generator=g) < 0.15).float() * torch.rand(2000, 16, generator=g) * 4
    acts = codes @ feats * 10 + 2.0
    cfg = SAETrainConfig(architecture="standard", d_sae=32, steps=300, batch_size=128, lr=3e-3, l1_coefficient=1.0)
    res = train_sae_on_activations(acts, LAYER, cfg, progress=False)
    assert type(res.sae).__name__ == "StandardSAE"
    assert res.stats["train"]["explained_variance"] > 0.8
    assert res.stats["train"]["l0"] < 16
    assert torch.allclose(res.sae.W_dec.norm(dim=-1), torch.ones(32), atol=1e-4)
    # each planted feature is matched by some decoder row
    best = (feats @ (res.sae.W_dec / res.sae.W_dec.norm(dim=-1, keepdim=True)).T).max(-1).values
    assert (best > 0.8).float().mean() >= 0.75, best


def test_sae_texts_render_prompts_and_pairs(tiny_llama: Any, tmp_path: Path) -> None:
    from latentlab.sae import sae_texts

    (tmp_path / "p.jsonl").write_text('{"prompt": "name a bird"}\n{"prompt": "hi"}\n')
    (tmp_path / "pairs.jsonl").write_text('{"positive": "a telegraph", "negative": "an email"}\n')
    (tmp_path / "t.jsonl").write_text('{"text": "plain words"}\n')
    ex, prov = sae_texts(tiny_llama, [tmp_path / "p.jsonl", tmp_path / "pairs.jsonl", tmp_path / "t.jsonl"])
    texts = [e.text for e in ex]
    assert texts[0].endswith("<|user|>name a bird\n<|assistant|>")  # as `latentlab shift` renders prompts
    assert texts[2:] == ["a telegraph", "an email", "plain words"]
    assert prov["dataset_kinds"] == ["prompts", "pairs", "texts"] and len(prov["dataset_hashes"]) == 3


def test_training_errors(tiny_gemma: Any) -> None:
    cfg = SAETrainConfig(steps=2, batch_size=8, d_sae=16, k=4)
    with pytest.raises(LatentlabError, match="no token activations"):
        train_sae_on_activations(torch.zeros(0, D_IN), 1, cfg, progress=False)
    bad = torch.randn(20, D_IN)
    bad[3, 5] = float("nan")
    with pytest.raises(LatentlabError, match="NaN"):
        train_sae_on_activations(bad, 1, cfg, progress=False)
    with pytest.raises(LatentlabError, match="k=40"):
        train_sae_on_activations(torch.randn(20, D_IN), 1, SAETrainConfig(d_sae=16, k=40), progress=False)
    with pytest.raises(LatentlabError, match="empty"):
        train_sae(tiny_gemma, [], LAYER, config=cfg, progress=False)
    with pytest.raises(LatentlabError, match="out of range"):
        train_sae(tiny_gemma, ["a b c"], 9, config=cfg, progress=False)


def test_reconstruction_stats_of_a_perfect_sae() -> None:
    sae = make_sae(d_sae=D_IN)  # a full orthonormal basis: exact on non-negative codes
    codes = torch.rand(50, D_IN) + 0.1
    st = reconstruction_stats(sae, codes @ sae.W_dec)
    assert st["mse"] < 1e-8 and st["explained_variance"] > 0.999999
    assert st["dead_fraction"] == 0.0 and st["l0"] == D_IN
    codes[:, :10] = -1.0  # ten latents never fire, and the ReLU loses exactly that part
    st = reconstruction_stats(sae, codes @ sae.W_dec)
    assert st["mse"] == pytest.approx(10.0, rel=1e-4)
    assert st["dead_fraction"] == pytest.approx(10 / D_IN) and st["l0"] == D_IN - 10


def test_trained_sae_feeds_the_analyses(trained: SAETraining, tiny_gemma: Any, load_tiny: Callable[..., Any],
                                        tiny_gemma_dir: Path, gemma_lora_dir: Path, tmp_path: Path) -> None:
    """End to end on the tiny model: base vs LoRA activations at the SAE's layer through latent_shift,
    and analyze_latent_shift on the loaded base gives the same numbers."""
    from latentlab.activations import last_token_acts

    prompts = phrases(12, seed=9)
    base = last_token_acts(tiny_gemma, prompts, [LAYER])[:, 0]
    ft = last_token_acts(load_tiny(tiny_gemma_dir, adapter=gemma_lora_dir), prompts, [LAYER])[:, 0]
    direction = full_direction(torch.randn(D_IN))
    res = latent_shift(trained.sae, base, ft, direction, k=5)
    d = res.decomposition["finetuned"]
    assert d["latent_term"] + d["error_term"] == pytest.approx(d["projection"], rel=1e-4, abs=1e-4)
    assert len(res.top) == 5 and res.meta["n_prompts"] == 12
    assert res.meta["sae"]["base_fingerprint"] == tiny_gemma.info.base_fingerprint

    again = analyze_latent_shift(tiny_gemma, gemma_lora_dir, trained.sae, prompts, direction, k=5, progress=False)
    assert torch.allclose(again.mean_change["finetuned"], res.mean_change["finetuned"], atol=1e-5)
    assert [r["latent"] for r in again.top] == [r["latent"] for r in res.top]
    assert set(again.meta["models"]) == {"base", "finetuned"}
    assert again.meta["models"]["finetuned"]["adapter"] == str(gemma_lora_dir)
    assert again.meta["models"]["base"]["adapter"] is None and "warning" not in again.meta
    # a second adapter on the same loaded base: its own numbers, and the first one as the control
    from conftest import make_lora_adapter

    other = make_lora_adapter(tiny_gemma_dir, tmp_path / "other-lora", seed=21)
    both = analyze_latent_shift(tiny_gemma, other, trained.sae, prompts, direction, control=gemma_lora_dir, k=5,
                                progress=False)
    assert not torch.allclose(both.mean_change["finetuned"], res.mean_change["finetuned"], atol=1e-4)
    assert torch.allclose(both.mean_change["control"], res.mean_change["finetuned"], atol=1e-5)
    assert both.meta["models"]["control"]["adapter"] == str(gemma_lora_dir)
    with pytest.raises(LatentlabError, match="adapter"):
        analyze_latent_shift(tiny_gemma, gemma_lora_dir, trained.sae, prompts, control=tiny_gemma_dir)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"k": 0}, "k must be >= 1"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be > 0"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
        ({"eval_fraction": -0.1}, "eval_fraction"),
        ({"architecture": "gated"}, "--architecture"),
        ({"expansion": 0}, "expansion must be >= 1"),
        ({"d_sae": 0}, "d_sae must be >= 1"),
        ({"d_sae": 8, "k": 9}, "k=9"),
        ({"l1_coefficient": -1.0}, "l1_coefficient"),
        ({"device": "tpu"}, "unknown device"),
    ],
)
def test_sae_train_config_validates_itself(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(LatentlabError, match=needle) as e:
        SAETrainConfig(**kwargs)
    assert "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_the_command_config_validates_itself(tmp_path: Path) -> None:
    with pytest.raises(LatentlabError, match="no data"):
        SAETrainRunConfig(out=tmp_path, layer=1, data=[])
    with pytest.raises(LatentlabError, match="steps must be >= 1"):
        SAETrainRunConfig(out=tmp_path, layer=1, steps=0)
    with pytest.raises(LatentlabError, match="unknown device"):
        SAETrainRunConfig(out=tmp_path, layer=1, device="tpu")
    cfg = SAETrainRunConfig(out=tmp_path, layer=1, d_sae=64, l1_coefficient=2.0)
    rec = config_record(cfg)  # what the manifest records
    assert rec["layer"] == 1 and rec["data"] == ["unrelated"] and rec["d_sae"] == 64
    assert SAETrainRunConfig(**rec) == cfg
    sae = cfg.sae_config  # the trainer's view of the same fields
    assert (sae.d_sae, sae.l1_coefficient, sae.device, sae.exclude_bos) == (64, 2.0, cfg.device, True)
