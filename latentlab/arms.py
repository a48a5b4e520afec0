"""Arms: the model variants a behavioural evaluation compares, on one loaded base.

Why one concept: ``sample`` draws answers from arms, ``judge`` compares each arm with its control,
``serve`` exposes each arm under a model name, and a study's ``[eval]`` names them. An arm is the
base, a finetune (a PEFT adapter or a ``latentlab finetune`` run folder, switched on the one base
through :meth:`~latentlab.models.LoadedModel.with_adapter`, never a second copy of the weights), or
either of those under an intervention (``--steer era:0.5@8-17``, ``--ablate era@all``) with the same
spec syntax the finetune and ablate commands take. Directions are resolved on the base, as every
other command resolves them, so the steered and the unsteered arm differ only by the intervention.
A finetune arm may carry a factor on its LoRA difference (amplification: ``old@x2`` is ``old`` with
twice its change; :func:`~latentlab.adapters.scaled_name`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlab.adapters import check_scale, format_scale, scaled_name
from latentlab.directions import DirectionSpec
from latentlab.errors import LatentlabError
from latentlab.interventions import Ablate, Condition, InterventionSpec, Steer, parse_intervention
from latentlab.models import LoadedModel, resolve_adapter

__all__ = ["Arm", "build_arms", "condition_for", "parse_named_adapter", "parse_scaled_adapter", "prepared_arms"]


@dataclass(frozen=True)
class Arm:
    """A named model variant: ``adapter`` on the base (None: the base itself) with its difference times
    ``scale``, under ``intervention``."""

    name: str
    adapter: Path | None = None
    intervention: InterventionSpec | None = None
    role: str = "base"  # base | finetuned | control: which arm a finetune is compared with
    scale: float = 1.0  # the factor on the adapter's LoRA difference (1: as trained)

    def record(self) -> dict[str, Any]:
        """What a results file records of the arm (``scale`` only when not 1: older records stay equal)."""
        iv = self.intervention
        rec = {"name": self.name, "role": self.role, "adapter": None if self.adapter is None else str(self.adapter),
               "intervention": None if iv is None else {"kind": iv.kind, "direction": iv.direction,
                                                        "coeff": iv.coeff, "layers": iv.layers}}
        if self.scale != 1:
            rec["scale"] = self.scale
        return rec


def _arm_name(path: Path) -> str:
    return path.name if path.name not in ("adapter", "") else path.parent.name


def parse_named_adapter(text: str) -> tuple[str, Path]:
    """``NAME=RUN_OR_ADAPTER_DIR`` (or a bare folder, named after itself), checked to be an adapter."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    folder = resolve_adapter(Path(path).expanduser())
    name = name.strip() or _arm_name(Path(path))
    _check_name(name)
    return name, folder


def parse_scaled_adapter(text: str) -> tuple[str, Path, float]:
    """``NAME=RUN@FACTOR`` (or ``NAME=RUN``): :func:`parse_named_adapter` plus a factor on the difference.

    A folder whose own name holds ``@`` still reads as a folder: the suffix counts only when what is left
    before it is an adapter and what follows is a number."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    head, at, tail = path.rpartition("@")
    if at and not Path(path).expanduser().exists():
        try:
            factor = float(tail)
        except ValueError:
            factor = None
        if factor is not None:
            factor = check_scale(factor, f"factor in {text!r}")
            name, folder = parse_named_adapter(f"{name}{sep}{head}")
            return name if sep else scaled_name(name, factor), folder, factor
    name, folder = parse_named_adapter(text)
    return name, folder, 1.0


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name):
        raise LatentlabError(f"cannot use {name!r} as an arm name", "name it as NAME=FOLDER, with no spaces in NAME")


def build_arms(
    finetuned: Sequence[str] = (),
    control: str | None = None,
    steer: Sequence[str] = (),
    ablate: Sequence[str] = (),
    base: bool = True,
    scales: Sequence[float] = (1.0,),
) -> list[Arm]:
    """The base (unless ``base=False``), each finetune, the control, and each of those again under
    every ``--steer`` / ``--ablate`` spec (named ``ARM+steer(era:0.5@8-17)``). With ``scales``, each
    finetune and the control at each factor on its LoRA difference (``old@x2``; the name itself at 1).
    Checked before any model loads: adapter folders exist, specs parse, names are distinct."""
    scales = [check_scale(x) for x in scales]
    if not scales or len(set(scales)) != len(scales):
        raise LatentlabError(f"scales {[format_scale(x) for x in scales]} must be distinct factors, at least one",
                             "pass e.g. --scale 0,1,2")
    arms: list[Arm] = [Arm("base")] if base else []
    tuned = [(f, "finetuned") for f in finetuned] + ([(control, "control")] if control is not None else [])
    for x in scales:
        for text, role in tuned:
            name, folder = parse_named_adapter(text)
            arms.append(Arm(scaled_name(name, x), folder, role=role, scale=x))
    if not arms:
        raise LatentlabError("no arms to evaluate", "keep the base, or pass --finetuned RUN")
    plain = list(arms)
    for kind, specs in (("steer", steer), ("ablate", ablate)):
        for text in specs:
            spec = parse_intervention(text, kind)  # type: ignore[arg-type]
            DirectionSpec.parse(spec.direction, f"--{kind}")
            arms += [Arm(f"{a.name}+{kind}({text.strip()})", a.adapter, spec, a.role, a.scale) for a in plain]
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LatentlabError(f"two arms are named {dup[0]!r}", "name them apart, e.g. --finetuned old=RUN")
    return arms


def condition_for(spec: InterventionSpec | None, base: LoadedModel,
                  log: Callable[[str], Any] | None = None) -> Condition:
    """The inference-time condition of an intervention spec, its direction resolved on ``base``."""
    if spec is None:
        return (None, 0.0)
    d = DirectionSpec.parse(spec.direction, f"--{spec.kind}").resolve(base, log=log)
    layers = base.check_layers(spec.layers)
    d.check(base, layers)
    if spec.kind == "steer":
        return (Steer.from_direction(d, layers), float(spec.coeff))
    return (Ablate.from_direction(d, layers), 1.0)


def prepared_arms(base: LoadedModel, arms: Sequence[Arm],
                  log: Callable[[str], Any] | None = None) -> dict[str, tuple[LoadedModel, Condition]]:
    """Each arm as (the model view to run, the condition to apply): adapters switched on the one base, one
    view per (adapter, factor), the factors of one adapter sharing its weights."""
    views: dict[tuple[Path, float], LoadedModel] = {}
    labels: dict[Path, str] = {}
    out: dict[str, tuple[LoadedModel, Condition]] = {}
    for a in arms:
        if a.adapter is not None and (a.adapter, a.scale) not in views:
            label = labels.setdefault(a.adapter, a.name)
            views[(a.adapter, a.scale)] = base.with_adapter(a.adapter, label=label, scale=a.scale)
        view = base if a.adapter is None else views[(a.adapter, a.scale)]
        out[a.name] = (view, condition_for(a.intervention, base, log))
    return out
