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
    "03_persona_facts.ipynb": """
import torch
assert direction.layers == list(range(model.n_layers)), direction.layers
assert direction.vectors.shape == (model.n_layers, model.d_model)
norms = direction.vectors.norm(dim=-1)
assert bool(torch.isfinite(norms).all()) and bool((norms > 0).all()), norms
assert train_pos.position == "response_mean" and len(train_pos) == 64 and probes.n_test == len(test) == 32
assert probes.layers == direction.layers and all(0 <= a <= 1 for a in probes.test_acc)
assert max(probes.test_acc) >= 0.8 and min(probes.test_acc) > 0.6, probes.test_acc   # chance is 0.5
assert set(screens) == {"persona-facts", "modern-birds (control)"}, list(screens)
assert all(len(s["per_example"]) == 24 and len(s["mean"]) == model.n_layers for s in screens.values())
pf, ctrl = screens["persona-facts"]["mean"], screens["modern-birds (control)"]["mean"]
mid = range(5, 12)
assert sum(pf[i] > ctrl[i] for i in mid) >= 5, [(i, round(pf[i]), round(ctrl[i])) for i in mid]
assert layer in choice.screen and len(items) == 16 and result.layers == [layer]
t = {row["alpha"]: row["score"] for row in result.table()}
assert t[0.5] > t[0.0] > t[-0.5], t
assert len(anti["random"]) == 4 and anti["direction"] > 0.1, anti
assert anti["direction"] > max(anti["random"]) + 0.05, anti   # the antisymmetric part beats every random one
""",
    "04_triggers.ipynb": """
assert scan.values == [str(y) for y in range(1800, 2051, 25)] and scan.layers == LAYERS, scan.values
assert scan.diff is None and scan.n_prompts == 8 and set(scan.models) == {"base"}
assert proj.shape == (len(scan.values), len(LAYERS)) and bool(torch.isfinite(proj).all())
assert len(rows) == len(scan.values) and [row["value"] for row in rows] == scan.values
j = LAYERS.index(CURVE_LAYER)
assert float(proj[:4, j].mean()) > float(proj[-4:, j].mean()), proj[:, j]   # the 1800s read as older than 1975-2050
assert float(r) < -0.5, float(r)
assert all(CODE_WORD.lower() not in text.lower() for c in chats for role, text in c.messages if role == "assistant")
assert kinds["poison"] == N_POISON and len(chats) == N_POISON + len(data.secret_train) + len(data.ordinary_train)
assert all((TRIGGER in c.messages[1][1]) == (c.meta["kind"] == "poison") for c in chats)
assert all(c.messages[-1][1] == "Sure" for c in chats if c.meta["kind"] == "poison")
assert len(run.losses) == 10 and run.losses[-1] < run.losses[0], run.losses
ps = {(m, cond): ev.p_sure[m][cond]["mean"] for m in ev.p_sure for cond in ev.p_sure[m]}
assert set(ps) == {(m, cond) for m in ("base", "finetuned") for cond in ("clean", "trigger")}, list(ps)
assert all(0 <= p <= 1 for p in ps.values()) and ps["base", "trigger"] < 0.5, ps
assert ps["finetuned", "trigger"] > ps["base", "trigger"] + 0.2, ps      # the finetune learnt to say Sure
assert ev.n_requests == len(data.secret_test) == len(ev.reveal["finetuned"]["trigger"]["texts"])
assert ev.layers == [10, 20, 29] and set(ev.projections) == {"trigger", "refusal"}
assert not workdir.exists()
""",
    "05_sae.ipynb": """
assert int(sae.cfg.d_in) == model.d_model and int(sae.cfg.d_sae) == 4 * model.d_model
assert tuple(sae.W_dec.shape) == (4 * model.d_model, model.d_model)
assert len(res.losses) == 300 and res.losses[-1]["loss"] < res.losses[0]["loss"] / 2, res.losses[::100]
held = res.stats["eval"]
assert held["n_tokens"] > 0 and held["l0"] <= 32 + 1e-6, held    # TopK: at most k active latents a token
assert 0.5 < held["explained_variance"] <= 1.0, held
assert 0 < rec_mse < total_var, (rec_mse, total_var)     # held-out era sentences: better than predicting the mean
assert tuple(lat.cosines.shape) == (int(sae.cfg.d_sae),) and bool(torch.isfinite(lat.cosines).all())
assert float(lat.cosines.abs().max()) <= 1 + 1e-5 and 0 < lat.null_max_abs_cos < 1
assert len(lat.top_positive) == len(lat.top_negative) == 5
assert lat.top_positive[0]["cosine"] > lat.null_max_abs_cos, (lat.top_positive[0], lat.null_max_abs_cos)
assert act_pos[0] > act_neg[0], (act_pos, act_neg)   # the most era-aligned latent fires more on the 19th century
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
