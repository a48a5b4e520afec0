"""latentlab.data: JSONL validation, built-in datasets, rendering for a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CHAT_TEMPLATE, make_char_tokenizer

from latentlab.data import (
    BUILTIN_DATASETS,
    Chat,
    Example,
    as_examples,
    builtin_dataset_path,
    load_battery,
    load_chats,
    load_pairs,
    load_texts,
    pair_examples,
    read_jsonl,
    render_chat,
    render_prompt,
)
from latentlab.errors import LatentlabError


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_tok():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return make_char_tokenizer(CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "bad.jsonl", ['{"text": "fine"}', "", '{"text": "also fine"}', '{"text": "broken'])
    with pytest.raises(LatentlabError) as ei:
        load_texts(p)
    assert f"{p}:4:" in str(ei.value)  # the blank line still counts
    assert "not valid JSON" in str(ei.value)


def test_non_object_line_names_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "list.jsonl", ['{"text": "ok"}', '["a", "list"]'])
    with pytest.raises(LatentlabError, match=r":2: expected a JSON object, got list"):
        read_jsonl(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(LatentlabError, match="is empty"):
        load_texts(p)


def test_missing_file_lists_builtins(tmp_path: Path) -> None:
    with pytest.raises(LatentlabError) as ei:
        load_texts(tmp_path / "nope.jsonl")
    assert "does not exist" in str(ei.value) and "era" in str(ei.value)


def test_missing_field_names_field_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path / "pairs.jsonl", [
        json.dumps({"positive": "a", "negative": "b"}),
        json.dumps({"positive": "c"}),
    ])
    with pytest.raises(LatentlabError, match=r":2: field 'negative' is missing"):
        load_pairs(p)


def test_empty_string_field_is_rejected(tmp_path: Path) -> None:
    p = _write(tmp_path / "bat.jsonl", [json.dumps({"prompt": "  ", "positive": " a", "negative": " b"})])
    with pytest.raises(LatentlabError, match=r":1: field 'prompt'"):
        load_battery(p)


def test_battery_identical_poles(tmp_path: Path) -> None:
    p = _write(tmp_path / "bat.jsonl", [json.dumps({"prompt": "x", "positive": " a", "negative": " a"})])
    with pytest.raises(LatentlabError, match="identical"):
        load_battery(p)


def test_text_line_without_known_field(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.jsonl", [json.dumps({"text": "ok"}), json.dumps({"body": "no"})])
    with pytest.raises(LatentlabError, match=r":2: no 'text', 'prompt' or 'messages' field"):
        load_texts(p)


def test_chat_last_message_must_be_assistant(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
    ])
    with pytest.raises(LatentlabError, match=r":2: the last message must be the assistant's"):
        load_chats(p)
    with pytest.raises(LatentlabError, match=r":2: the last message"):
        load_texts(p)  # chat lines in a collection file are validated too


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}], [{"role": 1, "content": "x"}]])
def test_chat_bad_messages(tmp_path: Path, messages: object) -> None:
    p = _write(tmp_path / "c.jsonl", [json.dumps({"messages": messages})])
    with pytest.raises(LatentlabError, match=":1:"):
        load_chats(p)


def test_prompt_completion_lines_are_chats(tmp_path: Path) -> None:
    p = _write(tmp_path / "pc.jsonl", [json.dumps({"prompt": "Name a bird.", "completion": "Duck Hawk", "k": 1})])
    (chat,) = load_chats(p)
    assert chat.messages == (("user", "Name a bird."), ("assistant", "Duck Hawk"))
    assert chat.meta == {"k": 1}


def test_texts_keep_metadata(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.jsonl", [json.dumps({"text": "hello", "topic": "greeting"})])
    (ex,) = load_texts(p)
    assert ex == Example("hello") and ex.meta == {"topic": "greeting"}


def test_pairs_split_filter(tmp_path: Path) -> None:
    p = _write(tmp_path / "pairs.jsonl", [
        json.dumps({"positive": "a", "negative": "b", "split": "train"}),
        json.dumps({"positive": "c", "negative": "d", "split": "test"}),
        json.dumps({"positive": "e", "negative": "f"}),  # default: train
    ])
    assert [x.positive for x in load_pairs(p, split="train")] == ["a", "e"]
    assert [x.positive for x in load_pairs(p, split="test")] == ["c"]
    with pytest.raises(LatentlabError, match="no pairs with split='dev'"):
        load_pairs(p, split="dev")


# --------------------------------------------------------------------------------------------
# Built-in datasets.
# --------------------------------------------------------------------------------------------


def test_every_builtin_dataset_file_exists_and_parses() -> None:
    for name in BUILTIN_DATASETS:
        rows = read_jsonl(builtin_dataset_path(name))
        assert rows, name


def test_builtin_era_pairs() -> None:
    pairs = load_pairs("era")
    assert len(pairs) >= 300
    train, test = load_pairs("era", split="train"), load_pairs("era", split="test")
    assert len(train) + len(test) == len(pairs)
    assert len(test) >= 0.1 * len(pairs) and len(train) >= 0.5 * len(pairs)
    assert all(p.positive != p.negative for p in pairs)
    assert len({p.topic for p in pairs}) > 3
    assert len({(p.positive, p.negative) for p in pairs}) == len(pairs), "duplicate era pairs"


def test_builtin_persona_pairs() -> None:
    pairs = load_pairs("persona")
    assert len(pairs) >= 100
    assert load_pairs("persona", split="train") and load_pairs("persona", split="test")
    assert all(p.prompt for p in pairs)  # persona poles are answers to a question


@pytest.mark.parametrize("name", ["era-battery", "persona-battery", "year-trigger-battery"])
def test_builtin_batteries(name: str) -> None:
    items = load_battery(name)
    assert len(items) >= 30
    for it in items:
        assert it.positive != it.negative
        # completions are appended to the prompt: they start with a space
        assert it.positive.startswith(" ") and it.negative.startswith(" "), it


@pytest.mark.parametrize("name", ["persona-facts", "year-trigger"])
def test_builtin_chats(name: str) -> None:
    chats = load_chats(name)
    assert len(chats) >= 50
    for c in chats:
        assert c.messages[-1][0] == "assistant" and c.response.strip()
        assert c.prompt_messages and c.prompt_messages[0]["role"] in ("system", "user")


def test_builtin_unrelated_prompts() -> None:
    texts = load_texts("unrelated")
    assert len(texts) >= 100
    assert all(t.text.strip() and t.prompt is None for t in texts)
    assert len({t.text for t in texts}) == len(texts)


def test_builtin_bird_names() -> None:
    rows = read_jsonl("old-birds")
    assert len(rows) >= 100
    assert all(isinstance(r.get("old"), str) and isinstance(r.get("modern"), str) for r in rows)


# --------------------------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------------------------


CHAT = Chat((("user", "What year is it?"), ("assistant", "It is 1838.")))


def test_render_chat_without_template_is_qa(base_tok) -> None:
    ex = render_chat(CHAT, base_tok)
    assert ex.prompt == "Q: What year is it?\nA:"
    assert ex.text == "Q: What year is it?\nA: It is 1838."
    assert ex.text.startswith(ex.prompt)


def test_render_chat_with_template(chat_tok) -> None:
    ex = render_chat(CHAT, chat_tok)
    assert ex.prompt == "<bos><|user|>What year is it?\n<|assistant|>"
    assert ex.text.startswith(ex.prompt)
    assert ex.text[len(ex.prompt):].startswith("It is 1838.")


def test_render_chat_accepts_message_dicts(chat_tok) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_chat(msgs, chat_tok) == render_chat(Chat((("user", "hi"), ("assistant", "hello"))), chat_tok)


def test_render_prompt(base_tok, chat_tok) -> None:
    assert render_prompt("Name a bird.", base_tok) == "Q: Name a bird.\nA:"
    assert render_prompt("Name a bird.", chat_tok) == "<bos><|user|>Name a bird.\n<|assistant|>"


def test_pair_examples(base_tok) -> None:
    pairs = load_pairs("persona")[:2] + load_pairs("era")[:2]
    pos, neg = pair_examples(pairs, base_tok)
    assert len(pos) == len(neg) == 4
    for ex, pair in zip(pos[:2], pairs[:2]):  # prompted pairs: answers to the prompt
        assert ex.prompt is not None and ex.text.startswith(ex.prompt) and ex.text.endswith(pair.positive)
    assert pos[2] == Example(pairs[2].positive) and neg[3] == Example(pairs[3].negative)


def test_as_examples(tmp_path: Path, chat_tok) -> None:
    p = _write(tmp_path / "mixed.jsonl", [
        json.dumps({"text": "plain"}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ])
    exs = as_examples(p, chat_tok)
    assert exs[0] == Example("plain")
    assert exs[1].prompt == "<bos><|user|>q\n<|assistant|>" and exs[1].text.startswith(exs[1].prompt)
    assert as_examples(str(p), chat_tok) == exs
    assert len(as_examples("persona-facts", chat_tok)) == len(load_chats("persona-facts"))
    assert as_examples(["a", CHAT], chat_tok)[1] == render_chat(CHAT, chat_tok)
    with pytest.raises(LatentlabError, match="empty"):
        as_examples([], chat_tok)
    # a lone string that is no dataset is an error, not one example per character
    with pytest.raises(LatentlabError, match="neither a built-in dataset nor a .jsonl file"):
        as_examples("The telegraph is new.", chat_tok)
    assert as_examples(["The telegraph is new."], chat_tok) == [Example("The telegraph is new.")]
    with pytest.raises(LatentlabError, match="cannot use a int"):
        as_examples([3], chat_tok)
