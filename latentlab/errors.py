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


def first_line(error: BaseException | str) -> str:
    """The first line of a library's error that says what is wrong, for a one-line message.

    peft and torch open with a bare header ("Error(s) in loading state_dict for ...:"), so lines
    ending in ':' are skipped; an empty message falls back to the exception's type.
    """
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    for ln in lines:
        if not ln.endswith(":"):
            return ln[:200]
    fallback = type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    return (lines[0] if lines else fallback)[:200]
