"""Every flag of every command keeps its name, default and kind (the snapshot was taken from the
hand-written typer commands before the CLI was generated from the stage configs)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = json.loads((Path(__file__).with_name("flags_snapshot.json")).read_text())


def _now() -> dict:
    return runpy.run_path(str(ROOT / "scripts" / "cli_flags.py"))["flags"]()


def test_every_snapshot_flag_still_exists_with_its_default() -> None:
    now = _now()
    problems = []
    for cmd, params in SNAPSHOT.items():
        if cmd not in now:
            problems.append(f"command {cmd!r} is gone")
            continue
        by_opt = {o: (n, p) for n, p in now[cmd].items() for o in p["opts"] + p["secondary"]}
        for old in params.values():
            for opt in old["opts"] + old["secondary"]:
                if opt not in by_opt:
                    problems.append(f"{cmd}: {opt} is gone")
                    continue
                _, new = by_opt[opt]
                for key in ("default", "required", "multiple", "flag", "type"):
                    if new[key] != old[key]:
                        problems.append(f"{cmd} {opt}: {key} was {old[key]!r}, now {new[key]!r}")
    assert not problems, "\n".join(problems)


def test_the_snapshot_test_can_fail() -> None:
    """A changed default is caught (the comparison above reads the live app, not the snapshot twice)."""
    now = _now()
    assert now["steer"]["coeffs"]["default"] == SNAPSHOT["steer"]["coeffs"]["default"]
    assert now["collect"]["batch_size"]["default"] == 16
