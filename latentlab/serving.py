"""An OpenAI-compatible HTTP server over one loaded base, its LoRA finetunes and per-request interventions.

Why: evaluation harnesses (lm-eval's ``local-completions``, inspect-ai, the ``openai`` client, any
script written against vLLM) speak the OpenAI API. Serving the base, each finetune (a LoRA view on
the one base, as ``vllm serve --enable-lora --lora-modules`` serves them) and any ``--steer`` /
``--ablate`` condition behind that API lets those tools measure exactly the model variants latentlab
studies, with the same hooks and the same direction specs as every other command.

The intervention is a documented extra field of the request body (the ``openai`` client sends it
with ``extra_body``)::

    {"model": "base", "messages": [...], "latentlab": {"steer": "era:0.5@8-17"}}
    {"model": "old", "prompt": "...", "latentlab": {"ablate": "era@all"}}

Concurrency: a single worker thread owns the model (PyTorch forward passes and the tokenizer are not
shared across threads). Requests go into a queue; the worker takes what arrived within
``batch_window_s`` (up to ``max_batch`` rows) and runs each group of rows that share a model view
and sampling settings as one :func:`~latentlab.generation.generate_samples` call; the rows of a
group may each carry their own intervention. A sampled request with a ``seed`` is run on its own,
so its answer does not depend on what else was in the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import logging
import queue
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentlab.arms import Arm, condition_for, prepared_arms
from latentlab.data import render_prompt
from latentlab.directions import DirectionSpec
from latentlab.errors import LatentlabError, first_line
from latentlab.generation import MAX_TOP_LOGPROBS, Generated, generate_samples
from latentlab.interventions import Condition, InterventionSpec, parse_intervention
from latentlab.models import LoadedModel

__all__ = ["APIError", "EXTRA_FIELD", "make_app"]

#: the request body's extra field that carries a per-request intervention
EXTRA_FIELD = "latentlab"
DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's chat default is "up to the context": too long for a CPU
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default
MAX_N = 128
_NAMED = re.compile(r"^(.+)\+(steer|ablate)\((.+)\)$")  # NAME+steer(era:0.5@8-17), as latentlab.arms names arms

log = logging.getLogger("latentlab.serve")


class APIError(Exception):
    """A request the server refuses, answered as OpenAI does: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, self.param, self.code, self.kind)


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# --------------------------------------------------------------------------------------------
# Requests: what one HTTP request asks the worker for.
# --------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One request's rows: its prompts (messages or text, rendered by the worker) times ``n``."""

    model: str
    prompts: list[Any]  # a message list (chat) or a string (completions) per prompt
    chat: bool
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    top_logprobs: int | None  # None: no log-probabilities; 0: the chosen token's only
    stop: list[str]
    intervention: InterventionSpec | None
    label: str = ""  # the model name the request used (NAME, or NAME+steer(SPEC))
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: concurrent.futures.Future[list[list[_Choice]]] = field(default_factory=concurrent.futures.Future)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def group_key(self) -> tuple[Any, ...]:
        """Rows that may share one generate call: same view and sampling settings. A seeded sampled
        request is a group of its own (its sample must not depend on its neighbours)."""
        alone = self.id if self.temperature > 0 and self.seed is not None else None
        return (self.model, self.temperature, self.top_p if self.temperature > 0 else 1.0, self.max_tokens, alone)


@dataclass
class _Choice:
    """One answer, cut at its stop string, with its tokens for ``logprobs``."""

    text: str
    finish_reason: str
    n_prompt_tokens: int
    n_tokens: int
    tokens: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[str, float]]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The worker: the one thread that touches the model.
# --------------------------------------------------------------------------------------------


