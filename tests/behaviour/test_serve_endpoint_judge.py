"""The endpoint sampler and judge against a real ``latentlab serve`` process on 127.0.0.1.

The served model is a tiny Gemma built so that its replies are readable: after any other character it
puts nearly all its mass on the digits, after a digit on a space, so greedy replies look like
``9 9 9 9`` (a label template over the digits parses them) and the first reply token's top
logprobs are almost all numbers (a score template is read logprob-weighted, not from the text).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run_cli
from conftest import make_char_tokenizer, make_lora_adapter, tiny_gemma_config

from latentlab.judging import EndpointJudge, load_template, parse_label, parse_score

KEY = "sk-endpoint-judge"
STARTUP_S = 90
LABELS = [str(d) for d in range(10)]


def _digit_model(folder: Path) -> Path:
    """Tiny random Gemma with untied embeddings: every input embedding leans along ``u`` (a digit's against
    it), the digits' unembeddings along ``u`` and the space's against it."""
    from transformers import AutoModelForCausalLM

    config = tiny_gemma_config()
    config.tie_word_embeddings = False
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tok = make_char_tokenizer()
    digits = [tok.convert_tokens_to_ids(d) for d in LABELS]
    u = torch.nn.functional.normalize(torch.randn(config.hidden_size), dim=0)
    with torch.no_grad():
        emb, unemb = model.model.embed_tokens.weight, model.lm_head.weight
        emb += 0.5 * u
        emb[digits] -= 1.0 * u
        unemb[digits] = 3.0 * u + 0.2 * torch.randn(len(digits), config.hidden_size)
        unemb[tok.convert_tokens_to_ids(" ")] = -3.0 * u
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _models_status(url: str) -> int:
    req = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return int(r.status)


@contextmanager
def _serve(model: Path, adapter: Path, root: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``latentlab serve`` in its own process, up within STARTUP_S, and always stopped (terminate, then kill)."""
    port = _free_port()
    env = {**os.environ, "LATENTLAB_HOME": str(root / "home"), "LL_JUDGE_KEY": KEY}
    cmd = [sys.executable, "-m", "latentlab.cli", "serve", "-m", str(model), "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--served-name", "base", "--adapter", f"old={adapter}", "--api-key-env",
           "LL_JUDGE_KEY", "--batch-window-ms", "20"]
    with (root / "stderr").open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + STARTUP_S
            while True:
                assert proc.poll() is None, f"the server exited ({proc.returncode}): {(root / 'stderr').read_text()}"
                try:
                    if _models_status(url) == 200:
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                assert time.monotonic() < deadline, f"no answer in {STARTUP_S} s: {(root / 'stderr').read_text()}"
                time.sleep(0.2)
            yield url, proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(15)


def _jsonl(p: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in p.read_text().splitlines()]


def test_endpoint_sample_and_judge_against_latentlab_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = _digit_model(tmp_path / "digit-gemma")
    adapter = make_lora_adapter(model, tmp_path / "old-lora", seed=3, std=0.05)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(
        ["What is new?", "How do you travel?", "Who leads the country?"])))
    labels = tmp_path / "digit-labels.toml"
    labels.write_text('prompt = """Question: {question}\nAnswer: {answer}\nWhich digit is it?"""\n'
                      f"labels = {json.dumps(LABELS)}\npositive = \"9\"\n")
    score = tmp_path / "digit-score.toml"
    score.write_text('prompt = """Question: {question}\nAnswer: {answer}\nRate it from 0 to 100."""\nscore = true\n')
    monkeypatch.setenv("LL_JUDGE_KEY", KEY)
    t0 = time.monotonic()
    with _serve(model, adapter, tmp_path) as (url, proc):
        code, _, err = run_cli(monkeypatch, capsys, "sample", "-m", str(model), "--control", f"old={adapter}",
                               "--questions", str(questions), "--n", "2", "--max-new-tokens", "8", "--endpoint", url,
                               "--api-key-env", "LL_JUDGE_KEY", "--out", str(tmp_path / "samples"))
        assert code == 0, err
        rows = _jsonl(tmp_path / "samples" / "samples.jsonl")
        assert len(rows) == 2 * 3 * 2 and {r["engine"] for r in rows} == {"endpoint"}
        assert {r["arm"] for r in rows} == {"base", "old"} and len({r["id"] for r in rows}) == len(rows)

        judged = {}
        for name, template in (("labels", labels), ("score", score)):
            out = tmp_path / f"judge-{name}"
            code, _, err = run_cli(monkeypatch, capsys, "judge", "--samples", str(tmp_path / "samples"), "--judge",
                                   f"endpoint:base@{url}", "--template", str(template), "--api-key-env",
                                   "LL_JUDGE_KEY", "--out", str(out), "--n-boot", "100")
            assert code == 0, err
            judged[name] = (_jsonl(out / "judgments.jsonl"), json.loads((out / "results.json").read_text()))

        # an independent request for one answer: its top logprobs give the score the judge must have read
        from openai import OpenAI

        tmpl = load_template(score)
        client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)
        r = client.chat.completions.create(model="base", messages=EndpointJudge(url, "base", tmpl, KEY).messages(
            rows[0]), temperature=0, max_tokens=8, logprobs=True, top_logprobs=20)
        top = [(int(t.token), math.exp(t.logprob)) for t in r.choices[0].logprobs.content[0].top_logprobs
               if t.token.strip().isdigit()]
        expected = sum(n * p for n, p in top) / sum(p for _, p in top)
    assert proc.returncode is not None  # the server is gone ...
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])))  # ... and its port is closed

    js, res = judged["labels"]
    assert len(js) == len(rows) and {j["sample_id"] for j in js} == {r["id"] for r in rows}
    for j in js:  # a label is the first one the reply names; parsed exactly when there is one
        assert j["label"] == parse_label(j["raw"], LABELS) and j["parsed"] == (j["label"] is not None)
    assert all(j["parsed"] for j in js), [j["raw"] for j in js]  # greedy replies read "9 9 9 ..."
    assert res["metric"] == "rate" and res["positive"] == "9"
    for arm in ("base", "old"):
        a = res["arms"][arm]
        assert a["n"] == 6 and a["n_unparsed"] == sum(1 for j in js if j["arm"] == arm and not j["parsed"]) == 0
    assert res["comparisons"][0]["arm"] == "base" and res["comparisons"][0]["reference"] == "old"

    js, res = judged["score"]
    assert len(js) == len(rows) and all(j["parsed"] for j in js)
    assert res["metric"] == "mean" and all(res["arms"][a]["n_unparsed"] == 0 for a in ("base", "old"))
    for j in js:  # logprob-weighted: a mean over the digits, not the integer the text starts with
        assert 0 <= j["score"] <= 9 and j["score"] != round(j["score"]) and j["score"] != parse_score(j["raw"])
    first = next(j for j in js if j["sample_id"] == rows[0]["id"])
    assert first["score"] == pytest.approx(expected, abs=1e-4)
    assert time.monotonic() - t0 < 120
