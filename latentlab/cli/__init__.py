"""``latentlab`` command line: a thin layer over the library.

Each command parses options into the config a notebook would build, calls one library function,
and prints. Problems the user can fix come out as one line (``error: ... Fix: ...``) with exit code
2; ``--debug`` shows the traceback. The commands are generated from the stage configs
(:mod:`latentlab.cli.generate`); shared options live in :mod:`latentlab.cli._common`.
"""

from __future__ import annotations

import sys

from latentlab.cli._common import _DEBUG, app, console
from latentlab.cli.generate import add_stage
from latentlab.errors import LatentlabError
from latentlab.stages import STAGES

__all__ = ["app", "main"]

#: the help of each command group (``latentlab sae --help``), by group name
GROUPS = {
    "sae": "Sparse-autoencoder latents: train a small SAE, find the latents behind a direction or a finetune's shift.",
    "data": "Build datasets (written as JSONL, atomically).",
}

for _stage in STAGES:
    add_stage(_stage, GROUPS)


def main() -> None:
    """Entry point: run the app, turning LatentlabError into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except LatentlabError as e:
        if _DEBUG["on"] or "--debug" in sys.argv:
            raise
        from rich.markup import escape

        # escape: a message may quote brackets ("[finetune]", a list) that rich would read as markup
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: finished files are kept; unfinished ones were not written")
        sys.exit(130)
    except Exception as e:
        # Usage errors. typer >= 0.29 raises its vendored click's exceptions (typer._click), not
        # click's, so match the protocol (show() + exit_code) rather than a class.
        kind = type(e).__name__
        if kind == "Abort":
            sys.exit(130)
        if kind == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        raise
