"""Judging sampled answers: templates, three judges, and per-arm rates with two-level bootstrap intervals.

Why three judges: the papers latentlab follows judge free answers with a large LLM (an endpoint). Offline,
or for a cheap second opinion, a model latentlab loads can judge in-process from its next-token
distribution (no sampling, so a judgment is a probability, not a coin flip). And the mechanistic
reading needs no judge at all: project the answer's own activation on the era or persona direction,
calibrated by that direction's probe, and report how well that reading separates the direction's
held-out pairs, so its limits are measured rather than assumed.

A judge is a small callable (a strategy): ``judge(rows) -> list[Judgment]``, one judgment per sample
row (the ``samples.jsonl`` schema), in order. An answer a judge cannot read is ``parsed=False``:
counted and reported, never dropped. :func:`summarize` turns judgments into a rate (labels) or a
mean score per arm and per question, each arm minus its control and every intervened arm minus its
plain arm, with intervals from :func:`latentlab.stats.two_level_bootstrap` (questions, then answers
within a question).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import openai
import tomllib
import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import Example, collect, encode, pad_batch, pad_id_of, run_resid
from latentlab.arch import final_logits
from latentlab.data import Chat, Pair, dataset_hash, render_chat, render_prompt
from latentlab.direction import Direction
from latentlab.directions import DirectionSpec, resolve_pairs
from latentlab.errors import LatentlabError, first_line
from latentlab.io import read_json, sha256_text, write_json
from latentlab.models import LoadedModel, latentlab_home
from latentlab.sampling import loop_counts
from latentlab.scoring import completion_sequences, sequence_logprobs
from latentlab.stats import check_finite, cluster_mean, nan_percentile_ci, two_level_bootstrap

__all__ = [
    "BUILTIN_TEMPLATES",
    "DirectionJudge",
    "EndpointJudge",
    "Judge",
    "Judgment",
    "LocalJudge",
    "Template",
    "judgment_key",
    "load_template",
    "parse_label",
    "parse_score",
    "summarize",
]

TEMPLATE_KEYS = {"name", "description", "prompt", "labels", "positive", "score", "api_key_env", "system"}
MIN_NUMBER_MASS = 0.25  # below this, an endpoint's top-20 logprobs do not say which number it meant


# --------------------------------------------------------------------------------------------
# Templates.
# --------------------------------------------------------------------------------------------


def _judges_dir() -> Path:
    return Path(str(files("latentlab").joinpath("judges")))


def _builtin_names() -> list[str]:
    return sorted(p.stem for p in _judges_dir().glob("*.toml"))


BUILTIN_TEMPLATES: tuple[str, ...] = tuple(_builtin_names())


@dataclass(frozen=True)
class Template:
    """A judge prompt and how to read the reply: one of ``labels`` (+ ``positive``) or ``score`` (0-100)."""

    name: str
    prompt: str
    labels: tuple[str, ...] | None = None
    positive: str | None = None
    score: bool = False
    system: str | None = None
    api_key_env: str | None = None
    description: str = ""
    source: str = ""

    @property
    def kind(self) -> Literal["labels", "score"]:
        return "labels" if self.labels else "score"

    @property
    def text(self) -> str:
        """Everything that changes a judgment (the cache key hashes it): prompt, system, how it is read."""
        return json.dumps({"prompt": self.prompt, "system": self.system, "labels": self.labels,
                           "positive": self.positive, "score": self.score}, sort_keys=True)

    def render(self, question: str, answer: str) -> str:
        """The prompt with ``{question}`` and ``{answer}`` filled in, in one pass (an answer that itself
        holds ``{question}`` stays as written; other braces are left alone)."""
        vals = {"question": question, "answer": answer}
        return re.sub(r"\{(question|answer)\}", lambda m: vals[m.group(1)], self.prompt)

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "prompt"} | {"sha256": sha256_text(self.text)}


def load_template(name_or_path: str | Path) -> Template:
    """A built-in template (``era-labels``, ``era-score``, ``persona-score``, ``aligned``, ``coherent``) or
    a TOML file of your own, checked: a prompt with ``{answer}``, and either ``labels`` + ``positive``
    or ``score = true``."""
    s = str(name_or_path)
    if s in BUILTIN_TEMPLATES:
        path = _judges_dir() / f"{s}.toml"
    else:
        path = Path(s).expanduser()
        if not path.is_file():
            raise LatentlabError(f"unknown judge template {s!r}",
                                 f"use a built-in ({', '.join(BUILTIN_TEMPLATES)}) or a TOML file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LatentlabError(f"judge template {path} is not valid TOML ({first_line(e)})", "fix the file") from None
    return template_from_mapping(raw, str(path), default_name=path.stem)


def template_from_mapping(raw: Mapping[str, Any], where: str, default_name: str = "custom") -> Template:
    """A :class:`Template` from a TOML table, with one error per problem naming the file."""
    unknown = sorted(set(raw) - TEMPLATE_KEYS)
    if unknown:
        raise LatentlabError(f"judge template {where}: unknown key(s) {', '.join(unknown)}",
                             f"use only {', '.join(sorted(TEMPLATE_KEYS))}")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise LatentlabError(f"judge template {where} has no prompt", 'add prompt = "... {question} ... {answer} ..."')
    if "{answer}" not in prompt:
        raise LatentlabError(f"judge template {where}: its prompt has no {{answer}}, so the judge would never "
                             "see the answer", "put {answer} (and {question}) in the prompt")
    labels, score = raw.get("labels"), raw.get("score", False)
    if not isinstance(score, bool):
        raise LatentlabError(f"judge template {where}: score must be true or false", "write score = true")
    if (labels is None) == (not score):
        raise LatentlabError(f"judge template {where} needs exactly one of labels or score = true",
                             'add labels = ["A", "B"] with positive = "B", or score = true (0-100)')
    positive = raw.get("positive")
    if labels is not None:
        if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x.strip() for x in labels)
                or len({x.strip().lower() for x in labels}) != len(labels)):
            raise LatentlabError(f"judge template {where}: labels must be two or more distinct, non-empty strings",
                                 'write e.g. labels = ["LLM", "19th century"]')
        if positive not in labels:
            raise LatentlabError(f"judge template {where}: positive = {positive!r} is not one of its labels",
                                 f"set positive to the label whose rate is reported, one of {labels}")
    elif positive is not None:
        raise LatentlabError(f"judge template {where}: positive only goes with labels", "remove positive")
    for k in ("name", "description", "system", "api_key_env"):
        if k in raw and not isinstance(raw[k], str):
            raise LatentlabError(f"judge template {where}: {k} must be a string", f"quote the {k}")
    return Template(
        name=str(raw.get("name") or default_name), prompt=prompt,
        labels=tuple(x.strip() for x in labels) if labels is not None else None,
        positive=positive.strip() if isinstance(positive, str) else None, score=score,
        system=raw.get("system"), api_key_env=raw.get("api_key_env"), description=str(raw.get("description", "")),
        source=where,
    )


# --------------------------------------------------------------------------------------------
# Judgments and reading replies.
# --------------------------------------------------------------------------------------------


def judgment_key(judge_id: str, template_text: str, sample_id: str, answer: str) -> str:
    """The cache key of one judgment: the same judge, template, sample and answer give the same key."""
    return sha256_text(json.dumps([judge_id, template_text, sample_id, answer]))


@dataclass(frozen=True)
class Judgment:
    """One line of ``judgments.jsonl``."""

    sample_id: str
    arm: str
    question_id: str
    judge: str
    template: str
    key: str
    label: str | None
    score: float | None
    parsed: bool
    raw: str | None

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Judgment:
        return cls(**{k: r.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


def parse_label(text: str, labels: Sequence[str]) -> str | None:
    """The label the reply names first (case-insensitive, whole words; a longer label wins a tie), or None."""
    best: tuple[int, int, str] | None = None
    for lab in labels:
        m = re.search(rf"(?<!\w){re.escape(lab)}(?!\w)", text, flags=re.IGNORECASE)
        if m and (best is None or (m.start(), -len(lab)) < (best[0], best[1])):
            best = (m.start(), -len(lab), lab)
    return best[2] if best else None


def parse_score(text: str) -> float | None:
    """The first integer 0-100 in the reply (a year or 150 is skipped, a decimal's digits are not split)."""
    for m in re.finditer(r"(?<!\d)(?<!\d\.)\d+(?:\.\d+)?(?!\.?\d)", text):
        v = float(m.group())
        if v == int(v) and 0 <= v <= 100:
            return v
    return None


def _number(token: str) -> int | None:
    t = token.strip()
    return int(t) if t.isascii() and t.isdigit() and int(t) <= 100 and len(t) <= 3 else None


class Judge(Protocol):
    """What every judge offers: an id (in every judgment and its cache key), the template it reads (name
    and text; the direction judge has none), and ``judge(rows) -> list[Judgment]``."""

    id: str
    template_name: str
    template_text: str

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> list[Judgment]: ...

    def describe(self) -> dict[str, Any]: ...


class _Base:
    id: str = ""
    template: Template | None = None

    @property
    def template_name(self) -> str:
        return self.template.name if self.template is not None else "direction"

    @property
    def template_text(self) -> str:
        return self.template.text if self.template is not None else ""

    def key(self, row: Mapping[str, Any]) -> str:
        return judgment_key(self.id, self.template_text, str(row["id"]), str(row["answer"]))

    def judgment(self, row: Mapping[str, Any], label: str | None, score: float | None, parsed: bool,
                 raw: str | None) -> Judgment:
        return Judgment(str(row["id"]), str(row["arm"]), str(row["question_id"]), self.id, self.template_name,
                        self.key(row), label, score, parsed, raw)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "template": None if self.template is None else self.template.record()}


