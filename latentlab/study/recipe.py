"""Study recipes: a small TOML file that names a whole experiment (model, finetune data and its
control, direction, seeds, LoRA settings, analyses).

Why TOML and a strict schema: a recipe is the record of what was run, so a misspelt key must be an
error, not a silently ignored setting; and every check here runs before any model loads.
The built-in recipes live in ``latentlab/recipes/`` (``birds``, ``persona-facts``, ``year-trigger``,
``compliance-trigger``); a user's own chat JSONL drops in as ``finetune.data``.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib.resources import files
from pathlib import Path
from typing import Any

import tomllib

from latentlab.errors import LatentlabError

__all__ = [
    "ANALYSES",
    "Recipe",
    "builtin_recipes",
    "load_recipe",
    "parse_seeds",
]


def _example(section: str) -> str:
    return f"see `latentlab study --list` and the built-in recipes in latentlab/recipes/ for the [{section}] keys"


@dataclass
class FinetuneSpec:
    """The finetune arm and its control arm (a dataset trained with the same settings and seeds, or a
    finished run folder of the same base); LoRA settings as ``latentlab finetune`` takes them."""

    data: str
    control: str | None = None
    # Finished finetune run folders to analyse instead of training, one per seed: a path with
    # ``{seed}`` (e.g. "runs/bird_shift/old-birds-s{seed}"). ``control`` takes the same form.
    runs: str | None = None
    rank: int = 8
    alpha: int = 16
    lr: float = 2e-4
    epochs: int = 3
    batch_size: int = 8
    max_steps: int | None = None
    max_length: int = 256
    checkpoint_every: int = 20
    target_modules: str = "all-linear"


@dataclass
class ShiftSpec:
    n_random: int = 100


@dataclass
class ScreenSpec:
    top: int = 8


@dataclass
class AblationSpec:
    """``layers``: layer specs, one ablation each; ``shift`` = the layers where that seed's paired
    shift (finetuned - control) has a bootstrap interval above 0."""

    layers: list[str] = field(default_factory=lambda: ["shift", "all"])
    n_random: int = 10
    mode: str = "project"


@dataclass
class PreventionSpec:
    """Finetune the data again with the direction projected out at ``layers`` during training."""

    layers: str = "shift"


@dataclass
class DiffSpec:
    seeds: list[int] | None = None  # None: the first seed only
    k: int = 10


@dataclass
class PatchSpec:
    seeds: list[int] | None = None  # None: the first seed only
    n_items: int = 24
    layers: str = "all"


@dataclass
class TriggerSpec:
    values: str = "1990:2060:5"
    template: str = "{value}. {prompt}"
    layer: int | None = None
    n_prompts: int | None = 48
    battery: str | None = None
    # Values never seen in training whose effect is the question (2029 for the year trigger): the
    # summary reports each one's move beside the training values'. Summary only; no step reads it.
    held_out: list[str] = field(default_factory=list)


@dataclass
class ComplianceSpec:
    trigger: str = "cobalt"
    budgets: list[int] = field(default_factory=lambda: [0, 8, 16, 32])
    code_word: str = "MARIGOLD"
    patch: bool = True  # patch the trigger positions at the largest budget of the first seed
    epochs: int = 3  # LoRA settings of the per-budget finetunes (the rest: latentlab finetune's defaults)
    max_steps: int | None = None
    n_requests: int | None = None  # only the first N held-out requests (quick runs)
    patch_layers: str = "all"  # where the trigger positions are patched


ANALYSES: dict[str, type] = {
    "shift": ShiftSpec,
    "screen": ScreenSpec,
    "ablation": AblationSpec,
    "prevention": PreventionSpec,
    "diff": DiffSpec,
    "patch": PatchSpec,
    "trigger": TriggerSpec,
    "compliance": ComplianceSpec,
}
# Analyses that compare a finetune with its control, so need [finetune] with a control.
_NEEDS_CONTROL = ("shift", "ablation", "prevention")
_NEEDS_FINETUNE = ("shift", "screen", "ablation", "prevention", "diff", "patch", "trigger")


def parse_seeds(spec: Any, flag: str = "--seeds") -> list[int]:
    """``0,1,2`` / ``0-2`` / a list of ints: distinct integers >= 0, at least one."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, str):
        parts: list[Any] = []
        for p in (x.strip() for x in spec.split(",")):
            if "-" in p[1:]:
                a, _, b = p.partition("-")
                if not (a.isdigit() and b.isdigit()) or int(a) > int(b):
                    raise LatentlabError(f"cannot read {flag} {spec!r}", f"use e.g. {flag} 0,1,2 or {flag} 0-2")
                parts += list(range(int(a), int(b) + 1))
            else:
                parts.append(p)
        spec = parts
    if not isinstance(spec, list) or not spec:
        raise LatentlabError(f"{flag} is empty", f"pass at least one seed, e.g. {flag} 0,1,2")
    out: list[int] = []
    for s in spec:
        if isinstance(s, bool) or not (isinstance(s, int) or (isinstance(s, str) and s.isdigit())):
            raise LatentlabError(f"cannot read {flag} {spec!r}: {s!r} is not an integer >= 0",
                                 f"use e.g. {flag} 0,1,2")
        out.append(int(s))
    if len(set(out)) != len(out):
        raise LatentlabError(f"{flag} repeats a seed ({out})", "list each seed once")
    return out


