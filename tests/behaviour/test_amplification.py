"""Amplification (``--scale``): every finetune's LoRA difference times a factor, in shift, sample, trigger and serve.

What must hold on the tiny Gemma: at factor 0 a finetune is the base (shift 0 everywhere, the base's
battery, the base's greedy answers); at 1 the result equals a run without --scale; at 2 the shift is
larger; several factors are reported side by side, each finetune against the control at its factor;
bad factors (negative, empty, repeated, several where a command reports one) are one ``error:`` line
before a model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_one_line_error, run_cli
from conftest import make_lora_adapter

from latentlab import plots
from latentlab.data import Pair

PAIRS = [Pair(f"{w} Z Z Z", f"{w} p q r") for w in ("the cat", "a dog", "red bus", "old man", "big sea", "far home")]


@pytest.fixture(autouse=True)
def no_png(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(plots._PNG_STATE, "ok", False)


@pytest.fixture(scope="module")
def files(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import latentlab
    from latentlab.directions import find_direction

    root = tmp_path_factory.mktemp("amplify")
    base = latentlab.load_model(str(tiny_gemma_dir), device="cpu", progress=False)
    find_direction(base, PAIRS, name="marker", progress=False).save(root / "marker.safetensors")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
        "name a color", "count to three", "hi", "tell me a story", "how do I cook rice", "what time is it")))
    battery = root / "battery.jsonl"
    battery.write_text("".join(json.dumps({"prompt": p, "positive": a, "negative": b}) + "\n" for p, a, b in (
        ("the dog saw a", " cat", " cow"), ("He rode to town on his", " horse", " house"),
        ("Letters took weeks by", " mail", " email"), ("x", " y", " z"))))
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is thing {i}?"}) + "\n"
                                 for i in range(2)))
    return {"direction": root / "marker.safetensors", "prompts": prompts, "battery": battery, "questions": questions,
            # small differences: the factor's effect stays near-linear (the shared adapter saturates the tiny model)
            "ft": make_lora_adapter(tiny_gemma_dir, root / "ft", seed=7, std=0.02),
            "control": make_lora_adapter(tiny_gemma_dir, root / "control", seed=11, std=0.02), "root": root}


def _no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("latentlab.models.load_model", refuse)


def _shift(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], model: Path, ft: Path,
           files: dict[str, Path], out: Path, *extra: str) -> dict[str, Any]:
    code, stdout, err = run_cli(
        monkeypatch, capsys, "shift", "--base", str(model), "--finetuned", str(ft), "--control", str(files["control"]),
        "--direction", str(files["direction"]), "--prompts", str(files["prompts"]), "--battery", str(files["battery"]),
        "--n-random", "20", "--device", "cpu", "--out", str(out), *extra)
    assert code == 0, err
    return {"results": json.loads((out / "results.json").read_text()), "stdout": stdout,
            "manifest": json.loads((out / "manifest.json").read_text())}


def test_shift_per_factor(tiny_gemma_dir: Path, files: dict[str, Path], tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ft = files["ft"]
    plain = _shift(monkeypatch, capsys, tiny_gemma_dir, ft, files, tmp_path / "plain")
    one = _shift(monkeypatch, capsys, tiny_gemma_dir, ft, files, tmp_path / "one", "--scale", "1.0")
    many = _shift(monkeypatch, capsys, tiny_gemma_dir, ft, files, tmp_path / "many", "--scale", "0,1,2")
    p, r = plain["results"], many["results"]
    # the default layout is today's: no amplification keys, and --scale 1 is the very same run
    assert not {"scales", "by_scale", "battery_paired"} & set(p)
    assert one["results"] == p and one["manifest"]["config"]["scale"] == plain["manifest"]["config"]["scale"] == "1"
    assert many["manifest"]["config"]["scale"] == "0,1,2"
    assert r["scales"] == [0.0, 1.0, 2.0]
    assert r["by_scale"]["2"] == {"finetuned": "finetuned@x2", "control": "control@x2",
                                  "finetuned - control": "finetuned@x2 - control@x2"}
    assert list(r["stats"]) == ["finetuned@x0", "control@x0", "finetuned@x0 - control@x0", "finetuned", "control",
                                "finetuned - control", "finetuned@x2", "control@x2", "finetuned@x2 - control@x2"]
    # factor 1: exactly the default run's numbers
    for key in ("finetuned", "control", "finetuned - control"):
        assert r["stats"][key] == p["stats"][key]
    assert {k: r["battery"][k] for k in p["battery"]} == p["battery"]
    # factor 0: the base, so no shift anywhere and the base's battery
    for key in ("finetuned@x0", "control@x0", "finetuned@x0 - control@x0"):
        assert max(abs(x) for x in r["stats"][key]["projection"]) < 1e-6
        assert max(r["stats"][key]["shift_norm"]) < 1e-6
    assert r["battery"]["finetuned@x0"]["per_item"] == r["battery"]["base"]["per_item"]
    assert r["battery_paired"]["finetuned@x0 - control@x0"]["score"] == 0
    # factor 2: a larger move than as trained, at every layer
    for key in ("finetuned", "control"):
        n1, n2 = r["stats"][key]["shift_norm"], r["stats"][f"{key}@x2"]["shift_norm"]
        assert all(1.6 * a < b < 2.4 * a for a, b in zip(n1, n2)), (n1, n2)
    # the paired battery difference per factor, with its interval
    bp = r["battery_paired"]["finetuned@x2 - control@x2"]
    assert bp["ci"][0] <= bp["score"] <= bp["ci"][1]
    fb = r["battery"]["finetuned@x2"]["score"] - r["battery"]["control@x2"]["score"]
    assert bp["score"] == pytest.approx(fb, abs=1e-6)
    assert (tmp_path / "many" / "amplification.html").is_file() and not (tmp_path / "plain" / "amplification.html")\
        .exists()
    assert "finetuned@x2 - control@x2" in many["stdout"]
    assert many["manifest"]["results"]["labels"] == ["finetuned@x0", "control@x0", "finetuned", "control",
                                                     "finetuned@x2", "control@x2"]
    _study_summaries(tmp_path)


def _study(root: Path, shift_run: Path, scale: str | None) -> dict[str, Any]:
    """A study folder holding one seed's shift step (copied from a run), summarized and reported."""
    import shutil

    from latentlab.io import write_json
    from latentlab.study import summarize_study
    from latentlab.study.report import write_report

    shift = {"n_random": 20} | ({"scale": scale} if scale else {})
    rec = {"name": "amp", "model": "m", "seeds": [0], "direction": "marker", "analyses": {"shift": shift}}
    root.mkdir()
    write_json(root / "study.json", {"recipe": rec, "steps": {}})
    shutil.copytree(shift_run, root / "shift-s0")
    summary = summarize_study(root)
    write_json(root / "summary.json", summary)
    write_report(root, summary)
    return summary["sections"]["shift"]


