"""``latentlab serve``: a real server process on the tiny Gemma and its LoRA, driven by the ``openai`` client.

One server process for the module (loading it is most of the time): the base as ``base``, the LoRA as
``old``, an API key. Answers are compared with in-process generation on the same model, view and
condition (greedy), and the log-probabilities with a plain log-softmax of the model's logits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from latentlab.activations import collect
from latentlab.arms import condition_for
from latentlab.data import render_prompt
from latentlab.directions import fit_direction
from latentlab.generation import generate_samples
from latentlab.interventions import parse_intervention

KEY = "sk-test-latentlab"
STARTUP_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, key: str | None = KEY) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def direction_file(tiny_gemma: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mean-difference direction fitted on the tiny model, saved as any command saves one."""
    pos = collect(tiny_gemma, ["In 1850 the sparrow", "The old carriage", "A gentleman wrote", "By candle light"],
                  "all", "last", progress=False)
    neg = collect(tiny_gemma, ["My phone app", "The laptop screen", "An email arrived", "Online today"],
                  "all", "last", progress=False)
    return fit_direction(pos, neg, name="era").save(tmp_path_factory.mktemp("dir") / "era-dir")


@pytest.fixture(scope="module")
def server(tiny_gemma_dir: Path, gemma_lora_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``latentlab serve`` in its own process, stopped (terminate, then kill) whatever the tests do."""
    root = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = {**os.environ, "LATENTLAB_HOME": str(root / "home"), "LL_SERVE_KEY": KEY}
    cmd = [sys.executable, "-m", "latentlab.cli", "serve", "-m", str(tiny_gemma_dir), "--device", "cpu",
           "--served-name", "base", "--adapter", f"old={gemma_lora_dir}", "--port", str(port),
           "--api-key-env", "LL_SERVE_KEY", "--batch-window-ms", "50"]
    out, err = (root / "stdout").open("w"), (root / "stderr").open("w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}): {(root / 'stderr').read_text()}"
            try:
                if _get(f"{url}/models")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no answer in {STARTUP_S} s: {(root / 'stderr').read_text()}"
            time.sleep(0.25)
        yield {"url": url, "proc": proc, "root": root}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
        out.close()
        err.close()


@pytest.fixture(scope="module")
def client(server: dict[str, Any]) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(tiny_gemma_dir: Path, gemma_lora_dir: Path, load_tiny: Callable[..., Any]) -> dict[str, Any]:
    """The same base in this process (a copy of its own: the adapter is switched on it) and its LoRA view."""
    base = load_tiny(tiny_gemma_dir)
    return {"base": base, "old": base.with_adapter(gemma_lora_dir, label="old")}


def _greedy(model: Any, prompt: str, n_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by full forward passes, and the log-softmax at each step (the plain reference)."""
    from latentlab.arch import stop_token_ids

    ids = list(model.tokenizer(prompt)["input_ids"])
    stops = stop_token_ids(model)
    new: list[int] = []
    lps: list[torch.Tensor] = []
    for _ in range(n_new):
        with torch.no_grad():
            lp = torch.log_softmax(model.hf_model(torch.tensor([ids + new])).logits[0, -1].float(), -1)
        t = int(lp.argmax())
        if t in stops:
            break
        new.append(t)
        lps.append(lp)
    return new, lps


def test_models_lists_the_base_and_the_adapter(server: dict[str, Any], client: Any) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "old"]
    assert _get(f"{server['url']}/models")[1]["data"][1]["parent"] == "base"


def test_chat_and_completions_equal_in_process_generation(client: Any, local: dict[str, Any]) -> None:
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hello"}],
                                       temperature=0, max_tokens=10)
    want = generate_samples(local["base"], [render_prompt("Hello", local["base"].tokenizer)], max_new_tokens=10)
    assert r.choices[0].message.content == want[0][0][0] and r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    c = client.completions.create(model="base", prompt=["Tell me", "zzz"], temperature=0, max_tokens=10)
    want = generate_samples(local["base"], ["Tell me", "zzz"], max_new_tokens=10)
    assert [ch.text for ch in c.choices] == [want[0][0][0], want[0][1][0]]
    assert [ch.index for ch in c.choices] == [0, 1] and c.choices[0].finish_reason == "length"


