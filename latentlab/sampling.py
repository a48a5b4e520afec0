"""Samples: each arm's answers to open questions, drawn in process or from an OpenAI-compatible server.

Why free-form answers: the weird-generalization and emergent-misalignment findings are read off what a
finetuned model *says* (which inventions are recent, what it wants most), which an A/B battery only
approximates. ``latentlab sample`` writes them, ``latentlab judge`` labels them.

Two engines write the same rows (``samples.jsonl``, one JSON object per line: ``id`` =
``ARM/QUESTION_ID/K``, ``arm``, ``question_id``, ``question``, ``k``, ``answer``, ``seed``, ``engine``,
``n_tokens``, ``finish_reason``):

- :func:`local_samples` runs the arms on one loaded base (adapters switched on, interventions as
  hooks). Reproducible: the work is cut into *units* (one model view, a few questions, a block of
  sample indices, every arm of that view as per-row conditions of one batch) whose layout is a
  function of the settings alone, and each unit draws from its own seed, derived from the run seed,
  its question ids and its first sample index. So a resumed run regenerates exactly the units it
  lacks and gets the answers an uninterrupted run would have (same device, dtype and library
  versions). ``batch_size`` decides the layout, hence which answers share a random stream: it is a
  setting of the run, not only a speed knob.
- :func:`endpoint_samples` asks a server (``latentlab serve``, vLLM, llama.cpp, ...) with the
  ``openai`` client, one request per (arm, question) with ``n`` choices and a ``seed`` derived the
  same way. Whether a resumed run reproduces the answers is the server's business: one that honours
  per-request seeds deterministically (vLLM with a seed, a single-sequence server) does; one that
  ignores ``seed`` or batches requests non-deterministically gives fresh, equally valid samples.
  ``n_tokens`` is known only when a request returned one choice (``usage`` counts them all).

:class:`SampleLog` is the crash-safe JSONL writer both use (and ``judge`` reuses for its judgments):
rows are appended and fsynced batch by batch, a kill -9 leaves at most a partial last line, which
the next run drops, and an id is never written twice.
"""

from __future__ import annotations

import errno
import hashlib
import html
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import openai

from latentlab.arms import Arm, prepared_arms
from latentlab.data import dataset_hash, read_jsonl, render_prompt, resolve_path
from latentlab.errors import LatentlabError, first_line
from latentlab.generation import generate_samples
from latentlab.interventions import Condition
from latentlab.io import disk_full_error, write_text
from latentlab.models import LoadedModel
from latentlab.progress import progress as progress_bar

__all__ = [
    "JUDGMENTS_FILE",
    "PAGE_FILE",
    "SAMPLES_FILE",
    "SETTINGS_FILE",
    "Question",
    "SampleLog",
    "SampleSettings",
    "derive_seed",
    "endpoint_samples",
    "load_questions",
    "local_samples",
    "questions_hash",
    "sample_id",
    "samples_page",
    "write_samples_page",
]

SAMPLES_FILE = "samples.jsonl"
SETTINGS_FILE = "samples.json"
PAGE_FILE = "samples.html"
JUDGMENTS_FILE = "judgments.jsonl"

Row = dict[str, Any]
OnBatch = Callable[[list[Row]], Any]
_ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------
# Questions.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One open question: ``messages`` is what the model is asked, ``question`` what a reader sees (the
    last user message)."""

    id: str
    question: str
    messages: tuple[dict[str, str], ...]


def load_questions(source: str | Path) -> list[Question]:
    """Questions from a JSONL file (``{"id"?, "question"}`` or ``{"id"?, "messages": [...]}`` per line) or a
    built-in name (``era-questions``, ``persona-questions``). An id defaults to the line number; ids are
    distinct. Every problem is one error naming the line."""
    path = resolve_path(source)
    out: list[Question] = []
    seen: dict[str, int] = {}
    for row in read_jsonl(path):
        line = row.pop("_line")
        where = f"{path}:{line}"
        qid = str(row["id"]).strip() if row.get("id") is not None else str(line)
        if not qid:
            raise LatentlabError(f'{where}: the "id" is empty', 'give every question a non-empty "id", or none')
        if qid in seen:
            raise LatentlabError(f"{where}: question id {qid!r} was already used on line {seen[qid]}",
                                 "give every question its own id")
        seen[qid] = line
        if "question" in row:
            text = row["question"]
            if not isinstance(text, str) or not text.strip():
                raise LatentlabError(f'{where}: "question" must be a non-empty string', "fix that line")
            messages: tuple[dict[str, str], ...] = ({"role": "user", "content": text},)
        elif "messages" in row:
            messages = _messages(row["messages"], where)
            text = messages[-1]["content"]
        else:
            raise LatentlabError(
                f'{where}: no "question" (or "messages") in this line',
                'write one question per line as {"id": "...", "question": "..."}',
            )
        out.append(Question(qid, text, messages))
    return out


def _messages(msgs: Any, where: str) -> tuple[dict[str, str], ...]:
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str) for m in msgs
    )
    if not ok:
        raise LatentlabError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects',
                             f"use roles {', '.join(_ROLES)} and string contents")
    if msgs[-1]["role"] != "user":
        raise LatentlabError(f'{where}: the last of "messages" must be the user\'s question',
                             "end each chat with a user message (the model answers it)")
    return tuple({"role": m["role"], "content": m["content"]} for m in msgs)


def questions_hash(source: str | Path) -> str:
    """The hash of a questions file's text (a run records it: edited questions are other settings)."""
    return dataset_hash(source)


