"""The ``latentlab`` command line: run folders, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from latentlab.activations import ActivationSet
from latentlab.io import fingerprint_weights


def cli_executable() -> list[str]:
    script = Path(sys.executable).with_name("latentlab")
    return [str(script)] if script.exists() else [sys.executable, "-m", "latentlab.cli"]


@pytest.fixture
def texts_file(tmp_path: Path) -> Path:
    p = tmp_path / "texts.jsonl"
    rows = [{"text": f"Example number {i} is {'quite ' * i}long.", "i": i} for i in range(7)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return p


def test_collect_writes_run_folder(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                   tmp_path: Path, tiny_gemma_dir: Path, texts_file: Path) -> None:
    out = tmp_path / "run"
    code, stdout, _ = run_cli(monkeypatch, capsys, "collect", "--data", str(texts_file), "--out", str(out),
                              "--model", str(tiny_gemma_dir), "--layers", "0,2-3", "--position", "mean",
                              "--batch-size", "3", "--shard-size", "4", "--device", "cpu")
    assert code == 0
    assert "collected 7 examples x 3 layers" in stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["command"].startswith("latentlab collect")
    info = manifest["models"]["model"]
    assert info["base_fingerprint"] == fingerprint_weights(tiny_gemma_dir)
    assert (info["n_layers"], info["d_model"], info["adapter"]) == (4, 64, None)
    assert manifest["config"]["layers"] == "0,2-3"
    assert manifest["results"]["n_examples"] == 7 and manifest["results"]["layers"] == [0, 2, 3]
    assert manifest["packages"]["torch"] == torch.__version__ and manifest["seed"] is None

    acts = ActivationSet.load(out / "activations")
    assert acts.acts.shape == (7, 3, 64) and acts.layers == [0, 2, 3] and acts.position == "mean"
    assert acts.meta["dataset_hash"] and acts.meta["base_fingerprint"] == info["base_fingerprint"]
    assert len(json.loads((out / "activations" / "activations.json").read_text())["shards"]) == 2


def test_collect_with_adapter(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                              tiny_gemma_dir: Path, gemma_lora_dir: Path, texts_file: Path) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(texts_file), "--out", str(out),
                           "--model", str(tiny_gemma_dir), "--adapter", str(gemma_lora_dir), "--layers", "1")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["model"]["adapter"] == str(gemma_lora_dir)
    assert manifest["models"]["model"]["adapter_fingerprint"]


def test_bad_layer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                   tiny_gemma_dir: Path, texts_file: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(texts_file), "--out", str(tmp_path / "r"),
                           "--model", str(tiny_gemma_dir), "--layers", "0,12")
    assert_one_line_error(code, err, "layer 12 is out of range", "0-3", "Fix:")
    assert not (tmp_path / "r").exists()  # refused after the model loaded, before the run folder

    code, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(texts_file), "--out", str(tmp_path / "r2"),
                           "--model", str(tiny_gemma_dir), "--layers", "two")
    assert_one_line_error(code, err, "cannot read layer list 'two'")


def test_malformed_jsonl(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                         tiny_gemma_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(bad), "--out", str(tmp_path / "r"),
                           "--model", str(tiny_gemma_dir))
    assert_one_line_error(code, err, f"{bad}:2:", "not valid JSON")
    assert not (tmp_path / "r").exists()  # validated before anything is written


def test_unknown_model(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                       texts_file: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(texts_file), "--out", str(tmp_path / "r"),
                           "--model", "no-such-model")
    assert_one_line_error(code, err, "unknown model 'no-such-model'", "gemma-3-270m")


def test_unwritable_out(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                        tiny_gemma_dir: Path, texts_file: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root can write anywhere: a file in the way is what fails here
    code, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(texts_file), "--out", str(blocker / "run"),
                           "--model", str(tiny_gemma_dir))
    assert_one_line_error(code, err, "cannot write to output folder")


def test_bad_position_and_missing_data(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path, texts_file: Path) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(texts_file), "--out", str(tmp_path / "r"),
                           "--position", "first")
    assert_one_line_error(code, err, "unknown position 'first'")
    code, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "does not exist")


@pytest.mark.parametrize("args", [("collect", "--no-such-option"), ("collect", "--data", "x", "--out", "y",
                                                                     "--batch-size", "many")])
def test_usage_error_exit_code(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                               args: tuple[str, ...]) -> None:
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err


def test_no_arguments_shows_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(monkeypatch, capsys)
    assert code in (0, 2) and "collect" in out + err and "Traceback" not in err


def _subprocess_env(**extra: str) -> dict[str, Any]:
    env = dict(os.environ, COLUMNS="250", **extra)  # a wide table: names are not folded
    env.pop("FORCE_COLOR", None)
    return env


def test_models_lists_both_builtins(tmp_path: Path) -> None:
    proc = subprocess.run([*cli_executable(), "models"], capture_output=True, text=True, timeout=120,
                          env=_subprocess_env(LATENTLAB_HOME=str(tmp_path / "home")))
    assert proc.returncode == 0, proc.stderr
    assert "gemma-3-270m (default)" in proc.stdout and "smollm2-135m-instruct" in proc.stdout
    assert str(tmp_path / "home") in proc.stdout.replace("\n", "")
    assert "not converted yet" in proc.stdout or "package missing" in proc.stdout  # an empty cache


def test_error_from_a_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n", encoding="utf-8")
    proc = subprocess.run([*cli_executable(), "collect", "--data", str(bad), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120,
                          env=_subprocess_env(LATENTLAB_HOME=str(tmp_path / "home")))
    assert_one_line_error(proc.returncode, proc.stderr, f"{bad}:1:", "expected a JSON object")


def test_help() -> None:
    proc = subprocess.run([*cli_executable(), "--help"], capture_output=True, text=True, timeout=120,
                          env=_subprocess_env())
    assert proc.returncode == 0 and "collect" in proc.stdout and "models" in proc.stdout
