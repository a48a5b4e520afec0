"""Shared fixtures: tiny, randomly initialised models that load like any local HF model folder.

Unit tests never touch the real built-in models: they run on tiny Gemma 3 / Llama models (a few
hundred thousand parameters, random weights, seeded) with a character-level tokenizer built offline,
saved with ``save_pretrained`` and loaded through the public ``latentlab.load_model(folder)``.
Tests that need a real built-in model are marked ``integration`` (everything under
``tests/integration`` is marked automatically); run only the fast suite with
``pytest -m "not integration"``.

Guard rail: a unit test (not marked ``integration``) gets its own empty ``LATENTLAB_HOME`` and a
``_locate_gguf`` that fails loudly, so it can neither read the real model cache nor start a
minutes-long conversion by accident. Tests of the conversion machinery patch it themselves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Tests mirror the package (tests/models, tests/stages, tests/study, ...) and a few share helpers by
# module name (test_ablation's planted LoRA, test_study's report check): every test folder is
# importable whichever file pytest runs first.
for _folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and p.name != "__pycache__"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

TINY_VOCAB = 128  # > tokenizer size (100): ids the tokenizer never produces are fine
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]  # printable ASCII + newline

# A simple template with role tags; it writes the BOS itself, like most instruct templates.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# --------------------------------------------------------------------------------------------
# Markers.
# --------------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration is an integration test (real built-in models)."""
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _isolate_builtin_models(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """Unit tests get an empty model cache and cannot convert a built-in model."""
    if request.node.get_closest_marker("integration") is not None:
        return
    home = tmp_path_factory.mktemp("latentlab_home")
    monkeypatch.setenv("LATENTLAB_HOME", str(home))

    def refuse(spec: Any, workdir: Path) -> Path:
        raise AssertionError(
            f"a unit test tried to convert the built-in model {spec.name}; mark it @pytest.mark.integration"
        )

    monkeypatch.setattr("latentlab.models.builtin._locate_gguf", refuse)


# --------------------------------------------------------------------------------------------
# Tiny tokenizer and models.
# --------------------------------------------------------------------------------------------


def make_char_tokenizer(chat_template: str | None = None) -> Any:
    """A character-level fast tokenizer (BPE without merges), <bos> prepended, built offline."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.add_special_tokens(SPECIALS)
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_gemma_config() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=1024,
        # a short sliding window so long test texts really exercise local attention
        sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                        "full_attention"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2, architectures=["Gemma3ForCausalLM"],
    )


def tiny_llama_config() -> Any:
    from transformers import LlamaConfig

    # Deliberately a different width and depth from the tiny Gemma, so an adapter cannot fit both.
    return LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def save_tiny_model(folder: Path, config: Any, seed: int, chat_template: str | None = None) -> Path:
    """Build a randomly initialised model from ``config`` and save it with a tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(folder))
    make_char_tokenizer(chat_template).save_pretrained(str(folder))
    return folder


