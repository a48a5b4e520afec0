"""Model diffing on a tiny model: the logit lens of a planted shift, and per-token KL.

Uses the hand-written rank-1 LoRA of tests/test_ablation.py (it writes along the marker token's
unembedding row at the last block): the logit lens of the mean shift must put the marker on top.
A second plant fires only at marker-token positions: KL(base || finetune) must peak there.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ablation import MARKER, PROMPTS, marker_unit, mlp_hidden, write_adapter

from latentlab.diff import diff_html, diff_models
from latentlab.errors import LatentlabError
from latentlab.stages.diff import DiffConfig, run_diff

MARKED = ["the Z cat sat", "a dog ran Z far", "Z is here", "big red bus", "old man and Z dog", "see the sea"]


@pytest.fixture(scope="module")
def plants(trainable_gemma_dir: Path, load_tiny: Callable[..., Any],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from latentlab.activations import last_token_acts
    from latentlab.data import render_prompt

    root = tmp_path_factory.mktemp("diff")
    base = load_tiny(trainable_gemma_dir)
    module = f"model.layers.{base.n_layers - 1}.mlp.down_proj"
    u = marker_unit(base)
    norm = float(last_token_acts(base, PROMPTS, [base.n_layers - 1]).norm(dim=-1).mean())
    hid, _ = mlp_hidden(base, [render_prompt(p, base.tokenizer) for p in PROMPTS])
    a = hid.mean(0) / hid.mean(0).norm() ** 2
    shift = write_adapter(root / "shift", module, a, 5.0 * norm * u, trainable_gemma_dir)
    # marker-triggered: a reads the hidden pattern of marker positions, orthogonal to the others' mean
    texts = [render_prompt(p, base.tokenizer) for p in MARKED]
    hid, ids = mlp_hidden(base, texts)
    zid = base.tokenizer.convert_tokens_to_ids(MARKER)
    is_z = torch.tensor([t == zid for s in ids for t in s])
    m_other = hid[~is_z].mean(0)
    delta = hid[is_z].mean(0) - m_other
    delta = delta - (delta @ m_other) / (m_other @ m_other) * m_other
    trig = write_adapter(root / "trigger", module, delta / delta.norm() ** 2, 3.0 * norm * u, trainable_gemma_dir)
    return {"base": base, "shift": shift, "trigger": trig}


def test_logit_lens_of_a_planted_shift_recovers_the_marker(plants: dict[str, Any]) -> None:
    base = plants["base"]
    res = diff_models(base, plants["shift"], PROMPTS, control=plants["trigger"], k=5)
    assert set(res.logit_lens) == {"finetuned - base", "finetuned - control", "control - base"}
    last = res.logit_lens["finetuned - base"][-1]
    assert last["layer"] == base.n_layers - 1
    assert last["promoted"][0]["token"] == MARKER, last["promoted"]
    assert last["promoted"][0]["logit_change"] > 3 * abs(last["promoted"][1]["logit_change"]) or \
        last["promoted"][0]["logit_change"] > 1.0
    assert all(r["token"] != MARKER for r in last["suppressed"])
    # layers before the planted block are untouched
    assert all(r["shift_norm"] < 1e-4 for r in res.logit_lens["finetuned - base"][:-1])
    assert set(res.kl) == {"finetuned", "control", "finetuned vs control"}
    page = diff_html(res)
    assert page.startswith("<!doctype html>") and "Logit lens" in page


def test_kl_is_zero_for_base_vs_base_and_peaks_at_the_marker(plants: dict[str, Any]) -> None:
    base = plants["base"]
    same = diff_models(base, base, MARKED, k=3)
    assert same.kl["finetuned"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert max(same.kl["finetuned"]["per_prompt_max"]) == pytest.approx(0.0, abs=1e-5)
    assert all(r["shift_norm"] == 0 for r in same.logit_lens["finetuned - base"])
    res = diff_models(base, plants["trigger"], MARKED, k=20)
    kl = res.kl["finetuned"]
    top = kl["top_positions"]
    assert top[0]["token"] == MARKER, top[:3]
    n_z = sum(MARKER in p for p in MARKED)
    assert sum(r["token"] == MARKER for r in top[:n_z]) >= n_z - 1, top[:n_z]
    # every prompt with a marker peaks well above every prompt without one
    plain = [i for i, p in enumerate(MARKED) if MARKER not in p]
    marked = [i for i, p in enumerate(MARKED) if MARKER in p]
    assert min(kl["per_prompt_max"][i] for i in marked) > 2 * max(kl["per_prompt_max"][i] for i in plain)


def test_run_diff_writes_the_run_folder(plants: dict[str, Any], trainable_gemma_dir: Path, tmp_path: Path) -> None:
    import json

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:4]) + "\n")
    cfg = DiffConfig(finetuned=plants["shift"], out=tmp_path / "out", model=str(trainable_gemma_dir),
                     prompts=str(prompts), k=3, device="cpu")
    res = run_diff(cfg, progress=False)
    for f in ("results.json", "diff.html", "manifest.json"):
        assert (tmp_path / "out" / f).exists()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["n_prompts"] == 4
    assert res.logit_lens["finetuned - base"][-1]["promoted"][0]["token"] == MARKER
    with pytest.raises(LatentlabError, match="k"):
        DiffConfig(finetuned=plants["shift"], k=0)
    with pytest.raises(LatentlabError, match="does not exist"):
        DiffConfig(finetuned=tmp_path / "nope")
    with pytest.raises(LatentlabError, match="no prompts"):
        diff_models(plants["base"], plants["shift"], [])
