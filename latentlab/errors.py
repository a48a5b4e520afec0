"""User-facing errors.

Every problem a researcher can fix (bad path, bad JSONL line, layer out of range) is raised as a
:class:`LatentlabError` carrying the problem *and* the fix, so the CLI can print one line and exit 2
instead of a traceback, and notebooks get the same message.
"""

from __future__ import annotations


class LatentlabError(Exception):
    """A problem with the user's input or environment, with the fix spelled out."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(self.problem + (f". Fix: {fix}" if fix else ""))