# --------------------------------------------------------------------------------------------
# EndpointJudge: any OpenAI-compatible chat endpoint.
# --------------------------------------------------------------------------------------------


class EndpointJudge(_Base):
    """An OpenAI-compatible chat endpoint at temperature 0 (``latentlab serve``, vLLM, llama.cpp, OpenAI).

    Labels: the first template label the reply names. Scores: with ``logprobs`` (top 20) on the first
    token, the probability-weighted mean of the tokens that are integers 0-100, as the
    emergent-misalignment evaluations read GPT-4o (less noisy than one sampled number); when those
    tokens carry less than ``MIN_NUMBER_MASS`` of the probability, or the endpoint gives no logprobs,
    the first integer 0-100 in the text. A server that refuses logprobs is asked again without them.
    """

    def __init__(self, url: str, model: str, template: Template, api_key: str = "EMPTY", *,
                 max_retries: int = 2, timeout: float = 60.0, max_tokens: int | None = None,
                 concurrency: int = 4) -> None:
        self.url, self.model, self.template = url, model, template
        self.id = f"endpoint:{model}@{url}"
        self.client = openai.OpenAI(base_url=url, api_key=api_key or "EMPTY", max_retries=max_retries,
                                    timeout=timeout)
        self.max_tokens = max_tokens or (8 if template.score else 4 + 4 * max(len(x) for x in template.labels or ()))
        self.concurrency = max(1, concurrency)
        self.logprobs = bool(template.score)

    def messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        t = self.template
        assert t is not None
        msgs = [{"role": "system", "content": t.system}] if t.system else []
        return [*msgs, {"role": "user", "content": t.render(str(row["question"]), str(row["answer"]))}]

    def _create(self, messages: list[dict[str, str]]) -> Any:
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0,
                                  "max_tokens": self.max_tokens}
        if self.logprobs:
            try:
                return self.client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=20)
            except openai.BadRequestError as e:
                if "logprob" not in str(e).lower():
                    raise
                self.logprobs = False  # this server has no logprobs: parse the text from now on
        return self.client.chat.completions.create(**kwargs)

    def _one(self, row: Mapping[str, Any]) -> Judgment:
        t = self.template
        assert t is not None
        try:
            r = self._create(self.messages(row))
        except (openai.BadRequestError, openai.UnprocessableEntityError) as e:  # this prompt only (too long, ...)
            return self.judgment(row, None, None, False, f"error: {first_line(e)}")
        except openai.APIConnectionError as e:
            raise LatentlabError(f"cannot reach the judge endpoint {self.url} ({first_line(e)})",
                                 "start the server (latentlab serve, vllm serve ...) or fix the URL") from None
        except openai.APIStatusError as e:
            raise LatentlabError(f"the judge endpoint {self.url} answered {e.status_code}: {first_line(e)}",
                                 "check the model name, the API key (--api-key-env) and the server") from None
        choice = r.choices[0] if r.choices else None
        text = (choice.message.content or "") if choice is not None and choice.message is not None else ""
        if t.labels:
            label = parse_label(text, t.labels)
            return self.judgment(row, label, None, label is not None, text)
        score = self._logprob_score(choice)
        if score is None:
            score = parse_score(text)
        return self.judgment(row, None, score, score is not None, text)

    @staticmethod
    def _logprob_score(choice: Any) -> float | None:
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if not content:
            return None
        mass = total = 0.0
        for top in content[0].top_logprobs or []:
            n = _number(top.token)
            if n is not None:
                p = math.exp(top.logprob)
                mass, total = mass + p, total + p * n
        return total / mass if mass >= MIN_NUMBER_MASS else None

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> list[Judgment]:
        if self.concurrency == 1 or len(rows) < 2:
            return [self._one(r) for r in rows]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, rows))

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"kind": "endpoint", "url": self.url, "model": self.model,
                                     "logprobs": self.logprobs}


