"""Directions in the residual stream: difference of means (or PCA of paired differences) per layer.

A :class:`Direction` keeps the raw per-layer vectors *and* the typical residual norm at each layer,
because steering must be scaled by that norm (Gemma's residual norms are in the thousands: a raw
unit vector does nothing, a raw difference vector is arbitrary).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from latentlab.activations import ActivationSet, collect
from latentlab.data import Pair, dataset_hash, load_pairs, pair_examples
from latentlab.errors import LatentlabError
from latentlab.io import load_tensors, save_tensors
from latentlab.models import LoadedModel
from latentlab.stats import norm_matched

Method = Literal["mean_diff", "pca"]


@dataclass
class Direction:
    """Per-layer direction vectors (positive pole minus negative pole)."""

    vectors: Float[Tensor, "n_layers d_model"]
    layers: list[int]
    resid_norms: Float[Tensor, " n_layers"]
    name: str = "direction"
    position: str = "last"
    method: str = "mean_diff"
    meta: dict[str, Any] = field(default_factory=dict)

    def _col(self, layer: int) -> int:
        if layer not in self.layers:
            raise LatentlabError(
                f"the {self.name} direction has no layer {layer} (has {self.layers[0]}-{self.layers[-1]})",
                "refit the direction at that layer",
            )
        return self.layers.index(layer)

    def vector(self, layer: int) -> Float[Tensor, " d_model"]:
        return self.vectors[self._col(layer)]

    def unit(self, layer: int) -> Float[Tensor, " d_model"]:
        v = self.vector(layer)
        return v / v.norm().clamp_min(1e-12)

    def resid_norm(self, layer: int) -> float:
        """Mean L2 norm of the residual stream at this layer (at the direction's position)."""
        return float(self.resid_norms[self._col(layer)])

    def units(self) -> Float[Tensor, "n_layers d_model"]:
        return self.vectors / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def validate(self, source: str | Path | None = None) -> Direction:
        """Refuse NaN/inf or all-zero vectors (a broken fit or file): they would steer or project nothing."""
        where = f" in {source}" if source is not None else ""
        if not bool(torch.isfinite(self.vectors).all()):
            raise LatentlabError(f"the {self.name} direction{where} holds NaN or infinite values", "refit it")
        zero = [layer for layer, n in zip(self.layers, self.vectors.norm(dim=-1).tolist()) if n == 0.0]
        if zero:
            raise LatentlabError(
                f"the {self.name} direction{where} is all zeros at layer(s) {zero[:6]}", "refit the direction"
            )
        if self.vectors.shape[0] != len(self.layers):
            raise LatentlabError(f"the {self.name} direction{where} is malformed (vectors != layers)", "refit it")
        return self

    def check(self, model: Any, layers: Sequence[int] | None = None) -> Direction:
        """Usable on ``model`` (a LoadedModel): same width, and every layer in ``layers`` (default: all)."""
        self.validate()
        d = self.vectors.shape[-1]
        if d != model.d_model:
            raise LatentlabError(
                f"the {self.name} direction has width {d}, but {model.info.name} has d_model {model.d_model}",
                "use a direction fitted on this model",
            )
        need = list(range(model.n_layers)) if layers is None else list(layers)
        missing = [layer for layer in need if layer not in self.layers]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
            raise LatentlabError(
                f"the {self.name} direction lacks layer(s) {shown} of {model.info.name}",
                "fit it with --layers all, or choose layers it has",
            )
        return self

    def save(self, path: str | Path) -> Path:
        """Tensors + sidecar; the sidecar says how to use them (hook point, add/ablate, scale, layer map)
        so a file taken to another tool cannot be applied at the wrong site silently."""
        from latentlab.vectors import sidecar_fields  # lazy: latentlab.vectors imports this module

        meta = {
            **self.meta,
            **sidecar_fields(self),
            "name": self.name,
            "layers": self.layers,
            "position": self.position,
            "method": self.method,
            "norms": self.vectors.norm(dim=-1).tolist(),
            "resid_norms": self.resid_norms.tolist(),
        }
        return save_tensors(path, {"vectors": self.vectors, "resid_norms": self.resid_norms}, meta)

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        p = Path(path)
        if p.is_dir():
            p = p / "direction.safetensors"
        t, meta = load_tensors(p)
        for k in ("name", "layers", "position", "method"):
            if k not in meta:
                raise LatentlabError(
                    f"{p} is not a latentlab direction (sidecar lacks {k!r})",
                    "pass a file written by `latentlab direction`",
                )
        name, layers, position, method = (meta.pop(k) for k in ("name", "layers", "position", "method"))
        for key in ("norms", "resid_norms", "hook_point", "operation", "scale_convention", "layer_map"):
            meta.pop(key, None)  # bookkeeping the sidecar carries for readers; save() rewrites it
        if "vectors" not in t or "resid_norms" not in t:
            raise LatentlabError(f"{p} is not a latentlab direction (no vectors tensor)", "pass a direction file")
        return cls(t["vectors"], layers, t["resid_norms"], name, position, method, meta).validate(p)


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
    from latentlab.probes import fit_probes

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
# What the commands share: a --direction option, resolved before a model loads.
# --------------------------------------------------------------------------------------------


def direction_spec(spec: str | Path) -> Direction | str:
    """A saved direction (``.safetensors``, loaded and validated now) or a contrast-pair source to fit
    on the model later (a built-in name or a ``.jsonl``, read now so a bad file fails before a model loads)."""
    from latentlab.config import check_direction_spec

    if Path(spec).is_dir() and (Path(spec) / "direction.safetensors").is_file():
        return Direction.load(spec)
    s = check_direction_spec(spec)
    if Path(s).suffix == ".safetensors":
        return Direction.load(s)
    resolve_pairs(s)
    return s


def fit_or_use(model: LoadedModel, spec: Direction | str, refit: bool = False) -> tuple[Direction, Any]:
    """``spec`` as a Direction usable on ``model``: a saved one checked (width), a source fitted on
    every layer, or reused from the fit cache (:mod:`latentlab.cache`: same weights, data and options
    give the same fit, so it is done once; ``refit=True`` forces it). Returns (direction, probes or None)."""
    if isinstance(spec, Direction):
        return spec.check(model, spec.layers), None
    from latentlab.cache import describe, fitted_direction

    d, report, reused = fitted_direction(model, spec, "all", refit=refit)
    d.meta["reused_from_cache"] = reused
    import sys

    print(describe(reused, d.name, model), file=sys.stderr)
    return d, report


def resolve_direction(model: LoadedModel | None, spec: Direction | str, out: Path | None = None) -> Direction:
    """``spec`` as a Direction: a saved one as it is; a pair source fitted (all layers, via the fit
    cache) on ``model`` and, with ``out``, saved into that run folder so the run is self-contained."""
    if isinstance(spec, Direction):
        return spec
    if model is None:
        raise LatentlabError(f"fitting the {spec} direction needs a model", "pass a model, or a saved direction")
    d, _ = fit_or_use(model, spec)
    if out is not None:
        d.save(Path(out) / f"direction-{d.name}")
    return d


# --------------------------------------------------------------------------------------------
# latentlab direction / probe: config -> run folder.
# --------------------------------------------------------------------------------------------

METHODS = ("mean_diff", "pca")
FIT_POSITIONS = ("last", "mean")


@dataclass
class DirectionConfig:
    """What ``latentlab direction`` takes; validated on construction, recorded whole in the manifest."""

    direction: str = "era"
    out: Path = Path("runs/direction")
    model: str = "gemma-3-270m"
    adapter: Path | None = None
    layers: str = "all"
    position: str = "last"
    method: str = "mean_diff"
    device: str = "auto"
    dtype: str = "float32"
    overwrite: bool = False
    device_map: str | None = None  # "auto" (accelerate): spread a model too big for one device

    def __post_init__(self) -> None:
        from latentlab.config import check_choice, check_device_dtype, check_direction_spec, check_layer_spec, check_out

        self.adapter = None if self.adapter is None else Path(self.adapter)
        check_choice(self.method, METHODS, "--method", "method")
        check_choice(self.position, FIT_POSITIONS, "--position", "position")
        check_layer_spec(self.layers)
        check_device_dtype(self.device, self.dtype)
        check_direction_spec(self.direction)
        if Path(self.direction).suffix == ".safetensors":
            raise LatentlabError(
                "--direction is a saved direction; this command fits one", "pass era, persona or a pair FILE.jsonl"
            )
        self.out = check_out(self.out, self.overwrite)


@dataclass
class ProbeConfig:
    """What ``latentlab probe`` takes: as :class:`DirectionConfig` (mean_diff), plus an optional extra test file."""

    direction: str = "era"
    out: Path = Path("runs/probe")
    model: str = "gemma-3-270m"
    adapter: Path | None = None
    layers: str = "all"
    position: str = "last"
    test: Path | None = None
    device: str = "auto"
    dtype: str = "float32"
    overwrite: bool = False
    device_map: str | None = None  # "auto" (accelerate): spread a model too big for one device

    def __post_init__(self) -> None:
        DirectionConfig(
            self.direction, self.out, self.model, self.adapter, self.layers, self.position, "mean_diff",
            self.device, self.dtype, self.overwrite,
        )
        self.out = Path(self.out).expanduser()
        self.adapter = None if self.adapter is None else Path(self.adapter)
        self.test = None if self.test is None else Path(self.test)


@dataclass
class FitRun:
    """A fitted direction and its probes, and the run folder they were written to."""

    direction: Direction
    report: Any
    out: Path
    model: str
    results: dict[str, Any] = field(default_factory=dict)


def _fit(cfg: DirectionConfig | ProbeConfig, method: str, command: str | None, name: str, progress: bool):  # noqa: ANN202
    from dataclasses import asdict

    from latentlab.models import load_model
    from latentlab.runs import Run

    spec = direction_spec(cfg.direction)
    m = load_model(
        cfg.model,
        adapter=cfg.adapter,
        device=cfg.device,
        dtype=cfg.dtype,
        device_map=cfg.device_map,
        progress=progress,
    )
    layers = m.check_layers(cfg.layers)
    d, report = direction_and_probes(m, spec, layers, cfg.position, method, progress=progress)  # type: ignore[arg-type]
    from latentlab.stats import check_finite

    check_finite(d.vectors, "the direction vectors", name)
    run = Run.start(cfg.out, command or f"latentlab.run_{name}", asdict(cfg))
    run.add_model("model", m.info)
    return run, m, d, report


def run_direction(config: DirectionConfig, command: str | None = None, progress: bool = True) -> FitRun:
    """``latentlab direction``: fit a direction and probes; writes ``out/direction.safetensors``."""
    run, m, d, report = _fit(config, config.method, command, "direction", progress)
    d.save(run.out / "direction")
    results = {"layers": d.layers, "norms": d.vectors.norm(dim=-1).tolist(), "best_probe_layer": report.best_layer}
    run.finish(results=results)
    return FitRun(d, report, run.out, m.info.name, results)


def run_probe(config: ProbeConfig, command: str | None = None, progress: bool = True) -> FitRun:
    """``latentlab probe``: per-layer probes (k-fold and held-out accuracy), results.json, probes and plot."""
    from latentlab.io import write_json
    from latentlab.plots import probe_accuracy_figure, save_figure

    extra = load_pairs(config.test) if config.test is not None else None
    run, m, d, report = _fit(config, "mean_diff", command, "probe", progress)
    results = report.to_dict()
    if extra is not None:
        ep, en = collect_pairs(m, extra, d.layers, config.position)
        results["user_test"] = [
            {"layer": layer, "acc": a, "ci": ci} for layer, (a, ci) in zip(d.layers, report.score(ep, en))
        ]
    report.save(run.out / "probes")
    write_json(run.out / "results.json", results)
    save_figure(
        probe_accuracy_figure(report, f"{d.name} probe accuracy by layer ({m.info.name})"), run.out, "probe_accuracy"
    )
    run.finish(results={"best_layer": report.best_layer})
    return FitRun(d, report, run.out, m.info.name, results)