def test_the_adapter_by_model_name(client: Any, local: dict[str, Any]) -> None:
    msgs = [{"role": "user", "content": "Hello"}]
    base = client.chat.completions.create(model="base", messages=msgs, temperature=0, max_tokens=10)
    old = client.chat.completions.create(model="old", messages=msgs, temperature=0, max_tokens=10)
    want = generate_samples(local["old"], [render_prompt("Hello", local["old"].tokenizer)], max_new_tokens=10)
    assert old.choices[0].message.content == want[0][0][0]
    assert old.choices[0].message.content != base.choices[0].message.content
    assert old.model == "old"


def test_n_samples(client: Any) -> None:
    greedy = client.completions.create(model="base", prompt="Hello", n=2, temperature=0, max_tokens=6)
    assert len(greedy.choices) == 2 and greedy.choices[0].text == greedy.choices[1].text
    kw: dict[str, Any] = {"model": "old", "messages": [{"role": "user", "content": "Hello"}], "n": 3,
                          "temperature": 1.5, "max_tokens": 8, "seed": 11}
    a = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.message.content for c in a.choices}) > 1  # sampled: the three differ
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # the seed decides


def test_logprobs_equal_a_log_softmax_of_the_model(client: Any, local: dict[str, Any]) -> None:
    m = local["base"]
    new, lps = _greedy(m, "Tell me", 8)
    c = client.completions.create(model="base", prompt="Tell me", temperature=0, max_tokens=8, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.token_logprobs) == len(new) == len(lps)
    for j, (t, ref) in enumerate(zip(new, lps)):
        assert lp.token_logprobs[j] == pytest.approx(float(ref[t]), abs=1e-4)
        top = sorted(lp.top_logprobs[j].values(), reverse=True)
        assert top[0] == pytest.approx(float(ref.max()), abs=1e-4)
        assert len(lp.top_logprobs[j]) <= 3
        assert lp.tokens[j] == m.tokenizer.decode([t], skip_special_tokens=True)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == c.choices[0].text
    rendered = render_prompt("Hello", m.tokenizer)
    new, lps = _greedy(m, rendered, 6)
    r = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hello"}],
                                       temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == len(new)
    for j, (t, ref) in enumerate(zip(new, lps)):
        assert content[j].logprob == pytest.approx(float(ref[t]), abs=1e-4)
        v, _ = ref.topk(2)
        assert [x.logprob for x in content[j].top_logprobs] == pytest.approx(v.tolist(), abs=1e-4)
        assert content[j].bytes == list(content[j].token.encode())


def test_a_per_request_intervention(client: Any, local: dict[str, Any], direction_file: Path) -> None:
    spec = f"{direction_file}@all"
    cond = condition_for(parse_intervention(spec, "ablate"), local["base"])
    want = generate_samples(local["base"], ["Name a bird."], [(None, 0.0), cond], max_new_tokens=10)
    ablated = client.completions.create(model="base", prompt="Name a bird.", temperature=0, max_tokens=10,
                                        extra_body={"latentlab": {"ablate": spec}})
    plain = client.completions.create(model="base", prompt="Name a bird.", temperature=0, max_tokens=10)
    assert ablated.choices[0].text == want[1][0][0]
    assert plain.choices[0].text == want[0][0][0] != want[1][0][0]
    named = client.completions.create(model=f"base+ablate({spec})", prompt="Name a bird.", temperature=0,
                                      max_tokens=10)  # the same, for tools that cannot send an extra field
    assert named.choices[0].text == want[1][0][0] and named.model == f"base+ablate({spec})"
    steer = f"{direction_file}:4@all"
    cond = condition_for(parse_intervention(steer, "steer"), local["old"])
    want = generate_samples(local["old"], [render_prompt("Hello", local["old"].tokenizer)], [cond], max_new_tokens=8)
    r = client.chat.completions.create(model="old", messages=[{"role": "user", "content": "Hello"}], temperature=0,
                                       max_tokens=8, extra_body={"latentlab": {"steer": steer}})
    assert r.choices[0].message.content == want[0][0][0]


