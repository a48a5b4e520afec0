"""The dictionary of a finetune's difference (:mod:`latentlab.sae.dictionary`, ``latentlab diff --dictionary``)
on a tiny Gemma: synthetic differences along two known directions are split into latents that recover them,
a LoRA planted along the marker token's unembedding row is recovered by the top latent with |cos| near 1,
the control's dictionary is compared, the SAEs are saved, and bad flags fail with one error line first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from test_ablation import PROMPTS, const_direction, marker_unit, mlp_hidden, write_adapter

from latentlab.errors import LatentlabError
from latentlab.sae.dictionary import DifferenceSet, analyze_dictionary, latent_shares, train_difference_sae
from latentlab.sae.training import SAETrainConfig

SMALL = SAETrainConfig(expansion=4, k=2, steps=150, batch_size=64, lr=3e-3)


@pytest.fixture(scope="module")
def plants(trainable_gemma_dir: Path, load_tiny: Callable[..., Any],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finetune that writes along the marker's unembedding row at the last block (as tests/test_diff.py),
    and a control that writes along another, random direction."""
    from latentlab.activations import last_token_acts
    from latentlab.data import render_prompt

    root = tmp_path_factory.mktemp("dictionary")
    base = load_tiny(trainable_gemma_dir)
    last = base.n_layers - 1
    module = f"model.layers.{last}.mlp.down_proj"
    u = marker_unit(base)
    norm = float(last_token_acts(base, PROMPTS, [last]).norm(dim=-1).mean())
    hid, _ = mlp_hidden(base, [render_prompt(p, base.tokenizer) for p in PROMPTS])
    a = hid.mean(0) / hid.mean(0).norm() ** 2
    w = torch.randn(base.d_model, generator=torch.Generator().manual_seed(3))
    w = w / w.norm()
    ft = write_adapter(root / "marker", module, a, 0.5 * norm * u, trainable_gemma_dir)
    ctrl = write_adapter(root / "other", module, a, 0.5 * norm * w, trainable_gemma_dir)
    marker = const_direction(u, base.n_layers, "marker")
    marker.save(root / "marker-direction")  # writes marker-direction.safetensors + its sidecar
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    return {"base": base, "ft": ft, "ctrl": ctrl, "u": u, "w": w, "marker": root / "marker-direction.safetensors",
            "prompts": prompts, "dir": trainable_gemma_dir}