def make_lora_adapter(model_dir: Path, out: Path, seed: int = 0, r: int = 4,
                      targets: tuple[str, ...] = ("q_proj", "v_proj"), std: float = 0.5) -> Path:
    """A PEFT LoRA adapter for the model in ``model_dir`` with random, non-zero lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: the merge would be a no-op
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model (no chat template): tiny random Gemma 3."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gemma", tiny_gemma_config(), seed=1234)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An "instruct" model (has a chat template): tiny random Llama."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", tiny_llama_config(), seed=4321,
                           chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def gemma_lora_dir(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(tiny_gemma_dir, tmp_path_factory.mktemp("adapters") / "gemma-lora", seed=7)


@pytest.fixture(scope="session")
def llama_lora_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapters") / "llama-lora", seed=8)


@pytest.fixture(scope="session")
def load_tiny() -> Callable[..., Any]:
    """``load_tiny(folder, adapter=None)``: a fresh ``LoadedModel`` (quiet)."""
    import latentlab

    def _load(folder: Path, adapter: Path | None = None) -> Any:
        return latentlab.load_model(str(folder), adapter=adapter, device="cpu", progress=False)

    return _load


@pytest.fixture(scope="session")
def tiny_gemma(tiny_gemma_dir: Path, load_tiny: Callable[..., Any]) -> Any:
    """Shared, read-only: tests must not modify its weights or leave hooks on it."""
    return load_tiny(tiny_gemma_dir)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir: Path, load_tiny: Callable[..., Any]) -> Any:
    return load_tiny(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_gemma_lora(tiny_gemma_dir: Path, gemma_lora_dir: Path, load_tiny: Callable[..., Any]) -> Any:
    return load_tiny(tiny_gemma_dir, adapter=gemma_lora_dir)


# --------------------------------------------------------------------------------------------
# Reference activations straight from Hugging Face.
# --------------------------------------------------------------------------------------------


def hf_hidden_states(hf_model: Any, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(HF ``hidden_states`` for one unpadded sequence, output of the last decoder layer).

    HF's ``hidden_states[-1]`` is taken *after* the final norm, so the last block's own output is
    read with a forward hook on the last decoder layer instead.
    """
    captured: dict[str, torch.Tensor] = {}

    def grab(module: Any, args: Any, output: Any) -> None:
        captured["last"] = (output[0] if isinstance(output, tuple) else output).detach()

    inner = hf_model.model
    handle = inner.layers[-1].register_forward_hook(grab)
    try:
        with torch.no_grad():
            out = inner(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    return [h[0] for h in out.hidden_states], captured["last"][0]


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """max |a - e| <= rel * max |e|: a tolerance relative to the activation scale.

    Residual streams grow with depth (Gemma's reach the hundreds), so a fixed absolute tolerance
    is either meaningless early or unreachable late in float32.
    """
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"max abs error {err:.3g} > {rel:g} x activation scale {scale:.3g}"


# --------------------------------------------------------------------------------------------
# A tiny model that LoRA can really teach (finetuning, shift and research CLI tests).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trainable_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Gemma 3 with a chat template and larger initial weights (std 0.2, not 0.02).

    Why: with the default 0.02 init the tied (un)embedding is so small that the largest logit gap
    any residual can produce is ~1, so LoRA (which never touches embeddings or norms) cannot drive
    the loss much below log(vocab) and a finetune barely moves the model. With 0.2 a memorisable
    dataset is learnt in a few dozen steps. The chat template makes the last prompt token the one
    that predicts the first response token, where a finetune's effect on unrelated prompts shows.
    """
    config = tiny_gemma_config()
    config.initializer_range = 0.2
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gemma-trainable", config, seed=1234,
                           chat_template=CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------
# The family matrix (tests/test_families.py): one tiny random model per common HF family.
# --------------------------------------------------------------------------------------------


def _family_common() -> dict[str, Any]:
    return {"vocab_size": TINY_VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_family_config(family: str) -> Any:
    """A 2-layer, 32-64 wide random config of one HF family (the family matrix's models)."""
    import transformers as tf

    c = _family_common()
    attn = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 512}
    if family == "llama":
        return tf.LlamaConfig(**attn, **c, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    if family == "qwen2":
        return tf.Qwen2Config(**attn, **c, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])
    if family == "qwen3":
        return tf.Qwen3Config(**attn, **c, head_dim=8, tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"])
    if family == "mistral":
        return tf.MistralConfig(**attn, **c, head_dim=8, sliding_window=None, tie_word_embeddings=False,
                                architectures=["MistralForCausalLM"])
    if family == "gemma2":
        return tf.Gemma2Config(**attn, **c, head_dim=8, sliding_window=16, final_logit_softcapping=5.0,
                               attn_logit_softcapping=20.0, architectures=["Gemma2ForCausalLM"])
    if family == "gemma3":
        return tf.Gemma3TextConfig(**attn, **c, head_dim=8, sliding_window=16,
                                   layer_types=["sliding_attention", "full_attention"],
                                   architectures=["Gemma3ForCausalLM"])
    if family == "gemma3-mm":
        text = tf.Gemma3TextConfig(**attn, **c, head_dim=8, sliding_window=16,
                                   layer_types=["sliding_attention", "full_attention"])
        vision = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=4)
        return tf.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                               image_token_index=TINY_VOCAB - 1, boi_token_index=TINY_VOCAB - 2,
                               eoi_token_index=TINY_VOCAB - 3, architectures=["Gemma3ForConditionalGeneration"],
                               **{k: v for k, v in c.items() if k != "vocab_size"})
    if family == "phi3":
        return tf.Phi3Config(**attn, **c, tie_word_embeddings=False, architectures=["Phi3ForCausalLM"])
    if family == "olmo2":
        return tf.Olmo2Config(**attn, **c, tie_word_embeddings=False, architectures=["Olmo2ForCausalLM"])
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **c,
                             architectures=["GPT2LMHeadModel"])
    if family == "gpt-neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=512, rotary_pct=0.25, tie_word_embeddings=False, **c,
                                architectures=["GPTNeoXForCausalLM"])
    raise KeyError(family)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gemma3-mm", "phi3", "olmo2", "gpt2",
            "gpt-neox")


def save_tiny_family(folder: Path, family: str, seed: int = 0, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Save a tiny random model of ``family`` (any auto class: multimodal too) with the char tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = tiny_family_config(family)
    torch.manual_seed(seed)
    cls = AutoModelForImageTextToText if family == "gemma3-mm" else AutoModelForCausalLM
    model = cls.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(folder))
    make_char_tokenizer(chat_template).save_pretrained(str(folder))
    return folder