def test_stop_strings(client: Any) -> None:
    full = client.completions.create(model="base", prompt="Tell me", temperature=0, max_tokens=10)
    assert ")" in full.choices[0].text
    cut = client.completions.create(model="base", prompt="Tell me", temperature=0, max_tokens=10, stop=")",
                                    logprobs=1)
    assert cut.choices[0].text == full.choices[0].text.split(")")[0]
    assert cut.choices[0].finish_reason == "stop"
    assert "".join(cut.choices[0].logprobs.tokens) == cut.choices[0].text
    two = client.completions.create(model="base", prompt="Tell me", temperature=0, max_tokens=10, stop=["zz", "E"])
    assert two.choices[0].text == "" and two.choices[0].finish_reason == "stop"


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server: dict[str, Any], client: Any,
                                                           direction_file: Path) -> None:
    import openai

    msgs = [{"role": "user", "content": "Hello"}]
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"model": "nope", "messages": msgs}, openai.NotFoundError, "model"),
        ({"model": f"nope+ablate({direction_file}@all)", "messages": msgs}, openai.NotFoundError, "model"),
        ({"model": f"base+ablate({direction_file}@all)", "messages": msgs,
          "extra_body": {"latentlab": {"ablate": f"{direction_file}@all"}}}, openai.BadRequestError, "latentlab"),
        ({"model": "base", "messages": msgs, "n": 0}, openai.BadRequestError, "n"),
        ({"model": "base", "messages": msgs, "temperature": -1}, openai.BadRequestError, "temperature"),
        ({"model": "base", "messages": msgs, "top_p": 1.5}, openai.BadRequestError, "top_p"),
        ({"model": "base", "messages": msgs, "top_p": 0}, openai.BadRequestError, "top_p"),
        ({"model": "base", "messages": msgs, "extra_body": {"latentlab": {"steer": "era"}}},
         openai.BadRequestError, "latentlab"),  # no coefficient
        ({"model": "base", "messages": msgs, "extra_body": {"latentlab": {"ablate": "nowhere.safetensors@all"}}},
         openai.BadRequestError, "latentlab"),
        ({"model": "base", "messages": msgs, "extra_body": {"latentlab": {"ablate": f"{direction_file}@99"}}},
         openai.BadRequestError, "latentlab"),  # parses, but layer 99 is not in the model: refused by the worker
        ({"model": "base", "messages": msgs, "extra_body": {"latentlab": {"shift": "era"}}},
         openai.BadRequestError, "latentlab"),
    ]
    for kw, kind, param in bad:
        with pytest.raises(kind) as e:
            client.chat.completions.create(max_tokens=2, **kw)
        err = e.value.body
        assert isinstance(err, dict) and err.get("param") == param and err.get("message"), (kw, err)
        assert e.value.response.json()["error"]["type"] == "invalid_request_error"
    code, body = _post(f"{server['url']}/chat/completions", b"{not json")
    assert code == 400 and body["error"]["message"] and set(body["error"]) == {"message", "type", "param", "code"}
    code, body = _post(f"{server['url']}/completions", json.dumps({"model": "base", "prompt": [1, 2]}).encode())
    assert code == 400 and "tokenized_requests=False" in body["error"]["message"]
    r = client.chat.completions.create(model="base", messages=msgs, temperature=0, max_tokens=3)
    assert r.choices[0].message.content is not None


def test_the_api_key_is_required(server: dict[str, Any]) -> None:
    for key in (None, "sk-wrong"):
        code, body = _get(f"{server['url']}/models", key=key)
        assert code == 401 and body["error"]["code"] == "invalid_api_key"
        code, body = _post(f"{server['url']}/completions", b'{"model": "base", "prompt": "x"}', key=key)
        assert code == 401
    assert _get(f"{server['url']}/models")[0] == 200


def test_concurrent_requests_are_all_answered(client: Any) -> None:
    prompts = ["Tell me", "Hello", "zzz", "abc", "Name a bird.", "The sky is", "What year is it?", "Hi"]

    def ask(i: int) -> Any:
        if i % 2:
            return client.completions.create(model="base" if i % 4 == 1 else "old", prompt=prompts[i],
                                             temperature=0, max_tokens=6)
        return client.chat.completions.create(model="old", messages=[{"role": "user", "content": prompts[i]}],
                                              temperature=0.8, max_tokens=6, n=2)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert [len(a.choices) for a in answers] == [2, 1] * 4
    assert all(a.usage.completion_tokens > 0 for a in answers)


def test_ctrl_c_stops_the_server_with_status_0(server: dict[str, Any]) -> None:
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert "stopped serving base, old" in (server["root"] / "stdout").read_text()
    assert "serving base, old at http://127.0.0.1:" in (server["root"] / "stderr").read_text()