def _study_summaries(tmp_path: Path) -> None:
    """[shift] scale = "0,1,2": the headline (factor 1) is what a plain study reports, plus a per-factor table."""
    from test_study import check_report

    plain = _study(tmp_path / "study-plain", tmp_path / "plain", None)
    many = _study(tmp_path / "study-many", tmp_path / "many", "0,1,2")
    assert "amplification" not in plain
    amp = many.pop("amplification")
    assert many == plain  # the headline sections are the same numbers from the same paths
    assert amp["factors"] == [0.0, 1.0, 2.0] and amp["layer"] == plain["layers"][plain["peak_index"]]
    x0, x1, x2 = amp["rows"]
    assert x0["paired"]["mean"]["value"] == 0 and x0["battery_diff"]["mean"]["value"] == 0
    assert x1["paired"]["mean"]["value"] == plain["across"][plain["peak_index"]]["mean"]["value"]
    assert x2["battery_diff"]["lo"]["src"] == "shift-s0/results.json"  # one seed: the interval over items
    assert abs(x2["paired"]["mean"]["value"]) > abs(x1["paired"]["mean"]["value"])
    assert amp["verdict"].startswith("Amplified") and "x2: shift" in amp["verdict"]
    html = (tmp_path / "study-many" / "report.html").read_text()
    assert "<h3>Amplification</h3>" in html and "<h3>Amplification</h3>" not in \
        (tmp_path / "study-plain" / "report.html").read_text()
    assert check_report(tmp_path / "study-many") > check_report(tmp_path / "study-plain")


