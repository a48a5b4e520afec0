"""Which SAE latents a finetune moved (:func:`latent_shift`): a planted activation change, the exact
decomposition of the projection shift, intervals from latentlab.stats, plots, and the ``sae shift`` config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_helpers import LAYER, full_direction, make_sae, planted

from latentlab import plots
from latentlab.errors import LatentlabError
from latentlab.io import load_tensors, save_tensors
from latentlab.sae import direction_latents, latent_shift
from latentlab.stages.base import config_record
from latentlab.stages.sae import SAEShiftConfig


@pytest.fixture(autouse=True)
def no_png(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(plots._PNG_STATE, "ok", False)


def test_latent_shift_recovers_a_planted_change(tmp_path: Path) -> None:
    p = planted()
    sae, dec, base = p["sae"], p["dec"], p["base"]
    j, m, c = 5, 11, 1.5
    noise = 0.01 * torch.randn(base.shape, generator=p["g"])
    finetuned = base + c * dec[j] + noise  # latent 5 switches on
    control = base + c * dec[m]  # the control moves an unrelated latent
    u = dec[j] + 0.3 * dec[m] + 0.5 * p["v"]  # a direction partly outside the SAE's span
    res = latent_shift(sae, base, finetuned, full_direction(u), k=3, control_acts=control, seed=0)
    assert res.comparisons == ["finetuned", "control", "finetuned - control"]
    assert res.primary == "finetuned - control"
    top = {r["latent"]: r for r in res.top}
    assert res.top[0]["latent"] in (j, m) and {j, m} <= set(top)
    row = top[j]
    ft, ctrl, paired = row["finetuned"], row["control"], row["finetuned - control"]
    assert ft["mean_change"] == pytest.approx(c, abs=0.02)
    assert ft["ci"][0] > c - 0.05 and ft["ci"][1] < c + 0.05
    assert ctrl["mean_change"] == pytest.approx(0.0, abs=1e-6) and ctrl["ci"][0] <= 0 <= ctrl["ci"][1]
    assert paired["mean_change"] == pytest.approx(c, abs=0.02)
    assert ft["freq_before"] == 0.0 and ft["freq_after"] == 1.0 and ft["freq_change"] == 1.0
    assert top[m]["finetuned - control"]["mean_change"] == pytest.approx(-c, abs=0.02)
    assert top[m]["finetuned"]["ci"][0] <= 0 <= top[m]["finetuned"]["ci"][1]
    assert row["decoder_cos"] == pytest.approx(1 / u.norm().item(), abs=1e-4)

    unit = u / u.norm()
    dec_ft, dec_ctrl = res.decomposition["finetuned"], res.decomposition["control"]
    assert dec_ft["projection"] == pytest.approx(c * float(dec[j] @ unit), abs=0.02)
    assert dec_ft["latent_term"] == pytest.approx(dec_ft["projection"], abs=0.02)
    assert abs(dec_ft["error_term"]) < 0.02
    assert dec_ft["top_k_latents"][0]["latent"] == j and dec_ft["top_k_share"] == pytest.approx(1.0, abs=0.05)
    assert dec_ctrl["projection"] == pytest.approx(c * float(dec[m] @ unit), abs=1e-4)
    assert dec_ctrl["top_k_latents"][0]["latent"] == m
    for d in res.decomposition.values():  # the identity: projection = latent term + error term
        assert d["latent_term"] + d["error_term"] == pytest.approx(d["projection"], abs=1e-4)
        assert d["top_k_term"] + d["other_latents_term"] == pytest.approx(d["latent_term"], abs=1e-4)
    json.dumps(res.to_dict())
    t, _ = load_tensors(save_tensors(tmp_path / "shift", res.tensors(), {"layer": res.layer}))
    assert t["finetuned.mean_change"][j] == pytest.approx(c, abs=0.02) and t["finetuned-control.freq_after"][j] == 1


def test_projection_interval_is_the_one_latentlab_shift_reports() -> None:
    """The decomposition's projection CI is stats.bootstrap_ci of the per-prompt projections (the
    statistic `latentlab shift` reports), for the same seed: one resampler, not a copy of it."""
    from latentlab.stats import bootstrap_ci

    p = planted(seed=3)
    sae, base, v = p["sae"], p["base"], p["v"]
    finetuned = base + 0.2 * torch.randn(base.shape, generator=p["g"]) + 0.5 * p["dec"][2]
    u = p["dec"][2] + v
    res = latent_shift(sae, base, finetuned, u, k=4, layer=LAYER, seed=7)
    proj = (finetuned - base) @ (u / u.norm())
    assert res.decomposition["finetuned"]["projection_ci"] == pytest.approx(bootstrap_ci(proj, seed=7), abs=1e-5)


def test_a_shift_outside_the_sae_lands_in_the_error_term() -> None:
    p = planted(seed=1)
    sae, base, v = p["sae"], p["base"], p["v"]
    finetuned = base + 2.0 * v  # nothing any latent can express
    res = latent_shift(sae, base, finetuned, v, k=5, layer=LAYER)
    d = res.decomposition["finetuned"]
    assert d["projection"] == pytest.approx(2.0, abs=1e-4)
    assert d["error_term"] == pytest.approx(2.0, abs=1e-4) and abs(d["latent_term"]) < 1e-4
    assert max(abs(r["finetuned"]["mean_change"]) for r in res.top) < 1e-4
    assert res.comparisons == ["finetuned"] and res.primary == "finetuned"


def test_no_change_gives_intervals_around_zero() -> None:
    p = planted(seed=2)
    sae, base = p["sae"], p["base"]
    noisy = base + 0.3 * torch.randn(base.shape, generator=p["g"])
    res = latent_shift(sae, base, noisy, k=32)  # no direction: no decomposition
    assert res.decomposition == {} and res.decoder_cos is None and res.direction is None
    covered = sum(r["finetuned"]["ci"][0] <= 0 <= r["finetuned"]["ci"][1] for r in res.top)
    assert covered >= 28  # ~95% of 32 latents (5 is off and stays near 0)


def test_latent_shift_errors() -> None:
    p = planted()
    sae, base = p["sae"], p["base"]
    bad = base.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(LatentlabError, match="finetuned activations contain NaN"):
        latent_shift(sae, base, bad)
    with pytest.raises(LatentlabError, match="differ in shape"):
        latent_shift(sae, base, base[:10])
    with pytest.raises(LatentlabError, match=r"shape \(40, 48\)"):
        latent_shift(sae, base, base[:, :48])
    with pytest.raises(LatentlabError, match="no prompts"):
        latent_shift(sae, base[:0], base[:0])
    with pytest.raises(LatentlabError, match="one prompt gives no interval"):
        latent_shift(sae, base[:1], base[:1])  # no CI from one prompt (it would be NaN in results.json)
    with pytest.raises(LatentlabError, match="k must be >= 1.*--k 1"):
        latent_shift(sae, base, base, k=0)
    with pytest.raises(LatentlabError, match="n_boot must be >= 100"):
        latent_shift(sae, base, base, n_boot=10)
    with pytest.raises(LatentlabError, match="not layer 3"):
        latent_shift(sae, base, base, layer=3)


def test_sae_plots_are_written(tmp_path: Path) -> None:
    p = planted()
    sae, dec, base = p["sae"], p["dec"], p["base"]
    res = latent_shift(sae, base, base + 1.5 * dec[5], dec[5], k=4, control_acts=base + dec[2])
    fig = plots.latent_shift_figure(res)
    assert [t.name for t in fig.data] == ["finetuned", "control", "finetuned - control"]
    assert fig.data[0].y[0].startswith("#5") or fig.data[0].y[0].startswith("#2")
    dfig = plots.shift_decomposition_figure(res)
    assert [t.name for t in dfig.data][:3] == ["top 4 latents", "other latents", "SAE error"]
    hist = plots.sae_direction_figure(direction_latents(make_sae(d_sae=64, orthonormal=False), dec[5], k=3))
    assert any("#" in (a.text or "") for a in hist.layout.annotations)
    for f, stem in ((fig, "a"), (dfig, "b"), (hist, "c")):
        written = plots.save_figure(f, tmp_path, stem)
        assert [w.name for w in written] == [f"{stem}.html"]


def test_intervals_are_stats_percentile_intervals() -> None:
    from latentlab.stats import bootstrap_means

    p = planted(seed=4)
    sae, base, dec = p["sae"], p["base"], p["dec"]
    ft = base + 0.3 * torch.randn(base.shape, generator=p["g"]) + dec[3]
    res = latent_shift(sae, base, ft, k=3, seed=5, n_boot=200)
    with torch.no_grad():
        fa, fb = sae.encode(ft), sae.encode(base)
    order = [r["latent"] for r in res.top]
    means = bootstrap_means(fa[:, order] - fb[:, order], 200, 5)
    q = torch.quantile(means, torch.tensor([0.025, 0.975]), dim=0)  # the old inline interval
    for j, row in enumerate(res.top):
        assert row["finetuned"]["ci"] == pytest.approx((float(q[0, j]), float(q[1, j])), abs=1e-6)


def test_no_shift_gives_no_share_not_nan() -> None:
    p = planted(seed=5)
    sae, base = p["sae"], p["base"]
    res = latent_shift(sae, base, base.clone(), p["dec"][1], k=2, layer=LAYER)
    d = res.decomposition["finetuned"]
    assert d["projection"] == 0.0 and d["top_k_share"] is None
    json.dumps(res.to_dict(), allow_nan=False)


def test_the_command_config_validates_itself(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(LatentlabError, match="n_boot must be >= 100"):
        SAEShiftConfig(finetuned=tmp_path, sae="s", n_boot=10, out=out)
    with pytest.raises(LatentlabError, match="k must be >= 1"):
        SAEShiftConfig(finetuned=tmp_path, sae="s", k=0, out=out)
    rec = config_record(SAEShiftConfig(finetuned=tmp_path, sae="s", out=out, model="tiny"))
    assert rec["control"] is None and rec["direction"] is None and rec["model"] == "tiny"  # --base is model now
