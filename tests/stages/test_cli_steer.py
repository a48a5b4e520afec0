"""``latentlab direction``, ``probe`` and ``steer`` on a tiny model folder: run folders and one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from latentlab import plots
from latentlab.directions import Direction
from latentlab.probes import ProbeReport
from latentlab.steering import candidate_layers

WORDS = "the cat sat on a mat and then ran far away from home to see big red bus old man dog".split()


@pytest.fixture(autouse=True)
def no_png(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip PNG export (as on a machine without Chromium) to keep these tests fast; HTML is still written."""
    monkeypatch.setitem(plots._PNG_STATE, "ok", False)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_steer")
    rng = random.Random(0)
    pairs = []
    for i in range(14):
        base = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 6)))
        split = "test" if i >= 10 else "train"
        pairs.append({"positive": f"{base} zebra", "negative": f"{base} table", "split": split})
    battery = [{"prompt": p, "positive": a, "negative": b} for p, a, b in [
        ("Q: the dog saw a", " cat", " cot"), ("He rode to town on his", " horse", " house"),
        ("x", " y", " z"), ("The way to cross the ocean is by", " ship", " shop"),
        ("Letters took weeks by", " mail", " email"), ("the cat sat", " on", " in"),
        ("old man", " dog", " dig"), ("far away from", " home", " hole"),
    ]]
    extra = [{"positive": "red bus zebra", "negative": "red bus table"}, {"positive": "a dog zebra",
                                                                          "negative": "a dog table"}]
    out = {"pairs": root / "marker.jsonl", "battery": root / "battery.jsonl", "extra": root / "extra.jsonl"}
    for key, rows in (("pairs", pairs), ("battery", battery), ("extra", extra)):
        out[key].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def test_direction_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                           tiny_gemma_dir: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "dir"
    code, stdout, err = run_cli(monkeypatch, capsys, "direction", "--direction", str(files["pairs"]), "--out",
                                str(out), "--model", str(tiny_gemma_dir), "--device", "cpu", "--method", "pca")
    assert code == 0, err
    assert "marker direction over 4 layers" in stdout
    m = manifest(out)
    assert m["status"] == "complete" and m["command"].startswith("latentlab direction")
    assert m["config"]["method"] == "pca" and m["models"]["model"]["n_layers"] == 4
    assert m["results"]["layers"] == [0, 1, 2, 3] and len(m["results"]["norms"]) == 4
    assert m["results"]["best_probe_layer"] in range(4)
    d = Direction.load(out / "direction.safetensors")
    assert d.method == "pca" and d.name == "marker" and d.vectors.shape == (4, 64)
    assert d.meta["n_train_pairs"] == 10 and d.meta["n_test_pairs"] == 4
    assert m["results"]["norms"] == pytest.approx(d.vectors.norm(dim=-1).tolist())


def test_probe_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                       tiny_gemma_dir: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "probe"
    code, stdout, err = run_cli(monkeypatch, capsys, "probe", "--direction", str(files["pairs"]), "--out", str(out),
                                "--model", str(tiny_gemma_dir), "--layers", "0,2", "--test", str(files["extra"]))
    assert code == 0, err
    assert "probe accuracy by layer" in stdout and "best held-out layer" in stdout
    assert manifest(out)["status"] == "complete"
    results = json.loads((out / "results.json").read_text())
    assert results["layers"] == [0, 2] and results["n_train_pairs"] == 10 and results["n_test_pairs"] == 4
    assert all(a is not None for a in results["test_acc"]) and results["dataset"] == str(files["pairs"])
    assert [r["layer"] for r in results["user_test"]] == [0, 2]
    assert all(0 <= r["acc"] <= 1 and len(r["ci"]) == 2 for r in results["user_test"])
    report = ProbeReport.load(out / "probes.safetensors")
    assert report.layers == [0, 2] and report.coef is not None and report.coef.shape == (2, 64)
    assert (out / "probe_accuracy.html").exists() and (out / "plotly.min.js").exists()
    assert manifest(out)["results"]["best_layer"] == results["best_layer"]


def check_steer_run(out: Path, coeffs: list[float], n_random: int = 1) -> dict[str, Any]:
    m = manifest(out)
    assert m["status"] == "complete" and m["command"].startswith("latentlab steer") and m["seed"] == 0
    results = json.loads((out / "results.json").read_text())
    assert results["coeffs"] == coeffs and [r["alpha"] for r in results["table"]] == coeffs
    assert m["results"]["table"] == results["table"] and m["results"]["chosen_layers"] == results["chosen_layers"]
    for row in results["table"]:
        assert 0 <= row["score"] <= 1 and row["ci"][0] <= row["score"] <= row["ci"][1]
        assert ("random" in row) == (n_random > 0)
    assert len(results["per_item_scores"]) == len(coeffs)
    assert all(len(s) == results["n_eval_items"] for s in results["per_item_scores"])
    assert len(results["per_item_random_scores"]) == n_random
    for g in results["generations"]:
        assert set(g) == {"prompt", "alpha=-0.25", "alpha=+0", "alpha=+0.25"}
        assert all(len(g[k]) <= 3 * 4 for k in g if k != "prompt")  # 3 tokens (a token can decode to a few chars)
    assert results["model"]["n_layers"] == 4 and results["battery"]
    assert (out / "steering.html").exists() and (out / "plotly.min.js").exists()
    return results