class Engine:
    """Owns the model: a queue of jobs, batched by a worker thread into ``generate_samples`` calls."""

    def __init__(self, base: LoadedModel, views: dict[str, tuple[LoadedModel, Condition]],
                 arms: dict[str, Arm], max_batch: int, batch_window_s: float) -> None:
        self.base, self.views, self.arms = base, views, arms
        self.max_batch, self.window = max_batch, batch_window_s
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.conditions: dict[tuple[str, str, float, str], Condition] = {}  # resolved per-request specs
        self._held: _Job | None = None  # a job that did not fit the last batch
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="latentlab-serve", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self.queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: _Job) -> concurrent.futures.Future[list[list[_Choice]]]:
        self.queue.put(job)
        return job.future

    def _next_batch(self) -> list[_Job] | None:
        first = self._held if self._held is not None else self.queue.get()
        self._held = None
        if first is None:
            return None
        jobs, rows = [first], first.rows
        deadline = time.monotonic() + self.window
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            if rows + job.rows > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            rows += job.rows
        return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            groups: dict[tuple[Any, ...], list[_Job]] = {}
            for job in jobs:
                if not job.future.set_running_or_notify_cancel():
                    continue
                groups.setdefault(job.group_key(), []).append(job)
            for group in groups.values():
                try:
                    self._run(group)
                except BaseException as e:  # the worker outlives any request
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(e if isinstance(e, (APIError, LatentlabError)) else
                                                     APIError(500, f"generation failed: {first_line(e)}",
                                                              kind="server_error"))
                    if not isinstance(e, Exception):
                        raise

    def _condition(self, job: _Job) -> Condition:
        """The job's condition: its model's own, or the request's intervention (resolved once per spec)."""
        iv = job.intervention
        if iv is None:
            return self.views[job.model][1]
        key = (iv.kind, iv.direction, iv.coeff, iv.layers)
        if key not in self.conditions:
            self.conditions[key] = condition_for(iv, self.base)
        return self.conditions[key]

    def _run(self, group: list[_Job]) -> None:
        """One generate call for rows of one view and sampling setting; each row its own condition."""
        view = self.views[group[0].model][0]
        tok = view.tokenizer
        conditions: list[Condition] = []
        cond_index: dict[tuple[int, float] | None, int] = {}
        prompts: list[str] = []
        pairs: list[tuple[int, int]] = []
        live: list[_Job] = []
        for job in group:
            try:
                cond = self._condition(job)
                rendered = [render_prompt(p, tok) if job.chat else p for p in job.prompts]
            except LatentlabError as e:
                job.future.set_exception(APIError(400, str(e), param=EXTRA_FIELD if job.intervention else None))
                continue
            except Exception as e:  # a chat template that refuses the messages
                job.future.set_exception(APIError(400, f"cannot render the prompt: {first_line(e)}",
                                                  param="messages" if job.chat else "prompt"))
                continue
            ci = cond_index.setdefault((id(cond[0]), float(cond[1])) if cond[0] is not None else None,
                                       len(conditions))
            if ci == len(conditions):
                conditions.append(cond)
            for text in rendered:
                for _ in range(job.n):  # one prompt entry per sample: rows of a job stay in order
                    pairs.append((ci, len(prompts)))
                    prompts.append(text)
            live.append(job)
        if not live:
            return
        first = live[0]
        sampled = first.temperature > 0
        seed = first.seed if first.seed is not None else secrets.randbelow(2**31)
        k = max((j.top_logprobs or 0) for j in live)
        out = generate_samples(view, prompts, conditions, max_new_tokens=first.max_tokens,
                               temperature=first.temperature, top_p=first.top_p if sampled else 1.0, n=1,
                               seed=seed, batch_size=max(1, self.max_batch), pairs=pairs, details=True,
                               top_logprobs=min(k, MAX_TOP_LOGPROBS))
        row = 0
        for job in live:
            choices: list[list[_Choice]] = []
            for _ in job.prompts:
                per: list[_Choice] = []
                for _ in range(job.n):
                    ci, pi = pairs[row]
                    per.append(_choice(out[ci][pi][0], job, tok))
                    row += 1
                choices.append(per)
            job.future.set_result(choices)


def _pieces(tok: Any, ids: Sequence[int]) -> list[str]:
    """Each token's share of the decoded text (their concatenation is the text, byte for byte)."""
    out, prev = [], ""
    for i in range(len(ids)):
        text = tok.decode(list(ids[: i + 1]), skip_special_tokens=True)
        out.append(text[len(prev):] if text.startswith(prev) else text)
        prev = text
    return out


def _finite(lp: float) -> float:
    """JSON has no -inf: an impossible token gets vLLM's stand-in, -9999."""
    return lp if lp > -9999.0 else -9999.0


def _choice(g: Generated, job: _Job, tok: Any) -> _Choice:
    """A generated row as an API choice: cut at the first stop string, tokens and offsets when asked."""
    want_tokens = job.top_logprobs is not None
    text, reason, n_tokens = g.text, g.finish_reason, len(g.token_ids) + (g.finish_reason == "stop")
    pieces = _pieces(tok, g.token_ids) if want_tokens or job.stop else []
    if pieces:
        text = "".join(pieces)
    cuts = [i for i in (text.find(s) for s in job.stop) if i >= 0]
    keep = len(g.token_ids)
    offsets: list[int] = []
    pos = 0
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    if cuts:
        cut = min(cuts)
        text, reason = text[:cut], "stop"
        keep = sum(1 for o in offsets if o < cut)
        n_tokens = keep
    choice = _Choice(text, reason, g.n_prompt_tokens, n_tokens)
    if want_tokens:
        k = job.top_logprobs or 0
        choice.tokens = pieces[:keep]
        choice.offsets = offsets[:keep]
        choice.logprobs = [_finite(lp) for lp in g.logprobs[:keep]]
        choice.top = [[(tok.decode([i]), _finite(lp)) for i, lp in step[:k]] for step in g.top_logprobs[:keep]]
    return choice


