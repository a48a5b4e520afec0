"""Print every command's flags (names, defaults, kinds) as JSON: the snapshot tests/cli/test_flags.py holds.

Why: the CLI is generated from the stage configs; this snapshot, taken from the hand-written typer
commands before the port, is the record that every flag keeps its name and default.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import typer.main

from latentlab.cli import app


def _type_name(annotation: Any) -> str:
    """int, float, str, path or bool, whether optional or a list of them (a CLI value's kind, not its spelling)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) is not None:
        return _type_name(args[0])
    return {Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def flags() -> dict[str, dict[str, Any]]:
    """``{"cmd sub": {param: {...}}}`` for every leaf command of the app."""
    out: dict[str, dict[str, Any]] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                walk(sub, [*path, name])
            return
        params = {}
        for p in cmd.params:
            d = p.default
            d = list(d) if isinstance(d, (list, tuple)) else d
            params[p.name] = {
                "opts": sorted(p.opts),
                "secondary": sorted(getattr(p, "secondary_opts", [])),
                "default": d if d is None or isinstance(d, (int, float, str, bool, list)) else str(d),
                "required": bool(p.required),
                "multiple": bool(getattr(p, "multiple", False)),
                "flag": bool(getattr(p, "is_flag", False)),
                "type": _type_name(p.type_descriptor.annotation),
            }
        out[" ".join(path)] = params

    walk(typer.main.get_command(app), [])
    return out


if __name__ == "__main__":
    print(json.dumps(flags(), indent=1, sort_keys=True))
