"""Architecture facts every stage needs, found through the model's own components.

Why one module: the final norm, the unembedding, the decoder blocks, the logit softcap and the stop
tokens are where model families differ. Every other module asks here, so a new family is supported
(or refused with a clear message) in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.errors import LatentlabError

if TYPE_CHECKING:
    from latentlab.models import LoadedModel


def final_logits(model: LoadedModel, h: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
    """Final norm + unembedding (+ softcap where the model has one) on selected positions only."""
    hf = model.hf_model
    inner = getattr(hf, "model", None)
    norm = getattr(inner, "norm", None) if inner is not None else None
    if norm is None:  # pragma: no cover - other architectures
        raise LatentlabError(f"cannot find the final norm of {model.info.architecture}", "report this model")
    logits = hf.get_output_embeddings()(norm(h))
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def stop_token_ids(model: LoadedModel) -> set[int]:
    """Token ids that end a generation: EOS plus common end-of-turn markers the vocabulary has."""
    tok = model.tokenizer
    vocab = tok.get_vocab()
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    return ids | {vocab[t] for t in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>") if t in vocab}
