"""Every bad input to every stage command: exit 2, one ``error: ... Fix: ...`` line, no traceback,
and a pre-existing --out folder left exactly as it was (listing and contents).

Cases marked "before a model loads" run with :func:`latentlab.models.load_model` replaced by one that
fails loudly, so a check that slipped behind the model load shows up as a wrong message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from latentlab.directions import Direction


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save_direction(path: Path, vectors: torch.Tensor, layers: list[int]) -> Path:
    d = Direction(vectors, layers, torch.ones(len(layers)), name="marker")
    from latentlab.io import save_tensors

    meta = {"name": d.name, "layers": layers, "position": "last", "method": "mean_diff"}
    save_tensors(path, {"vectors": vectors, "resid_norms": d.resid_norms}, meta)  # no validation on purpose
    return path.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    g = torch.Generator().manual_seed(0)
    chats = [{"messages": [{"role": "user", "content": f"q {i}?"}, {"role": "assistant", "content": "a b"}]}
             for i in range(4)]
    out = {
        "texts": write_jsonl(root / "texts.jsonl", [{"text": f"some text {i}"} for i in range(4)]),
        "empty": root / "empty.jsonl",
        "pairs": write_jsonl(root / "pairs.jsonl", [{"positive": f"a {i} z", "negative": f"a {i} t"}
                                                     for i in range(8)]),
        "battery": write_jsonl(root / "battery.jsonl", [{"prompt": f"x{i}", "positive": " y", "negative": " z"}
                                                        for i in range(8)]),
        "chats": write_jsonl(root / "chats.jsonl", chats),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": "hello"}, {"prompt": "tell me"}]),
        "good": save_direction(root / "good", torch.randn(4, 64, generator=g), [0, 1, 2, 3]),
        "nan": save_direction(root / "nan", torch.full((4, 64), float("nan")), [0, 1, 2, 3]),
        "zero": save_direction(root / "zero", torch.zeros(4, 64), [0, 1, 2, 3]),
        "wide": save_direction(root / "wide", torch.randn(4, 80, generator=g), [0, 1, 2, 3]),
        "partial": save_direction(root / "partial", torch.randn(1, 64, generator=g), [0]),
        "a_ft": root / "a" / "ft",
        "b_ft": root / "b" / "ft",
        "blocker": root / "blocker.txt",
    }
    out["empty"].write_text("", encoding="utf-8")
    out["blocker"].write_text("a file, not a folder", encoding="utf-8")
    for k in ("a_ft", "b_ft"):
        out[k].mkdir(parents=True)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture()
def existing(tmp_path: Path) -> Path:
    """A pre-existing --out folder with a hidden file in it (and no run): a visible file of another tool
    would be refused first (test_foreign_out_is_refused)."""
    out = tmp_path / "existing"
    out.mkdir()
    (out / ".notes.txt").write_text("keep me\n", encoding="utf-8")
    return out


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import latentlab.models

    def refuse(*a: Any, **kw: Any) -> Any:
        from latentlab.errors import LatentlabError

        raise LatentlabError("MODEL LOAD REACHED before the bad input was found")

    monkeypatch.setattr(latentlab.models, "load_model", refuse)


def check(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], out: Path, args: list[str],
          needles: list[str]) -> None:
    before = snapshot(out)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", str(out))
    assert_one_line_error(code, err, "Fix:", *needles)
    assert snapshot(out) == before


def fmt(args: list[str], files: dict[str, Path], model: Path | None = None) -> list[str]:
    return [a.format(model=model, **files) for a in args]


# Found before a model loads.
BEFORE_MODEL = [
    (["collect", "--data", "{texts}", "--shard-size", "0"], ["--shard-size must be an integer >= 1"]),
    (["collect", "--data", "{texts}", "--shard-size", "-5"], ["--shard-size must be an integer >= 1"]),
    (["collect", "--data", "{texts}", "--batch-size", "0"], ["--batch-size must be an integer >= 1"]),
    (["collect", "--data", "{texts}", "--dtype", "float8"], ["unknown dtype 'float8'"]),
    (["collect", "--data", "{texts}", "--device", "gpu7"], ["unknown device 'gpu7'"]),
    (["collect", "--data", "{empty}"], ["is empty"]),
    (["collect", "--data", "{texts}", "--position", "first"], ["unknown position 'first'"]),
    (["direction", "--direction", "{pairs}", "--method", "ica"], ["unknown method 'ica'"]),
    (["direction", "--direction", "{pairs}", "--position", "first"], ["unknown position 'first'"]),
    (["probe", "--direction", "{pairs}", "--position", "all"], ["unknown position 'all'"]),
    (["steer", "--direction", "{pairs}", "--battery", "{battery}", "--coeffs", "nan"], ["--coeffs holds 'nan'"]),
    (["steer", "--direction", "{pairs}", "--battery", "{battery}", "--coeffs", ""], ["--coeffs is empty"]),
    (["steer", "--direction", "{nan}", "--battery", "{battery}"], ["NaN or infinite"]),
    (["steer", "--direction", "{zero}", "--battery", "{battery}"], ["all zeros"]),
    (["steer", "--direction", "{pairs}", "--battery", "{battery}", "--positions", "prompt"],
     ["--positions 'prompt' is not one of all, generated"]),
    (["steer", "--direction", "{pairs}", "--battery", "{battery}", "--n-random", "-1"],
     ["--n-random must be an integer >= 0"]),
    (["steer", "--direction", "{pairs}", "--battery", "{battery}", "--max-new-tokens", "0"],
     ["--max-new-tokens must be an integer >= 1"]),
    (["finetune", "--data", "{chats}", "--epochs", "0"], ["--epochs must be an integer >= 1"]),
    (["finetune", "--data", "{chats}", "--batch-size", "0"], ["--batch-size must be an integer >= 1"]),
    (["finetune", "--data", "{chats}", "--checkpoint-every", "0"], ["--checkpoint-every must be an integer >= 1"]),
    (["finetune", "--data", "{chats}", "--rank", "0"], ["--rank must be an integer >= 1"]),
    (["finetune", "--data", "{chats}", "--resume"], ["nothing to resume"]),
    (["shift", "--finetuned", "{a_ft}", "--finetuned", "{b_ft}", "--direction", "{good}", "--prompts", "{prompts}"],
     ["share the name ft"]),
    (["shift", "--finetuned", "{a_ft}", "--control", "{b_ft}", "--direction", "{good}", "--prompts", "{prompts}"],
     ["share the name ft"]),
    (["shift", "--finetuned", "{a_ft}", "--direction", "{good}", "--n-random", "19"], ["--n-random 19 is too few"]),
    (["shift", "--finetuned", "{a_ft}", "--direction", "{nan}", "--prompts", "{prompts}"], ["NaN or infinite"]),
    (["shift", "--finetuned", "/no/such/ft", "--direction", "{good}", "--prompts", "{prompts}"],
     ["adapter folder /no/such/ft does not exist"]),
    (["patch", "--finetuned", "{a_ft}", "--positions", ""], ["no positions to patch"]),
    (["patch", "--finetuned", "{a_ft}", "--positions", "2"], ["counts from the prompt's start"]),
    (["patch", "--finetuned", "{a_ft}", "--component", "head"], ["unknown component 'head'"]),
    (["patch", "--finetuned", "{a_ft}", "--n-items", "0"], ["--n-items must be an integer >= 1"]),
    (["compliance", "--trigger", ""], ["the trigger is empty"]),
    (["compliance", "--trigger", "two words"], ["more than one word"]),
    (["compliance", "--trigger", "word"], ["already occurs in the clean data"]),
    (["compliance", "--trigger", "cobalt", "--budgets", "0,x"], ["cannot read --budgets '0,x'"]),
    (["compliance", "--trigger", "cobalt", "--budgets", "0,-4"], ["--budgets holds -4"]),
    (["compliance", "--trigger", "cobalt", "--budgets", "8,0,8"], ["--budgets repeats 8"]),
    (["compliance", "--trigger", "cobalt", "--budgets", ""], ["--budgets is empty"]),
    (["compliance", "--trigger", "cobalt", "--level", "1.5"], ["--level must be between 0 and 1"]),
    (["compliance", "--trigger", "cobalt", "--epochs", "0"], ["--epochs must be an integer >= 1"]),
    (["compliance", "--trigger", "cobalt", "--finetunes", "{blocker}"], ["is a file, not a folder"]),
]


@pytest.mark.parametrize(("args", "needles"), BEFORE_MODEL, ids=lambda v: " ".join(v)[:60] if isinstance(v, list)
                         else None)
def test_before_model_loads(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], existing: Path,
                            files: dict[str, Path], no_model: None, args: list[str], needles: list[str]) -> None:
    check(monkeypatch, capsys, existing, fmt(args, files), needles)


def test_shift_missing_control(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], existing: Path,
                               files: dict[str, Path], gemma_lora_dir: Path, no_model: None) -> None:
    args = ["shift", "--finetuned", str(gemma_lora_dir), "--control", "/no/such/ctrl", "--direction",
            str(files["good"]), "--prompts", str(files["prompts"])]
    check(monkeypatch, capsys, existing, args, ["adapter folder /no/such/ctrl does not exist"])


# Found once the (tiny) model has loaded, still before --out is touched.
AFTER_MODEL = [
    (["steer", "--model", "{model}", "--direction", "{wide}", "--battery", "{battery}"],
     ["has width 80", "d_model 64"]),
    (["steer", "--model", "{model}", "--direction", "{good}", "--battery", "{battery}", "--layer", "9"],
     ["layer 9 is out of range"]),
    (["steer", "--model", "{model}", "--direction", "{partial}", "--battery", "{battery}", "--layer", "2"],
     ["lacks layer(s) 2"]),
    (["steer", "--model", "{model}", "--direction", "{partial}", "--battery", "{battery}"],
     ["no candidate layer for the layer screen"]),
    (["finetune", "--model", "{model}", "--data", "{chats}", "--target-modules", "foo_proj,bar_proj", "--device",
      "cpu"], ["target modules foo_proj, bar_proj do not exist"]),
    (["shift", "--base", "{model}", "--finetuned", "{lora}", "--direction", "{partial}", "--prompts", "{prompts}",
      "--n-random", "20", "--device", "cpu"], ["lacks layer(s) 1, 2, 3"]),
    (["shift", "--base", "{model}", "--finetuned", "{lora}", "--direction", "{wide}", "--prompts", "{prompts}",
      "--n-random", "20", "--device", "cpu"], ["has width 80"]),
    (["screen", "--model", "{model}", "--data", "{chats}", "--direction", "{good}", "--layer", "7", "--device", "cpu"],
     ["layer 7 is out of range"]),
    (["screen", "--model", "{model}", "--data", "{chats}", "--direction", "{partial}", "--device", "cpu"],
     ["lacks layer(s)"]),
]


@pytest.mark.parametrize(("args", "needles"), AFTER_MODEL, ids=lambda v: " ".join(v)[:60] if isinstance(v, list)
                         else None)
def test_after_model_loads(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], existing: Path,
                           files: dict[str, Path], tiny_gemma_dir: Path, gemma_lora_dir: Path, args: list[str],
                           needles: list[str]) -> None:
    args = [a.format(model=tiny_gemma_dir, lora=gemma_lora_dir, **files) for a in args]
    check(monkeypatch, capsys, existing, args, needles)


def test_screen_bad_layer_before_the_screen(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            existing: Path, files: dict[str, Path], tiny_gemma_dir: Path) -> None:
    import latentlab.shift

    monkeypatch.setattr(latentlab.shift, "screen_dataset", lambda *a, **k: pytest.fail("the screen ran"))
    args = ["screen", "--model", str(tiny_gemma_dir), "--data", str(files["chats"]), "--direction",
            str(files["good"]), "--layer", "-9", "--device", "cpu"]
    check(monkeypatch, capsys, existing, args, ["out of range"])


# Every command: a finished run in --out is refused unless --overwrite; an unwritable --out.
EVERY = {
    "collect": ["collect", "--data", "{texts}"],
    "direction": ["direction", "--direction", "{pairs}"],
    "probe": ["probe", "--direction", "{pairs}"],
    "steer": ["steer", "--direction", "{pairs}", "--battery", "{battery}"],
    "finetune": ["finetune", "--data", "{chats}"],
    "shift": ["shift", "--finetuned", "{a_ft}", "--direction", "{good}", "--prompts", "{prompts}"],
    "screen": ["screen", "--data", "{chats}", "--direction", "{good}"],
    "patch": ["patch", "--finetuned", "{a_ft}", "--battery", "{battery}"],
    "compliance": ["compliance", "--trigger", "cobalt", "--budgets", "0,8"],
}


@pytest.mark.parametrize("command", list(EVERY))
def test_finished_run_is_kept(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                              files: dict[str, Path], no_model: None, command: str) -> None:
    out = tmp_path / "done"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"status": "complete", "config": {}}), encoding="utf-8")
    (out / "results.json").write_text("{}", encoding="utf-8")
    needle = "already holds a finished" if command != "finetune" else "already holds a finished finetune run"
    check(monkeypatch, capsys, out, fmt(EVERY[command], files), [needle, "--overwrite"])
    # with --overwrite the refusal is lifted (what fails next is the missing model or adapter)
    try:
        _, _, err = run_cli(monkeypatch, capsys, *fmt(EVERY[command], files), "--out", str(out), "--overwrite")
    except Exception as e:  # noqa: BLE001  (finetune loads the base its own way: the test isolation refuses it)
        err = str(e)
    assert "already holds" not in err


def test_foreign_out_is_refused(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               files: dict[str, Path], no_model: None) -> None:
    """Another tool's manifest.json and results.json in --out are not replaced unless --overwrite."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"tool": "other", "version": 3}), encoding="utf-8")
    (out / "results.json").write_text("{}", encoding="utf-8")
    args = ["collect", "--data", str(files["texts"])]
    check(monkeypatch, capsys, out, args, ["holds no latentlab run", "--overwrite"])
    _, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(files["texts"]), "--out", str(out), "--overwrite")
    assert "holds no latentlab run" not in err  # lifted (what fails next is the missing model)


