"""The README's results and the experiment summaries are functions of the committed run folders.

These read files only (no model): they fail when a number in the README, or a committed summary,
no longer follows from the results it cites (a hand edit, or results committed without
``make summaries``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXP = ROOT / "experiments"


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXP / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_results_follow_from_the_committed_summaries() -> None:
    r = subprocess.run([sys.executable, str(EXP / "readme_results.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, "README.md's results block differs from the summaries: run `make summaries`"


def test_ablation_summary_follows_from_its_run_folders() -> None:
    root = EXP / "results" / "ablate_birds"
    if not (root / "summary.json").is_file():
        pytest.skip("no committed ablation results")
    summary, md = _module("summarize_ablation").summarize(root)
    assert json.loads(json.dumps(summary)) == json.loads((root / "summary.json").read_text())
    assert md == (root / "summary.md").read_text()

