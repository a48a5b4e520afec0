"""Patchscope of a finetune's shift on a tiny Gemma: the vector lands exactly at the placeholder, a zero
vector changes nothing, a planted one changes what the model says, and the random control runs.

The planted finetune is the hand-written rank-1 LoRA of tests/test_diff.py (tests/test_ablation.py's
``write_adapter``): it writes along the marker token's unembedding row at the first block, so the
shift is non-zero from layer 0 on and the later layers can read it from the placeholder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ablation import PROMPTS, marker_unit, write_adapter

from latentlab.activations import Example, encode, pad_batch, pad_id_of, run_resid
from latentlab.diff import diff_html, diff_models
from latentlab.errors import LatentlabError
from latentlab.interventions import Steer, condition_hooks
from latentlab.patchscope import IDENTITY_PROMPT, RANDOM_LABEL, patchscope, placeholder_offset
from latentlab.stages import diff as diff_stage


@pytest.fixture(scope="module")
def planted(trainable_gemma_dir: Path, load_tiny: Callable[..., Any],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from latentlab.activations import last_token_acts

    base = load_tiny(trainable_gemma_dir)
    u = marker_unit(base)
    norm = float(last_token_acts(base, PROMPTS, [0]).norm(dim=-1).mean())
    a = torch.randn(128, generator=torch.Generator().manual_seed(0))  # down_proj input width (intermediate)
    a = a / a.norm() * 4.0
    ad = write_adapter(tmp_path_factory.mktemp("patchscope") / "plant", "model.layers.0.mlp.down_proj", a,
                       norm * u, trainable_gemma_dir)
    return {"base": base, "adapter": ad, "u": u}


def test_the_vector_lands_at_the_placeholder_only(planted: dict[str, Any]) -> None:
    base = planted["base"]
    at = placeholder_offset(base, IDENTITY_PROMPT)
    ids = encode(base, [Example(IDENTITY_PROMPT)]).ids[0]
    p = len(ids) - 1 + at
    assert base.tokenizer.decode([ids[p]]) == "?"
    v = torch.randn(base.d_model, generator=torch.Generator().manual_seed(1))
    layer = 1
    tok, mask = pad_batch([ids, ids], pad_id_of(base), base.device)
    conds = [(None, 0.0), (Steer({layer: v}, at=at), 1.0)]
    hooks = condition_hooks(conds, [0, 1], torch.full((2,), len(ids) - 1), base.device)
    h = run_resid(base, tok, mask, [layer], extra_hooks=hooks)[layer]
    diff = h[1] - h[0]
    assert torch.allclose(diff[p], v, atol=1e-4)
    others = torch.cat([diff[:p], diff[p + 1:]])
    assert float(others.abs().max()) == 0.0


def test_zero_vector_changes_nothing_and_a_planted_one_does(planted: dict[str, Any]) -> None:
    base, u = planted["base"], planted["u"]
    layers = [0, 1, 2]
    norms = torch.tensor([60.0, 60.0, 60.0])
    shifts = {"zero": torch.zeros(3, base.d_model), "marker": u[None].repeat(3, 1) * 1e-3}
    ps = patchscope(base, shifts, layers, norms, k=5, max_new_tokens=4, seed=3)
    un = ps["unpatched"]
    for r in ps["readings"]["zero"]:
        assert r["vector_norm"] == 0 and r["kl_from_unpatched"] == pytest.approx(0.0, abs=1e-6)
        assert [t["token_id"] for t in r["top"]] == [t["token_id"] for t in un["top"]]
        assert r["continuation"] == un["continuation"]
    for r in ps["readings"]["marker"]:  # scaled up to the layer's norm, whatever the shift's own size
        assert r["vector_norm"] == pytest.approx(60.0, rel=1e-4)
        assert r["shift_norm"] == pytest.approx(1e-3, rel=1e-3)
    assert max(r["kl_from_unpatched"] for r in ps["readings"]["marker"]) > 3e-3
    rand = ps["readings"][RANDOM_LABEL]
    assert [r["layer"] for r in rand] == layers and all(r["shift_norm"] is None for r in rand)
    assert all(r["vector_norm"] == pytest.approx(60.0, rel=1e-4) for r in rand)
    again = patchscope(base, shifts, layers, norms, k=5, max_new_tokens=4, seed=3)
    assert again["readings"][RANDOM_LABEL] == rand  # seeded
    with pytest.raises(LatentlabError, match="placeholder"):
        patchscope(base, shifts, layers, norms, prompt="no placeholder here")
    with pytest.raises(LatentlabError, match="shape"):
        patchscope(base, {"bad": torch.zeros(2, base.d_model)}, layers, norms)


def test_diff_models_reads_its_own_shifts(planted: dict[str, Any]) -> None:
    base = planted["base"]
    same = diff_models(base, base, PROMPTS[:4], k=3, patchscope=True, patchscope_tokens=3)
    assert same.patchscope is not None
    for r in same.patchscope["readings"]["finetuned - base"]:
        assert r["shift_norm"] == 0 and r["kl_from_unpatched"] == pytest.approx(0.0, abs=1e-6)
    res = diff_models(base, planted["adapter"], PROMPTS[:4], k=3, patchscope=True, patchscope_tokens=3)
    ps = res.patchscope
    assert ps is not None and set(ps["readings"]) == {"finetuned - base", RANDOM_LABEL}
    rows = ps["readings"]["finetuned - base"]
    assert [r["layer"] for r in rows] == res.layers
    for r, lens in zip(rows, res.logit_lens["finetuned - base"]):  # the logit lens's shifts, not recomputed
        assert r["shift_norm"] == pytest.approx(lens["shift_norm"], rel=1e-5)
        assert r["vector_norm"] == pytest.approx(res.meta["resid_norm"][res.layers.index(r["layer"])], rel=1e-4)
    assert rows[0]["kl_from_unpatched"] > 1e-3
    assert rows[-1]["kl_from_unpatched"] == pytest.approx(0.0, abs=1e-6)  # no later layer reads the last one
    d = res.to_dict()
    assert "patchscope" in d and "dictionary" not in d
    assert "Patchscope" in diff_html(res)


def test_the_stage_default_prompt_is_the_library_one() -> None:
    assert diff_stage.IDENTITY_PROMPT == IDENTITY_PROMPT


def test_cli_diff_patchscope_writes_it_beside_the_logit_lens(
    planted: dict[str, Any], trainable_gemma_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from cli_helpers import assert_one_line_error, run_cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:3]) + "\n")
    common = ["diff", "--finetuned", str(planted["adapter"]), "--model", str(trainable_gemma_dir), "--device", "cpu",
              "--prompts", str(prompts), "--k", "3"]
    code, out, err = run_cli(monkeypatch, capsys, *common, "--patchscope", "--patchscope-tokens", "2",
                             "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "patchscope" in out and RANDOM_LABEL in out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["patchscope"]["readings"]) == {"finetuned - base", RANDOM_LABEL}
    assert res["patchscope"]["prompt"] == IDENTITY_PROMPT and "logit_lens" in res
    assert "Patchscope" in (tmp_path / "run" / "diff.html").read_text()
    for bad, needle in [(["--patchscope-prompt", "no placeholder"], "placeholder"),
                        (["--patchscope-tokens", "0"], "patchscope"),
                        (["--layer", "1"], "--dictionary")]:
        code, _, err = run_cli(monkeypatch, capsys, *common, "--patchscope", *bad, "--out", str(tmp_path / "bad"))
        assert_one_line_error(code, err, needle)
        assert not (tmp_path / "bad").exists()
