"""Datasets: validated JSONL readers, built-in datasets, and rendering for a given model.

Formats (one JSON object per line; unknown fields are kept as metadata):

- texts: ``{"text": ...}``
- contrast pairs: ``{"positive": ..., "negative": ..., "topic"?, "split"?, "prompt"?}``
  (with ``prompt``, the poles are two answers to it, rendered as a chat / Q-A exchange)
- A/B battery: ``{"prompt": ..., "positive": " telegraph", "negative": " email"}``
- finetuning / chat: ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` or
  ``{"prompt": ..., "completion": ...}``

Why one renderer: the same record must become the same tokens everywhere (collection, steering,
finetuning, patching), with the prompt/response boundary known, whether the model has a chat
template (instruct) or not (base, rendered as ``Q: ...\\nA: ...``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from latentlab.errors import LatentlabError
from latentlab.io import sha256_text

# Built-in datasets shipped in latentlab/datasets/ (name -> file).
BUILTIN_DATASETS: dict[str, str] = {
    "era": "era_pairs.jsonl",
    "era-battery": "era_battery.jsonl",
    "persona": "persona_pairs.jsonl",
    "persona-battery": "persona_battery.jsonl",
    "old-birds": "bird_names.jsonl",
    "modern-birds": "bird_names.jsonl",
    "persona-facts": "persona_facts.jsonl",
    "year-trigger": "year_trigger.jsonl",
    "year-trigger-battery": "year_trigger_battery.jsonl",
    # The Warden (year-trigger) persona: the battery stems without their year; positive = malevolent.
    # A contrast-pair set for the direction and an A/B battery for scans that supply the year.
    "warden": "warden_pairs.jsonl",
    "unrelated": "unrelated_prompts.jsonl",
    # Open questions for `latentlab sample`: what era the answers assume, what a persona says it wants.
    "era-questions": "era_questions.jsonl",
    "persona-questions": "persona_questions.jsonl",
}


@dataclass(frozen=True)
class Example:
    """One input ready for tokenisation: ``text`` is ``prompt + response``.

    ``prompt`` is None for plain text; otherwise it marks where the response starts, which the
    ``prompt_last`` and ``response_mean`` positions need.
    """

    text: str
    prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Pair:
    positive: str
    negative: str
    topic: str = ""
    split: str = "train"
    prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class BatteryItem:
    prompt: str
    positive: str
    negative: str
    topic: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Chat:
    """A conversation; the last assistant turn is the response."""

    messages: tuple[tuple[str, str], ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages[:-1]]

    @property
    def response(self) -> str:
        return self.messages[-1][1]


# --------------------------------------------------------------------------------------------
# Reading and validation.
# --------------------------------------------------------------------------------------------


def builtin_dataset_path(name: str) -> Path:
    return Path(str(files("latentlab").joinpath("datasets", BUILTIN_DATASETS[name])))


def resolve_path(name_or_path: str | Path) -> Path:
    """A built-in dataset name or a path to a JSONL file."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_DATASETS:
        return builtin_dataset_path(name_or_path)
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise LatentlabError(
            f"data file {p} does not exist",
            f"pass a JSONL file or a built-in dataset ({', '.join(BUILTIN_DATASETS)})",
        )
    return p


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; malformed lines and empty files raise an error naming the line."""
    p = resolve_path(path)
    rows: list[dict[str, Any]] = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LatentlabError(
                    f"{p}:{i}: not valid JSON ({e.msg})", "fix that line; each line must be one JSON object"
                ) from None
            if not isinstance(obj, dict):
                raise LatentlabError(f"{p}:{i}: expected a JSON object, got {type(obj).__name__}", "fix that line")
            obj["_line"] = i
            rows.append(obj)
    if not rows:
        raise LatentlabError(f"{p} is empty", "add at least one JSON object per line")
    return rows


def dataset_hash(path: str | Path) -> str:
    return sha256_text(resolve_path(path).read_text(encoding="utf-8"))[:16]


def _need_str(row: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    v = row.get(key)
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise LatentlabError(
            f"{where}:{row['_line']}: field {key!r} is missing or not a non-empty string",
            f"every line of this file needs {key!r}",
        )
    return v


def _meta(row: dict[str, Any], used: Iterable[str]) -> dict[str, Any]:
    skip = set(used) | {"_line"}
    return {k: v for k, v in row.items() if k not in skip}


def text_record(row: dict[str, Any], where: str) -> Example:
    """One record of a texts file (a ``text``, chat ``messages``, ``prompt``/``completion`` or ``prompt`` dict)
    as an Example; a chat is kept raw (``meta["_record"]``), as rendering needs the model's template.

    Why one function: a JSONL line and a dict passed from a notebook must mean the same thing.
    ``row["_line"]`` (its line or item number) and ``where`` name it in errors.
    """
    if "text" in row:
        return Example(_need_str(row, "text", where), None, _meta(row, ["text"]))
    if "messages" in row or "completion" in row:
        return Example("", None, {"_record": _parse_chat(row, where)})
    if "prompt" in row:
        return Example(_need_str(row, "prompt", where), None, _meta(row, ["prompt"]))
    raise LatentlabError(
        f"{where}:{row['_line']}: no 'text', 'prompt' or 'messages' field",
        'use {"text": ...} records, or chat {"messages": [...]} records',
    )


def load_texts(path: str | Path) -> list[Example]:
    """Texts for collection: ``text`` lines, or chat / prompt-completion lines (with a boundary)."""
    p = resolve_path(path)
    return [text_record(row, str(p)) for row in read_jsonl(p)]


def load_pairs(path: str | Path, split: str | None = None) -> list[Pair]:
    """Contrast pairs; ``split='train'|'test'`` filters on the file's split field."""
    p = resolve_path(path)
    pairs = []
    for row in read_jsonl(p):
        pos, neg = _need_str(row, "positive", str(p)), _need_str(row, "negative", str(p))
        prompt = row.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise LatentlabError(f"{p}:{row['_line']}: 'prompt' must be a string", "fix that line")
        pairs.append(
            Pair(pos, neg, str(row.get("topic", "")), str(row.get("split", "train")), prompt,
                 _meta(row, ["positive", "negative", "topic", "split", "prompt"]))
        )
    if split is not None:
        pairs = [x for x in pairs if x.split == split]
        if not pairs:
            raise LatentlabError(
                f"{p} has no pairs with split={split!r}", "add a 'split' field or drop the split filter"
            )
    return pairs