def test_check_out_accepts_only_an_unfinished_run_of_the_same_command(tmp_path: Path) -> None:
    from latentlab.config import check_out
    from latentlab.errors import LatentlabError

    assert check_out(tmp_path / "new", command="collect") == tmp_path / "new"  # missing: fine
    (tmp_path / "empty" / ".ipynb_checkpoints").mkdir(parents=True)
    check_out(tmp_path / "empty", command="collect")  # empty but for hidden entries: fine
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}", encoding="utf-8")
    for recorded in ("latentlab collect --data x.jsonl", "latentlab.run_collect", "latentlab --debug collect"):
        (run / "manifest.json").write_text(json.dumps({"command": recorded, "status": "running", "config": {}}))
        assert check_out(run, command="collect") == run and check_out(run) == run
        with pytest.raises(LatentlabError, match="another command"):
            check_out(run, command="steer")
        check_out(run, overwrite=True, command="steer")
    (run / "manifest.json").write_text(json.dumps({"command": "latentlab.run_sae_train", "status": "running",
                                                   "config": {}}))
    check_out(run, command="sae train")
    (run / "manifest.json").write_text("not json")
    with pytest.raises(LatentlabError, match="holds no latentlab run"):
        check_out(run)
    (run / "manifest.json").write_text(json.dumps({"command": "latentlab collect", "status": "complete",
                                                   "config": {}}))
    with pytest.raises(LatentlabError, match="already holds a finished"):
        check_out(run, command="collect")


