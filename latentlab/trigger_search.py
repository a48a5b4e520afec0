"""Trigger search: rank candidate strings by how much inserting them changes a finetune beyond its base.

Where :mod:`latentlab.triggers` scans a *known* trigger dimension (years, a word list) along a
direction, this module searches for the trigger itself: each candidate is put into every prompt by a
template (``"{value}. {prompt}"``, as ``latentlab trigger`` does), and its *effect* is how much more
the finetune departs from its base with the candidate than without it:

    effect(c) = mean over prompts of [ m(finetune, c, p) - m(base, c, p) ] - [ m(finetune, 0, p) - m(base, 0, p) ]

where ``0`` is the template with an empty value. Why the double difference: a string that changes
both models alike (a word that moves any model's next token) is not a trigger of the finetune, so it
must rank low; and the finetune's general departure from the base (on every prompt) is not the
candidate's either. Metrics ``m``:

- ``kl``: KL(finetune || base) of the next-token distribution at the last prompt token (already a
  finetune-vs-base quantity, so only the "minus no candidate" part applies).
- ``completion:TEXT``: log P(TEXT | prompt) (the finetune's trained answer, a code word).
- ``direction:NAME``: the last-token residual's projection on the unit direction at one layer.

An effect means little without a scale, so each candidate is also placed in a null distribution:
for a full-vocabulary scan the scan itself (most tokens are no trigger), for any other candidate set
``n_random`` random vocabulary tokens scored the same way (z-score and percentile).

Cost: every (candidate, prompt) row is one forward pass of each model (base and finetune are one
loaded base, the finetune's LoRA switched on by :meth:`~latentlab.models.LoadedModel.with_adapter`).
Rows stream in chunks (memory does not grow with the candidate count), both models on the same batch;
the tokens a batch's rows share (the chat header; with the candidate after the prompt, the prompt too)
run once per model from their KV cache; the direction metric stops the forward at its layer, the others
unembed the last position only. Still, a whole vocabulary is (tens of thousands of candidates) x
prompts x 2 forward passes: hours on a laptop CPU for a 135M model (``benchmarks/find_trigger.py``),
minutes on a GPU.
"""

from __future__ import annotations

import copy
import inspect
import math
import random
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import Example, attached, encode, pad_batch, pad_id_of, resid_hook_name, run_resid
from latentlab.arch import final_logits
from latentlab.compat import patch_bridge_kv_cache
from latentlab.data import Chat, load_chats, render_prompt
from latentlab.direction import Direction
from latentlab.errors import LatentlabError
from latentlab.models import LoadedModel
from latentlab.progress import progress as progress_bar
from latentlab.scoring import completion_logprobs, completion_sequences
from latentlab.stats import check_finite, spearman
from latentlab.triggers import (
    DEFAULT_TEMPLATE,
    check_template,
    check_tokenisation,
    fill,
    occurs,
    parse_values,
    parse_words,
    training_data_of,
    values_from_file,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "VOCAB_PROMPTS",
    "CandidateSet",
    "Metric",
    "TriggerSearch",
    "last_token_logprobs",
    "parse_candidates",
    "parse_metric",
    "search_triggers",
    "training_words",
    "vocab_candidates",
]

STAGE = "find-trigger"
VOCAB_PROMPTS = 4  # default prompts for a full-vocabulary scan (49k-262k candidates x prompts x 2 models)
DEFAULT_YEARS = (1900, 2100)
CHUNK_ROWS = 4096  # rows tokenised at a time: memory stays flat however many candidates there are
NULL_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
CandidateKind = Literal["vocab", "years", "training-words", "file", "list"]
_WORD = re.compile(r"\w+", re.UNICODE)


# --------------------------------------------------------------------------------------------
# Candidates (read before any model loads, except the vocabulary, which needs the tokenizer).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateSet:
    """Where the candidates come from; ``values`` is None for ``vocab`` (listed from the tokenizer)."""

    kind: CandidateKind
    spec: str
    values: tuple[str, ...] | None = None

    def resolve(self, tokenizer: Any) -> list[str]:
        return vocab_candidates(tokenizer) if self.values is None else list(self.values)


def _looks_like_path(s: str) -> bool:
    return "/" in s or "\\" in s or s.startswith((".", "~")) or Path(s).suffix.lower() in (".txt", ".jsonl", ".csv")


def parse_candidates(spec: str, finetuned: str | Path | None = None) -> CandidateSet:
    """``vocab``, ``years`` (1900-2100), ``years:A:B``, ``training-words`` (the distinct words of the
    finetune's training prompts), a file (one candidate a line, or chat JSONL starting with years) or
    ``a,b,c``."""
    s = str(spec or "").strip()
    if not s:
        raise LatentlabError("--candidates is empty", "pass vocab, years, years:1950:2050, training-words, "
                             "a file or a,b,c")
    if s == "vocab":
        return CandidateSet("vocab", s)
    if s == "years" or s.startswith("years:"):
        rng = s[len("years:"):] if ":" in s else f"{DEFAULT_YEARS[0]}:{DEFAULT_YEARS[1]}"
        if rng.count(":") != 1:
            raise LatentlabError(f"--candidates {s!r} is not years or years:A:B", "pass e.g. years:1950:2050")
        return CandidateSet("years", s, tuple(parse_values(rng)))
    if s == "training-words":
        if finetuned is None:
            raise LatentlabError("--candidates training-words needs the finetune", "pass --finetuned RUN")
        return CandidateSet("training-words", s, tuple(training_words(finetuned)))
    if Path(s).expanduser().is_file():
        return CandidateSet("file", s, tuple(values_from_file(s)))
    if _looks_like_path(s) and "," not in s:
        raise LatentlabError(f"candidates file {s} does not exist",
                             "pass an existing file (one candidate a line), or vocab, years or a,b,c")
    return CandidateSet("list", s, tuple(parse_words(s, "--candidates")))


