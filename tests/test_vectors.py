"""latentlab.vectors: GGUF control-vector round trip (read back with gguf's own reader), imports, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from latentlab.directions import Direction
from latentlab.errors import LatentlabError
from latentlab.vectors import HOOK_POINT, export_gguf, import_vector, save_imported, sidecar_fields

D = 16


@pytest.fixture
def direction() -> Direction:
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(5, D, generator=g) * 3
    return Direction(
        vecs, [0, 1, 2, 3, 4], torch.tensor([5.0, 10.0, 20.0, 40.0, 80.0]), "era", meta={"model": "tiny-model"}
    )


def _field(reader: gguf.GGUFReader, key: str):  # noqa: ANN202
    f = reader.get_field(key)
    return None if f is None else f.contents()


@pytest.mark.parametrize("scale", ["unit", "resid_norm", 2.5])
def test_round_trip(direction: Direction, tmp_path: Path, scale: str | float) -> None:
    path = export_gguf(direction, tmp_path / "era.gguf", layers=[1, 3, 4], scale=scale)
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))

    reader = gguf.GGUFReader(str(path))
    assert _field(reader, "general.architecture") == "controlvector"
    assert _field(reader, "controlvector.model_hint") == "tiny-model"
    assert _field(reader, "controlvector.layer_count") == 3
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.3", "direction.4"]
    factor = {"unit": lambda layer: 1.0, "resid_norm": direction.resid_norm, 2.5: lambda layer: 2.5}[scale]
    for t, layer in zip(reader.tensors, [1, 3, 4]):
        assert list(t.shape) == [D] and t.tensor_type == gguf.GGMLQuantizationType.F32
        want = (direction.unit(layer) * factor(layer)).numpy()
        np.testing.assert_allclose(np.asarray(t.data), want, rtol=1e-6, atol=1e-6)

    back = import_vector(path)
    assert back.layers == [1, 3, 4] and back.name == "era"
    for layer in back.layers:
        torch.testing.assert_close(back.vector(layer), direction.unit(layer) * factor(layer))
        torch.testing.assert_close(back.unit(layer), direction.unit(layer))
        assert back.resid_norm(layer) == pytest.approx(direction.resid_norm(layer))  # restored from latentlab.*
    assert back.meta["hook_point"] == HOOK_POINT and back.meta["source_format"] == "gguf"


def test_default_layers_skip_zero(direction: Direction, tmp_path: Path) -> None:
    reader = gguf.GGUFReader(str(export_gguf(direction, tmp_path / "all.gguf")))
    assert [t.name for t in reader.tensors] == [f"direction.{i}" for i in (1, 2, 3, 4)]


def test_repeng_style_gguf_without_latentlab_keys(tmp_path: Path) -> None:
    """A repeng export_gguf file: resid norms fall back to the vectors' norms (alpha 1 = strength 1)."""
    p = tmp_path / "repeng.gguf"
    w = gguf.GGUFWriter(str(p), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    rows = {5: np.arange(D, dtype=np.float32) + 1, 2: np.ones(D, dtype=np.float32)}
    for layer, row in rows.items():
        w.add_tensor(f"direction.{layer}", row)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    d = import_vector(p)
    assert d.layers == [2, 5] and d.meta["model_hint"] == "llama"
    for layer in (2, 5):
        torch.testing.assert_close(d.vector(layer), torch.from_numpy(rows[layer]))
        assert d.resid_norm(layer) == pytest.approx(float(np.linalg.norm(rows[layer])))


def test_missing_layers_refused(direction: Direction, tmp_path: Path) -> None:
    with pytest.raises(LatentlabError, match="lacks layer"):
        export_gguf(direction, tmp_path / "x.gguf", layers=[2, 9])
    with pytest.raises(LatentlabError, match="direction.0"):
        export_gguf(direction, tmp_path / "x.gguf", layers=[0, 1])
    assert not (tmp_path / "x.gguf").exists()


def test_not_a_control_vector(tmp_path: Path) -> None:
    p = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, D), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LatentlabError, match="not a control vector"):
        import_vector(p)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(LatentlabError, match="not a readable GGUF"):
        import_vector(junk)


@pytest.mark.parametrize("suffix", [".pt", ".pkl"])
def test_pickles_refused(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"vec{suffix}"
    p.write_bytes(b"\x80\x04N.")
    with pytest.raises(LatentlabError, match="never unpickles"):
        import_vector(p)


def test_steering_vectors_and_repeng_json(tmp_path: Path) -> None:
    sv = tmp_path / "sv.json"
    sv.write_text(json.dumps({"layer_type": "decoder_block", "layer_activations": {"3": [1.0] * D, "7": [2.0] * D}}))
    d = import_vector(sv)
    assert d.layers == [3, 7] and d.meta["source_format"] == "steering-vectors-json"
    rp = tmp_path / "rp.json"
    rp.write_text(json.dumps({"model_type": "mistral", "directions": {"4": [0.5] * D}}))
    assert import_vector(rp).layers == [4]
    bad = tmp_path / "attn.json"
    bad.write_text(json.dumps({"layer_type": "self_attn", "layer_activations": {"3": [1.0] * D}}))
    with pytest.raises(LatentlabError, match="decoder_block"):
        import_vector(bad)


def test_safetensors_import(tmp_path: Path) -> None:
    p = tmp_path / "sv.safetensors"
    save_file({"layer_activations.2": torch.ones(D), "layer_activations.6": torch.full((D,), 2.0)}, str(p))
    d = import_vector(p)
    assert d.layers == [2, 6]
    torch.testing.assert_close(d.vector(6), torch.full((D,), 2.0))


def test_sidecar_fields_and_save(direction: Direction, tmp_path: Path) -> None:
    f = sidecar_fields(direction)
    assert f["hook_point"] == "blocks.{l}.hook_resid_post"
    assert set(f["operation"]) == {"add", "ablate"}
    assert f["scale_convention"] == "alpha x unit x typical residual norm"
    assert [m["llama_cpp"] for m in f["layer_map"]] == [
        None,
        "direction.1",
        "direction.2",
        "direction.3",
        "direction.4",
    ]
    assert f["layer_map"][2]["hook_point"] == "blocks.2.hook_resid_post"
    back = import_vector(export_gguf(direction, tmp_path / "e.gguf", layers="2-4"))
    saved = save_imported(back, tmp_path / "imp")
    side = json.loads(saved.with_suffix(".json").read_text())
    assert side["hook_point"] == HOOK_POINT and side["layer_map"][0]["llama_cpp"] == "direction.2"
    again = Direction.load(saved)
    torch.testing.assert_close(again.vectors, back.vectors)
