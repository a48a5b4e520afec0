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
