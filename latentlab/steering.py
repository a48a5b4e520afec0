"""Steering: add ``alpha * unit_direction * typical_residual_norm`` to the residual stream.

Design:

- A :class:`~latentlab.interventions.Steer` holds, per layer, the vector at coefficient 1 (unit
  direction times the layer's mean residual norm), so ``alpha`` is a fraction of a typical
  activation on every model.
- A K-coefficient sweep with random controls is one batched pass over
  ``2 x N x K x (1 + n_random)`` rows (:func:`latentlab.scoring.score_conditions`), not ``K x N`` calls.
- Random directions only pull a battery toward 0.5; compare them on the antisymmetric part
  ``(score(+a) - score(-a)) / 2`` (:meth:`SweepResult.antisymmetric`).
- Which layer to steer at is itself a measurement: :func:`screen_layers` on a dev split of the
  battery (:func:`dev_eval_split`), so the reported scores on the other items are not inflated by
  the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from jaxtyping import Float
from torch import Tensor

from latentlab.data import BatteryItem
from latentlab.directions import Direction
from latentlab.generation import generate
from latentlab.interventions import Condition, Mode, Steer
from latentlab.models import LoadedModel
from latentlab.scoring import score_conditions
from latentlab.stats import antisymmetric, bootstrap_ci

__all__ = [
    "DEFAULT_GENERATION_PROMPTS",
    "Steer",
    "SweepResult",
    "candidate_layers",
    "dev_eval_split",
    "generate",
    "score_conditions",
    "screen_layers",
    "sweep",
]

T = TypeVar("T")

# Everyday questions for the side-by-side generations: no era or persona words in them, so any
# old-fashioned (or captain-like) turn in the answer comes from the steering vector.
DEFAULT_GENERATION_PROMPTS = (
    "How would you send an urgent message to a relative who lives far away?",
    "What invention has changed daily life the most?",
    "Describe a typical evening at home.",
)


def dev_eval_split(items: Sequence[T], every: int = 4) -> tuple[list[T], list[T]]:
    """(dev, eval): every ``every``-th item screens layers, the rest are reported.

    Why: choosing the layer on the items you report inflates the reported effect.
    """
    if every < 2:
        raise ValueError("every must be >= 2")
    dev = list(items[::every])
    ev = [it for i, it in enumerate(items) if i % every != 0]
    return dev, ev


@dataclass
class SweepResult:
    """Battery scores for each coefficient, for the direction and for norm-matched random ones."""

    coeffs: list[float]
    layers: list[int]
    scores: Float[Tensor, "n_coeffs n_items"]
    random_scores: Float[Tensor, "n_random n_coeffs n_items"]
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for k, a in enumerate(self.coeffs):
            s = self.scores[k]
            row: dict[str, Any] = {"alpha": a, "score": float(s.mean()), "ci": bootstrap_ci(s)}
            if self.random_scores.shape[0]:
                r = self.random_scores[:, k].mean(0)
                row |= {"random": float(r.mean()), "random_ci": bootstrap_ci(r)}
            rows.append(row)
        return rows

    def antisymmetric(self) -> list[dict[str, Any]]:
        """(score(+a) - score(-a)) / 2 per |a| for the direction and each random one (item means).

        The direction's signature: any push pulls the battery toward 0.5, only this part flips sign.
        """
        rows = []
        for a in sorted({abs(c) for c in self.coeffs if c != 0}):
            if a not in self.coeffs or -a not in self.coeffs:
                continue
            i, j = self.coeffs.index(a), self.coeffs.index(-a)
            d = antisymmetric(self.scores[i], self.scores[j])
            row: dict[str, Any] = {"alpha": a, "direction": float(d.mean()), "ci": bootstrap_ci(d)}
            if self.random_scores.shape[0]:
                r = antisymmetric(self.random_scores[:, i], self.random_scores[:, j]).mean(1)
                row["random"] = r.tolist()
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "coeffs": self.coeffs,
            "layers": self.layers,
            "table": self.table(),
            "antisymmetric": self.antisymmetric(),
            "per_item_scores": self.scores.tolist(),
            "per_item_random_scores": self.random_scores.tolist(),
            **self.meta,
        }


def sweep(
    model: LoadedModel,
    direction: Direction,
    items: Sequence[BatteryItem],
    layers: int | Sequence[int],
    coeffs: Sequence[float] = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0),
    n_random: int = 1,
    mode: Mode = "all",
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> SweepResult:
    """Battery score vs steering coefficient, with ``n_random`` norm-matched random controls, in one batched pass."""
    steer = Steer.from_direction(direction, layers, mode)
    randoms = [Steer.random_like(direction, layers, seed=seed + 1 + i, mode=mode) for i in range(n_random)]
    conditions: list[Condition] = [(steer, a) for a in coeffs]
    conditions += [(r, a) for r in randoms for a in coeffs]
    s = score_conditions(model, items, conditions, batch_size=batch_size, progress=progress)
    k = len(coeffs)
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    return SweepResult(
        list(coeffs),
        layer_list,
        s[:k],
        s[k:].view(n_random, k, len(items)),
        {"direction": direction.name, "mode": mode, "seed": seed, "n_items": len(items)},
    )


def screen_layers(
    model: LoadedModel,
    direction: Direction,
    items: Sequence[BatteryItem],
    candidates: Sequence[int],
    alpha: float = 0.5,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[int, float]:
    """Steering effect score(+alpha) - score(-alpha) per candidate layer, in one batched pass."""
    conditions: list[Condition] = []
    for layer in candidates:
        steer = Steer.from_direction(direction, layer)
        conditions += [(steer, alpha), (steer, -alpha)]
    s = score_conditions(model, items, conditions, batch_size=batch_size, progress=progress).mean(1)
    return {layer: float(s[2 * i] - s[2 * i + 1]) for i, layer in enumerate(candidates)}


def candidate_layers(n_layers: int, probe_acc: Sequence[float] | None = None, k: int = 5) -> list[int]:
    """Up to ``k`` layers in the middle half of the network, preferring well-probed ones.

    Why the middle: early layers hold token-level features and late ones are about to be read out;
    steering papers (and our gemma-3-270m measurements) find concepts are most steerable in between.
    """
    band = list(range(n_layers // 4, max(n_layers // 4 + 1, (3 * n_layers) // 4 + 1)))
    if probe_acc is not None:
        best = max(probe_acc[i] for i in band)
        band = [i for i in band if probe_acc[i] >= best - 0.05] or band
    if len(band) <= k:
        return band
    if k == 1:
        return [band[len(band) // 2]]
    step = (len(band) - 1) / (k - 1)
    return sorted({band[round(i * step)] for i in range(k)})


# --------------------------------------------------------------------------------------------
# Which layer to steer at: a screen on dev items, reported scores on the others.
# --------------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """The chosen layer, the screen's score(+alpha) - score(-alpha) per candidate, and the split."""

    layer: int
    screen: dict[int, float]
    dev_items: list[BatteryItem]
    eval_items: list[BatteryItem]


