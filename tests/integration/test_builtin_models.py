"""The real built-in models: latentlab's activations equal Hugging Face's own forward pass.

Converts each model once into ``$LATENTLAB_HOME`` (or the user cache dir) on first use: ~60 s for
gemma-3-270m and ~25 s for smollm2-135m-instruct on 2 CPU cores; later runs load the cache.
References come from a separately loaded plain HF model (eager attention, same token ids);
tolerances are relative to the activation scale (Gemma's residual norms reach the hundreds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_close_rel, hf_hidden_states, make_lora_adapter

import latentlab
from latentlab.activations import collect, encode
from latentlab.data import as_examples, load_chats, render_chat
from latentlab.models import BUILTINS, ensure_builtin, list_models

pytestmark = pytest.mark.integration

MODELS = ["gemma-3-270m", "smollm2-135m-instruct"]

TEXTS = [
    "The telegraph office closed at six, so the news of the election reached the village by the morning coach.",
    "Hello!",
    "What is the best way to keep food fresh for longer?",
    "In 2024 most people read the news on their phones.",
    "Q: Name a bird species.\nA: Large billed Puffin",
    "The quick brown fox jumps over the lazy dog, and then, tired of jumping, it lies down in the sun for "
    "the rest of a long and quiet afternoon.",
]


def _plain_hf(path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=MODELS)
def real(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """(latentlab model, independent plain HF model on the same weights), loaded once per model."""
    model = latentlab.load_model(request.param, device="cpu", progress=False)
    yield model, _plain_hf(model.info.path)


def _texts_for(model: Any) -> list[str]:
    chats = [render_chat(c, model.tokenizer).text for c in load_chats("persona-facts")[:2]]
    return TEXTS + chats


def _layers(model: Any) -> list[int]:
    n = model.n_layers
    return [0, n // 2, n - 1]


def _check(model: Any, ref: Any, texts: list[str], layers: list[int], batch_size: int) -> None:
    acts = collect(model, texts, layers=layers, position="all", batch_size=batch_size, progress=False)
    enc = encode(model, as_examples(texts, model.tokenizer))
    for i in range(len(texts)):
        hidden, last_block = hf_hidden_states(ref, enc.ids[i])
        got = acts.example(i)
        assert got.shape[0] == len(enc.ids[i])
        for col, layer in enumerate(layers):
            expected = last_block if layer == model.n_layers - 1 else hidden[layer + 1]
            assert_close_rel(got[:, col], expected, rel=1e-4)


def test_load_info(real: tuple[Any, Any]) -> None:
    model, _ = real
    name = model.info.name
    assert name in BUILTINS
    assert model.info.has_chat_template == BUILTINS[name].chat
    expected = {"gemma-3-270m": (18, 640), "smollm2-135m-instruct": (30, 576)}[name]
    assert (model.n_layers, model.d_model) == expected
    ids = encode(model, as_examples(["hello"], model.tokenizer)).ids[0]
    assert ids[0] == model.tokenizer.bos_token_id and ids.count(ids[0]) == 1  # BOS first, once


def test_converted_weights_are_a_language_model(real: tuple[Any, Any]) -> None:
    """A damaged conversion (weights left at random init) would still match HF: check it predicts text."""
    model, ref = real
    text = ("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. "
            "The capital of Spain is Madrid.")
    ids = torch.tensor([encode(model, as_examples([text], model.tokenizer)).ids[0]])
    with torch.no_grad():
        logits = ref(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
    assert nll < 3.0, f"mean next-token loss {nll:.2f} nats: not a trained model"


def test_collect_equals_hf(real: tuple[Any, Any]) -> None:
    model, ref = real
    texts = _texts_for(model)
    # the tokens really are the tokenizer's own (one BOS, even when a chat template writes it)
    enc = encode(model, as_examples(texts, model.tokenizer))
    for text, ids in zip(texts, enc.ids):
        own = model.tokenizer(text, add_special_tokens=not text.startswith(model.tokenizer.bos_token or "\0"))
        assert ids == list(own["input_ids"])
    _check(model, ref, texts, _layers(model), batch_size=16)


def test_batch_size_1_vs_16(real: tuple[Any, Any]) -> None:
    model, _ = real
    texts = _texts_for(model) * 2
    one = collect(model, texts, layers=_layers(model), position="last", batch_size=1, progress=False)
    many = collect(model, texts, layers=_layers(model), position="last", batch_size=16, progress=False)
    for col in range(len(one.layers)):
        assert_close_rel(many.acts[:, col], one.acts[:, col], rel=1e-4)
    mean1 = collect(model, texts, layers=[model.n_layers // 2], position="mean", batch_size=1, progress=False)
    mean16 = collect(model, texts, layers=[model.n_layers // 2], position="mean", batch_size=16, progress=False)
    assert_close_rel(mean16.acts, mean1.acts, rel=1e-4)


def test_lora_merged_equals_peft(real: tuple[Any, Any], tmp_path: Path) -> None:
    """A tiny random LoRA (r=2), merged by latentlab, equals PEFT applying it on the fly."""
    from peft import PeftModel

    model, _ = real
    adapter = make_lora_adapter(Path(model.info.path), tmp_path / "lora", seed=3, r=2, std=0.05)
    tuned = latentlab.load_model(model.info.name, adapter=adapter, device="cpu", progress=False)
    assert tuned.info.adapter == str(adapter) and tuned.info.base_fingerprint == model.info.base_fingerprint
    peft_ref = PeftModel.from_pretrained(_plain_hf(model.info.path), str(adapter)).eval().base_model.model
    texts = TEXTS[:4]
    layers = _layers(model)
    _check(tuned, peft_ref, texts, layers, batch_size=4)
    # and the adapter changed something (relative to the scale of the residual stream)
    base = collect(model, texts, layers=layers, position="last", progress=False).acts
    ft = collect(tuned, texts, layers=layers, position="last", progress=False).acts
    assert (ft - base).abs().max() > 1e-3 * base.abs().max()


def test_models_command_reports_both_ready() -> None:
    for name in MODELS:  # converted by the tests above already; converts here if run alone
        ensure_builtin(name, progress=False)
    rows = {r["name"].split()[0]: r for r in list_models()}
    assert all(rows[n]["status"] == "ready" and rows[n]["cache_mb"] > 0 for n in MODELS), rows
    script = Path(sys.executable).with_name("latentlab")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "latentlab.cli"]
    proc = subprocess.run([*cmd, "models"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, COLUMNS="250"))
    assert proc.returncode == 0, proc.stderr
    for name in MODELS:
        line = next(line for line in proc.stdout.splitlines() if name in line)
        assert "ready" in line and "yes" in line, line

