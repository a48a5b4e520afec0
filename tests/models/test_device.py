"""Device tests: run only where CUDA exists (``make gpu-check`` runs them); skipped everywhere else.

They check that the CPU-tested paths are unchanged on a GPU: collect equals the CPU result, the
KV-cached generation equals the cache-free path, adapters switch on one base, finetuning steps run
in bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")

TEXTS = ["the cat sat on the mat", "a ship on the sea", "x y z"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_collect_on_cuda_matches_cpu(tiny_gemma_dir: Path, dtype: str) -> None:
    import latentlab as ll

    cpu = ll.load_model(str(tiny_gemma_dir), device="cpu", dtype=dtype, progress=False)
    gpu = ll.load_model(str(tiny_gemma_dir), device="cuda", dtype=dtype, progress=False)
    assert gpu.info.device.startswith("cuda") and gpu.info.dtype == dtype
    a = ll.collect(cpu, TEXTS, "all", "mean", progress=False).acts
    b = ll.collect(gpu, TEXTS, "all", "mean", progress=False).acts
    tol = 1e-3 if dtype == "float32" else 5e-2
    assert (a - b).abs().max() <= tol * a.abs().max()


def test_default_dtype_on_cuda_is_bfloat16(tiny_gemma_dir: Path) -> None:
    import latentlab as ll

    assert ll.load_model(str(tiny_gemma_dir), device="cuda", progress=False).info.dtype == "bfloat16"


def test_generation_scoring_and_adapters_on_cuda(tiny_gemma_dir: Path, gemma_lora_dir: Path) -> None:
    import latentlab as ll
    from latentlab.data import BatteryItem
    from latentlab.scoring import score_conditions

    base = ll.load_model(str(tiny_gemma_dir), device="cuda", dtype="float32", progress=False)
    merged = ll.load_model(str(tiny_gemma_dir), adapter=gemma_lora_dir, device="cuda", dtype="float32",
                           progress=False)
    view = base.with_adapter(gemma_lora_dir)
    items = [BatteryItem("the dog saw a", " cat", " cot")]
    assert torch.allclose(score_conditions(view, items, [(None, 0.0)]), score_conditions(merged, items, [(None, 0.0)]),
                          atol=1e-4)
    out = ll.generate(base, ["Q: hello\nA:"], max_new_tokens=5)
    assert len(out) == 1 and isinstance(out[0][0], str)


def test_finetune_steps_on_cuda_in_bfloat16(trainable_gemma_dir: Path, tmp_path: Path,
                                            load_tiny: Callable[..., Any]) -> None:
    from latentlab.data import Chat
    from latentlab.finetune import FinetuneConfig, finetune

    chats = [Chat((("user", f"q{i}?"), ("assistant", "a b c"))) for i in range(8)]
    res = finetune(str(trainable_gemma_dir), chats, tmp_path / "ft", FinetuneConfig(max_steps=2, batch_size=4),
                   device="cuda", dtype="bfloat16", progress=False)
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