# --------------------------------------------------------------------------------------------
# Request parsing: OpenAI's fields, checked, with 4xx answers that name the field.
# --------------------------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, default: float, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise APIError(400, f"{name} must be a number, got {v!r}", name)
    if low is not None and (v <= low if low_open else v < low):
        raise APIError(400, f"{name} must be {'>' if low_open else '>='} {low:g}, got {v}", name)
    if high is not None and v > high:
        raise APIError(400, f"{name} must be <= {high:g}, got {v}", name)
    return float(v)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int | None = None,
             high: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"{name} must be an integer, got {v!r}", name)
    if low is not None and v < low:
        raise APIError(400, f"{name} must be >= {low}, got {v}", name)
    if high is not None and v > high:
        raise APIError(400, f"{name} must be <= {high}, got {v}", name)
    return v


def _stops(body: dict[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise APIError(400, "stop must be a non-empty string or a list of them", "stop")
    return list(items)


def _intervention(body: dict[str, Any]) -> InterventionSpec | None:
    """The ``latentlab`` extra field: ``{"steer": "era:0.5@8-17"}`` or ``{"ablate": "era@all"}``."""
    extra = body.get(EXTRA_FIELD)
    if extra is None:
        return None
    if not isinstance(extra, dict) or not extra:
        raise APIError(400, f'{EXTRA_FIELD} must be an object such as {{"steer": "era:0.5@8-17"}} or '
                            f'{{"ablate": "era@all"}}', EXTRA_FIELD)
    unknown = sorted(set(extra) - {"steer", "ablate"})
    if unknown:
        raise APIError(400, f"{EXTRA_FIELD}: unknown key {unknown[0]!r} (use steer or ablate)", EXTRA_FIELD)
    if len(extra) > 1:
        raise APIError(400, f"{EXTRA_FIELD}: give one of steer or ablate, not both", EXTRA_FIELD)
    kind, text = next(iter(extra.items()))
    if not isinstance(text, str):
        raise APIError(400, f"{EXTRA_FIELD}.{kind} must be a string such as "
                            f"{'era:0.5@8-17' if kind == 'steer' else 'era@all'}", EXTRA_FIELD)
    try:
        spec = parse_intervention(text, kind)
        DirectionSpec.parse(spec.direction, f"--{kind}")  # a saved file is read and checked here
    except LatentlabError as e:
        raise APIError(400, f"{EXTRA_FIELD}.{kind}: {e}", EXTRA_FIELD) from None
    return spec


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list of {role, content}", "messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, "each message needs a role and a content", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, "only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, "a message's content must be a string or a list of text parts", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def _prompts(body: dict[str, Any]) -> list[str]:
    p = body.get("prompt")
    items = [p] if isinstance(p, str) else p
    if isinstance(items, list) and items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        items = None  # token ids
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise APIError(400, "prompt must be a string or a list of strings (token ids are not accepted: "
                            "lm-eval's local-completions needs tokenized_requests=False)", "prompt")
    return list(items)


def _unsupported(body: dict[str, Any]) -> None:
    """Fields that would change the answer and that this server does not implement: refused, not ignored."""
    if body.get("stream"):
        raise APIError(400, "stream is not supported; send stream=false", "stream")
    if body.get("echo"):
        raise APIError(400, "echo is not supported", "echo")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise APIError(400, f"{name} is not supported; leave it at 0", name)
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported", "logit_bias")
    if body.get("tools"):
        raise APIError(400, "tools are not supported", "tools")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise APIError(400, "best_of is not supported", "best_of")


def _job(body: dict[str, Any], chat: bool, views: dict[str, Any], arms: dict[str, Arm]) -> _Job:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    label = body.get("model")
    if not isinstance(label, str) or not label:
        raise APIError(400, "model is required", "model")
    model, named = label, _NAMED.match(label)
    if model not in views and named is not None and named.group(1) in views:
        # NAME+steer(SPEC): the extra field for tools that cannot send one (lm-eval, inspect-ai's --model)
        model = named.group(1)
        if body.get(EXTRA_FIELD) is not None:
            raise APIError(400, f"the model name {label!r} carries an intervention already; drop the "
                                f"{EXTRA_FIELD} field or use the plain name {model!r}", EXTRA_FIELD)
        body = {**body, EXTRA_FIELD: {named.group(2): named.group(3)}}
    if model not in views:
        raise APIError(404, f"the model {label!r} does not exist; served: {', '.join(views)} (and NAME+steer(SPEC), "
                            "NAME+ablate(SPEC))", "model", "model_not_found")
    _unsupported(body)
    n = _integer(body, "n", 1, 1, MAX_N)
    temperature = _number(body, "temperature", 1.0, 0.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    if chat:
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _integer({"max_tokens": mt}, "max_tokens", DEFAULT_CHAT_MAX_TOKENS, 1)
        prompts: list[Any] = [_messages(body)]
        lp = body.get("logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise APIError(400, "logprobs must be true or false", "logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not lp:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top_logprobs = (top or 0) if lp else None
    else:
        max_tokens = _integer(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS, 1)
        prompts = _prompts(body)
        top_logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    seed = _integer(body, "seed", None)
    intervention = _intervention(body)
    if intervention is not None and arms[model].intervention is not None:
        raise APIError(400, f"the model {model!r} already carries an intervention; ask its base for this one",
                       EXTRA_FIELD)
    assert n is not None and max_tokens is not None
    return _Job(model, prompts, chat, n, temperature, top_p, max_tokens, seed, top_logprobs, _stops(body),
                intervention, label)


# --------------------------------------------------------------------------------------------
# Responses.
# --------------------------------------------------------------------------------------------


def _usage(job: _Job, choices: list[list[_Choice]]) -> dict[str, int]:
    prompt = sum(per[0].n_prompt_tokens for per in choices if per)
    completion = sum(c.n_tokens for per in choices for c in per)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprobs(c: _Choice) -> dict[str, Any]:
    def entry(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                        for t, lp, top in zip(c.tokens, c.logprobs, c.top)]}


def _completion_logprobs(c: _Choice) -> dict[str, Any]:
    return {"tokens": c.tokens, "token_logprobs": c.logprobs,
            "top_logprobs": [dict(top) for top in c.top], "text_offset": c.offsets}


def _chat_response(job: _Job, choices: list[list[_Choice]]) -> dict[str, Any]:
    flat = [c for per in choices for c in per]
    return {
        "id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": int(time.time()), "model": job.label,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "logprobs": _chat_logprobs(c) if job.top_logprobs is not None else None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(flat)],
        "usage": _usage(job, choices),
    }


def _completion_response(job: _Job, choices: list[list[_Choice]]) -> dict[str, Any]:
    flat = [c for per in choices for c in per]  # OpenAI's order: prompt by prompt, n choices each
    return {
        "id": f"cmpl-{job.id}", "object": "text_completion", "created": int(time.time()), "model": job.label,
        "choices": [{"index": i, "text": c.text,
                     "logprobs": _completion_logprobs(c) if job.top_logprobs is not None else None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(flat)],
        "usage": _usage(job, choices),
    }


# --------------------------------------------------------------------------------------------
# The app.
# --------------------------------------------------------------------------------------------


def make_app(base: LoadedModel, arms: dict[str, Arm], api_key: str | None = None, max_batch: int = 32,
             batch_window_s: float = 0.02) -> FastAPI:
    """The OpenAI-compatible app serving ``arms`` (model name -> :class:`~latentlab.arms.Arm`) on ``base``.

    Adapters are attached and arm interventions resolved here, before the app serves anything, so a
    folder of another base fails now (a :class:`~latentlab.errors.LatentlabError`), not on the first
    request. The worker thread starts with the app (its lifespan) and stops with it.
    """
    if not arms:
        raise LatentlabError("no models to serve", "serve at least the base")
    if max_batch < 1:
        raise LatentlabError(f"max_batch must be >= 1, got {max_batch}", "pass --max-batch 1 or more")
    if not batch_window_s >= 0:
        raise LatentlabError(f"the batch window must be >= 0, got {batch_window_s}", "pass --batch-window-ms 0 or more")
    prepared = prepared_arms(base, list(arms.values()))
    views = {name: prepared[arm.name] for name, arm in arms.items()}
    engine = Engine(base, views, dict(arms), max_batch, batch_window_s)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="latentlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return _error(401, "missing or wrong API key: send Authorization: Bearer KEY", None,
                              "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_r: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), code=None if e.status_code != 404 else "not_found")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_r: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {first_line(str(e.errors()))}")

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    async def answer(job: _Job) -> list[list[_Choice]]:
        try:
            return await asyncio.wrap_future(engine.submit(job))
        except LatentlabError as e:
            raise APIError(400, str(e)) from None

    base_name = next((n for n, a in arms.items() if a.adapter is None and a.intervention is None), None)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        root = base.info.name
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "latentlab", "root": root,
             "parent": None if arm.adapter is None else base_name,
             "adapter": None if arm.adapter is None else str(arm.adapter)}
            for name, arm in arms.items()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        job = _job(await body_of(request), True, views, arms)
        return _chat_response(job, await answer(job))

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        job = _job(await body_of(request), False, views, arms)
        return _completion_response(job, await answer(job))

    return app