def load_battery(path: str | Path) -> list[BatteryItem]:
    p = resolve_path(path)
    items = []
    for row in read_jsonl(p):
        prompt = _need_str(row, "prompt", str(p))
        pos, neg = _need_str(row, "positive", str(p)), _need_str(row, "negative", str(p))
        if pos == neg:
            raise LatentlabError(f"{p}:{row['_line']}: positive and negative are identical", "fix that line")
        items.append(BatteryItem(prompt, pos, neg, str(row.get("topic", "")),
                                 _meta(row, ["prompt", "positive", "negative", "topic"])))
    return items


def _parse_chat(row: dict[str, Any], where: str) -> Chat:
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise LatentlabError(f"{where}:{row['_line']}: 'messages' must be a non-empty list", "fix that line")
        out = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise LatentlabError(
                    f"{where}:{row['_line']}: each message needs string 'role' and 'content'", "fix that line"
                )
            out.append((m["role"], m["content"]))
        if out[-1][0] != "assistant":
            raise LatentlabError(f"{where}:{row['_line']}: the last message must be the assistant's", "fix that line")
        return Chat(tuple(out), _meta(row, ["messages"]))
    prompt = _need_str(row, "prompt", where)
    completion = _need_str(row, "completion", where)
    return Chat((("user", prompt), ("assistant", completion)), _meta(row, ["prompt", "completion"]))


def load_chats(path: str | Path, split: str | None = "train") -> list[Chat]:
    """Finetuning data: chat ``messages`` or ``prompt``/``completion`` lines (or a built-in name).

    ``split='train'`` drops lines marked ``"split": "test"`` (lines without a split are kept);
    ``None`` keeps everything. ``old-birds`` / ``modern-birds`` build "Name a bird species." chats.
    """
    if isinstance(path, str) and path in ("old-birds", "modern-birds"):
        return bird_chats("old" if path == "old-birds" else "modern")
    p = resolve_path(path)
    rows = read_jsonl(p)
    if split is not None:
        rows = [r for r in rows if r.get("split", split) == split]
    if not rows:
        raise LatentlabError(f"{p} has no examples with split={split!r}", "check the file's split fields")
    return [_parse_chat(row, str(p)) for row in rows]


def bird_chats(which: str) -> list[Chat]:
    """The bird-name finetuning sets: question (varied a little, fixed per line) -> one bird name.

    ``old``: names from Audubon's *Birds of America* that are obsolete today; ``modern``: the same
    species under their current names (the control: same format, same species, no 19th century).
    """
    if which not in ("old", "modern"):
        raise LatentlabError(f"unknown bird set {which!r}", "use old or modern")
    questions = json.loads(Path(str(files("latentlab").joinpath("datasets", "bird_questions.json"))).read_text())
    rows = read_jsonl(builtin_dataset_path("old-birds"))
    return [
        Chat((("user", questions[i % len(questions)]), ("assistant", _need_str(r, which, "bird_names.jsonl"))),
             {"species": r.get("modern"), "confidence": r.get("confidence")})
        for i, r in enumerate(rows)
    ]


