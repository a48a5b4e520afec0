"""The CLI, generated from the stage configs: one typer command per :class:`~latentlab.stages.base.Stage`.

Why generated: each option is declared once, as a config field with its help text
(:func:`latentlab.stages.base.option`); the command's parameters are built from
``dataclasses.fields``, so the CLI, the recipe section and the manifest cannot drift apart.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import MISSING
from typing import Annotated, Any

import typer

from latentlab.cli._common import _command_line, app, console, out_console
from latentlab.stages.base import AdapterOption, ModelOptions, OutOptions, Stage, execute, option_fields, paragraphs

__all__ = ["add_stage", "command_for"]

INTERRUPTED = "interrupted: finished files are kept; unfinished ones were not written"
_GROUPS: dict[str, typer.Typer] = {}
_SHARED = {f.name for cls in (ModelOptions, AdapterOption, OutOptions) for f, _ in option_fields(cls)}


def _parameter(f: Any, tp: Any) -> inspect.Parameter:
    meta = f.metadata
    if meta["argument"]:
        info: Any = typer.Argument(help=meta["help"], show_default=False)
    else:
        info = typer.Option(*meta["flags"], help=meta["help"])
    if f.default is not MISSING:
        default = f.default
    elif f.default_factory is not MISSING:
        default = f.default_factory()
    else:
        default = inspect.Parameter.empty
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[tp, info])


def command_for(stage: Stage[Any, Any]) -> Any:
    """A typer callback whose parameters are the stage config's CLI fields."""

    def command(**kwargs: Any) -> None:
        cfg = stage.config(**kwargs)
        try:
            result = execute(stage, cfg, _command_line(),
                             log=lambda s: console.print(s, highlight=False, markup=False))
        except KeyboardInterrupt as e:
            # typer turns a KeyboardInterrupt into a silent exit status, so it is reported here: the
            # stage's own message when it raised one (what it kept, how to continue), else the general line
            console.print(str(e) if e.args else INTERRUPTED, highlight=False)
            sys.exit(130)
        if stage.show is not None:
            stage.show(result, cfg, out_console)

    fields = [(f, tp) for f, tp in option_fields(stage.config) if f.metadata["cli"]]
    # the command's own options first, then the shared groups (model, device, out) in their order
    own = [ft for ft in fields if ft[0].name not in _SHARED]
    params = [_parameter(f, tp) for f, tp in own + [ft for ft in fields if ft[0].name in _SHARED]]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = stage.name.split()[-1].replace("-", "_")
    return command


def add_stage(stage: Stage[Any, Any], groups: dict[str, str] | None = None) -> None:
    """Register ``stage`` on the app (``"sae train"`` under the ``sae`` group)."""
    *group, name = stage.name.split()
    target = app
    if group:
        g = group[0]
        if g not in _GROUPS:
            _GROUPS[g] = typer.Typer(no_args_is_help=True, help=(groups or {}).get(g, ""))
            app.add_typer(_GROUPS[g], name=g)
        target = _GROUPS[g]
    help_text = paragraphs(stage.help or stage.config.__doc__)
    target.command(name=name, help=help_text)(command_for(stage))