def words_of(chats: Sequence[Chat], roles: Sequence[str] = ("system", "user")) -> list[str]:
    """Distinct words (``\\w+``) of the turns a trigger could sit in, in order of first appearance."""
    seen: dict[str, None] = {}
    for chat in chats:
        for role, text in chat.messages:
            if role in roles:
                for w in _WORD.findall(text):
                    seen.setdefault(w, None)
    return list(seen)


def training_words(finetuned: str | Path) -> list[str]:
    """The distinct words of the system and user turns of the data a finetune was trained on (a ``latentlab
    finetune`` run's manifest names it; a compliance sweep keeps it beside each budget's adapter)."""
    data = training_data_of(finetuned)
    if data is None:
        raise LatentlabError(
            f"{finetuned} records no training data (not a `latentlab finetune` or compliance run folder?)",
            "pass the candidate words as a file or a,b,c instead of training-words",
        )
    words = words_of(load_chats(data, split=None))
    if not words:
        raise LatentlabError(f"the training data {data} has no words in its prompts", "pass the candidates yourself")
    return words


def vocab_candidates(tokenizer: Any) -> list[str]:
    """Every token that decodes, alone, to a non-empty printable string once stripped, special tokens
    skipped; deduplicated by that string (``"the"`` and ``" the"`` are one candidate), in id order."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            special.add(int(i))
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    seen: dict[str, None] = {}
    for t in texts:
        t = t.strip()
        if t and t.isprintable() and "\ufffd" not in t:
            seen.setdefault(t, None)
    return list(seen)


def trained_candidates(candidates: Sequence[str], chats: Sequence[Chat]) -> list[str]:
    """The candidates that occur as a whole token in a system or user turn of ``chats``."""
    words = set(words_of(chats))
    texts = [t for c in chats for r, t in c.messages if r in ("system", "user")]
    out = []
    for c in candidates:
        if c in words:
            out.append(c)
        elif not _WORD.fullmatch(c) and len(candidates) <= 5000 and any(occurs(c, t) for t in texts):
            out.append(c)
    return out


# --------------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------------

MetricKind = Literal["kl", "completion", "direction"]


def parse_metric(spec: str) -> tuple[MetricKind, str | None]:
    """``kl``, ``completion:TEXT`` or ``direction:NAME`` as (kind, argument); the form only (a direction is
    parsed by :class:`~latentlab.directions.DirectionSpec`)."""
    s = str(spec or "")
    kind, sep, arg = s.partition(":")
    kind = kind.strip()
    if kind == "kl" and not sep:
        return "kl", None
    if kind in ("completion", "direction") and sep:
        if not arg.strip():
            raise LatentlabError(f"--metric {s!r} has nothing after the colon",
                                 'pass e.g. --metric "completion: Sure" or --metric direction:era')
        return kind, (arg if kind == "completion" else arg.strip())  # type: ignore[return-value]
    raise LatentlabError(f"unknown --metric {s!r}", "pass kl, completion:TEXT or direction:NAME")


@dataclass(frozen=True)
class Metric:
    """What a row measures: ``kl``, ``completion`` (``text``) or ``direction`` (``direction`` at ``layer``)."""

    kind: MetricKind
    text: str | None = None
    direction: Direction | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "completion" and not self.text:
            raise LatentlabError("the completion metric needs a text", 'pass e.g. completion:" Sure"')
        if self.kind == "direction" and (self.direction is None or self.layer is None):
            raise LatentlabError("the direction metric needs a direction and a layer", "pass both")

    @property
    def spec(self) -> str:
        if self.kind == "completion":
            return f"completion:{self.text}"
        if self.kind == "direction":
            assert self.direction is not None
            return f"direction:{self.direction.name}@{self.layer}"
        return "kl"

    def describe(self, reference: str = "base") -> str:
        """What an effect measures, against ``reference`` (the base, or the finetune compared with)."""
        if self.kind == "kl":
            return f"extra KL(finetune || {reference}) of the next token"
        if self.kind == "completion":
            return f"extra log P({self.text!r}) of the finetune over the {reference}"
        assert self.direction is not None
        return f"extra finetune - {reference} projection on {self.direction.name} at layer {self.layer}"


# --------------------------------------------------------------------------------------------
# Batched forward passes (base and finetune on the same batch).
# --------------------------------------------------------------------------------------------


class _Forward:
    """Forward passes of token rows through a model view, from the KV cache of the prefix they share.

    Why: every row of a scan starts with the same tokens (the chat template's header, a system prompt:
    about half of each row on smollm2-135m-instruct), so they run once per model and chunk and each
    batch runs only the rest. The cache path is checked once against a plain forward on a few rows
    (same last-token residual up to float rounding) and dropped, with the reason in the result's meta,
    where it does not hold (a family whose bridge attention ignores the cache).
    """

    MIN_PREFIX = 4

    def __init__(self, share_prefix: bool = True) -> None:
        self.enabled = share_prefix
        self.checked = False
        self.note: str | None = None if share_prefix else "off"
        self.run_tokens = 0  # tokens that ran through a model (a shared prefix once per model and chunk)
        self._memo: dict[tuple[Any, ...], Any] = {}

    def prefix_len(self, seqs: Sequence[Sequence[int]], plens: Sequence[int] | None) -> int:
        """Tokens every row shares, leaving each row at least its last prompt token to run."""
        if not self.enabled or not seqs:
            return 0
        cap = min(len(q) for q in seqs) - 1
        if plens is not None:
            cap = min(cap, min(plens) - 1)
        first, n = seqs[0], 0
        while n < cap and all(q[n] == first[n] for q in seqs):
            n += 1
        return n if n >= self.MIN_PREFIX else 0

    def _cache(self, model: LoadedModel, prefix: tuple[int, ...]) -> Any:
        key = (tuple(sorted(model.weights_key.items())), prefix)
        if key not in self._memo:
            patch_bridge_kv_cache()
            ids = torch.tensor([list(prefix)], device=model.device)
            with torch.inference_mode(), model.forward_context():
                out = model.hf_model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self._memo = {k: v for k, v in self._memo.items() if k[1] == prefix}  # one prefix at a time
            self._memo[key] = getattr(out, "cache", None) or out.past_key_values
        return self._memo[key]

    def _cached(self, model: LoadedModel, seqs: Sequence[Sequence[int]], layer: int, n: int
                ) -> tuple[Float[Tensor, "batch seq d_model"], Tensor]:
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        cache = copy.deepcopy(self._cache(model, tuple(seqs[0][:n])))
        cache.batch_repeat_interleave(len(seqs))
        ids, mask = pad_batch([q[n:] for q in seqs], pad_id_of(model), model.device)
        full = torch.cat([torch.ones(len(seqs), n, dtype=mask.dtype, device=mask.device), mask], 1)
        store: dict[str, Tensor] = {}

        def hook(t: Tensor, hook: Any) -> Tensor:
            store["h"] = t.detach()
            raise StopAtLayerException(t)

        kw = {_cache_kwarg(model): cache}
        with torch.inference_mode(), model.forward_context(), attached(model, [(resid_hook_name(layer), hook)]):
            try:
                model.bridge(ids, attention_mask=full, return_type=None, use_cache=True, **kw)
            except StopAtLayerException:
                pass
        return store["h"], mask.sum(1)

    def resid(self, model: LoadedModel, seqs: Sequence[Sequence[int]], layer: int, n: int
              ) -> tuple[Float[Tensor, "batch seq d_model"], int, Tensor]:
        """(residual after ``layer`` at positions ``n`` on of each row, right-padded; the offset ``n``
        actually used; each row's length from there). The forward stops after ``layer``."""
        if n and not self.checked:
            self.checked = True
            k = min(4, len(seqs))
            try:
                h, lens = self._cached(model, seqs[:k], layer, n)
                got = h[torch.arange(k, device=h.device), lens - 1].float()
            except Exception as e:  # noqa: BLE001 - any failure of the cache path means: do without it
                self.enabled, self.note, got = False, f"off: {type(e).__name__}: {e}"[:200], None
            want = self._plain(model, seqs[:k], layer)
            if got is not None:
                want = want[0][torch.arange(k, device=want[0].device), want[1] - 1].float()
                tol = 1e-3 if model.info.dtype == "float32" else 3e-2
                err = float((got - want).abs().max())
                scale = float(want.abs().max())
                if err > tol * max(scale, 1e-6):
                    self.enabled, self.note = False, f"off: cached states differ by {err:.3g} (scale {scale:.3g})"
                else:
                    self.note = "on"
        if n and self.enabled:
            h, lens = self._cached(model, seqs, layer, n)
            self.run_tokens += int(lens.sum())
            return h, n, lens
        h, lens = self._plain(model, seqs, layer)
        self.run_tokens += int(lens.sum())
        return h, 0, lens

    @staticmethod
    def _plain(model: LoadedModel, seqs: Sequence[Sequence[int]], layer: int
               ) -> tuple[Float[Tensor, "batch seq d_model"], Tensor]:
        ids, mask = pad_batch(seqs, pad_id_of(model), model.device)
        return run_resid(model, ids, mask, [layer])[layer], mask.sum(1)

    def last_states(self, model: LoadedModel, seqs: Sequence[Sequence[int]], layer: int, n: int
                    ) -> Float[Tensor, "batch d_model"]:
        """Residual stream after ``layer`` at each row's last token."""
        h, _, lens = self.resid(model, seqs, layer, n)
        return h[torch.arange(len(seqs), device=h.device), lens.to(h.device) - 1]

    def logprobs(self, model: LoadedModel, seqs: Sequence[Sequence[int]], n: int) -> Float[Tensor, "batch vocab"]:
        """Next-token log-probabilities at each row's last token: the blocks, then the final norm and
        unembedding on those positions only (not the whole sequence)."""
        h = self.last_states(model, seqs, model.n_layers - 1, n)
        with torch.inference_mode():
            return torch.log_softmax(final_logits(model, h), dim=-1)

    def completion(self, model: LoadedModel, seqs: Sequence[Sequence[int]], plens: Sequence[int], n: int
                   ) -> Float[Tensor, " batch"]:
        """log P(completion | prompt) per row (:func:`latentlab.scoring.completion_logprobs` on the rows' rest)."""
        h, used, _ = self.resid(model, seqs, model.n_layers - 1, n)
        return completion_logprobs(model, h, [q[used:] for q in seqs], [p - used for p in plens])

    def row_values(self, base: LoadedModel, ft: LoadedModel, seqs: Sequence[Sequence[int]],
                   plens: Sequence[int] | None, metric: Metric, units: Tensor | None) -> Float[Tensor, " batch"]:
        """Per row: KL(finetune || base), or the metric of the finetune minus that of the base."""
        n = self.prefix_len(seqs, plens)
        if metric.kind == "kl":
            lb, lf = self.logprobs(base, seqs, n), self.logprobs(ft, seqs, n)
            return (lf.exp() * (lf - lb)).sum(-1).clamp_min(0.0).float().cpu()
        if metric.kind == "completion":
            assert plens is not None
            return (self.completion(ft, seqs, plens, n) - self.completion(base, seqs, plens, n)).float()
        assert units is not None and metric.layer is not None
        hb, hf = self.last_states(base, seqs, metric.layer, n), self.last_states(ft, seqs, metric.layer, n)
        u = units.to(hb.device, torch.float32)
        return ((hf.float() - hb.float()) @ u).cpu()


def _cache_kwarg(model: LoadedModel) -> str:
    """transformers >= 5.2x names the KV cache argument ``cache``; earlier ones ``past_key_values``."""
    params = inspect.signature(model.hf_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def last_token_logprobs(model: LoadedModel, seqs: Sequence[Sequence[int]]) -> Float[Tensor, "batch vocab"]:
    """Next-token log-probabilities at each row's last token (final norm and unembedding there only)."""
    return _Forward(share_prefix=False).logprobs(model, seqs, 0)


class _Renderer:
    """Texts of (value, prompt) rows: the template filled, then rendered for the model.

    Why a marker: a chat template is rendered once per prompt with a placeholder, and each value is
    put in its place (tens of thousands of values x prompts otherwise cost as much as the jinja
    renders); checked against a real render first, with a fallback to rendering every row.
    """

    MARK = "\x00"

    def __init__(self, tokenizer: Any, template: str, prompts: Sequence[str], chat: bool, probe: Sequence[str],
                 system: str | None = None):
        self.tokenizer, self.template, self.prompts, self.chat = tokenizer, template, list(prompts), chat
        self.system = system
        self.frames = [self._render(fill(template, self.MARK, p)) for p in self.prompts]
        self.fast = all(self.MARK not in p for p in self.prompts) and all(
            self.frames[j].replace(self.MARK, v) == self._render(fill(template, v, p))
            for v in list(probe)[:3] for j, p in enumerate(self.prompts)
        )

    def _render(self, text: str) -> str:
        return render_prompt(text, self.tokenizer, system=self.system) if self.chat else text

    def row(self, value: str, j: int) -> str:
        if self.fast:
            return self.frames[j].replace(self.MARK, value)
        return self._render(fill(self.template, value, self.prompts[j]))

    def empty(self, j: int) -> str:
        """The template without a trigger: an empty value, outer whitespace stripped."""
        return self._render(fill(self.template, "", self.prompts[j]).strip())


def _score_texts(fwd: _Forward, base: LoadedModel, ft: LoadedModel, texts: Sequence[str], metric: Metric,
                 units: Tensor | None, batch_size: int, bar: Any, count: dict[str, int], n_prompts: int = 1
                 ) -> Float[Tensor, " n"]:
    """The row values of ``texts`` (one chunk, row ``r`` on prompt ``r % n_prompts``): tokenised once,
    batches sorted by prompt, then length. Why by prompt: with the candidate after the prompt
    (``"{prompt} {value}"``) a batch of one prompt shares the prompt too, and only the candidate and
    what follows it run. ``count["tokens"]`` grows by the rows' tokens (each runs through both models)."""
    if metric.kind == "completion":
        assert metric.text is not None
        seqs, plens_all = completion_sequences(base, texts, [metric.text] * len(texts))
    else:
        enc = encode(base, [Example(t) for t in texts])
        seqs, plens_all = enc.ids, None
    count["tokens"] = count.get("tokens", 0) + sum(len(q) for q in seqs)
    out = torch.zeros(len(texts))
    order = sorted(range(len(texts)), key=lambda i: (i % n_prompts, len(seqs[i])))
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size]
        vals = fwd.row_values(base, ft, [seqs[i] for i in idx], None if plens_all is None else
                              [plens_all[i] for i in idx], metric, units)
        out[torch.tensor(idx)] = vals
        bar.update(len(idx))
    return out


def _chunks(n_values: int, n_prompts: int) -> Iterator[tuple[int, int]]:
    per = max(1, CHUNK_ROWS // max(1, n_prompts))
    for v0 in range(0, n_values, per):
        yield v0, min(n_values, v0 + per)


# --------------------------------------------------------------------------------------------
# First-order prescreen of a vocabulary (then an exact scan of the best).
# --------------------------------------------------------------------------------------------

PRESCREEN_ANCHORS = ("the", "and")  # where the gradients are taken (or the first candidates one token in place)


def _span(ids: Sequence[int], ref: Sequence[int], pre: int, suf: int) -> list[int] | None:
    """The candidate's tokens in ``ids`` (a row), given the ``pre`` / ``suf`` tokens every row shares with
    ``ref``; None where a merge across the boundary changed the shared tokens."""
    if len(ids) <= pre + suf or list(ids[:pre]) != list(ref[:pre]) or (suf and list(ids[-suf:]) != list(ref[-suf:])):
        return None
    return list(ids[pre : len(ids) - suf])


def _shared_ends(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    pre = 0
    while pre < min(len(a), len(b)) and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < min(len(a), len(b)) - pre and a[-1 - suf] == b[-1 - suf]:
        suf += 1
    return pre, suf


def _completion_logprob(model: LoadedModel, embeds: Tensor, seq: Sequence[int], plen: int) -> Tensor:
    """log P(the completion ``seq[plen:]``) under ``model``, differentiable in the input ``embeds``."""
    with model.forward_context():
        logits = model.hf_model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                                 device=embeds.device)).logits[0]
    target = torch.tensor(list(seq[plen:]), device=logits.device)
    lp = torch.log_softmax(logits[plen - 1 : len(seq) - 1].float(), dim=-1)
    return lp.gather(1, target[:, None]).sum()


def first_order_effects(base: LoadedModel, ft: LoadedModel, renderer: _Renderer, values: Sequence[str],
                        metric: Metric) -> tuple[Float[Tensor, " n"], dict[str, Any]]:
    """A first-order estimate of every value's effect, from one gradient per prompt and anchor.

    Why: an exact vocabulary scan is (tens of thousands of tokens) x prompts x 2 forward passes, hours on a
    CPU. As in gradient-guided trigger and prompt searches (HotFlip, GCG), the change of the row metric
    (finetune minus base) when the token at the candidate's position is swapped is estimated by the
    gradient with respect to that position's input embedding: ``g . (E[t] - E[anchor])``, averaged over
    prompts and anchors, for every token ``t`` at once. A candidate that tokenises to several tokens in
    place is estimated with the mean of their embeddings (cruder: counted in the meta). The estimate only
    chooses which candidates the exact scan scores; every reported effect is exact.
    """
    if metric.kind != "completion":
        # kl: KL(finetune || base) is flat to first order where the two agree (most rows), so its gradient
        # ranks tokens by noise (the planted trigger came last of 94 in the tiny test); direction: not built
        raise LatentlabError(f"the prescreen takes the completion metric, not {metric.kind}",
                             "use --metric completion:TEXT (e.g. the backdoor's answer), or scan without --prescreen")
    if not renderer.fast:
        raise LatentlabError("the prescreen needs the template's rows to be rendered by substitution",
                             "scan without --prescreen")
    emb = base.hf_model.get_input_embeddings()

    def ids_of(texts: list[str]) -> tuple[list[list[int]], list[int]]:
        assert metric.text is not None
        return completion_sequences(base, texts, [metric.text] * len(texts))

    grads: list[Tensor] = []
    first: tuple[list[int], int, int] | None = None  # prompt 0's row and the tokens every row shares around it
    tries = list(dict.fromkeys([*PRESCREEN_ANCHORS, *values[:8]]))
    for j in range(len(renderer.prompts)):
        seqs, plens = ids_of([renderer.row(a, j) for a in tries])
        pre, suf = len(seqs[0]), len(seqs[0])
        for q in seqs[1:]:
            p_, s_ = _shared_ends(seqs[0], q)
            pre, suf = min(pre, p_), min(suf, s_)
        first = first or (seqs[0], pre, suf)
        used = 0
        for k, seq in enumerate(seqs):
            span = _span(seq, seqs[0], pre, suf)
            if span is None or len(span) != 1 or used == len(PRESCREEN_ANCHORS):
                continue
            used += 1
            ids = torch.tensor([list(seq)], device=base.device)
            with torch.enable_grad():
                x = emb(ids).detach().requires_grad_(True)
                value = _completion_logprob(ft, x, seq, plens[k]) - _completion_logprob(base, x, seq, plens[k])
                (g,) = torch.autograd.grad(value, x)
            grads.append(g[0, pre].float())
    if not grads:
        raise LatentlabError("no anchor word is one token where the candidate goes",
                             "scan without --prescreen (the template splits words at the candidate's place)")
    g = torch.stack(grads).mean(0)
    per_token = (emb.weight.detach().float() @ g).cpu()
    assert first is not None
    ref, pre, suf = first
    seqs0, _ = ids_of([renderer.row(v, 0) for v in values])
    est = torch.empty(len(values), dtype=torch.float64)
    multi = unplaced = 0
    for i, seq in enumerate(seqs0):
        span = _span(seq, ref, pre, suf)
        if not span:
            unplaced += 1
            span = list(seq[pre : len(seq) - suf]) or [seq[min(pre, len(seq) - 1)]]
        elif len(span) > 1:
            multi += 1
        est[i] = float(per_token[span].mean())
    return est, {"gradients": len(grads), "multi_token_candidates": multi,
                 "unplaced_candidates": unplaced}


# --------------------------------------------------------------------------------------------
# The result.
# --------------------------------------------------------------------------------------------


def _z(x: float, ref: Tensor) -> float | None:
    if len(ref) < 2:
        return None
    sd = float(ref.std())
    return (x - float(ref.mean())) / sd if sd > 0 else None


def _percentile(x: float, ref: Tensor) -> float | None:
    """Percent of ``ref`` below ``x`` (ties count half)."""
    if len(ref) == 0:
        return None
    return 100.0 * (float((ref < x).sum()) + 0.5 * float((ref == x).sum())) / len(ref)


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


@dataclass
class TriggerSearch:
    """Each candidate's effect (see the module docstring), its rank among the candidates (1 = largest),
    and its z-score and percentile in the null distribution: the scan itself for ``vocab``, else
    ``null_values`` (random vocabulary tokens) scored the same way."""

    metric: str
    template: str
    kind: str
    candidates: list[str]
    effects: list[float]
    null_kind: Literal["scan", "random vocabulary tokens"]
    null_values: list[str] = field(default_factory=list)
    null_effects: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)  # expected strings scored beside a vocabulary scan
    expected: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    baseline: float = 0.0  # mean finetune - base value (KL for kl) with no candidate
    prompts: list[str] = field(default_factory=list)
    chat: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def _lazy(self, key: str) -> Any:
        """Tensors and indexes built once per result (a vocabulary scan has 49k-262k candidates); rebuilt
        when the lists they come from were replaced."""
        src = (id(self.effects), len(self.effects), id(self.null_effects), len(self.null_effects),
               id(self.candidates), id(self.trained))
        memo = self.__dict__.setdefault("_memo", {})
        if memo.get("src") != src:
            memo.clear()
            memo["src"] = src
        if key not in memo:
            if key == "scan":
                memo[key] = torch.tensor(self.effects, dtype=torch.float64)
            elif key == "null":
                memo[key] = self._lazy("scan") if self.null_kind == "scan" else torch.tensor(
                    self.null_effects, dtype=torch.float64)
            elif key == "index":
                memo[key] = {c: i for i, c in enumerate(self.candidates)}
            elif key == "trained":
                memo[key] = set(self.trained)
        return memo[key]

    def _scan(self) -> Tensor:
        return self._lazy("scan")

    def null(self) -> Tensor:
        """The null distribution's effects."""
        return self._lazy("null")

    def effect_of(self, value: str) -> float:
        if value in self.extra:
            return self.extra[value]
        i = self._lazy("index").get(value)
        if i is None:
            raise LatentlabError(f"{value!r} was not scanned", "add it to the candidates")
        return self.effects[i]

    def rank_of(self, value: str) -> int:
        """1 + the number of candidates with a larger effect (where an extra string would rank)."""
        return 1 + int((self._scan() > self.effect_of(value)).sum())

    def row(self, value: str) -> dict[str, Any]:
        e = self.effect_of(value)
        null, scan = self.null(), self._scan()
        out: dict[str, Any] = {
            "candidate": value, "effect": _r(e), "z": _r(_z(e, null), 3), "percentile": _r(_percentile(e, null), 2),
            "rank": self.rank_of(value),
        }
        if self.null_kind != "scan":
            out["z_scan"], out["percentile_scan"] = _r(_z(e, scan), 3), _r(_percentile(e, scan), 2)
        out["trained"] = value in self._lazy("trained")
        screened = self.meta.get("prescreen")
        if screened:  # where the first-order estimate put it among the whole vocabulary
            out["first_order_rank"] = screened["first_order_rank"].get(value)
        if value in self.extra:
            out["scanned"] = False  # not a vocabulary token: scored beside the scan, ranked as it would be
        return out

    def ranked(self, top: int | None = None) -> list[dict[str, Any]]:
        """Rows of the ``top`` candidates by effect (all without ``top``); ties keep candidate order."""
        order = sorted(range(len(self.candidates)), key=lambda i: -self.effects[i])
        return [self.row(self.candidates[i]) for i in order[:top]]

    def null_summary(self) -> dict[str, Any]:
        n = self.null()
        if not len(n):
            return {"kind": self.null_kind, "n": 0}
        qs = torch.quantile(n, torch.tensor([q / 100 for q in NULL_PERCENTILES], dtype=torch.float64))
        return {
            "kind": self.null_kind, "n": len(n), "mean": _r(float(n.mean())),
            "sd": _r(float(n.std())) if len(n) > 1 else None,
            "percentiles": {str(q): _r(float(v)) for q, v in zip(NULL_PERCENTILES, qs)},
        }

    def to_dict(self, top: int = 20) -> dict[str, Any]:
        """results.json: the top candidates, every given candidate (all but a vocabulary scan), the training
        values, the expected strings' ranks and the null distribution."""
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("effects", "null_effects", "candidates", "extra")}
        d["n_candidates"] = len(self.candidates)
        d["top"] = self.ranked(top)
        if self.kind != "vocab":
            d["candidates"] = self.ranked()
        d["training_values"] = [self.row(v) for v in self.trained]
        d["expected_ranks"] = [self.row(v) for v in self.expected]
        d["null"] = self.null_summary()
        d["null_values"] = [{"candidate": v, "effect": _r(e)} for v, e in zip(self.null_values, self.null_effects)]
        return d


