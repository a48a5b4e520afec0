"""``latentlab study RECIPE``: run a recipe end to end into one folder, resumably, then summarise.

Why a plan of steps over the stages' own ``run_*`` functions: every part of a study is a normal run
folder (manifest, results.json, plots) that the single commands would have written, so each can be
opened, rerun or cited alone; the study only decides the order, the folders and what to skip.

Skipping is never silent and never stale: a finished step is skipped only when its manifest records
the very config this study would run (else the study stops and names the keys that differ); an
interrupted finetune resumes from its last checkpoint; an interrupted analysis is rerun.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentlab.compliance import budget_dir
from latentlab.config import run_holds
from latentlab.data import BUILTIN_DATASETS
from latentlab.io import read_json, write_json
from latentlab.runs import RunState, finetune_progress, run_state
from latentlab.stages import stage_named
from latentlab.stages.base import config_from_mapping, config_record
from latentlab.study.recipe import SECTIONS, Section, judge_labels
from latentlab.triggers import parse_values

if TYPE_CHECKING:
    from latentlab.stages.study import StudyConfig

__all__ = ["Step", "StudyRun", "plan_steps", "shift_layers", "step_needs"]

STATE = "study.json"
_IGNORED = ("overwrite", "resume")


@dataclass
class Step:
    """One run folder of the study: ``make`` builds the stage config (it may read earlier steps'
    results, so it is called only when the step's turn comes); ``run`` runs it.

    ``needs``: the keys of the steps whose folders this one reads (its finetunes, the study's direction,
    the seed's shift for ``shift``/``peak`` layers), all earlier in the plan; an executor may start the
    step as soon as those finished. ``None``: not declared, so every earlier step comes first (the
    plan's order, which always satisfies the needs).
    """

    key: str
    kind: str
    out: Path
    make: Callable[[], Any]
    run: Callable[[Any], Any]
    seed: int | None = None
    finetune: bool = False
    needs: tuple[str, ...] | None = None
    stage: str = ""


def step_needs(steps: list[Step]) -> dict[str, tuple[str, ...]]:
    """Each step's needs, an undeclared one (``None``) read as every earlier step."""
    out: dict[str, tuple[str, ...]] = {}
    for st in steps:
        out[st.key] = tuple(out) if st.needs is None else st.needs
    return out


def _check_needs(steps: list[Step]) -> None:
    """Every need names an earlier step, so the plan's order satisfies them and they form no cycle."""
    seen: set[str] = set()
    for st in steps:
        late = [k for k in st.needs or () if k not in seen]
        if late:
            raise AssertionError(f"study plan: {st.key} needs {late}, not earlier steps")
        seen.add(st.key)


# Recipe settings that only the summary reads: changing them reuses every finished step.
SUMMARY_ONLY = (("trigger", "held_out"),)


def _step_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe without its summary-only settings (what decides whether a finished study matches)."""
    out = _norm(recipe)  # a copy
    # every section with its defaults filled in, so a study recorded before a default was written
    # out (or by an older latentlab that recorded fewer keys) compares by meaning, not by spelling
    if isinstance(out.get("finetune"), dict):
        out["finetune"] = _norm({**Section("finetune", {}).filled(), **out["finetune"]})
    for kind, values in out.get("analyses", {}).items():
        if kind in SECTIONS and isinstance(values, dict):
            out["analyses"][kind] = _norm({**Section(kind, {}).filled(), **values})
    for analysis, key in SUMMARY_ONLY:
        out.get("analyses", {}).get(analysis, {}).pop(key, None)
    return out


# Top-level recipe keys no step reads (where the recipe came from, and the report's prose).
PROSE = ("source", "description")

# List settings a finished study may grow: every finished step stays valid (step folders are named by
# seed, by ablation layer spec and by [eval] judge), so only the new entries' steps run.
GROWABLE = (("seeds",), ("analyses", "ablation", "layers"), ("analyses", "eval", "judges"))


def _grown(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with each growable list replaced by ``new``'s where ``new`` only adds entries to it."""
    out = _norm(old)
    for path in GROWABLE:
        o, n = out, new
        for key in path[:-1]:
            o, n = o.get(key), n.get(key)
            if not isinstance(o, dict) or not isinstance(n, dict):
                break
        else:
            a, b = o.get(path[-1]), n.get(path[-1])
            if isinstance(a, list) and isinstance(b, list) and set(map(str, a)) <= set(map(str, b)):
                o[path[-1]] = b
    return out


def _norm(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _config_dict(cfg: Any) -> dict[str, Any]:
    d = config_record(cfg)
    return {k: v for k, v in _norm(d).items() if k not in _IGNORED and not k.startswith("_")}


def _rooted(x: Any, roots: list[str]) -> Any:
    """Paths inside the study folder written relative to it, so a moved or copied study still matches."""
    if isinstance(x, str):
        for r in roots:
            if r and (x == r or x.startswith(r.rstrip("/") + "/")):
                return "<study>" + x[len(r.rstrip("/")):]
        name, sep, path = x.partition("=")  # a named run, NAME=PATH (the [eval] sample step's arms)
        if sep and name and "/" not in name and (rooted := _rooted(path, roots)) != path:
            return f"{name}={rooted}"
        return x
    if isinstance(x, dict):
        return {k: _rooted(v, roots) for k, v in x.items()}
    if isinstance(x, list):
        return [_rooted(v, roots) for v in x]
    return x


def _roots(p: str | Path) -> list[str]:
    p = Path(p)
    return sorted({str(p), str(p.expanduser().resolve())}, key=len, reverse=True)


def _defaults(cfg: Any) -> dict[str, Any]:
    """The config's field defaults: what a run recorded before a field existed ran with."""
    return _norm({f.name: f.default for f in fields(cfg) if f.default is not MISSING})


def _comparable(recorded: dict[str, Any], old_roots: list[str], plan: dict[str, Any],
                defaults: dict[str, Any] | None) -> dict[str, Any]:
    """A finished step's recorded config as the (rooted) plan is compared with it."""
    rec = {k: v for k, v in _rooted(_norm(recorded), old_roots).items() if k not in _IGNORED and not k.startswith("_")}
    # a key the record lacks matches the planned default: a field added since (e.g. compliance's
    # LoRA options) does not make a finished step of the same settings stale
    return {**{k: v for k, v in (defaults or {}).items() if k in plan and k not in rec}, **rec}


def _differs(recorded: dict[str, Any], planned: dict[str, Any], old_roots: list[str],
             new_roots: list[str], defaults: dict[str, Any] | None = None) -> list[str]:
    plan = _rooted(planned, new_roots)
    rec = _comparable(recorded, old_roots, plan, defaults)
    return sorted(k for k in set(rec) | set(plan) if rec.get(k) != plan.get(k))


def shift_layers(shift_dir: Path) -> list[int]:
    """The layers where a study's paired shift (finetuned - control) has its bootstrap interval
    over prompts above 0: "where the shift lives" for ablation and prevention."""
    r = json.loads((shift_dir / "results.json").read_text())
    st = _as_trained(r, shift_dir)
    return [layer for layer, ci in zip(r["layers"], st["projection_ci"]) if ci[0] > 0]


def peak_layer(shift_dir: Path) -> int:
    """The layer where a seed's paired shift (finetuned - control) is largest in magnitude: the
    ``peak`` layer spec, one layer to ablate where many-layer ablations hit a ceiling."""
    r = json.loads((shift_dir / "results.json").read_text())
    means = _as_trained(r, shift_dir)["projection"]
    return int(r["layers"][max(range(len(means)), key=lambda i: abs(means[i]))])


def _as_trained(r: dict[str, Any], shift_dir: Path) -> dict[str, Any]:
    """The paired shift of the finetune as trained (factor 1): a shift step amplified only at other
    factors (``[shift] scale``) says nothing about where the trained finetune's shift lives."""
    if "finetuned - control" not in r["stats"]:
        raise NotApplicable(f"{shift_dir.name} measured no factor 1 ([shift] scale = "
                            f"{','.join(map(str, r.get('by_scale', {})))}), so its layers are not the trained "
                            "finetune's")
    return r["stats"]["finetuned - control"]


def _arm(name: str) -> str:
    return name if name in BUILTIN_DATASETS else Path(name).stem


def _layer_label(spec: str) -> str:
    return spec if spec in ("shift", "all", "peak") else "L" + spec.replace(",", "_")


class NotApplicable(Exception):
    """A step whose precondition the data did not meet (e.g. no layer with a shift): recorded, not run."""


def _section_step(cfg: StudyConfig, stage_name: str, key: str, out: Path, step_seed: int | None, *,
                  kind: str | None = None, section: str | None = None, label: str | None = None,
                  needs: Iterable[str] | None = None, **wiring: Any) -> Step:
    """A step running stage ``stage_name`` whose config is the recipe's ``[section]`` table (if any) plus
    this step's wiring (model, folders, seed, device). Wiring given as a callable is read when the
    step's turn comes (it may need an earlier step's results, e.g. the shift layers); ``needs`` names
    the steps that write what the wiring reads (:attr:`Step.needs`)."""
    r = cfg.recipe_obj
    sec = r.finetune if section == "finetune" else r.analyses.get(section) if section else None
    stage = stage_named(stage_name)
    values = sec.stage_values() if sec is not None and SECTIONS[section].stage == stage_name else {}

    def make() -> Any:
        wired = {k: (v() if callable(v) else v) for k, v in wiring.items()}
        if "overwrite" in {f.name for f in fields(stage.config)}:
            # the study decides what to rerun (a finished step is checked, an interrupted one redone)
            wired.setdefault("overwrite", True)
        return config_from_mapping(stage.config, values, f"recipe section [{section}]", out=out,
                                   model=r.model, device=cfg.device, **wired)

    return Step(key, kind or section or stage_name, out, make,
                lambda c: stage(c, f"latentlab study: {label or stage_name}"), step_seed,
                finetune=stage_name == "finetune", needs=None if needs is None else tuple(dict.fromkeys(needs)),
                stage=stage_name)


def plan_steps(cfg: StudyConfig) -> list[Step]:
    """The study's steps in run order (finetunes before the analyses that read them): each a stage
    config from its recipe section plus the wiring for its seed."""
    r, out = cfg.recipe_obj, cfg.out
    dt = cfg.dtype
    steps: list[Step] = []
    uses_direction = any(a in r.analyses for a in ("shift", "screen", "ablation", "prevention", "patch", "trigger"))
    # what a step reads, named by the step that writes it: the study's own direction, and the finetunes
    # the study trains (by folder; an external run is no step's)
    read_direction: tuple[str, ...] = ()
    trained: dict[Path, str] = {}
    if Path(r.direction).suffix == ".safetensors" or not uses_direction:
        direction = str(Path(r.direction))
    else:
        direction = str(out / "direction" / "direction.safetensors")
        steps.append(_section_step(cfg, "direction", "direction", out / "direction", None,
                                   direction=r.direction, dtype=dt, overwrite=True, needs=()))
        read_direction = ("direction",)
    ft = r.finetune

    def trains(*folders: Path | None) -> tuple[str, ...]:
        """The steps that train these finetune folders."""
        return tuple(trained[f] for f in folders if f is not None and f in trained)

    def finetune_step(key: str, data: str, folder: Path, seed: int,
                      ablate: Callable[[], list[str]] | None = None, needs: tuple[str, ...] = ()) -> Step:
        def resume() -> bool:  # interrupted: a complete checkpoint and no adapter yet
            return finetune_progress(folder) == "resume"

        trained[folder] = key
        return _section_step(cfg, "finetune", key, folder, seed, section="finetune", data=data, seed=seed,
                             resume=resume, overwrite=lambda: not resume(), ablate=ablate or [],
                             dtype=None if dt == "float32" else dt, needs=needs)

    ana = r.analyses
    data_arm = _arm(ft.data) if ft else ""
    ctrl_arm = _arm(ft.control) if ft and ft.control and not r.control_is_run() else None
    runs: dict[tuple[str, int], Path] = {}
    if ft is not None:
        for seed in r.seeds:
            if ft.runs is not None:
                runs[("finetuned", seed)] = Path(ft.runs.format(seed=seed))
            else:
                runs[("finetuned", seed)] = out / "finetunes" / f"{data_arm}-s{seed}"
                steps.append(finetune_step(f"finetune:{data_arm}-s{seed}", ft.data, runs[("finetuned", seed)], seed))
            if ft.control is not None:
                if r.control_is_run():
                    runs[("control", seed)] = r.control_run(seed)
                else:
                    runs[("control", seed)] = out / "finetunes" / f"{ctrl_arm}-s{seed}"
                    steps.append(finetune_step(f"finetune:{ctrl_arm}-s{seed}", ft.control, runs[("control", seed)],
                                               seed))

    first = r.seeds[:1]
    if "screen" in ana:
        assert ft is not None
        for data in [ft.data] + ([ft.control] if ft.control and not r.control_is_run() else []):
            steps.append(_section_step(cfg, "screen", f"screen:{_arm(data)}", out / f"screen-{_arm(data)}", None,
                                       section="screen", data=data, direction=direction, dtype=dt, overwrite=True,
                                       needs=read_direction))
    for seed in r.seeds:
        ftr, ctr = runs.get(("finetuned", seed)), runs.get(("control", seed))
        common = {"seed": seed, "dtype": dt}
        if "shift" in ana:
            steps.append(_section_step(cfg, "shift", f"shift-s{seed}", out / f"shift-s{seed}", seed, section="shift",
                                       finetuned=[ftr], control=[ctr], direction=direction, prompts=r.prompts,
                                       battery=r.battery, overwrite=True, needs=trains(ftr, ctr) + read_direction,
                                       **common))

        def layers_read(spec: str, seed: int = seed) -> tuple[str, ...]:
            """``shift`` / ``peak`` layers are read from this seed's shift results."""
            return (f"shift-s{seed}",) if spec in ("shift", "peak") and "shift" in ana else ()

        def resolve_layers(spec: str, seed: int = seed) -> str:
            if spec not in ("shift", "peak"):
                return spec
            sd = out / f"shift-s{seed}"
            if not (sd / "results.json").exists():
                raise NotApplicable(f"layers = {spec!r} needs the [shift] analysis")
            if spec == "peak":
                return str(peak_layer(sd))
            layers = shift_layers(sd)
            if not layers:
                raise NotApplicable(f"no layer where seed {seed}'s paired shift has its interval above 0")
            return ",".join(str(x) for x in layers)

        if "ablation" in ana:
            for spec in ana["ablation"].layers:
                key = f"ablate-{_layer_label(spec)}-s{seed}"
                steps.append(_section_step(cfg, "ablate", key, out / key, seed, section="ablation",
                                           finetuned=ftr, control=ctr, direction=direction, battery=r.battery,
                                           layers=lambda spec=spec, rl=resolve_layers: rl(spec), overwrite=True,
                                           needs=trains(ftr, ctr) + read_direction + layers_read(spec), **common))
        if "prevention" in ana:
            assert ft is not None
            pf = out / "finetunes" / f"{data_arm}-ablated-s{seed}"
            runs[("ablated", seed)] = pf
            spec = ana["prevention"].layers
            steps.append(finetune_step(f"finetune:{data_arm}-ablated-s{seed}", ft.data, pf, seed,
                                       ablate=lambda spec=spec, rl=resolve_layers: [f"{direction}@{rl(spec)}"],
                                       needs=read_direction + layers_read(spec)))
            steps.append(_section_step(cfg, "shift", f"prevent-s{seed}", out / f"prevent-s{seed}", seed,
                                       kind="prevention", section="shift" if "shift" in ana else None,
                                       label="prevention shift", finetuned=[ftr, pf], control=[ctr],
                                       direction=direction, prompts=r.prompts, battery=r.battery, overwrite=True,
                                       needs=trains(ftr, pf, ctr) + read_direction, **common))
        if "diff" in ana and seed in (ana["diff"].seeds or first):
            steps.append(_section_step(cfg, "diff", f"diff-s{seed}", out / f"diff-s{seed}", seed, section="diff",
                                       finetuned=ftr, control=ctr, prompts=r.prompts, dtype=dt, overwrite=True,
                                       needs=trains(ftr, ctr)))
        if "patch" in ana and seed in (ana["patch"].seeds or first):
            steps.append(_section_step(cfg, "patch", f"patch-s{seed}", out / f"patch-s{seed}", seed, section="patch",
                                       finetuned=ftr, battery=r.battery or "era", direction=direction,
                                       overwrite=True, needs=trains(ftr) + read_direction, **common))
        if "trigger" in ana:
            t = ana["trigger"]
            for arm, run_dir in (("finetuned", ftr), ("control", ctr)):
                if run_dir is None:
                    continue
                key = f"trigger-{arm}-s{seed}"
                steps.append(_section_step(cfg, "trigger", key, out / key, seed, section="trigger", finetuned=run_dir,
                                           direction=direction, prompts=r.prompts, values=parse_values(t.values),
                                           needs=trains(run_dir) + read_direction, **common))
        sweep = out / "finetunes" / f"compliance-s{seed}"  # the compliance step's finetunes, n-N/ per budget
        if "compliance" in ana:
            c = ana["compliance"]
            steps.append(_section_step(cfg, "compliance", f"compliance-s{seed}", out / f"compliance-s{seed}", seed,
                                       section="compliance", finetunes=sweep,
                                       patch=c.patch and seed == r.seeds[0], needs=(), **common))
        if "find-trigger" in ana:
            # the seed's [finetune] arm; without [finetune], the compliance finetune at the largest budget
            searched, reads = (ftr, trains(ftr)) if ftr is not None else (
                budget_dir(sweep, max(ana['compliance'].budgets)), (f"compliance-s{seed}",))
            key = f"find-trigger-s{seed}"
            steps.append(_section_step(cfg, "find-trigger", key, out / key, seed, section="find-trigger",
                                       finetuned=searched, needs=reads, **common))
        if "eval" in ana:
            arms = ana["eval"].arms
            reads = trains(*(f for arm, f in (("finetune", ftr), ("control", ctr),
                                              ("preventative", runs.get(("ablated", seed)))) if arm in arms))
            if "ablated" in arms:
                reads += read_direction + tuple(k for spec in ana["ablation"].layers for k in layers_read(spec))
            steps += _eval_steps(cfg, seed, runs, direction, resolve_layers, reads)
    _check_needs(steps)
    return steps


def _eval_steps(cfg: StudyConfig, seed: int, runs: dict[tuple[str, int], Path], direction: str,
                resolve_layers: Callable[[str], str], needs: tuple[str, ...]) -> list[Step]:
    """[eval] for one seed: a sample step drawing every arm's answers (arms named as in the recipe: finetune,
    control, base, preventative, and each again as ``ARM+ablate(DIRECTION@LAYERS)``), then one judge step
    per judge reading them. The arms are decided when the step's turn comes: the ablation layers and the
    prevention finetune may depend on the shift. ``needs``: the steps the sample step reads."""
    r, out = cfg.recipe_obj, cfg.out
    ev = r.analyses["eval"]
    arms = ev.arms
    folder = out / f"sample-s{seed}"

    def finetuned() -> list[str]:
        named = [f"finetune={runs[('finetuned', seed)]}"] if "finetune" in arms else []
        pf = runs.get(("ablated", seed))
        if "preventative" in arms and pf is not None and (pf / "adapter").is_dir():  # else not trained (not run)
            named.append(f"preventative={pf}")
        if not named and not {"base", "control"} & set(arms):
            raise NotApplicable(f"no arm to sample: seed {seed}'s [prevention] finetune was not trained")
        return named

    def ablate() -> list[str]:
        specs = []
        for spec in r.analyses["ablation"].layers if "ablated" in arms else []:
            try:
                specs.append(f"{direction}@{resolve_layers(spec)}")
            except NotApplicable:  # e.g. no shift layer in this seed: that ablated arm is left out
                continue
        return list(dict.fromkeys(specs))

    def samples() -> Path:
        if not (folder / "samples.jsonl").is_file():
            raise NotApplicable(f"seed {seed}'s answers were not sampled")
        return folder

    steps = [_section_step(cfg, "sample", f"sample-s{seed}", folder, seed, section="eval", finetuned=finetuned,
                           control=f"control={runs[('control', seed)]}" if "control" in arms else None,
                           ablate=ablate, no_base="base" not in arms, seed=seed, dtype=cfg.dtype, needs=needs,
                           overwrite=False)]  # an interrupted sample step resumes (its rows are kept)
    for spec, label in judge_labels(ev.judges).items():
        key = f"judge-{label}-s{seed}"
        steps.append(_section_step(cfg, "judge", key, out / key, seed, section="eval", judge=spec,
                                   template=ev.template, samples=samples, dtype=cfg.dtype,
                                   needs=(f"sample-s{seed}",)))
    return steps


def external_runs(cfg: StudyConfig) -> dict[str, str]:
    """Finetune runs the study analyses but did not train (``finetune.runs``, a control run folder)."""
    r = cfg.recipe_obj
    out: dict[str, str] = {}
    if r.finetune is None:
        return out
    for seed in r.seeds:
        if r.finetune.runs is not None:
            out[f"finetuned-s{seed}"] = str(Path(r.finetune.runs.format(seed=seed)).resolve())
        if r.control_is_run():
            out[f"control-s{seed}"] = str(r.control_run(seed).resolve())
    return out


def _finished(st: Step) -> bool:
    """The step's manifest says complete (a finetune's adapter is :func:`_finetune_state`'s to check)."""
    return st.out.is_dir() and run_holds(st.out) == "complete"


def _finetune_state(st: Step, conf: Any, old_roots: list[str], new_roots: list[str]) -> RunState:
    """A finetune step's folder as :func:`latentlab.runs.run_state` decides it: ``done`` (a finished run of
    the planned config: skipped; of another config: refused), ``resume`` (a complete checkpoint and no
    adapter: continued) or ``new`` (trained).

    The record compared is the config the manifest records once the run finished. An adapter whose run
    did not finish (killed after training, before its plots) has none and is trained again; an
    interrupted run is resumed, its checkpoint compared by the trainer (its state records the training
    settings, data and base).
    """
    plan = _rooted(_config_dict(conf), new_roots)
    finished = _finished(st)

    def record(folder: Path) -> Any:
        if finetune_progress(folder) == "resume":
            return plan  # interrupted: LoraTrainer.resume checks the checkpoint
        if not finished:
            return None  # an adapter without a finished run: retrained (overwrite below)
        return _comparable(read_json(folder / "manifest.json").get("config", {}), old_roots, plan, _defaults(conf))

    return run_state(st.out, plan, overwrite=not finished, record=record,
                     fix="choose a new --out for this recipe, or delete that folder to rerun it")


@dataclass
class StudyRun:
    """One session of a study as its driver sees it: the plan, ``study.json`` (``state``, only the driver
    writes it) and what a step's turn decides before the step runs. An executor
    (:mod:`latentlab.study.executors`) decides only when and where each step runs."""

    cfg: StudyConfig
    steps: list[Step]
    state: dict[str, Any]
    path: Path
    old_roots: list[str]
    new_roots: list[str]
    say: Callable[[str], None]

    def save(self) -> None:
        write_json(self.path, self.state)

    def tag(self, st: Step) -> str:
        return f"[{self.steps.index(st) + 1}/{len(self.steps)}] {st.key}"

    def record(self, st: Step, status: str, **extra: Any) -> None:
        """The step's entry in study.json, replaced (not saved: :meth:`save`)."""
        self.state["steps"][st.key] = {"kind": st.kind, "out": _rel(st.out, self.cfg.out), "status": status,
                                       "seed": st.seed, **extra}

    def turn(self, st: Step) -> tuple[Any, str] | None:
        """The step's config and how it is about to run (``running``, ``resuming`` or ``rerunning
        (interrupted)``), or ``None`` when it does not run: not applicable (recorded with why) or
        finished already with the planned settings (recorded done, skipped)."""
        tag = self.tag(st)
        status = run_holds(st.out) if st.out.is_dir() else None
        try:
            conf = st.make()
        except NotApplicable as e:
            self.record(st, "not run", reason=str(e))
            self.save()
            self.say(f"{tag}: not run ({e})")
            return None
        if (_finetune_state(st, conf, self.old_roots, self.new_roots) == "done") if st.finetune else _finished(st):
            entry = self.state["steps"].setdefault(st.key, {})
            entry.update(kind=st.kind, out=_rel(st.out, self.cfg.out), status="done", seed=st.seed)
            self.say(f"{tag}: done already, skipped")
            return None
        how = "resuming" if getattr(conf, "resume", False) else ("rerunning (interrupted)" if status else "running")
        return conf, how


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)
