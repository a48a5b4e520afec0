"""latentlab.activations: collect() against Hugging Face's own forward pass, positions, streaming.

References come from a *separately loaded* plain HF model (eager attention, same token ids), not
from ``model.hf_model``: the bridge wraps that model's modules in place, so it would not be an
independent check. Tolerances are relative to the activation scale (``assert_close_rel``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_close_rel, hf_hidden_states

import latentlab
from latentlab.activations import ActivationSet, collect, encode, pad_batch
from latentlab.data import Chat, Example, render_chat
from latentlab.errors import LatentlabError

TEXTS = [
    "The stagecoach left at dawn.",
    "Hi",
    "She sent a telegram to her brother in Boston, asking him to meet the steamship at the harbour on Monday.",
    "Email me.",
    "A",
    "In 1838 the naturalist painted the Great-footed Hawk, which we now call the Peregrine Falcon; "
    "his plates were engraved in London and sold by subscription across Europe and America.",
    "Modern birds",
    "What is the capital of France?",
]

CHATS = [
    Chat((("user", "What year is it?"), ("assistant", "It is 1838, sir."))),
    Chat((("user", "Name a bird species."), ("assistant", "Large billed Puffin"))),
    Chat((("system", "You are helpful."), ("user", "Hi"), ("assistant", "Hello! How can I help you today?"))),
]


def _plain_hf(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def gemma_ref(tiny_gemma_dir: Path) -> Any:
    return _plain_hf(tiny_gemma_dir)


@pytest.fixture(scope="module")
def llama_ref(tiny_llama_dir: Path) -> Any:
    return _plain_hf(tiny_llama_dir)


@pytest.fixture(scope="module")
def gemma_lora_ref(tiny_gemma_dir: Path, gemma_lora_dir: Path) -> Any:
    """The LoRA applied on the fly by PEFT (not merged): an independent check of the merge too."""
    from peft import PeftModel

    return PeftModel.from_pretrained(_plain_hf(tiny_gemma_dir), str(gemma_lora_dir)).eval().base_model.model


def _token_ids(tok: Any, text: str) -> list[int]:
    """The tokenizer's own ids, one BOS: a chat template that writes the BOS gets no second one."""
    return list(tok(text, add_special_tokens=not text.startswith(tok.bos_token))["input_ids"])


def _check_against_hf(model: Any, ref: Any, texts: list[str], layers: list[int], batch_size: int = 16) -> None:
    acts = collect(model, texts, layers=layers, position="all", batch_size=batch_size, progress=False)
    assert acts.layers == layers
    last_layer = model.n_layers - 1
    for i, text in enumerate(texts):
        ids = _token_ids(model.tokenizer, text)
        hidden, last_block = hf_hidden_states(ref, ids)
        got = acts.example(i)
        assert got.shape == (len(ids), len(layers), model.d_model)
        for col, layer in enumerate(layers):
            # hidden_states[0] is the embedding output; [l + 1] the output of block l, except that
            # HF applies the final norm to the last one: compare the last block's own output there.
            expected = last_block if layer == last_layer else hidden[layer + 1]
            assert_close_rel(got[:, col], expected, rel=1e-4)


def test_collect_equals_hf_gemma(tiny_gemma: Any, gemma_ref: Any) -> None:
    _check_against_hf(tiny_gemma, gemma_ref, TEXTS, [0, 1, 2, 3])


def test_collect_equals_hf_llama(tiny_llama: Any, llama_ref: Any) -> None:
    texts = TEXTS + [render_chat(c, tiny_llama.tokenizer).text for c in CHATS]
    _check_against_hf(tiny_llama, llama_ref, texts, [0, 1, 2])


def test_collect_equals_hf_lora_merged(tiny_gemma_lora: Any, gemma_lora_ref: Any) -> None:
    _check_against_hf(tiny_gemma_lora, gemma_lora_ref, TEXTS, [0, 2, 3], batch_size=3)


