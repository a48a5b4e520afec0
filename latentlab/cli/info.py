"""``latentlab models``: the built-in models, whether each is ready, and its size.

Names are never cut: the name column neither wraps nor gets an ellipsis, and when stdout is not a
terminal (a pipe, a file, a script) the table is laid out at its natural width instead of 80
columns. ``--json`` prints the rows of :func:`latentlab.models.list_models` for scripts.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from latentlab.cli._common import app, out_console

COLUMNS = ("name", "ready", "status", "GGUF MB", "cache MB", "chat", "description")


def models_table(rows: list[dict], home: str) -> Table:
    """The ``latentlab models`` table: names and numbers stay on one line, the prose columns wrap."""
    table = Table(title=f"built-in models (cache: {home})")
    # The name never wraps (and is folded, never cut, in the last resort of a very narrow terminal);
    # the other columns wrap at spaces, folding a word too long for them rather than cutting it.
    table.add_column("name", no_wrap=True, overflow="fold")
    for col in COLUMNS[1:]:
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            "yes" if r["status"] == "ready" else "no",
            r["status"],
            str(r["gguf_mb"]),
            str(r["cache_mb"]),
            "yes" if r["chat"] else "no",
            r["description"],
        )
    return table


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON on stdout (for scripts).")] = False,
) -> None:
    """List the built-in models, whether each is ready, and its size."""
    from latentlab.models import latentlab_home, list_models

    rows = list_models()
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = models_table(rows, str(latentlab_home()))
    if out_console.is_terminal:
        # rich cuts a no-wrap column only when even one character per other column does not fit:
        # never lay the table out narrower than that (the terminal then wraps the lines instead)
        widest = max((len(r["name"]) for r in rows), default=0)
        width = max(out_console.width, widest + 2 + 3 * (len(COLUMNS) - 1) + len(COLUMNS) + 1)
    else:  # a pipe or a file has no width: lay the table out whole rather than at 80 columns
        unbounded = out_console.options.update(max_width=10_000)
        width = max(out_console.width, out_console.measure(table, options=unbounded).maximum)
    if width == out_console.width:
        out_console.print(table)
    else:  # print(width=) cannot widen a console beyond its own width: use one as wide as needed
        Console(file=out_console.file, width=width).print(table)
