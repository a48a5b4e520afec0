"""Plots: HTML always (sharing one plotly.min.js per folder), PNG when possible, one stderr line when not."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import pytest
import torch

from latentlab import plots
from latentlab.probes import ProbeReport
from latentlab.steering import SweepResult


@pytest.fixture(autouse=True)
def fresh_png_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as if no PNG export had been tried in this process."""
    monkeypatch.setitem(plots._PNG_STATE, "ok", None)
    monkeypatch.setitem(plots._PNG_STATE, "why", "")


def small_figure() -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1, 2], y=[0.2, 0.5, 0.9], name="line"))


def png_fails(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every PNG export fail the way kaleido does without a Chromium; returns the attempts."""
    attempts: list[str] = []

    def write_image(self: go.Figure, path: str, **kw: Any) -> None:
        attempts.append(path)
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nsecond line of the error")

    monkeypatch.setattr(go.Figure, "write_image", write_image)
    return attempts


def test_html_and_shared_plotly_js(tmp_path: Path) -> None:
    out = tmp_path / "run" / "plots"  # created on demand
    written = plots.save_figure(small_figure(), out, "first", png=False)
    assert written == [out / "first.html"]
    html = (out / "first.html").read_text(encoding="utf-8")
    assert "<html>" in html and 'src="plotly.min.js"' in html and '"line"' in html
    js = out / "plotly.min.js"
    assert js.exists() and js.stat().st_size > 100_000  # the library itself, for offline viewing
    plots.save_figure(small_figure(), out, "second", png=False)
    assert sorted(p.name for p in out.iterdir()) == ["first.html", "plotly.min.js", "second.html"]
    assert plots.png_available() is None  # png=False never tries


def test_png_failure_keeps_html_and_says_so_once_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without Chromium: one plain stderr line (not a warning, which the CLI filters), HTML only."""
    attempts = png_fails(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the CLI does without --debug: the message still shows
        written = plots.save_figure(small_figure(), tmp_path, "a")
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "PNG plots skipped" in lines[0] and "Chrome" in lines[0] and "second line" not in lines[0]
    assert "make png" in lines[0] and "apt-get install chromium" in lines[0] and "HTML plots are written" in lines[0]
    assert written == [tmp_path / "a.html"] and (tmp_path / "a.html").exists()
    assert not (tmp_path / "a.png").exists()
    assert plots.png_available() is False and len(attempts) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second figure: no warning, no new attempt, no new message
        assert plots.save_figure(small_figure(), tmp_path, "b") == [tmp_path / "b.html"]
    assert len(attempts) == 1 and capsys.readouterr().err == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", "plotly.min.js"]  # no temp files


def test_plotly_js_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted first plot leaves no plotly.min.js at all (never a truncated one), and a
    truncated bundle left by an older version is replaced by a whole one."""
    from latentlab import io as llio

    def dying_replace(src: str, dst: str) -> None:
        raise KeyboardInterrupt  # Ctrl-C just before the bundle is renamed into place

    monkeypatch.setattr(llio.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        plots.save_figure(small_figure(), tmp_path, "first", png=False)
    assert list(tmp_path.iterdir()) == []  # no bundle, no temp file, no HTML without its bundle
    monkeypatch.undo()
    monkeypatch.setitem(plots._PNG_STATE, "ok", None)

    (tmp_path / "plotly.min.js").write_text("/* truncated by a killed run */", encoding="utf-8")
    plots.save_figure(small_figure(), tmp_path, "first", png=False)
    js = (tmp_path / "plotly.min.js").read_bytes()
    assert js == plots._plotly_js() and len(js) > 100_000
    mtime = (tmp_path / "plotly.min.js").stat().st_mtime_ns
    plots.save_figure(small_figure(), tmp_path, "second", png=False)
    assert (tmp_path / "plotly.min.js").stat().st_mtime_ns == mtime  # a whole bundle is left alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.html", "plotly.min.js", "second.html"]


def test_png_written_when_export_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def write_image(self: go.Figure, path: str, **kw: Any) -> None:
        assert kw.get("format") == "png"
        Path(path).write_bytes(b"\x89PNG fake")

    monkeypatch.setattr(go.Figure, "write_image", write_image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = plots.save_figure(small_figure(), tmp_path, "fig")
    assert written == [tmp_path / "fig.html", tmp_path / "fig.png"]
    assert (tmp_path / "fig.png").read_bytes() == b"\x89PNG fake" and plots.png_available() is True


# --------------------------------------------------------------------------------------------
# Figure builders on small fake results.
# --------------------------------------------------------------------------------------------


def fake_report(with_test: bool) -> ProbeReport:
    layers = [0, 1, 2, 3]
    cv = [0.55, 0.7, 0.9, 0.85]
    test = [0.5, 0.75, 0.95, 0.8] if with_test else [None] * 4
    ci = [(a - 0.1, min(1.0, a + 0.1)) for a in cv]
    tci = [(a - 0.1, min(1.0, a + 0.1)) for a in test] if with_test else [None] * 4  # type: ignore[operator]
    return ProbeReport(layers, cv, ci, test, tci, 20, 5 if with_test else 0, meta={"folds": 5})


def fake_sweep(n_random: int) -> SweepResult:
    g = torch.Generator().manual_seed(0)
    coeffs = [-1.0, 0.0, 1.0]
    scores = torch.stack([torch.rand(12, generator=g) * 0.3 + 0.35 * k for k in range(3)])
    random_scores = torch.rand(n_random, 3, 12, generator=g)
    return SweepResult(coeffs, [6], scores, random_scores, {"direction": "era"})


def trace_names(fig: go.Figure) -> list[str]:
    return [t.name for t in fig.data if t.showlegend is not False]


@pytest.mark.parametrize("with_test", [True, False])
def test_probe_accuracy_figure(with_test: bool, tmp_path: Path) -> None:
    fig = plots.probe_accuracy_figure(fake_report(with_test), "probe test")
    assert fig.layout.title.text == "probe test"
    names = trace_names(fig)
    assert "5-fold CV" in names and ("held-out test split" in names) == with_test
    cv_line = next(t for t in fig.data if t.name == "5-fold CV")
    assert list(cv_line.x) == [0, 1, 2, 3] and list(cv_line.y) == [0.55, 0.7, 0.9, 0.85]
    assert plots.save_figure(fig, tmp_path, "probe", png=False)[0].exists()


@pytest.mark.parametrize("n_random", [1, 0])
def test_steering_figure(n_random: int, tmp_path: Path) -> None:
    result = fake_sweep(n_random)
    fig = plots.steering_figure(result)
    assert "layer 6" in fig.layout.title.text
    names = trace_names(fig)
    assert "era direction" in names and ("norm-matched random direction" in names) == (n_random > 0)
    line = next(t for t in fig.data if t.name == "era direction")
    assert list(line.x) == [-1.0, 0.0, 1.0]
    assert list(line.y) == pytest.approx([float(s.mean()) for s in result.scores])
    band = fig.data[0]  # the CI band of the direction: hi then lo reversed
    assert band.fill == "toself" and len(band.x) == 6
    assert plots.save_figure(fig, tmp_path, "steering", png=False)[0].exists()


@pytest.mark.parametrize("probe_acc", [[0.7, 0.9, 0.8], None])
def test_layer_screen_figure(probe_acc: list[float] | None, tmp_path: Path) -> None:
    fig = plots.layer_screen_figure([4, 8, 12], [0.05, 0.3, 0.2], probe_acc, chosen=8)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(bars) == 1 and list(bars[0].x) == [4, 8, 12] and list(bars[0].y) == [0.05, 0.3, 0.2]
    assert (len(fig.data) == 2) == (probe_acc is not None)
    assert any("chosen: 8" in (a.text or "") for a in fig.layout.annotations)
    assert plots.save_figure(fig, tmp_path, "screen", png=False)[0].exists()


def test_real_export_never_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With the real kaleido: a PNG where a Chromium is found, otherwise HTML plus one stderr line; never an error."""
    written = plots.save_figure(small_figure(), tmp_path, "real")
    err = capsys.readouterr().err
    assert written[0] == tmp_path / "real.html" and written[0].exists()
    if plots.png_available():
        assert written == [tmp_path / "real.html", tmp_path / "real.png"]
        assert (tmp_path / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert written == [tmp_path / "real.html"]
        assert err.count("PNG plots skipped") == 1 and "make png" in err