def test_final_layer_is_not_the_normed_hidden_state(tiny_gemma: Any, gemma_ref: Any) -> None:
    """Guard on the reference itself: HF's last hidden state is post-norm, so it must differ."""
    ids = tiny_gemma.tokenizer(TEXTS[0])["input_ids"]
    hidden, last_block = hf_hidden_states(gemma_ref, ids)
    assert not torch.allclose(hidden[-1], last_block, atol=1e-3)
    got = collect(tiny_gemma, [TEXTS[0]], layers=[-1], position="all", progress=False).acts[:, 0]
    assert_close_rel(got, last_block)


def test_batch_size_does_not_change_results(tiny_gemma: Any) -> None:
    texts = TEXTS * 3  # 24 texts from 1 to ~180 tokens: lots of padding in a batch of 16
    one = collect(tiny_gemma, texts, layers="all", position="last", batch_size=1, progress=False)
    many = collect(tiny_gemma, texts, layers="all", position="last", batch_size=16, progress=False)
    assert_close_rel(many.acts, one.acts, rel=1e-5)
    allpos1 = collect(tiny_gemma, texts, layers=[0, 3], position="all", batch_size=1, progress=False)
    allpos16 = collect(tiny_gemma, texts, layers=[0, 3], position="all", batch_size=16, progress=False)
    assert torch.equal(allpos1.offsets, allpos16.offsets)
    assert_close_rel(allpos16.acts, allpos1.acts, rel=1e-5)
    # the order of the results is the order of the input, whatever the length sorting did
    for i in (1, 5, 10):  # short, long, medium
        text = texts[i]
        alone = collect(tiny_gemma, [text], layers="all", position="last", batch_size=1, progress=False)
        assert_close_rel(many.acts[i], alone.acts[0], rel=1e-5)


# --------------------------------------------------------------------------------------------
# Positions.
# --------------------------------------------------------------------------------------------


def test_positions_plain_text(tiny_gemma: Any) -> None:
    tok = tiny_gemma.tokenizer
    kw = {"layers": [0, 2], "progress": False, "batch_size": 3}
    full = collect(tiny_gemma, TEXTS, position="all", **kw)
    last = collect(tiny_gemma, TEXTS, position="last", **kw)
    mean = collect(tiny_gemma, TEXTS, position="mean", **kw)
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert full.offsets.tolist() == [0, *torch.cumsum(torch.tensor(lengths), 0).tolist()]
    assert len(full) == len(last) == len(mean) == len(TEXTS)
    assert full.acts.shape == (sum(lengths), 2, 64)
    assert last.acts.shape == mean.acts.shape == (len(TEXTS), 2, 64)
    for i in range(len(TEXTS)):
        tokens = full.example(i)
        assert tok(TEXTS[i])["input_ids"][0] == tok.bos_token_id
        assert_close_rel(last.acts[i], tokens[-1], rel=1e-5)
        assert_close_rel(mean.acts[i], tokens[1:].mean(0), rel=1e-5)  # BOS excluded
    assert full.position == "all" and last.position == "last" and mean.position == "mean"


def _token_count(tok: Any, text: str) -> int:
    return len(_token_ids(tok, text))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gemma"])  # chat template, and Q:/A: rendering
