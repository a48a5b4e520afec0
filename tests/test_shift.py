"""Shift analysis: projection statistics on synthetic shifts, and a planted shift on a tiny model.

The key test trains two LoRA finetunes of a tiny model on the same prompts: one whose answers are
all marker letters ("Z Z Z Z Z Z"), and a control whose answers have the same format and length but
ordinary letters. A "marker" direction is fitted from contrast pairs on the *base* model (texts
ending in the marker vs in other letters), and the shift is measured on unrelated prompts the
finetunes never saw. The marker finetune must move activations along the direction far more than
random directions (large z) and far more than the control; the control must not.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from latentlab.data import BatteryItem, Chat, Pair, render_prompt
from latentlab.directions import Direction, find_direction
from latentlab.errors import LatentlabError
from latentlab.finetune import FinetuneConfig, finetune
from latentlab.shift import (
    ShiftResult,
    analyze_shift,
    checkpoint_adapters,
    projection_stats,
    resolve_adapter,
    screen_dataset,
)

WORDS = "the cat sat on a mat and then ran far away from home to see big red bus old man dog".split()
MARKER = "Z"
OTHER = "pqrstuvw"  # the direction's negative pole
CONTROL = "abcdefgh"  # the control finetune's letters: neither pole
UNRELATED = [
    "what is the weather like today", "tell me about your day", "how do I cook rice", "name a color",
    "is it far to the sea", "who wrote this book", "why is the sky blue", "count to three",
    "what time is it", "where do you live", "say something nice", "how old is the moon",
]
SEED = 0  # finetune seed; the assertions below were checked with seeds 0, 1 and 2


# --------------------------------------------------------------------------------------------
# projection_stats on synthetic shifts
# --------------------------------------------------------------------------------------------


def unit_rows(n_layers: int, d: int, seed: int) -> torch.Tensor:
    u = torch.randn(n_layers, d, generator=torch.Generator().manual_seed(seed))
    return u / u.norm(dim=-1, keepdim=True)


def test_planted_shift_is_found() -> None:
    g = torch.Generator().manual_seed(0)
    units = unit_rows(3, 64, 1)
    size = torch.tensor([5.0, 2.0, -4.0])
    diff = size[None, :, None] * units[None] + 0.1 * torch.randn(40, 3, 64, generator=g)
    st = projection_stats(diff, units, n_random=200, seed=0)
    assert st["projection"] == pytest.approx(size.tolist(), abs=0.05)
    assert st["cosine"][0] > 0.99 and st["cosine"][1] > 0.99 and st["cosine"][2] < -0.99
    assert st["z"][0] > 5 and st["z"][1] > 5 and st["z"][2] < -5
    assert st["percentile"] == [100.0, 100.0, 100.0]
    for (lo, hi), p in zip(st["projection_ci"], st["projection"]):
        assert lo <= p <= hi and hi - lo < 0.2
    assert st["shift_norm"] == pytest.approx(size.abs().tolist(), rel=0.05)


def test_pure_noise_is_not_a_shift() -> None:
    g = torch.Generator().manual_seed(3)
    units = unit_rows(4, 64, 2)
    diff = torch.randn(50, 4, 64, generator=g)
    st = projection_stats(diff, units, n_random=200, seed=0)
    for i in range(4):
        assert abs(st["z"][i]) < 2.5
        lo, hi = st["projection_ci"][i]
        assert lo < 0 < hi
        assert abs(st["cosine"][i]) < 0.5


def test_random_directions_are_unit_and_seeded() -> None:
    g = torch.Generator().manual_seed(4)
    units = unit_rows(2, 64, 5)
    diff = torch.randn(10, 2, 64, generator=g) + 3 * unit_rows(1, 64, 9)[None]
    a, b = projection_stats(diff, units, 500, seed=7), projection_stats(diff, units, 500, seed=7)
    assert a == b
    c = projection_stats(diff, units, 500, seed=8)
    assert c["random_abs_mean"] != a["random_abs_mean"]
    assert c["projection"] == a["projection"]  # the seed only changes the random controls (and bootstrap)
    # unit random directions: |m . r| <= |m|, and E|m . r| = |m| * sqrt(2 / (pi d)) for large d
    for i in range(2):
        norm = a["shift_norm"][i]
        assert a["random_abs_p95"][i] <= norm
        assert a["random_abs_mean"][i] == pytest.approx(norm * (2 / (torch.pi * 64)) ** 0.5, rel=0.15)


# --------------------------------------------------------------------------------------------
# The planted shift on a tiny model, with its control
# --------------------------------------------------------------------------------------------


def marker_pairs(n: int, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 5)))
        out.append(Pair(f"{ctx} {' '.join(MARKER * 4)}", f"{ctx} {' '.join(rng.choice(OTHER) for _ in range(4))}"))
    return out


def training_sets(n: int, seed: int) -> tuple[list[Chat], list[Chat]]:
    rng = random.Random(seed)
    questions = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 5))) + "?" for _ in range(n)]
    marker = [Chat((("user", q), ("assistant", " ".join(MARKER * 6)))) for q in questions]
    control = [Chat((("user", q), ("assistant", " ".join(rng.choice(CONTROL) for _ in range(6))))) for q in questions]
    return marker, control


@pytest.fixture(scope="module")
def marker_direction(trainable_gemma_dir: Path, load_tiny: Callable[..., Any]) -> Direction:
    return find_direction(load_tiny(trainable_gemma_dir), marker_pairs(16, 0), name="marker", progress=False)


@pytest.fixture(scope="module")
def planted(trainable_gemma_dir: Path, marker_direction: Direction, load_tiny: Callable[..., Any],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("shift")
    marker, control = training_sets(24, 1)
    cfg = FinetuneConfig(epochs=8, batch_size=8, lr=2e-2, rank=8, seed=SEED, checkpoint_every=12)
    finetune(str(trainable_gemma_dir), marker, root / "marker", cfg, progress=False)
    finetune(str(trainable_gemma_dir), control, root / "control", cfg, progress=False)
    tok = load_tiny(trainable_gemma_dir).tokenizer
    battery = [BatteryItem(render_prompt(q, tok), MARKER, c) for q, c in zip(UNRELATED[:6], "abcpqr")]
    res = analyze_shift(load_tiny(trainable_gemma_dir), {"finetuned": root / "marker" / "adapter"}, marker_direction,
                        UNRELATED, battery, controls={"control": root / "control" / "adapter"}, n_random=100,
                        seed=0, progress=False)
    return {"root": root, "res": res}


def test_planted_finetune_shifts_along_the_direction_and_control_does_not(planted: dict[str, Any]) -> None:
    res: ShiftResult = planted["res"]
    assert res.layers == [0, 1, 2, 3] and res.direction == "marker"
    assert set(res.stats) == {"finetuned", "control", "finetuned - control"}
    ft, ctrl = res.stats["finetuned"], res.stats["control"]
    last = -1
    # the marker finetune moved unrelated prompts along the marker direction, far beyond random directions
    assert ft["z"][last] > 2.0, ft["z"]
    assert ft["percentile"][last] >= 95, ft["percentile"]
    assert ft["projection_ci"][last][0] > 0 and ft["cosine"][last] > 0.2
    # the control (same format, other letters) did not
    assert abs(ctrl["z"][last]) < 1.0, ctrl["z"]
    assert ctrl["percentile"][last] < 95
    assert ft["projection"][last] > ctrl["projection"][last] + 5.0
    assert ft["z"][last] > ctrl["z"][last] + 1.5
    # both moved a lot overall: the difference is the direction, not the size of the shift
    assert ctrl["shift_norm"][last] > 0.3 * ft["shift_norm"][last]
    # the paired comparison on the same prompts shows the same thing directly
    paired = res.stats["finetuned - control"]
    assert paired["projection_ci"][last][0] > 0 and paired["z"][last] > 2.0, paired["z"]
    assert abs(paired["projection"][last] - (ft["projection"][last] - ctrl["projection"][last])) < 1e-3


def test_battery_scores_per_model(planted: dict[str, Any]) -> None:
    res: ShiftResult = planted["res"]
    assert set(res.battery) == {"base", "finetuned", "control"}
    for v in res.battery.values():
        assert 0 <= v["score"] <= 1 and len(v["per_item"]) == 6 and v["ci"][0] <= v["score"] <= v["ci"][1]
    # the marker finetune now answers with the marker; the control does not
    assert res.battery["finetuned"]["score"] > 0.9 > res.battery["base"]["score"]
    assert res.battery["finetuned"]["score"] > res.battery["control"]["score"] + 0.3
    d = res.to_dict()
    assert d["n_prompts"] == len(UNRELATED) and d["n_random"] == 100 and d["models"]["finetuned"]["adapter"]
    assert d["models"]["base"]["adapter"] is None


def test_no_battery_no_scores(trainable_gemma_dir: Path, marker_direction: Direction, planted: dict[str, Any],
                              load_tiny: Callable[..., Any]) -> None:
    ft = {"ft": planted["root"] / "marker" / "adapter"}
    res = analyze_shift(load_tiny(trainable_gemma_dir), ft, marker_direction, UNRELATED[:3], n_random=20,
                        progress=False)
    assert res.battery == {} and len(res.stats["ft"]["projection"]) == 4
    assert len(res.stats["ft"]["projection_ci"]) == 4


def test_controls_argument_pairs_each_finetune_with_each_control(trainable_gemma_dir: Path,
                                                                  marker_direction: Direction,
                                                                  planted: dict[str, Any],
                                                                  load_tiny: Callable[..., Any]) -> None:
    """Controls are explicit (no label convention); each finetune is paired with each control."""
    root = planted["root"]
    res = analyze_shift(load_tiny(trainable_gemma_dir), {"marker": root / "marker"}, marker_direction, UNRELATED[:5],
                        n_random=20, controls={"letters": root / "control"}, progress=False)
    assert set(res.stats) == {"marker", "letters", "marker - letters"}
    assert res.meta["controls"] == ["letters"]
    paired = res.stats["marker - letters"]["projection"]
    want = [a - b for a, b in zip(res.stats["marker"]["projection"], res.stats["letters"]["projection"])]
    assert paired == pytest.approx(want, abs=1e-3)


def test_analyze_shift_refuses_bad_input(trainable_gemma_dir: Path, marker_direction: Direction,
                                         planted: dict[str, Any], load_tiny: Callable[..., Any]) -> None:
    ft = {"ft": planted["root"] / "marker" / "adapter"}
    base = load_tiny(trainable_gemma_dir)
    with pytest.raises(LatentlabError, match="no prompts"):
        analyze_shift(base, ft, marker_direction, [], progress=False)
    with pytest.raises(LatentlabError, match="n_random=19"):
        analyze_shift(base, ft, marker_direction, UNRELATED, n_random=19, progress=False)
    partial = Direction(marker_direction.vectors[1:3], [1, 2], marker_direction.resid_norms[1:3], "partial")
    with pytest.raises(LatentlabError, match="lacks layer"):
        analyze_shift(base, ft, partial, UNRELATED, progress=False)
    with pytest.raises(LatentlabError, match="both a finetune and a control"):
        analyze_shift(base, ft, marker_direction, UNRELATED, controls=ft, progress=False)
    nan = Direction(marker_direction.vectors * float("nan"), marker_direction.layers, marker_direction.resid_norms)
    with pytest.raises(LatentlabError, match="NaN"):
        analyze_shift(base, ft, nan, UNRELATED, progress=False)
    wide = Direction(torch.ones(4, 7), [0, 1, 2, 3], marker_direction.resid_norms)
    with pytest.raises(LatentlabError, match="width 7"):
        analyze_shift(base, ft, wide, UNRELATED, progress=False)


def test_resolve_adapter(planted: dict[str, Any], tmp_path: Path) -> None:
    run = planted["root"] / "marker"
    assert resolve_adapter(run) == run / "adapter"
    assert resolve_adapter(run / "adapter") == run / "adapter"
    assert resolve_adapter(str(run)) == run / "adapter"
    for bad in (tmp_path, tmp_path / "missing"):
        with pytest.raises(LatentlabError, match="holds no LoRA adapter|does not exist"):
            resolve_adapter(bad)


def test_checkpoint_adapters(planted: dict[str, Any], tmp_path: Path) -> None:
    run = planted["root"] / "marker"
    found = checkpoint_adapters(run)
    assert list(found) == ["step-000012", "step-000024"]  # 24 steps, a checkpoint every 12
    assert all((p / "adapter_config.json").exists() and p.parent.parent == run / "checkpoints" for p in found.values())
    half = run / "checkpoints" / "step-000099"
    half.mkdir()  # no trainer_state.json: not a complete checkpoint
    try:
        assert list(checkpoint_adapters(run)) == ["step-000012", "step-000024"]
    finally:
        half.rmdir()
    with pytest.raises(LatentlabError, match="no complete checkpoints"):
        checkpoint_adapters(tmp_path)
    (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
    with pytest.raises(LatentlabError, match="no complete checkpoints"):
        checkpoint_adapters(tmp_path)


# --------------------------------------------------------------------------------------------
# screen_dataset
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny_gemma", "tiny_llama"])
def test_screen_dataset(model_name: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(model_name)
    d_model = model.d_model
    g = torch.Generator().manual_seed(0)
    layers = list(range(model.n_layers))
    d = Direction(torch.randn(len(layers), d_model, generator=g), layers, torch.ones(len(layers)), "rand")
    answers = ["yes", "no way", "Z Z Z", "ok"]
    data = [Chat((("user", f"question {i}?"), ("assistant", r))) for i, r in enumerate(answers)]
    res = screen_dataset(model, data, d, max_new_tokens=4, progress=False)
    assert res["layers"] == layers and len(res["mean"]) == len(layers) and len(res["ci"]) == len(layers)
    assert torch.tensor(res["per_example"]).shape == (4, len(layers))
    assert res["responses"] == ["yes", "no way", "Z Z Z", "ok"]
    assert res["prompts"] == [f"question {i}?" for i in range(4)]
    assert len(res["own_responses"]) == 4 and all(isinstance(o, str) for o in res["own_responses"])
    assert all(len(o) <= 4 * 4 for o in res["own_responses"])
    per = torch.tensor(res["per_example"])
    assert torch.allclose(per.mean(0), torch.tensor(res["mean"]), atol=1e-4)
    with pytest.raises(LatentlabError, match="no training examples"):
        screen_dataset(model, [], d, progress=False)
    # A direction fitted on some layers screens exactly those (it used to fail on a shape mismatch).
    part = [0, model.n_layers - 1]
    dp = Direction(d.vectors[part], part, torch.ones(2), "rand")
    rp = screen_dataset(model, data, dp, max_new_tokens=4, progress=False)
    assert rp["layers"] == part and torch.tensor(rp["per_example"]).shape == (4, 2)
    assert rp["mean"] == pytest.approx([res["mean"][0], res["mean"][-1]], rel=1e-4, abs=1e-4)


def test_screen_scores_a_marker_response_above_the_model_own(tiny_gemma: Any) -> None:
    """A response that *is* the positive pole's text projects further along the direction."""
    d = find_direction(tiny_gemma, marker_pairs(12, 3), name="marker", progress=False)
    marker = [Chat((("user", q), ("assistant", " ".join(MARKER * 8)))) for q in UNRELATED[:4]]
    plain = [Chat((("user", q), ("assistant", " ".join(OTHER[:8])))) for q in UNRELATED[:4]]
    a = screen_dataset(tiny_gemma, marker, d, max_new_tokens=4, progress=False)
    b = screen_dataset(tiny_gemma, plain, d, max_new_tokens=4, progress=False)
    assert a["own_responses"] == b["own_responses"]  # same prompts, same greedy answers
    assert a["mean"][-1] > b["mean"][-1]


