"""``latentlab export`` / ``latentlab import``: GGUF out and back, run folders, one-line errors (no model loads)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from latentlab.directions import Direction

D = 12


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    d = Direction(torch.randn(4, D, generator=g), [0, 1, 2, 3], torch.tensor([1.0, 2.0, 4.0, 8.0]), "era")
    return d.save(tmp_path / "run" / "direction")


def test_export_then_import(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], saved: Path, tmp_path: Path
) -> None:
    out = tmp_path / "era.gguf"
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "export",
        "--direction",
        str(saved),
        "--format",
        "gguf",
        "--layers",
        "1-3",
        "--out",
        str(out),
        "--scale",
        "resid_norm",
    )
    assert code == 0, err
    assert "direction.N" in stdout and str(out) in stdout.replace("\n", "")
    reader = gguf.GGUFReader(str(out))
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2", "direction.3"]
    d = Direction.load(saved)
    np.testing.assert_allclose(np.asarray(reader.tensors[2].data), (d.unit(3) * 8.0).numpy(), rtol=1e-6)

    folder = tmp_path / "imported"
    code, stdout, err = run_cli(monkeypatch, capsys, "import", str(out), "--out", str(folder))
    assert code == 0, err
    back = Direction.load(folder / "direction.safetensors")
    assert back.layers == [1, 2, 3]
    for layer in back.layers:
        torch.testing.assert_close(back.vector(layer), d.unit(layer) * d.resid_norm(layer))
    side = json.loads((folder / "direction.json").read_text())
    assert side["hook_point"] == "blocks.{l}.hook_resid_post" and "ablate" in side["operation"]
    assert side["scale_convention"] == "alpha x unit x typical residual norm" and len(side["layer_map"]) == 3
    assert json.loads((folder / "manifest.json").read_text())["status"] == "complete"
    code, _, err = run_cli(monkeypatch, capsys, "import", str(out), "--out", str(folder))  # a finished run is kept
    assert_one_line_error(code, err, "already holds a finished", "--overwrite")
    code, _, err = run_cli(monkeypatch, capsys, "import", str(out), "--out", str(folder), "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--layers", "2,9"], ["lacks layer(s) 9", "Fix:"]),
        (["--layers", "0,1"], ["direction.0", "Fix:"]),
        (["--format", "safetensors"], ["--format", "Fix:"]),
        (["--scale", "huge"], ["--scale", "Fix:"]),
    ],
)
def test_export_bad_input(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    saved: Path,
    tmp_path: Path,
    args: list[str],
    needles: list[str],
) -> None:
    out = tmp_path / "x.gguf"
    code, _, err = run_cli(monkeypatch, capsys, "export", "--direction", str(saved), "--out", str(out), *args)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_export_bad_out_suffix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], saved: Path, tmp_path: Path
) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "export", "--direction", str(saved), "--out", str(tmp_path / "x.bin"))
    assert_one_line_error(code, err, ".gguf")


def test_import_bad_input(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model), "llama")
    w.add_tensor("token_embd.weight", np.zeros((2, D), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "imp"
    code, _, err = run_cli(monkeypatch, capsys, "import", str(model), "--out", str(out))
    assert_one_line_error(code, err, "not a control vector", "Fix:")
    assert not out.exists()
    pt = tmp_path / "vec.pt"
    pt.write_bytes(b"\x80\x04N.")
    code, _, err = run_cli(monkeypatch, capsys, "import", str(pt), "--out", str(out))
    assert_one_line_error(code, err, "never unpickles", "arbitrary code")
    code, _, err = run_cli(monkeypatch, capsys, "import", str(tmp_path / "missing.gguf"), "--out", str(out))
    assert_one_line_error(code, err, "does not exist")