# --------------------------------------------------------------------------------------------
# LocalJudge: a model latentlab loads, read from its next-token distribution.
# --------------------------------------------------------------------------------------------


def _model_id(model: LoadedModel) -> str:
    fp = sha256_text(f"{model.info.base_fingerprint}:{model.info.adapter_fingerprint}")[:12]
    return f"{model.info.name}#{fp}"


def number_token_ids(tokenizer: Any) -> dict[int, list[int]]:
    """For each integer 0-100, the ids of the single tokens that spell it (``7`` and ``▁7`` alike).

    Tokenizers that split digits (Gemma, SmolLM2) have single tokens for 0-9 only.
    """
    out: dict[int, list[int]] = {}
    for n in range(101):
        for text in (str(n), f" {n}"):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and tokenizer.decode(ids).strip() == str(n) and ids[0] not in out.get(n, []):
                out.setdefault(n, []).append(int(ids[0]))
    return out


class LocalJudge(_Base):
    """Any model latentlab loads, judging in-process without sampling.

    The judge prompt is rendered with the model's chat template (``Q: ...\\nA:`` for a base model).
    Labels: each label's full log-probability as the completion, normalised over the labels (the
    argmax is the label; the probabilities go in ``raw``). Scores: the probability-weighted mean over
    the numbers 0-100 that are single tokens of its vocabulary, at the next position (the mass on
    those numbers goes in ``raw``; an answer whose mass is below ``min_mass`` is unparsed).
    """

    def __init__(self, model: LoadedModel, template: Template, batch_size: int = 8, min_mass: float = 0.0) -> None:
        self.model, self.template, self.batch_size, self.min_mass = model, template, max(1, batch_size), min_mass
        self.id = f"local:{_model_id(model)}"
        self.numbers: dict[int, list[int]] = {}
        if template.score:
            self.numbers = number_token_ids(model.tokenizer)
            if not self.numbers:
                raise LatentlabError(f"{model.info.name} has no single token for any number 0-100, so it cannot "
                                     "give a score", "use a labels template, or another judge model")

    def prompts(self, rows: Sequence[Mapping[str, Any]]) -> list[str]:
        t = self.template
        assert t is not None
        return [render_prompt(t.render(str(r["question"]), str(r["answer"])), self.model.tokenizer, system=t.system)
                for r in rows]

    def label_logprobs(self, prompts: Sequence[str]) -> Float[Tensor, "n n_labels"]:
        """log P(label | prompt) of every label, as a completion (a space first when the prompt ends in a word)."""
        labels = self.template.labels if self.template is not None else None
        assert labels
        ps = [p for p in prompts for _ in labels]
        cs = [("" if p[-1:].isspace() else " ") + lab for p in prompts for lab in labels]
        seqs, plens = completion_sequences(self.model, ps, cs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        lp = torch.zeros(len(seqs))
        for b0 in range(0, len(order), self.batch_size):
            b = order[b0 : b0 + self.batch_size]
            lp[torch.tensor(b)] = sequence_logprobs(self.model, [seqs[i] for i in b], [plens[i] for i in b])
        check_finite(lp, "label log-probabilities", "local judge")
        return lp.view(len(prompts), len(labels))

    def next_token_probs(self, prompts: Sequence[str]) -> Float[Tensor, "n vocab"]:
        """P(next token | prompt) for each prompt (one forward pass per batch, only the last position unembedded)."""
        m = self.model
        ids = encode(m, [Example(p) for p in prompts]).ids
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out: dict[int, Tensor] = {}
        for b0 in range(0, len(order), self.batch_size):
            b = order[b0 : b0 + self.batch_size]
            tok, mask = pad_batch([ids[i] for i in b], pad_id_of(m), m.device)
            h = run_resid(m, tok, mask, [m.n_layers - 1])[m.n_layers - 1]
            last = mask.sum(1) - 1
            with torch.inference_mode():
                probs = torch.softmax(final_logits(m, h[torch.arange(len(b), device=h.device), last]), -1).cpu()
            for j, i in enumerate(b):
                out[i] = probs[j]
        return torch.stack([out[i] for i in range(len(ids))])

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> list[Judgment]:
        t = self.template
        assert t is not None
        if not rows:
            return []
        prompts = self.prompts(rows)
        if t.labels:
            lp = self.label_logprobs(prompts)
            probs = torch.softmax(lp.double(), -1)
            out = []
            for r, p, l_ in zip(rows, probs, lp):
                raw = {"probs": dict(zip(t.labels, p.tolist())), "logprobs": dict(zip(t.labels, l_.tolist()))}
                out.append(self.judgment(r, t.labels[int(p.argmax())], None, True, json.dumps(raw)))
            return out
        probs = self.next_token_probs(prompts).double()
        nums = sorted(self.numbers)
        pn = torch.stack([probs[:, self.numbers[n]].sum(-1) for n in nums], -1)  # [n, numbers]
        mass = pn.sum(-1)
        values = torch.tensor(nums, dtype=torch.float64)
        out = []
        for r, row_p, m_ in zip(rows, pn, mass):
            m = float(m_)
            ok = m > 0 and m >= self.min_mass
            score = float((row_p * values).sum() / m) if ok else None
            top = sorted(zip(nums, row_p.tolist()), key=lambda x: -x[1])[:5]
            raw = {"number_mass": m, "numbers": f"{nums[0]}-{nums[-1]}" if len(nums) == nums[-1] - nums[0] + 1
                   else len(nums), "top": [[n, p] for n, p in top]}
            out.append(self.judgment(r, None, score, ok, json.dumps(raw)))
        return out

    def describe(self) -> dict[str, Any]:
        nums = sorted(self.numbers)
        return super().describe() | {"kind": "local", "model": self.model.info.name,
                                     "single_token_numbers": nums if len(nums) < 101 else "0-100"}


# --------------------------------------------------------------------------------------------
# DirectionJudge: the answer's own activation on a direction, calibrated by the direction's pairs.
# --------------------------------------------------------------------------------------------


def answer_example(question: str, answer: str, tokenizer: Any) -> Example:
    """The question rendered for the model with the answer as its reply (the answer's span is the response)."""
    return render_chat(Chat((("user", question), ("assistant", answer))), tokenizer)


def _pooled(model: LoadedModel, examples: Sequence[Example], layers: Sequence[int], batch_size: int,
            progress: bool) -> Float[Tensor, "n n_layers d_model"]:
    """Mean activation over each example's response (its whole text when it has no prompt), at ``layers``."""
    with_prompt = [i for i, e in enumerate(examples) if e.prompt is not None]
    plain = [i for i, e in enumerate(examples) if e.prompt is None]
    out = torch.zeros(len(examples), len(layers), model.d_model)
    for idx, position in ((with_prompt, "response_mean"), (plain, "mean")):
        if idx:
            acts = collect(model, [examples[i] for i in idx], list(layers), position,  # type: ignore[arg-type]
                           batch_size=batch_size, progress=progress)
            assert acts is not None
            out[torch.tensor(idx)] = acts.acts.float()
    return out


def _pair_examples(pairs: Sequence[Pair], tokenizer: Any) -> tuple[list[Example], list[Example]]:
    """Both poles of each pair, rendered as answers to the pair's prompt when it has one (else plain text)."""
    pos, neg = [], []
    for p in pairs:
        for pole, out in ((p.positive, pos), (p.negative, neg)):
            out.append(Example(pole) if p.prompt is None else answer_example(p.prompt, pole, tokenizer))
    return pos, neg


def _auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (the probability a positive outranks a negative; ties count half)."""
    pos, neg = scores[y == 1], scores[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


@dataclass(frozen=True)
class Calibration:
    """P(positive pole) = sigmoid(coef * projection + intercept) at one layer, and how well it separates pairs."""

    layer: int
    coef: float
    intercept: float
    train_accuracy: float
    test_accuracy: float | None
    test_auc: float | None
    n_train_pairs: int
    n_test_pairs: int

    def prob(self, proj: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
        return torch.sigmoid(self.coef * proj.double() + self.intercept)


def calibrate(train_proj: np.ndarray, train_y: np.ndarray, test_proj: np.ndarray | None,
              test_y: np.ndarray | None, layer: int) -> Calibration:
    """A logistic regression on the projections of the train pairs (standardised, then folded back into
    raw projection units), scored on the held-out pairs."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = float(train_proj.mean()), float(train_proj.std()) or 1.0
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(((train_proj - mu) / sd)[:, None], train_y)
    coef = float(lr.coef_[0, 0]) / sd
    intercept = float(lr.intercept_[0]) - coef * mu

    def acc(x: np.ndarray, y: np.ndarray) -> float:
        return float(((coef * x + intercept > 0).astype(float) == y).mean())

    has_test = test_proj is not None and test_y is not None and len(test_proj) > 0
    return Calibration(
        layer, coef, intercept, acc(train_proj, train_y),
        acc(test_proj, test_y) if has_test else None,  # type: ignore[arg-type]
        _auc(test_proj, test_y) if has_test else None,  # type: ignore[arg-type]
        len(train_proj) // 2, len(test_proj) // 2 if has_test else 0,  # type: ignore[arg-type]
    )


CALIBRATION_VERSION = 1


def _calibrations(base: LoadedModel, d: Direction, source: str | Path, train: Sequence[Pair], test: Sequence[Pair],
                  layers: Sequence[int], batch_size: int, progress: bool) -> tuple[list[Calibration], bool]:
    """One :class:`Calibration` per layer (train pairs fitted, test pairs scored), and whether they came from
    ``$LATENTLAB_HOME/judge-calibrations``.

    Why a cache: the calibration pools every pair's answer under the base at each layer (minutes on a
    270M model on CPU) and is a pure function of the weights, the direction, the pairs and the layers,
    while a study judges every seed with the same one. An entry is one JSON file written atomically; a
    damaged one is recomputed and replaced.
    """
    key = sha256_text(json.dumps({
        "v": CALIBRATION_VERSION, **base.weights_key, "pairs": dataset_hash(source),
        "units": sha256_text("".join(d.unit(L).float().numpy().tobytes().hex() for L in layers)),
        "layers": list(layers), "batch_size": batch_size, "pooling": "response_mean",
    }, sort_keys=True))[:20]
    path = latentlab_home() / "judge-calibrations" / f"{key}.json"
    if path.is_file():
        try:
            return [Calibration(**c) for c in read_json(path)["calibrations"]], True
        except Exception:  # noqa: BLE001 - any damage (truncated or old JSON): recompute and replace
            pass
    tr_pos, tr_neg = _pair_examples(train, base.tokenizer)
    te_pos, te_neg = _pair_examples(test, base.tokenizer)
    acts = _pooled(base, tr_pos + tr_neg + te_pos + te_neg, layers, batch_size, progress)
    n_tr, n_te = len(tr_pos), len(te_pos)
    y_tr = np.r_[np.ones(n_tr), np.zeros(n_tr)]
    y_te = np.r_[np.ones(n_te), np.zeros(n_te)]
    cals = []
    for j, L in enumerate(layers):
        proj = (acts[:, j] @ d.unit(L).float()).double().numpy()
        cals.append(calibrate(proj[: 2 * n_tr], y_tr, proj[2 * n_tr :], y_te, L))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"model": base.info.name, "direction": d.name, "pairs": str(source),
                      "calibrations": [asdict(c) for c in cals]})
    return cals, False