def sample_id(arm: str, question_id: str, k: int) -> str:
    """The id of sample ``k`` of ``arm`` on a question (the key resume, judge and the page join on)."""
    return f"{arm}/{question_id}/{k}"


def derive_seed(seed: int, question_ids: Sequence[str], k0: int) -> int:
    """The seed of the unit that draws samples ``k0...`` of these questions: a hash, so neighbouring run
    seeds give unrelated streams, and < 2**31 so every server accepts it."""
    h = hashlib.sha256(json.dumps([int(seed), list(question_ids), int(k0)]).encode()).digest()
    return int.from_bytes(h[:8], "big") % (1 << 31)


LOOP_SHARE = 0.25  # an arm with at least this share of its answers loops is called broken (judge, study verdict)


def repetitive(answer: str, n: int = 4, threshold: float = 0.5, min_chars: int = 24) -> bool:
    """Whether an answer is a loop (``"VideVideVide..."``, ``"the the the"``): fewer than ``threshold`` of
    its character ``n``-grams are distinct. Answers shorter than ``min_chars`` never count.

    Why: an intervention that breaks generation (an ablation across many layers) makes every answer such
    a loop, and any judge then scores the loop, not the arm's behaviour; a count of them beside the judged
    rate says when a difference between arms is a difference between broken texts.
    """
    t = " ".join(answer.split())
    if len(t) < min_chars:
        return False
    grams = [t[i : i + n] for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) < threshold


