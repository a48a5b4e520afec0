"""``latentlab`` command line: a thin layer over the library.

Each command parses options, calls the library function a notebook would call, and writes a run
folder. Problems the user can fix come out as one line (``error: ... Fix: ...``) with exit code 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from latentlab.errors import LatentlabError

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
AdapterOpt = Annotated[Optional[Path], typer.Option(help="PEFT LoRA adapter folder to merge into a copy of the model.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (CUDA when present).")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    _DEBUG["on"] = debug
    if not debug:
        warnings.filterwarnings("ignore")
        import logging

        logging.getLogger("transformers").setLevel(logging.ERROR)


def _command_line() -> str:
    return "latentlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@app.command()
def models() -> None:
    """List the built-in models, whether each is ready, and its size."""
    from latentlab.models import latentlab_home, list_models

    table = Table(title=f"built-in models (cache: {latentlab_home()})")
    for col in ("name", "ready", "status", "GGUF MB", "cache MB", "chat", "description"):
        table.add_column(col)
    for r in list_models():
        ready = "yes" if r["status"] == "ready" else "no"
        table.add_row(r["name"], ready, r["status"], str(r["gguf_mb"]), str(r["cache_mb"]),
                      "yes" if r["chat"] else "no", r["description"])
    out_console.print(table)


@app.command()
def collect(
    data: Annotated[str, typer.Option(help="JSONL file ({'text'} or chat lines) or a built-in dataset name.")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    model: ModelOpt = "gemma-3-270m",
    adapter: AdapterOpt = None,
    layers: Annotated[str, typer.Option(help="e.g. 0,6,12 or 4-10 or all.")] = "all",
    position: Annotated[str, typer.Option(help="last, mean, all, prompt_last or response_mean.")] = "last",
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 16,
    shard_size: Annotated[int, typer.Option(help="Examples per on-disk shard.")] = 4096,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Collect residual-stream activations into OUT/activations (safetensors + JSON)."""
    from latentlab.activations import POSITIONS
    from latentlab.activations import collect as do_collect
    from latentlab.data import dataset_hash, load_texts
    from latentlab.models import load_model
    from latentlab.runs import Run

    if position not in POSITIONS:
        raise LatentlabError(f"unknown position {position!r}", f"use one of {', '.join(POSITIONS)}")
    examples = load_texts(data)  # validate before loading a model
    run = Run.start(out, _command_line(), {"data": data, "model": model, "adapter": adapter, "layers": layers,
                                          "position": position, "batch_size": batch_size, "device": device,
                                          "dtype": dtype})
    m = load_model(model, adapter=adapter, device=device, dtype=dtype)
    run.add_model("model", m.info)
    layer_list = m.check_layers(layers)
    do_collect(m, examples, layer_list, position, batch_size=batch_size, out=run.out / "activations",
               shard_size=shard_size, meta={"dataset": str(data), "dataset_hash": dataset_hash(data)}, load=False)
    from latentlab.io import read_json

    info = read_json(run.out / "activations" / "activations.json")
    run.finish(results={"n_examples": info["n_examples"], "n_tokens": info["n_tokens"],
                        "tokens_per_s": info["tokens_per_s"], "layers": layer_list})
    out_console.print(
        f"collected {info['n_examples']} examples x {len(layer_list)} layers ({position}) "
        f"at {info['tokens_per_s']:.0f} tok/s -> {run.out / 'activations'}"
    )


def main() -> None:
    """Entry point: run the app, turning LatentlabError into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except LatentlabError as e:
        if _DEBUG["on"] or "--debug" in sys.argv:
            raise
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: finished files are kept; unfinished ones were not written")
        sys.exit(130)
    except Exception as e:  # click usage errors and friends
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
