"""Architecture facts every stage needs, found through the model's own components.

Why one module: the final norm, the unembedding, the decoder blocks, the logit softcap and the stop
tokens are where model families differ. Every other module asks here, so a new family is supported
(or refused with a clear message) in one place.

How each fact is found, most general first:

- final norm and unembedding: the TransformerBridge's own ``ln_final`` and the HF model's
  ``get_output_embeddings()`` (after booting, both are the bridge's wrapped components, whose hooks
  are plain pass-throughs), falling back to the HF decoder's norm attribute;
- decoder blocks: HF's ``get_decoder()`` and its block list (``layers`` / ``h`` / ...), checked to
  have one entry per layer of the *text* config;
- logit post-processing (softcap, scales): the text config;
- stop tokens: the model's ``generation_config`` end-of-sequence ids plus the tokenizer's EOS;
- multimodal checkpoints (``Gemma3ForConditionalGeneration``): the language model is taken out as
  the family's ``...ForCausalLM`` sharing the same weights (the vision tower is dropped).

Families tested end to end (tests/models/test_families.py): Llama, Qwen2, Qwen3, Mistral, Gemma 2,
Gemma 3 (text and multimodal), Phi-3, OLMo 2, GPT-2 and GPT-NeoX (Pythia).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.errors import LatentlabError

if TYPE_CHECKING:
    from latentlab.models import LoadedModel

# Attribute names, in the HF decoder (``get_decoder()``), of the block list and the final norm.
BLOCK_ATTRS = ("layers", "h", "blocks", "block", "layer")
NORM_ATTRS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm")

# End-of-turn markers of common chat formats: they stop generation when the vocabulary has them as
# tokens (older checkpoints' generation configs name only the plain EOS).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

# LoRA target names for "attention only" (the q/v projections or their fused equivalent) by family.
ATTENTION_LORA_TARGETS: dict[str, list[str]] = {
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}
DEFAULT_ATTENTION_LORA_TARGETS = ["q_proj", "v_proj"]


def _fix() -> str:
    return ("report the model (its config.json architectures); see docs/your-own-model.md for the families "
            "latentlab supports")


def text_config(config: Any) -> Any:
    """The text (decoder) config: ``config.text_config`` of a multimodal config, else the config itself."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:  # older transformers: no decoder keyword
            return get()
    return getattr(config, "text_config", None) or config


def family(config: Any) -> str:
    """The model family (``model_type`` of the text config, e.g. 'llama', 'gpt2', 'gemma3_text')."""
    return str(getattr(text_config(config), "model_type", None) or getattr(config, "model_type", "unknown"))


def architecture_name(model: Any) -> str:
    cfg = model.config
    return str((getattr(cfg, "architectures", None) or [type(model).__name__])[0])


def _base(hf_model: Any) -> Any:
    """Unwrap a peft model to the transformers model."""
    get = getattr(hf_model, "get_base_model", None)
    return get() if callable(get) else hf_model


# --------------------------------------------------------------------------------------------
# Multimodal checkpoints: study the language model.
# --------------------------------------------------------------------------------------------


def is_multimodal(hf_model: Any) -> bool:
    """Whether this is an image(/audio)-text model whose text config is not its own config."""
    cfg = hf_model.config
    return getattr(cfg, "text_config", None) is not None and text_config(cfg) is not cfg