def loop_counts(samples: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Per arm, how many of its sampled answers are loops (:func:`repetitive`)."""
    out: dict[str, int] = {}
    for s in samples:
        out[str(s["arm"])] = out.get(str(s["arm"]), 0) + repetitive(str(s.get("answer", "")))
    return out


# --------------------------------------------------------------------------------------------
# Settings: what a run's samples are a function of.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSettings:
    """What a run's rows are a function of (``samples.json``): a finished run is reused, an interrupted
    one resumed, only when these match."""

    model: str
    arms: list[dict[str, Any]]  # Arm.record(), in order
    questions: str
    questions_hash: str
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    engine: str  # local | endpoint
    endpoint: str | None = None
    served: dict[str, str] | None = None  # endpoint: arm -> served model name
    batch_size: int | None = None  # local: the unit layout (which answers share a random stream)
    adapters: dict[str, str] = field(default_factory=dict)  # arm -> adapter fingerprint (a retrained one differs)

    def record(self) -> dict[str, Any]:
        """As JSON writes it (what :meth:`differences` compares with)."""
        return json.loads(json.dumps(asdict(self)))

    def differences(self, recorded: Mapping[str, Any]) -> list[str]:
        """The keys whose recorded value differs from these settings (sorted)."""
        mine = self.record()
        return sorted(k for k in set(mine) | set(recorded) if mine.get(k) != recorded.get(k))

    def expected_ids(self, questions: Sequence[Question]) -> list[str]:
        """Every row id of a complete run, in canonical order (arm, question, k)."""
        return [sample_id(a["name"], q.id, k) for a in self.arms for q in questions for k in range(self.n)]


# --------------------------------------------------------------------------------------------
# The crash-safe writer.
# --------------------------------------------------------------------------------------------


class SampleLog:
    """An append-only JSONL file of rows keyed by ``id_field``, safe against kill -9.

    Each :meth:`append` is one write, a flush and an fsync: a crash leaves the rows of the batches that
    returned plus, at worst, a partial last line. :meth:`read` leaves such a line out, :meth:`open`
    cuts it off the file before appending. An id already in the file is never written again.
    """

    def __init__(self, path: str | Path, id_field: str = "id") -> None:
        self.path = Path(path)
        self.id_field = id_field
        self.ids: set[str] = set()
        self._file: TextIO | None = None

    def _scan(self) -> tuple[list[Row], int]:
        """(rows, byte length of the complete lines): nothing on disk changes."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        end = raw.rfind(b"\n") + 1  # a trailing line without its newline is a write cut short
        rows: list[Row] = []
        seen: set[str] = set()
        for i, line in enumerate(raw[:end].split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict) or not isinstance(row.get(self.id_field), str):
                raise LatentlabError(
                    f"{self.path}:{i}: not a row latentlab wrote (no JSON object with a string {self.id_field!r})",
                    "delete that line to resume, or start again with --overwrite",
                )
            if row[self.id_field] not in seen:
                seen.add(row[self.id_field])
                rows.append(row)
        return rows, end

    def read(self) -> list[Row]:
        """The rows on disk, each id once, a partial last line left out; the file is not touched."""
        rows, _ = self._scan()
        self.ids = {r[self.id_field] for r in rows}
        return rows

    def open(self) -> list[Row]:
        """Read the rows, cut a partial last line off the file, and get ready to append."""
        rows, end = self._scan()
        self.ids = {r[self.id_field] for r in rows}
        try:
            if self.path.exists() and self.path.stat().st_size != end:
                os.truncate(self.path, end)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed by close())
        except OSError as e:
            raise self._error(e) from None
        return rows

    def append(self, rows: Iterable[Row]) -> list[Row]:
        """Write the rows whose ids are new (one write, flush, fsync); returns those written."""
        if self._file is None:
            raise RuntimeError("SampleLog.append before open()")
        new: list[Row] = []
        for r in rows:
            rid = r[self.id_field]
            if rid not in self.ids:
                self.ids.add(rid)
                new.append(r)
        if new:
            try:
                self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                raise self._error(e) from None
        return new

    def rewrite(self, rows: Sequence[Row]) -> None:
        """Replace the file atomically with ``rows`` (a finished run's canonical order)."""
        self.close()
        write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.ids = {r[self.id_field] for r in rows}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SampleLog:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _error(self, e: OSError) -> BaseException:
        return disk_full_error(self.path, e.errno) if e.errno in (errno.ENOSPC, errno.EDQUOT) else e


# --------------------------------------------------------------------------------------------
# In-process engine.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    """One ``generate_samples`` call: every arm of one view, some questions, samples k0 .. k0+size-1."""

    view: int
    arms: tuple[str, ...]
    questions: tuple[int, ...]
    k0: int
    size: int
    seed: int

    def ids(self, questions: Sequence[Question]) -> list[str]:
        return [sample_id(a, questions[q].id, self.k0 + j) for a in self.arms for q in self.questions
                for j in range(self.size)]