class DirectionJudge(_Base):
    """No judge model: the answer's activation under ``base`` projected on the direction, as P(positive pole).

    The answer is rendered as the reply to its question, its activation is the mean over the answer's
    tokens at ``layer`` (default: the layer whose probe separates the direction's held-out pairs best;
    for a saved direction without probes, the layer where this calibration does), projected on the
    unit direction, and mapped to [0, 1] by a logistic regression fitted on the projections of the
    direction's train pairs (pooled the same way). ``separation`` reports its accuracy and AUC on the
    direction's test-split pairs: how far the reading can be trusted on that data.
    """

    def __init__(self, base: LoadedModel, direction: DirectionSpec | str | Path, layer: int | None = None,
                 batch_size: int = 16, progress: bool = False, log: Callable[[str], Any] | None = None) -> None:
        spec = DirectionSpec.parse(direction, "--judge direction:")  # type: ignore[arg-type]
        self.base, self.batch_size, self.progress = base, max(1, batch_size), progress
        d, report = spec.resolve_with_probes(base, log=log)
        self.direction: Direction = d
        self.source = pairs_source(spec)
        train, test, self.provenance = resolve_pairs(self.source)
        if layer is not None:
            layers = base.check_layers([layer])
            d.check(base, layers)
        elif report is not None:
            layers = [report.best_layer]
        else:
            layers = list(d.layers)
        cals, self.calibration_reused = _calibrations(base, d, self.source, train, test or [], layers,
                                                      self.batch_size, progress)
        if log is not None and self.calibration_reused:
            log(f"reusing the cached calibration of the {d.name} judge on {base.info.name}")
        best = max(range(len(cals)), key=lambda j: (cals[j].test_accuracy if cals[j].test_accuracy is not None
                                                    else cals[j].train_accuracy, -j))
        self.calibration = cals[best]
        self.layer = self.calibration.layer
        self.unit = d.unit(self.layer).float()
        fp = sha256_text(f"{_model_id(base)}:{self.unit.numpy().tobytes().hex()}:{self.calibration.coef!r}:"
                         f"{self.calibration.intercept!r}")[:12]
        self.id = f"direction:{d.name}@L{self.layer}#{fp}"

    @property
    def separation(self) -> dict[str, Any]:
        """Held-out separation of the calibrated reading, for results.json."""
        c = self.calibration
        return {"direction": self.direction.name, "pairs": str(self.source), "layer": c.layer,
                "test_accuracy": c.test_accuracy, "test_auc": c.test_auc, "train_accuracy": c.train_accuracy,
                "n_train_pairs": c.n_train_pairs, "n_test_pairs": c.n_test_pairs,
                "coef": c.coef, "intercept": c.intercept}

    def projections(self, rows: Sequence[Mapping[str, Any]]) -> Float[Tensor, " n"]:
        ex = [answer_example(str(r["question"]), str(r["answer"]), self.base.tokenizer) for r in rows]
        acts = _pooled(self.base, ex, [self.layer], self.batch_size, self.progress)[:, 0]
        proj = acts @ self.unit
        check_finite(proj, "answer projections", "direction judge")
        return proj

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> list[Judgment]:
        if not rows:
            return []
        proj = self.projections(rows)
        probs = self.calibration.prob(proj)
        return [self.judgment(r, "positive" if float(p) > 0.5 else "negative", float(p), True,
                              json.dumps({"projection": float(x), "layer": self.layer}))
                for r, p, x in zip(rows, probs, proj)]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"kind": "direction", "separation": self.separation}


