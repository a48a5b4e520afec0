"""Every notebook runs top to bottom on the real built-in models, and its key outputs are checked.

The checks run as an extra cell appended in the test (the notebooks themselves stay clean): they
read the notebook's own variables, so a notebook whose cells run but whose results went wrong (a
steering sweep that no longer steers, a shift with the wrong labels) fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

CHECKS = {
    "01_quickstart.ipynb": """
assert acts.acts.shape == (2, model.n_layers, model.d_model)
best = probes.test_acc[probes.layers.index(probes.best_layer)]
assert best >= 0.8, best                       # the era is linearly readable somewhere
t = {row["alpha"]: row for row in result.table()}
assert t[0.5]["score"] > t[0.0]["score"] > t[-0.5]["score"], t
anti = (t[0.5]["score"] - t[-0.5]["score"]) / 2
anti_random = (t[0.5]["random"] - t[-0.5]["random"]) / 2
assert anti > 0.1 and anti > anti_random + 0.05, (anti, anti_random)
assert len(outs) == 3 and all(isinstance(o[0], str) and o[0].strip() for o in outs)
""",
    "02_finetune_shift.ipynb": """
assert set(shift.stats) == {"old-birds", "modern-birds", "old-birds - modern-birds"}, list(shift.stats)
assert len(old_run.losses) == 16 and old_run.losses[-1] < old_run.losses[0]
assert all(0 <= b["score"] <= 1 for b in shift.battery.values())
late = [shift.stats[PAIRED]["projection"][i] for i, layer in enumerate(shift.layers) if layer >= 20]
assert sum(v > 0 for v in late) >= len(late) - 2, late   # the real experiment's sign at late layers
assert patch.effect.shape == (3, 5, 2)
assert model.lora is not None and model.lora.adapters     # shift and patch switched LoRAs on the one base
""",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_its_outputs_hold(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    assert path.name in CHECKS, f"{path.name} has no output checks: add them to CHECKS"
    nb = nbformat.read(str(path), as_version=4)
    n_own = len([c for c in nb.cells if c.cell_type == "code"])
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name]))
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first failing cell, the checks included
    errors = [(i, o.get("ename"), o.get("evalue")) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code_cells) == n_own + 1 and all(c.get("execution_count") for c in code_cells)


def test_quickstart_is_present() -> None:
    assert (ROOT / "notebooks" / "01_quickstart.ipynb") in NOTEBOOKS