def test_preventative_ablation_keeps_the_planted_shift_away(trainable_gemma_dir: Path, marker_direction: Direction,
                                                            planted: dict[str, Any], load_tiny: Callable[..., Any],
                                                            tmp_path: Path) -> None:
    """CAFT-style: the marker direction projected out of every block during training only. The same
    data and seed that move a normal finetune along the direction then leave it (nearly) in place,
    though the adapter is measured without any ablation."""
    marker, _ = training_sets(24, 1)
    cfg = FinetuneConfig(epochs=8, batch_size=8, lr=2e-2, rank=8, seed=SEED, checkpoint_every=12,
                         ablate=["marker@all"])
    finetune(str(trainable_gemma_dir), marker, tmp_path / "ablated", cfg, progress=False,
             directions={"marker": marker_direction})
    res = analyze_shift(load_tiny(trainable_gemma_dir), {"ablated": tmp_path / "ablated"}, marker_direction,
                        UNRELATED, n_random=100, progress=False)
    normal = planted["res"].stats["finetuned"]
    ablated = res.stats["ablated"]
    assert normal["z"][-1] > 2.0
    a, n = ablated["projection"], normal["projection"]
    # no layer moves toward the marker pole anything like the normal finetune does ...
    assert all(x < 0.25 * y for x, y in zip(a, n)), (a, n)
    # ... and below the last block the component barely moves at all. At the last block it is free to
    # drift (measured: -8.5 vs the normal +13.2): it is removed at every training step, so the loss never
    # sees it and nothing holds it in place; what training cannot do is use it.
    assert all(abs(x) < 0.25 * y for x, y in zip(a[:-1], n[:-1])), (a, n)
    state = (tmp_path / "ablated" / "checkpoints").iterdir().__next__() / "trainer_state.json"
    assert "marker@all" in state.read_text()  # recorded, so a resume with other options is refused
    with pytest.raises(LatentlabError, match="was not fitted"):
        finetune(str(trainable_gemma_dir), marker, tmp_path / "x", cfg, progress=False)