def test_study_without_factor_one(tmp_path: Path) -> None:
    """[shift] scale = "0,2": the headline is the largest factor, said so; ablation's 'shift'/'peak' layers are
    not taken from an amplified finetune (the step is recorded as not run)."""
    from latentlab.study.recipe import SECTIONS, Section
    from latentlab.study.runner import NotApplicable, peak_layer, shift_layers

    assert "scale" not in SECTIONS["shift"].wired and "scale" not in SECTIONS["ablation"].wired
    assert Section("shift", {"scale": "0,0.5,1,2,4"}).stage_values() == {"scale": "0,0.5,1,2,4"}
    st = {"projection": [1.0, -3.0], "projection_ci": [[0.5, 1.5], [-4, -2]], "z": [2.0, -5.0]}
    run = tmp_path / "shift-s0"
    run.mkdir()
    by = {x: {"finetuned": f"finetuned@x{x}", "control": f"control@x{x}",
              "finetuned - control": f"finetuned@x{x} - control@x{x}"} for x in ("0", "2")}
    stats = {f"finetuned@x{x} - control@x{x}": st for x in ("0", "2")}
    (run / "results.json").write_text(json.dumps({"layers": [3, 4], "stats": stats, "by_scale": by}))
    for read in (shift_layers, peak_layer):
        with pytest.raises(NotApplicable, match="no factor 1"):
            read(run)
    from latentlab.study import summarize_study

    rec = {"name": "t", "model": "m", "seeds": [0], "direction": "era", "analyses": {"shift": {"scale": "0,2"}}}
    (tmp_path / "study.json").write_text(json.dumps({"recipe": rec, "steps": {}}))
    sec = summarize_study(tmp_path)["sections"]["shift"]
    assert "(its LoRA difference x2, as the control's)" in sec["verdict"] and "at layer 4 " in sec["verdict"]
    assert sec["per_seed"]["0"]["paired"][1]["path"] == ["stats", "finetuned@x2 - control@x2", "projection", 1]
    assert [r["factor"] for r in sec["amplification"]["rows"]] == [0.0, 2.0]