def synthetic(base: Any, u: torch.Tensor, v: torch.Tensor, n_prompts: int = 12, per: int = 20) -> DifferenceSet:
    """Differences along ``u`` on the first half of each prompt's tokens and along ``v`` on the rest."""
    g = torch.Generator().manual_seed(0)
    n = n_prompts * per
    c = torch.rand(n, generator=g) + 0.5
    first = (torch.arange(n) % per) < per // 2
    diffs = torch.where(first[:, None], c[:, None] * u, c[:, None] * v) + 0.01 * torch.randn(n, u.shape[0],
                                                                                              generator=g)
    ids = [[1] + [40 + (i + t) % 20 for t in range(per)] for i in range(n_prompts)]
    return DifferenceSet(0, diffs, torch.randn(n, u.shape[0], generator=g) * 5,
                         torch.arange(n) // per, torch.arange(n) % per + 1, ids, [f"p{i}" for i in range(n_prompts)])


def test_synthetic_differences_are_recovered_and_shares_add_up(plants: dict[str, Any]) -> None:
    base = plants["base"]
    u = plants["u"]
    v = torch.randn(base.d_model, generator=torch.Generator().manual_seed(9))
    v = v - (v @ u) * u
    v = v / v.norm()
    ds = synthetic(base, u, 2.0 * v)
    tr = train_difference_sae(ds, SMALL)
    assert float(tr.sae.b_dec.detach().abs().max()) == 0.0  # fixed at zero: the latents carry the difference
    sh = latent_shares(tr.sae, ds.diffs)
    assert float(sh["shares"].sum()) + sh["b_dec_share"] + sh["error_share"] == pytest.approx(1.0, abs=1e-5)
    res = analyze_dictionary(base, tr.sae, ds, directions={"u": u, "v": v}, n_latents=6, k=3)
    top = res["top_latents"]
    assert top[0]["share"] >= top[1]["share"] > 0
    assert res["latents_share"] > 0.95 and res["top_share"] > 0.95  # the two directions are the whole difference
    assert top[0]["directions"]["v"]["abs_cos"] > 0.95  # v carries 4x the squared norm of u
    assert top[0]["directions"]["v"]["random_percentile"] == 100.0
    best_u = max(r["directions"]["u"]["abs_cos"] for r in top)
    assert best_u > 0.95
    assert all(tok["position"] > 10 for tok in top[0]["top_tokens"])
    assert set(top[0]["logit_lens"]) == {"promoted", "suppressed"} and len(top[0]["logit_lens"]["promoted"]) == 3
    zero = DifferenceSet(0, torch.zeros(20, base.d_model), torch.zeros(20, base.d_model), torch.arange(20) // 2,
                         torch.arange(20) % 2, [[1, 2, 3]] * 10, ["x"] * 10)
    with pytest.raises(LatentlabError, match="does not change"):
        train_difference_sae(zero, SMALL)


def test_a_planted_lora_is_recovered_with_its_control(plants: dict[str, Any], tmp_path: Path) -> None:
    from latentlab.stages.diff import DiffConfig, run_diff

    cfg = DiffConfig(finetuned=plants["ft"], control=plants["ctrl"], model=str(plants["dir"]), device="cpu",
                     prompts=str(plants["prompts"]), out=tmp_path / "run", k=3, dictionary=True,
                     direction=[str(plants["marker"])], dict_k=2, dict_steps=150, dict_latents=3)
    res = run_diff(cfg, progress=False)
    d = res.dictionary
    assert d is not None and d["layer"] == plants["base"].n_layers - 1  # the only layer the LoRA moves
    assert d["layer_chosen_by"].startswith("largest shift")
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())["dictionary"]
    assert set(on_disk) >= {"layer", "finetuned", "control", "directions", "layer_chosen_by"}
    ft = on_disk["finetuned"]
    assert set(ft) >= {"top_latents", "latents_share", "error_share", "random_abs_cos", "sae", "control_match_chance"}
    top = ft["top_latents"][0]
    assert set(top) >= {"latent", "share", "top_tokens", "logit_lens", "directions", "control_match"}
    assert top["directions"]["marker"]["abs_cos"] > 0.95 and top["directions"]["marker"]["random_percentile"] == 100
    # a rank-1 difference is often split over near-duplicate latents (expansion 4): together they carry it
    assert ft["top_share"] > 0.8
    assert all(r["directions"]["marker"]["abs_cos"] > 0.9 for r in ft["top_latents"] if r["share"] > 0.1)
    assert top["logit_lens"]["promoted"][0]["token"] == "Z" or top["directions"]["marker"]["cos"] < 0
    # the control wrote along an unrelated direction: its best match is no better than chance-ish
    assert top["control_match"]["abs_cos"] < 0.6
    ctrl_top = on_disk["control"]["top_latents"][0]
    assert ctrl_top["directions"]["marker"]["abs_cos"] < 0.6
    for name in ("finetuned", "control"):
        folder = tmp_path / "run" / f"dictionary-{name}"
        assert {"cfg.json", "sae_weights.safetensors", "latentlab_sae.json"} <= {p.name for p in folder.iterdir()}
        side = json.loads((folder / "latentlab_sae.json").read_text())
        assert side["difference"] == f"{name} - base" and side["training"]["b_dec"] == "fixed at zero"
    assert "Dictionary of the difference" in (tmp_path / "run" / "diff.html").read_text()


def test_cli_bad_dictionary_inputs_fail_before_a_model_loads(
    plants: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    common = ["diff", "--finetuned", str(plants["ft"]), "--model", str(plants["dir"]), "--device", "cpu",
              "--prompts", str(plants["prompts"]), "--out", str(tmp_path / "bad")]
    cases = [
        (["--dictionary", "--dict-k", "0"], "--dict-k"),
        (["--dictionary", "--dict-expansion", "0"], "--dict-expansion"),
        (["--dictionary", "--direction", str(tmp_path / "nope.safetensors")], "nope"),
        (["--dictionary", "--direction", str(plants["marker"]), "--direction", str(plants["marker"])], "marker"),
        (["--direction", "era"], "--dictionary"),
        (["--dictionary", "--layer", "9", "--direction", str(plants["marker"])], "9"),  # checked once the base loads
        (["--dictionary", "--dict-k", "100000", "--direction", str(plants["marker"])], "--dict-k"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(monkeypatch, capsys, *common, *extra)
        assert_one_line_error(code, err, needle)
        assert not (tmp_path / "bad").exists()
