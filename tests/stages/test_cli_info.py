"""``latentlab models`` (names never cut, piped or in 80 columns; ``--json``) and ``latentlab --version``."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
from cli_helpers import run_cli
from rich.console import Console

import latentlab
from latentlab.cli import generate

LONG = "gemma-3-27b-it-qat-q4-0-unquantized (default)"  # 45 characters: fits 80 columns whole


def _rows() -> list[dict]:
    return [
        {"name": LONG, "installed": True, "status": "package missing: pip install some-package-with-a-long-name",
         "gguf_mb": 253, "cache_mb": 0, "chat": False,
         "description": "A model whose description is long enough to need wrapping in any ordinary terminal"},
        {"name": "gemma-3-270m", "installed": True, "status": "ready", "gguf_mb": 98, "cache_mb": 1000,
         "chat": True, "description": "short"},
    ]


def test_models_piped_at_80_columns_never_cuts_names(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("latentlab.models.list_models", _rows)
    monkeypatch.setattr(generate, "out_console", Console(width=80))  # as created under COLUMNS=80
    code, out, err = run_cli(monkeypatch, capsys, "models")
    assert code == 0, err
    assert LONG in out and "…" not in out  # whole, on one line
    assert "package missing: pip install some-package-with-a-long-name" in out  # piped: no wrapping at all
    assert "A model whose description is long enough to need wrapping in any ordinary terminal" in out


@pytest.mark.parametrize("width", [80, 40])
def test_models_in_a_narrow_terminal_never_cuts_names(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], width: int) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("latentlab.models.list_models", _rows)
    monkeypatch.setattr(generate, "out_console", Console(file=buf, force_terminal=True, width=width, no_color=True))
    code, _, err = run_cli(monkeypatch, capsys, "models")
    assert code == 0, err
    text = re.sub(r"\x1b\[[0-9;]*m", "", buf.getvalue())  # styles (bold headers) are not width
    assert "…" not in text
    assert any(LONG in line for line in text.splitlines())  # the name on one line, whole
    if width == 80:
        assert max(len(line) for line in text.splitlines()) <= 80  # the prose columns wrap instead


def test_models_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from latentlab.models import list_models

    code, out, err = run_cli(monkeypatch, capsys, "models", "--json")
    assert code == 0, err
    rows = json.loads(out)  # nothing but JSON on stdout
    assert rows == json.loads(json.dumps(list_models()))
    assert {r["name"] for r in rows} >= {"gemma-3-270m (default)"}
    assert set(rows[0]) >= {"name", "installed", "status", "gguf_mb", "cache_mb", "chat", "description"}


def test_models_piped_subprocess_columns_80() -> None:
    """The real thing: ``COLUMNS=80 latentlab models | cat`` keeps every built-in name whole."""
    env = {**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "latentlab.cli", "models"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    for name in ("gemma-3-270m (default)", "smollm2-135m-instruct"):
        assert name in proc.stdout
    assert "…" not in proc.stdout


def test_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(monkeypatch, capsys, "--version")
    assert (code, out, err) == (0, f"latentlab {latentlab.__version__}\n", "")
