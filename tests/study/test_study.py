"""``latentlab study``: recipes are checked before any model loads; a tiny study runs end to end,
resumes by skipping finished steps, refuses stale ones, and its report's numbers trace to files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import assert_one_line_error, run_cli

from latentlab.errors import LatentlabError
from latentlab.study import builtin_recipes, load_recipe, parse_seeds, summarize_study


def chat_file(path: Path, answers: list[str]) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Name bird {i}."}, {"role": "assistant", "content": a}]}
            for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_builtin_recipes_parse() -> None:
    names = set(builtin_recipes())
    assert {"birds", "persona-facts", "year-trigger", "compliance-trigger"} <= names
    r = load_recipe("birds")
    assert r.finetune is not None and r.finetune.data == "old-birds" and r.finetune.control == "modern-birds"
    assert set(r.analyses) == {"shift", "screen", "ablation", "prevention", "diff"}
    assert r.battery == "era-battery"
    assert load_recipe("birds", seeds=[4], model="smollm2-135m-instruct").seeds == [4]
    assert load_recipe("year-trigger").analyses["trigger"].values == "2020:2050:1"


def test_ablation_labels_in_words() -> None:
    """Verdicts name where the direction was ablated: a layer spec's step label read back."""
    from latentlab.study.summary import _where

    assert [_where(x) for x in ("shift", "all", "L16", "L3_5", "L14-29")] == [
        "shift layers", "all layers", "layer 16", "layers 3, 5", "layers 14-29"]


def test_parse_seeds() -> None:
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("0-2") == [0, 1, 2] and parse_seeds(3) == [3]
    for bad in ("a,b", "", "1,1", "-1", "2-0", [True]):
        with pytest.raises(LatentlabError):
            parse_seeds(bad)


