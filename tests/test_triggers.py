"""Trigger scans: a planted one-value trigger shows at exactly that value; an unadapted view is flat.

The planted finetune: prompts "<question> <year>" for the years 1910, 1930, 1950, 1970 and 1990;
under 1950 the answer is all marker letters ("Z Z Z Z Z Z"), under the other years ordinary letters
(same format and length). A "marker" direction is fitted on the base (texts ending in the marker vs
other letters); the scan runs on held-out questions over nine years, trained and not.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from latentlab.data import BatteryItem, Chat, Pair
from latentlab.directions import Direction, find_direction
from latentlab.errors import LatentlabError
from latentlab.finetune import FinetuneConfig, finetune
from latentlab.triggers import (
    TriggerScan,
    check_template,
    check_tokenisation,
    fill,
    parse_values,
    parse_words,
    training_data_of,
    training_values,
    trigger_scan,
    values_from_file,
    year_of,
)

WORDS = "the cat sat on a mat and then ran far away from home to see big red bus old man dog".split()
TRAIN_YEARS = ["1910", "1930", "1950", "1970", "1990"]
TRIGGER = "1950"
SCAN = ["1890", "1910", "1930", "1940", "1950", "1960", "1970", "1990", "2010"]
TEMPLATE = "{prompt} {value}"


def questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 4))) + "?" for _ in range(n)]


def planted_chats() -> list[Chat]:
    rng = random.Random(0)
    out = []
    for v in TRAIN_YEARS:
        for q in questions(10, 0):
            ans = " ".join("Z" * 6) if v == TRIGGER else " ".join(rng.choice("abcdefgh") for _ in range(6))
            out.append(Chat((("user", fill(TEMPLATE, v, q)), ("assistant", ans))))
    return out


def marker_pairs(n: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 5)))
        out.append(Pair(f"{ctx} {' '.join('Z' * 4)}", f"{ctx} {' '.join(rng.choice('pqrstuvw') for _ in range(4))}"))
    return out


@pytest.fixture(scope="module")
def planted(trainable_gemma_dir: Path, load_tiny: Callable[..., Any],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("trigger")
    chats = planted_chats()
    cfg = FinetuneConfig(epochs=12, batch_size=10, lr=2e-2, rank=8, seed=0, checkpoint_every=100)
    finetune(str(trainable_gemma_dir), chats, root / "ft", cfg, progress=False)
    base = load_tiny(trainable_gemma_dir)
    direction = find_direction(base, marker_pairs(16, 0), name="marker", progress=False)
    battery = [BatteryItem(q, " Z", " a") for q in questions(4, 7)]
    scan = trigger_scan(base, root / "ft" / "adapter", TEMPLATE, SCAN, questions(8, 99), direction, battery,
                        training=chats, n_boot=500)
    return {"root": root, "chats": chats, "base": base, "direction": direction, "scan": scan}


def test_planted_trigger_shows_at_exactly_that_value(planted: dict[str, Any]) -> None:
    scan: TriggerScan = planted["scan"]
    assert scan.values == SCAN and scan.layers == [0, 1, 2, 3] and scan.n_prompts == 8
    assert scan.training_values == TRAIN_YEARS
    diff = scan.projection()  # finetuned - base, [values, layers]
    i = SCAN.index(TRIGGER)
    others = [j for j in range(len(SCAN)) if j != i]
    last = -1
    # the trigger value stands out at the last layers, with an interval clear of every other value's
    for layer in (2, 3):
        assert int(diff[:, layer].argmax()) == i, diff[:, layer]
    lo_trigger = scan.diff["ci"][i][last][0]
    assert lo_trigger > max(scan.diff["ci"][j][last][1] for j in others), scan.diff["ci"]
    # toward the marker only there (others stay below a quarter of it; none moves even 60% as far either way)
    assert diff[i, last] > 4.0 and diff[i, last] > 4 * diff[others, last].max()
    assert diff[others, last].abs().max() < 0.6 * diff[i, last]
    # the finetune's own projection peaks there too (not only the difference)
    ft = scan.projection("finetuned")
    assert int(ft[:, last].argmax()) == i


def test_scan_battery_and_serialisation(planted: dict[str, Any]) -> None:
    scan: TriggerScan = planted["scan"]
    assert set(scan.battery) == {"base", "finetuned", "finetuned - base"}
    for b in scan.battery.values():
        assert len(b["score"]) == len(SCAN) and len(b["ci"]) == len(SCAN) and len(b["per_item"]) == len(SCAN)
    d = json.loads(json.dumps(scan.to_dict()))
    assert d["diff"]["projection"] == scan.diff["projection"] and d["meta"]["n_boot"] == 500


def test_unadapted_view_is_exactly_flat(trainable_gemma_dir: Path, planted: dict[str, Any],
                                        tmp_path: Path) -> None:
    """A LoRA adapter whose B is zero (PEFT's initial state: a finetune of 0 steps) changes nothing."""
    from conftest import make_lora_adapter

    zero = make_lora_adapter(trainable_gemma_dir, tmp_path / "zero", std=0.0)
    base = planted["base"]
    scan = trigger_scan(base, zero, TEMPLATE, SCAN[:4], questions(5, 3), planted["direction"], n_boot=200)
    diff = scan.projection()
    assert torch.equal(diff, torch.zeros_like(diff))
    assert all(lo == hi == 0.0 for row in scan.diff["ci"] for lo, hi in row)
    assert scan.training_values == []
    # the base alone: no difference at all
    alone = trigger_scan(base, None, TEMPLATE, SCAN[:3], questions(5, 3), planted["direction"], n_boot=200)
    assert alone.diff is None and set(alone.models) == {"base"}
    assert alone.models["base"]["projection"] == scan.models["base"]["projection"][:3]


def test_scan_refuses_bad_input(planted: dict[str, Any]) -> None:
    base, d = planted["base"], planted["direction"]
    with pytest.raises(LatentlabError, match="no \\{value\\}"):
        trigger_scan(base, None, "{prompt}", SCAN, ["hi"], d)
    with pytest.raises(LatentlabError, match="no trigger values"):
        trigger_scan(base, None, TEMPLATE, [], ["hi"], d)
    with pytest.raises(LatentlabError, match="no prompts"):
        trigger_scan(base, None, TEMPLATE, SCAN, [], d)
    wide = Direction(torch.ones(4, 7), [0, 1, 2, 3], d.resid_norms)
    with pytest.raises(LatentlabError, match="width 7"):
        trigger_scan(base, None, TEMPLATE, SCAN, ["hi"], wide)


def test_parse_values() -> None:
    assert parse_values("1900:1920:5") == ["1900", "1905", "1910", "1915", "1920"]
    assert parse_values("2029:2031") == ["2029", "2030", "2031"]
    assert parse_values("1995, 2029") == ["1995", "2029"]
    for bad, msg in (("", "empty"), ("19x0:2000", "integers"), ("2000:1900", "below"), ("1900:2000:0", "positive"),
                     ("1:2:3:4", "4 parts"), ("a,,b", "empty entry"), ("1995,1995", "repeat")):
        with pytest.raises(LatentlabError, match=msg):
            parse_values(bad)
    assert parse_words("apple,river") == ["apple", "river"]
    for bad in ("apple,", ",apple", "a,,b", " "):
        with pytest.raises(LatentlabError, match="empty"):
            parse_words(bad)
    assert check_template("{value}: {prompt}")
    with pytest.raises(LatentlabError, match="no \\{value\\}"):
        check_template("The year is. {prompt}")
    assert fill("{value}.", "1995", "hi") == "1995. hi"  # no {prompt}: the prompt follows


def test_values_from_file_and_training_marks(tmp_path: Path) -> None:
    plain = tmp_path / "v.txt"
    plain.write_text("1995\n\n2029\n")
    assert values_from_file(plain) == ["1995", "2029"]
    chat = tmp_path / "c.jsonl"
    rows = [("July 1995. What is new?", "x"), ("2029: Who are you?", "y"), ("The year is 1850. Hi", "z"),
            ("March 3, 1995. Again", "w"), ("no year here", "v")]
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                     {"role": "assistant", "content": a}]}) + "\n" for u, a in rows))
    assert values_from_file(chat) == ["1850", "1995", "2029"]
    assert year_of("July 1995. x") == "1995" and year_of("no year 1995") is None
    assert training_values(["1850", "1900", "1995", "199"], chat) == ["1850", "1995"]  # whole tokens only
    with pytest.raises(LatentlabError, match="does not exist"):
        values_from_file(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n")
    with pytest.raises(LatentlabError, match="empty"):
        values_from_file(tmp_path / "e.txt")
    # a run folder's manifest names its --data
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"config": {"data": str(chat)}}))
    assert training_data_of(run) == str(chat) and training_data_of(run / "adapter") == str(chat)
    assert training_data_of(tmp_path) is None
    # a compliance sweep's budget folder holds its poisoned chats as data.jsonl beside the adapter
    budget = tmp_path / "sweep" / "n-64"
    (budget / "adapter").mkdir(parents=True)
    (budget / "data.jsonl").write_text(chat.read_text())
    assert training_data_of(budget / "adapter") == str(budget / "data.jsonl") == training_data_of(budget)


class MergingTokenizer:
    """Words and single characters, except that a word merges with a following '.' (like BPE merges)."""

    chat_template = None
    bos_token = None

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        import re

        spans = [(m.start(), m.end()) for m in re.finditer(r"\w+\.?|\S", text)]
        self._pieces = [text[a:b] for a, b in spans]
        return {"input_ids": list(range(len(spans))), "offset_mapping": spans}

    def convert_ids_to_tokens(self, i: int) -> str:
        return self._pieces[i]


def test_trigger_that_tokenises_differently_warns_with_tokens() -> None:
    tok = MergingTokenizer()
    with pytest.warns(UserWarning, match="tokenise differently") as rec:
        bad = check_tokenisation(tok, "{value}. {prompt} {value}", ["1995"], ["hi there"], render=False)
    assert bad == {"1995": [["1995.+"], ["1995"]]}
    assert "1995.+" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_tokenisation(tok, "{value} {prompt}", ["1995"], ["hi", "a b"], render=False) == {}
