"""What every command shares: the typer app, consoles, common options and small loaders."""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="latentlab: find, measure and steer era and persona latents in language models.",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out_console = Console()
_DEBUG = {"on": False}

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Built-in name, hub id or local HF folder.")]
AdapterOpt = Annotated[Path | None, typer.Option(help="PEFT LoRA adapter folder to merge into a copy of the model.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (CUDA when present).")]
def _check_device_map(value: str | None) -> str | None:
    from latentlab.models import resolve_device_map

    return resolve_device_map(value)  # type: ignore[return-value]


DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        help="accelerate device map, e.g. auto: spread a model too big for one GPU over all of them.",
        callback=_check_device_map,
    ),
]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]


def _print_version(value: bool) -> None:
    if value:
        from latentlab import __version__

        typer.echo(f"latentlab {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    _DEBUG["on"] = debug
    if not debug:
        warnings.filterwarnings("ignore")
        import logging

        logging.getLogger("transformers").setLevel(logging.ERROR)


def _command_line() -> str:
    return "latentlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])




DirectionOpt = Annotated[
    str, typer.Option(help="era, persona, a contrast-pair JSONL, or a saved direction .safetensors.")
]
OutOpt = Annotated[Path, typer.Option(help="Run folder to write.")]
OverwriteOpt = Annotated[
    bool, typer.Option(help="Replace a finished run already in --out (refused without it).")
]
