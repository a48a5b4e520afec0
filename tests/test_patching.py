"""Activation patching on tiny models, with differences planted where we know they are.

- Gemma: a copy of the model whose layer ``K`` alone is perturbed (MLP weights and its output norm),
  saved as a second model folder. Residual streams before ``K`` are identical in both models, and
  after ``K`` the two models compute the same function of the residual, so a full patch of every
  position must give exactly 0 below ``K`` and exactly 1 from ``K`` on.
- Llama (no post-norms): a rank-1 change ``c * u v^T`` of layer ``K_L``'s ``down_proj``, so the
  residual difference after that layer lies exactly along ``u``: a direction-only patch along ``u``
  must give exactly 1 there, and along any direction orthogonal to ``u`` exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_char_tokenizer

import latentlab.patching as patching
from latentlab.data import BatteryItem
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.interventions import hook_name
from latentlab.patching import capture, patch_grid, prefixed
from latentlab.scoring import battery_sequences, score_conditions

K = 2  # the perturbed layer of the Gemma pair (4 layers)
K_L = 1  # the perturbed layer of the Llama pair (3 layers)
C_RANK1 = 20.0  # size of its rank-1 change
ITEMS = [
    BatteryItem("Q: the dog saw a ", "cat", "cow"),
    BatteryItem("He rode to town on his", " horse", " house"),
    BatteryItem("x", " y", " z"),
    BatteryItem("The way to cross the ocean is by", " ship", " shop"),
    BatteryItem("Letters took weeks by ", "mail", "email"),
    BatteryItem("Q: the dog saw a ", "zebra", "table"),
]
POSITIONS = ["all", "prompt", "-1", "-2", "-50"]  # "-50": longer than every prompt, so it patches nothing


def perturbed_copy(src: Path, out: Path, edit: Callable[[Any], None], chat_template: str | None) -> Path:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        edit(hf)
    hf.save_pretrained(str(out))
    make_char_tokenizer(chat_template).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def gemma_pair(trainable_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory,
               load_tiny: Callable[..., Any]) -> tuple[Any, Any]:
    """(base, base with only layer K changed)."""
    from conftest import CHAT_TEMPLATE

    def edit(hf: Any) -> None:
        layer = hf.model.layers[K]
        g = torch.Generator().manual_seed(0)
        w = layer.mlp.down_proj.weight
        w.add_(torch.randn(w.shape, generator=g) * 0.5)
        layer.post_feedforward_layernorm.weight.add_(5.0)  # Gemma normalises the MLP output: make it count

    out = perturbed_copy(trainable_gemma_dir, tmp_path_factory.mktemp("patch") / "gemma-layer2", edit, CHAT_TEMPLATE)
    return load_tiny(trainable_gemma_dir), load_tiny(out)


@pytest.fixture(scope="module")
def llama_rank1(tmp_path_factory: pytest.TempPathFactory,
                load_tiny: Callable[..., Any]) -> tuple[Any, Any, torch.Tensor]:
    """(base, base with a rank-1 change of layer K_L's down_proj along unit u, u).

    The base is a tiny Llama with larger initial weights (std 0.2) than ``tiny_llama_dir``, so its
    logits, and the battery gap the change opens, are not tiny.
    """
    from conftest import CHAT_TEMPLATE, save_tiny_model, tiny_llama_config

    root = tmp_path_factory.mktemp("patch")
    config = tiny_llama_config()
    config.initializer_range = 0.2
    base_dir = save_tiny_model(root / "llama", config, seed=4321, chat_template=CHAT_TEMPLATE)
    g = torch.Generator().manual_seed(11)  # not a seed patch_grid's random mode uses: that would draw u itself
    u = torch.randn(48, generator=g)
    u = u / u.norm()
    v = torch.randn(96, generator=g)

    def edit(hf: Any) -> None:
        hf.model.layers[K_L].mlp.down_proj.weight.add_(C_RANK1 * torch.outer(u, v))

    out = perturbed_copy(base_dir, root / "llama-rank1", edit, CHAT_TEMPLATE)
    return load_tiny(base_dir), load_tiny(out), u


@pytest.fixture(scope="module")
def full_grid(gemma_pair: tuple[Any, Any]) -> Any:
    base, changed = gemma_pair
    return patch_grid(base, ITEMS, source=changed, positions=POSITIONS, batch_size=7, progress=False)


def test_the_planted_difference_is_worth_patching(gemma_pair: tuple[Any, Any], full_grid: Any) -> None:
    base, changed = gemma_pair
    t = score_conditions(base, ITEMS, [(None, 0.0)])[0].mean()
    s = score_conditions(changed, ITEMS, [(None, 0.0)])[0].mean()
    assert full_grid.target_score == pytest.approx(float(t), abs=1e-6)
    assert full_grid.source_score == pytest.approx(float(s), abs=1e-6)
    assert abs(full_grid.source_score - full_grid.target_score) > 0.1 and not full_grid.meta["small_gap"]


def test_full_patch_at_every_position_of_the_last_layer_is_the_source(full_grid: Any) -> None:
    r = full_grid
    assert r.effect.shape == r.score.shape == (1, 4, len(POSITIONS)) and r.modes == ["full"]
    a = POSITIONS.index("all")
    assert float(r.effect[0, 3, a]) == pytest.approx(1.0, abs=1e-5)
    assert float(r.score[0, 3, a]) == pytest.approx(r.source_score, abs=1e-6)


def test_patching_nothing_is_the_target(full_grid: Any) -> None:
    r = full_grid
    none = POSITIONS.index("-50")
    assert torch.equal(r.effect[0, :, none], torch.zeros(4))
    assert torch.allclose(r.score[0, :, none], torch.tensor(r.target_score), atol=1e-7)


def test_heatmap_points_at_the_planted_layer(full_grid: Any) -> None:
    r = full_grid
    assert r.layers == [0, 1, 2, 3]
    # below K the residual streams are identical: any patch is a no-op
    assert torch.allclose(r.effect[0, :K], torch.zeros(K, len(POSITIONS)), atol=1e-5)
    # from K on, replacing every position's residual makes the rest of the run the source's
    a = POSITIONS.index("all")
    assert torch.allclose(r.effect[0, K:, a], torch.ones(4 - K), atol=1e-5)
    # patching only the prompt's positions at the perturbed layer is not the whole effect
    assert abs(float(r.effect[0, K, POSITIONS.index("prompt")]) - 1.0) > 0.05


def test_batched_grid_equals_cell_by_cell(gemma_pair: tuple[Any, Any], full_grid: Any) -> None:
    base, changed = gemma_pair
    for layer, pos in [(K, "prompt"), (K, "-1"), (3, "-2"), (1, "all")]:
        one = patch_grid(base, ITEMS, source=changed, layers=[layer], positions=[pos], progress=False)
        assert float(one.score[0, 0, 0]) == pytest.approx(
            float(full_grid.score[0, layer, POSITIONS.index(pos)]), abs=1e-6
        ), (layer, pos)


def test_the_grid_is_batched(gemma_pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    base, changed = gemma_pair
    calls: list[int] = []
    real = patching.run_resid

    def counting(model: Any, ids: torch.Tensor, *a: Any, **kw: Any) -> Any:
        calls.append(ids.shape[0])
        return real(model, ids, *a, **kw)

    monkeypatch.setattr(patching, "run_resid", counting)
    r = patch_grid(base, ITEMS, source=changed, positions=POSITIONS, modes=("full", "random"), batch_size=32,
                   progress=False)
    n_cells = 2 * 4 * len(POSITIONS)
    rows = n_cells * 2 * len(ITEMS)  # every (cell, item, completion)
    assert sum(calls) <= rows + 2 * 2 * len(ITEMS)  # + capture of the source + the unpatched target
    assert len(calls) <= math.ceil(rows / 32) + 2 and len(calls) < n_cells * len(ITEMS) / 10
    assert r.effect.shape == (2, 4, len(POSITIONS))


def test_source_equal_to_target_changes_nothing(trainable_gemma_dir: Path, gemma_pair: tuple[Any, Any],
                                                load_tiny: Callable[..., Any]) -> None:
    base = gemma_pair[0]
    same = load_tiny(trainable_gemma_dir)  # a second, identical copy
    d = Direction(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), [0, 1, 2, 3], torch.ones(4))
    r = patch_grid(base, ITEMS, source=same, positions=POSITIONS, modes=("full", "direction", "random"),
                   direction=d, progress=False)
    assert r.source_score == pytest.approx(r.target_score, abs=1e-6) and r.meta["small_gap"]
    assert torch.allclose(r.score, torch.full_like(r.score, r.target_score), atol=1e-6)
    assert torch.isnan(r.effect).all()  # 0/0: reported as NaN, never as a fake effect


def test_direction_patch_along_the_exact_difference(llama_rank1: tuple[Any, Any, torch.Tensor]) -> None:
    base, changed, u = llama_rank1
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, generator=g)
    w = w - (w @ u) * u  # orthogonal to the planted difference
    along = Direction(torch.stack([u] * 3), [0, 1, 2], torch.ones(3), "along")
    ortho = Direction(torch.stack([w] * 3), [0, 1, 2], torch.ones(3), "ortho")
    kw = {"source": changed, "layers": [K_L], "positions": ["all", "-50"], "progress": False}
    full = patch_grid(base, ITEMS, **kw)
    assert abs(full.source_score - full.target_score) > 0.1
    assert float(full.effect[0, 0, 0]) == pytest.approx(1.0, abs=1e-5)
    a = patch_grid(base, ITEMS, modes=("direction", "random"), direction=along, **kw)
    assert float(a.effect[0, 0, 0]) == pytest.approx(1.0, abs=1e-4)  # the difference is all along u
    assert abs(float(a.effect[1, 0, 0])) < 0.5  # one random direction catches little of it
    assert float(a.effect[0, 0, 1]) == 0.0 and float(a.effect[1, 0, 1]) == 0.0  # nothing patched
    o = patch_grid(base, ITEMS, modes=("direction",), direction=ortho, **kw)
    assert float(o.effect[0, 0, 0]) == pytest.approx(0.0, abs=1e-4)
    assert float(o.score[0, 0, 0]) == pytest.approx(o.target_score, abs=1e-6)


def test_mean_difference_direction_beats_random(llama_rank1: tuple[Any, Any, torch.Tensor]) -> None:
    """Patching along the exact mean (source - target) difference, measured, not known in advance."""
    base, changed, u = llama_rank1
    ids, _ = battery_sequences(base, ITEMS)
    s, t = capture(changed, ids, [0, 1, 2]), capture(base, ids, [0, 1, 2])
    mean_diff = torch.stack([torch.cat([a - b for a, b in zip(s[layer], t[layer])]).mean(0) for layer in range(3)])
    assert torch.equal(mean_diff[:K_L], torch.zeros(K_L, 48))  # nothing differs before the planted layer
    assert abs(float(torch.nn.functional.cosine_similarity(mean_diff[K_L], u, dim=0))) > 0.999
    mean_diff[:K_L] = 1.0  # any direction there (the difference is zero anyway)
    d = Direction(mean_diff, [0, 1, 2], torch.ones(3), "mean_diff")
    kw = {"source": changed, "layers": [K_L], "positions": ["all", "prompt"], "progress": False}
    along = patch_grid(base, ITEMS, modes=("direction",), direction=d, **kw)
    full = patch_grid(base, ITEMS, **kw)
    assert torch.allclose(along.effect, full.effect, atol=1e-4)  # the whole difference, at every position class
    randoms = [patch_grid(base, ITEMS, modes=("random",), seed=seed, **kw) for seed in range(4)]
    for r in randoms:
        assert abs(float(r.effect[0, 0, 0])) < 0.5 < float(along.effect[0, 0, 0])


def test_random_mode_is_seeded(gemma_pair: tuple[Any, Any]) -> None:
    base, changed = gemma_pair
    kw = {"source": changed, "layers": [K], "positions": ["all"], "modes": ("random",), "progress": False}
    a, b, c = (patch_grid(base, ITEMS, seed=s, **kw) for s in (3, 3, 4))
    assert torch.equal(a.score, b.score) and not torch.equal(a.score, c.score)


def test_prompt_pair_mode(tiny_gemma: Any) -> None:
    clean, corrupt = prefixed(ITEMS, "In 1850:"), prefixed(ITEMS, "In 2020:")
    assert clean[0].prompt == "In 1850: Q: the dog saw a " and clean[0].positive == "cat"
    r = patch_grid(tiny_gemma, corrupt, source_items=clean, positions=["all", "-1", "-50"], progress=False)
    c = score_conditions(tiny_gemma, clean, [(None, 0.0)])[0].mean()
    k = score_conditions(tiny_gemma, corrupt, [(None, 0.0)])[0].mean()
    assert r.source_score == pytest.approx(float(c), abs=1e-6) and r.target_score == pytest.approx(float(k), abs=1e-6)
    assert r.source_score != pytest.approx(r.target_score, abs=1e-4)
    assert float(r.score[0, 3, 0]) == pytest.approx(r.source_score, abs=1e-6)  # all positions, last layer
    assert torch.allclose(r.score[0, :, 2], torch.tensor(r.target_score), atol=1e-7)  # nothing patched
    assert r.meta["n_items"] == len(ITEMS)


def test_prompt_pairs_must_line_up(tiny_gemma: Any) -> None:
    with pytest.raises(LatentlabError, match="different lengths"):
        patch_grid(tiny_gemma, prefixed(ITEMS, "In 2020:"), source_items=prefixed(ITEMS, "In 12:"), progress=False)
    with pytest.raises(LatentlabError, match="differ in length"):
        patch_grid(tiny_gemma, ITEMS, source_items=ITEMS[:3], progress=False)
    with pytest.raises(LatentlabError, match="empty"):
        patch_grid(tiny_gemma, [], progress=False)
    with pytest.raises(LatentlabError, match="unknown position"):
        patch_grid(tiny_gemma, ITEMS, positions=["middle"], progress=False)
    with pytest.raises(LatentlabError, match="needs a direction"):
        patch_grid(tiny_gemma, ITEMS, modes=("direction",), progress=False)
    with pytest.raises(LatentlabError, match="unknown component"):
        patch_grid(tiny_gemma, ITEMS, component="embed", progress=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("component", ["attn", "mlp"])
def test_component_hooks_exist(component: str, tiny_gemma: Any, tiny_llama: Any) -> None:
    for m in (tiny_gemma, tiny_llama):
        for layer in range(m.n_layers):
            assert hook_name(component, layer) in m.bridge.hook_dict


def test_component_patching(llama_rank1: tuple[Any, Any, torch.Tensor]) -> None:
    """Only layer K_L's MLP differs: its output carries the whole effect; attention up to K_L carries none."""
    base, changed, _ = llama_rank1
    mlp = patch_grid(base, ITEMS, source=changed, positions=["all"], component="mlp", progress=False)
    attn = patch_grid(base, ITEMS, source=changed, positions=["all"], component="attn", progress=False)
    assert mlp.meta["component"] == "mlp" and attn.meta["component"] == "attn"
    assert float(mlp.effect[0, K_L, 0]) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(mlp.effect[0, :K_L, 0], torch.zeros(K_L), atol=1e-5)
    assert torch.allclose(attn.effect[0, : K_L + 1, 0], torch.zeros(K_L + 1), atol=1e-5)
    assert torch.isfinite(attn.effect).all() and torch.isfinite(mlp.effect).all()
