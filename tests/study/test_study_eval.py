"""A study's ``[eval]`` section: sample + judge steps per seed, the summary's eval section, its report, a
rerun that skips them, and recipe errors (one line, before a model loads)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli

from latentlab.study import load_recipe, summarize_study


def _chat(path: Path, answers: list[str]) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Name bird {i}."}, {"role": "assistant", "content": a}]}
            for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _base_recipe(root: Path, model: Path) -> str:
    """[finetune] (two steps each) and [ablation] at all layers on small prompt and battery files."""
    data = _chat(root / "old.jsonl", [f"The Carolina parakeet, {1800 + i}." for i in range(8)])
    ctrl = _chat(root / "new.jsonl", [f"The house sparrow, {2000 + i}." for i in range(8)])
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about item {i}."}) + "\n" for i in range(6)))
    battery = root / "battery.jsonl"
    battery.write_text("".join(json.dumps({"prompt": f"Question {i}: which era?", "positive": " A",
                                           "negative": " B"}) + "\n" for i in range(8)))
    return (f'name = "tiny-eval"\nmodel = "{model}"\nseeds = [0]\ndirection = "era"\nprompts = "{prompts}"\n'
            f'battery = "{battery}"\n'
            f'[finetune]\ndata = "{data}"\ncontrol = "{ctrl}"\nrank = 2\nalpha = 4\nlr = 0.01\nepochs = 1\n'
            'batch_size = 4\nmax_steps = 2\n[ablation]\nlayers = ["all"]\nn_random = 10\n')


@pytest.fixture(scope="module")
def eval_study(trainable_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval-study")
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(
        ["What is new in your town?", "How do you send a message?", "What lights your house?"])))
    body = _base_recipe(root, trainable_gemma_dir) + (
        f'[eval]\nquestions = "{questions}"\nn = 2\nmax_new_tokens = 6\narms = ["finetune", "control", "ablated"]\n'
        f'judges = ["direction:era", "local:{trainable_gemma_dir}"]\ntemplate = "era-score"\n')
    rec = root / "eval.toml"
    rec.write_text(body)
    return {"root": root, "recipe": rec, "out": root / "out", "model": trainable_gemma_dir}


def _jsonl(p: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def _traced(root: Path) -> int:
    """Every number in report.html equals the value at the file and JSON path it names."""
    page = (root / "report.html").read_text()
    import html as h

    pat = re.compile(r"<span class='num' data-src='([^']*)' data-path='([^']*)' data-value='([^']*)'")
    found = pat.findall(page)
    for src, path, value in found:
        x = json.loads((root / h.unescape(src)).read_text())
        for k in json.loads(h.unescape(path)):
            x = x[k]
        assert repr(x) == h.unescape(value), (src, path)
    return len(found)


def test_eval_section_samples_judges_summarises_and_skips_on_rerun(
        eval_study: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    s, out = eval_study, eval_study["out"]
    code, stdout, err = run_cli(monkeypatch, capsys, "study", str(s["recipe"]), "--out", str(out), "--device", "cpu")
    assert code == 0, err
    local = f"local-{s['model'].name}"
    for sub in ("sample-s0", "judge-direction-era-s0", f"judge-{local}-s0"):
        assert json.loads((out / sub / "manifest.json").read_text())["status"] == "complete", sub
    settings = json.loads((out / "sample-s0" / "samples.json").read_text())
    names = [a["name"] for a in settings["arms"]]
    assert names[:2] == ["finetune", "control"] and len(names) == 4  # and each again with era ablated at all
    assert all(n.endswith("@all)") and "+ablate(" in n for n in names[2:])
    rows = (out / "sample-s0" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 4 * 3 * 2
    assert len((out / f"judge-{local}-s0" / "judgments.jsonl").read_text().splitlines()) == len(rows)

    ev = json.loads((out / "summary.json").read_text())["sections"]["eval"]
    assert set(ev) == {"direction-era", local}
    d, t = ev["direction-era"], ev[local]
    assert d["arms"] == ["finetune", "control", "finetune+ablate(era@all)", "control+ablate(era@all)"]
    assert "finetune - control" in d["comparisons"] and "finetune+ablate(era@all) - control+ablate(era@all)" in \
        d["comparisons"]
    fc = d["per_seed"]["0"]["comparisons"]["finetune - control"]
    res = json.loads((out / "judge-direction-era-s0" / "results.json").read_text())
    assert fc["diff"]["value"] == pytest.approx(res["arms"]["finetune"]["vs"]["control"]["diff"])
    assert d["across_comparisons"]["finetune - control"]["mean"]["value"] == fc["diff"]["value"]  # one seed
    assert d["per_seed"]["0"]["direction"]["test_auc"]["src"] == "judge-direction-era-s0/results.json"
    assert d["verdict"].startswith("Judged by direction:era") and "finetune minus control" in d["verdict"]
    assert t["metric"] == "mean" and t["positive"] is None
    rel = t["vs_direction"]  # the local judge's scores against the direction judge's calibrated projection
    assert rel["judge"] == "direction-era" and rel["per_seed"]["0"]["n"] == len(rows)
    by_id = {j["sample_id"]: j["score"] for j in _jsonl(out / "judge-direction-era-s0" / "judgments.jsonl")}
    local_js = _jsonl(out / f"judge-{local}-s0" / "judgments.jsonl")
    want = np.corrcoef([j["score"] for j in local_js], [by_id[j["sample_id"]] for j in local_js])[0, 1]
    assert rel["per_seed"]["0"]["pearson"]["value"] == pytest.approx(want)
    assert "correlates with direction:era's calibrated projection at r = " in t["verdict"] and "vs_direction" not in d
    assert "- Judged by direction:era" in stdout
    assert _traced(out) > 20
    page = (out / "report.html").read_text()
    assert "Behaviour: judged answers" in page and page.index("Behaviour") > page.index("Ablation")
    summary = json.loads((out / "summary.json").read_text())
    assert summary == summarize_study(out)

    code, _, err = run_cli(monkeypatch, capsys, "study", str(s["recipe"]), "--out", str(out), "--device", "cpu")
    assert code == 0 and "running" not in err, err
    for key in ("sample-s0", "judge-direction-era-s0", f"judge-{local}-s0"):
        assert f"{key}: done already, skipped" in err
    assert json.loads((out / "summary.json").read_text())["sections"]["eval"] == ev


def test_looping_answers_are_counted_and_named_in_the_verdict(eval_study: dict[str, Any], tmp_path: Path) -> None:
    """An arm whose answers are loops (an ablation that broke generation) is named in the verdict: its
    judged value scores the loops. Judge results written before the judge counted loops are read through
    the samples themselves."""
    from latentlab.sampling import repetitive

    if not (eval_study["out"] / "summary.json").exists():
        pytest.skip("needs the end-to-end eval study")
    out = tmp_path / "copy"
    shutil.copytree(eval_study["out"], out)
    rows = _jsonl(out / "sample-s0" / "samples.jsonl")
    d = summarize_study(out)["sections"]["eval"]["direction-era"]
    for arm in ("finetune", "control"):
        want = sum(repetitive(r["answer"]) for r in rows if r["arm"] == arm)
        assert d["per_seed"]["0"]["arms"][arm]["n_repetitive"]["value"] == want
    for r in rows:
        if "+ablate(" in r["arm"]:
            r["answer"] = "Vide" * 12
        elif repetitive(r["answer"]):
            r["answer"] = "An ordinary answer about the railway and the telegraph."
    (out / "sample-s0" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res_path = out / "judge-direction-era-s0" / "results.json"
    res = json.loads(res_path.read_text())
    for a in res["arms"].values():
        a.pop("n_repetitive")  # as the judge wrote them before it counted loops
    res_path.write_text(json.dumps(res))
    verdict = summarize_study(out)["sections"]["eval"]["direction-era"]["verdict"]
    assert "finetune+ablate(era@all) 6 of 6; control+ablate(era@all) 6 of 6" in verdict
    assert "scores the loops" in verdict and "finetune 0 of" not in verdict


def test_a_judge_added_to_a_finished_study_runs_alone(eval_study: dict[str, Any], tmp_path: Path) -> None:
    """judges may grow (only the new judge's steps are planned to run); arms may not."""
    from latentlab.stages.study import StudyConfig
    from latentlab.study import plan_steps

    s = eval_study
    if not (s["out"] / "study.json").is_file():
        pytest.skip("needs the end-to-end eval study")
    text = s["recipe"].read_text()
    grown = tmp_path / "grown.toml"
    grown.write_text(text.replace('judges = ["direction:era", ', 'judges = ["direction:era", "direction:persona", '))
    keys = [st.key for st in plan_steps(StudyConfig(recipe=str(grown), out=str(s["out"]), device="cpu"))]
    assert {"sample-s0", "judge-direction-era-s0", "judge-direction-persona-s0"} <= set(keys)
    other = tmp_path / "other.toml"
    other.write_text(text.replace('"finetune", "control", "ablated"', '"finetune", "control"'))
    from latentlab.errors import LatentlabError

    with pytest.raises(LatentlabError, match="another recipe"):
        StudyConfig(recipe=str(other), out=str(s["out"]), device="cpu")


def test_eval_defaults_and_plan(trainable_gemma_dir: Path, tmp_path: Path) -> None:
    """[eval] with no keys: era-questions, the direction judge on the recipe's direction, finetune and control;
    one sample step and one judge step per seed, after the steps they read."""
    from latentlab.stages.study import StudyConfig
    from latentlab.study import plan_steps

    rec = tmp_path / "r.toml"
    rec.write_text(_base_recipe(tmp_path, trainable_gemma_dir).replace("seeds = [0]", "seeds = [0, 1]") + "[eval]\n")
    r = load_recipe(rec)
    ev = r.analyses["eval"]
    assert ev.judges == ["direction:era"] and ev.arms == ["finetune", "control"] and ev.questions == "era-questions"
    assert r.to_dict()["analyses"]["eval"]["judges"] == ["direction:era"]
    steps = plan_steps(StudyConfig(recipe=str(rec), out=str(tmp_path / "s"), device="cpu"))
    keys = [st.key for st in steps]
    needs = {st.key: st.needs for st in steps}
    for seed in (0, 1):
        i = keys.index(f"sample-s{seed}")
        assert keys[i + 1] == f"judge-direction-era-s{seed}" and keys.index(f"ablate-all-s{seed}") < i
        assert set(needs[f"sample-s{seed}"]) == {f"finetune:old-s{seed}", f"finetune:new-s{seed}"}
        assert needs[f"judge-direction-era-s{seed}"] == (f"sample-s{seed}",)
    # a recipe without [eval] plans no eval step
    rec.write_text(_base_recipe(tmp_path, trainable_gemma_dir))
    keys = [st.key for st in plan_steps(StudyConfig(recipe=str(rec), out=str(tmp_path / "t"), device="cpu"))]
    assert not any(k.startswith(("sample-", "judge-")) for k in keys)


@pytest.mark.parametrize(("extra", "needles"), [
    ("[eval]\nnsamples = 3\n", ("[eval]", "nsamples", "use only", "arms", "judges", "max_new_tokens", "template")),
    ('[eval]\narms = ["finetune", "preventative"]\n', ("preventative", "[prevention]")),
    ('[eval]\narms = ["finetune", "sideways"]\n', ("arms", "ablated")),
    ('[eval]\narms = ["ablated"]\n', ("no arm to ablate",)),
    ('[eval]\njudges = ["oracle:x"]\n', ("[eval] judges", "oracle:x")),
    ('[eval]\njudges = ["local:tiny"]\ntemplate = "no-such-template"\n', ("no-such-template",)),
    ('[eval]\njudges = ["endpoint:gpt@not a url"]\n', ("endpoint:MODEL@URL",)),
    ('[eval]\nquestions = "no-such.jsonl"\n', ("eval.questions", "no-such.jsonl")),
    ("[eval]\nn = 0\n", ("eval.n",)),
    ("[eval]\ntop_p = 0\n", ("top_p",)),
])
def test_bad_eval_sections_are_one_error_before_a_model_loads(
        extra: str, needles: tuple[str, ...], trainable_gemma_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("latentlab.models.load_model", lambda *a, **k: pytest.fail("a model loaded"))
    rec = tmp_path / "bad.toml"
    rec.write_text(_base_recipe(tmp_path, trainable_gemma_dir) + extra)
    code, _, err = run_cli(monkeypatch, capsys, "study", str(rec), "--out", str(tmp_path / "s"), "--device", "cpu")
    assert_one_line_error(code, err, *needles)
