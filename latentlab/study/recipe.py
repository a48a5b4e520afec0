"""Study recipes: a small TOML file that names a whole experiment (model, finetune data and its
control, direction, seeds, LoRA settings, analyses).

Why TOML and a strict schema: a recipe is the record of what was run, so a misspelt key must be an
error, not a silently ignored setting; and every check here runs before any model loads.
The built-in recipes live in ``latentlab/recipes/`` (``birds``, ``persona-facts``, ``year-trigger``,
``compliance-trigger``); a user's own chat JSONL drops in as ``finetune.data``.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from importlib.resources import files
from pathlib import Path
from typing import Any

import tomllib

from latentlab.compliance import check_trigger
from latentlab.config import (
    DEFAULT_BATTERY,
    check_choice,
    check_direction_spec,
    finite_float,
    positive_int,
)
from latentlab.data import BUILTIN_DATASETS
from latentlab.errors import LatentlabError
from latentlab.io import read_json
from latentlab.sampling import load_questions
from latentlab.stages import stage_named
from latentlab.stages.base import option_fields
from latentlab.stages.find_trigger import check_search_inputs
from latentlab.stages.judge import check_judge
from latentlab.triggers import check_template, parse_values

__all__ = [
    "ANALYSES",
    "EVAL_ARMS",
    "Recipe",
    "builtin_recipes",
    "judge_labels",
    "load_recipe",
    "parse_seeds",
]


def _example(section: str) -> str:
    return f"see `latentlab study --list` and the built-in recipes in latentlab/recipes/ for the [{section}] keys"


@dataclass(frozen=True)
class SectionKind:
    """What a recipe table is: the config of one stage (``stage``), plus the few keys only a study has.

    ``study``: study-only keys and their defaults (how the study wires the stage: which layer specs to
    ablate at, which seeds to patch). ``wired``: stage fields the study sets itself for every step
    (model, folders, seed, the recipe's direction). ``defaults``: the study's own defaults for stage
    keys, where a study wants another default than the command (stated here, once).
    """

    stage: str | None
    study: dict[str, Any] = field(default_factory=dict)
    wired: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)

    def config_class(self) -> type | None:
        if self.stage is None:
            return None
        return stage_named(self.stage).config

    def stage_fields(self) -> dict[str, Any]:
        """Recipe-settable stage fields: name -> (default, type)."""
        cls = self.config_class()
        if cls is None:
            return {}
        out = {}
        for f, tp in option_fields(cls):
            if f.name in self.wired or not f.metadata.get("recipe", True):
                continue
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else MISSING)
            out[f.name] = (self.defaults.get(f.name, default), tp)
        return out


_RUN = ("out", "overwrite", "model", "device", "device_map", "dtype", "adapter", "seed")
SECTIONS: dict[str, SectionKind] = {
    # [finetune]: the finetune arm and its control arm (a dataset trained with the same settings and
    # seeds, or finished run folders of the same base: ``runs``/``control`` with ``{seed}``).
    "finetune": SectionKind("finetune", study={"control": None, "runs": None},
                            wired=(*_RUN, "resume", "ablate", "steer")),
    "shift": SectionKind("shift", wired=(*_RUN, "finetuned", "control", "direction", "prompts", "battery",
                                         "checkpoints")),
    "screen": SectionKind("screen", wired=(*_RUN, "data", "direction")),
    # ``layers``: layer specs, one ablation each; ``shift`` = the layers where that seed's paired shift
    # (finetuned - control) has a bootstrap interval above 0; ``peak`` = the one layer where that
    # seed's paired shift is largest in magnitude.
    "ablation": SectionKind("ablate", study={"layers": ["shift", "all"]},
                            wired=(*_RUN, "finetuned", "control", "direction", "battery", "layers")),
    # [prevention]: the finetune trained again with the direction projected out at ``layers``.
    "prevention": SectionKind(None, study={"layers": "shift"}),
    "diff": SectionKind("diff", study={"seeds": None}, wired=(*_RUN, "finetuned", "control", "prompts")),
    "patch": SectionKind("patch", study={"seeds": None},
                         wired=(*_RUN, "finetuned", "direction", "battery", "clean_prefix", "corrupt_prefix")),
    # ``held_out``: values never seen in training whose effect is the question (2029 for the year
    # trigger): the summary reports each one's move beside the training values'. Summary only.
    "trigger": SectionKind("trigger", study={"held_out": []},
                           wired=(*_RUN, "finetuned", "direction", "prompts", "training_data", "values_file",
                                  "words"),
                           defaults={"values": "1990:2060:5", "n_prompts": 48}),
    "compliance": SectionKind("compliance", wired=(*_RUN, "finetunes"),
                              defaults={"budgets": [0, 8, 16, 32], "trigger": "cobalt"}),
    # [find-trigger]: per seed, a trigger search on that seed's finetune (the [finetune] arm; without one,
    # the [compliance] finetune at its largest budget). Its prompts are its own (a compliance finetune's
    # trigger may act only on requests, not on the recipe's unrelated prompts).
    "find-trigger": SectionKind("find-trigger", wired=(*_RUN, "finetuned")),
    # [eval]: the sample stage per seed (answers of the ``arms``, see EVAL_ARMS), then a judge step per seed
    # and per entry of ``judges`` (default: the direction judge on the recipe's direction, which needs no
    # judge model), reading with ``template`` (judge templates; the direction judge uses none).
    "eval": SectionKind("sample", study={"arms": ["finetune", "control"], "judges": None, "template": "era-labels"},
                        wired=(*_RUN, "finetuned", "control", "steer", "ablate", "no_base", "endpoint", "served",
                               "api_key_env", "concurrency", "timeout", "max_retries", "judgments")),
}
# The arms an [eval] section may sample: the finetune and its control, the base, every arm again with the
# direction ablated at inference at each [ablation] layer spec (``--ablate DIRECTION@LAYERS``), and the
# [prevention] finetune (trained with the direction projected out).
EVAL_ARMS = ("finetune", "control", "base", "ablated", "preventative")
ANALYSES = [k for k in SECTIONS if k != "finetune"]


@dataclass
class Section:
    """One recipe table: the keys it gives (checked against its stage config's fields) and the study keys."""

    kind: str
    given: dict[str, Any]

    @property
    def spec(self) -> SectionKind:
        return SECTIONS[self.kind]

    def __getitem__(self, key: str) -> Any:
        if key in self.given:
            return self.given[key]
        if key in self.spec.study:
            return self.spec.study[key]
        return self.spec.stage_fields()[key][0]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key in ("kind", "given"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        if key in ("kind", "given"):
            object.__setattr__(self, key, value)
        else:  # a checked or normalised value (a dataset path made absolute, held_out as strings)
            self.given[key] = value

    def stage_values(self) -> dict[str, Any]:
        """The stage keys this table sets, with the study's own defaults (what the step's config gets)."""
        keys = set(self.spec.stage_fields())
        return {**{k: v for k, v in self.spec.defaults.items() if k in keys},
                **{k: v for k, v in self.given.items() if k in keys}}

    def filled(self) -> dict[str, Any]:
        """Every key with its value or default: what the study records and compares."""
        stage = {k: d for k, (d, _) in self.spec.stage_fields().items() if d is not MISSING}
        return {**stage, **self.spec.study, **self.given}

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


def _kind_name(tp: Any) -> str:
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return "/".join(getattr(a, "__name__", str(a)) for a in (args or [tp]))


def _check_value(key: str, value: Any, tp: Any, section: str) -> None:
    """A TOML value of the field's kind (the stage config checks its range when the step is built)."""
    import typing

    kinds = [typing.get_origin(a) or a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)]
    ok = value is None and type(None) in typing.get_args(tp)
    for k in kinds:
        if k is bool:
            ok = ok or isinstance(value, bool)
        elif k is int:
            ok = ok or (isinstance(value, int) and not isinstance(value, bool))
        elif k is float:
            ok = ok or (isinstance(value, (int, float)) and not isinstance(value, bool))
        elif k in (str, Path):  # a list stands for a comma-separated spec (budgets = [0, 8, 16])
            ok = ok or (isinstance(value, (str, int, float, list)) and not isinstance(value, bool))
        elif k is list:
            ok = ok or isinstance(value, (list, str))
        else:
            ok = True
    if not ok:
        raise LatentlabError(f"recipe section [{section}] {key} = {value!r} is not a {_kind_name(tp)}",
                             _example(section))


def _build(kind: str, raw: Any) -> Section:
    if raw is True or raw == {}:
        raw = {}
    if not isinstance(raw, dict):
        raise LatentlabError(f"recipe section [{kind}] must be a table, got {raw!r}", _example(kind))
    spec = SECTIONS[kind]
    stage = spec.stage_fields()
    known = set(stage) | set(spec.study)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise LatentlabError(
            f"recipe section [{kind}] has unknown key(s) {', '.join(unknown)}",
            f"use only {', '.join(sorted(known))}",
        )
    missing = [k for k, (d, _) in stage.items() if d is MISSING and k not in raw]
    if missing:
        raise LatentlabError(f"recipe section [{kind}] has no {', '.join(missing)}",
                             f"add {missing[0]} = ... to [{kind}]")
    for k, v in raw.items():
        if k in stage:
            _check_value(k, v, stage[k][1], kind)
    return Section(kind, dict(raw))


def _dataset_exists(name: str, key: str, base_dir: Path | None) -> str:
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
    finetune: Section | None = None
    analyses: dict[str, Section] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
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
        if "find-trigger" in self.analyses and self.finetune is None and "compliance" not in self.analyses:
            raise LatentlabError("[find-trigger] searches a finetune, but the recipe has neither [finetune] nor "
                                 "[compliance]", 'add [finetune] with data = "year-trigger" (or [compliance] with '
                                 'trigger = "cobalt"), or drop [find-trigger]')
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
            c = self.analyses["compliance"]
            check_trigger(c.trigger, c.code_word)
            bs = c.budgets
            if not bs or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in bs) or len(
                    set(bs)) != len(bs):
                raise LatentlabError(f"[compliance] budgets {bs!r} must be distinct integers >= 0",
                                     "use e.g. budgets = [0, 8, 16, 32]")
        if "eval" in self.analyses:
            self._check_eval(self.analyses["eval"])
        if "trigger" in self.analyses:
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

        if "find-trigger" in self.analyses:
            self._read_find_trigger(self.analyses["find-trigger"])

    def _read_find_trigger(self, ft: Section) -> None:
        """[find-trigger], as the recipe writes what the command reads: a list of candidates is the a,b,c
        spec, a lone expected string (or year) a list of one. The settings are checked by
        :meth:`check_sources`, once a file beside the recipe is found."""
        if isinstance(ft.candidates, list):  # candidates = ["cobalt", "amber"] stands for "cobalt,amber"
            ft.candidates = ",".join(map(str, ft.candidates))
        if ft.expect is not None and not isinstance(ft.expect, list):
            ft.expect = [ft.expect]

    def _check_eval(self, ev: Section) -> None:
        """[eval]: known arms whose sections exist, and lists of judges (each judge and the template are
        checked as ``latentlab judge`` checks them by :meth:`check_sources`, once a template path is resolved)."""
        arms = [ev.arms] if isinstance(ev.arms, str) else ev.arms
        if not isinstance(arms, list) or not arms or any(a not in EVAL_ARMS for a in arms) or len(set(arms)) != len(
                arms):
            raise LatentlabError(f"[eval] arms = {ev.arms!r} must be a list of distinct arms among "
                                 f"{', '.join(EVAL_ARMS)}", 'write e.g. arms = ["finetune", "control", "base"]')
        if arms == ["ablated"]:
            raise LatentlabError("[eval] arms = [\"ablated\"] names no arm to ablate",
                                 'add the arms to sample with and without the ablation, e.g. ["finetune", "ablated"]')
        ev.arms = arms
        # the sample step checks these too, but only after the finetunes it samples: a typo must not wait for them
        for k in ("n", "max_new_tokens", "batch_size"):
            positive_int(k, ev[k], f"eval.{k}")
        if finite_float("temperature", ev.temperature, "eval.temperature") < 0 or not 0 < finite_float(
                "top_p", ev.top_p, "eval.top_p") <= 1:
            raise LatentlabError(f"[eval] temperature = {ev.temperature} must be >= 0 and top_p = {ev.top_p} in (0, 1]",
                                 "write e.g. temperature = 1.0 and top_p = 1.0")
        needs = {"finetune": ("[finetune] table", self.finetune is not None, 'add [finetune] with data = "old-birds"'),
                 "control": ("control in [finetune]", self.finetune is not None and self.finetune.control is not None,
                             'add control = "modern-birds" to [finetune]'),
                 "ablated": ("[ablation] table", "ablation" in self.analyses, 'add [ablation] with layers = ["all"]'),
                 "preventative": ("[prevention] table", "prevention" in self.analyses, "add [prevention]")}
        for arm in arms:
            if arm in needs and not needs[arm][1]:
                what, _, fix = needs[arm]
                raise LatentlabError(f"[eval] arms has {arm!r}, but the recipe has no {what}",
                                     f"{fix}, or drop {arm!r} from [eval] arms")
        if ev.judges is None:  # the direction judge works offline: the default
            ev.judges = [f"direction:{self.direction}"]
        judges = [ev.judges] if isinstance(ev.judges, str) else ev.judges
        if not isinstance(judges, list) or not judges or not all(isinstance(j, str) for j in judges) \
                or len(set(judges)) != len(judges):
            raise LatentlabError(f"[eval] judges = {ev.judges!r} must be a list of distinct judge specs",
                                 'write e.g. judges = ["direction:era", "endpoint:gpt-4.1@https://api.openai.com/v1"]')
        ev.judges = judges
        if not isinstance(ev.template, str):
            raise LatentlabError(f"[eval] template = {ev.template!r} is not a template name or file",
                                 'write e.g. template = "era-labels"')

    def check_sources(self, base_dir: Path | None = None) -> None:
        """Datasets exist; a control run folder was trained on this recipe's model."""
        self.prompts = _dataset_exists(self.prompts, "prompts", base_dir)
        if "eval" in self.analyses:
            ev = self.analyses["eval"]
            ev.questions = _dataset_exists(str(ev.questions), "eval.questions", base_dir)
            load_questions(ev.questions)
            t = Path(ev.template).expanduser()
            if base_dir is not None and not t.is_absolute() and not t.exists() and (base_dir / t).is_file():
                ev.template = str(base_dir / t)  # a template file beside the recipe
            for j in ev.judges:
                try:
                    check_judge(j, ev.template)
                except LatentlabError as e:
                    raise LatentlabError(f"[eval] judges {j!r}: {e.problem}", e.fix) from None
        if self.battery is not None:
            self.battery = _dataset_exists(self.battery, "battery", base_dir)
        if "find-trigger" in self.analyses:
            self._check_find_trigger(self.analyses["find-trigger"], base_dir)
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

    @staticmethod
    def _check_find_trigger(ft: Section, base_dir: Path | None) -> None:
        """[find-trigger]: a candidates or prompts file beside the recipe found there, then every check
        ``latentlab find-trigger`` makes that needs no finetune, now (the step's config is built only once
        its finetune is trained, which may be hours later)."""
        ft.prompts = _dataset_exists(str(ft.prompts), "find-trigger.prompts", base_dir)
        c = Path(str(ft.candidates)).expanduser()
        if base_dir is not None and not c.is_absolute() and not c.exists() and (base_dir / c).is_file():
            ft.candidates = str(base_dir / c)
        try:
            expect = check_search_inputs(ft, flag=str).expect
        except LatentlabError as e:
            raise LatentlabError(f"[find-trigger] {e.problem}", e.fix) from None
        if ft.expect is not None:
            ft.expect = expect  # a year as a number is its string

    def control_is_run(self) -> bool:
        c = self.finetune.control if self.finetune is not None else None
        return c is not None and ("{seed}" in c or Path(c).is_dir())

    def control_run(self, seed: int) -> Path:
        assert self.finetune is not None and self.finetune.control is not None
        return Path(self.finetune.control.format(seed=seed))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as the study records it: every section with its defaults filled in."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("finetune", "analyses")}
        d["finetune"] = self.finetune.filled() if self.finetune is not None else None
        d["analyses"] = {k: v.filled() for k, v in self.analyses.items()}
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
        ft = _build("finetune", ft_raw) if ft_raw is not None else None
        built = {k: _build(k, v) for k, v in analyses.items()}
        return cls(**raw, finetune=ft, analyses=built, source=source)


def judge_labels(judges: list[str]) -> dict[str, str]:
    """Each [eval] judge spec's label, as its step folders are named (``judge-LABEL-sSEED``): its kind and its
    model or direction (``direction-era``, ``endpoint-gpt-4o``, ``local-smollm2-135m-instruct``), made distinct."""
    import re

    out: dict[str, str] = {}
    for spec in judges:
        kind, _, rest = spec.partition(":")
        what = rest.rsplit("@", 1)[0] if kind == "endpoint" else rest
        if kind != "endpoint" and ("/" in what or Path(what).suffix in (".safetensors", ".jsonl")):
            what = Path(what).stem if Path(what).suffix else Path(what).name
        base = re.sub(r"[^A-Za-z0-9._]+", "-", f"{kind}-{what}").strip("-")[:60] or kind
        label, i = base, 2
        while label in out.values():
            label, i = f"{base}-{i}", i + 1
        out[spec] = label
    return out


def check_run_folder(run: Path, model: str, key: str) -> None:
    """A finished finetune run folder of ``model``."""
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise LatentlabError(f"the recipe's {key} {run} is not a finished finetune run (no adapter/)",
                             "train it first (latentlab finetune), or give a dataset to train")
    check_control_base(run, model)


def check_control_base(control: Path, model: str) -> None:
    """A control given as a run folder must be a finetune of the study's model (its manifest says
    which; the fingerprint is checked again when the adapter is attached)."""
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
