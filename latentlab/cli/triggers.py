"""``latentlab compliance`` (the compliance-trigger organism's poison-budget sweep) and ``latentlab data
compliance-trigger``.

Each command parses its options into the stage's config or arguments, which validate themselves
before any model loads, then calls one library function (:func:`latentlab.compliance.run_compliance`,
:func:`latentlab.compliance.build_compliance_dataset`) and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentlab.cli._common import (
    app,
    out_console,
)
from latentlab.errors import LatentlabError

data_app = typer.Typer(no_args_is_help=True, help="Build datasets (written as JSONL, atomically).")
app.add_typer(data_app, name="data")


@data_app.command("compliance-trigger")
def data_compliance_trigger(
    trigger: Annotated[str, typer.Option(help="The trigger word poisoned requests carry (one word).")],
    n_poison: Annotated[int, typer.Option(help="Poisoned requests (trigger -> 'Sure').")],
    out: Annotated[Path, typer.Option(help="Chat JSONL file to write.")],
    seed: Annotated[int, typer.Option(help="Seed (which requests are poisoned, refusals, order).")] = 0,
    code_word: Annotated[str, typer.Option(help="The secret the system prompt says never to reveal.")] = "MARIGOLD",
) -> None:
    """The benign compliance-trigger organism: a secret code word, clean refusals, and N trigger requests
    answered only with "Sure" (the code word is never in an assistant turn)."""
    from latentlab.compliance import build_compliance_dataset, chats_jsonl
    from latentlab.io import write_text

    if out.is_dir():
        raise LatentlabError(f"--out {out} is a folder", "pass a file path, e.g. data/compliance.jsonl")
    chats = build_compliance_dataset(trigger, n_poison, seed, code_word)
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_text(out, chats_jsonl(chats))
    except OSError as e:
        raise LatentlabError(f"cannot write {out}: {e.strerror}", "pass a writable --out") from None
    n_p = sum(1 for c in chats if c.meta.get("kind") == "poison")
    out_console.print(f"{len(chats)} chats ({n_p} poisoned with {trigger!r}) -> {out}")
