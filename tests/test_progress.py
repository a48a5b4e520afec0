"""latentlab.progress: a tqdm bar in a terminal; a few plain lines in a pipe or a CI log."""

from __future__ import annotations

import sys
from typing import Any

import pytest

import latentlab.progress
from latentlab.progress import PlainProgress, progress


def _lines(err: str) -> list[str]:
    assert "\r" not in err  # no carriage-return redraws
    return [ln for ln in err.splitlines() if ln.strip()]


def test_pipe_prints_a_few_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    bar = progress(total=1000, desc="collect tiny", unit="tok")  # capsys' stderr is no terminal
    assert isinstance(bar, PlainProgress)
    for i in range(1000):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    bar.close()
    bar.close()  # a second close prints nothing
    lines = _lines(capsys.readouterr().err)
    assert 3 <= len(lines) <= 6, lines
    assert lines[0] == "collect tiny: started, 1000 tok"
    assert any("(50%)" in ln for ln in lines)
    assert lines[-1].startswith("collect tiny: done, 1000 tok in ") and "tok/s" in lines[-1]
    assert "loss=0.001" in lines[-1]


def test_pipe_iterable_context_manager_disable_and_resume(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(progress(range(7), desc="items")) == list(range(7))
    lines = _lines(capsys.readouterr().err)
    assert lines[0] == "items: started, 7 it" and lines[-1].startswith("items: done, 7 it in ")
    with progress(total=4, desc="q", disable=True) as bar:
        bar.update(4)
        bar.set_postfix_str("x")
    assert capsys.readouterr().err == ""
    with pytest.raises(RuntimeError), progress(total=10, desc="ft", unit="step", initial=6) as bar:
        bar.update(2)
        raise RuntimeError("interrupted")
    lines = _lines(capsys.readouterr().err)
    assert lines[0] == "ft: resumed at 6/10 step" and lines[-1].startswith("ft: stopped at 8/10 step in ")


def test_no_total_prints_every_interval(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with progress(desc="stream") as bar:
        for _ in range(100):
            bar.update()
    assert len(_lines(capsys.readouterr().err)) == 2  # start and done: no total, no interval passed
    monkeypatch.setattr(latentlab.progress, "INTERVAL", 0.0)
    with progress(desc="stream") as bar:
        bar.update(3)
    assert "stream: 3 it, " in capsys.readouterr().err


def test_terminal_gets_tqdm(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tqdm.std import tqdm

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress(total=5, desc="t", unit="seq")
    assert isinstance(bar, tqdm) and bar.total == 5 and bar.unit == "seq"
    bar.update(5)
    bar.set_postfix_str("ok")
    bar.close()
    assert "\r" in capsys.readouterr().err  # the bar redraws in place
    assert isinstance(progress(range(3), tty=True), tqdm)
    assert isinstance(progress(range(3), tty=False), PlainProgress)


def test_collect_in_a_pipe_writes_plain_lines(tiny_gemma: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from latentlab.activations import collect

    collect(tiny_gemma, [f"text number {i}" for i in range(40)], layers=[0], batch_size=1, progress=True)
    lines = _lines(capsys.readouterr().err)
    assert 2 <= len(lines) <= 6 and lines[0].startswith("collect tiny-gemma: started"), lines
    assert lines[-1].startswith("collect tiny-gemma: done,")