def choose_layer(
    model: LoadedModel,
    direction: Direction,
    items: Sequence[BatteryItem],
    probe_acc: Sequence[float] | None = None,
    every: int = 4,
    alpha: float = 0.5,
    k: int = 5,
    progress: bool = False,
) -> LayerChoice:
    """Screen :func:`candidate_layers` (those the direction has) on a dev split of ``items``
    (:func:`dev_eval_split`) and pick the layer with the largest steering effect; report on ``eval_items``."""
    from latentlab.errors import LatentlabError
    from latentlab.stats import check_finite

    dev, ev = dev_eval_split(items, every)
    if not dev or not ev:
        raise LatentlabError(
            f"{len(items)} battery items are too few to screen layers on a dev split",
            "pass --layer, or a battery with at least 2 items",
        )
    wanted = candidate_layers(model.n_layers, probe_acc, k)
    cands = [c for c in wanted if c in direction.layers]
    if not cands:
        raise LatentlabError(
            f"no candidate layer for the layer screen: it looks at layers {wanted}, the {direction.name} "
            f"direction has {direction.layers}",
            "pass --layer with a layer the direction has, or fit the direction on more layers",
        )
    screen = screen_layers(model, direction, dev, cands, alpha=alpha, progress=progress)
    check_finite(list(screen.values()), "the layer-screen scores", "steer")
    return LayerChoice(max(screen, key=lambda c: screen[c]), screen, dev, ev)


