"""SAE stage: training with sae-lens on a tiny model, loading and checking SAEs, planted latents.

The analyses are tested on SAEs built by hand, where the right answer is known exactly: a decoder
row planted along the direction must top :func:`direction_latents`; with orthonormal decoder rows
and ``W_enc = W_dec^T`` the SAE encodes ``sum_j c_j d_j`` (c >= 0) to exactly ``c``, so a finetune
that adds ``c * d_j`` must show up as latent j moving by c, and a shift outside the decoder's span
must land in the SAE-error term, not in any latent.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from latentlab import plots
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.io import load_tensors, save_tensors
from latentlab.sae import (
    SAELatentsConfig,
    SAEShiftConfig,
    SAETrainConfig,
    SAETraining,
    SAETrainRunConfig,
    analyze_latent_shift,
    check_sae,
    decoder_vectors,
    direction_latents,
    latent_shift,
    load_sae,
    read_sidecar,
    reconstruction_stats,
    sae_layer,
    train_sae,
    train_sae_on_activations,
)

WORDS = "the cat sat on a mat and then ran far away from home to see big red bus old man dog".split()
D_IN, LAYER = 64, 2  # the tiny Gemma's width; any of its 4 layers


@pytest.fixture(autouse=True)
def no_png(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(plots._PNG_STATE, "ok", False)


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


# --------------------------------------------------------------------------------------------
# Training (sae-lens SAETrainer) and the on-disk round trip.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Loading and checking.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# direction_latents: a planted decoder row.
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# latent_shift: a planted activation change.
# --------------------------------------------------------------------------------------------


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


def test_latent_shift_recovers_a_planted_change(tmp_path: Path) -> None:
    p = planted()
    sae, dec, base = p["sae"], p["dec"], p["base"]
    j, m, c = 5, 11, 1.5
    noise = 0.01 * torch.randn(base.shape, generator=p["g"])
    finetuned = base + c * dec[j] + noise  # latent 5 switches on
    control = base + c * dec[m]  # the control moves an unrelated latent
    u = dec[j] + 0.3 * dec[m] + 0.5 * p["v"]  # a direction partly outside the SAE's span
    res = latent_shift(sae, base, finetuned, full_direction(u), k=3, control_acts=control, seed=0)
    assert res.comparisons == ["finetuned", "control", "finetuned - control"]
    assert res.primary == "finetuned - control"
    top = {r["latent"]: r for r in res.top}
    assert res.top[0]["latent"] in (j, m) and {j, m} <= set(top)
    row = top[j]
    ft, ctrl, paired = row["finetuned"], row["control"], row["finetuned - control"]
    assert ft["mean_change"] == pytest.approx(c, abs=0.02)
    assert ft["ci"][0] > c - 0.05 and ft["ci"][1] < c + 0.05
    assert ctrl["mean_change"] == pytest.approx(0.0, abs=1e-6) and ctrl["ci"][0] <= 0 <= ctrl["ci"][1]
    assert paired["mean_change"] == pytest.approx(c, abs=0.02)
    assert ft["freq_before"] == 0.0 and ft["freq_after"] == 1.0 and ft["freq_change"] == 1.0
    assert top[m]["finetuned - control"]["mean_change"] == pytest.approx(-c, abs=0.02)
    assert top[m]["finetuned"]["ci"][0] <= 0 <= top[m]["finetuned"]["ci"][1]
    assert row["decoder_cos"] == pytest.approx(1 / u.norm().item(), abs=1e-4)

    unit = u / u.norm()
    dec_ft, dec_ctrl = res.decomposition["finetuned"], res.decomposition["control"]
    assert dec_ft["projection"] == pytest.approx(c * float(dec[j] @ unit), abs=0.02)
    assert dec_ft["latent_term"] == pytest.approx(dec_ft["projection"], abs=0.02)
    assert abs(dec_ft["error_term"]) < 0.02
    assert dec_ft["top_k_latents"][0]["latent"] == j and dec_ft["top_k_share"] == pytest.approx(1.0, abs=0.05)
    assert dec_ctrl["projection"] == pytest.approx(c * float(dec[m] @ unit), abs=1e-4)
    assert dec_ctrl["top_k_latents"][0]["latent"] == m
    for d in res.decomposition.values():  # the identity: projection = latent term + error term
        assert d["latent_term"] + d["error_term"] == pytest.approx(d["projection"], abs=1e-4)
        assert d["top_k_term"] + d["other_latents_term"] == pytest.approx(d["latent_term"], abs=1e-4)
    json.dumps(res.to_dict())
    t, _ = load_tensors(save_tensors(tmp_path / "shift", res.tensors(), {"layer": res.layer}))
    assert t["finetuned.mean_change"][j] == pytest.approx(c, abs=0.02) and t["finetuned-control.freq_after"][j] == 1


def test_projection_interval_is_the_one_latentlab_shift_reports() -> None:
    """The decomposition's projection CI is stats.bootstrap_ci of the per-prompt projections (the
    statistic `latentlab shift` reports), for the same seed: one resampler, not a copy of it."""
    from latentlab.stats import bootstrap_ci

    p = planted(seed=3)
    sae, base, v = p["sae"], p["base"], p["v"]
    finetuned = base + 0.2 * torch.randn(base.shape, generator=p["g"]) + 0.5 * p["dec"][2]
    u = p["dec"][2] + v
    res = latent_shift(sae, base, finetuned, u, k=4, layer=LAYER, seed=7)
    proj = (finetuned - base) @ (u / u.norm())
    assert res.decomposition["finetuned"]["projection_ci"] == pytest.approx(bootstrap_ci(proj, seed=7), abs=1e-5)


def test_a_shift_outside_the_sae_lands_in_the_error_term() -> None:
    p = planted(seed=1)
    sae, base, v = p["sae"], p["base"], p["v"]
    finetuned = base + 2.0 * v  # nothing any latent can express
    res = latent_shift(sae, base, finetuned, v, k=5, layer=LAYER)
    d = res.decomposition["finetuned"]
    assert d["projection"] == pytest.approx(2.0, abs=1e-4)
    assert d["error_term"] == pytest.approx(2.0, abs=1e-4) and abs(d["latent_term"]) < 1e-4
    assert max(abs(r["finetuned"]["mean_change"]) for r in res.top) < 1e-4
    assert res.comparisons == ["finetuned"] and res.primary == "finetuned"


def test_no_change_gives_intervals_around_zero() -> None:
    p = planted(seed=2)
    sae, base = p["sae"], p["base"]
    noisy = base + 0.3 * torch.randn(base.shape, generator=p["g"])
    res = latent_shift(sae, base, noisy, k=32)  # no direction: no decomposition
    assert res.decomposition == {} and res.decoder_cos is None and res.direction is None
    covered = sum(r["finetuned"]["ci"][0] <= 0 <= r["finetuned"]["ci"][1] for r in res.top)
    assert covered >= 28  # ~95% of 32 latents (5 is off and stays near 0)


def test_latent_shift_errors() -> None:
    p = planted()
    sae, base = p["sae"], p["base"]
    bad = base.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(LatentlabError, match="finetuned activations contain NaN"):
        latent_shift(sae, base, bad)
    with pytest.raises(LatentlabError, match="differ in shape"):
        latent_shift(sae, base, base[:10])
    with pytest.raises(LatentlabError, match=r"shape \(40, 48\)"):
        latent_shift(sae, base, base[:, :48])
    with pytest.raises(LatentlabError, match="no prompts"):
        latent_shift(sae, base[:0], base[:0])
    with pytest.raises(LatentlabError, match="one prompt gives no interval"):
        latent_shift(sae, base[:1], base[:1])  # no CI from one prompt (it would be NaN in results.json)
    with pytest.raises(LatentlabError, match="k must be >= 1.*--k 1"):
        latent_shift(sae, base, base, k=0)
    with pytest.raises(LatentlabError, match="n_boot must be >= 100"):
        latent_shift(sae, base, base, n_boot=10)
    with pytest.raises(LatentlabError, match="not layer 3"):
        latent_shift(sae, base, base, layer=3)


# --------------------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------------------


def test_sae_plots_are_written(tmp_path: Path) -> None:
    p = planted()
    sae, dec, base = p["sae"], p["dec"], p["base"]
    res = latent_shift(sae, base, base + 1.5 * dec[5], dec[5], k=4, control_acts=base + dec[2])
    fig = plots.latent_shift_figure(res)
    assert [t.name for t in fig.data] == ["finetuned", "control", "finetuned - control"]
    assert fig.data[0].y[0].startswith("#5") or fig.data[0].y[0].startswith("#2")
    dfig = plots.shift_decomposition_figure(res)
    assert [t.name for t in dfig.data][:3] == ["top 4 latents", "other latents", "SAE error"]
    hist = plots.sae_direction_figure(direction_latents(make_sae(d_sae=64, orthonormal=False), dec[5], k=3))
    assert any("#" in (a.text or "") for a in hist.layout.annotations)
    for f, stem in ((fig, "a"), (dfig, "b"), (hist, "c")):
        written = plots.save_figure(f, tmp_path, stem)
        assert [w.name for w in written] == [f"{stem}.html"]


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


# --------------------------------------------------------------------------------------------
# Configs validate themselves; statistics come from latentlab.stats.
# --------------------------------------------------------------------------------------------


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


def test_command_configs_validate_themselves(tmp_path: Path) -> None:
    with pytest.raises(LatentlabError, match="k must be >= 1"):
        SAELatentsConfig(sae="s", direction="era", k=0)
    with pytest.raises(LatentlabError, match="n_random must be >= 20.*--n-random 20"):
        SAELatentsConfig(sae="s", direction="era", n_random=5)
    with pytest.raises(LatentlabError, match="unknown dtype"):
        SAELatentsConfig(sae="s", direction="era", dtype="float8")
    with pytest.raises(LatentlabError, match="n_boot must be >= 100"):
        SAEShiftConfig(finetuned=tmp_path, sae="s", n_boot=10)
    with pytest.raises(LatentlabError, match="k must be >= 1"):
        SAEShiftConfig(finetuned=tmp_path, sae="s", k=0)
    with pytest.raises(LatentlabError, match="no data"):
        SAETrainRunConfig(out=tmp_path, layer=1, data=[])
    with pytest.raises(LatentlabError, match="steps must be >= 1"):
        SAETrainRunConfig(out=tmp_path, layer=1, sae={"steps": 0})  # type: ignore[arg-type]
    from dataclasses import asdict

    cfg = SAETrainRunConfig(out=tmp_path, layer=1, sae=SAETrainConfig(d_sae=64))
    rec = asdict(cfg)  # what the manifest records
    assert rec["layer"] == 1 and rec["data"] == ["unrelated"] and rec["sae"]["d_sae"] == 64
    assert SAETrainRunConfig(**rec) == cfg
    assert asdict(SAEShiftConfig(finetuned=tmp_path, sae="s"))["control"] is None


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


def test_intervals_are_stats_percentile_intervals() -> None:
    from latentlab.stats import bootstrap_means

    p = planted(seed=4)
    sae, base, dec = p["sae"], p["base"], p["dec"]
    ft = base + 0.3 * torch.randn(base.shape, generator=p["g"]) + dec[3]
    res = latent_shift(sae, base, ft, k=3, seed=5, n_boot=200)
    with torch.no_grad():
        fa, fb = sae.encode(ft), sae.encode(base)
    order = [r["latent"] for r in res.top]
    means = bootstrap_means(fa[:, order] - fb[:, order], 200, 5)
    q = torch.quantile(means, torch.tensor([0.025, 0.975]), dim=0)  # the old inline interval
    for j, row in enumerate(res.top):
        assert row["finetuned"]["ci"] == pytest.approx((float(q[0, j]), float(q[1, j])), abs=1e-6)


def test_no_shift_gives_no_share_not_nan() -> None:
    p = planted(seed=5)
    sae, base = p["sae"], p["base"]
    res = latent_shift(sae, base, base.clone(), p["dec"][1], k=2, layer=LAYER)
    d = res.decomposition["finetuned"]
    assert d["projection"] == 0.0 and d["top_k_share"] is None
    json.dumps(res.to_dict(), allow_nan=False)