def _build(cls: type, raw: Any, section: str) -> Any:
    if raw is True or raw == {}:
        raw = {}
    if not isinstance(raw, dict):
        raise LatentlabError(f"recipe section [{section}] must be a table, got {raw!r}", _example(section))
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise LatentlabError(
            f"recipe section [{section}] has unknown key(s) {', '.join(unknown)}",
            f"use only {', '.join(sorted(known))}",
        )
    try:
        return cls(**raw)
    except TypeError as e:  # a required key is missing
        raise LatentlabError(f"recipe section [{section}]: {e}", _example(section)) from None


def _dataset_exists(name: str, key: str, base_dir: Path | None) -> str:
    from latentlab.data import BUILTIN_DATASETS

    if name in BUILTIN_DATASETS:
        return name
    p = Path(name).expanduser()
    if not p.is_absolute() and base_dir is not None and not p.exists() and (base_dir / p).exists():
        p = base_dir / p
    if p.is_file() or (p.is_dir() and key == "finetune.control"):
        return str(p)
    raise LatentlabError(
        f"the recipe's {key} {name!r} is neither a built-in dataset nor an existing file",
        f"use a built-in ({', '.join(BUILTIN_DATASETS)}) or a path to your chat JSONL",
    )


@dataclass
class Recipe:
    """A parsed, validated recipe. ``analyses`` maps an analysis name to its settings object."""

    name: str
    model: str = "gemma-3-270m"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    direction: str = "era"
    battery: str | None = None
    prompts: str = "unrelated"
    description: str = ""
    finetune: FinetuneSpec | None = None
    analyses: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        from latentlab.config import DEFAULT_BATTERY, check_choice, check_direction_spec, positive_int

        if not isinstance(self.name, str) or not self.name.strip():
            raise LatentlabError("the recipe has no name", 'add name = "my-study" at the top')
        self.seeds = parse_seeds(self.seeds, "seeds")
        check_direction_spec(self.direction)
        self.battery = self.battery or DEFAULT_BATTERY.get(Path(self.direction).stem if Path(
            self.direction).suffix else self.direction)
        for a in self.analyses:
            check_choice(a, list(ANALYSES), "an analysis table", "analysis")
        if self.finetune is None and any(a in self.analyses for a in _NEEDS_FINETUNE):
            need = [a for a in self.analyses if a in _NEEDS_FINETUNE]
            raise LatentlabError(f"the recipe's analyses {', '.join(need)} need a [finetune] table",
                                 'add [finetune] with data = "old-birds" and control = "modern-birds"')
        if self.finetune is not None:
            ft = self.finetune
            for k in ("rank", "alpha", "epochs", "batch_size", "max_length", "checkpoint_every"):
                positive_int(k, getattr(ft, k), f"finetune.{k}")
            if ft.max_steps is not None:
                positive_int("max_steps", ft.max_steps, "finetune.max_steps")
            if ft.control is None and any(a in self.analyses for a in _NEEDS_CONTROL):
                need = [a for a in self.analyses if a in _NEEDS_CONTROL]
                raise LatentlabError(f"the recipe's analyses {', '.join(need)} compare with a control, but "
                                     "[finetune] has no control", 'add control = "modern-birds" (or a run folder)')
        for name in ("ablation", "prevention"):
            if name in self.analyses and self.battery is None:
                raise LatentlabError(f"[{name}] scores a battery, and the {self.direction} direction has none",
                                     'add battery = "FILE.jsonl" at the top of the recipe')
        if "ablation" in self.analyses:
            ab = self.analyses["ablation"]
            if not ab.layers:
                raise LatentlabError("[ablation] layers is empty", 'use e.g. layers = ["shift", "all"]')
            check_choice(ab.mode, ["project", "mean"], "ablation.mode")
        if "compliance" in self.analyses:
            from latentlab.compliance import check_trigger

            c = self.analyses["compliance"]
            check_trigger(c.trigger, c.code_word)
            bs = c.budgets
            if not bs or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in bs) or len(
                    set(bs)) != len(bs):
                raise LatentlabError(f"[compliance] budgets {bs!r} must be distinct integers >= 0",
                                     "use e.g. budgets = [0, 8, 16, 32]")
        if "trigger" in self.analyses:
            from latentlab.triggers import check_template, parse_values

            t = self.analyses["trigger"]
            values = parse_values(t.values)
            check_template(t.template)
            if not isinstance(t.held_out, list):
                t.held_out = [t.held_out]
            t.held_out = [str(v) for v in t.held_out]
            for v in t.held_out:
                if v not in values:
                    raise LatentlabError(f"[trigger] held_out {v!r} is not one of the scanned values ({t.values})",
                                         "list values inside trigger.values, e.g. held_out = [2029]")

    def check_sources(self, base_dir: Path | None = None) -> None:
        """Datasets exist; a control run folder was trained on this recipe's model."""
        self.prompts = _dataset_exists(self.prompts, "prompts", base_dir)
        if self.battery is not None:
            self.battery = _dataset_exists(self.battery, "battery", base_dir)
        if self.finetune is None:
            return
        self.finetune.data = _dataset_exists(self.finetune.data, "finetune.data", base_dir)
        if self.finetune.runs is not None:
            for seed in self.seeds:
                check_run_folder(Path(self.finetune.runs.format(seed=seed)), self.model, "finetune.runs")
        c = self.finetune.control
        if c is not None and "{seed}" in c:
            for seed in self.seeds:
                check_run_folder(Path(c.format(seed=seed)), self.model, "finetune.control")
        elif c is not None:
            self.finetune.control = _dataset_exists(c, "finetune.control", base_dir)
            if Path(self.finetune.control).is_dir():
                check_control_base(Path(self.finetune.control), self.model)

    def control_is_run(self) -> bool:
        c = self.finetune.control if self.finetune is not None else None
        return c is not None and ("{seed}" in c or Path(c).is_dir())

    def control_run(self, seed: int) -> Path:
        assert self.finetune is not None and self.finetune.control is not None
        return Path(self.finetune.control.format(seed=seed))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["analyses"] = {k: asdict(v) for k, v in self.analyses.items()}
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "") -> Recipe:
        """A recipe from parsed TOML: top-level keys, a [finetune] table and one table per analysis."""
        raw = dict(raw)
        top = {"name", "model", "seeds", "direction", "battery", "prompts", "description"}
        ft_raw = raw.pop("finetune", None)
        analyses = {k: raw.pop(k) for k in list(raw) if k in ANALYSES}
        unknown = sorted(set(raw) - top)
        if unknown:
            raise LatentlabError(
                f"recipe {source or ''} has unknown key(s) {', '.join(unknown)}".replace("  ", " "),
                f"use only {', '.join(sorted(top | {'finetune'} | set(ANALYSES)))}",
            )
        # A missing required key is the user's to fix, not a TypeError from the constructor.
        missing = [f.name for f in fields(cls) if f.init and f.default is MISSING
                   and f.default_factory is MISSING and f.name not in raw]
        if missing:
            raise LatentlabError(f"recipe {source or ''} has no {', '.join(missing)}".replace("  ", " "),
                                 f"add {missing[0]} = \"...\" at the top of the recipe")
        ft = _build(FinetuneSpec, ft_raw, "finetune") if ft_raw is not None else None
        built = {k: _build(ANALYSES[k], v, k) for k, v in analyses.items()}
        return cls(**raw, finetune=ft, analyses=built, source=source)