# --------------------------------------------------------------------------------------------
# latentlab steer: config -> run folder.
# --------------------------------------------------------------------------------------------


@dataclass
class SteerConfig:
    """What ``latentlab steer`` takes; validated on construction, recorded whole in the manifest.

    ``direction``: era, persona, a pair JSONL (fitted on every layer) or a saved ``.safetensors``.
    ``layer``: a layer spec ('12', '10,12'); None screens candidate layers (:func:`choose_layer`).
    ``battery``: None = the direction's built-in battery. ``prompt``: None = :data:`DEFAULT_GENERATION_PROMPTS`.
    """

    direction: str = "era"
    out: Any = "runs/steer"
    model: str = "gemma-3-270m"
    adapter: Any = None
    layer: str | None = None
    coeffs: Any = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)
    battery: str | None = None
    prompt: list[str] | None = None
    positions: str = "all"
    n_random: int = 1
    gen_alpha: float = 0.25
    max_new_tokens: int = 24
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    overwrite: bool = False
    refit: bool = False  # fit the direction and probes again instead of reusing the cached fit
    device_map: str | None = None  # "auto" (accelerate): spread a model too big for one device

    def __post_init__(self) -> None:
        from pathlib import Path

        from latentlab.config import (
            DEFAULT_BATTERY,
            check_choice,
            check_device_dtype,
            check_direction_spec,
            check_layer_spec,
            check_out,
            finite_float,
            finite_floats,
            nonnegative_int,
            positive_int,
        )
        from latentlab.errors import LatentlabError

        self.coeffs = finite_floats(self.coeffs, "--coeffs")
        check_choice(self.positions, ("all", "generated"), "--positions")
        nonnegative_int("n_random", self.n_random)
        positive_int("max_new_tokens", self.max_new_tokens)
        self.gen_alpha = finite_float("gen_alpha", self.gen_alpha)
        check_layer_spec(self.layer, "--layer")
        check_device_dtype(self.device, self.dtype)
        self.adapter = None if self.adapter is None else Path(self.adapter)
        self.prompt = None if self.prompt is None else [str(p) for p in self.prompt]
        if self.prompt is not None and not self.prompt:
            self.prompt = None
        check_direction_spec(self.direction)
        self.battery = self.battery or DEFAULT_BATTERY.get(self.direction)
        if self.battery is None:
            raise LatentlabError(f"no default battery for --direction {self.direction}", "pass --battery FILE.jsonl")
        self.battery = str(self.battery)
        self.out = check_out(self.out, self.overwrite)


@dataclass
class SteerRun:
    """What ``latentlab steer`` measured: the sweep at the chosen layers, the screen, the generations."""

    sweep: SweepResult
    direction: Direction
    chosen_layers: list[int]
    layer_screen: dict[int, float] | None
    n_eval_items: int
    generations: list[dict[str, str]]
    gen_alphas: list[float]
    report: Any
    model: str
    out: Any


