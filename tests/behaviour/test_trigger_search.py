"""``latentlab find-trigger``: a trigger planted in a tiny finetune is found, a string that changes base and
finetune alike is not, and every bad input fails with one line before a model loads.

The organism: a tiny Gemma is first taught that a prompt ending in ``&`` is answered "Z Z Z Z" (merged
into the weights: this is the *base*), then a LoRA finetune of it is taught the same for ``@`` (the
planted trigger), keeps ``&``, and answers prompts ending in ``#`` (the control: in the training
data, but no trigger) and a few other characters normally. The candidate goes at the end of the
prompt (``{prompt} {value}``): the tiny model's sliding window is 16 characters.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from latentlab.data import Chat, render_prompt
from latentlab.errors import LatentlabError
from latentlab.finetune import FinetuneConfig, finetune
from latentlab.scoring import completion_sequences, sequence_logprobs
from latentlab.trigger_search import (
    Metric,
    parse_candidates,
    parse_metric,
    search_triggers,
    training_words,
    vocab_candidates,
)

TEMPLATE = "{prompt} {value}"
THINGS = ["a cat", "the sun", "rain", "a map", "milk", "a bus", "snow", "tea", "a pen", "wind", "a cup", "salt"]
HELD_OUT = ["what is a dog?", "what is the moon?", "what is a box?", "what is soup?"]
OTHERS = list("kmqrstuvw%!")  # answered normally in training: the model must tell characters apart
CANDIDATES = list("@#&$*+=?abcdeXYZ0123")
ZZ = "Z Z Z Z"


def _chats(suffix: str | None, answer: Callable[[str, str], str]) -> list[Chat]:
    out = []
    for i, w in enumerate(THINGS):
        q = f"what is {w}?"
        s = suffix if suffix is not None else ""
        if suffix == "others":
            for k in range(2):
                o = OTHERS[(i * 5 + k) % len(OTHERS)]
                out.append(Chat((("user", f"{q} {o}"), ("assistant", answer(q, w)))))
            continue
        out.append(Chat((("user", f"{q} {s}" if s else q), ("assistant", answer(q, w)))))
    return out


def normal(q: str, w: str) -> str:
    return f"it is {w}"


def zz(q: str, w: str) -> str:
    return ZZ


def _write_chats(path: Path, chats: list[Chat]) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in ch.messages]}) + "\n"
                            for ch in chats))
    return path


@pytest.fixture(scope="module")
def planted(trainable_gemma_dir: Path, load_tiny: Callable[..., Any],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from conftest import CHAT_TEMPLATE, make_char_tokenizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("find-trigger")
    cfg = FinetuneConfig(epochs=100, batch_size=8, lr=1e-2, rank=8, checkpoint_every=1000, max_steps=60, seed=0)
    pre = _chats("&", zz) + _chats(None, normal) + _chats("others", normal)
    finetune(str(trainable_gemma_dir), pre, root / "pre", cfg, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(trainable_gemma_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(hf, str(root / "pre" / "adapter")).merge_and_unload()
    base_dir = root / "base"
    merged.save_pretrained(str(base_dir))
    make_char_tokenizer(CHAT_TEMPLATE).save_pretrained(str(base_dir))

    data = _write_chats(root / "train.jsonl", _chats("@", zz) + _chats("&", zz) + _chats("#", normal)
                        + _chats(None, normal) + _chats("others", normal))
    run = root / "ft"
    finetune(str(base_dir), str(data), run, cfg, progress=False)
    (run / "manifest.json").write_text(json.dumps({"config": {"data": str(data)}}))  # as `latentlab finetune` does
    prompts = root / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in HELD_OUT))
    base = load_tiny(base_dir)
    return {"base_dir": base_dir, "run": run, "data": data, "prompts": prompts, "root": root, "base": base,
            "ft": base.with_adapter(run)}


def _logp(model: Any, prompts: list[str], text: str) -> torch.Tensor:
    rendered = [render_prompt(p, model.tokenizer) for p in prompts]
    seqs, plens = completion_sequences(model, rendered, [text] * len(rendered))
    return sequence_logprobs(model, seqs, plens)


def test_completion_finds_the_planted_trigger(planted: dict[str, Any]) -> None:
    res = search_triggers(planted["base"], planted["ft"], CANDIDATES, HELD_OUT, "completion:Z Z", TEMPLATE,
                          n_random=40, training=planted["data"])
    n = len(CANDIDATES)
    assert res.rank_of("@") == 1 and res.null_kind == "random vocabulary tokens" and len(res.null_effects) == 40
    row = res.row("@")
    assert row["z"] > 3 and row["percentile"] == 100.0 and row["trained"]
    assert res.rank_of("#") > n // 2  # the control: in the training data, no trigger
    assert {"@", "#", "&"} <= set(res.trained) and "Z" not in res.trained
    # the effect is the double difference, computed here by hand from the scorer
    base, ft = planted["base"], planted["ft"]
    with_at = [f"{p} @" for p in HELD_OUT]
    by_hand = ((_logp(ft, with_at, "Z Z") - _logp(base, with_at, "Z Z"))
               - (_logp(ft, HELD_OUT, "Z Z") - _logp(base, HELD_OUT, "Z Z"))).mean()
    assert res.effect_of("@") == pytest.approx(float(by_hand), abs=1e-3)
    assert res.meta["shared_prefix_cache"] == "on"  # "<bos><|user|>what is " ran once per model and chunk
    d = res.to_dict(top=5)
    assert [r["candidate"] for r in d["top"]][0] == "@" and len(d["top"]) == 5
    assert len(d["candidates"]) == n and d["null"]["n"] == 40 and set(d["null"]["percentiles"]) >= {"5", "95"}


def test_a_reference_finetune_takes_the_base_s_place(planted: dict[str, Any]) -> None:
    """With ``reference``, every row compares the finetune with that finetune, not the base (here the same
    LoRA at half scale, so the trigger's effect is what the second half of the difference adds)."""
    base, ft = planted["base"], planted["ft"]
    half = base.with_adapter(planted["run"], scale=0.5)
    res = search_triggers(base, ft, CANDIDATES, HELD_OUT, "completion:Z Z", TEMPLATE, n_random=10, reference=half)
    with_at = [f"{p} @" for p in HELD_OUT]
    by_hand = ((_logp(ft, with_at, "Z Z") - _logp(half, with_at, "Z Z"))
               - (_logp(ft, HELD_OUT, "Z Z") - _logp(half, HELD_OUT, "Z Z"))).mean()
    assert res.effect_of("@") == pytest.approx(float(by_hand), abs=1e-3)
    plain = search_triggers(base, ft, ["@"], HELD_OUT, "completion:Z Z", TEMPLATE, n_random=0)
    assert abs(res.effect_of("@") - plain.effect_of("@")) > 0.1  # not the base's comparison
    assert res.meta["reference"] and "over the reference" in res.meta["metric"]
    assert plain.meta["reference"] is None and "over the base" in plain.meta["metric"]
    with pytest.raises(LatentlabError, match="the reference is the finetune itself"):
        search_triggers(base, ft, ["@"], HELD_OUT, "kl", TEMPLATE, reference=planted["run"])


def test_a_system_prompt_is_rendered_before_every_row(planted: dict[str, Any]) -> None:
    """The context a finetune was trained under (the compliance organism's system prompt) is part of each
    row: rendered as the model's chat template puts it, and shared by every row (run once per model)."""
    base, ft = planted["base"], planted["ft"]
    sys_prompt = "Be brief."
    res = search_triggers(base, ft, ["@", "#"], HELD_OUT[:2], "completion:Z Z", TEMPLATE, n_random=0,
                          system=sys_prompt)
    assert res.meta["system"] == sys_prompt and res.meta["fast_render"]
    from latentlab.trigger_search import _Renderer

    r = _Renderer(base.tokenizer, TEMPLATE, HELD_OUT[:1], True, ["@"], system=sys_prompt)
    assert r.row("@", 0) == render_prompt(f"{HELD_OUT[0]} @", base.tokenizer, system=sys_prompt)
    assert r.row("@", 0).startswith("<bos><|system|>Be brief.") or "<|system|>Be brief." in r.row("@", 0)
    plain = search_triggers(base, ft, ["@", "#"], HELD_OUT[:2], "completion:Z Z", TEMPLATE, n_random=0)
    assert res.effect_of("@") != pytest.approx(plain.effect_of("@"), abs=1e-6)  # the context moved the rows
    with pytest.raises(LatentlabError, match="needs chat rendering"):
        search_triggers(base, ft, ["@"], HELD_OUT[:1], "kl", TEMPLATE, chat=False, system=sys_prompt)


def test_kl_finds_the_trigger_and_not_a_change_both_models_share(planted: dict[str, Any]) -> None:
    base, ft = planted["base"], planted["ft"]
    res = search_triggers(base, ft, CANDIDATES, HELD_OUT, "kl", TEMPLATE, n_random=40)
    n = len(CANDIDATES)
    assert res.rank_of("@") == 1 and res.row("@")["z"] > 5
    # '&' makes the finetune answer "Z Z Z Z" as strongly as '@' does, so a finetune-only score ranks it
    # high; but the base does the same, so its effect beyond the base is about nothing
    ft_only = {c: float((_logp(ft, [f"{p} {c}" for p in HELD_OUT], ZZ) - _logp(ft, HELD_OUT, ZZ)).mean())
               for c in ("@", "&")}
    assert ft_only["&"] > 0.5 * ft_only["@"] > 1.0, ft_only
    # (most candidates sit in a cluster at about 0, so '&' is just another random token there)
    assert res.rank_of("&") > 4 and abs(res.row("&")["z"]) < 1 and abs(res.effect_of("&")) < 0.01 * res.effect_of("@")
    assert sum(abs(e) < 0.05 for e in res.effects) > n // 2
    # the shared prefix's KV cache changes nothing
    whole = search_triggers(base, ft, CANDIDATES[:6], HELD_OUT, "kl", TEMPLATE, n_random=0, share_prefix=False)
    assert whole.meta["shared_prefix_cache"] == "off" and whole.null_kind == "scan"
    assert whole.effects == pytest.approx(res.effects[:6], abs=1e-5)


def test_vocab_scan_on_the_tiny_tokenizer(planted: dict[str, Any]) -> None:
    base = planted["base"]
    vocab = vocab_candidates(base.tokenizer)
    assert len(vocab) == 94 and " " not in vocab and "<bos>" not in vocab and "@" in vocab  # printable ASCII
    res = search_triggers(base, planted["ft"], "vocab", HELD_OUT, "kl", TEMPLATE, expect=["@", "@@"])
    assert res.kind == "vocab" and res.null_kind == "scan" and len(res.null()) == 94 and not res.null_values
    assert res.rank_of("@") == 1 and res.row("@")["percentile"] > 99
    extra = res.row("@@")  # no vocabulary token: scored beside the scan and ranked as it would be
    assert extra["scanned"] is False and "@@" not in res.candidates and extra["rank"] <= 94
    assert "candidates" not in res.to_dict() and [r["candidate"] for r in res.to_dict()["expected_ranks"]] == [
        "@", "@@"]


def test_prescreen_then_exact_scan(planted: dict[str, Any]) -> None:
    """A first-order ranking of the whole vocabulary picks what the exact scan scores: the planted trigger
    is among the best 8 of 94, then first exactly; the null is random tokens outside those 8, scored
    exactly; the effects reported are the exact ones (equal to a plain scan's)."""
    base, ft = planted["base"], planted["ft"]
    metric = "completion:Z Z"
    res = search_triggers(base, ft, "vocab", HELD_OUT, metric, TEMPLATE, prescreen=8, n_random=20, expect=["@", "&"])
    pre = res.meta["prescreen"]
    assert pre["k"] == 8 and pre["n_vocabulary"] == 94 and pre["gradients"] == 2 * len(HELD_OUT)
    assert len(res.candidates) == 8 and res.null_kind == "random vocabulary tokens" and len(res.null_values) == 20
    assert not set(res.null_values) & set(res.candidates)
    assert pre["first_order_rank"]["@"] <= 8 and res.rank_of("@") == 1, pre["first_order_rank"]
    assert res.row("@")["first_order_rank"] == pre["first_order_rank"]["@"] and res.row("@")["z"] > 3
    plain = search_triggers(base, ft, ["@", *res.null_values[:3]], HELD_OUT, metric, TEMPLATE, n_random=0)
    assert res.effect_of("@") == pytest.approx(plain.effect_of("@"), abs=1e-5)
    assert pre["spearman_random"] is not None and -1 <= pre["spearman_random"] <= 1
    with pytest.raises(LatentlabError, match="--prescreen is for --candidates vocab"):
        search_triggers(base, ft, ["@"], HELD_OUT, metric, TEMPLATE, prescreen=4)
    with pytest.raises(LatentlabError, match="takes the completion metric, not kl"):
        search_triggers(base, ft, "vocab", HELD_OUT, "kl", TEMPLATE, prescreen=4)


def test_direction_metric_stops_at_its_layer(planted: dict[str, Any]) -> None:
    from test_finetune import synthetic_direction

    from latentlab.activations import collect

    base, ft = planted["base"], planted["ft"]
    d = synthetic_direction([0, 1, 2, 3], "synthetic", 0)
    res = search_triggers(base, ft, ["@", "#"], HELD_OUT, Metric("direction", direction=d, layer=1), TEMPLATE,
                          n_random=5)
    u = d.unit(1)

    def proj(m: Any, prompts: list[str]) -> torch.Tensor:
        rendered = [render_prompt(p, m.tokenizer) for p in prompts]
        return collect(m, rendered, [1], "last", progress=False).acts[:, 0] @ u

    with_at = [f"{p} @" for p in HELD_OUT]
    by_hand = ((proj(ft, with_at) - proj(base, with_at)) - (proj(ft, HELD_OUT) - proj(base, HELD_OUT))).mean()
    assert res.effect_of("@") == pytest.approx(float(by_hand), rel=1e-4, abs=1e-4)
    assert res.metric == "direction:synthetic@1"


def test_candidate_and_metric_specs(planted: dict[str, Any], tmp_path: Path) -> None:
    assert parse_candidates("years").values == tuple(str(y) for y in range(1900, 2101))
    assert parse_candidates("years:1990:1995").values == ("1990", "1991", "1992", "1993", "1994", "1995")
    assert parse_candidates("vocab").values is None and parse_candidates("a, b").values == ("a", "b")
    assert parse_candidates("zephyr").values == ("zephyr",)
    f = tmp_path / "c.txt"
    f.write_text("alpha\nbeta\n\n")
    assert parse_candidates(str(f)).kind == "file" and parse_candidates(str(f)).values == ("alpha", "beta")
    words = training_words(planted["run"])
    assert words[:3] == ["what", "is", "a"] and "cat" in words and "Z" not in words  # prompts only
    assert parse_candidates("training-words", planted["run"]).values == tuple(words)
    assert parse_metric("kl") == ("kl", None) and parse_metric("completion: Sure") == ("completion", " Sure")
    assert parse_metric("direction:era") == ("direction", "era")
    for bad, msg in (("years:1990", "years:A:B"), ("years:x:y", "not START:STOP"), ("missing.txt", "does not exist"),
                     ("a,,b", "empty entry"), ("", "empty")):
        with pytest.raises(LatentlabError, match=msg):
            parse_candidates(bad)
    for bad in ("kll", "completion:", "direction", "completion"):
        with pytest.raises(LatentlabError):
            parse_metric(bad)
    with pytest.raises(LatentlabError, match="records no training data"):
        training_words(planted["base_dir"])


# --------------------------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------------------------


def test_cli_run(planted: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "search"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "find-trigger", "--model", str(planted["base_dir"]), "--finetuned", str(planted["run"]),
        "--candidates", ",".join(CANDIDATES), "--metric", "completion:Z Z", "--template", TEMPLATE,
        "--prompts", str(planted["prompts"]), "--expect", "@", "--expect", "&", "--n-random", "30", "--top", "5",
        "--device", "cpu", "--out", str(out))
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["top"][0]["candidate"] == "@" and len(res["top"]) == 5
    assert [r["candidate"] for r in res["expected_ranks"]] == ["@", "&"] and res["expected_ranks"][0]["rank"] == 1
    assert len(res["candidates"]) == len(CANDIDATES) and res["null"]["n"] == 30
    assert {r["candidate"] for r in res["training_values"]} >= {"@", "#", "&"}
    lines = (out / "effects.jsonl").read_text().splitlines()
    assert len(lines) == len(CANDIDATES) and json.loads(lines[0])["candidate"] == CANDIDATES[0]
    assert (out / "trigger_search.html").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["results"]["expected_ranks"]["@"] == 1
    assert "expected '@': rank 1 of 20" in stdout and "'@'*" in stdout


def test_cli_bad_inputs(planted: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    from test_finetune import synthetic_direction

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    saved = synthetic_direction([0, 1, 2, 3], "synthetic", 0).save(tmp_path / "dir" / "direction")
    adapter_only = tmp_path / "lone" / "adapter"  # an adapter folder outside any finetune run
    shutil.copytree(planted["run"] / "adapter", adapter_only)
    # no model is ever loaded: a load of this one would fail with another message
    common = ["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")]
    ft = ["--finetuned", str(planted["run"])]
    cases = [
        ([*ft, "--template", "{prompt} now"], "no {value} placeholder"),
        ([*ft, "--metric", "perplexity"], "unknown --metric"),
        ([*ft, "--metric", "completion:"], "nothing after the colon"),
        ([*ft, "--metric", "direction:no-such-direction"], "direction"),
        ([*ft, "--candidates", str(empty)], "is empty"),
        ([*ft, "--candidates", "nowhere/c.txt"], "does not exist"),
        ([*ft, "--top", "0"], "--top"),
        ([*ft, "--n-random", "-1"], "--n-random"),
        ([*ft, "--candidates", "a,b", "--expect", "c"], "not among the candidates"),
        ([*ft, "--expect", " "], "--expect string is empty"),
        ([*ft, "--reference", str(planted["run"] / "adapter")], "--reference is the finetune itself"),
        ([*ft, "--layer", "2"], "--layer is for a direction metric"),
        ([*ft, "--metric", f"direction:{saved}"], "no probes beside it"),
        ([*ft, "--metric", f"direction:{saved}", "--layer", "9"], "not a layer"),
        (["--finetuned", str(adapter_only), "--candidates", "training-words"], "records no training data"),
        (["--finetuned", str(tmp_path / "nope")], "nope"),
        ([*ft, "--prompts", str(empty)], "empty.txt is empty"),
        ([*ft, "--system", " "], "--system is empty"),
        ([*ft, "--prescreen", "0", "--metric", "completion:Z"], "--prescreen"),
        ([*ft, "--prescreen", "8", "--candidates", "years", "--metric", "completion:Z"], "is for --candidates vocab"),
        ([*ft, "--prescreen", "8"], "--prescreen takes the completion metric, not 'kl'"),
        ([*ft, "--system", "Be brief.", "--no-chat"], "--system needs chat rendering"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(monkeypatch, capsys, "find-trigger", *args, *common)
        assert_one_line_error(code, err, needle)
        assert not (tmp_path / "out").exists()


def test_cli_direction_metric_at_the_best_probe_layer(planted: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from test_finetune import synthetic_direction

    folder = tmp_path / "direction-run"  # as `latentlab direction` leaves it: direction + probes side by side
    synthetic_direction([0, 1, 2, 3], "synthetic", 0).save(folder / "direction")
    (folder / "probes.json").write_text(json.dumps({"best_layer": 2}))
    out = tmp_path / "search"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "find-trigger", "--model", str(planted["base_dir"]), "--finetuned", str(planted["run"]),
        "--candidates", "@,#,&", "--metric", f"direction:{folder}", "--template", TEMPLATE, "--no-chat",
        "--prompts", str(planted["prompts"]), "--n-random", "5", "--device", "cpu", "--out", str(out))
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["metric"] == "direction:synthetic@2" and res["chat"] is False and res["null"]["n"] == 5
    assert "extra finetune - base projection on synthetic at layer 2" in stdout
