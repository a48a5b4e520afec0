"""``latentlab ablate`` / ``latentlab diff`` end to end on a tiny model, and their one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from test_ablation import MARKER, PROMPTS, battery, const_direction, marker_unit, mlp_hidden, write_adapter

from latentlab.directions import Direction
from latentlab.io import save_tensors


@pytest.fixture(scope="module")
def setup(trainable_gemma_dir: Path, load_tiny: Callable[..., Any],
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from latentlab.activations import last_token_acts

    root = tmp_path_factory.mktemp("cli_ablate")
    base = load_tiny(trainable_gemma_dir)
    items = battery(base.tokenizer)
    hid, _ = mlp_hidden(base, [i.prompt for i in items])
    a = hid.mean(0) / hid.mean(0).norm() ** 2
    u = marker_unit(base)
    norm = float(last_token_acts(base, PROMPTS, [base.n_layers - 1]).norm(dim=-1).mean())
    module = f"model.layers.{base.n_layers - 1}.mlp.down_proj"
    ft = write_adapter(root / "marker", module, a, 5.0 * norm * u, trainable_gemma_dir)
    n = base.n_layers
    d = const_direction(u, n, "marker")
    d.save(root / "marker-dir")
    batt = root / "battery.jsonl"
    batt.write_text("".join(json.dumps({"prompt": i.prompt, "positive": i.positive, "negative": i.negative}) + "\n"
                            for i in items))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4]))
    return {"root": root, "ft": ft, "dir": root / "marker-dir.safetensors", "battery": batt, "prompts": prompts,
            "model": str(trainable_gemma_dir), "n": n, "d": d}


def test_ablate_and_diff_commands(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    s = setup
    out = tmp_path / "abl"
    code, stdout, err = run_cli(monkeypatch, capsys, "ablate", "--base", s["model"], "--finetuned", str(s["ft"]),
                                "--direction", str(s["dir"]), "--layers", str(s["n"] - 1), "--battery",
                                str(s["battery"]), "--n-boot", "200", "--device", "cpu", "--out", str(out))
    assert code == 0, err
    assert "fraction removed" in stdout and "random directions" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["fractions"]["base"]["fraction"] == pytest.approx(1.0, abs=0.02)
    assert (out / "ablation.html").exists()
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["config"]["n_random"] == 10 and "finetuned" in man["models"]
    out2 = tmp_path / "diff"
    code, stdout, err = run_cli(monkeypatch, capsys, "diff", "--base", s["model"], "--finetuned", str(s["ft"]),
                                "--prompts", str(s["prompts"]), "--k", "3", "--device", "cpu", "--out", str(out2))
    assert code == 0, err
    assert "KL(base || finetuned)" in stdout
    res = json.loads((out2 / "results.json").read_text())
    assert res["logit_lens"]["finetuned - base"][-1]["promoted"][0]["token"] == MARKER
    assert (out2 / "diff.html").exists()


def test_ablate_bad_input_is_one_line_before_a_model_loads(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    s = setup

    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("latentlab.models.load_model", no_load)
    common = ["--base", s["model"], "--finetuned", str(s["ft"]), "--battery", str(s["battery"]),
              "--device", "cpu", "--out", str(tmp_path / "o")]
    partial = Direction(s["d"].vectors[:2], [0, 1], torch.ones(2), "partial")
    partial.save(tmp_path / "partial")
    nan = Direction(s["d"].vectors * float("nan"), s["d"].layers, s["d"].resid_norms, "nan")
    save_tensors(tmp_path / "nan", {"vectors": nan.vectors, "resid_norms": nan.resid_norms},
                 {"name": "nan", "layers": nan.layers, "position": "last", "method": "mean_diff"})
    save_tensors(tmp_path / "zero", {"vectors": torch.zeros_like(nan.vectors), "resid_norms": nan.resid_norms},
                 {"name": "zero", "layers": nan.layers, "position": "last", "method": "mean_diff"})
    other = tmp_path / "other"
    other.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (other / f).write_bytes((s["ft"] / f).read_bytes())
    (other / "latentlab_adapter.json").write_text(json.dumps({"base_fingerprint": "aaaa"}))
    mine = tmp_path / "mine"
    mine.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (mine / f).write_bytes((s["ft"] / f).read_bytes())
    (mine / "latentlab_adapter.json").write_text(json.dumps({"base_fingerprint": "bbbb"}))
    cases = [
        (["--direction", str(tmp_path / "partial.safetensors"), "--layers", "3"], "lacks layer"),
        (["--direction", str(tmp_path / "nan.safetensors")], "NaN"),
        (["--direction", str(tmp_path / "zero.safetensors")], "all zeros"),
        (["--direction", str(s["dir"]), "--layers", "x"], "cannot read layer list"),
        (["--direction", str(s["dir"]), "--n-random", "3"], "too few"),
        (["--direction", str(s["dir"]), "--mode", "zero"], "--mode"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(monkeypatch, capsys, "ablate", *common, *extra)
        assert_one_line_error(code, err, needle, "Fix:")
    code, _, err = run_cli(monkeypatch, capsys, "ablate", "--base", s["model"], "--finetuned", str(mine),
                           "--control", str(other), "--direction", str(s["dir"]), "--battery", str(s["battery"]),
                           "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "another base", "Fix:")
    code, _, err = run_cli(monkeypatch, capsys, "diff", "--base", s["model"], "--finetuned", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "does not exist", "Fix:")
    assert not (tmp_path / "o").exists()


def test_ablate_layer_out_of_range(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Known only once the base's depth is: after the load, before the run folder is made."""
    s = setup
    code, _, err = run_cli(monkeypatch, capsys, "ablate", "--base", s["model"], "--finetuned", str(s["ft"]),
                           "--direction", "era", "--layers", "9", "--battery", str(s["battery"]), "--device", "cpu",
                           "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "out of range", "Fix:")
    assert not (tmp_path / "o").exists()
