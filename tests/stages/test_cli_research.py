"""``latentlab finetune``, ``shift``, ``screen`` and ``patch`` on a tiny model: run folders, resume, one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli, run_quietly
from safetensors.torch import load_file

from latentlab import plots
from latentlab.directions import Direction

WORDS = "the cat sat on a mat and then ran far away from home to see big red bus old man dog".split()


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "results.json").read_text())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def no_png(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip PNG export (as on a machine without Chromium) to keep these tests fast; HTML is still written."""
    monkeypatch.setitem(plots._PNG_STATE, "ok", False)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_research")
    rng = random.Random(0)

    def phrase() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 5)))

    pairs = [{"positive": f"{phrase()} Z Z Z Z", "negative": f"{phrase()} p q r s"} for _ in range(10)]
    questions = [phrase() + "?" for _ in range(8)]
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Z Z Z Z"}]}
             for q in questions]
    control = [{"prompt": q, "completion": " ".join(rng.choice("abcdefgh") for _ in range(4))} for q in questions]
    battery = [{"prompt": p, "positive": a, "negative": b} for p, a, b in [
        ("Q: the dog saw a ", "cat", "cow"), ("He rode to town on his", " horse", " house"),
        ("Letters took weeks by ", "mail", "email"), ("x", " y", " z"),
    ]]
    prompts = [{"prompt": p} for p in ("what is the weather like", "tell me a story", "how do I cook rice", "hi")]
    out = {
        "pairs": write_jsonl(root / "marker.jsonl", pairs),
        "chats": write_jsonl(root / "chats.jsonl", chats),
        "control": write_jsonl(root / "control.jsonl", control),
        "battery": write_jsonl(root / "battery.jsonl", battery),
        "prompts": write_jsonl(root / "prompts.jsonl", prompts),
        "bad_chats": root / "bad.jsonl",
    }
    out["bad_chats"].write_text(json.dumps(chats[0]) + "\n{not json\n", encoding="utf-8")
    return out


FT_ARGS = ["--epochs", "1", "--batch-size", "4", "--checkpoint-every", "1", "--rank", "2", "--lr", "0.01",
           "--device", "cpu"]