def language_model_of(hf_model: Any) -> Any:
    """The language model of a multimodal checkpoint as the family's ``...ForCausalLM``.

    The returned model shares the weights (no copy): its decoder is the checkpoint's language model
    and its head the checkpoint's ``lm_head``; the vision tower and projector are dropped, so hooks,
    LoRA targets ("all-linear") and fingerprints concern the text model only. Text-only models are
    returned unchanged.
    """
    if not is_multimodal(hf_model):
        return hf_model
    from transformers import AutoModelForCausalLM

    name = architecture_name(hf_model)
    tcfg = text_config(hf_model.config)
    decoder = hf_model.get_decoder() if callable(getattr(hf_model, "get_decoder", None)) else None
    head = hf_model.get_output_embeddings()
    if decoder is None or head is None:
        raise LatentlabError(f"cannot find the language model of {name} ({family(hf_model.config)})", _fix())
    try:
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(tcfg)
    except ValueError:
        raise LatentlabError(
            f"{name}: transformers has no text-only causal LM for its text config ({family(hf_model.config)})",
            _fix(),
        ) from None
    setattr(lm, lm.base_model_prefix, decoder)
    lm.set_output_embeddings(head)
    left = [n for n, p in lm.named_parameters() if p.is_meta]
    if left:
        raise LatentlabError(f"{name}: the language model lacks weights for {left[0]}", _fix())
    lm.config.architectures = [type(lm).__name__]
    lm.config.latentlab_source_architecture = name
    lm.generation_config = hf_model.generation_config
    placed = getattr(hf_model, "hf_device_map", None)
    if placed:
        lm.hf_device_map = dict(placed)
    return lm


def patch_bridge(bridge: Any, dtype: torch.dtype) -> None:
    """Work around bridge components that leave the model's dtype (TransformerLens 3.9).

    OLMo 2 in bfloat16: the bridge's rotary attention multiplies bf16 queries/keys by float32
    cos/sin and, unlike HF's ``apply_rotary_pos_emb``, does not cast back, so the next matmul fails.
    A permanent hook casts the rotated queries and keys back to the model dtype, which is exactly
    what the HF forward does.
    """
    if dtype == torch.float32:
        return

    def cast(t: Tensor, hook: Any) -> Tensor:
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

    for name, mod in bridge.named_modules():
        if name.endswith(("hook_rot_q", "hook_rot_k")) and callable(getattr(mod, "add_hook", None)):
            if not getattr(mod, "_latentlab_cast", False):
                mod.add_hook(cast, is_permanent=True)
                mod._latentlab_cast = True


# --------------------------------------------------------------------------------------------
# Blocks, final norm, unembedding.
# --------------------------------------------------------------------------------------------


def decoder_blocks(hf_model: Any) -> torch.nn.ModuleList:
    """The decoder's block list (one module per layer), for hooking a plain or peft HF model."""
    base = _base(hf_model)
    n = int(text_config(base.config).num_hidden_layers)
    get = getattr(base, "get_decoder", None)
    decoder = get() if callable(get) else None
    for holder in (decoder, base):
        for attr in BLOCK_ATTRS:
            blocks = getattr(holder, attr, None) if holder is not None else None
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) == n:
                return blocks
    raise LatentlabError(
        f"cannot find the decoder blocks of {architecture_name(base)} ({family(base.config)}): its decoder "
        f"has none of {', '.join(BLOCK_ATTRS)} with {n} layers",
        _fix(),
    )


def final_norm(model: LoadedModel) -> torch.nn.Module:
    """The final norm: the bridge's ``ln_final``, else the HF decoder's norm attribute."""
    norm = getattr(model.bridge, "ln_final", None)
    if isinstance(norm, torch.nn.Module):
        return norm
    hf = _base(model.hf_model)
    decoder = hf.get_decoder() if callable(getattr(hf, "get_decoder", None)) else None
    for attr in NORM_ATTRS:
        m = getattr(decoder, attr, None) if decoder is not None else None
        if isinstance(m, torch.nn.Module):
            return m
    raise LatentlabError(
        f"cannot score {architecture_name(hf)} ({family(hf.config)}): no final norm (the bridge has no ln_final "
        f"and its decoder none of {', '.join(NORM_ATTRS)})",
        _fix(),
    )


def unembedding(model: LoadedModel) -> torch.nn.Module:
    """The unembedding (LM head): HF's ``get_output_embeddings()``, else the bridge's ``unembed``."""
    hf = _base(model.hf_model)
    head = hf.get_output_embeddings() if callable(getattr(hf, "get_output_embeddings", None)) else None
    if head is None:
        head = getattr(model.bridge, "unembed", None)
    if not isinstance(head, torch.nn.Module):
        raise LatentlabError(
            f"cannot score {architecture_name(hf)} ({family(hf.config)}): no unembedding (output embeddings)",
            _fix(),
        )
    return head


