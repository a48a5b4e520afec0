"""What every stage shares: how an option is declared, the common option groups, and the run template.

Why one declaration: a command's knowledge (its options, their help, defaults and checks) lives in
one dataclass. The CLI is generated from its fields (:mod:`latentlab.cli`), a study recipe's
section is checked against them (:func:`config_from_mapping`), and the manifest records them
(:func:`config_record`). A new option is one :func:`option` field; a new command is one file in
:mod:`latentlab.stages`.

The run template (:func:`execute` with a :class:`Context`) is what every ``run_X`` repeated: load
the models the config names, start the run folder and its manifest, record the models, write the
results, and mark the run failed (with the error's first line) when something goes wrong after the
folder was started.

This module is imported by ``latentlab --help``: it must stay light (no torch at import time).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from latentlab.errors import LatentlabError, first_line

if TYPE_CHECKING:
    from latentlab.models import LoadedModel
    from latentlab.runs import Run

__all__ = [
    "Context",
    "FinetuneBaseOptions",
    "FinetunedOptions",
    "ModelOptions",
    "OutOptions",
    "ScaleOption",
    "Stage",
    "StageConfig",
    "config_from_mapping",
    "config_record",
    "execute",
    "option",
    "option_fields",
]

DEFAULT_MODEL = "gemma-3-270m"
C = TypeVar("C", bound="StageConfig")
R = TypeVar("R")


def option(
    default: Any = MISSING,
    *,
    help: str,
    flags: tuple[str, ...] = (),
    default_factory: Callable[[], Any] | Any = MISSING,
    cli: bool = True,
    argument: bool = False,
    recipe: bool = True,
) -> Any:
    """A config field that is also a CLI option and a recipe key.

    ``help``: the one help text (CLI ``--help``, docs, recipe errors). ``flags``: the option's
    names when not just ``--field-name`` (aliases such as ``-m`` or ``--base`` go here).
    ``cli=False``: a field for notebooks and studies only (e.g. a nested object). ``argument``: a
    positional CLI argument. ``recipe=False``: a field a study sets itself (never from a section).
    """
    meta = {"help": help, "flags": tuple(flags), "cli": cli, "argument": argument, "recipe": recipe}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def option_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """``(field, resolved type)`` for every declared option of a config class, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]


def _is_path(tp: Any) -> bool:
    """``Path`` or ``Path | None``; a ``list[Path]`` field is its config's to coerce (item by item)."""
    return tp is Path or (typing.get_origin(tp) is not list and Path in typing.get_args(tp))


@dataclass(kw_only=True)
class StageConfig:
    """Base of every stage config: ``__post_init__`` coerces path fields and validates.

    Subclasses validate their own fields in ``__post_init__`` after calling ``super().__post_init__()``,
    so a bad value fails before any model loads or a folder is touched, from the CLI, a recipe or a
    notebook alike.
    """

    #: the command name (``collect``, ``sae train``): set on each subclass, used by ``--out`` checks.
    command: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f, tp in option_fields(type(self)):
            v = getattr(self, f.name)
            if v is not None and _is_path(tp) and not isinstance(v, Path):
                setattr(self, f.name, Path(v))


@dataclass(kw_only=True)
class ModelOptions(StageConfig):
    """The model under study, where it runs and in what precision (one definition for every command)."""

    model: str = option(
        DEFAULT_MODEL, help="Built-in name, hub id or local HF folder (the base model under study).",
        flags=("--model", "-m", "--base"),
    )
    device: str = option("auto", help="cpu, cuda, cuda:N or auto (CUDA when present).")
    device_map: str | None = option(
        None, help="accelerate device map, e.g. auto: spread a model too big for one GPU over all of them."
    )
    dtype: str | None = option("float32", help="float32, bfloat16 or float16.")

    def __post_init__(self) -> None:
        from latentlab.config import check_device_dtype
        from latentlab.models import resolve_device_map

        super().__post_init__()
        check_device_dtype(self.device, self.dtype)
        self.device_map = resolve_device_map(self.device_map)  # type: ignore[assignment]


@dataclass(kw_only=True)
class ScaleOption(StageConfig):
    """A factor on every finetune's LoRA difference (amplification): ``W x + f s B A x``, the control's alike.

    ``scale`` stays the canonical text (``0,0.5,1``; ``1`` by default, so a record made before the option
    existed compares equal); ``_scales`` holds the factors. A command that reports one model at a time sets
    ``several_scales = False`` and is refused more than one factor before a model loads.
    """

    several_scales: typing.ClassVar[bool] = False

    scale: str = option(
        "1", help="Scale the finetunes' LoRA difference by these factors, e.g. 0,0.5,1,2,4 (1 = as trained; the "
        "control is scaled alike)."
    )

    def __post_init__(self) -> None:
        self.scales()
        super().__post_init__()

    def scales(self) -> list[float]:
        """The factors, checked (read once; a config's own checks may need them before this class's)."""
        if getattr(self, "_scales", None) is None:
            from latentlab.adapters import format_scale
            from latentlab.config import adapter_scales

            scales = adapter_scales(self.scale)
            self.scale = ",".join(format_scale(x) for x in scales)
            if len(scales) > 1 and not self.several_scales:
                raise LatentlabError(
                    f"{self.command or 'this command'} takes one --scale factor, got {self.scale}",
                    "run it once per factor (shift and sample take several)",
                )
            self._scales = scales
        return self._scales


@dataclass(kw_only=True)
class FinetuneBaseOptions(ModelOptions, ScaleOption):
    """``model`` as the base that finetunes (adapters or finetune run folders) were trained on: one
    declaration of its help for every command that applies them to it, and ``scale``, the factor on
    their difference."""

    model: str = option(DEFAULT_MODEL, help="Base model the adapters were trained on.",
                        flags=("--model", "-m", "--base"))