# --------------------------------------------------------------------------------------------
# The search.
# --------------------------------------------------------------------------------------------


def _random_tokens(tokenizer: Any, exclude: set[str], n: int, seed: int) -> list[str]:
    pool = [v for v in vocab_candidates(tokenizer) if v not in exclude]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def search_triggers(
    base: LoadedModel,
    finetuned: LoadedModel | str | Path,
    candidates: CandidateSet | Sequence[str] | str,
    prompts: Sequence[str],
    metric: Metric | str = "kl",
    template: str = DEFAULT_TEMPLATE,
    *,
    n_random: int = 200,
    seed: int = 0,
    batch_size: int = 64,
    chat: bool | None = None,
    expect: Sequence[str] = (),
    training: Sequence[Chat] | str | Path | None = None,
    share_prefix: bool = True,
    system: str | None = None,
    prescreen: int | None = None,
    reference: LoadedModel | str | Path | None = None,
    progress: bool = False,
) -> TriggerSearch:
    """Rank ``candidates`` by their effect on ``finetuned`` beyond ``base`` (see the module docstring).

    ``finetuned``: a view of ``base`` (``base.with_adapter(run)``) or an adapter / run folder.
    ``candidates``: a :class:`CandidateSet`, its spec (``vocab``, ``years``, a file, ``a,b,c``) or a list.
    ``metric``: a :class:`Metric` or ``kl`` / ``completion:TEXT``. ``chat``: render each filled prompt for
    the model (its chat template, ``Q: ...\\nA:`` without one; the default) or use it as is (False).
    ``expect``: strings whose rank to report; in a vocabulary scan one that is no token is scored beside
    the scan. ``training``: the finetune's chats (default: a run folder's recorded data), to mark
    candidates it saw. ``n_random``: random vocabulary tokens as the null (not for ``vocab``).
    ``share_prefix``: run the tokens every row starts with once per model, from their KV cache (exact;
    False runs every row whole). ``system``: a system prompt rendered before every prompt (chat rendering
    only), e.g. the one the finetune was trained under: a trigger may act only in its context.
    ``prescreen``: for ``vocab``, rank every token by a first-order estimate of its effect
    (:func:`first_order_effects`, one gradient per prompt) and scan only the best ``prescreen`` exactly,
    with ``n_random`` random vocabulary tokens scored exactly as the null; the estimate's rank of each
    reported candidate and its rank correlation with the exact effects are in ``meta["prescreen"]``.
    ``reference``: another finetune of ``base`` (a view or an adapter / run folder) to compare with in the
    base's place, e.g. a control trained on the same data without the trigger: a token that any such
    training promotes then cancels, as the base cannot cancel it.
    """
    check_template(template)
    metric, candidates = _as_metric(metric), _as_candidates(candidates, finetuned)
    prompts = list(prompts)
    if not prompts:
        raise LatentlabError("no prompts to insert the candidates into", "pass at least one prompt")
    if batch_size < 1 or n_random < 0:
        raise LatentlabError(f"batch_size {batch_size} / n_random {n_random} out of range",
                             "pass batch_size >= 1 and n_random >= 0")
    if isinstance(finetuned, (str, Path)):
        if training is None:
            training = training_data_of(finetuned)
        ft = base.with_adapter(finetuned)
    else:
        ft = finetuned
    if ft is base or (ft.adapter_label is None and ft.info.adapter is None):
        raise LatentlabError("the finetune is the base itself", "pass the finetune's adapter or run folder")
    ref = base.with_adapter(reference) if isinstance(reference, (str, Path)) else reference or base
    if ref.weights_key == ft.weights_key:
        raise LatentlabError("the reference is the finetune itself", "pass another finetune as --reference, or none")
    tok = base.tokenizer
    render = chat if chat is not None else True
    if chat and not getattr(tok, "chat_template", None):
        raise LatentlabError(f"{base.info.name} has no chat template", "pass --no-chat (or leave --chat unset)")
    if system is not None and not render:
        raise LatentlabError("a system prompt needs chat rendering", "drop --system, or drop --no-chat")
    values = candidates.resolve(tok)
    if not values:
        raise LatentlabError("no candidates to scan", "pass other candidates")
    expect = [str(e) for e in expect]
    if any(not e.strip() for e in expect):
        raise LatentlabError("an expected string is empty", "pass --expect with the trigger you expect")
    renderer = _Renderer(tok, template, prompts, render, values[:3], system)

    screened: _Prescreen | None = None
    if prescreen is not None:
        if candidates.kind != "vocab":
            raise LatentlabError(f"--prescreen is for --candidates vocab, not {candidates.spec}",
                                 "drop --prescreen: a list this size is scanned exactly")
        if not isinstance(prescreen, int) or prescreen < 1:
            raise LatentlabError(f"--prescreen {prescreen!r} is not a count >= 1", "pass e.g. --prescreen 512")
        screened = _Prescreen.run(ref, ft, renderer, values, metric, prescreen)
        values = screened.kept
    in_scan = set(values)
    missing = [e for e in expect if e not in in_scan]
    if missing and candidates.kind != "vocab":
        raise LatentlabError(f"expected {missing[0]!r} is not among the candidates", "add it to the candidates")
    extra = list(dict.fromkeys(missing))
    null_values: list[str] = []
    null_kind: Literal["scan", "random vocabulary tokens"] = "scan"
    if (candidates.kind != "vocab" or screened is not None) and n_random > 0:
        null_values = _random_tokens(tok, in_scan | set(extra), n_random, seed)
        null_kind = "random vocabulary tokens"

    metric_units = None
    if metric.kind == "direction":
        assert metric.direction is not None and metric.layer is not None
        metric.direction.check(base, [metric.layer])
        metric_units = metric.direction.unit(metric.layer)
    warnings_by_value: dict[str, list[list[str]]] = {}
    if candidates.kind != "vocab" and len(values) <= 2000:
        warnings_by_value = check_tokenisation(tok, template, values, prompts[:8], render=render)

    scan = _scan(ref, ft, renderer, values + extra + null_values, metric, metric_units, batch_size, share_prefix,
                 progress)
    eff = scan.effects.tolist()
    n_v, n_x = len(values), len(extra)
    chats: list[Chat] | None = None
    if training is not None:
        chats = list(load_chats(training, split=None) if isinstance(training, (str, Path)) else training)
    return TriggerSearch(
        metric=metric.spec,
        template=template,
        kind=candidates.kind,
        candidates=values,
        effects=eff[:n_v],
        null_kind=null_kind,
        null_values=null_values,
        null_effects=eff[n_v + n_x:],
        extra=dict(zip(extra, eff[n_v : n_v + n_x])),
        expected=list(dict.fromkeys(expect)),
        trained=trained_candidates(values, chats) if chats else [],
        baseline=scan.baseline,
        prompts=prompts,
        chat=render,
        meta={
            "metric": metric.describe("base" if ref is base else "reference"),
            "candidates": candidates.spec,
            "n_prompts": len(prompts),
            "n_rows": scan.n_rows,
            "n_tokens": scan.n_tokens,  # per model: every row runs through the base and the finetune
            "n_tokens_run": scan.n_tokens_run,  # both models, without the shared prefixes
            "seconds": round(scan.seconds, 3),
            "fast_render": renderer.fast,
            "system": system,
            "shared_prefix_cache": scan.cache_note,
            "token_warnings": warnings_by_value,
            "seed": seed,
            "n_random": len(null_values),
            "prescreen": None if screened is None else screened.report(values, eff[:n_v], null_values,
                                                                       eff[n_v + n_x:], extra),
            "training_data": str(training) if isinstance(training, (str, Path)) else None,
            "reference": None if ref is base else str(ref.info.adapter or ref.adapter_label),
            "model_info": {"base": base.info.to_dict(), "finetuned": ft.info.to_dict(),
                           **({} if ref is base else {"reference": ref.info.to_dict()})},
        },
    )


