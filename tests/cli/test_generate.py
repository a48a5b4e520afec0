"""The CLI is generated from the stage configs: one declaration per option."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main

from latentlab.cli import app
from latentlab.errors import LatentlabError
from latentlab.stages import STAGES
from latentlab.stages.base import OutOptions, Stage, StageConfig, config_from_mapping, option, option_fields, paragraphs


def _command(name: str):  # noqa: ANN202
    cmd = typer.main.get_command(app)
    for part in name.split():
        cmd = cmd.commands[part]
    return cmd


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_cli_option_is_a_config_field(stage: Stage) -> None:
    """The command's parameters are exactly the config's CLI fields: nothing declared twice."""
    fields = {f.name for f, _ in option_fields(stage.config) if f.metadata["cli"]}
    params = {p.name for p in _command(stage.name).params}
    assert params == fields


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_help_texts_are_not_broken_mid_sentence(stage: Stage) -> None:
    """Hand-wrapped docstrings become one line per paragraph (the terminal rewraps them)."""
    text = paragraphs(stage.help or stage.config.__doc__)
    assert text, f"{stage.name} has no help text"
    for para in text.split("\n\n"):
        assert "\n" not in para
    for f, _ in option_fields(stage.config):
        assert f.metadata["help"].strip(), f"{stage.name} --{f.name} has no help"


def test_paragraphs_joins_wrapped_lines_and_keeps_paragraphs() -> None:
    doc = """Run a study end to end: finetunes (resumed), analyses, summary.json and a
    self-contained report.html.

    Second paragraph
    wrapped."""
    assert paragraphs(doc) == ("Run a study end to end: finetunes (resumed), analyses, summary.json and a "
                               "self-contained report.html.\n\nSecond paragraph wrapped.")


@dataclass(kw_only=True)
class _Toy(OutOptions):
    """A toy stage."""

    command = "toy"
    n: int = option(3, help="How many.")
    name: str = option("x", help="A name.", recipe=False)


def test_config_from_mapping_names_the_valid_keys(tmp_path: Path) -> None:
    cfg = config_from_mapping(_Toy, {"n": 5}, "recipe section [toy]", out=tmp_path / "o")
    assert cfg.n == 5 and cfg.out == tmp_path / "o"
    with pytest.raises(LatentlabError, match=r"\[toy\]: unknown key 'm'.*use only n, out, overwrite"):
        config_from_mapping(_Toy, {"m": 5}, "recipe section [toy]", out=tmp_path / "o")
    with pytest.raises(LatentlabError, match="unknown key 'name'"):  # a field the study sets, not the recipe
        config_from_mapping(_Toy, {"name": "y"}, "recipe section [toy]", out=tmp_path / "o")


def test_path_fields_are_coerced(tmp_path: Path) -> None:
    assert isinstance(_Toy(out=str(tmp_path / "o")).out, Path)
    assert issubclass(_Toy, StageConfig)


def test_the_cli_imports_no_torch() -> None:
    """Every stage config is read to build ``latentlab --help``: heavy imports stay inside ``run``."""
    import subprocess
    import sys

    code = "import sys, latentlab.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