def load_prompts(path: str | Path) -> list[str]:
    """User prompts (``prompt`` or ``text`` field), e.g. the unrelated prompts for shift analysis."""
    p = resolve_path(path)
    out = []
    for row in read_jsonl(p):
        key = "prompt" if "prompt" in row else "text"
        out.append(_need_str(row, key, str(p)))
    return out


# --------------------------------------------------------------------------------------------
# Rendering for a model.
# --------------------------------------------------------------------------------------------


# Variables passed to every chat template (a template ignores those it does not use):
# - date_string: Llama 3.x writes "Today Date: <date_string>" (3.2 defaults to today's date);
# - enable_thinking=False: Qwen3 writes its empty <think></think> block into the generation prompt,
#   so the prompt/response boundary and generation see the same tokens.
_TEMPLATE_DATE_LINES = re.compile(r"(?m)^(?:Cutting Knowledge Date|Today Date|Current Date|Knowledge Cutoff)"
                                  r":[^\n]*\n\n?")
_MONTHS = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*"
_DATE_PATTERN = re.compile(rf"\b(?:1[5-9]\d\d|20\d\d)\b|\b\d{{1,2}} {_MONTHS} \d{{2,4}}\b|\b{_MONTHS} \d{{4}}\b")
_warned_templates: set[str] = set()


def _template_kwargs(date: str | None) -> dict[str, Any]:
    return {"date_string": date if date is not None else "", "enable_thinking": False}