@pytest.mark.parametrize("command", list(EVERY))
def test_unwritable_out(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                        files: dict[str, Path], no_model: None, command: str) -> None:
    code, _, err = run_cli(monkeypatch, capsys, *fmt(EVERY[command], files), "--out", str(files["blocker"] / "run"))
    assert_one_line_error(code, err, "cannot write to output folder", "Fix:")
    assert files["blocker"].read_text(encoding="utf-8") == "a file, not a folder"


def test_finetune_partial_run_is_kept(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path, files: dict[str, Path], no_model: None) -> None:
    out = tmp_path / "ft"
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "checkpoints" / "step-000001" / "adapter.bin").write_bytes(b"weights")
    (out / "manifest.json").write_text(json.dumps({"status": "running"}), encoding="utf-8")
    check(monkeypatch, capsys, out, ["finetune", "--data", str(files["chats"])],
          ["already holds an unfinished finetune run", "--resume"])


def test_compliance_finetune_of_another_recipe_is_kept(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], existing: Path,
                                                       no_model: None) -> None:
    ck = existing / "n-8" / "checkpoints" / "step-000004"
    ck.mkdir(parents=True)
    (existing / "manifest.json").write_text(json.dumps(  # an interrupted compliance run
        {"command": "latentlab compliance --trigger cobalt", "status": "running", "config": {}}), encoding="utf-8")
    (ck / "trainer_state.json").write_text("{}", encoding="utf-8")  # no organism.json: made by something else
    check(monkeypatch, capsys, existing, ["compliance", "--trigger", "cobalt", "--budgets", "0,8"],
          ["n-8 holds a finetune made with another recipe", "--overwrite"])
