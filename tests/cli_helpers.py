"""Shared helpers for the CLI tests: run ``latentlab`` in-process and check one-line errors."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest

from latentlab.cli import main


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``latentlab ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["latentlab", *args])
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: keep cells on one line
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_quietly(mp: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """run_cli for module-scoped fixtures, which cannot use the function-scoped capsys."""
    mp.setattr(sys, "argv", ["latentlab", *args])
    mp.setenv("COLUMNS", "200")
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            main()
            code = 0
        except SystemExit as ex:
            code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    return code, o.getvalue(), e.getvalue()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and exactly one ``error: ...`` line on stderr, containing every needle."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err, lines[0]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
