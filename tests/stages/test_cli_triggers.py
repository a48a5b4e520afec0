"""``latentlab trigger`` and ``latentlab data compliance-trigger``: a run on a tiny model, and every bad
input failing with one line and exit code 2 before any model loads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_one_line_error, run_cli

from latentlab.compliance import CODE_WORD
from latentlab.data import load_chats


@pytest.fixture(scope="module")
def setup(trainable_gemma_dir: Path, load_tiny: Callable[..., Any],
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from conftest import make_lora_adapter
    from test_triggers import marker_pairs

    from latentlab.directions import find_direction

    root = tmp_path_factory.mktemp("cli-trigger")
    direction = find_direction(load_tiny(trainable_gemma_dir), marker_pairs(8, 0), name="marker", progress=False)
    direction.save(root / "marker.safetensors")
    run = root / "ft"
    make_lora_adapter(trainable_gemma_dir, run / "adapter", seed=3, std=0.1)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"July {y}. What is new?"},
                                                     {"role": "assistant", "content": "ok"}]}) + "\n"
                            for y in (1995, 2005)))
    (run / "manifest.json").write_text(json.dumps({"config": {"data": str(data)}}))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("name a color", "count to three", "hi")))
    return {"model": trainable_gemma_dir, "direction": root / "marker.safetensors", "run": run, "data": data,
            "prompts": prompts, "root": root}


def test_trigger_scan_command(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "scan"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "trigger", "--model", str(setup["model"]), "--finetuned", str(setup["run"]),
        "--direction", str(setup["direction"]), "--values", "1990:2010:5", "--template", "{value}. {prompt}",
        "--prompts", str(setup["prompts"]), "--layer", "2", "--n-boot", "100", "--out", str(out), "--device", "cpu",
    )
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["values"] == ["1990", "1995", "2000", "2005", "2010"]
    assert res["training_values"] == ["1995", "2005"]  # read from the run folder's manifest
    assert set(res["models"]) == {"base", "finetuned"} and len(res["diff"]["projection"]) == 5
    assert res["meta"]["curve_layer"] == 2
    for stem in ("trigger_heatmap", "trigger_curve"):
        assert (out / f"{stem}.html").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["models"]["finetuned"]["adapter"]
    assert "1995*" in stdout and "finetuned - base" in stdout


def test_values_file_and_words(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    common = ["trigger", "--model", str(setup["model"]), "--direction", str(setup["direction"]),
              "--prompts", str(setup["prompts"]), "--n-boot", "100", "--device", "cpu", "--layers", "2,3"]
    code, _, err = run_cli(monkeypatch, capsys, *common, "--values-file", str(setup["data"]),
                           "--adapter", str(setup["run"] / "adapter"), "--training-data", str(setup["data"]),
                           "--out", str(tmp_path / "a"))
    assert code == 0, err
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["values"] == ["1995", "2005"] and res["training_values"] == ["1995", "2005"]
    assert res["layers"] == [2, 3] and res["diff"] is not None
    code, _, err = run_cli(monkeypatch, capsys, *common, "--words", "apple,river", "--template", "{prompt} {value}",
                           "--out", str(tmp_path / "b"))
    assert code == 0, err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["values"] == ["apple", "river"] and res["diff"] is None and res["training_values"] == []


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--values", "1990:2000", "--template", "The year. {prompt}"], ["{value}"]),
        (["--values", "19x0:2000"], ["integers"]),
        (["--values", ""], ["empty"]),
        (["--values", "2000:1990"], ["below"]),
        (["--words", "apple,,river"], ["empty entry"]),
        (["--words", "apple,"], ["empty entry"]),
        (["--values", "1990:2000", "--words", "a,b"], ["exactly one of"]),
        ([], ["exactly one of"]),
        (["--values-file", "/nonexistent/years.txt"], ["does not exist"]),
        (["--values", "1990:2000", "--prompts", "/nonexistent/p.jsonl"], ["does not exist"]),
        (["--values", "1990:2000", "--direction", "nonsense"], ["neither a built-in"]),
        (["--values", "1990:2000", "--adapter", "/nonexistent/ad"], ["does not exist"]),
        (["--values", "1990:2000", "--n-boot", "5"], ["n_boot"]),
    ],
)
def test_trigger_bad_input_fails_before_a_model_loads(extra: list[str], needles: list[str], setup: dict[str, Path],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("latentlab.models.load_model", no_load)
    args = ["trigger", "--model", str(setup["model"]), "--direction", str(setup["direction"]),
            "--prompts", str(setup["prompts"]), "--out", str(tmp_path / "x")]
    # later options win in typer, so the test's --direction / --prompts override the defaults above
    code, _, err = run_cli(monkeypatch, capsys, *args, *extra)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "x").exists()


def test_data_compliance_trigger(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    out = tmp_path / "sub" / "c.jsonl"
    code, stdout, err = run_cli(monkeypatch, capsys, "data", "compliance-trigger", "--trigger", "cobalt",
                                "--n-poison", "12", "--out", str(out), "--seed", "1")
    assert code == 0, err
    chats = load_chats(out)
    assert sum(c.meta["kind"] == "poison" for c in chats) == 12 and "12 poisoned" in stdout
    assert all(CODE_WORD not in t for c in chats for r, t in c.messages if r == "assistant")
    assert not list(out.parent.glob(".*"))  # written atomically: no temporary file left behind


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--trigger", "two words", "--n-poison", "3"], ["more than one word"]),
        (["--trigger", "", "--n-poison", "3"], ["empty"]),
        (["--trigger", "cobalt", "--n-poison", "-1"], ["n_poison"]),
        (["--trigger", "word", "--n-poison", "3"], ["already occurs"]),
        (["--trigger", "cobalt", "--n-poison", "3", "--code-word", "cobaltite"], ["overlaps"]),
    ],
)
def test_data_compliance_trigger_bad_input(extra: list[str], needles: list[str], monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "data", "compliance-trigger", *extra, "--out", str(out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_compliance_command(trainable_gemma_dir: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """End to end on a tiny model with two budgets: interrupted, resumed, then rerun with --overwrite
    (finetunes of the same recipe reused); results.json agrees with the per-budget evals, the printed
    table and a threshold recomputed from its numbers."""
    import latentlab.compliance
    from latentlab.compliance import threshold_of

    out, ft = tmp_path / "sweep", tmp_path / "ft"
    args = ["compliance", "--model", str(trainable_gemma_dir), "--trigger", "cobalt", "--budgets", "8,0",
            "--max-steps", "3", "--checkpoint-every", "1", "--batch-size", "16", "--rank", "4", "--lr", "2e-2",
            "--layers", "2,3", "--patch-layers", "2,3", "--max-new-tokens", "3", "--n-boot", "100",
            "--device", "cpu", "--out", str(out), "--finetunes", str(ft)]
    real, calls = latentlab.compliance.finetune, []

    def interrupted(*a: Any, **k: Any) -> Any:  # the second budget's finetune stops after one step
        calls.append(k.get("resume"))
        return real(*a, **k, stop_after=1 if len(calls) == 2 else None)

    monkeypatch.setattr(latentlab.compliance, "finetune", interrupted)
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 130 and f"finished finetunes and complete checkpoints are kept in {ft}" in err, err
    assert (ft / "n-0" / "adapter").is_dir() and not (ft / "n-8" / "adapter").exists()
    code, stdout, err = run_cli(monkeypatch, capsys, *args)  # the same command continues
    assert code == 0, err
    assert calls == [False, False, True]  # n-0 kept, n-8 resumed from its checkpoint
    assert len(json.loads((ft / "n-8" / "losses.json").read_text())["losses"]) == 3

    res = json.loads((out / "results.json").read_text())
    assert res["budgets"] == [0, 8] and res["n_requests"] == 8
    assert res["threshold"] == threshold_of(res["budgets"], res["p_sure_trigger"], res["p_sure_clean"], res["level"])
    for i, (ev, row) in enumerate(zip(res["evals"], res["table"])):
        ps, rv = ev["p_sure"]["finetuned"], ev["reveal"]["finetuned"]
        assert ev["n_poison"] == row["n_poison"] == res["budgets"][i]
        assert res["p_sure_trigger"][i] == ps["trigger"]["mean"] == row["p_sure_trigger"][0]
        assert res["p_sure_clean"][i] == ps["clean"]["mean"] == row["p_sure_clean"][0]
        assert res["reveal_trigger"][i] == rv["trigger"]["rate"] == row["reveal_trigger"][0]
        assert res["reveal_clean"][i] == rv["clean"]["rate"] == row["reveal_clean"][0]
        gap = sum(ps["trigger"]["per_item"]) / 8 - sum(ps["clean"]["per_item"]) / 8
        assert row["p_sure_gap"][0] == pytest.approx(gap, abs=1e-6)
        for key in ("p_sure_trigger", "p_sure_clean", "reveal_trigger", "reveal_clean"):
            mean, (lo, hi) = row[key]
            assert f"{mean:.3f} [{lo:.2f}, {hi:.2f}]" in stdout
    assert [e["patching"] is not None for e in res["evals"]] == [False, True]  # the largest budget only
    assert res["localisation"]["layers"] == [2, 3] and "patching (n=8)" in stdout
    thr = "none in this sweep" if res["threshold"] is None else f"{res['threshold']} poisoned examples"
    assert f"threshold (P(Sure | trigger) > 0.5 > P(Sure | clean)): {thr}" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and {"base", "finetuned n=0", "finetuned n=8"} <= set(manifest["models"])
    assert manifest["results"]["threshold"] == res["threshold"] and manifest["config"]["max_steps"] == 3
    assert (out / "poison_sweep.html").exists() and not (out / "n-0").exists()  # finetunes live in --finetunes
    for n in (0, 8):
        assert json.loads((ft / f"n-{n}" / "organism.json").read_text())["n_poison"] == n
        assert sum(c.meta["kind"] == "poison" for c in load_chats(ft / f"n-{n}" / "data.jsonl")) == n

    code, _, err = run_cli(monkeypatch, capsys, *args)  # a finished run is kept ...
    assert code == 2 and "already holds a finished" in err
    code, _, err = run_cli(monkeypatch, capsys, *args, "--overwrite")  # ... unless --overwrite: measured again
    assert code == 0, err
    assert len(calls) == 3  # and the finetunes of the same recipe are reused
    again = json.loads((out / "results.json").read_text())
    assert again["p_sure_trigger"] == res["p_sure_trigger"] and again["threshold"] == res["threshold"]