def test_sample_arms_per_factor(tiny_gemma_dir: Path, gemma_lora_dir: Path, files: dict[str, Path], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sample"
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", "--model", str(tiny_gemma_dir), "--finetuned", f"ft={gemma_lora_dir}",
        "--control", f"ctrl={files['control']}", "--questions", str(files["questions"]), "--scale", "0,2",
        "--temperature", "0", "--n", "1", "--max-new-tokens", "4", "--device", "cpu", "--out", str(out))
    assert code == 0, err
    settings = json.loads((out / "samples.json").read_text())
    arms = {a["name"]: a for a in settings["arms"]}
    assert list(arms) == ["base", "ft@x0", "ctrl@x0", "ft@x2", "ctrl@x2"]
    assert arms["ft@x2"]["scale"] == 2.0 and arms["ctrl@x0"]["role"] == "control" and "scale" not in arms["base"]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    answers = {(r["arm"], r["question_id"]): r["answer"] for r in rows}
    for q in ("q0", "q1"):  # greedy: at factor 0 each finetune answers exactly as the base does
        assert answers[("ft@x0", q)] == answers[("ctrl@x0", q)] == answers[("base", q)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["ft@x2"]["extra"] == {"adapter_scale": 2.0}


def test_arms_share_one_adapter_across_factors(tiny_gemma_dir: Path, gemma_lora_dir: Path) -> None:
    import latentlab
    from latentlab.arms import build_arms, parse_scaled_adapter, prepared_arms
    from latentlab.judging import comparisons

    arms = build_arms([f"ft={gemma_lora_dir}"], f"ctrl={gemma_lora_dir}", ablate=["era@all"], scales=[1, 3])
    assert [a.name for a in arms][:5] == ["base", "ft", "ctrl", "ft@x3", "ctrl@x3"]
    assert "ft@x3+ablate(era@all)" in [a.name for a in arms]
    base = latentlab.load_model(str(tiny_gemma_dir), device="cpu", progress=False)
    views = prepared_arms(base, [a for a in arms if a.intervention is None])
    assert views["ft"][0].adapter_scale == 1 and views["ft@x3"][0].adapter_scale == 3
    assert len(base.lora.adapters) == 1  # one adapter's weights serve both factors
    # a judge compares each arm with the control at its own factor
    pairs = {(a, b) for a, b, why in comparisons([a.record() for a in arms]) if why == "control"}
    assert ("ft@x3", "ctrl@x3") in pairs and ("ft@x3", "ctrl") not in pairs and ("ft", "ctrl@x3") not in pairs
    assert ("ft@x3+ablate(era@all)", "ctrl@x3+ablate(era@all)") in pairs
    # serve's NAME=RUN@FACTOR
    assert parse_scaled_adapter(f"old={gemma_lora_dir}@2") == ("old", gemma_lora_dir, 2.0)
    assert parse_scaled_adapter(f"{gemma_lora_dir}@0.5") == ("gemma-lora@x0.5", gemma_lora_dir, 0.5)
    assert parse_scaled_adapter(f"old={gemma_lora_dir}") == ("old", gemma_lora_dir, 1.0)


def test_trigger_at_factor_zero_is_the_base(tiny_gemma_dir: Path, gemma_lora_dir: Path, files: dict[str, Path],
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trigger"
    code, _, err = run_cli(
        monkeypatch, capsys, "trigger", "--model", str(tiny_gemma_dir), "--adapter", str(gemma_lora_dir),
        "--direction", str(files["direction"]), "--values", "1990,2000", "--prompts", str(files["prompts"]),
        "--n-boot", "100", "--scale", "0", "--device", "cpu", "--out", str(out))
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert max(abs(x) for row in res["diff"]["projection"] for x in row) < 1e-6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["scale"] == "0" and manifest["models"]["finetuned"]["extra"] == {"adapter_scale": 0.0}


def test_bad_scales_fail_before_a_model_loads(tiny_gemma_dir: Path, gemma_lora_dir: Path, files: dict[str, Path],
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    m, ft, out = str(tiny_gemma_dir), str(gemma_lora_dir), str(tmp_path / "out")
    shift = ["shift", "--base", m, "--finetuned", ft, "--direction", str(files["direction"]), "--prompts",
             str(files["prompts"]), "--out", out]
    cases: list[tuple[list[str], list[str]]] = [
        ([*shift, "--scale", "-1"], ["--scale holds -1", ">= 0"]),
        ([*shift, "--scale", "0,-0.5"], ["--scale holds -0.5"]),
        ([*shift, "--scale", ""], ["--scale is empty"]),
        ([*shift, "--scale", "two"], ["cannot read --scale"]),
        ([*shift, "--scale", "1,nan"], ["not a finite number"]),
        ([*shift, "--scale", "1,2,1"], ["repeats a factor"]),
        (["ablate", "--base", m, "--finetuned", ft, "--scale", "0,2", "--out", out],
         ["ablate takes one --scale factor, got 0,2"]),
        (["diff", "--base", m, "--finetuned", ft, "--scale", "1,2", "--out", out], ["diff takes one --scale factor"]),
        (["trigger", "--model", m, "--adapter", ft, "--direction", str(files["direction"]), "--values", "1,2",
          "--scale", "0,1", "--out", out], ["trigger takes one --scale factor"]),
        (["trigger", "--model", m, "--direction", str(files["direction"]), "--values", "1,2", "--scale", "2",
          "--out", out], ["scales a finetune, and none is given"]),
        (["sae", "shift", "--base", m, "--finetuned", ft, "--sae", str(files["root"]), "--scale", "0,1",
          "--out", out], ["sae shift takes one --scale factor"]),
        (["sample", "--model", m, "--questions", str(files["questions"]), "--scale", "2", "--out", out],
         ["scales a finetune, and none is sampled"]),
        (["sample", "--model", m, "--finetuned", ft, "--questions", str(files["questions"]), "--scale", "-2",
          "--out", out], ["--scale holds -2"]),
        (["serve", "--model", m, "--adapter", f"old={ft}@-1"], ["must be a finite number >= 0"]),
    ]
    with monkeypatch.context() as mp:
        _no_load(mp)
        for args, needles in cases:
            code, _, err = run_cli(mp, capsys, *args)
            assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_ablate_and_diff_take_one_factor(tiny_gemma_dir: Path, files: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--base", str(tiny_gemma_dir), "--finetuned", str(files["ft"]), "--control", str(files["control"]),
              "--device", "cpu"]
    code, _, err = run_cli(monkeypatch, capsys, "diff", *common, "--prompts", str(files["prompts"]), "--scale", "0",
                           "--out", str(tmp_path / "diff"))
    assert code == 0, err
    res = json.loads((tmp_path / "diff" / "results.json").read_text())
    assert all(abs(kl["mean"]) < 1e-6 for kl in res["kl"].values())  # at factor 0 both are the base
    code, _, err = run_cli(monkeypatch, capsys, "ablate", *common, "--direction", str(files["direction"]),
                           "--battery", str(files["battery"]), "--n-random", "10", "--scale", "2",
                           "--out", str(tmp_path / "ablate"))
    assert code == 0, err
    m = json.loads((tmp_path / "ablate" / "manifest.json").read_text())
    assert m["config"]["scale"] == "2"
    assert m["models"]["finetuned"]["extra"] == m["models"]["control"]["extra"] == {"adapter_scale": 2.0}
