"""``latentlab models``: the built-in models, whether each is ready, and its size.

Names are never cut: the name column neither wraps nor gets an ellipsis, and when stdout is not a
terminal (a pipe, a file, a script) the table is laid out at its natural width instead of 80
columns. ``--json`` prints the rows of :func:`latentlab.models.list_models` for scripts. Nothing is
loaded and no run folder is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from latentlab.stages.base import Context, Stage, StageConfig, option

COLUMNS = ("name", "ready", "status", "GGUF MB", "cache MB", "chat", "description")


@dataclass(kw_only=True)
class ModelsConfig(StageConfig):
    """List the built-in models, whether each is ready, and its size."""

    command = "models"
    as_json: bool = option(False, help="Print the rows as JSON on stdout (for scripts).", flags=("--json",))


@dataclass
class ModelsResult:
    """The rows of :func:`latentlab.models.list_models` and the cache folder they live in."""

    rows: list[dict[str, Any]]
    home: str


def run(cfg: ModelsConfig, ctx: Context) -> ModelsResult:
    from latentlab.models import latentlab_home, list_models

    return ModelsResult(list_models(), str(latentlab_home()))


def models_table(rows: list[dict], home: str) -> Any:
    """The ``latentlab models`` table: names and numbers stay on one line, the prose columns wrap."""
    from rich.table import Table

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


def show(res: ModelsResult, cfg: ModelsConfig, console: Any) -> None:
    import json
    import sys

    from rich.console import Console

    rows = res.rows
    if cfg.as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = models_table(rows, res.home)
    if console.is_terminal:
        # rich cuts a no-wrap column only when even one character per other column does not fit:
        # never lay the table out narrower than that (the terminal then wraps the lines instead)
        widest = max((len(r["name"]) for r in rows), default=0)
        width = max(console.width, widest + 2 + 3 * (len(COLUMNS) - 1) + len(COLUMNS) + 1)
    else:  # a pipe or a file has no width: lay the table out whole rather than at 80 columns
        unbounded = console.options.update(max_width=10_000)
        width = max(console.width, console.measure(table, options=unbounded).maximum)
    if width == console.width:
        console.print(table)
    else:  # print(width=) cannot widen a console beyond its own width: use one as wide as needed
        Console(file=console.file, width=width).print(table)


STAGE = Stage("models", ModelsConfig, run, show)
run_models = STAGE