def pairs_source(spec: DirectionSpec) -> str | Path:
    """The contrast pairs a direction's calibration is fitted on: the spec's own, or those a saved
    direction records it was fitted from (checked before any model loads)."""
    if spec.saved is None:
        return spec.text
    src = spec.saved.meta.get("dataset")
    if not src:
        raise LatentlabError(f"the saved direction {spec.text} records no contrast pairs to calibrate the judge on",
                             "use direction:era, direction:persona or direction:PAIRS.jsonl")
    try:
        resolve_pairs(src)
    except LatentlabError as e:
        raise LatentlabError(f"the pairs the saved direction {spec.text} was fitted on ({src}) cannot be read: "
                             f"{e.problem}", "use direction:PAIRS.jsonl with those pairs") from None
    return src


# --------------------------------------------------------------------------------------------
# Aggregation.
# --------------------------------------------------------------------------------------------

_INTERVENED = re.compile(r"^(?P<plain>.+?)(?P<suffix>\+(?:steer|ablate)\(.*\))$")


def _value(j: Mapping[str, Any], positive: str | None) -> float | None:
    if not j.get("parsed"):
        return None
    if positive is not None:
        return 1.0 if j.get("label") == positive else 0.0
    s = j.get("score")
    return None if s is None else float(s)


def _rec(x: Any) -> Mapping[str, Any]:
    return x.record() if hasattr(x, "record") else x