def run_steer(config: SteerConfig, command: str | None = None, progress: bool = True, log: Any = None) -> SteerRun:
    """``latentlab steer``: battery and direction are read (a saved one validated) before a model loads;
    layers and width are checked before ``config.out`` is touched. ``log``: a callable for progress lines."""
    from dataclasses import asdict

    from latentlab.data import load_battery, render_prompt
    from latentlab.directions import direction_spec, fit_or_use
    from latentlab.io import write_json
    from latentlab.models import load_model, parse_layers
    from latentlab.plots import layer_screen_figure, probe_accuracy_figure, save_figure, steering_figure
    from latentlab.runs import Run
    from latentlab.stats import check_finite

    say = log or (lambda _msg: None)
    cfg = config
    spec = direction_spec(cfg.direction)
    items = load_battery(cfg.battery)
    m = load_model(
        cfg.model,
        adapter=cfg.adapter,
        device=cfg.device,
        dtype=cfg.dtype,
        device_map=cfg.device_map,
        progress=progress,
    )
    fixed = None if cfg.layer is None else m.check_layers(parse_layers(cfg.layer, m.n_layers))
    if isinstance(spec, Direction):
        spec.check(m, fixed or [])  # width, and the --layer it must have
    else:
        say(f"fitting the {cfg.direction} direction and probes on {m.info.name} ...")
    d, report = fit_or_use(m, spec, refit=cfg.refit)
    if fixed is not None:
        d.check(m, fixed)
    eval_items, screen, probe_acc = list(items), None, None
    if fixed is None:  # the screen runs before --out is touched: no candidate layer leaves it as it was
        if report is not None:
            probe_acc = [t if t is not None else c for t, c in zip(report.test_acc, report.cv_acc)]
        cands = [c for c in candidate_layers(m.n_layers, probe_acc) if c in d.layers]
        if cands:
            dev, ev = dev_eval_split(items)
            say(f"screening layers {cands} on {len(dev)} dev battery items "
                f"(reported scores use the other {len(ev)}) ...")
        choice = choose_layer(m, d, items, probe_acc)
        chosen, screen, eval_items = [choice.layer], choice.screen, choice.eval_items
    else:
        chosen = fixed
    run = Run.start(cfg.out, command or "latentlab.run_steer", asdict(cfg), seed=cfg.seed)
    run.add_model("model", m.info)
    if report is not None:
        d.save(run.out / "direction")
        report.save(run.out / "probes")
        title = f"{d.name} probe accuracy by layer ({m.info.name})"
        save_figure(probe_accuracy_figure(report, title), run.out, "probe_accuracy")
    if screen is not None:
        save_figure(
            layer_screen_figure(
                list(screen), list(screen.values()), [probe_acc[c] for c in screen] if probe_acc else None, chosen[0]
            ),
            run.out,
            "layer_screen",
        )
        say(f"chosen layer {chosen[0]} (largest score(+0.5) - score(-0.5) on dev items: {screen[chosen[0]]:+.3f})")
    result = sweep(m, d, eval_items, chosen, cfg.coeffs, n_random=cfg.n_random, mode=cfg.positions, seed=cfg.seed)  # type: ignore[arg-type]
    check_finite(result.scores, "battery scores", "steer")
    check_finite(result.random_scores, "random-direction battery scores", "steer")
    gen_prompts = cfg.prompt or list(DEFAULT_GENERATION_PROMPTS)
    steer_obj = Steer.from_direction(d, chosen, cfg.positions)  # type: ignore[arg-type]
    gconds: list[Condition] = [(steer_obj, -cfg.gen_alpha), (None, 0.0), (steer_obj, cfg.gen_alpha)]
    rendered = [render_prompt(p, m.tokenizer) for p in gen_prompts]
    gens = generate(m, rendered, gconds, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    generations = [
        {"prompt": p, **{f"alpha={a:+g}": gens[c][i] for c, (_, a) in enumerate(gconds)}}
        for i, p in enumerate(gen_prompts)
    ]
    results = {
        **result.to_dict(),
        "model": m.info.to_dict(),
        "battery": cfg.battery,
        "n_eval_items": len(eval_items),
        "layer_screen": screen,
        "chosen_layers": chosen,
        "direction_meta": d.meta,
        "probes": report.to_dict() if report else None,
        "generations": generations,
    }
    write_json(run.out / "results.json", results)
    save_figure(
        steering_figure(result, f"Steering {d.name} at layer {','.join(map(str, chosen))} ({m.info.name})"),
        run.out,
        "steering",
    )
    run.finish(results={"chosen_layers": chosen, "table": result.table()})
    return SteerRun(
        result, d, chosen, screen, len(eval_items), generations, [a for _, a in gconds], report, m.info.name, run.out
    )