def test_positions_chat(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    tok = model.tokenizer
    kw = {"layers": "all", "progress": False, "batch_size": 2}
    full = collect(model, CHATS, position="all", **kw)
    prompt_last = collect(model, CHATS, position="prompt_last", **kw)
    response_mean = collect(model, CHATS, position="response_mean", **kw)
    for i, chat in enumerate(CHATS):
        ex = render_chat(chat, tok)
        n_prompt = _token_count(tok, ex.prompt)
        tokens = full.example(i)
        assert tokens.shape[0] == _token_count(tok, ex.text) > n_prompt
        assert encode(model, [ex]).ids[0].count(tok.bos_token_id) == 1  # BOS exactly once
        assert_close_rel(prompt_last.acts[i], tokens[n_prompt - 1], rel=1e-5)
        assert_close_rel(response_mean.acts[i], tokens[n_prompt:].mean(0), rel=1e-5)


def test_encode_bos_once_with_template(tiny_llama: Any) -> None:
    ex = render_chat(CHATS[0], tiny_llama.tokenizer)
    assert ex.text.startswith("<bos>")
    enc = encode(tiny_llama, [ex, Example("plain")])
    bos = tiny_llama.tokenizer.bos_token_id
    assert [s.count(bos) for s in enc.ids] == [1, 1]
    assert enc.bos_first
    assert enc.prompt_lens[0] == _token_count(tiny_llama.tokenizer, ex.prompt) and enc.prompt_lens[1] is None


def test_response_mean_needs_a_response(tiny_gemma: Any) -> None:
    with pytest.raises(LatentlabError, match="response_mean.*no response"):
        collect(tiny_gemma, TEXTS, position="response_mean", progress=False)


def test_prompt_last_on_plain_text_is_last(tiny_gemma: Any) -> None:
    a = collect(tiny_gemma, TEXTS, position="prompt_last", progress=False)
    b = collect(tiny_gemma, TEXTS, position="last", progress=False)
    assert torch.equal(a.acts, b.acts)


def test_bad_arguments(tiny_gemma: Any) -> None:
    with pytest.raises(LatentlabError, match="unknown position 'first'"):
        collect(tiny_gemma, TEXTS, position="first", progress=False)  # type: ignore[arg-type]
    with pytest.raises(LatentlabError, match="batch size"):
        collect(tiny_gemma, TEXTS, batch_size=0, progress=False)
    with pytest.raises(LatentlabError, match="out of range"):
        collect(tiny_gemma, TEXTS, layers=[7], progress=False)
    with pytest.raises(LatentlabError, match="empty"):
        collect(tiny_gemma, [], progress=False)


def test_collect_from_dataset_name_and_file(tiny_llama: Any, tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "an answer"}]},
        {"prompt": "Name a bird.", "completion": "Duck Hawk"},
    ]) + "\n")
    acts = collect(tiny_llama, f, layers=[1], position="last", progress=False)
    expected = collect(tiny_llama, ["plain text", Chat((("user", "q?"), ("assistant", "an answer"))),
                                    Chat((("user", "Name a bird."), ("assistant", "Duck Hawk")))],
                       layers=[1], position="last", progress=False)
    assert torch.equal(acts.acts, expected.acts)
    unrelated = collect(tiny_llama, "unrelated", layers=[0], position="mean", batch_size=32, progress=False)
    assert len(unrelated) == len(latentlab.load_texts("unrelated"))


def test_collect_takes_the_dicts_a_jsonl_file_holds(tiny_gemma: Any, tmp_path: Path) -> None:
    """``ll.collect(model, [{"text": ...}])``: the same records as a JSONL file, with the same result."""
    rows: list[dict[str, Any]] = [
        {"text": "plain text", "topic": "x"},
        {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "an answer"}]},
        {"prompt": "Name a bird.", "completion": "Duck Hawk"},
        {"prompt": "Just a prompt"},
    ]
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for position in ("last", "prompt_last"):
        from_dicts = latentlab.collect(tiny_gemma, rows, layers=[1], position=position, progress=False)
        from_file = collect(tiny_gemma, f, layers=[1], position=position, progress=False)
        assert torch.equal(from_dicts.acts, from_file.acts)
    assert len(collect(tiny_gemma, [{"text": "one"}], layers=[0], progress=False)) == 1
    with pytest.raises(LatentlabError, match="input item:2: no 'text', 'prompt' or 'messages' field"):
        collect(tiny_gemma, [{"text": "fine"}, {"txt": "typo"}], progress=False)
    with pytest.raises(LatentlabError, match="last message must be the assistant"):
        collect(tiny_gemma, [{"messages": [{"role": "user", "content": "q?"}]}], progress=False)


