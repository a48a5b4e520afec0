"""Directions in the residual stream: difference of means (or PCA of paired differences) per layer.

A :class:`Direction` keeps the raw per-layer vectors *and* the typical residual norm at each layer,
because steering must be scaled by that norm (Gemma's residual norms are in the thousands: a raw
unit vector does nothing, a raw difference vector is arbitrary).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import ActivationSet, collect
from latentlab.config import check_direction_spec
from latentlab.data import Pair, dataset_hash, load_pairs, pair_examples
from latentlab.direction import Direction
from latentlab.errors import LatentlabError
from latentlab.io import make_temp_dir, replace_dir, sha256_text, write_json
from latentlab.models import LoadedModel, latentlab_home
from latentlab.probes import ProbeReport, fit_probes
from latentlab.stats import norm_matched

Method = Literal["mean_diff", "pca"]


def fit_direction(
    positive: ActivationSet,
    negative: ActivationSet,
    method: Method = "mean_diff",
    name: str = "direction",
) -> Direction:
    """Fit a direction from matched activations of the two poles.

    ``pca``: the first right singular vector of the *uncentred* paired differences, signed to agree
    with the mean difference and scaled to its length. Uncentred on purpose: centring would remove
    the mean shift, which is the signal.
    """
    if positive.layers != negative.layers or positive.position != negative.position:
        raise LatentlabError("positive and negative activations differ in layers or position", "collect both alike")
    if positive.offsets is not None:
        raise LatentlabError("directions need one vector per example", "collect with position last/mean")
    if len(positive) == 0 or len(negative) == 0:
        raise LatentlabError("no examples to fit a direction on", "pass at least one pair")
    pos, neg = positive.acts.float(), negative.acts.float()
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise LatentlabError("activations contain NaN or inf", "check the model dtype (try --dtype float32)")
    mean_diff = pos.mean(0) - neg.mean(0)  # [layers, d]
    if method == "mean_diff":
        vectors = mean_diff
    elif method == "pca":
        if len(positive) != len(negative):
            raise LatentlabError("PCA of paired differences needs matched pairs", "use --method mean_diff")
        diffs = (pos - neg).transpose(0, 1)  # [layers, n, d]
        _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
        pc = vh[:, 0, :]
        sign = torch.sign((pc * mean_diff).sum(-1, keepdim=True)).clamp(min=0) * 2 - 1
        vectors = pc * sign * mean_diff.norm(dim=-1, keepdim=True)
    else:
        raise LatentlabError(f"unknown method {method!r}", "use mean_diff or pca")
    resid_norms = torch.cat([pos, neg]).norm(dim=-1).mean(0)
    meta = {
        "n_positive": len(positive),
        "n_negative": len(negative),
        "model": positive.meta.get("model"),
        "base_fingerprint": positive.meta.get("base_fingerprint"),
        "adapter_fingerprint": positive.meta.get("adapter_fingerprint"),
    }
    return Direction(vectors, list(positive.layers), resid_norms, name, positive.position, method, meta)


def collect_pairs(
    model: LoadedModel,
    pairs: Sequence[Pair],
    layers: Sequence[int] | str | None = "all",
    position: str = "last",
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[ActivationSet, ActivationSet]:
    """Activations of both poles of each pair (rendered for this model)."""
    if not pairs:
        raise LatentlabError("no contrast pairs", "pass a file with at least one pair")
    pos, neg = pair_examples(pairs, model.tokenizer)
    if position == "last" and pairs[0].prompt is not None:
        position = "response_mean"  # answers to a prompt: the answer carries the persona
    a = collect(model, pos, layers, position, batch_size=batch_size, progress=progress)
    b = collect(model, neg, layers, position, batch_size=batch_size, progress=progress)
    return a, b


def find_direction(
    model: LoadedModel,
    pairs: str | Path | Sequence[Pair] = "era",
    layers: Sequence[int] | str | None = "all",
    position: str = "last",
    method: Method = "mean_diff",
    split: str | None = "train",
    name: str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Direction:
    """Collect activations for contrast pairs and fit a direction (one call for notebooks)."""
    meta: dict[str, Any] = {}
    if isinstance(pairs, (str, Path)):
        name = name or source_name(pairs)
        if split == "train":
            pairs, _, meta = resolve_pairs(pairs)
        else:
            meta = {"dataset": str(pairs), "dataset_hash": dataset_hash(pairs)}
            pairs = load_pairs(pairs, split=split)
        meta["split"] = split
    a, b = collect_pairs(model, list(pairs), layers, position, batch_size, progress)
    d = fit_direction(a, b, method, name or "direction")
    d.meta.update(meta)
    return d


def random_directions(like: Direction, n: int, seed: int = 0) -> Float[Tensor, "n n_layers d_model"]:
    """``n`` random Gaussian directions per layer, norm-matched to ``like``'s vectors (seeded)."""
    return norm_matched(like.vectors, n, seed)


def source_name(source: str | Path) -> str:
    """A direction's name from its source: the built-in name, or the file's stem."""
    return source if isinstance(source, str) and "/" not in source else Path(source).stem


def resolve_pairs(source: str | Path) -> tuple[list[Pair], list[Pair] | None, dict[str, Any]]:
    """(train pairs, held-out pairs or None, provenance) for a built-in name or a JSONL path."""
    all_pairs = load_pairs(source)
    train = [p for p in all_pairs if p.split != "test"]
    test = [p for p in all_pairs if p.split == "test"] or None
    if not train:
        raise LatentlabError(f"{source} has no training pairs (all are split=test)", "mark some pairs split=train")
    return (
        train,
        test,
        {
            "dataset": str(source),
            "dataset_hash": dataset_hash(source),
            "n_train_pairs": len(train),
            "n_test_pairs": len(test or []),
        },
    )