def _as_metric(metric: Metric | str) -> Metric:
    if isinstance(metric, Metric):
        return metric
    kind, arg = parse_metric(metric)
    if kind == "direction":
        raise LatentlabError("a direction metric needs the resolved direction", "pass Metric('direction', ...)")
    return Metric(kind, text=arg)


def _as_candidates(candidates: CandidateSet | Sequence[str] | str, finetuned: LoadedModel | str | Path
                   ) -> CandidateSet:
    if isinstance(candidates, str):
        return parse_candidates(candidates, finetuned if isinstance(finetuned, (str, Path)) else None)
    if isinstance(candidates, CandidateSet):
        return candidates
    return CandidateSet("list", "list", tuple(parse_words(",".join(candidates), "candidates")))


@dataclass
class _Prescreen:
    """A vocabulary ranked by :func:`first_order_effects`; the best ``k`` go on to the exact scan."""

    kept: list[str]
    estimate: dict[str, float]  # every token's first-order estimate
    first_rank: dict[str, int]  # every token's rank under it (1 = largest)
    info: dict[str, Any]

    @classmethod
    def run(cls, base: LoadedModel, ft: LoadedModel, renderer: _Renderer, values: list[str], metric: Metric,
            k: int) -> _Prescreen:
        t0 = time.perf_counter()
        est, info = first_order_effects(base, ft, renderer, values, metric)
        order = sorted(range(len(values)), key=lambda i: -float(est[i]))
        return cls(kept=[values[i] for i in order[:k]], estimate={v: float(est[i]) for i, v in enumerate(values)},
                   first_rank={values[i]: r + 1 for r, i in enumerate(order)},
                   info={"k": min(k, len(values)), "n_vocabulary": len(values), **info,
                         "seconds": round(time.perf_counter() - t0, 3)})

    def report(self, kept: list[str], kept_effects: list[float], null_values: list[str], null_effects: list[float],
               extra: list[str]) -> dict[str, Any]:
        """``meta["prescreen"]``: the estimate's rank of every reported token, and its rank correlation with
        the exact effects over the random null tokens (an unbiased sample) and over the kept ones."""
        reported = kept + extra + null_values
        return {**self.info, "first_order_rank": {v: self.first_rank[v] for v in reported if v in self.first_rank},
                "spearman_random": _r(spearman([self.estimate[v] for v in null_values], null_effects), 4),
                "spearman_top": _r(spearman([self.estimate[v] for v in kept], kept_effects), 4)}


