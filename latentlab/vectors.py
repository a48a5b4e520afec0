"""Vectors that travel: export a direction as a llama.cpp control vector, import one back.

Layer-index convention (checked against llama.cpp's loader and repeng's writer):

- latentlab steers at ``blocks.{l}.hook_resid_post``: the residual stream *after* block ``l``
  (0-based), i.e. Hugging Face ``hidden_states[l + 1]``.
- llama.cpp (``common/common.cpp`` ``common_control_vector_load_one``) reads every tensor named
  ``direction.{N}``, rejects ``N == 0`` ("invalid (zero) direction tensor layer index") and stores it
  at ``data[n_embd * (N - 1)]`` ("layer 1 at [0]"); ``src/llama-adapter.cpp``
  ``llama_adapter_cvec::apply`` copies that slot into ``tensors[il]`` for ``il = N`` ("there's never
  a tensor for layer 0"), and every model graph adds ``tensors[il]`` right after block ``il``'s final
  residual add (``cur = ggml_add(ctx0, cur, ffn_inp); cur = build_cvec(cur, il); cb(cur, "l_out", il)``).
  So ``direction.N`` is added to the **output of block N** (0-based): the identity map
  ``blocks.{N}.hook_resid_post <-> direction.{N}``. Block 0's output cannot be steered by llama.cpp,
  so latentlab refuses to export layer 0 when asked for it, and leaves it out of ``layers=None``.
- repeng (``repeng/extract.py``) indexes ``model.layers`` 0-based, reads ``hidden_states[layer + 1]``
  (the output of that block), its ``ControlModel`` adds to that block's output, and
  ``ControlVector.export_gguf`` writes ``direction.{layer}`` unchanged: the same identity map (its
  default layers, ``range(-1, -n_layers, -1)``, also skip layer 0).
- steering-vectors' ``SteeringVector.layer_activations`` with ``layer_type="decoder_block"`` is keyed by
  the 0-based decoder block whose output it patches: the same identity map again.

Scale convention: latentlab steers with ``alpha x unit_l x resid_norm_l`` (``resid_norm_l``: the
typical residual norm at layer ``l``). llama.cpp adds ``strength x direction.N``. The exported tensor
is ``unit_l`` (``scale="unit"``: strength is in raw residual units), ``unit_l x resid_norm_l``
(``scale="resid_norm"``: llama.cpp's strength equals latentlab's alpha) or ``unit_l x s`` (a float
``s``). On import, the tensor is the direction's vector as written; its ``resid_norms`` are the ones
latentlab recorded in the file (``latentlab.resid_norms``), else each vector's own norm, so alpha 1
adds exactly what llama.cpp adds at strength 1.

Files written here are atomic (:func:`latentlab.io.atomic_path`). Pickles (``.pt``, ``.pkl``) are
never read: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentlab.direction import HOOK_POINT, SCALE_CONVENTION, Direction, sidecar_fields
from latentlab.errors import LatentlabError, first_line
from latentlab.io import atomic_path
from latentlab.models import parse_layers

ARCH = "controlvector"
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"}
_DIRECTION_RE = re.compile(r"^direction\.(-?\d+)$")


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def _scale_factors(direction: Direction, layers: Sequence[int], scale: str | float) -> tuple[str, list[float]]:
    if isinstance(scale, str):
        if scale == "unit":
            return "unit", [1.0] * len(layers)
        if scale == "resid_norm":
            return "resid_norm", [direction.resid_norm(layer) for layer in layers]
        try:
            scale = float(scale)
        except ValueError:
            raise LatentlabError(
                f"unknown scale {scale!r}", "use --scale unit, resid_norm, or a number (the vector length)"
            ) from None
    s = float(scale)
    if not np.isfinite(s) or s == 0.0:
        raise LatentlabError(f"scale {scale!r} must be a finite non-zero number", "use unit, resid_norm or e.g. 8.0")
    return "float", [s] * len(layers)


def export_layers(direction: Direction, layers: Sequence[int] | str | None) -> list[int]:
    """The layers to export: ``None``/'all' = every layer the direction has except 0 (llama.cpp has no slot)."""
    if layers is None or (isinstance(layers, str) and layers.strip() in ("", "all")):
        out = [layer for layer in direction.layers if layer >= 1]
        if not out:
            raise LatentlabError(
                f"the {direction.name} direction has only layer 0, which llama.cpp cannot steer "
                "(direction.0 is rejected: block 0's output has no control-vector slot)",
                "fit the direction at layers >= 1",
            )
        return out
    if isinstance(layers, str):
        layers = parse_layers(layers, max(direction.layers) + 1)
    want = sorted(set(int(layer) for layer in layers))
    if not want:
        raise LatentlabError("no layers to export", "pass --layers, e.g. 6,12 or 4-10 or all")
    bad = [layer for layer in want if layer < 0]
    if bad:
        raise LatentlabError(f"negative layer(s) {bad} cannot be exported", "pass 0-based block indices >= 1")
    if 0 in want:
        raise LatentlabError(
            "layer 0 cannot be exported: llama.cpp rejects direction.0 (block 0's output has no control-vector slot)",
            "leave layer 0 out of --layers",
        )
    missing = [layer for layer in want if layer not in direction.layers]
    if missing:
        has = ",".join(map(str, direction.layers[:12])) + (" ..." if len(direction.layers) > 12 else "")
        raise LatentlabError(
            f"the {direction.name} direction lacks layer(s) {','.join(map(str, missing[:8]))} (it has {has})",
            "export layers it has, or refit it with --layers all",
        )
    return want


def _model_hint(direction: Direction, model_hint: str | None) -> str:
    if model_hint:
        return str(model_hint)
    m = direction.meta.get("model")
    if isinstance(m, dict):
        m = m.get("name")
    return str(m) if m else "unknown"


def export_gguf(
    direction: Direction,
    path: str | Path,
    layers: Sequence[int] | str | None = None,
    scale: str | float = "unit",
    model_hint: str | None = None,
) -> Path:
    """Write ``direction`` as a llama.cpp control vector (repeng's ``export_gguf`` layout).

    ``general.architecture = "controlvector"``, ``controlvector.model_hint``,
    ``controlvector.layer_count`` and one F32 tensor ``direction.{l}`` per layer ``l`` (the output of
    block ``l``, latentlab's ``blocks.{l}.hook_resid_post``). Extra ``latentlab.*`` keys (ignored by
    llama.cpp) record the scale, the residual norms and the hook point so :func:`import_vector`
    restores them. Written atomically; returns the path.
    """
    import gguf

    direction.validate()
    chosen = export_layers(direction, layers)
    kind, factors = _scale_factors(direction, chosen, scale)
    units = [direction.unit(layer).detach().float().cpu() for layer in chosen]
    rows = [(u * f).numpy().astype(np.float32) for u, f in zip(units, factors)]
    resid = [direction.resid_norm(layer) for layer in chosen]
    path = Path(path)
    if path.suffix != ".gguf":
        raise LatentlabError(f"{path} does not end in .gguf", "pass --out FILE.gguf")
    try:
        with atomic_path(path) as tmp:
            w = gguf.GGUFWriter(str(tmp), ARCH)
            w.add_string(f"{ARCH}.model_hint", _model_hint(direction, model_hint))
            w.add_uint32(f"{ARCH}.layer_count", len(chosen))
            w.add_string("latentlab.name", direction.name)
            w.add_string("latentlab.hook_point", HOOK_POINT)
            w.add_string("latentlab.operation", "add")
            w.add_string("latentlab.scale", kind if kind != "float" else repr(factors[0]))
            w.add_string("latentlab.scale_convention", SCALE_CONVENTION)
            w.add_string("latentlab.position", direction.position)
            w.add_string("latentlab.method", direction.method)
            w.add_array("latentlab.layers", [int(x) for x in chosen])
            w.add_array("latentlab.resid_norms", [float(x) for x in resid])
            w.add_array("latentlab.norms", [float(direction.vector(x).norm()) for x in chosen])
            for layer, row in zip(chosen, rows):
                w.add_tensor(f"direction.{layer}", row)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    except OSError as e:
        raise LatentlabError(f"cannot write {path} ({e.strerror or e})", "choose a path you can write to") from None
    return path


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------


def _field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001  (an odd field: treat as absent)
        return None


def _from_layers(
    vecs: dict[int, np.ndarray | torch.Tensor],
    source: Path,
    fmt: str,
    meta: dict[str, Any] | None = None,
    resid_norms: Sequence[float] | None = None,
    name: str | None = None,
    position: str = "last",
    method: str = "imported",
) -> Direction:
    if not vecs:
        raise LatentlabError(f"{source} holds no per-layer vectors", "pass a control vector or a steering-vector file")
    layers = sorted(vecs)
    rows = []
    for layer in layers:
        v = torch.as_tensor(np.array(vecs[layer], dtype=np.float32, copy=True)).reshape(-1)
        rows.append(v)
    widths = {int(r.shape[0]) for r in rows}
    if len(widths) != 1:
        raise LatentlabError(f"{source} has vectors of different widths {sorted(widths)}", "pass a file for one model")
    vectors = torch.stack(rows)
    if resid_norms is not None and len(resid_norms) == len(layers):
        rn = torch.tensor([float(x) for x in resid_norms], dtype=torch.float32)
    else:
        rn = vectors.norm(dim=-1)  # alpha 1 = the vector as written (llama.cpp strength 1)
    d = Direction(vectors, layers, rn, name or source.stem, position, method, dict(meta or {}))
    d.meta.update({"source": str(source), "source_format": fmt})
    d.meta.update(sidecar_fields(d))
    return d.validate(source)


def _import_gguf(path: Path) -> Direction:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (bad magic, truncated file, ...)
        raise LatentlabError(
            f"{path} is not a readable GGUF file ({first_line(e)})", "pass a .gguf control vector"
        ) from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise LatentlabError(
            f"{path} is a GGUF with architecture {arch!r}, not a control vector ({ARCH!r})",
            "pass a control vector (written by `latentlab export`, repeng's export_gguf or llama-cvector-generator)",
        )
    vecs: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        m = _DIRECTION_RE.match(t.name)
        if m is None or int(m.group(1)) < 1:
            raise LatentlabError(
                f"{path} has tensor {t.name!r}; a control vector holds only direction.N with N >= 1",
                "pass a control vector that llama.cpp can load",
            )
        if len([s for s in t.shape if s != 1]) > 1:
            raise LatentlabError(f"{path}: tensor {t.name} is not 1-D", "pass a control vector that llama.cpp can load")
        data = np.asarray(t.data)
        if data.dtype not in (np.float32, np.float16):
            raise LatentlabError(f"{path}: tensor {t.name} is not float ({t.tensor_type.name})", "export it as F32")
        layer = int(m.group(1))
        row = data.astype(np.float32).reshape(-1)
        vecs[layer] = vecs[layer] + row if layer in vecs else row  # llama.cpp sums repeats
    hint = _field(reader, f"{ARCH}.model_hint")
    stored_layers = _field(reader, "latentlab.layers")
    resid = _field(reader, "latentlab.resid_norms")
    if stored_layers is None or [int(x) for x in stored_layers] != sorted(vecs):
        resid = None  # not ours, or edited: fall back to the vectors' own norms
    meta: dict[str, Any] = {"model_hint": hint}
    scale = _field(reader, "latentlab.scale")
    if scale is not None:
        meta["exported_scale"] = scale
    return _from_layers(
        vecs,
        path,
        "gguf",
        meta,
        resid,
        _field(reader, "latentlab.name"),
        _field(reader, "latentlab.position") or "last",
        _field(reader, "latentlab.method") or "imported",
    )


def _layer_key(key: str) -> int | None:
    m = re.search(r"(-?\d+)$", str(key))
    return int(m.group(1)) if m else None


def _check_layer_type(layer_type: Any, source: Path) -> None:
    if layer_type not in (None, "decoder_block"):
        raise LatentlabError(
            f"{source} patches layer_type {layer_type!r}; latentlab steers the residual stream after each block",
            "export the steering vector with layer_type='decoder_block'",
        )


def _import_json(path: Path) -> Direction:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LatentlabError(f"cannot read {path} as JSON ({first_line(e)})", "pass a valid JSON vector file") from None
    if not isinstance(obj, dict):
        raise LatentlabError(
            f"{path} is not a JSON object", "pass {'directions': {layer: [...]}} or steering-vectors JSON"
        )
    if "layer_activations" in obj:  # steering-vectors SteeringVector fields
        _check_layer_type(obj.get("layer_type"), path)
        table, fmt = obj["layer_activations"], "steering-vectors-json"
    elif "directions" in obj:  # repeng ControlVector fields
        table, fmt = obj["directions"], "repeng-json"
    else:
        raise LatentlabError(
            f"{path} has neither 'directions' (repeng) nor 'layer_activations' (steering-vectors)",
            "pass a vector file in one of those layouts",
        )
    if not isinstance(table, dict):
        raise LatentlabError(f"{path}: the per-layer table is not an object", "key it by layer index")
    vecs: dict[int, np.ndarray] = {}
    for k, v in table.items():
        layer = _layer_key(k)
        if layer is None or layer < 0:
            raise LatentlabError(f"{path}: layer key {k!r} is not a 0-based block index", "key vectors by layer")
        try:
            vecs[layer] = np.asarray(v, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise LatentlabError(
                f"{path}: layer {k} is not a list of numbers", "store each vector as numbers"
            ) from None
    hint = obj.get("model_type") or obj.get("model_hint")
    return _from_layers(vecs, path, fmt, {"model_hint": hint})


def _import_safetensors(path: Path) -> Direction:
    from safetensors import safe_open

    if path.with_suffix(".json").exists():
        try:
            return Direction.load(path)
        except LatentlabError:
            pass  # a sidecar that isn't latentlab's: read the tensors themselves
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise LatentlabError(
            f"cannot read {path} as safetensors ({first_line(e)})", "pass a valid .safetensors"
        ) from None
    _check_layer_type(header.get("layer_type"), path)
    vecs: dict[int, torch.Tensor] = {}
    for k, t in tensors.items():
        layer = _layer_key(k)
        if layer is None or layer < 0:
            raise LatentlabError(
                f"{path} has tensor {k!r}, not keyed by layer (direction.N, layer_activations.N or N)",
                "save one tensor per layer, named by its 0-based block index",
            )
        vecs[layer] = t.float().reshape(-1)
    return _from_layers(vecs, path, "safetensors", {"model_hint": header.get("model_type") or header.get("model_hint")})


def import_vector(path: str | Path) -> Direction:
    """Read a llama.cpp / repeng GGUF control vector, or a repeng / steering-vectors JSON or safetensors file.

    Layer indices map back unchanged (``direction.N`` -> ``blocks.N.hook_resid_post``). Pickles
    (``.pt``, ``.pkl``, ...) are refused: loading one runs arbitrary code.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise LatentlabError(
            f"{p} is a pickle ({suffix}); latentlab never unpickles files, "
            "because loading a pickle runs arbitrary code",
            "re-save it as GGUF (repeng: vector.export_gguf(path)), safetensors or JSON",
        )
    if not p.is_file():
        raise LatentlabError(f"{p} does not exist", "pass the path of a vector file")
    if suffix == ".gguf":
        return _import_gguf(p)
    if suffix == ".json":
        return _import_json(p)
    if suffix == ".safetensors":
        return _import_safetensors(p)
    raise LatentlabError(
        f"{p}: unknown vector format {suffix or '(no suffix)'}", "pass a .gguf, .safetensors or .json file"
    )


def save_imported(direction: Direction, out: str | Path) -> Path:
    """Save ``direction`` as ``out/direction.safetensors`` + sidecar (with :func:`sidecar_fields`)."""
    direction.meta.update(sidecar_fields(direction))
    return direction.save(Path(out) / "direction.safetensors")
