"""latentlab.runs: the manifest records the device the models ran on, apart from whether CUDA exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentlab.io import read_json
from latentlab.models import ModelInfo
from latentlab.runs import Run


def _info(device: str, device_map: dict[str, str] | None = None) -> ModelInfo:
    return ModelInfo(
        name="tiny", path="/models/tiny", architecture="Gemma3ForCausalLM", n_layers=2, d_model=8,
        d_vocab=128, device=device, dtype="float32", base_fingerprint="abc", device_map=device_map,
    )


def test_manifest_device_is_the_models_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with CUDA, a model loaded on the CPU is recorded as run on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run = Run.start(tmp_path / "run", "latentlab test", {"x": 1})
    m = read_json(tmp_path / "run" / "manifest.json")
    assert m["device"] is None and m["cuda_available"] is True and m["gpu"] is None  # no model yet
    run.add_model("model", _info("cpu"))
    m = read_json(tmp_path / "run" / "manifest.json")
    assert m["device"] == "cpu" and m["cuda_available"] is True and m["gpu"] is None
    assert m["models"]["model"]["device"] == "cpu"
    run.finish(result="ok")
    m = read_json(tmp_path / "run" / "manifest.json")
    assert m["status"] == "complete" and m["device"] == "cpu" and m["result"] == "ok"


def test_manifest_records_cuda_device_and_gpu_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"Fake GPU {i}")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    run = Run.start(tmp_path, "latentlab test", {})
    run.add_model("base", _info("cuda:1"))
    m = read_json(tmp_path / "manifest.json")
    assert m["device"] == "cuda:1" and m["gpu"] == "Fake GPU 1" and m["cuda_available"] is True
    run.add_model("finetuned", _info("cuda:1"))  # the same device twice is one device
    assert read_json(tmp_path / "manifest.json")["device"] == "cuda:1"


def test_manifest_several_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model spread by a device map, and a second one on the CPU: every device, in order."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = Run.start(tmp_path, "latentlab test", {})
    run.add_model("base", _info("cuda:0", device_map={"embed": "cuda:0", "blocks.1": "cuda:1"}))
    run.add_model("control", {"name": "other", "device": "cpu"})  # a plain dict works too
    m = read_json(tmp_path / "manifest.json")
    assert m["device"] == "cuda:0,cuda:1,cpu" and run.devices() == ["cuda:0", "cuda:1", "cpu"]
    assert m["cuda_available"] is False and m["gpu"] is None


def test_fail_marks_the_manifest_failed_with_the_error_line(tmp_path: Path) -> None:
    run = Run.start(tmp_path / "run", "latentlab collect --data x", {"data": "x"})
    written = run.fail("no space left on device writing /x. Fix: free space\nmore detail")
    assert written == tmp_path / "run" / "manifest.json"
    m = read_json(tmp_path / "run" / "manifest.json")
    assert m["status"] == "failed" and m["error"] == "no space left on device writing /x. Fix: free space"
    assert m["command"] == "latentlab collect --data x" and m["config"] == {"data": "x"}