def direction_and_probes(
    model: LoadedModel,
    source: str | Path,
    layers: Sequence[int] | str | None = "all",
    position: str = "last",
    method: Method = "mean_diff",
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[Direction, Any]:
    """Fit the direction on the train split and per-layer probes (CV + held-out test split) from one collection."""

    train, test, prov = resolve_pairs(source)
    tp, tn = collect_pairs(model, train, layers, position, batch_size, progress)
    direction = fit_direction(tp, tn, method, name=source_name(source))
    direction.meta.update(prov)
    hp = hn = None
    if test:
        hp, hn = collect_pairs(model, test, layers, position, batch_size, progress)
    report = fit_probes(tp, tn, hp, hn)
    report.meta.update(prov)
    return direction, report


# --------------------------------------------------------------------------------------------
# The fit cache, and the one way a --direction value becomes a Direction.
# --------------------------------------------------------------------------------------------

CACHE_VERSION = 1


def cache_key(model: LoadedModel, source: str | Path, layers: Sequence[int], position: str, method: str) -> str:
    """The fit's identity: same weights, data and options give the same direction and probes."""
    parts = {"v": CACHE_VERSION, **model.weights_key, "data": dataset_hash(source), "layers": list(layers),
             "position": position, "method": method}
    return sha256_text(json.dumps(parts, sort_keys=True))[:20]


def fitted_direction(
    model: LoadedModel,
    source: str | Path,
    layers: Sequence[int] | str | None = "all",
    position: str = "last",
    method: Method = "mean_diff",
    refit: bool = False,
    progress: bool = True,
) -> tuple[Direction, ProbeReport, bool]:
    """(direction, probes, reused?) for :func:`direction_and_probes`, from ``$LATENTLAB_HOME/directions``
    when this exact fit was done before (``refit=True`` fits again and replaces the entry).

    Why a cache: a fit is a pure function of the weights, the data and the options, and refitting
    on every run costs seconds on 270M and minutes of GPU time on 32B. An entry is a folder written
    whole and renamed into place; a damaged one is refitted.
    """
    layer_list = model.check_layers(layers)
    key = cache_key(model, source, layer_list, position, method)
    folder = latentlab_home() / "directions" / key
    if not refit and (folder / "done.json").exists():
        try:
            return Direction.load(folder / "direction"), ProbeReport.load(folder / "probes"), True
        except Exception:  # noqa: BLE001 - any damage (truncated safetensors, bad JSON): refit and replace
            pass
    d, report = direction_and_probes(model, source, layer_list, position, method, progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(folder.parent, f".{key}.tmp-")
    d.save(tmp / "direction")
    report.save(tmp / "probes")
    write_json(tmp / "done.json", {"model": model.info.name, "source": str(source), "key": key})
    replace_dir(tmp, folder)
    return d, report, False


def clear_cache(what: str = "directions") -> int:
    """Remove cached fits; returns how many entries were removed."""
    root = latentlab_home() / what
    if not root.exists():
        return 0
    entries = [p for p in root.iterdir() if p.is_dir()]
    for p in entries:
        shutil.rmtree(p, ignore_errors=True)
    return len(entries)


@dataclass(frozen=True)
class DirectionSpec:
    """A ``--direction`` value: parsed when a config is built, resolved on a model at run time.

    Parsing reads what can be read without a model (a saved direction is loaded and validated, a
    pair file is read), so a bad name or file fails before any model loads. Resolving returns the
    saved direction checked against the model, or fits the pair source on every layer through the
    fit cache (:func:`fitted_direction`). This is the one way every command gets its direction.
    """

    text: str
    saved: Direction | None = None

    @classmethod
    def parse(cls, spec: str | Path | Direction | DirectionSpec, flag: str = "--direction") -> DirectionSpec:
        if isinstance(spec, DirectionSpec):
            return spec
        if isinstance(spec, Direction):
            return cls(spec.name, spec.validate())
        s = str(spec)
        if Path(s).is_dir() and (Path(s) / "direction.safetensors").is_file():
            return cls(s, Direction.load(s))
        check_direction_spec(s, flag)
        if Path(s).suffix == ".safetensors":
            return cls(s, Direction.load(s))
        resolve_pairs(s)
        return cls(s)

    @property
    def name(self) -> str:
        """The direction's name: a saved one's own, or the source's (``era``, a file's stem)."""
        return self.saved.name if self.saved is not None else source_name(self.text)

    def resolve_with_probes(
        self, model: LoadedModel, *, refit: bool = False, log: Callable[[str], Any] | None = None
    ) -> tuple[Direction, ProbeReport | None]:
        """(direction, probes or None for a saved one) usable on ``model``; says whether a fit was reused."""
        if self.saved is not None:
            return self.saved.check(model, self.saved.layers), None
        d, report, reused = fitted_direction(model, self.text, "all", refit=refit)
        d.meta["reused_from_cache"] = reused
        (log or _stderr)(describe_fit(reused, d.name, model))
        return d, report

    def resolve(self, model: LoadedModel, *, refit: bool = False, out: Path | None = None,
                log: Callable[[str], Any] | None = None) -> Direction:
        """The direction on ``model``; with ``out``, a fitted one is saved into that run folder too,
        so the run is self-contained."""
        d, _ = self.resolve_with_probes(model, refit=refit, log=log)
        if out is not None and self.saved is None:
            d.save(Path(out) / f"direction-{d.name}")
        return d


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def describe_fit(reused: bool, name: str, model: Any) -> str:
    """The one line a command prints so the user knows whether work was redone."""
    if reused:
        return f"reusing the cached {name} direction and probes for {model.info.name} (--refit to fit again)"
    return f"fitted the {name} direction and probes on {model.info.name} (cached for next time)"