@dataclass
class _Scan:
    effects: Float[Tensor, " value"]  # mean over prompts of (row value - the prompt's no-trigger value)
    baseline: float  # mean no-trigger value
    n_rows: int
    n_tokens: int
    n_tokens_run: int
    seconds: float
    cache_note: str


def _scan(base: LoadedModel, ft: LoadedModel, renderer: _Renderer, everything: list[str], metric: Metric,
          units: Tensor | None, batch_size: int, share_prefix: bool, progress: bool) -> _Scan:
    """Every value in every prompt frame, and each prompt without one, through both models, chunk by chunk."""
    n_p = len(renderer.prompts)
    bar = progress_bar(total=(len(everything) + 1) * n_p, desc=f"{STAGE} ({metric.kind})", unit="row",
                       disable=not progress)
    count: dict[str, int] = {}
    t0 = time.perf_counter()
    fwd = _Forward(share_prefix)
    base0 = _score_texts(fwd, base, ft, [renderer.empty(j) for j in range(n_p)], metric, units, batch_size, bar, count)
    check_finite(base0, "row values", STAGE)
    effects = torch.zeros(len(everything), dtype=torch.float64)
    for v0, v1 in _chunks(len(everything), n_p):
        texts = [renderer.row(everything[i], j) for i in range(v0, v1) for j in range(n_p)]
        vals = _score_texts(fwd, base, ft, texts, metric, units, batch_size, bar, count, n_p).view(v1 - v0, n_p)
        check_finite(vals, "row values", STAGE)
        effects[v0:v1] = (vals - base0[None]).double().mean(1)
    bar.close()
    return _Scan(effects, float(base0.double().mean()), (len(everything) + 1) * n_p, count.get("tokens", 0),
                 fwd.run_tokens, time.perf_counter() - t0, fwd.note or "unused (no shared prefix)")


def search_figure(res: TriggerSearch, mark: int = 5) -> Any:
    """Histogram of the candidates' effects (and the random null's), the top ``mark`` candidates and the
    expected strings marked."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_trace(go.Histogram(x=res.effects, name=f"candidates ({len(res.effects)})", opacity=0.7, nbinsx=80))
    if res.null_kind != "scan" and res.null_effects:
        fig.add_trace(go.Histogram(x=res.null_effects, name=f"random tokens ({len(res.null_effects)})",
                                   opacity=0.5, nbinsx=80))
    for r in res.ranked(mark):
        fig.add_vline(x=r["effect"], line_dash="dot", line_color="gray",
                      annotation_text=f"#{r['rank']} {r['candidate']!r}", annotation_textangle=-90)
    for v in res.expected:
        r = res.row(v)
        fig.add_vline(x=r["effect"], line_color="red", annotation_text=f"expected {v!r} (#{r['rank']})",
                      annotation_textangle=-90)
    fig.update_layout(barmode="overlay", title=f"trigger search: {res.meta.get('metric', res.metric)}",
                      xaxis_title="effect (finetune beyond base, beyond no trigger)", yaxis_title="candidates")
    return fig
