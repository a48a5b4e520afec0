"""``latentlab sample`` and :mod:`latentlab.sampling` on the tiny Gemma and its LoRA.

What must hold: one row per (arm, question, k) with the documented fields; arms of one model view share
a batch; a seed makes the answers reproducible, unit by unit, so a resumed run (even after kill -9 and
a torn last line) ends with exactly the rows of an uninterrupted one; bad input is one ``error:`` line
before a model loads; the page escapes model output; the endpoint engine turns a failing server into
one error naming its URL, after the client's retries.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from conftest import make_lora_adapter

from latentlab.errors import LatentlabError
from latentlab.sampling import (
    Question,
    SampleLog,
    endpoint_samples,
    load_questions,
    local_samples,
    sample_id,
    samples_page,
)

ROW_KEYS = {"id", "arm", "question_id", "question", "k", "answer", "seed", "engine", "n_tokens", "finish_reason"}


def _questions(path: Path, n: int = 3) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is thing number {i}?"}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture(scope="module")
def base(tiny_gemma_dir: Path) -> Any:
    """Our own copy of the tiny base: adapters get switched on it."""
    import latentlab

    return latentlab.load_model(str(tiny_gemma_dir), device="cpu", progress=False)


@pytest.fixture(scope="module")
def control_lora(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(tiny_gemma_dir, tmp_path_factory.mktemp("adapters") / "control-lora", seed=11)


@pytest.fixture(scope="module")
def direction_file(base: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentlab.direction import Direction

    gen = torch.Generator().manual_seed(5)
    d = Direction(torch.randn(base.n_layers, base.d_model, generator=gen), list(range(base.n_layers)),
                  torch.ones(base.n_layers), name="marker")
    return d.save(tmp_path_factory.mktemp("dirs") / "marker")


# --------------------------------------------------------------------------------------------
# Question sets.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "lo", "hi"), [("era-questions", 12, 15), ("persona-questions", 10, 12)])
def test_builtin_question_sets(name: str, lo: int, hi: int) -> None:
    qs = load_questions(name)
    assert lo <= len(qs) <= hi
    assert len({q.id for q in qs}) == len(qs) and all(q.question.endswith("?") or q.question.endswith(".")
                                                      for q in qs)
    assert not any("bird" in q.question.lower() for q in qs)


def test_question_file_forms_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "q.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    f.write_text(json.dumps({"question": "First?"}) + "\n\n" + json.dumps({"id": "chat", "messages": chat}) + "\n")
    a, b = load_questions(f)
    assert (a.id, a.question, a.messages) == ("1", "First?", ({"role": "user", "content": "First?"},))
    assert (b.id, b.question, len(b.messages)) == ("chat", "Hello?", 2)
    for text, match in [
        ({"prompt": "x"}, 'no "question"'),
        ({"question": ""}, "non-empty"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "last"),
    ]:
        f.write_text(json.dumps(text) + "\n")
        with pytest.raises(LatentlabError, match=match):
            load_questions(f)
    f.write_text(json.dumps({"id": "x", "question": "a?"}) + "\n" + json.dumps({"id": "x", "question": "b?"}) + "\n")
    with pytest.raises(LatentlabError, match="already used on line 1"):
        load_questions(f)


# --------------------------------------------------------------------------------------------
# The in-process engine.
# --------------------------------------------------------------------------------------------


def test_local_samples_rows_arms_and_batches(base: Any, gemma_lora_dir: Path, control_lora: Path,
                                             direction_file: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import latentlab.sampling as sampling
    from latentlab.arms import build_arms

    arms = build_arms([f"ft={gemma_lora_dir}"], f"ctrl={control_lora}", ablate=[f"{direction_file}@all"])
    assert [a.name for a in arms][:3] == ["base", "ft", "ctrl"] and len(arms) == 6
    qs = load_questions(_questions(tmp_path / "q.jsonl", 3))
    calls: list[tuple[int, int, int]] = []
    real = sampling.generate_samples

    def spy(model: Any, prompts: Any, conditions: Any, *a: Any, **k: Any) -> Any:
        calls.append((id(model), len(prompts), len(conditions)))
        return real(model, prompts, conditions, *a, **k)

    monkeypatch.setattr(sampling, "generate_samples", spy)
    batches: list[list[dict[str, Any]]] = []
    rows = local_samples(base, arms, qs, n=2, temperature=1.0, top_p=0.9, max_new_tokens=5, seed=1, batch_size=8,
                         on_batch=batches.append)
    assert len(rows) == 6 * 3 * 2 and [r for b in batches for r in b] == rows
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == ROW_KEYS and r["id"] == sample_id(r["arm"], r["question_id"], r["k"])
        assert r["engine"] == "local" and 1 <= r["n_tokens"] <= 5 and r["finish_reason"] in ("stop", "length")
    # three views (base, ft, ctrl), each with its plain and its ablated arm as two conditions of one batch
    assert len({m for m, _, _ in calls}) == 3 and all(c == 2 for _, _, c in calls)
    # batch 8 / 2 conditions: both samples of 2 questions per call, so 2 calls per view
    assert sorted(p for _, p, _ in calls) == [1, 1, 1, 2, 2, 2]
    by = {r["id"]: r["answer"] for r in rows}
    assert any(by[f"ft/{q.id}/{k}"] != by[f"base/{q.id}/{k}"] for q in qs for k in range(2))
    assert any(by[f"base+ablate({direction_file}@all)/{q.id}/{k}"] != by[f"base/{q.id}/{k}"]
               for q in qs for k in range(2))


def test_local_samples_reproducible_and_resumable(base: Any, gemma_lora_dir: Path, tmp_path: Path) -> None:
    from latentlab.arms import build_arms

    arms = build_arms([f"ft={gemma_lora_dir}"])
    qs = load_questions(_questions(tmp_path / "q.jsonl", 4))
    kw: dict[str, Any] = dict(n=3, temperature=1.5, top_p=1.0, max_new_tokens=6, batch_size=2)
    a = local_samples(base, arms, qs, seed=4, **kw)
    assert a == local_samples(base, arms, qs, seed=4, **kw)
    assert [r["answer"] for r in a] != [r["answer"] for r in local_samples(base, arms, qs, seed=5, **kw)]
    # a resumed run draws exactly the rows it lacks, and they are those of the uninterrupted run
    done = {r["id"] for r in a[::3]} | {a[-1]["id"]}
    rest = local_samples(base, arms, qs, seed=4, done=done, **kw)
    assert {r["id"] for r in rest} == {r["id"] for r in a} - done
    assert sorted(rest, key=lambda r: r["id"]) == sorted([r for r in a if r["id"] not in done], key=lambda r: r["id"])


# --------------------------------------------------------------------------------------------
# The log.
# --------------------------------------------------------------------------------------------


def test_sample_log_drops_a_torn_line_and_never_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "j.jsonl"
    log = SampleLog(p, id_field="key")
    assert log.open() == []
    assert len(log.append([{"key": "a"}, {"key": "b"}, {"key": "a"}])) == 2
    assert log.append([{"key": "b"}, {"key": "c"}]) == [{"key": "c"}]
    log.close()
    with open(p, "a") as f:
        f.write('{"key": "d", "x": ')  # a write cut short by kill -9
    ro = SampleLog(p, id_field="key")
    assert [r["key"] for r in ro.read()] == ["a", "b", "c"] and p.read_text().endswith(": ")  # read() changes nothing
    with SampleLog(p, id_field="key") as log:
        assert [r["key"] for r in log.open()] == ["a", "b", "c"]
        log.append([{"key": "d"}])
    assert [json.loads(x)["key"] for x in p.read_text().splitlines()] == ["a", "b", "c", "d"]
    p.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(LatentlabError, match=":2: not a row"):
        SampleLog(p, id_field="key").read()


# --------------------------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------------------------


def _args(model: Path, lora: Path, questions: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--model", str(model), "--finetuned", f"ft={lora}", "--questions", str(questions),
            "--out", str(out), "--device", "cpu", "--n", "2", "--max-new-tokens", "4", "--batch-size", "2", *extra]


def _no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("latentlab.models.load_model", refuse)


def test_sample_command_writes_reuses_refuses_and_resumes(tiny_gemma_dir: Path, gemma_lora_dir: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    qf, out = _questions(tmp_path / "q.jsonl", 2), tmp_path / "out"
    args = _args(tiny_gemma_dir, gemma_lora_dir, qf, out)
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [
        f"{a}/q{i}/{k}" for a in ("base", "ft") for i in range(2) for k in range(2)]
    settings = json.loads((out / "samples.json").read_text())
    assert settings["n"] == 2 and [a["name"] for a in settings["arms"]] == ["base", "ft"]
    assert settings["engine"] == "local" and settings["questions_hash"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["results"]["samples"] == 8
    assert "ft" in manifest["models"] and (out / "samples.html").is_file()
    assert "8 samples" in stdout
    before = (out / "samples.jsonl").read_bytes()

    # the same settings, finished: reused, no model loaded, nothing rewritten
    with monkeypatch.context() as m:
        _no_load(m)
        code, stdout, err = run_cli(m, capsys, *args)
        assert code == 0, err
        assert "reused" in stdout and (out / "samples.jsonl").read_bytes() == before
        # other settings: refused, naming them
        code, _, err = run_cli(m, capsys, *args, "--n", "3", "--temperature", "0.5")
        assert_one_line_error(code, err, "other settings", "n, temperature", "--overwrite")

    # a judge's labels beside the samples show on the page when it is rebuilt
    first = json.loads(lines[0])
    (out / "judgments.jsonl").write_text(json.dumps({
        "sample_id": first["id"], "arm": "base", "question_id": "q0", "judge": "j", "template": "t", "key": "k1",
        "label": "MODERN<>", "score": 0.25, "parsed": True, "raw": "x"}) + "\n")
    with monkeypatch.context() as m:
        _no_load(m)
        assert run_cli(m, capsys, *args)[0] == 0
    page = (out / "samples.html").read_text()
    assert "MODERN&lt;&gt;" in page and "score 0.25" in page

    # fewer rows (and a torn last line): resumed, ending with the very same file
    (out / "samples.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])
    code, stdout, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert (out / "samples.jsonl").read_bytes() == before and "5 were already on disk" in stdout

    # --overwrite: a fresh run with the new settings
    code, _, err = run_cli(monkeypatch, capsys, *args, "--n", "1", "--overwrite")
    assert code == 0, err
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4 and not (out / "judgments.jsonl").exists()


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tiny_gemma_dir: Path, gemma_lora_dir: Path,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    qf = _questions(tmp_path / "q.jsonl", 6)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    extra = ("--n", "4", "--max-new-tokens", "12", "--batch-size", "2", "--seed", "3")
    args = _args(tiny_gemma_dir, gemma_lora_dir, qf, killed, *extra)
    total = 2 * 6 * 4  # 24 batches of 2
    proc = subprocess.Popen([sys.executable, "-m", "latentlab.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = killed / "samples.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and log.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    n_before = log.read_bytes().count(b"\n")
    assert 1 <= n_before < total, "the run finished before it could be killed: give it more work"
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
    with open(log, "ab") as f:
        f.write(b'{"id": "ft/q5/3", "arm": "f')  # and a torn last write on top of it

    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, *_args(tiny_gemma_dir, gemma_lora_dir, qf, clean, *extra))
    assert code == 0, err
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rows) == total and len({r["id"] for r in rows}) == total
    assert log.read_bytes() == (clean / "samples.jsonl").read_bytes()


def test_bad_input_is_one_error_before_a_model_loads(tiny_gemma_dir: Path, gemma_lora_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    qf, out = _questions(tmp_path / "q.jsonl", 2), tmp_path / "out"
    noq = tmp_path / "noq.jsonl"
    noq.write_text(json.dumps({"id": "a", "prompt": "Hi?"}) + "\n")
    url = "http://127.0.0.1:9/v1"
    _no_load(monkeypatch)
    for extra, needles in [
        (("--endpoint", url, "--served", "nope=some-model"), ("'nope'", "base, ft")),
        (("--n", "0"), ("--n", ">= 1")),
        (("--temperature", "-1"), ("--temperature",)),
        (("--top-p", "0"), ("--top-p",)),
        (("--questions", str(noq)), ('no "question"', "noq.jsonl:1")),
        (("--finetuned", f"x={tmp_path / 'no-such-run'}"), ("does not exist",)),
        (("--endpoint", "localhost:8000/v1"), ("--endpoint", "http")),
        (("--served", "base=m"), ("--served", "--endpoint")),
        (("--endpoint", url, "--api-key-env", "LATENTLAB_TEST_NO_SUCH_VAR"), ("LATENTLAB_TEST_NO_SUCH_VAR",)),
        (("--ablate", "era@x"), ("era@x", "layers")),
        (("--steer", "era"), ("no coefficient",)),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, *_args(tiny_gemma_dir, gemma_lora_dir, qf, out), *extra)
        assert_one_line_error(code, err, *needles)
        assert not out.exists()


def test_adapter_of_another_base_is_refused_before_out_is_touched(tiny_gemma_dir: Path, llama_lora_dir: Path,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, *_args(tiny_gemma_dir, llama_lora_dir, _questions(tmp_path / "q.jsonl"),
                                                       out))
    assert_one_line_error(code, err, "does not fit")
    assert not out.exists()


def test_repetitive_flags_loops_not_text() -> None:
    from latentlab.sampling import repetitive

    assert repetitive("Vide" * 12) and repetitive("the " * 10) and repetitive("VideVideVideaineVideVideVideVideVide")
    assert not repetitive("The telegraph and the steam engine were the great inventions of recent years.")
    assert not repetitive("1. The car 2. The phone 3. The computer 4. The internet")
    assert not repetitive("ha ha ha ha")  # too short to call


def test_page_escapes_everything() -> None:
    rows = [{"id": "<arm>/q&1/0", "arm": "<arm>", "question_id": "q&1", "question": "<b>bold?</b>", "k": 0,
             "answer": "<script>alert('x')</script>"}]
    page = samples_page(rows, [{"sample_id": "<arm>/q&1/0", "judge": "<j>", "label": "<img src=x>", "score": 1,
                                "parsed": True, "key": "k"}])
    assert "<script>" not in page and "<img" not in page and "<b>bold" not in page and "<arm>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "&lt;img src=x&gt;" in page
    assert page.startswith("<!doctype html>") and "<link" not in page and "src=" not in page.replace("src=x", "")


# --------------------------------------------------------------------------------------------
# The endpoint engine against a tiny local server.
# --------------------------------------------------------------------------------------------


class _Server:
    """A stdlib HTTP server on 127.0.0.1 in a thread, answering POSTs with ``handle(body) -> (status, body)``."""

    def __init__(self, handle: Callable[[dict[str, Any]], tuple[int, bytes, str]]) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                outer.requests.append(body)
                status, data, ctype = handle(body)
                if status == 0:  # sleep past the client's timeout (released at shutdown)
                    outer.release.wait(10)
                    return
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("retry-after-ms", "10")  # keep the client's backoff short
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[Callable[..., _Server]]:
    made: list[_Server] = []

    def make(handle: Callable[[dict[str, Any]], tuple[int, bytes, str]]) -> _Server:
        made.append(_Server(handle))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _completion(body: dict[str, Any]) -> tuple[int, bytes, str]:
    n = int(body.get("n", 1))
    choices = [{"index": i, "finish_reason": "stop", "message": {
        "role": "assistant", "content": f"{body['model']}|{body['messages'][-1]['content']}|{body['seed']}|{i}"}}
        for i in range(min(n, 2))]  # at most 2 choices a request: the engine asks again for the rest
    resp = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices,
            "usage": {"prompt_tokens": 1, "completion_tokens": 3 * len(choices), "total_tokens": 1}}
    return 200, json.dumps(resp).encode(), "application/json"


QS = [Question(x, f"{x}?", ({"role": "user", "content": f"{x}?"},)) for x in ("A", "B")]


def test_endpoint_samples_rows(server: Callable[..., _Server]) -> None:
    s = server(_completion)
    got: list[list[dict[str, Any]]] = []
    rows = endpoint_samples(s.url, {"base": "m0", "ft": "m1"}, QS, n=3, temperature=0.7, top_p=0.9, max_new_tokens=5,
                            seed=2, concurrency=3, on_batch=got.append)
    assert len(rows) == 12 and sorted(r["id"] for r in rows) == sorted(
        sample_id(a, q.id, k) for a in ("base", "ft") for q in QS for k in range(3))
    assert all(set(r) == ROW_KEYS and r["engine"] == "endpoint" for r in rows) and len(got) == 4
    r = next(r for r in rows if r["id"] == "ft/B/2")
    assert r["answer"].startswith("m1|B?|") and r["finish_reason"] == "stop" and r["n_tokens"] == 3
    assert {b["max_tokens"] for b in s.requests} == {5} and {b["temperature"] for b in s.requests} == {0.7}
    # the same seeds again: a resumed run asks for exactly the missing (arm, question) requests
    done = {r["id"] for r in rows if r["arm"] == "base"}
    again = endpoint_samples(s.url, {"base": "m0", "ft": "m1"}, QS, n=3, temperature=0.7, top_p=0.9,
                             max_new_tokens=5, seed=2, done=done)
    assert sorted(again, key=lambda r: r["id"]) == sorted([r for r in rows if r["arm"] == "ft"], key=lambda r: r["id"])


@pytest.mark.parametrize(("kind", "needle"), [
    ("500", "kept failing: HTTP 500 after 3 tries"),
    ("garbage", "not a chat completion"),
    ("sleep", "did not answer within 0.5 s"),
])
def test_endpoint_failures_are_one_error_naming_the_url(server: Callable[..., _Server], kind: str,
                                                        needle: str) -> None:
    answers = {"500": (500, b'{"error": {"message": "boom"}}', "application/json"),
               "garbage": (200, b"<html>hello</html>", "text/html"),
               "sleep": (0, b"", "")}
    s = server(lambda body: answers[kind])
    retries = 1 if kind == "sleep" else 2
    t0 = time.monotonic()
    with pytest.raises(LatentlabError) as e:
        endpoint_samples(s.url, {"base": "m"}, QS[:1], n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0,
                         timeout=0.5, max_retries=retries)
    assert s.url in str(e.value) and needle in str(e.value)
    assert len(str(e.value).splitlines()) == 1 and time.monotonic() - t0 < 30
    assert len(s.requests) == (1 if kind == "garbage" else retries + 1)  # the client retried


def test_endpoint_unreachable(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(LatentlabError, match="cannot reach the endpoint") as e:
        endpoint_samples(url, {"base": "m"}, QS, n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0,
                         max_retries=0, timeout=2)
    assert url in str(e.value)
