"""A small birds study on smollm2-135m-instruct (1 seed, a few finetune steps): the report's every
number equals the results file it names, and the page renders its plots in headless Chromium.

Small on purpose (3 LoRA steps, 24 prompts and battery items): this checks the machinery on a real
model and tokenizer, not the science; the committed studies in experiments/ are the science.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_study import check_report

from latentlab.data import builtin_dataset_path
from latentlab.study import StudyConfig, run_study

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def birds_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("birds-study")
    for name, n in (("unrelated", 24), ("era-battery", 24)):
        lines = builtin_dataset_path(name).read_text().splitlines()[:n]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    recipe = root / "birds-small.toml"
    recipe.write_text(
        'name = "birds-small"\nmodel = "smollm2-135m-instruct"\nseeds = [0]\ndirection = "era"\n'
        f'prompts = "{root / "unrelated.jsonl"}"\nbattery = "{root / "era-battery.jsonl"}"\n'
        '[finetune]\ndata = "old-birds"\ncontrol = "modern-birds"\nmax_steps = 3\n'
        '[shift]\nn_random = 20\n[ablation]\nlayers = ["all"]\nn_random = 10\n[diff]\nk = 5\n')
    out = root / "study"
    run_study(StudyConfig(recipe=recipe, out=out, device="cpu"), progress=False)
    return out


def test_report_numbers_equal_the_results_files(birds_study: Path) -> None:
    n = check_report(birds_study)
    s = json.loads((birds_study / "summary.json").read_text())
    assert {"shift", "ablation", "diff", "finetunes"} <= set(s["sections"])
    assert n > 50
    # Every finetune ran the 3 steps the recipe asked for.
    assert all(v["steps"]["value"] == 3 for v in s["sections"]["finetunes"].values())
    # Provenance names each step's manifest, device and wall time.
    prov = s["provenance"]
    assert prov["packages"]["torch"] and all(r.get("manifest") for r in prov["steps"])


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (`make png` installs Debian's)")
def test_report_renders_its_plots_in_chromium(birds_study: Path, tmp_path: Path) -> None:
    html = birds_study / "report.html"
    n_plots = html.read_text().count("Plotly.newPlot(")
    assert n_plots >= 3
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    dom = subprocess.run([*common, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # plotly draws each figure into an <svg class="main-svg">; an error or a blocked script draws none.
    assert dom.count('class="main-svg"') >= n_plots, "not every plot rendered"
    shot = tmp_path / "report.png"
    subprocess.run([*common, "--window-size=1200,2400", f"--screenshot={shot}", html.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a blank page is a few kB
    keep: Any = birds_study.parent / "report.png"
    shutil.copy(shot, keep)  # left beside the study for a look by hand
