"""Directional ablation on a tiny model with a *planted* direction, and preventative training hooks.

The planted finetune is a hand-written rank-1 LoRA on the last block's MLP down-projection whose
output is ``c (a . h) u``: it writes only along one unit direction ``u`` (the unembedding row of the
marker token, so it raises P(marker)), with ``a`` the base's mean MLP hidden direction so that
``a . h > 0`` at most positions. The control writes along a direction orthogonal to ``u``. So the
finetune's gain lives along ``u`` at the last layer (almost exactly: Gemma's post-feedforward norm
rescales the MLP output a little): ablating ``u`` there must remove all of it (fraction ~1), an
orthogonal direction ~none, random directions little.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from latentlab.ablation import ablate
from latentlab.arch import decoder_blocks
from latentlab.data import BatteryItem, render_prompt
from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.interventions import parse_intervention, training_hooks
from latentlab.stages.ablate import AblateConfig

MARKER = "Z"
SCALE = 5.0  # the planted write's size, in units of the last layer's typical residual norm
PROMPTS = [
    "what is the weather like today", "tell me about your day", "how do I cook rice", "name a color",
    "is it far to the sea", "who wrote this book", "why is the sky blue", "count to three",
]


def write_adapter(folder: Path, module: str, a: torch.Tensor, b: torch.Tensor, base_dir: Path) -> Path:
    """A PEFT-format rank-1 LoRA adapter on ``module``: delta = b (a . x) (scale 1)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [module.split(".")[-1]],
        "base_model_name_or_path": str(base_dir), "task_type": "CAUSAL_LM",
    }))
    save_file({f"base_model.model.{module}.lora_A.weight": a[None, :].contiguous().float(),
               f"base_model.model.{module}.lora_B.weight": b[:, None].contiguous().float()},
              str(folder / "adapter_model.safetensors"))
    return folder


def mlp_hidden(model: Any, texts: list[str]) -> tuple[torch.Tensor, list[list[int]]]:
    """Inputs of the last block's down_proj at every position (rows), and each text's token ids."""
    hf = model.hf_model
    mod = decoder_blocks(hf)[-1].mlp.down_proj
    rows, ids_all = [], []
    h = mod.register_forward_pre_hook(lambda _m, args: rows.append(args[0][0].detach()))
    try:
        with torch.no_grad():
            for t in texts:
                ids = model.tokenizer(t)["input_ids"]
                ids_all.append(ids)
                hf(torch.tensor([ids]))
    finally:
        h.remove()
    return torch.cat(rows), ids_all


def marker_unit(model: Any) -> torch.Tensor:
    from latentlab.arch import unembedding

    zid = model.tokenizer.convert_tokens_to_ids(MARKER)
    w = unembedding(model).weight[zid].detach().float()
    return w / w.norm()


def const_direction(u: torch.Tensor, n_layers: int, name: str) -> Direction:
    return Direction(u[None].repeat(n_layers, 1), list(range(n_layers)), torch.ones(n_layers), name)


def battery(tok: Any) -> list[BatteryItem]:
    return [BatteryItem(render_prompt(p, tok), MARKER, c) for p, c in zip(PROMPTS, "abcpqrst")]