@dataclass(kw_only=True)
class FinetunedOptions(FinetuneBaseOptions):
    """A finetune and an optional control finetune of the same base, each applied in turn to it."""

    finetuned: Path = option(help="Finetune run folder or adapter folder.")
    control: Path | None = option(None, help="Control finetune run or adapter folder (same base).")


@dataclass(kw_only=True)
class AdapterOption(StageConfig):
    """A PEFT LoRA adapter merged into a copy of the model (the base stays untouched)."""

    adapter: Path | None = option(None, help="PEFT LoRA adapter folder to merge into a copy of the model.")


@dataclass(kw_only=True)
class OutOptions(StageConfig):
    """The run folder and whether a finished run there may be replaced."""

    out: Path = option(help="Run folder to write.")
    overwrite: bool = option(False, help="Replace a finished run already in --out (refused without it).")

    def __post_init__(self) -> None:
        from latentlab.config import check_out

        super().__post_init__()
        self.out = check_out(self.out, self.overwrite, command=self.command or None)


def config_record(cfg: Any) -> dict[str, Any]:
    """The config as the manifest records it: every field, paths as strings, nested configs as dicts."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) \
        else plain(cfg)


def config_from_mapping(cls: type[C], section: Mapping[str, Any], where: str, /, **wiring: Any) -> C:
    """Build a stage config from a recipe section (checked against the config's fields) plus the
    study's wiring for one step (model, out, seed, ...). An unknown key names the valid ones."""
    known = {f.name for f, _ in option_fields(cls) if f.metadata.get("recipe", True)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise LatentlabError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
            f"use only {', '.join(sorted(known))}",
        )
    return cls(**{**section, **wiring})


@dataclass
class Context:
    """One run of a stage: loads the models its config names, owns the run folder and manifest.

    Models loaded before :meth:`start` are recorded once the folder exists, so a run that fails
    while loading leaves no folder behind.
    """

    cfg: Any
    command: str
    progress: bool = True
    log: Callable[[str], Any] = print
    run: Run | None = None
    _models: dict[str, Any] = field(default_factory=dict)

    def load(
        self, role: str = "model", *, model: str | None = None, adapter: Path | None | str = "config"
    ) -> LoadedModel:
        """The config's model (or ``model``) on its device and dtype, with its adapter (or ``adapter``)."""
        from latentlab.models import load_model

        cfg = self.cfg
        adapter = getattr(cfg, "adapter", None) if adapter == "config" else adapter
        m = load_model(
            model or cfg.model,
            adapter=adapter,
            device=cfg.device,
            dtype=cfg.dtype,
            device_map=getattr(cfg, "device_map", None),
            progress=self.progress,
        )
        self.record(role, m)
        return m

    def record(self, role: str, model: Any) -> None:
        """Record a model's facts in the manifest (now, or when the run starts)."""
        info = getattr(model, "info", model)
        self._models[role] = info
        if self.run is not None:
            self.run.add_model(role, info)

    def start(self, seed: int | None = None) -> Run:
        """Create the run folder and its manifest (status running), with the models loaded so far."""
        from latentlab.runs import Run

        self.run = Run.start(self.cfg.out, self.command, config_record(self.cfg), seed=seed)
        for role, info in self._models.items():
            self.run.add_model(role, info)
        return self.run

    def finish(self, **extra: Any) -> None:
        """Mark the run complete, with ``results=...`` and any other manifest entries."""
        assert self.run is not None, "finish() before start()"
        self.run.finish(**extra)


@dataclass(frozen=True)
class Stage(Generic[C, R]):
    """A command: its config class, ``run(cfg, ctx) -> result`` and ``show(result, cfg, console)``.

    Calling a stage runs it as a notebook would: ``ll.run_collect(CollectConfig(...))``.
    """

    name: str
    config: type[C]
    run: Callable[[C, Context], R]
    show: Callable[[R, C, Any], None] | None = None
    help: str = ""

    def __call__(self, config: C, command: str | None = None, progress: bool = True,
                 log: Callable[[str], Any] | None = None) -> R:
        return execute(self, config, command, progress=progress, log=log)


def execute(stage: Stage[C, R], cfg: C, command: str | None = None, *, progress: bool = True,
            log: Callable[[str], Any] | None = None) -> R:
    """Run a stage; a failure after its folder was started marks the manifest failed, then re-raises."""
    if not isinstance(cfg, stage.config):
        raise TypeError(f"{stage.name} takes a {stage.config.__name__}, got {type(cfg).__name__}")
    ctx = Context(cfg, command or f"latentlab.run_{stage.name.replace(' ', '_')}", progress, log or print)
    try:
        return stage.run(cfg, ctx)
    except BaseException as e:
        if ctx.run is not None and _status(ctx.run) == "running":
            ctx.run.fail(first_line(e) if not isinstance(e, KeyboardInterrupt) else "interrupted")
        raise


def _status(run: Run) -> str | None:
    from latentlab.config import run_holds

    return run_holds(run.out)


def paragraphs(doc: str | None) -> str:
    """A docstring as help text: hand-wrapped lines joined, paragraphs kept (``--help`` rewraps)."""
    import inspect

    text = inspect.cleandoc(doc or "")
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n") if p.strip())


def iter_stages(modules: Iterable[Any]) -> list[Stage[Any, Any]]:
    """The ``STAGE`` (or ``STAGES``) each stage module declares."""
    out: list[Stage[Any, Any]] = []
    for m in modules:
        out.extend(getattr(m, "STAGES", [m.STAGE] if hasattr(m, "STAGE") else []))
    return out