@pytest.mark.parametrize(("body", "needle"), [
    ('name = "x"\nmodle = "m"\n', "unknown key(s) modle"),
    ('name = "x"\n[finetune]\ndata = "old-birds"\ncontrol = "modern-birds"\nrnak = 4\n[shift]\n', "rnak"),
    ('name = "x"\n[finetune]\ndata = "no-such.jsonl"\ncontrol = "modern-birds"\n[shift]\n', "no-such.jsonl"),
    ('name = "x"\nseeds = "a,b"\n[finetune]\ndata = "old-birds"\ncontrol = "modern-birds"\n[shift]\n', "seeds"),
    ('name = "x"\n[finetune]\ndata = "old-birds"\n[shift]\n', "no control"),
    ('name = "x"\n[shift]\n', "need a [finetune] table"),
    ('name = "x"\n[shfit]\n', "shfit"),
    ('name = "x"\n[compliance]\ntrigger = "two words"\n', "more than one word"),
    ('name = "x"\n[compliance]\nbudgets = [8, 8]\n', "distinct"),
    ('name = "x"\n[finetune]\ndata = "old-birds"\ncontrol = "modern-birds"\n[trigger]\ntemplate = "{prompt}"\n',
     "{value}"),
    ('name = "x"\n[finetune]\ndata = "old-birds"\ncontrol = "modern-birds"\n[trigger]\nvalues = "2020:2030:5"\n'
     'held_out = [2029]\n', "not one of the scanned values"),
    ('name = "x"\nseeds = [0\n', "TOML"),
])
def test_bad_recipes_are_one_line_before_a_model_loads(body: str, needle: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model loaded")

    monkeypatch.setattr("latentlab.models.load_model", no_load)
    rec = write_recipe(tmp_path / "r.toml", body)
    code, _, err = run_cli(monkeypatch, capsys, "study", str(rec), "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "s").exists()


def test_recipe_without_name_is_named_after_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A user's recipe needs no ``name``; any other missing required key is a LatentlabError, not a TypeError."""
    from latentlab.study import Recipe

    rec = write_recipe(tmp_path / "my_recipe.toml", 'model = "gemma-3-270m"\nseeds = [0]\n')
    assert load_recipe(rec).name == "my_recipe"
    assert load_recipe(write_recipe(tmp_path / "other.toml", 'name = "mine"\n')).name == "mine"
    with pytest.raises(LatentlabError, match="has no name"):
        Recipe.from_dict({"model": "gemma-3-270m"})
    monkeypatch.setattr("latentlab.models.load_model", lambda *a, **k: pytest.fail("a model loaded"))
    bad = write_recipe(tmp_path / "bad.toml", "[finetune]\ncontrol = \"modern-birds\"\n[shift]\n")
    code, _, err = run_cli(monkeypatch, capsys, "study", str(bad), "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, "[finetune]", "data")


def test_control_for_another_base_and_bad_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    ctrl = tmp_path / "ctrl"
    (ctrl / "adapter").mkdir(parents=True)
    (ctrl / "manifest.json").write_text(json.dumps({"status": "complete", "config": {"model": "other-model"}}))
    rec = write_recipe(tmp_path / "r.toml", f'name = "x"\nmodel = "gemma-3-270m"\n[finetune]\ndata = "old-birds"\n'
                                            f'control = "{ctrl}"\n[shift]\n')
    code, _, err = run_cli(monkeypatch, capsys, "study", str(rec), "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, "other-model")
    code, _, err = run_cli(monkeypatch, capsys, "study", "birds", "--seeds", "0,x", "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, "--seeds")
    code, _, err = run_cli(monkeypatch, capsys, "study", "no-such-recipe", "--out", str(tmp_path / "s"))
    assert_one_line_error(code, err, "no recipe")


def resolve(root: Path, src: str, path: list[Any]) -> Any:
    x = json.loads((root / src).read_text())
    for k in path:
        x = x[k]
    return x


def report_numbers(html: str) -> list[tuple[str, list[Any], str, int, str]]:
    pat = re.compile(r"<span class='num' data-src='([^']*)' data-path='([^']*)' data-value='([^']*)' "
                     r"data-digits='(\d+)'>([^<]*)</span>")
    import html as h

    return [(h.unescape(a), json.loads(h.unescape(b)), h.unescape(c), int(d), e) for a, b, c, d, e in pat.findall(html)]


def check_report(root: Path) -> int:
    """Every number in report.html equals the file and JSON path it names, and is printed to its digits;
    every across-seed mean in summary.json is the mean of the per-seed numbers it summarises."""
    html = (root / "report.html").read_text()
    nums = report_numbers(html)
    assert nums, "the report shows no traceable numbers"
    for src, path, value, digits, text in nums:
        got = resolve(root, src, path)
        assert repr(got) == value, (src, path)
        if isinstance(got, float) and text != "n/a":
            assert float(text) == pytest.approx(got, abs=0.51 * 10 ** -digits + 1e-12), (src, path, text)
    s = json.loads((root / "summary.json").read_text())
    sh = s["sections"].get("shift")
    if sh:
        for i, a in enumerate(sh["across"]):
            vals = [p["paired"][i]["value"] for p in sh["per_seed"].values()]
            assert a["mean"]["value"] == pytest.approx(sum(vals) / len(vals))
            for p in sh["per_seed"].values():  # per-seed records are the files' own numbers
                assert resolve(root, p["paired"][i]["src"], p["paired"][i]["path"]) == p["paired"][i]["value"]
    return len(nums)


@pytest.fixture(scope="module")
def tiny_study(trainable_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("study")
    data = chat_file(root / "old.jsonl", [f"The Carolina parakeet, {1800 + i}." for i in range(8)])
    ctrl = chat_file(root / "new.jsonl", [f"The house sparrow, {2000 + i}." for i in range(8)])
    body = (f'name = "tiny"\nmodel = "{trainable_gemma_dir}"\nseeds = [0]\ndirection = "era"\n'
            f'[finetune]\ndata = "{data}"\ncontrol = "{ctrl}"\nrank = 2\nalpha = 4\nlr = 0.01\nepochs = 1\n'
            f'batch_size = 4\nmax_steps = 2\n'
            '[shift]\nn_random = 20\n[ablation]\nlayers = ["shift", "all"]\nn_random = 10\n'
            '[prevention]\nlayers = "all"\n[diff]\nk = 5\n'
            '[trigger]\nvalues = "1990:2000:5"\nn_prompts = 4\nheld_out = [1995]\n')
    body += "battery = \"BATTERY\"\n"
    # Small prompt and battery files keep the tiny study to seconds a step.
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n" for i in range(8)))
    battery = root / "battery.jsonl"
    battery.write_text("".join(json.dumps({"prompt": f"Question {i}: which era?", "positive": " A",
                                           "negative": " B"}) + "\n" for i in range(12)))
    body = body.replace('direction = "era"\n', f'direction = "era"\nprompts = "{prompts}"\nbattery = "{battery}"\n')
    body = body.replace("BATTERY", str(battery))
    rec = write_recipe(root / "tiny.toml", body)
    return {"root": root, "recipe": rec, "out": root / "out"}


def test_tiny_study_end_to_end(tiny_study: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    s = tiny_study
    out = s["out"]
    code, stdout, err = run_cli(monkeypatch, capsys, "study", str(s["recipe"]), "--out", str(out), "--device", "cpu")
    assert code == 0, err
    assert "report:" in stdout
    for sub in ("direction", "finetunes/old-s0", "finetunes/new-s0", "finetunes/old-ablated-s0", "shift-s0",
                "ablate-all-s0", "prevent-s0", "diff-s0", "trigger-finetuned-s0", "trigger-control-s0"):
        assert json.loads((out / sub / "manifest.json").read_text())["status"] == "complete", sub
    summary = json.loads((out / "summary.json").read_text())
    secs = summary["sections"]
    assert {"shift", "ablation", "prevention", "diff", "trigger", "finetunes"} <= set(secs)
    assert set(secs["ablation"]) == {"shift", "all"}  # one section per [ablation] layers entry
    assert secs["shift"]["verdict"].startswith("The finetune ")
    assert len(secs["trigger"]["battery_gap"]) == 3 and "Battery score" in secs["trigger"]["battery_verdict"]
    (held,) = secs["trigger"]["held_out"]  # the held-out value is reported beside the training values
    assert held["verdict"].startswith("Held-out value 1995") and held["projection"]["n_values"] == 3
    state = json.loads((out / "study.json").read_text())
    # 'shift' layers come from the measured shift: either ablated there, or recorded as not run with why.
    st = state["steps"]["ablate-shift-s0"]
    assert st["status"] in ("done", "not run") and (st["status"] == "done" or "interval above 0" in st["reason"])
    n = check_report(out)
    assert n > 20
    html = (out / "report.html").read_text()
    assert "Plotly.newPlot" in html and "<script src=" not in html  # plots inline, nothing fetched
    assert summary == summarize_study(out) | {}  # the summary is a function of the files alone

    # Rerun: every step is skipped; the report is rebuilt identically.
    code, _, err = run_cli(monkeypatch, capsys, "study", str(s["recipe"]), "--out", str(out), "--device", "cpu")
    assert code == 0 and err.count("skipped") >= 9 and "running" not in err, err
    assert json.loads((out / "summary.json").read_text())["sections"] == secs


def test_study_refuses_stale_or_other_recipe(tiny_study: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    s = tiny_study
    if not (s["out"] / "study.json").exists():
        pytest.skip("needs the end-to-end study")
    other = write_recipe(tmp_path / "other.toml", s["recipe"].read_text().replace("n_random = 20", "n_random = 30"))
    code, _, err = run_cli(monkeypatch, capsys, "study", str(other), "--out", str(s["out"]))
    assert_one_line_error(code, err, "another recipe")
    # Adding a seed keeps the finished seed's steps (only the new seed's steps are planned to run) ...
    from latentlab.study import StudyConfig, plan_steps

    StudyConfig(recipe=str(s["recipe"]), out=str(s["out"]), seeds="0,1", device="cpu")
    # ... so does adding an [ablation] layers entry (its steps are new folders), or rewording the
    # description ...
    grown = write_recipe(tmp_path / "grown.toml",
                         s["recipe"].read_text().replace('layers = ["shift", "all"]', 'layers = ["shift", "all", "0"]')
                         .replace('name = "tiny"', 'name = "tiny"\ndescription = "Reworded."'))
    planned = {st.key for st in plan_steps(StudyConfig(recipe=str(grown), out=str(s["out"]), device="cpu"))}
    assert {"ablate-shift-s0", "ablate-all-s0", "ablate-L0-s0"} <= planned
    # ... but dropping one is refused, as is any other change to the analyses.
    shrunk = write_recipe(tmp_path / "shrunk.toml",
                          s["recipe"].read_text().replace('layers = ["shift", "all"]', 'layers = ["all"]'))
    code, _, err = run_cli(monkeypatch, capsys, "study", str(shrunk), "--out", str(s["out"]))
    assert_one_line_error(code, err, "differs in analyses")
    # ... but a study can't silently drop its seeds.
    fewer = write_recipe(tmp_path / "fewer.toml", s["recipe"].read_text().replace("seeds = [0]", "seeds = [1]"))
    code, _, err = run_cli(monkeypatch, capsys, "study", str(fewer), "--out", str(s["out"]))
    assert_one_line_error(code, err, "differs in seeds")
    # A finished step whose recorded settings differ from the plan is refused, not silently reused.
    copy = tmp_path / "copy"
    shutil.copytree(s["out"], copy)
    m = json.loads((copy / "shift-s0" / "manifest.json").read_text())
    m["config"]["n_random"] = 99
    (copy / "shift-s0" / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(monkeypatch, capsys, "study", str(s["recipe"]), "--out", str(copy), "--device", "cpu")
    assert_one_line_error(code, err, "differs in n_random")
    # A study started with --device cpu and resumed without it: the fix names the flag to pass.
    m["config"].update(n_random=json.loads((s["out"] / "shift-s0" / "manifest.json").read_text())["config"]["n_random"])
    (copy / "shift-s0" / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_cli(monkeypatch, capsys, "study", str(s["recipe"]), "--out", str(copy))
    assert_one_line_error(code, err, "differs in device")
    assert "resume with --device cpu" in err


def test_interrupted_finetune_resumes(tiny_study: dict[str, Any], tmp_path: Path) -> None:
    """A finetune folder with checkpoints but no adapter is resumed, not restarted or refused."""
    from latentlab.study import StudyConfig, plan_steps

    s = tiny_study
    out = tmp_path / "s"
    cfg = StudyConfig(recipe=s["recipe"], out=out, device="cpu")
    step = next(st for st in plan_steps(cfg) if st.key == "finetune:old-s0")
    assert step.make().resume is False
    src = s["out"] / "finetunes" / "old-s0"
    if not (src / "checkpoints").is_dir():
        pytest.skip("needs the end-to-end study's checkpoints")
    shutil.copytree(src, out / "finetunes" / "old-s0")
    shutil.rmtree(out / "finetunes" / "old-s0" / "adapter")
    assert step.make().resume is True


def test_study_of_existing_finetunes(tiny_study: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``finetune.runs`` / a ``{seed}`` control: analyse finished runs without training; a missing one
    is refused before anything runs."""
    s = tiny_study
    fin = s["out"] / "finetunes"
    if not (fin / "old-s0" / "adapter").is_dir():
        pytest.skip("needs the end-to-end study")
    body = s["recipe"].read_text().split("[shift]")[0].replace(
        f'data = "{s["root"] / "old.jsonl"}"\ncontrol = "{s["root"] / "new.jsonl"}"',
        f'data = "{s["root"] / "old.jsonl"}"\nruns = "{fin}/old-s{{seed}}"\ncontrol = "{fin}/new-s{{seed}}"')
    assert "runs =" in body
    rec = write_recipe(tmp_path / "reuse.toml", body + "[shift]\nn_random = 20\n")
    out = tmp_path / "reuse"
    code, _, err = run_cli(monkeypatch, capsys, "study", str(rec), "--out", str(out), "--device", "cpu")
    assert code == 0, err
    assert "finetune:" not in err and not (out / "finetunes").exists()
    state = json.loads((out / "study.json").read_text())
    assert set(state["external_runs"]) == {"finetuned-s0", "control-s0"}
    assert (out / "external" / "control-s0" / "manifest.json").is_file()  # provenance travels with the study
    a = json.loads((out / "shift-s0" / "results.json").read_text())["stats"]["finetuned - control"]["projection"]
    b = json.loads((s["out"] / "shift-s0" / "results.json").read_text())["stats"]["finetuned - control"]["projection"]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-4)  # the same finetunes, the same shift
    check_report(out)
    code, _, err = run_cli(monkeypatch, capsys, "study", str(rec), "--seeds", "0,1", "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "old-s1", "not a finished finetune run")


def test_compliance_study(trainable_gemma_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """A compliance-trigger study (no [finetune] table): the sweep runs per seed, the report traces."""
    rec = write_recipe(tmp_path / "c.toml", f'name = "c"\nmodel = "{trainable_gemma_dir}"\nseeds = [0]\n'
                       '[compliance]\ntrigger = "cobalt"\nbudgets = [0, 4]\nmax_steps = 2\nn_requests = 3\n'
                       'patch = false\n')
    out = tmp_path / "s"
    code, stdout, err = run_cli(monkeypatch, capsys, "study", str(rec), "--out", str(out), "--device", "cpu")
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    c = s["sections"]["compliance"]
    assert c["budgets"] == [0, 4] and "P(Sure | trigger)" in c["verdict"]
    assert not (out / "direction").exists()  # no analysis needs one
    assert check_report(out) >= 8


def test_shift_verdict_names_the_largest_move_either_way(tmp_path: Path) -> None:
    """A finetune that mostly moved prompts *against* the direction is reported at that layer, not at
    the layer with the most positive (small) move."""
    from latentlab.study import summarize_study

    rec = {"name": "t", "model": "m", "seeds": [0], "direction": "warden", "analyses": {"shift": {}}}
    (tmp_path / "study.json").write_text(json.dumps({"recipe": rec, "steps": {}}))
    proj, ci = [1.5, -8.0, 0.2], [[1.4, 1.6], [-8.5, -7.5], [-0.1, 0.5]]
    stats = {"finetuned - control": {"projection": proj, "projection_ci": ci, "z": [3.0, -9.0, 0.5]}}
    (tmp_path / "shift-s0").mkdir()
    (tmp_path / "shift-s0" / "results.json").write_text(json.dumps({"layers": [0, 1, 2], "stats": stats}))
    v = summarize_study(tmp_path)["sections"]["shift"]["verdict"]
    assert "against the warden direction" in v and "at layer 1 " in v and "-8.0 [-8.5, -7.5]" in v, v
    assert "above 0 at 1 and below 0 at 1 of 3 layers" in v, v


@pytest.mark.parametrize("stmt", ["import latentlab.study.runner", "import latentlab.stages.study",
                                  "from latentlab.study import StudyConfig, run_study",
                                  "import latentlab as ll; ll.StudyConfig; ll.run_study"])
def test_study_modules_import_in_a_fresh_interpreter(stmt: str) -> None:
    """The config lives with the stages and the runner only type-checks against it: no import cycle."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", stmt], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