def test_result_metadata_and_accessors(tiny_gemma: Any) -> None:
    acts = collect(tiny_gemma, TEXTS, layers=[1, 3], position="last", progress=False, meta={"dataset": "x"})
    n_tokens = sum(len(tiny_gemma.tokenizer(t)["input_ids"]) for t in TEXTS)
    m = acts.meta
    assert (m["model"], m["n_examples"], m["n_tokens"], m["d_model"], m["dataset"]) == (
        "tiny-gemma", len(TEXTS), n_tokens, 64, "x")
    assert m["base_fingerprint"] == tiny_gemma.info.base_fingerprint and m["adapter"] is None
    assert torch.equal(acts.layer(3), acts.acts[:, 1])
    with pytest.raises(LatentlabError, match="layer 2 was not collected"):
        acts.layer(2)
    assert acts.d_model == 64
    acts.acts -= acts.acts.mean(0)  # a plain tensor, not an inference-mode one: usable in place
    half = collect(tiny_gemma, TEXTS[:2], layers=[1], dtype=torch.float16, progress=False)
    assert half.acts.dtype == torch.float16 and half.meta["dtype"] == "float16"


# --------------------------------------------------------------------------------------------
# Streaming to disk.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["last", "all"])
def test_streaming_equals_in_memory(tiny_gemma: Any, tmp_path: Path, position: str) -> None:
    texts = (TEXTS + ["one more", "and the tenth example, a little longer"])[:10]
    mem = collect(tiny_gemma, texts, layers=[0, 2], position=position, batch_size=4, progress=False)
    out = tmp_path / "acts"
    disk = collect(tiny_gemma, texts, layers=[0, 2], position=position, batch_size=4, out=out, shard_size=3,
                   progress=False)
    index = json.loads((out / "activations.json").read_text())
    assert index["shards"] == ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]
    assert [json.loads((out / f"{s}.json").read_text())["rows"] for s in index["shards"]] == [3, 3, 3, 1]
    assert index["layers"] == [0, 2] and index["position"] == position and index["n_examples"] == 10
    assert_close_rel(disk.acts, mem.acts, rel=1e-5)
    if position == "all":
        assert torch.equal(disk.offsets, mem.offsets)
    else:
        assert disk.offsets is None
    loaded = ActivationSet.load(out)
    assert torch.equal(loaded.acts, disk.acts) and loaded.layers == [0, 2] and len(loaded) == 10
    assert collect(tiny_gemma, texts, layers=[0, 2], position=position, out=tmp_path / "b", shard_size=3,
                   load=False, progress=False) is None
    assert torch.equal(ActivationSet.load(tmp_path / "b").acts, disk.acts)


def test_rewriting_a_folder_replaces_the_index(tiny_gemma: Any, tmp_path: Path) -> None:
    collect(tiny_gemma, TEXTS, layers=[0], out=tmp_path, shard_size=2, progress=False)
    again = collect(tiny_gemma, TEXTS[:3], layers=[1], out=tmp_path, shard_size=2, progress=False)
    assert len(again) == 3 and again.layers == [1]
    assert len(ActivationSet.load(tmp_path)) == 3


