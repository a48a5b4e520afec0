"""One base in memory: LoRA adapters switched on by hooks equal a peft-merged copy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_close_rel

from latentlab.activations import collect
from latentlab.data import BatteryItem
from latentlab.errors import LatentlabError
from latentlab.scoring import score_conditions

TEXTS = ["the cat sat on the mat", "a ship on the sea", "x"]
ITEMS = [BatteryItem("the dog saw a", " cat", " cot"), BatteryItem("by the sea", " ship", " shop")]


def test_view_equals_merged_copy_and_base_is_untouched(
    tiny_gemma_dir: Path, gemma_lora_dir: Path, load_tiny: Callable[..., Any]
) -> None:
    base = load_tiny(tiny_gemma_dir)
    merged = load_tiny(tiny_gemma_dir, adapter=gemma_lora_dir)
    before = collect(base, TEXTS, "all", "mean", progress=False).acts
    view = base.with_adapter(gemma_lora_dir)
    assert view.info.adapter == str(gemma_lora_dir) and view.info.adapter_fingerprint == merged.info.adapter_fingerprint
    a = collect(view, TEXTS, "all", "mean", progress=False).acts
    b = collect(merged, TEXTS, "all", "mean", progress=False).acts
    assert_close_rel(a, b, 1e-5)
    assert (a - before).abs().max() > 1e-3  # the adapter really changes activations
    after = collect(base, TEXTS, "all", "mean", progress=False).acts
    assert torch.equal(before, after)  # the base's own passes stay exactly the base
    sa = score_conditions(view, ITEMS, [(None, 0.0)])
    sb = score_conditions(merged, ITEMS, [(None, 0.0)])
    assert torch.allclose(sa, sb, atol=1e-5)


def test_two_adapters_on_one_base(tiny_gemma_dir: Path, gemma_lora_dir: Path, tmp_path: Path,
                                  load_tiny: Callable[..., Any]) -> None:
    from conftest import make_lora_adapter

    other = make_lora_adapter(tiny_gemma_dir, tmp_path / "other", seed=99, targets=("o_proj", "down_proj"))
    base = load_tiny(tiny_gemma_dir)
    v1, v2 = base.with_adapter(gemma_lora_dir, "one"), base.with_adapter(other, "two")
    a1 = collect(v1, TEXTS, [3], "last", progress=False).acts
    a2 = collect(v2, TEXTS, [3], "last", progress=False).acts
    m2 = collect(load_tiny(tiny_gemma_dir, adapter=other), TEXTS, [3], "last", progress=False).acts
    assert_close_rel(a2, m2, 1e-5)
    assert (a1 - a2).abs().max() > 1e-3
    assert_close_rel(collect(v1, TEXTS, [3], "last", progress=False).acts, a1, 1e-7)


def test_view_refuses_stacking_and_foreign_adapters(tiny_gemma_dir: Path, gemma_lora_dir: Path,
                                                    llama_lora_dir: Path, tmp_path: Path,
                                                    load_tiny: Callable[..., Any]) -> None:
    base = load_tiny(tiny_gemma_dir)
    view = base.with_adapter(gemma_lora_dir)
    with pytest.raises(LatentlabError, match="already carries"):
        view.with_adapter(gemma_lora_dir)
    with pytest.raises(LatentlabError, match="does not exist"):
        base.with_adapter(tmp_path / "nope")
    # the llama adapter names modules the gemma does have (q_proj...) but of other shapes,
    # or modules it lacks: either way a clear error, never a silent wrong result
    with pytest.raises((LatentlabError, RuntimeError)):
        v = base.with_adapter(llama_lora_dir)
        collect(v, TEXTS, [0], "last", progress=False)


def test_missing_target_modules_are_named(tiny_gemma_dir: Path, gemma_lora_dir: Path, tmp_path: Path,
                                          load_tiny: Callable[..., Any]) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(gemma_lora_dir, bad)
    t = load_file(str(bad / "adapter_model.safetensors"))
    t = {k.replace("q_proj", "qkv_proj"): v for k, v in t.items()}
    save_file(t, str(bad / "adapter_model.safetensors"))
    # hooks cannot serve it, so it falls back to peft's merge, which refuses it with one clear line
    with pytest.warns(UserWarning, match="qkv_proj"), pytest.raises(LatentlabError, match="does not fit"):
        load_tiny(tiny_gemma_dir).with_adapter(bad)


# --- amplification: a factor on the adapter's difference ------------------------------------------


def _logits(m: Any, texts: list[str] = TEXTS) -> torch.Tensor:
    """Next-token logits at every position of each text (one text a pass: no padding in the comparison)."""
    out = []
    with torch.inference_mode(), m.forward_context():
        for t in texts:
            ids = m.tokenizer(t, return_tensors="pt").input_ids
            out.append(m.bridge(ids, return_type="logits")[0].float())
    return torch.cat(out)


def test_scale_zero_is_the_base_and_one_is_today(tiny_gemma_dir: Path, gemma_lora_dir: Path,
                                                 load_tiny: Callable[..., Any]) -> None:
    base = load_tiny(tiny_gemma_dir)
    l_base = _logits(base)
    today = base.with_adapter(gemma_lora_dir)
    l_today = _logits(today)
    zero = base.with_adapter(gemma_lora_dir, scale=0)
    one = base.with_adapter(gemma_lora_dir, scale=1.0)
    assert torch.equal(_logits(zero), l_base)  # the base, bit for bit
    assert torch.equal(_logits(one), l_today)  # as trained, bit for bit
    assert (l_today - l_base).abs().max() > 1e-3
    assert zero.adapter_scale == 0 and zero.info.extra == {"adapter_scale": 0.0}
    assert today.info.extra == {} and today.info.to_dict() == one.info.to_dict()  # records unchanged at 1
    assert torch.equal(_logits(base), l_base)  # views at any factor leave the base alone
    from latentlab.directions import cache_key

    keys = {cache_key(v, "era", [0], "last", "mean_diff") for v in (today, one, zero)}
    assert len(keys) == 2  # a fitted direction of an amplified finetune never reuses the as-trained one


def test_scale_two_doubles_the_difference_to_first_order(tiny_gemma_dir: Path, tmp_path: Path,
                                                         load_tiny: Callable[..., Any]) -> None:
    from conftest import make_lora_adapter

    small = make_lora_adapter(tiny_gemma_dir, tmp_path / "small", seed=5, std=1e-3)
    base = load_tiny(tiny_gemma_dir)
    l0 = _logits(base)
    d1 = _logits(base.with_adapter(small)) - l0
    d2 = _logits(base.with_adapter(small, scale=2)) - l0
    dh = _logits(base.with_adapter(small, scale=0.5)) - l0
    assert d1.norm() > 1e-3
    # the linear prediction holds up to the second-order term (relative size ~ the difference's norm)
    assert (d2 - 2 * d1).norm() / (2 * d1).norm() < 0.05
    assert (dh - 0.5 * d1).norm() / (0.5 * d1).norm() < 0.05
    assert d2.norm() > 1.8 * d1.norm()


def test_hooked_and_merged_amplification_agree(tiny_gemma_dir: Path, gemma_lora_dir: Path,
                                               load_tiny: Callable[..., Any]) -> None:
    import latentlab

    base = load_tiny(tiny_gemma_dir)
    for f in (0.5, 2.0):
        merged = latentlab.load_model(str(tiny_gemma_dir), adapter=gemma_lora_dir, adapter_scale=f, device="cpu",
                                      progress=False)
        assert merged.adapter_scale == f and merged.info.extra == {"adapter_scale": f}
        assert_close_rel(_logits(base.with_adapter(gemma_lora_dir, scale=f)), _logits(merged), 1e-5)


def test_bad_scales_are_refused(tiny_gemma_dir: Path, gemma_lora_dir: Path, load_tiny: Callable[..., Any]) -> None:
    import latentlab

    base = load_tiny(tiny_gemma_dir)
    for bad in (-1, float("nan"), float("inf"), "x"):
        with pytest.raises(LatentlabError, match="scale"):
            base.with_adapter(gemma_lora_dir, scale=bad)
    with pytest.raises(LatentlabError, match="without an adapter"):
        latentlab.load_model(str(tiny_gemma_dir), adapter_scale=2, device="cpu", progress=False)


def test_fused_family_scales_its_merged_copy(tmp_path: Path, load_tiny: Callable[..., Any]) -> None:
    """GPT-2's fused c_attn cannot be hooked: the view is a merged copy, its difference scaled before the merge
    (the same as merging an adapter whose lora_B was multiplied on disk)."""
    import shutil

    from conftest import make_lora_adapter, save_tiny_family
    from safetensors.torch import load_file, save_file

    gpt2 = save_tiny_family(tmp_path / "gpt2", "gpt2", seed=3, chat_template=None)
    lora = make_lora_adapter(gpt2, tmp_path / "lora", seed=4, targets=("c_attn",), std=0.2)
    doubled = tmp_path / "doubled"
    shutil.copytree(lora, doubled)
    t = load_file(str(doubled / "adapter_model.safetensors"))
    save_file({k: v * 2 if "lora_B" in k else v for k, v in t.items()}, str(doubled / "adapter_model.safetensors"))
    base = load_tiny(gpt2)
    l_base = _logits(base)
    with pytest.warns(UserWarning, match="merging"):
        zero, one, two = (base.with_adapter(lora, scale=f) for f in (0, 1, 2))
    assert torch.equal(_logits(zero), l_base)
    assert torch.equal(_logits(one), _logits(load_tiny(gpt2, adapter=lora)))
    assert two.adapter_scale == 2 and two.info.extra == {"adapter_scale": 2.0}
    assert_close_rel(_logits(two), _logits(load_tiny(gpt2, adapter=doubled)), 1e-5)
    assert (_logits(two) - l_base).abs().max() > 1e-3
