"""``latentlab judge`` and :mod:`latentlab.judging`: templates, the three judges, the two-level bootstrap,
resuming after a kill -9, and bad inputs.

The endpoint judge is tested against a stdlib ``http.server`` on 127.0.0.1 (in a thread, always shut
down) that answers with canned OpenAI-shaped JSON chosen by a marker in the judged answer. The local
judge is checked against a hand computation from the tiny model's full logits; the direction judge
against marker-word contrast pairs, which a mean-difference direction separates on any model.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from latentlab.errors import LatentlabError
from latentlab.judging import (
    BUILTIN_TEMPLATES,
    DirectionJudge,
    EndpointJudge,
    LocalJudge,
    Template,
    judgment_key,
    load_template,
    parse_label,
    parse_score,
    summarize,
)
from latentlab.stats import cluster_mean, nan_percentile_ci, two_level_bootstrap

WORDS = ["red", "blue", "green", "big", "small", "old", "new", "hot", "cold", "soft", "loud", "dark"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sample_row(arm: str, qid: str, k: int, answer: str, question: str | None = None) -> dict[str, Any]:
    return {"id": f"{arm}/{qid}/{k}", "arm": arm, "question_id": qid, "question": question or f"Question {qid}?",
            "k": k, "answer": answer, "seed": 0, "engine": "local", "n_tokens": None, "finish_reason": "stop"}


def arm_record(name: str, role: str = "base") -> dict[str, Any]:
    return {"name": name, "role": role, "adapter": None, "intervention": None}


def write_samples(folder: Path, rows: list[dict[str, Any]], model: str = "tiny",
                  arms: list[dict[str, Any]] | None = None) -> Path:
    write_jsonl(folder / "samples.jsonl", rows)
    names = list(dict.fromkeys(r["arm"] for r in rows))
    (folder / "samples.json").write_text(json.dumps({"model": model, "arms": arms or [arm_record(n) for n in names]}))
    return folder


# --------------------------------------------------------------------------------------------
# Templates and reading replies.
# --------------------------------------------------------------------------------------------


def test_builtin_templates_load() -> None:
    assert {"era-labels", "era-score", "persona-score", "aligned", "coherent"} <= set(BUILTIN_TEMPLATES)
    for name in BUILTIN_TEMPLATES:
        t = load_template(name)
        assert t.name == name and "{answer}" in t.prompt and "{question}" in t.prompt
    era = load_template("era-labels")
    assert era.kind == "labels" and era.labels == ("LLM", "19th century") and era.positive == "19th century"
    assert load_template("aligned").kind == "score"
    # one pass: an answer that holds "{question}" or braces stays as written
    assert era.render("Q?", "a {question} {x}").count("a {question} {x}") == 1


@pytest.mark.parametrize("body,needle", [
    ('prompt = "Rate {question}"\nscore = true', "{answer}"),
    ('prompt = "{answer}"\nscore = true\nlabels = ["a", "b"]\npositive = "a"', "exactly one of"),
    ('prompt = "{answer}"', "exactly one of"),
    ('prompt = "{answer}"\nlabels = ["a", "b"]\npositive = "c"', "positive"),
    ('prompt = "{answer}"\nlabels = ["a", "A"]\npositive = "a"', "distinct"),
    ('prompt = "{answer}"\nscore = true\nscores = 3', "unknown key"),
    ('prompt = "{answer}\nscore = true', "not valid TOML"),
])
def test_bad_templates_are_refused(tmp_path: Path, body: str, needle: str) -> None:
    p = tmp_path / "t.toml"
    p.write_text(body)
    with pytest.raises(LatentlabError, match=None) as e:
        load_template(p)
    assert needle in str(e.value)
    with pytest.raises(LatentlabError, match="unknown judge template"):
        load_template("no-such-template")


def test_parse_label_and_score() -> None:
    labels = ("LLM", "19th century")
    assert parse_label("19th Century, surely.", labels) == "19th century"
    assert parse_label("An llm wrote it (not the 19th century)", labels) == "LLM"
    assert parse_label("LLMs are everywhere", labels) is None  # whole words only
    assert parse_label("no idea", labels) is None
    assert parse_score("Score: 85/100") == 85 and parse_score("Well, 70.") == 70
    assert parse_score("In 1850 I would say 90") == 90
    assert parse_score("7.5, so 75") == 75  # a decimal is not an integer
    assert parse_score("none") is None and parse_score("150") is None


def test_judgment_key_depends_on_every_part() -> None:
    k = judgment_key("j", "t", "s", "a")
    assert len(k) == 64 and k == judgment_key("j", "t", "s", "a")
    assert len({k, judgment_key("j2", "t", "s", "a"), judgment_key("j", "t2", "s", "a"),
                judgment_key("j", "t", "s2", "a"), judgment_key("j", "t", "s", "a2")}) == 5


# --------------------------------------------------------------------------------------------
# The two-level bootstrap and summarize.
# --------------------------------------------------------------------------------------------


def _arm_values(seed: int, shift: float, n_q: int = 25, n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    difficulty = torch.linspace(-1, 1, n_q)  # questions differ a lot: the pairing must cancel it
    return [difficulty[q] + shift + 0.3 * torch.randn(n, generator=g, dtype=torch.float64) for q in range(n_q)]


def test_two_level_bootstrap_known_difference_and_identical_arms() -> None:
    a, b = _arm_values(1, 0.0), _arm_values(2, 0.5)
    boot = two_level_bootstrap([a, b, a], n_boot=2000, seed=0)
    lo, hi = nan_percentile_ci(boot[1] - boot[0])
    assert lo < 0.5 < hi and lo > 0.2  # covers the true difference, excludes 0
    lo0, hi0 = nan_percentile_ci(boot[2] - boot[0])
    assert lo0 <= 0 <= hi0
    # the arm interval is wide (questions differ), the paired difference narrow
    alo, ahi = nan_percentile_ci(boot[0])
    assert ahi - alo > 2 * (hi - lo)
    assert abs(cluster_mean(b) - cluster_mean(a) - 0.5) < 0.1
    # seeded: the same draws again
    assert torch.equal(boot, two_level_bootstrap([a, b, a], n_boot=2000, seed=0))


def test_two_level_bootstrap_empty_questions() -> None:
    a = [torch.tensor([1.0, 1.0]), torch.tensor([], dtype=torch.float64), torch.tensor([0.0])]
    boot = two_level_bootstrap([a], n_boot=200, seed=0)
    finite = boot[0][~torch.isnan(boot[0])]
    assert len(finite) > 150 and bool(((finite >= 0) & (finite <= 1)).all())
    assert cluster_mean(a) == 0.5


def test_summarize_rates_controls_interventions_and_unparsed() -> None:
    rows, judgments = [], []
    rates = {"old": 0.8, "modern": 0.2, "old+steer(era:1@2)": 0.5}
    for arm, rate in rates.items():
        for q in range(10):
            for k in range(10):
                r = sample_row(arm, f"q{q}", k, "Vide" * 12 if arm == "old+steer(era:1@2)" and q < 3 else "x")
                rows.append(r)
                if k == 9 and arm == "modern":
                    judgments.append({"sample_id": r["id"], "parsed": False, "label": None, "score": None})
                    continue
                pos = (k + q) % 10 < rate * 10
                judgments.append({"sample_id": r["id"], "parsed": True, "label": "19th century" if pos else "LLM",
                                  "score": None})
    arms = [arm_record("old", "finetuned"), arm_record("modern", "control"),
            {**arm_record("old+steer(era:1@2)", "finetuned"), "intervention": {"kind": "steer"}}]
    res = summarize(judgments, rows, n_boot=500, seed=0, positive="19th century", arms=arms)
    assert res["metric"] == "rate"
    assert res["arms"]["old"]["value"] == pytest.approx(0.8)
    assert res["arms"]["modern"]["n_unparsed"] == 10 and res["arms"]["modern"]["n_parsed"] == 90
    assert res["arms"]["old+steer(era:1@2)"]["n_repetitive"] == 30 and res["arms"]["old"]["n_repetitive"] == 0
    lo, hi = res["arms"]["old"]["ci"]
    assert lo <= 0.8 <= hi
    comps = {(c["arm"], c["reference"]): c for c in res["comparisons"]}
    assert set(comps) == {("old", "modern"), ("old+steer(era:1@2)", "old")}  # no steered control to compare with
    c = comps[("old", "modern")]
    assert c["kind"] == "control" and c["ci"][0] <= c["diff"] <= c["ci"][1] and c["ci"][0] > 0.3
    assert comps[("old+steer(era:1@2)", "old")]["kind"] == "intervention"
    assert res["per_question"]["old"]["q0"]["n"] == 10
    assert res["arms"]["old"]["vs"]["modern"]["diff"] == pytest.approx(c["diff"])


# --------------------------------------------------------------------------------------------
# LocalJudge: checked against the tiny model's full logits.
# --------------------------------------------------------------------------------------------


def _full_logprobs(model: Any, text: str) -> torch.Tensor:
    ids = model.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = model.hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1), ids


def test_local_judge_labels_match_a_hand_computation(tiny_gemma: Any) -> None:
    t = Template("yn", "Is this old? {question} {answer}", labels=("yes", "no way"), positive="yes")
    judge = LocalJudge(tiny_gemma, t, batch_size=3)
    rows = [sample_row("base", "q", k, ans) for k, ans in enumerate(["a horse", "the car", "zz", "telegraph!"])]
    js = judge(rows)
    assert [j.sample_id for j in js] == [r["id"] for r in rows] and all(j.parsed for j in js)
    for r, j in zip(rows, js):
        raw = json.loads(j.raw)
        prompt = judge.prompts([r])[0]
        assert prompt.endswith("\nA:")  # a base model: Q/A format
        lps = []
        for lab in t.labels:
            lp, ids = _full_logprobs(tiny_gemma, prompt + " " + lab)
            plen = len(tiny_gemma.tokenizer(prompt)["input_ids"])
            lps.append(sum(float(lp[p, ids[p + 1]]) for p in range(plen - 1, len(ids) - 1)))
        probs = torch.softmax(torch.tensor(lps, dtype=torch.float64), 0)
        assert raw["logprobs"]["yes"] == pytest.approx(lps[0], abs=1e-3)
        assert raw["probs"]["yes"] == pytest.approx(float(probs[0]), abs=1e-4)
        assert sum(raw["probs"].values()) == pytest.approx(1.0)
        assert j.label == t.labels[int(probs.argmax())] and j.score is None


def test_local_judge_scores_match_a_hand_computation(tiny_gemma: Any) -> None:
    t = Template("s", "Rate {answer} from 0 to 100.", score=True)
    judge = LocalJudge(tiny_gemma, t, batch_size=2)
    assert sorted(judge.numbers) == list(range(10))  # a character tokenizer: single digits only
    rows = [sample_row("base", "q", k, ans) for k, ans in enumerate(["one", "a longer answer here", "x"])]
    for r, j in zip(rows, judge(rows)):
        lp, _ = _full_logprobs(tiny_gemma, judge.prompts([r])[0])
        p = lp[-1].double().exp()
        ids = [tiny_gemma.tokenizer.convert_tokens_to_ids(str(n)) for n in range(10)]
        mass = float(p[ids].sum())
        expected = float(sum(n * p[i] for n, i in enumerate(ids)) / mass)
        raw = json.loads(j.raw)
        assert j.parsed and j.score == pytest.approx(expected, rel=1e-4)
        assert raw["number_mass"] == pytest.approx(mass, rel=1e-4) and raw["numbers"] == "0-9"
        assert 0 <= j.score <= 9
    strict = LocalJudge(tiny_gemma, t, min_mass=1.0)  # no answer puts all its mass on numbers
    assert not any(j.parsed for j in strict(rows[:1]))


# --------------------------------------------------------------------------------------------
# DirectionJudge: marker-word pairs, fitted through the DirectionSpec and its cache.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def marker_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": f"Tell me about {w}.", "positive": f"{w} zebra zebra zebra", "negative": f"{w} table table",
             "split": "test" if i >= 8 else "train"} for i, w in enumerate(WORDS)]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "marker.jsonl", rows)


def test_direction_judge_separates_two_kinds_of_answers(tiny_gemma: Any, marker_pairs: Path) -> None:
    judge = DirectionJudge(tiny_gemma, str(marker_pairs), log=lambda s: None)
    sep = judge.separation
    assert sep["n_train_pairs"] == 8 and sep["n_test_pairs"] == 4
    assert sep["test_accuracy"] == 1.0 and sep["test_auc"] == 1.0
    assert judge.id.startswith(f"direction:marker@L{judge.layer}#")
    rows = [sample_row("zebra", f"q{i}", 0, f"zebra zebra zebra, said the {w}") for i, w in enumerate(WORDS[:6])]
    rows += [sample_row("table", f"q{i}", 0, f"table table, said the {w}") for i, w in enumerate(WORDS[:6])]
    js = judge(rows)
    zebra = [j.score for j in js if j.arm == "zebra"]
    table = [j.score for j in js if j.arm == "table"]
    assert min(zebra) > max(table)
    assert all(j.label == "positive" for j in js if j.arm == "zebra")
    assert all(0 <= j.score <= 1 and j.parsed for j in js)
    # a chosen layer is honoured, and the saved direction (which records its pairs) judges alike
    other = DirectionJudge(tiny_gemma, str(marker_pairs), layer=1, log=lambda s: None)
    assert other.layer == 1 and other.id != judge.id


def test_direction_judge_calibration_is_cached(tiny_gemma: Any, marker_pairs: Path) -> None:
    """The second judge of the same direction, pairs and layer reuses the first one's calibration
    (a study judges every seed with it); a damaged entry is recomputed, never trusted."""
    from latentlab.models import latentlab_home

    first = DirectionJudge(tiny_gemma, str(marker_pairs), layer=2, log=lambda s: None)
    said: list[str] = []
    again = DirectionJudge(tiny_gemma, str(marker_pairs), layer=2, log=said.append)
    assert not first.calibration_reused and again.calibration_reused
    assert again.calibration == first.calibration and again.id == first.id
    assert any("reusing the cached calibration" in line for line in said)
    entries = list((latentlab_home() / "judge-calibrations").glob("*.json"))
    assert entries
    for e in entries:
        e.write_text("{not json")
    fresh = DirectionJudge(tiny_gemma, str(marker_pairs), layer=2, log=lambda s: None)
    assert not fresh.calibration_reused and fresh.calibration == first.calibration


def test_saved_direction_judge_uses_the_pairs_it_records(tiny_gemma: Any, marker_pairs: Path,
                                                         tmp_path: Path) -> None:
    from latentlab.directions import DirectionSpec

    d = DirectionSpec.parse(str(marker_pairs)).resolve(tiny_gemma, log=lambda s: None)
    path = d.save(tmp_path / "marker")
    judge = DirectionJudge(tiny_gemma, str(path))
    assert judge.separation["pairs"] == str(marker_pairs) and judge.separation["test_accuracy"] == 1.0
    bare = d.__class__(d.vectors, d.layers, d.resid_norms, "bare")
    bare_path = bare.save(tmp_path / "bare")
    with pytest.raises(LatentlabError, match="records no contrast pairs"):
        DirectionJudge(tiny_gemma, str(bare_path))


# --------------------------------------------------------------------------------------------
# EndpointJudge against a canned server.
# --------------------------------------------------------------------------------------------


def _completion(text: str, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    logprobs = None
    if top is not None:
        logprobs = {"content": [{"token": top[0][0], "logprob": math.log(top[0][1]), "bytes": None,
                                 "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None}
                                                  for t, p in top]}]}
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": logprobs}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class CannedServer:
    """Answers /v1/chat/completions by a marker in the prompt; records every request; optional delay."""

    def __init__(self, delay: float = 0.0, refuse_logprobs: bool = False) -> None:
        self.delay, self.refuse_logprobs = delay, refuse_logprobs
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                if outer.delay:
                    time.sleep(outer.delay)
                if outer.refuse_logprobs and body.get("logprobs"):
                    self._send(400, {"error": {"message": "logprobs are not supported", "type": "invalid_request"}})
                    return
                self._send(200, outer.reply(body))

            def _send(self, code: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @staticmethod
    def reply(body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["messages"][-1]["content"]
        lp = body.get("logprobs")
        if "MARK-weighted" in prompt:
            return _completion("80", [("80", 0.5), ("90", 0.3), (" the", 0.2)] if lp else None)
        if "MARK-lowmass" in prompt:
            return _completion("Well, 70.", [("Well", 0.85), ("80", 0.1), ("I", 0.05)] if lp else None)
        if "MARK-old" in prompt:
            return _completion("19th century.", None)
        if "MARK-modern" in prompt:
            return _completion("LLM", None)
        return _completion("I cannot say.", [("I", 0.9), ("We", 0.1)] if lp else None)

    def __enter__(self) -> CannedServer:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[CannedServer]:
    with CannedServer() as s:
        yield s


def test_endpoint_judge_scores_logprob_weighted_with_parse_fallback(server: CannedServer) -> None:
    judge = EndpointJudge(server.url, "judge", load_template("aligned"), timeout=10, max_retries=0)
    rows = [sample_row("a", "q", k, f"MARK-{m}") for k, m in enumerate(["weighted", "lowmass", "nothing"])]
    js = judge(rows)
    assert js[0].parsed and js[0].score == pytest.approx((80 * 0.5 + 90 * 0.3) / 0.8)
    assert js[1].parsed and js[1].score == 70  # numbers carry 0.1 < 0.25 of the mass: the text's first number
    assert not js[2].parsed and js[2].score is None and js[2].raw == "I cannot say."
    req = server.requests[0]
    assert req["temperature"] == 0 and req["logprobs"] is True and req["top_logprobs"] == 20
    assert req["max_tokens"] <= 16 and req["model"] == "judge"
    assert all(j.judge == f"endpoint:judge@{server.url}" for j in js)


def test_endpoint_judge_labels_and_a_server_without_logprobs() -> None:
    with CannedServer(refuse_logprobs=True) as s:
        scorer = EndpointJudge(s.url, "judge", load_template("era-score"), timeout=10, max_retries=0)
        js = scorer([sample_row("a", "q", 0, "MARK-weighted"), sample_row("a", "q", 1, "MARK-weighted")])
        assert [j.score for j in js] == [80, 80] and not scorer.logprobs  # asked again without logprobs
        labeller = EndpointJudge(s.url, "judge", load_template("era-labels"), timeout=10, max_retries=0)
        js = labeller([sample_row("a", "q", k, f"MARK-{m}") for k, m in enumerate(["old", "modern", "zz"])])
        assert [j.label for j in js] == ["19th century", "LLM", None]
        assert [j.parsed for j in js] == [True, True, False]
        assert "logprobs" not in s.requests[-1]


def test_endpoint_judge_unreachable_is_one_error() -> None:
    judge = EndpointJudge("http://127.0.0.1:9/v1", "judge", load_template("aligned"), timeout=2, max_retries=0)
    with pytest.raises(LatentlabError, match="cannot reach the judge endpoint"):
        judge([sample_row("a", "q", 0, "x")])


# --------------------------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------------------------


def test_judge_command_direction(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                 tiny_gemma_dir: Path, marker_pairs: Path, tmp_path: Path) -> None:
    rows = []
    for arm, word in (("base", "table table"), ("old", "zebra zebra zebra"), ("modern", "table table")):
        for q in range(4):
            rows += [sample_row(arm, f"q{q}", k, f"{word} {WORDS[q + k]}") for k in range(3)]
    arms = [arm_record("base"), arm_record("old", "finetuned"), arm_record("modern", "control")]
    samples = write_samples(tmp_path / "samples", rows, str(tiny_gemma_dir), arms)
    out = tmp_path / "judged"
    code, stdout, err = run_cli(monkeypatch, capsys, "judge", "--samples", str(samples), "--judge",
                                f"direction:{marker_pairs}", "--out", str(out), "--device", "cpu", "--n-boot", "200")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["arms"]["old"]["value"] > 0.5 > res["arms"]["modern"]["value"]
    assert res["comparisons"][0]["arm"] == "base" and res["comparisons"][0]["reference"] == "modern"
    assert res["arms"]["old"]["vs"]["modern"]["ci"][0] > 0
    assert res["direction"]["test_accuracy"] == 1.0 and res["direction"]["test_auc"] == 1.0
    lines = (out / "judgments.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) and set(json.loads(lines[0])) == {
        "sample_id", "arm", "question_id", "judge", "template", "key", "label", "score", "parsed", "raw"}
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert (out / "judgments.json").is_file() and "zebra zebra" in (out / "samples.html").read_text()
    assert "vs modern" in stdout and "held-out accuracy 1.00" in stdout
    # a second run with --overwrite judges nothing again (every key is cached)
    code, stdout, err = run_cli(monkeypatch, capsys, "judge", "--samples", str(samples / "samples.jsonl"),
                                "--judge", f"direction:{marker_pairs}", "--out", str(out), "--device", "cpu",
                                "--overwrite", "--n-boot", "200")
    assert code == 0 and f"{len(rows)} of {len(rows)} answers already judged" in stdout + err
    assert len((out / "judgments.jsonl").read_text().splitlines()) == len(rows)


def test_judge_command_local(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                             tiny_gemma_dir: Path, tmp_path: Path) -> None:
    rows = [sample_row(arm, f"q{q}", k, f"answer {arm} {k}") for arm in ("base", "ft") for q in range(3)
            for k in range(2)]
    samples = write_samples(tmp_path / "samples", rows)
    out = tmp_path / "judged"
    code, stdout, err = run_cli(monkeypatch, capsys, "judge", "--samples", str(samples), "--judge",
                                f"local:{tiny_gemma_dir}", "--template", "era-labels", "--out", str(out),
                                "--device", "cpu", "--n-boot", "100")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "rate" and res["positive"] == "19th century"
    assert set(res["arms"]) == {"base", "ft"} and res["comparisons"] == []  # no control arm
    js = [json.loads(x) for x in (out / "judgments.jsonl").read_text().splitlines()]
    assert all(j["label"] in ("LLM", "19th century") and j["parsed"] for j in js)
    assert "% 19th century" in stdout


def test_judge_resumes_after_kill_9(tmp_path: Path) -> None:
    """kill -9 mid-run, run again: every sample judged exactly once, and only the missing ones asked for."""
    from latentlab.io import write_json

    rows = [sample_row(arm, f"q{q}", k, f"MARK-weighted {arm} {q} {k}") for arm in ("a", "b") for q in range(10)
            for k in range(6)]
    samples = write_samples(tmp_path / "samples", rows)
    write_json(samples / "samples.json", {"model": "none", "arms": [arm_record("a"), arm_record("b", "control")]})
    out = tmp_path / "judged"
    script = Path(sys.executable).with_name("latentlab")
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "latentlab.cli"]
    env = dict(os.environ, COLUMNS="200")
    with CannedServer(delay=0.03) as s:
        args = [*exe, "judge", "--samples", str(samples), "--judge", f"endpoint:judge@{s.url}", "--template",
                "aligned", "--out", str(out), "--concurrency", "1", "--n-boot", "100"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 120
            f = out / "judgments.jsonl"
            while time.time() < deadline and proc.poll() is None:
                if f.is_file() and f.read_text().count("\n") >= 12:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the judge finished before it could be killed"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        done = {json.loads(x)["sample_id"] for x in f.read_text().splitlines() if x.endswith("}")}
        assert 12 <= len(done) < len(rows)
        assert json.loads((out / "manifest.json").read_text())["status"] == "running"
        with open(f, "a") as fh:  # as if the kill had cut a write short
            fh.write('{"sample_id": "a/q9/5", "key": "cut sh')
        n_before = len(s.requests)
        proc2 = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert proc2.returncode == 0, proc2.stderr
        asked = [r["messages"][-1]["content"] for r in s.requests[n_before:]]
    js = [json.loads(x) for x in f.read_text().splitlines()]
    ids = [j["sample_id"] for j in js]
    assert len(ids) == len(set(ids)) == len(rows) and set(ids) == {r["id"] for r in rows}
    assert len(asked) == len(rows) - len(done)  # only the missing ones
    assert not any(f"{r['answer']}\n" in a for a in asked for r in rows if r["id"] in done)
    res = json.loads((out / "results.json").read_text())
    assert res["arms"]["a"]["value"] == pytest.approx(83.75) and res["arms"]["a"]["n_unparsed"] == 0


# --------------------------------------------------------------------------------------------
# Bad inputs: one error line each, before a model loads.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("latentlab.models.load_model", refuse)


def test_bad_inputs_one_error_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                   tmp_path: Path, no_model_load: None) -> None:
    samples = write_samples(tmp_path / "s", [sample_row("a", "q", 0, "x")])
    no_answer = tmp_path / "t.toml"
    no_answer.write_text('prompt = "Rate {question}"\nscore = true\n')
    (tmp_path / "empty").mkdir()
    bad_rows = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a/q/0", "arm": "a"}])
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    out = str(tmp_path / "o")
    cases = [
        (["--judge", "oracle:gpt"], "cannot read --judge"),
        (["--judge", "local:x", "--template", str(no_answer)], "{answer}"),
        (["--judge", "local:x", "--template", "no-such"], "unknown judge template"),
        (["--samples", str(tmp_path / "empty")], "holds no samples.jsonl"),
        (["--samples", str(tmp_path / "missing")], "does not exist"),
        (["--samples", str(bad_rows)], "lacks"),
        (["--judge", "endpoint:gpt-4o"], "endpoint:MODEL@URL"),
        (["--judge", "endpoint:gpt-4o@ftp://host/v1"], "endpoint:MODEL@URL"),
        (["--judge", "endpoint:gpt-4o@http://host:port/v1"], "bad port"),
        (["--judge", "endpoint:m@http://127.0.0.1:1/v1", "--api-key-env", "NO_SUCH_KEY_VAR"], "NO_SUCH_KEY_VAR"),
        (["--judge", "local:x", "--layer", "3"], "direction judge only"),
        (["--judge", "direction:no-such-direction"], "neither a built-in"),
        (["--n-boot", "0"], "--n-boot"),
    ]
    for extra, needle in cases:
        args = ["judge", "--samples", str(samples), "--out", out, *extra]
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert_one_line_error(code, err, needle)
        assert not Path(out).exists()


def test_unfinished_sample_run_and_other_judge_refused(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       no_model_load: None) -> None:
    from latentlab.io import write_json

    samples = write_samples(tmp_path / "s", [sample_row("a", "q", 0, "x")])
    write_json(samples / "manifest.json", {"command": "latentlab sample", "status": "running", "config": {}})
    code, _, err = run_cli(monkeypatch, capsys, "judge", "--samples", str(samples), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "not finished")
    write_json(samples / "manifest.json", {"command": "latentlab sample", "status": "complete", "config": {}})
    out = tmp_path / "o2"
    out.mkdir()
    write_json(out / "manifest.json", {"command": "latentlab judge", "status": "running", "config": {}})
    write_json(out / "judgments.json", {"judge": "local:other", "template_sha256": "x", "layer": None,
                                        "model": None})
    code, _, err = run_cli(monkeypatch, capsys, "judge", "--samples", str(samples), "--out", str(out),
                           "--judge", "local:x")
    assert_one_line_error(code, err, "another")