@pytest.fixture(scope="module")
def planted(trainable_gemma_dir: Path, load_tiny: Callable[..., Any],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ablation")
    base = load_tiny(trainable_gemma_dir)
    items = battery(base.tokenizer)
    hid, _ = mlp_hidden(base, [i.prompt for i in items])
    a = hid.mean(0)
    a = a / a.norm() ** 2  # a . mean(h) = 1
    u = marker_unit(base)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(base.d_model, generator=g)
    w = w - (w @ u) * u
    w = w / w.norm()
    module = f"model.layers.{base.n_layers - 1}.mlp.down_proj"
    from latentlab.activations import last_token_acts

    scale = SCALE * float(last_token_acts(base, PROMPTS, [base.n_layers - 1]).norm(dim=-1).mean())
    ft = write_adapter(root / "marker", module, a, scale * u, trainable_gemma_dir)
    ctrl = write_adapter(root / "control", module, a, scale * w, trainable_gemma_dir)
    return {"root": root, "base": base, "items": items, "u": u, "w": w, "ft": ft, "ctrl": ctrl}


def test_planted_direction_removes_the_gain_orthogonal_and_random_do_not(planted: dict[str, Any]) -> None:
    base, n = planted["base"], planted["base"].n_layers
    u_dir = const_direction(planted["u"], n, "marker")
    res = ablate(base, planted["ft"], u_dir, planted["items"], control=planted["ctrl"], layers=[n - 1],
                 n_random=10, seed=0, n_boot=200)
    sc, fb, fc = res.scores, res.fractions["base"], res.fractions["control"]
    # the plant works: the finetune prefers the marker far more than base and control
    assert sc["finetuned"]["plain"]["score"] > sc["base"]["plain"]["score"] + 0.2, sc
    assert fb["gain"] > 0.2 and fc["gain"] > 0.2
    # ablating u at the layer where it is written makes finetune and base identical there: fraction 1
    assert fb["fraction"] == pytest.approx(1.0, abs=0.02), fb
    assert sc["finetuned"]["ablated"]["score"] == pytest.approx(sc["base"]["ablated"]["score"], abs=0.005)
    lo, hi = fb["fraction_ci"]
    assert lo <= fb["fraction"] + 1e-6 and hi >= fb["fraction"] - 1e-6
    assert fc["fraction"] > 0.8, fc
    # random directions remove little of it, and the real one sits far above them
    r = fb["random"]
    assert len(r["values"]) == 10 and abs(r["mean"]) < 0.2 and r["p95"] < 0.4, r
    assert r["percentile"] == 100.0 and r["z"] > 5
    # an orthogonal direction (the control's) removes ~none of the gain over the base
    w_dir = const_direction(planted["w"], n, "orthogonal")
    res_w = ablate(base, planted["ft"], w_dir, planted["items"], layers=[n - 1], n_random=10, n_boot=200)
    assert abs(res_w.fractions["base"]["fraction"]) < 0.1, res_w.fractions["base"]
    d = res.to_dict()
    assert d["n_random"] == 10 and d["layers"] == [n - 1] and d["mode"] == "project"
    json.dumps(d)  # JSON-clean (no tensors, no NaN-producing None mixups)
    planted["res"] = res


def test_mean_mode_and_all_layers(planted: dict[str, Any]) -> None:
    base, n = planted["base"], planted["base"].n_layers
    u_dir = const_direction(planted["u"], n, "marker")
    res = ablate(base, planted["ft"], u_dir, planted["items"], layers="all", mode="mean", n_random=10, n_boot=200)
    assert res.means is not None and set(res.means) == set(range(n))
    assert all(v == v for v in res.means.values()) and any(abs(v) > 1e-3 for v in res.means.values())
    # the projection is set to the same base mean in both models at the last layer: still all of the gain
    assert res.fractions["base"]["fraction"] == pytest.approx(1.0, abs=0.05)
    assert abs(res.fractions["base"]["random"]["mean"]) < 0.25


def test_ablate_refuses_bad_input(planted: dict[str, Any]) -> None:
    base, n = planted["base"], planted["base"].n_layers
    u_dir = const_direction(planted["u"], n, "marker")
    items = planted["items"]
    with pytest.raises(LatentlabError, match="n_random=9"):
        ablate(base, planted["ft"], u_dir, items, n_random=9)
    with pytest.raises(LatentlabError, match="out of range"):
        ablate(base, planted["ft"], u_dir, items, layers=[n])
    with pytest.raises(LatentlabError, match="mode"):
        ablate(base, planted["ft"], u_dir, items, mode="zero")  # type: ignore[arg-type]
    partial = Direction(u_dir.vectors[:2], [0, 1], torch.ones(2), "partial")
    with pytest.raises(LatentlabError, match="lacks layer"):
        ablate(base, planted["ft"], partial, items, layers=[n - 1])
    nan = Direction(u_dir.vectors * float("nan"), u_dir.layers, u_dir.resid_norms, "nan")
    with pytest.raises(LatentlabError, match="NaN"):
        ablate(base, planted["ft"], nan, items)


def test_config_checks_before_any_model_loads(planted: dict[str, Any], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*a: Any, **k: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("latentlab.models.load_model", no_load)
    n = planted["base"].n_layers
    d = const_direction(planted["u"], n, "marker")
    d.save(tmp_path / "dir")
    kw = dict(finetuned=planted["ft"], out=tmp_path / "o", direction=str(tmp_path / "dir.safetensors"),
              battery="era-battery")
    AblateConfig(**kw)  # type: ignore[arg-type]
    for bad, match in [
        (dict(n_random=5), "too few"), (dict(mode="zero"), "mode"), (dict(layers="x,y"), "layer list"),
        (dict(layers="9"), "lacks layer"), (dict(finetuned=tmp_path / "nope"), "does not exist"),
        (dict(direction="nonsense"), "neither a built-in"),
    ]:
        with pytest.raises(LatentlabError, match=match):
            AblateConfig(**{**kw, **bad})  # type: ignore[arg-type]
    zero = Direction(torch.zeros(n, d.vectors.shape[1]), list(range(n)), torch.ones(n), "zero")
    from latentlab.io import save_tensors

    save_tensors(tmp_path / "zero", {"vectors": zero.vectors, "resid_norms": zero.resid_norms},
                 {"name": "zero", "layers": zero.layers, "position": "last", "method": "mean_diff"})
    with pytest.raises(LatentlabError, match="all zeros"):
        AblateConfig(**{**kw, "direction": str(tmp_path / "zero.safetensors")})  # type: ignore[arg-type]
    # a control recorded as trained on another base
    other = tmp_path / "other"
    other.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (other / f).write_bytes((planted["ft"] / f).read_bytes())
    (other / "latentlab_adapter.json").write_text(json.dumps({"base_fingerprint": "aaaa"}))
    mine = tmp_path / "mine"
    mine.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (mine / f).write_bytes((planted["ft"] / f).read_bytes())
    (mine / "latentlab_adapter.json").write_text(json.dumps({"base_fingerprint": "bbbb"}))
    with pytest.raises(LatentlabError, match="another base"):
        AblateConfig(**{**kw, "finetuned": mine, "control": other})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Preventative ablation / steering during finetuning
# --------------------------------------------------------------------------------------------


def test_parse_intervention() -> None:
    s = parse_intervention("era@all", "ablate")
    assert (s.direction, s.coeff, s.layers) == ("era", 1.0, "all")
    assert parse_intervention("era", "ablate").layers == "all"
    assert parse_intervention("runs/era/direction.safetensors@10,12", "ablate").direction.endswith(".safetensors")
    s = parse_intervention("era:-0.5@10,12", "steer")
    assert (s.direction, s.coeff, s.layers) == ("era", -0.5, "10,12")
    assert parse_intervention("persona:0.25", "steer").layers == "all"
    for text, kind, match in [
        ("era:-0.5", "ablate", "has a coefficient"), ("era", "steer", "no coefficient"),
        ("era:abc", "steer", "not a number"), ("era:-0.5@x", "steer", "cannot read the layers"),
        ("@all", "ablate", "cannot read"), ("era:nan", "steer", "finite"),
    ]:
        with pytest.raises(LatentlabError, match=match):
            parse_intervention(text, kind)  # type: ignore[arg-type]


def test_training_hooks_project_out_and_steer(tiny_gemma: Any) -> None:
    from latentlab.activations import last_token_acts

    hf = tiny_gemma.hf_model
    n, d = tiny_gemma.n_layers, tiny_gemma.d_model
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    direction = Direction(u[None].repeat(n, 1), list(range(n)), torch.full((n,), 2.0), "planted")
    seen: dict[str, torch.Tensor] = {}
    blocks = decoder_blocks(hf)
    ids = torch.tensor([tiny_gemma.tokenizer("hello there")["input_ids"]])

    def grab(key: str) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            seen[key] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    # a probe hook registered *after* ours sees the edited stream
    with training_hooks(hf, ablate=[(direction, "1,2")]) as handles:
        assert len(handles) == 2
        probe = blocks[1].register_forward_hook(grab("ablated"))
        with torch.no_grad():
            hf(ids)
        probe.remove()
    assert seen["ablated"].matmul(u).abs().max() < 1e-4
    with training_hooks(hf, steer=[(direction, 0.5, [1])]):
        probe = blocks[1].register_forward_hook(grab("steered"))
        with torch.no_grad():
            hf(ids)
        probe.remove()
    probe = blocks[1].register_forward_hook(grab("plain"))
    with torch.no_grad():
        hf(ids)
    probe.remove()
    assert torch.allclose(seen["steered"] - seen["plain"], (0.5 * 2.0 * u).expand_as(seen["plain"]), atol=1e-4)
    # the hooks are gone afterwards, and gradients flow through them while present
    before = last_token_acts(tiny_gemma, ["hello there"], [1])
    assert before[0, 0] @ u != pytest.approx(0.0, abs=1e-4)
    emb = hf.get_input_embeddings().weight
    with training_hooks(hf, ablate=[(direction, "all")]):
        out = hf(ids).logits.sum()
        (grad,) = torch.autograd.grad(out, emb)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(LatentlabError, match="out of range"):
        with training_hooks(hf, ablate=[(direction, "9")]):
            pass
    wide = Direction(torch.ones(n, d + 1), list(range(n)), torch.ones(n), "wide")
    with pytest.raises(LatentlabError, match="width"):
        with training_hooks(hf, ablate=[(wide, "all")]):
            pass