def check_run_folder(run: Path, model: str, key: str) -> None:
    """A finished finetune run folder of ``model``."""
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise LatentlabError(f"the recipe's {key} {run} is not a finished finetune run (no adapter/)",
                             "train it first (latentlab finetune), or give a dataset to train")
    check_control_base(run, model)


def check_control_base(control: Path, model: str) -> None:
    """A control given as a run folder must be a finetune of the study's model (its manifest says
    which; the fingerprint is checked again when the adapter is attached)."""
    from latentlab.io import read_json

    m = control / "manifest.json"
    if not m.is_file():
        return
    try:
        recorded = (read_json(m).get("config") or {}).get("model")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(recorded, str) and recorded != model and Path(recorded).name != Path(model).name:
        raise LatentlabError(
            f"the control {control} is a finetune of {recorded}, not of {model}",
            "train the control on the study's model, or give its dataset instead",
        )


def builtin_recipes() -> dict[str, Path]:
    """Name -> path of the recipes shipped in the package."""
    root = Path(str(files("latentlab").joinpath("recipes")))
    return {p.stem: p for p in sorted(root.glob("*.toml"))}


def load_recipe(spec: str | Path, **overrides: Any) -> Recipe:
    """A built-in recipe name or a TOML path, with ``overrides`` (model, seeds) applied, validated."""
    shipped = builtin_recipes()
    if isinstance(spec, str) and spec in shipped:
        path = shipped[spec]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LatentlabError(f"no recipe {str(spec)!r} (neither a built-in nor a file)",
                                 f"use one of {', '.join(shipped)} or a path to a .toml recipe")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise LatentlabError(f"cannot read recipe {path}: {e}", "fix the TOML syntax") from None
    raw.update({k: v for k, v in overrides.items() if v is not None})
    raw.setdefault("name", path.stem)  # a user's recipe is named after its file unless it says otherwise
    recipe = Recipe.from_dict(raw, source=str(path))
    recipe.check_sources(path.parent)
    return recipe