def postprocess_logits(config: Any, logits: Tensor) -> Tensor:
    """What the family's HF forward does to the head's output: softcap (Gemma 2/3), logit scales."""
    tcfg = text_config(config)
    scale = getattr(tcfg, "logit_scale", None)  # Cohere multiplies
    if scale and not isinstance(scale, bool):
        logits = logits * scale
    div = getattr(tcfg, "logits_scaling", None)  # Granite divides
    if div and not isinstance(div, bool) and div != 1:
        logits = logits / div
    cap = getattr(tcfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_logits(model: LoadedModel, h: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    """Final norm + unembedding (+ softcap where the model has one) on selected positions only.

    ``h`` is the last block's residual stream at the positions to score (any leading shape).
    Returns float32 logits, equal to the HF forward's logits at those positions.
    """
    norm, head = final_norm(model), unembedding(model)
    x = norm(h)
    w = getattr(head, "weight", None)
    if isinstance(w, Tensor) and w.device != x.device and w.device.type != "meta":
        x = x.to(w.device)  # a device map may put the head on another device than the last block
    return postprocess_logits(model.hf_model.config, head(x)).float()


# --------------------------------------------------------------------------------------------
# Generation and LoRA.
# --------------------------------------------------------------------------------------------


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value if v is not None}


def stop_token_ids(model: LoadedModel) -> set[int]:
    """Token ids that end a generation: the generation config's EOS ids, the tokenizer's EOS, and
    the end-of-turn markers of common chat formats that the vocabulary has as special tokens."""
    tok = model.tokenizer
    gen = getattr(model.hf_model, "generation_config", None)
    ids = _ids(getattr(gen, "eos_token_id", None)) | _ids(tok.eos_token_id)
    vocab = tok.get_vocab()
    # only real tokens: an unknown marker would map to <unk> and stop whenever <unk> is produced
    return ids | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}


def _module_names(hf_model: Any) -> list[str]:
    return [n for n, _ in _base(hf_model).named_modules() if n]


def missing_lora_targets(hf_model: Any, targets: Sequence[str] | str | None) -> list[str]:
    """The target module names (peft's suffix matching) that no module of the model has.

    A string (``"all-linear"`` or a regex) is peft's to interpret and reported as never missing.
    """
    if targets is None or isinstance(targets, str):
        return []
    names = _module_names(hf_model)
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_lora_targets(hf_model: Any, targets: Sequence[str] | str | None, what: str = "LoRA") -> None:
    """Raise one line naming the target modules this model does not have."""
    missing = missing_lora_targets(hf_model, targets)
    if missing:
        base = _base(hf_model)
        raise LatentlabError(
            f"{what} target modules {', '.join(missing)} do not exist in {architecture_name(base)} "
            f"({family(base.config)})",
            f"use 'all-linear' or names this model has (e.g. {','.join(attention_lora_targets(base))})",
        )


def default_lora_targets(hf_model: Any) -> str:
    """The default LoRA targets: every linear layer of the decoder blocks, in every family.

    peft's "all-linear" covers GPT-2's ``Conv1D`` (see :func:`lora_fan_in_fan_out`) and leaves out the
    LM head; on a multimodal checkpoint the vision tower is already gone (:func:`language_model_of`).
    """
    return "all-linear"


def attention_lora_targets(hf_model: Any) -> list[str]:
    """Attention-only LoRA targets (the q/v projections or the fused qkv) for this family."""
    fam = family(_base(hf_model).config)
    if fam in ATTENTION_LORA_TARGETS:
        return list(ATTENTION_LORA_TARGETS[fam])
    names = _module_names(hf_model)
    if any(n.endswith(".q_proj") for n in names):
        return list(DEFAULT_ATTENTION_LORA_TARGETS)
    for fused in ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack"):
        if any(n.endswith("." + fused) for n in names):
            return [fused]
    return list(DEFAULT_ATTENTION_LORA_TARGETS)


def lora_fan_in_fan_out(hf_model: Any) -> bool:
    """True when the decoder's linear layers are transformers' ``Conv1D`` (GPT-2): weights stored
    (in, out), which peft must know (``LoraConfig(fan_in_fan_out=True)``)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in decoder_blocks(hf_model).modules())