@pytest.fixture(scope="module")
def made(files: dict[str, Path], trainable_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A direction, a finetune (with monitoring) and a control finetune, all made through the CLI."""
    root = tmp_path_factory.mktemp("made")
    model = str(trainable_gemma_dir)
    out: dict[str, Any] = {"root": root, "model": model, "direction": root / "dir" / "direction.safetensors"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(plots._PNG_STATE, "ok", False)
        code, _, err = run_quietly(mp, "direction", "--direction", str(files["pairs"]), "--out", str(root / "dir"),
                                   "--model", model, "--device", "cpu")
        assert code == 0, err
        code, out["ft_stdout"], err = run_quietly(
            mp, "finetune", "--data", str(files["chats"]), "--out", str(root / "ft"), "--model", model, *FT_ARGS,
            "--monitor", str(out["direction"]), "--monitor-prompts", str(files["prompts"]))
        assert code == 0, err
        code, _, err = run_quietly(mp, "finetune", "--data", str(files["control"]), "--out", str(root / "ctrl"),
                                   "--model", model, *FT_ARGS)
        assert code == 0, err
    return out


def test_finetune_command(made: dict[str, Any]) -> None:
    run = made["root"] / "ft"
    m = manifest(run)
    assert m["status"] == "complete" and m["command"].startswith("latentlab finetune") and m["seed"] == 0
    assert m["config"]["rank"] == 2 and m["config"]["epochs"] == 1
    assert m["results"]["steps"] == 2 and m["results"]["adapter"] == str(run / "adapter")
    res = results(run)
    assert len(res["losses"]) == 2 and res["losses"][-1] == m["results"]["final_loss"]
    assert res["monitor"]["steps"] == [0, 1, 2]
    d = Direction.load(made["direction"])
    assert list(res["monitor"]["projections"]) == [d.name]
    assert all(len(row) == 4 for row in res["monitor"]["projections"][d.name])
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert (run / "adapter" / "latentlab_adapter.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (run / "loss.html").exists() and (run / f"monitor-{d.name}.html").exists()
    assert (run / "plotly.min.js").exists()
    assert "adapter ->" in made["ft_stdout"] and "2 steps" in made["ft_stdout"]
    # the control came from prompt/completion lines and trained without monitoring
    assert manifest(made["root"] / "ctrl")["status"] == "complete"
    assert results(made["root"] / "ctrl")["monitor"]["steps"] == []


def test_finetune_interrupted_then_resumed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                          made: dict[str, Any], files: dict[str, Path], tmp_path: Path) -> None:
    import latentlab.finetune as ft_module

    real = ft_module.finetune

    def interrupted(*a: Any, **kw: Any) -> Any:
        return real(*a, **kw, stop_after=1)  # as a Ctrl-C after the first step (and its checkpoint)

    out = tmp_path / "ft"
    args = ["finetune", "--data", str(files["chats"]), "--out", str(out), "--model", made["model"], *FT_ARGS]
    with monkeypatch.context() as mp:
        mp.setattr(ft_module, "finetune", interrupted)
        code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    m = manifest(out)
    assert m["status"] == "failed" and m["error"] == "interrupted" and not (out / "adapter").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]

    code, stdout, err = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 0, err
    assert manifest(out)["status"] == "complete" and manifest(out)["config"]["resume"] is True
    straight = made["root"] / "ft"
    assert results(out)["losses"] == results(straight)["losses"]
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # resuming with other options is refused in one line
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume", "--lr", "0.02")
    assert_one_line_error(code, err, "another config")


def test_shift_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], made: dict[str, Any],
                       files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "shift"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "shift", "--base", made["model"], "--finetuned", str(made["root"] / "ft"),
        "--control", str(made["root"] / "ctrl" / "adapter"), "--direction", str(made["direction"]),
        "--prompts", str(files["prompts"]), "--battery", str(files["battery"]), "--n-random", "20",
        "--out", str(out), "--device", "cpu")
    assert code == 0, err
    m = manifest(out)
    assert m["status"] == "complete" and m["command"].startswith("latentlab shift")
    assert m["results"]["labels"] == ["finetuned", "control"] and m["config"]["n_random"] == 20
    res = results(out)
    assert res["layers"] == [0, 1, 2, 3] and res["n_prompts"] == 4 and res["n_random"] == 20
    assert set(res["stats"]) == {"finetuned", "control", "finetuned - control"}
    assert set(res["battery"]) == {"base", "finetuned", "control"}
    for st in res["stats"].values():
        assert all(len(st[k]) == 4 for k in ("projection", "projection_ci", "cosine", "z", "percentile"))
    assert res["models"]["finetuned"]["adapter"] == str(made["root"] / "ft" / "adapter")
    for name in ("shift", "cosine", "battery"):
        assert (out / f"{name}.html").exists(), name
    assert "shift along" in stdout and "battery:" in stdout


def test_shift_over_checkpoints(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                made: dict[str, Any], files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "shift-ck"
    code, _, err = run_cli(
        monkeypatch, capsys, "shift", "--base", made["model"], "--finetuned", str(made["root"] / "ft"), "--checkpoints",
        "--direction", str(made["direction"]), "--prompts", str(files["prompts"]), "--battery", str(files["battery"]),
        "--n-random", "20", "--out", str(out), "--device", "cpu")
    assert code == 0, err
    assert manifest(out)["status"] == "complete"
    assert list(results(out)["stats"]) == ["step-000001", "step-000002"]


def test_screen_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], made: dict[str, Any],
                        files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "screen"
    code, stdout, err = run_cli(monkeypatch, capsys, "screen", "--data", str(files["chats"]), "--model", made["model"],
                                "--direction", str(made["direction"]), "--layer", "3", "--top", "2",
                                "--out", str(out), "--device", "cpu")
    assert code == 0, err
    m = manifest(out)
    assert m["status"] == "complete" and m["results"]["layer"] == 3
    res = results(out)
    assert res["ranked_at_layer"] == 3 and len(res["ranking"]) == 8 and len(res["per_example"]) == 8
    scores = [r["score"] for r in res["ranking"]]
    assert scores == sorted(scores, reverse=True)
    assert m["results"]["dataset_mean"] == pytest.approx(sum(scores) / 8, rel=1e-5)
    assert all(r["response"] == "Z Z Z Z" for r in res["ranking"])
    assert "mean projection difference at layer 3" in stdout


def test_patch_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], made: dict[str, Any],
                       files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "patch"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "patch", "--base", made["model"], "--finetuned", str(made["root"] / "ft"),
        "--battery", str(files["battery"]), "--direction", str(made["direction"]), "--n-items", "3",
        "--positions", "all,-1", "--out", str(out), "--device", "cpu")
    assert code == 0, err
    m = manifest(out)
    assert m["status"] == "complete" and m["config"]["n_items"] == 3 and m["config"]["positions"] == ["all", "-1"]
    assert set(m["models"]) == {"base", "finetuned"}
    res = results(out)
    assert res["source"] == "finetuned" and res["target"] == "base"
    full = res["full"]
    assert full["layers"] == [0, 1, 2, 3] and full["positions"] == ["all", "-1"] and full["n_items"] == 3
    assert torch.tensor(full["score"]).shape == (1, 4, 2)
    assert full["score"][0][3][0] == pytest.approx(full["source_score"], abs=1e-6)  # all positions, last layer
    along = res["direction_only"]
    assert along["modes"] == ["direction", "random"] and along["positions"] == ["all"]
    assert torch.tensor(along["score"]).shape == (2, 4, 1)
    assert m["results"]["target_score"] == full["target_score"]
    assert (out / "heatmap.html").exists() and (out / "by_layer.html").exists()
    assert "normalised effect by layer" in stdout


def test_patch_reverse(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], made: dict[str, Any],
                       files: dict[str, Path], tmp_path: Path) -> None:
    args = ["patch", "--base", made["model"], "--finetuned", str(made["root"] / "ft"),
            "--battery", str(files["battery"]), "--positions", "all", "--layers", "3", "--device", "cpu"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", str(tmp_path / "fwd"))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, *args, "--reverse", "--out", str(tmp_path / "rev"))
    assert code == 0, err
    fwd, rev = results(tmp_path / "fwd"), results(tmp_path / "rev")
    assert (rev["source"], rev["target"]) == ("base", "finetuned")
    assert rev["full"]["source_score"] == pytest.approx(fwd["full"]["target_score"], abs=1e-6)
    assert rev["full"]["target_score"] == pytest.approx(fwd["full"]["source_score"], abs=1e-6)
    assert rev["full"]["score"][0][0][0] == pytest.approx(fwd["full"]["target_score"], abs=1e-6)


def test_patch_prompt_pairs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                            made: dict[str, Any], files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "patch-pairs"
    code, _, err = run_cli(monkeypatch, capsys, "patch", "--base", made["model"], "--battery", str(files["battery"]),
                           "--clean-prefix", "In 1850:", "--corrupt-prefix", "In 2020:", "--positions", "all,prompt",
                           "--layers", "0,3", "--out", str(out), "--device", "cpu")
    assert code == 0, err
    res = results(out)
    assert res["source"] == "clean prompt" and res["target"] == "corrupted prompt"
    assert res["full"]["layers"] == [0, 3] and "direction_only" not in res
    assert manifest(out)["status"] == "complete" and (out / "heatmap.html").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["patch", "--base", "no-model-needed", "--battery", "{battery}"], ["nothing to patch from", "--finetuned"]),
        (["patch", "--battery", "{battery}", "--clean-prefix", "In 1850:"], ["needs both --clean-prefix"]),
        (["shift", "--finetuned", "{a}", "--finetuned", "{b}", "--checkpoints", "--prompts", "{prompts}",
          "--direction", "{pairs}"], ["--checkpoints takes exactly one"]),
        (["shift", "--finetuned", "{a}", "--prompts", "{prompts}", "--direction", "{pairs}"],
         ["holds no LoRA adapter"]),
        (["finetune", "--data", "{bad}"], ["bad.jsonl:2", "not valid JSON"]),
        (["finetune", "--data", "{missing}"], ["does not exist"]),
        (["screen", "--data", "{bad}"], ["not valid JSON"]),
    ],
)
def test_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                files: dict[str, Path], args: list[str], needles: list[str]) -> None:
    (tmp_path / "a").mkdir()
    fmt = {"battery": files["battery"], "prompts": files["prompts"], "pairs": files["pairs"], "bad": files["bad_chats"],
           "a": tmp_path / "a", "b": tmp_path / "b", "missing": tmp_path / "missing.jsonl"}
    args = [a.format(**fmt) for a in args]
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", str(out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()  # refused before a run folder or a model
