"""Fitted directions and probes are cached by what determines them, and reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from latentlab.directions import cache_key, fitted_direction


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    words = ["sat", "ran", "is", "saw", "big", "red", "old", "new", "hot", "wet", "dry", "fat"]
    lines = [json.dumps({"positive": f"the cat {w} zebra", "negative": f"the cat {w} table"}) for w in words]
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_second_fit_is_reused_and_equal(tiny_gemma: Any, pairs_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d1, r1, hit1 = fitted_direction(tiny_gemma, pairs_file, progress=False)
    calls = []
    monkeypatch.setattr("latentlab.directions.direction_and_probes", lambda *a, **k: calls.append(1))
    d2, r2, hit2 = fitted_direction(tiny_gemma, pairs_file, progress=False)
    assert (hit1, hit2) == (False, True) and not calls
    assert torch.equal(d1.vectors, d2.vectors) and r1.cv_acc == r2.cv_acc


def test_key_changes_with_what_changes_the_fit(tiny_gemma: Any, tiny_gemma_lora: Any, pairs_file: Path,
                                               tmp_path: Path) -> None:
    k = cache_key(tiny_gemma, pairs_file, [0, 1], "last", "mean_diff")
    assert k == cache_key(tiny_gemma, pairs_file, [0, 1], "last", "mean_diff")
    assert k != cache_key(tiny_gemma, pairs_file, [0, 1], "mean", "mean_diff")
    assert k != cache_key(tiny_gemma, pairs_file, [0, 1, 2], "last", "mean_diff")
    assert k != cache_key(tiny_gemma, pairs_file, [0, 1], "last", "pca")
    assert k != cache_key(tiny_gemma_lora, pairs_file, [0, 1], "last", "mean_diff")
    other = tmp_path / "other.jsonl"
    other.write_text(pairs_file.read_text().replace("zebra", "horse"))
    assert k != cache_key(tiny_gemma, other, [0, 1], "last", "mean_diff")


def test_refit_and_damaged_entries_fit_again(tiny_gemma: Any, pairs_file: Path) -> None:
    from latentlab.models import latentlab_home

    fitted_direction(tiny_gemma, pairs_file, progress=False)
    assert fitted_direction(tiny_gemma, pairs_file, refit=True, progress=False)[2] is False
    for entry in (latentlab_home() / "directions").iterdir():
        (entry / "direction.safetensors").write_bytes(b"broken")
    assert fitted_direction(tiny_gemma, pairs_file, progress=False)[2] is False
    assert fitted_direction(tiny_gemma, pairs_file, progress=False)[2] is True