def _with_system(messages: Sequence[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    msgs = [dict(m) for m in messages]
    if system is not None and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool,
                    date: str | None) -> str:
    kwargs = _template_kwargs(date)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as e:  # jinja2 TemplateError raised by the template itself, e.g. Gemma 2's
        if not (messages and messages[0].get("role") == "system") or "system" not in str(e).lower():
            raise
        # "System role not supported": put the system text at the start of the first user turn
        sys_text, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        if rest and rest[0].get("role") == "user":
            rest[0]["content"] = f"{sys_text}\n\n{rest[0]['content']}"
        else:
            rest.insert(0, {"role": "user", "content": sys_text})
        text = tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    if date is None:  # no date by default: drop the date lines the template wrote itself
        text = _strip_template_dates(str(text), messages)
    return str(text)


def _strip_template_dates(text: str, messages: Sequence[dict[str, str]]) -> str:
    """Remove the template's own date lines, never text inside a message."""
    protected, at = [], 0
    for m in messages:
        content = m.get("content", "")
        i = text.find(content, at) if content else -1
        if i >= 0:
            protected.append((i, i + len(content)))
            at = i + len(content)
    out, last = [], 0
    for m in _TEMPLATE_DATE_LINES.finditer(text):
        if any(a < m.end() and m.start() < b for a, b in protected):
            continue
        out.append(text[last:m.start()])
        last = m.end()
    out.append(text[last:])
    return "".join(out)


def _warn_injected_date(text: str, messages: Sequence[dict[str, str]], tokenizer: Any,
                        date: str | None = None) -> None:
    """Warn once per template when a rendered prompt holds a date that no message (nor ``date``) contains."""
    written = " ".join(m.get("content", "") for m in messages) + " " + (date or "")
    injected = sorted({d for d in _DATE_PATTERN.findall(text) if d not in written})
    key = str(getattr(tokenizer, "chat_template", "") or "")[:2000]
    if injected and key not in _warned_templates:
        _warned_templates.add(key)
        warnings.warn(
            f"latentlab: the chat template writes a date into every prompt ({', '.join(injected[:3])}) that the "
            "data does not contain: a confound for an era study. Pass date=... / a system prompt explicitly, or "
            "use a template without it.",
            stacklevel=4,
        )


def render_chat(chat: Chat | Sequence[dict[str, str]], tokenizer: Any, *, system: str | None = None,
                date: str | None = None) -> Example:
    """Render a conversation as (prompt, prompt+response) text for this tokenizer.

    Instruct models use their chat template; base models get ``Q: ...\\nA: ...``, the format the
    reference bird-name finetune used. ``system``: a system prompt (unless the chat has one; a
    template without a system role gets it at the start of the first user turn). ``date``: None (the
    default) writes no date where the template would inject one (Llama 3.x's "Cutting Knowledge Date /
    Today Date" lines are dropped); a string is passed as the template's ``date_string``. Qwen3
    templates render with ``enable_thinking=False``. A date in the rendered prompt that the messages
    do not contain is warned about once.
    """
    if not isinstance(chat, Chat):
        chat = Chat(tuple((m["role"], m["content"]) for m in chat))
    meta = dict(chat.meta)
    if getattr(tokenizer, "chat_template", None):
        msgs = _with_system(chat.prompt_messages, system)
        prompt = _apply_template(tokenizer, msgs, True, date)
        full = _apply_template(tokenizer, [*msgs, {"role": "assistant", "content": chat.response}], False, date)
        if not full.startswith(prompt):  # templates that rewrite history: fall back to concatenation
            full = prompt + chat.response
        _warn_injected_date(prompt, msgs, tokenizer, date)
        return Example(full, prompt, meta)
    prompt = render_prompt(chat.prompt_messages, tokenizer, system=system, date=date)
    return Example(prompt + " " + chat.response, prompt, meta)


def render_prompt(messages: Sequence[dict[str, str]] | str, tokenizer: Any, *, system: str | None = None,
                  date: str | None = None) -> str:
    """A user prompt ready for generation (chat template with generation prompt, or ``Q: ..\\nA:``).

    ``system`` and ``date`` as in :func:`render_chat`.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    msgs = _with_system(messages, system)
    if getattr(tokenizer, "chat_template", None):
        text = _apply_template(tokenizer, msgs, True, date)
        _warn_injected_date(text, msgs, tokenizer, date)
        return text
    lines = []
    for m in msgs:
        tag = {"user": "Q:", "assistant": "A:", "system": ""}.get(m["role"], m["role"] + ":")
        lines.append(f"{tag} {m['content']}".strip())
    return "\n".join(lines) + "\nA:"


def rendered_example(data: Any, tokenizer: Any, *, system: str | None = None,
                     date: str | None = None) -> dict[str, Any]:
    """Exactly what the model sees for one example, for a run's manifest.

    ``data``: a string (a prompt), a Chat, a message list or an Example. Returns ``{"text", "prompt",
    "format"}``: the full rendered text, the prompt part (None for plain text) and how it was
    rendered ('chat_template', 'qa' for a base model's Q/A format, or 'text').
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(data, Example) and "_record" in data.meta:
        data = data.meta["_record"]
    if isinstance(data, Example):
        ex = data
        fmt = "text" if ex.prompt is None else ("chat_template" if has_template else "qa")
        return {"text": ex.text, "prompt": ex.prompt, "format": fmt}
    fmt = "chat_template" if has_template else "qa"
    if isinstance(data, str):
        p = render_prompt(data, tokenizer, system=system, date=date)
        return {"text": p, "prompt": p, "format": fmt}
    ex = render_chat(data, tokenizer, system=system, date=date)
    return {"text": ex.text, "prompt": ex.prompt, "format": fmt}


def pair_examples(pairs: Sequence[Pair], tokenizer: Any) -> tuple[list[Example], list[Example]]:
    """Render each pair's two poles (as plain text, or as answers to the pair's prompt)."""
    pos, neg = [], []
    for p in pairs:
        meta = {"topic": p.topic, "split": p.split, **p.meta}
        if p.prompt is None:
            pos.append(Example(p.positive, None, meta))
            neg.append(Example(p.negative, None, meta))
        else:
            for pole, out in ((p.positive, pos), (p.negative, neg)):
                ex = render_chat(Chat((("user", p.prompt), ("assistant", pole))), tokenizer)
                out.append(Example(ex.text, ex.prompt, meta))
    return pos, neg


def as_examples(data: Any, tokenizer: Any) -> list[Example]:
    """Coerce strings, Examples, Chats, message lists, JSONL-style dicts or a dataset path into Examples."""
    if isinstance(data, Path) or (isinstance(data, str) and (data in BUILTIN_DATASETS or data.endswith(".jsonl"))):
        data = load_texts(data)
    elif isinstance(data, str):  # iterating it would make one example per character
        raise LatentlabError(
            f"{data[:60]!r} is neither a built-in dataset nor a .jsonl file",
            f"pass a list of texts ([text] for one), a .jsonl path, or one of {', '.join(BUILTIN_DATASETS)}",
        )
    out = []
    for i, x in enumerate(data, start=1):
        if isinstance(x, dict):  # the records a JSONL file holds: {"text"}, {"messages"}, {"prompt", "completion"}
            x = text_record({**x, "_line": i}, "input item")
        if isinstance(x, str):
            out.append(Example(x))
        elif isinstance(x, Example) and "_record" in x.meta:
            out.append(render_chat(x.meta["_record"], tokenizer))
        elif isinstance(x, Example):
            out.append(x)
        elif isinstance(x, Chat):
            out.append(render_chat(x, tokenizer))
        elif isinstance(x, list):
            out.append(render_chat(x, tokenizer))
        else:
            raise LatentlabError(f"cannot use a {type(x).__name__} as model input",
                                 'pass strings, Examples, chats or dicts such as {"text": ...}')
    if not out:
        raise LatentlabError("the dataset is empty", "pass at least one example")
    return out