def test_steer_at_a_given_layer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                tiny_gemma_dir: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "steer"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "steer", "--direction", str(files["pairs"]), "--battery", str(files["battery"]),
        "--out", str(out), "--model", str(tiny_gemma_dir), "--layer", "1", "--coeffs", "-1,0,1",
        "--max-new-tokens", "3", "--prompt", "Tell me a story.", "--prompt", "Hello?", "--device", "cpu")
    assert code == 0, err
    results = check_steer_run(out, [-1.0, 0.0, 1.0])
    assert results["chosen_layers"] == [1] and results["layer_screen"] is None
    assert results["n_eval_items"] == 8  # no screen: every item is reported
    assert [g["prompt"] for g in results["generations"]] == ["Tell me a story.", "Hello?"]
    assert results["probes"]["n_train_pairs"] == 10 and results["direction_meta"]["n_test_pairs"] == 4
    assert (out / "direction.safetensors").exists() and (out / "probes.safetensors").exists()
    assert (out / "probe_accuracy.html").exists() and not (out / "layer_screen.html").exists()
    assert "steering at layer 1" in stdout and "sample generations" in stdout
    # alpha 0 is the unsteered model, for the direction and its random control alike
    row0 = results["table"][1]
    assert row0["alpha"] == 0 and row0["score"] == pytest.approx(row0["random"], abs=1e-6)


def test_steer_screens_layers(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                              tiny_gemma_dir: Path, files: dict[str, Path]) -> None:
    out = tmp_path / "steer-screen"
    code, _, err = run_cli(
        monkeypatch, capsys, "steer", "--direction", str(files["pairs"]), "--battery", str(files["battery"]),
        "--out", str(out), "--model", str(tiny_gemma_dir), "--coeffs", "-0.5,0.5", "--max-new-tokens", "3",
        "--n-random", "2")
    assert code == 0, err
    results = check_steer_run(out, [-0.5, 0.5], n_random=2)
    screen = {int(k): v for k, v in results["layer_screen"].items()}
    probes = results["probes"]
    acc = [t if t is not None else c for t, c in zip(probes["test_acc"], probes["cv_acc"])]
    assert list(screen) == candidate_layers(4, acc)  # well-probed layers of the middle band
    assert set(screen) <= {1, 2, 3}
    assert results["chosen_layers"] == [max(screen, key=lambda k: screen[k])]
    assert results["n_eval_items"] == 6  # every 4th item is a dev item for the screen, the rest are reported
    assert (out / "layer_screen.html").exists() and len(results["generations"]) == 3


def test_steer_with_a_saved_direction(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path, tiny_gemma_dir: Path, files: dict[str, Path]) -> None:
    g = torch.Generator().manual_seed(0)
    saved = Direction(torch.randn(2, 64, generator=g), [1, 2], torch.tensor([8.0, 9.0]), "saved").save(
        tmp_path / "d" / "direction")
    out = tmp_path / "steer-saved"
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--direction", str(saved), "--battery", str(files["battery"]),
                           "--out", str(out), "--model", str(tiny_gemma_dir), "--layer", "2", "--coeffs", "0,2",
                           "--max-new-tokens", "3", "--positions", "generated", "--n-random", "0")
    assert code == 0, err
    results = check_steer_run(out, [0.0, 2.0], n_random=0)
    assert results["direction"] == "saved" and results["mode"] == "generated" and results["probes"] is None
    assert not (out / "direction.safetensors").exists()  # nothing refitted


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--coeffs", "1,two"], ["cannot read --coeffs '1,two'", "Fix:"]),
        (["--direction", "vibes"], ["--direction 'vibes'", "era, persona"]),
        (["--direction", "{pairs}"], ["no default battery", "--battery FILE.jsonl"]),
        (["--positions", "middle"], ["--positions 'middle'"]),
        (["--direction", "{pairs}", "--battery", "{missing}"], ["does not exist"]),
    ],
)
def test_steer_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                      files: dict[str, Path], args: list[str], needles: list[str]) -> None:
    args = [a.format(pairs=files["pairs"], missing=tmp_path / "nope.jsonl") for a in args]
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "steer", "--out", str(out), "--model", "no-model-needed", *args)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()  # refused before a run folder or a model


@pytest.mark.parametrize("command", ["direction", "probe"])
def test_unknown_direction_source(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                  tmp_path: Path, command: str) -> None:
    code, _, err = run_cli(monkeypatch, capsys, command, "--direction", "pairs.txt", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "neither a built-in", "Fix:")