def test_bad_adapters_fail_before_serving(tiny_gemma_dir: Path, gemma_lora_dir: Path, llama_lora_dir: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    common = ["serve", "-m", str(tiny_gemma_dir), "--device", "cpu", "--port", "0"]
    code, _, err = run_cli(monkeypatch, capsys, *common, "--adapter", f"old={tmp_path / 'nope'}")
    assert_one_line_error(code, err, "does not exist", "Fix:")
    code, _, err = run_cli(monkeypatch, capsys, *common, "--adapter", f"old={llama_lora_dir}")
    assert_one_line_error(code, err, "does not fit", "Fix:")
    other = tmp_path / "other"
    other.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (other / f).write_bytes((gemma_lora_dir / f).read_bytes())
    (other / "latentlab_adapter.json").write_text(json.dumps({"base_fingerprint": "aaaa"}))
    code, _, err = run_cli(monkeypatch, capsys, *common, "--adapter", f"old={other}")
    assert_one_line_error(code, err, "another base", "Fix:")
    code, _, err = run_cli(monkeypatch, capsys, *common, "--adapter", f"base={gemma_lora_dir}",
                           "--served-name", "base")
    assert_one_line_error(code, err, "two served models", "Fix:")
    monkeypatch.delenv("LL_NO_SUCH_KEY", raising=False)
    code, _, err = run_cli(monkeypatch, capsys, *common, "--api-key-env", "LL_NO_SUCH_KEY")
    assert_one_line_error(code, err, "LL_NO_SUCH_KEY", "Fix:")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = str(s.getsockname()[1])
        code, _, err = run_cli(monkeypatch, capsys, "serve", "-m", str(tiny_gemma_dir), "--device", "cpu",
                               "--port", busy)
    assert_one_line_error(code, err, "cannot listen", "Fix:")


def test_concurrent_requests_share_one_generate_call(tiny_gemma_dir: Path, gemma_lora_dir: Path, direction_file: Path,
                                                     load_tiny: Callable[..., Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: requests that arrive within the window are grouped by (view, settings), one call each,
    rows of a group under their own conditions; a seeded sampled request runs alone."""
    from fastapi.testclient import TestClient

    import latentlab.serving as serving
    from latentlab.arms import Arm

    calls: list[dict[str, Any]] = []
    real = serving.generate_samples

    def spy(model: Any, prompts: Any, conditions: Any, **kw: Any) -> Any:
        calls.append({"model": model.adapter_label, "rows": len(kw["pairs"]), "conditions": len(conditions),
                      "seed": kw["seed"]})
        return real(model, prompts, conditions, **kw)

    monkeypatch.setattr(serving, "generate_samples", spy)
    base = load_tiny(tiny_gemma_dir)
    app = serving.make_app(base, {"base": Arm("base"), "old": Arm("old", gemma_lora_dir)}, max_batch=32,
                           batch_window_s=1.0)
    bodies = [{"model": "base", "prompt": p, "temperature": 0, "max_tokens": 3} for p in ("a", "b")]
    bodies += [{"model": "base", "prompt": "c", "temperature": 0, "max_tokens": 3,
                "latentlab": {"ablate": f"{direction_file}@all"}}]  # the same call, its own condition
    bodies += [{"model": "base", "prompt": "d", "temperature": 0, "max_tokens": 3,
                "latentlab": {"steer": f"{tiny_gemma_dir}-nothing.safetensors:1"}}]  # refused before the queue
    bodies += [{"model": "old", "prompt": ["e", "f"], "temperature": 0, "max_tokens": 3, "n": 2}]
    bodies += [{"model": "base", "prompt": "g", "temperature": 1.0, "max_tokens": 3, "seed": 5} for _ in range(2)]
    with TestClient(app) as http, ThreadPoolExecutor(len(bodies)) as pool:
        codes = list(pool.map(lambda b: http.post("/v1/completions", json=b).status_code, bodies))
    assert codes == [200, 200, 200, 400, 200, 200, 200]
    greedy_base = [c for c in calls if c["model"] is None and c["seed"] != 5]
    assert len(greedy_base) == 1 and greedy_base[0]["rows"] == 3 and greedy_base[0]["conditions"] == 2
    assert [c["rows"] for c in calls if c["model"] == "old"] == [4]
    assert [c["rows"] for c in calls if c["seed"] == 5] == [1, 1]  # each seeded request on its own