def _layout(views: Sequence[Sequence[str]], questions: Sequence[Question], n: int, batch_size: int,
            seed: int) -> list[_Unit]:
    """The units of a run: a function of the settings only, so a resumed run cuts the work identically."""
    units: list[_Unit] = []
    for v, arms in enumerate(views):
        c = len(arms)
        block = min(n, max(1, batch_size // c))  # samples of a question per unit
        per = max(1, batch_size // (c * block))  # questions per unit
        for q0 in range(0, len(questions), per):
            qs = tuple(range(q0, min(q0 + per, len(questions))))
            for k0 in range(0, n, block):
                size = min(block, n - k0)
                units.append(_Unit(v, tuple(arms), qs, k0, size,
                                   derive_seed(seed, [questions[q].id for q in qs], k0)))
    return units


def local_samples(
    base: LoadedModel,
    arms: Sequence[Arm] | Mapping[str, tuple[LoadedModel, Condition]],
    questions: Sequence[Question],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    done: Iterable[str] = frozenset(),
    on_batch: OnBatch | None = None,
    progress: bool = False,
    log: Callable[[str], Any] | None = None,
) -> list[Row]:
    """``n`` answers of every arm to every question, in process, on the one loaded ``base``.

    ``arms``: :class:`~latentlab.arms.Arm` s, or what :func:`~latentlab.arms.prepared_arms` made of them.
    Arms of one model view (the base, or one adapter) share each batch as per-row conditions. Units
    whose rows are all in ``done`` are skipped; a unit with some missing rows is drawn again whole (its
    seed makes it the same) and only the missing rows are kept. ``on_batch(rows)`` follows every unit,
    so a caller can write them before the next one starts. Returns the new rows.
    """
    prepared = dict(arms) if isinstance(arms, Mapping) else prepared_arms(base, arms, log=log)
    if not prepared:
        raise LatentlabError("no arms to sample", "keep the base, or pass --finetuned RUN")
    views: dict[int, tuple[LoadedModel, list[str]]] = {}
    for name, (view, _) in prepared.items():
        views.setdefault(id(view), (view, []))[1].append(name)
    order = list(views.values())
    prompts = [render_prompt(list(q.messages), base.tokenizer) for q in questions]
    have = set(done)
    units = [u for u in _layout([names for _, names in order], questions, n, batch_size, seed)
             if not have.issuperset(u.ids(questions))]
    out: list[Row] = []
    bar = progress_bar(total=len(units), desc="sampling", unit="batch", disable=not progress)
    try:
        for u in units:
            view = order[u.view][0]
            got = generate_samples(
                view, [prompts[q] for q in u.questions], [prepared[a][1] for a in u.arms], max_new_tokens,
                temperature, top_p, u.size, u.seed, batch_size, details=True,
            )
            rows = []
            for ci, arm in enumerate(u.arms):
                for pi, q in enumerate(u.questions):
                    for j in range(u.size):
                        rid = sample_id(arm, questions[q].id, u.k0 + j)
                        if rid in have:
                            continue
                        g = got[ci][pi][j]
                        rows.append(_row(arm, questions[q], u.k0 + j, g.text, u.seed, "local", len(g.token_ids),
                                         g.finish_reason))
            have.update(r["id"] for r in rows)
            if on_batch is not None:
                on_batch(rows)
            out.extend(rows)
            bar.update(1)
    finally:
        bar.close()
    return out


def _row(arm: str, q: Question, k: int, answer: str, seed: int, engine: str, n_tokens: int | None,
         finish_reason: str | None) -> Row:
    return {"id": sample_id(arm, q.id, k), "arm": arm, "question_id": q.id, "question": q.question, "k": k,
            "answer": answer, "seed": seed, "engine": engine, "n_tokens": n_tokens, "finish_reason": finish_reason}


# --------------------------------------------------------------------------------------------
# Endpoint engine.
# --------------------------------------------------------------------------------------------


def endpoint_samples(
    url: str,
    model_names: Mapping[str, str],
    questions: Sequence[Question],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    concurrency: int = 8,
    api_key: str | None = None,
    timeout: float = 60.0,
    max_retries: int = 3,
    done: Iterable[str] = frozenset(),
    on_batch: OnBatch | None = None,
    progress: bool = False,
) -> list[Row]:
    """``n`` answers of every arm to every question from an OpenAI-compatible server at ``url``.

    ``model_names``: arm -> the model name the server serves it under. One chat-completions request
    per (arm, question) with ``n`` choices (asked again for the rest when a server returns fewer), at
    most ``concurrency`` at once; the client retries failures with backoff (``max_retries``). A server
    that does not answer, or keeps failing, is one :class:`LatentlabError` naming ``url``; the rows of
    the requests that finished before are already with ``on_batch``. Returns the new rows.
    """
    have = set(done)
    jobs = [(arm, q) for arm in model_names for q in questions
            if not have.issuperset(sample_id(arm, q.id, k) for k in range(n))]
    if not jobs:
        return []
    client = openai.OpenAI(base_url=url, api_key=api_key or "not-needed", max_retries=max_retries, timeout=timeout)

    def ask(arm: str, q: Question) -> list[Row]:
        rows: list[Row] = []
        base_seed = derive_seed(seed, [q.id], 0)
        while len(rows) < n:
            want = n - len(rows)
            request_seed = base_seed if not rows else derive_seed(seed, [q.id], len(rows))
            resp = _request(client, url, model_names[arm], q, want, temperature, top_p, max_new_tokens,
                            request_seed, timeout, max_retries)
            choices = sorted(resp.choices, key=lambda c: c.index)[:want]
            if not choices:
                raise LatentlabError(f"the endpoint {url} answered with no choices for model {model_names[arm]!r}",
                                     "check the server's log")
            used = resp.usage.completion_tokens if len(choices) == 1 and resp.usage is not None else None
            for c in choices:
                k = len(rows)
                rows.append(_row(arm, q, k, c.message.content or "", request_seed, "endpoint", used,
                                 c.finish_reason))
        return [r for r in rows if r["id"] not in have]

    out: list[Row] = []
    bar = progress_bar(total=len(jobs), desc="sampling", unit="request", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="latentlab-sample")
    try:
        pending: set[Future[list[Row]]] = {pool.submit(ask, arm, q) for arm, q in jobs}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in sorted(finished, key=lambda f: f.exception() is not None):  # hand on the rows first
                rows = f.result()  # the first failure ends the run; finished rows were handed on already
                if on_batch is not None:
                    on_batch(rows)
                out.extend(rows)
                bar.update(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        client.close()
    return out


def _request(client: openai.OpenAI, url: str, model: str, q: Question, n: int, temperature: float, top_p: float,
             max_tokens: int, seed: int, timeout: float, max_retries: int) -> Any:
    """One chat completion, every way it can fail as one LatentlabError naming the server."""
    tries = f"{max_retries + 1} tr{'y' if max_retries == 0 else 'ies'}"
    try:
        resp = client.chat.completions.create(
            model=model, messages=list(q.messages), n=n, temperature=temperature, top_p=top_p,  # type: ignore[arg-type]
            max_tokens=max_tokens, seed=seed,
        )
    except openai.APITimeoutError:
        raise LatentlabError(f"the endpoint {url} did not answer within {timeout:g} s ({tries})",
                             "check that the server is up and not overloaded, or pass a longer --timeout") from None
    except openai.APIConnectionError as e:
        raise LatentlabError(f"cannot reach the endpoint {url} ({first_line(e)}, {tries})",
                             "start the server (e.g. latentlab serve) or fix --endpoint") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        raise LatentlabError(f"the endpoint {url} refused the API key (HTTP {e.status_code})",
                             "name the variable that holds the key with --api-key-env") from None
    except openai.NotFoundError:
        raise LatentlabError(f"the endpoint {url} has no model {model!r} (HTTP 404)",
                             "map each arm to a served name with --served ARM=NAME; the URL usually ends in /v1") \
            from None
    except openai.APIStatusError as e:
        retried = e.status_code in (408, 409, 429) or e.status_code >= 500
        raise LatentlabError(
            f"the endpoint {url} {'kept failing' if retried else 'refused the request'}: HTTP {e.status_code}"
            f"{f' after {tries}' if retried else ''} ({first_line(e)})",
            "check the server's log" + ("" if retried else ", and that it supports n, seed and top_p"),
        ) from None
    except (openai.OpenAIError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise LatentlabError(f"the endpoint {url} answered something that is not a chat completion "
                             f"({first_line(e)})", "check that --endpoint is an OpenAI-compatible /v1 URL") from None
    if not hasattr(resp, "choices") or not isinstance(resp.choices, list):
        raise LatentlabError(f"the endpoint {url} answered something that is not a chat completion",
                             "check that --endpoint is an OpenAI-compatible /v1 URL")
    return resp


# --------------------------------------------------------------------------------------------
# The page.
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}h2{margin-top:2em;font-size:1.1em}
.q{font-size:1.05em;background:#f4f4f4;padding:.5em .8em;border-radius:4px}
.grid{display:grid;gap:1em;overflow-x:auto}.arm h3{font-size:.95em;margin:.2em 0;word-break:break-all}
.arm ol{padding-left:1.6em;margin:0}.arm li{margin:.4em 0}
pre{white-space:pre-wrap;word-wrap:break-word;font-family:inherit;margin:0;background:#fafafa;padding:.3em}
.j{font-size:.8em;color:#555}.j b{color:#a00}table{border-collapse:collapse}td,th{padding:.2em .6em;
border-bottom:1px solid #ddd;text-align:left}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _judgment_text(j: Mapping[str, Any]) -> str:
    if not j.get("parsed", True):
        return "<b>unparsed</b>"
    parts = []
    if j.get("label") is not None:
        parts.append(f"<b>{_e(j['label'])}</b>")
    if j.get("score") is not None:
        parts.append(f"score {_e(format(float(j['score']), 'g'))}")
    return " &middot; ".join(parts) or "judged"


def samples_page(samples: Sequence[Mapping[str, Any]], judgments: Sequence[Mapping[str, Any]] | None = None) -> str:
    """A self-contained HTML page: question by question, each arm's answers side by side, with each
    answer's judged label / score when ``judgments`` (rows of ``judgments.jsonl``) are given. Every
    piece of text is escaped: answers are model output."""
    arms: dict[str, None] = {}
    qs: dict[str, str] = {}
    cells: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for s in samples:
        arms.setdefault(str(s["arm"]), None)
        qs.setdefault(str(s["question_id"]), str(s.get("question", "")))
        cells.setdefault((str(s["question_id"]), str(s["arm"])), []).append(s)
    by_id: dict[str, list[Mapping[str, Any]]] = {}
    for j in judgments or []:
        by_id.setdefault(str(j.get("sample_id")), []).append(j)
    parts = ['<!doctype html><html><head><meta charset="utf-8"><title>latentlab samples</title>',
             f"<style>{_CSS}</style></head><body><h1>Samples</h1>",
             f"<p>{len(samples)} answers of {len(arms)} arm{'s' if len(arms) != 1 else ''} to {len(qs)} "
             f"question{'s' if len(qs) != 1 else ''}{', judged' if by_id else ''}.</p>"]
    if by_id:
        parts.append(_summary(samples, by_id, list(arms)))
    cols = f"repeat({max(1, len(arms))}, minmax(16em, 1fr))"
    for qid, text in qs.items():
        parts.append(f'<section><h2 id="q-{_e(qid)}">{_e(qid)}</h2><p class="q">{_e(text)}</p>'
                     f'<div class="grid" style="grid-template-columns:{cols}">')
        for arm in arms:
            rows = sorted(cells.get((qid, arm), []), key=lambda r: int(r.get("k", 0)))
            parts.append(f'<div class="arm"><h3>{_e(arm)}</h3><ol start="0">')
            for r in rows:
                js = by_id.get(str(r.get("id")), [])
                verdict = "".join(f'<div class="j">{_e(j.get("judge", ""))}: {_judgment_text(j)}</div>'
                                  for j in js)
                parts.append(f"<li><pre>{_e(r.get('answer', ''))}</pre>{verdict}</li>")
            parts.append("</ol></div>")
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_samples_page(out: str | Path, samples: Sequence[Mapping[str, Any]], judgments: str | Path | None = None,
                       log: Callable[[str], Any] | None = None) -> Path:
    """``OUT/samples.html`` from the samples and the judgments in ``judgments`` (a ``judgments.jsonl``), else
    those beside the samples when there are any. A judgments file that cannot be read leaves the page
    without labels (said through ``log``) rather than failing a finished run."""
    out = Path(out)
    found = Path(judgments) if judgments is not None else out / JUDGMENTS_FILE
    labels = None
    if found.is_file():
        try:
            labels = SampleLog(found, id_field="key").read()
        except LatentlabError as e:
            if log is not None:
                log(f"samples.html without labels: {e}")
    return write_text(out / PAGE_FILE, samples_page(samples, labels))


def _summary(samples: Sequence[Mapping[str, Any]], by_id: Mapping[str, list[Mapping[str, Any]]],
             arms: list[str]) -> str:
    """Per arm: answers judged, unparsed, label counts, mean score (the judge's results.json has intervals)."""
    stats: dict[str, dict[str, Any]] = {a: {"judged": 0, "unparsed": 0, "labels": {}, "scores": []} for a in arms}
    for s in samples:
        st = stats[str(s["arm"])]
        for j in by_id.get(str(s.get("id")), []):
            st["judged"] += 1
            if not j.get("parsed", True):
                st["unparsed"] += 1
            if j.get("label") is not None:
                st["labels"][str(j["label"])] = st["labels"].get(str(j["label"]), 0) + 1
            if j.get("score") is not None:
                st["scores"].append(float(j["score"]))
    rows = ["<table><tr><th>arm</th><th>judged</th><th>unparsed</th><th>labels</th><th>mean score</th></tr>"]
    for a, st in stats.items():
        labels = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(st["labels"].items()))
        mean = f"{sum(st['scores']) / len(st['scores']):.3g}" if st["scores"] else ""
        rows.append(f"<tr><td>{_e(a)}</td><td>{st['judged']}</td><td>{st['unparsed']}</td><td>{labels}</td>"
                    f"<td>{mean}</td></tr>")
    rows.append("</table>")
    return "".join(rows)