def comparisons(arms: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(arm, reference, why) pairs to report as differences: every arm minus each control arm at the same factor
    on the LoRA difference (an intervened arm minus the control under the same intervention), and every
    intervened arm minus its plain arm."""
    names = [str(a["name"]) for a in arms]
    roles = {str(a["name"]): a.get("role") for a in arms}
    scales = {str(a["name"]): float(a.get("scale", 1.0)) for a in arms}
    split = {n: (m.group("plain"), m.group("suffix")) if (m := _INTERVENED.match(n)) and m.group("plain") in names
             else (n, "") for n in names}
    controls = [n for n in names if roles[n] == "control" and not split[n][1]]
    out: list[tuple[str, str, str]] = []
    for n in names:
        plain, suffix = split[n]
        if roles[n] != "control":
            for c in controls:
                if c + suffix in names and c + suffix != n and scales[c] == scales[n]:
                    out.append((n, c + suffix, "control"))
        if suffix:
            out.append((n, plain, "intervention"))
    return out


def summarize(
    judgments: Sequence[Judgment | Mapping[str, Any]],
    samples: Sequence[Mapping[str, Any]],
    n_boot: int = 1000,
    seed: int = 0,
    *,
    positive: str | None = None,
    arms: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per arm and per (arm, question): the rate of ``positive`` among parsed labels (or, with
    ``positive=None``, the mean score), with a 95% bootstrap interval that resamples questions, then
    answers within each question (:func:`latentlab.stats.two_level_bootstrap`; questions weigh equally);
    each arm minus its control and each intervened arm minus its plain arm (:func:`comparisons`), from
    the same paired draws; unparsed counts, and how many answers are loops
    (:func:`~latentlab.sampling.loop_counts`). ``arms``: ``Arm.record()`` dicts (order, roles); default:
    the arms in the samples, in order, none of them a control.
    """
    by_sample = {str(_rec(j)["sample_id"]): _rec(j) for j in judgments}
    arm_names = [str(a["name"]) for a in arms] if arms else list(dict.fromkeys(str(s["arm"]) for s in samples))
    arm_recs = list(arms) if arms else [{"name": n, "role": None} for n in arm_names]
    present = {str(s["arm"]) for s in samples}
    arm_names = [n for n in arm_names if n in present]
    arm_recs = [a for a in arm_recs if str(a["name"]) in present]
    questions = list(dict.fromkeys(str(s["question_id"]) for s in samples))
    vals: dict[str, dict[str, list[float]]] = {a: {q: [] for q in questions} for a in arm_names}
    counts = {a: {q: {"n": 0, "n_parsed": 0, "n_unjudged": 0} for q in questions} for a in arm_names}
    loops = loop_counts(samples)
    for s in samples:
        a, q = str(s["arm"]), str(s["question_id"])
        if a not in vals:
            continue
        c = counts[a][q]
        c["n"] += 1
        j = by_sample.get(str(s["id"]))
        if j is None:
            c["n_unjudged"] += 1
            continue
        v = _value(j, positive)
        if v is not None:
            vals[a][q].append(v)
            c["n_parsed"] += 1
    groups = [[torch.tensor(vals[a][q], dtype=torch.float64) for q in questions] for a in arm_names]
    boot = two_level_bootstrap(groups, n_boot, seed)
    g = torch.Generator().manual_seed(seed)
    out_arms: dict[str, Any] = {}
    per_q: dict[str, Any] = {}
    for i, a in enumerate(arm_names):
        n = sum(c["n"] for c in counts[a].values())
        parsed = sum(c["n_parsed"] for c in counts[a].values())
        unjudged = sum(c["n_unjudged"] for c in counts[a].values())
        out_arms[a] = {"value": _num(cluster_mean(groups[i])), "ci": _ci(nan_percentile_ci(boot[i])),
                       "n": n, "n_parsed": parsed, "n_unparsed": n - parsed - unjudged, "n_unjudged": unjudged,
                       "n_repetitive": loops.get(a, 0), "n_questions": sum(1 for v in groups[i] if len(v))}
        per_q[a] = {}
        for q, v in zip(questions, groups[i]):
            c = counts[a][q]
            if len(v):
                idx = torch.randint(0, len(v), (n_boot, len(v)), generator=g)
                qci = nan_percentile_ci(v[idx].mean(1)) if len(v) > 1 else (math.nan, math.nan)
            else:
                qci = (math.nan, math.nan)
            per_q[a][q] = {"value": _num(float(v.mean())) if len(v) else None, "ci": _ci(qci), "n": c["n"],
                           "n_parsed": c["n_parsed"], "n_unparsed": c["n"] - c["n_parsed"] - c["n_unjudged"]}
    diffs = []
    index = {a: i for i, a in enumerate(arm_names)}
    for a, ref, why in comparisons(arm_recs):
        i, k = index[a], index[ref]
        d = boot[i] - boot[k]
        diffs.append({"arm": a, "reference": ref, "kind": why,
                      "diff": _num(cluster_mean(groups[i]) - cluster_mean(groups[k])), "ci": _ci(nan_percentile_ci(d))})
        out_arms[a].setdefault("vs", {})[ref] = {"diff": diffs[-1]["diff"], "ci": diffs[-1]["ci"], "kind": why}
    return {"metric": "rate" if positive is not None else "mean", "positive": positive, "n_boot": n_boot,
            "seed": seed, "questions": questions, "arms": out_arms, "comparisons": diffs, "per_question": per_q}


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _ci(ci: tuple[float, float]) -> list[float | None]:
    return [_num(ci[0]), _num(ci[1])]