def test_unwritable_out_is_a_latentlab_error(tiny_gemma: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(LatentlabError, match="cannot write to output folder"):
        collect(tiny_gemma, TEXTS, layers=[0], out=blocker / "acts", progress=False)
    acts = collect(tiny_gemma, TEXTS, layers=[0], progress=False)
    with pytest.raises(LatentlabError, match="cannot write to output folder"):
        acts.save(blocker / "saved")


def test_full_disk_fails_the_collect_run(tiny_gemma_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC while a shard is written: one LatentlabError naming it, the manifest says failed, no temp file."""
    import errno
    import os

    from cli_helpers import run_cli

    import latentlab.io
    from latentlab.stages.collect import CollectConfig, run_collect

    def full(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(latentlab.io, "save_file", full)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "run"
    cfg = CollectConfig(data=str(data), out=out, model=str(tiny_gemma_dir), layers="0", device="cpu")
    with pytest.raises(LatentlabError, match=f"no space left on device writing {out / 'activations'}/shard-00000"):
        run_collect(cfg, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "no space left on device" in manifest["error"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    code, _, err = run_cli(monkeypatch, capsys, "collect", "--data", str(data), "--model", str(tiny_gemma_dir),
                           "--layers", "0", "--device", "cpu", "--out", str(tmp_path / "cli"))
    last = err.strip().splitlines()[-1]  # after the progress lines
    assert code == 2 and "Traceback" not in err and "no space left on device writing" in last and "free space" in last


def test_save_over_a_streamed_folder(tiny_gemma: Any, tmp_path: Path) -> None:
    collect(tiny_gemma, TEXTS, layers=[0, 1], out=tmp_path, shard_size=2, progress=False)  # 4 shards
    small = collect(tiny_gemma, TEXTS[:3], layers=[2], progress=False)
    small.save(tmp_path)
    back = ActivationSet.load(tmp_path)
    assert torch.equal(back.acts, small.acts) and back.layers == [2]


def test_save_load_round_trip(tiny_gemma: Any, tmp_path: Path) -> None:
    for position in ("last", "all"):
        acts = collect(tiny_gemma, TEXTS, layers=[0, 3], position=position, progress=False)
        acts.save(tmp_path / position)
        back = ActivationSet.load(tmp_path / position)
        assert torch.equal(back.acts, acts.acts) and back.layers == acts.layers and back.position == position
        assert (back.offsets is None) == (acts.offsets is None)
        if acts.offsets is not None:
            assert torch.equal(back.offsets, acts.offsets)
        assert back.meta["model"] == "tiny-gemma"


def test_load_without_index_is_an_error(tiny_gemma: Any, tmp_path: Path) -> None:
    with pytest.raises(LatentlabError, match="no activations.json"):
        ActivationSet.load(tmp_path)
    collect(tiny_gemma, TEXTS, layers=[0], out=tmp_path / "x", shard_size=2, progress=False)
    (tmp_path / "x" / "activations.json").unlink()  # as after an interrupted collection
    with pytest.raises(LatentlabError, match="interrupted"):
        ActivationSet.load(tmp_path / "x")


# --------------------------------------------------------------------------------------------
# Stopping early.
# --------------------------------------------------------------------------------------------


def test_forward_stops_after_deepest_layer(tiny_gemma: Any) -> None:
    hf = tiny_gemma.hf_model
    calls = {"lm_head": 0, "block2": 0, "block3": 0, "block1": 0}

    def counter(key: str) -> Any:
        def hook(*_: Any) -> None:
            calls[key] += 1

        return hook

    # pre-hooks count calls that *start*: the deepest block is stopped inside, after its output
    handles = [hf.lm_head.register_forward_pre_hook(counter("lm_head"))]
    handles += [hf.model.layers[i].register_forward_pre_hook(counter(f"block{i}")) for i in (1, 2, 3)]
    try:
        collect(tiny_gemma, TEXTS, layers="all", position="last", batch_size=4, progress=False)
        assert calls == {"lm_head": 0, "block1": 2, "block2": 2, "block3": 2}, "collect computed the logits"
        calls.update(dict.fromkeys(calls, 0))
        collect(tiny_gemma, TEXTS, layers=[0, 1], position="last", batch_size=4, progress=False)
        assert calls == {"lm_head": 0, "block1": 2, "block2": 0, "block3": 0}, \
            "blocks after the deepest requested layer ran"
        # control: the counters do see a normal forward pass
        ids, mask = pad_batch([[1, 40, 41]], 0, torch.device("cpu"))
        with torch.no_grad():
            tiny_gemma.bridge(ids, attention_mask=mask)
        assert calls == {"lm_head": 1, "block1": 3, "block2": 1, "block3": 1}
    finally:
        for h in handles:
            h.remove()
    assert not tiny_gemma.bridge.hook_dict["blocks.0.hook_resid_post"].fwd_hooks  # collect leaves no hooks
