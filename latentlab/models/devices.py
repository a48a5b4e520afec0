"""Devices, dtypes and accelerate device maps: checked before loading, so a bad choice fails with a hint.

The bridge computes from the modules' own parameters, so placements it cannot hook (disk / meta
offload, CPU offload next to GPUs) are refused here rather than giving silently wrong activations.
"""

from __future__ import annotations

from typing import Any

import torch

from latentlab.errors import LatentlabError, first_line


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None picks CUDA when present, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LatentlabError(f"unknown device {device!r}", "use --device cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LatentlabError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LatentlabError(
                f"--device {dev} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}, or --device-map auto",
            )
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """The dtype to load in; None means bfloat16 on CUDA and float32 on CPU.

    ``device`` (default CPU, for the None case) is where the model will run; bfloat16 on a GPU that
    lacks it is refused with a hint instead of failing deep inside a kernel.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" and _cuda_bf16(dev) else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        key = str(dtype).replace("torch.", "")
        if key not in DTYPES:
            raise LatentlabError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
        dt = DTYPES[key]
    if dt == torch.bfloat16 and dev.type == "cuda" and not _cuda_bf16(dev):
        raise LatentlabError(
            f"{torch.cuda.get_device_name(dev)} has no bfloat16 support", "use --dtype float16 or --dtype float32"
        )
    return dt


def _cuda_bf16(dev: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):  # pragma: no cover - broken driver
        return False


def resolve_device_map(device_map: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """Check an accelerate device map: 'auto' / 'balanced' / 'sequential' / a device, or a dict
    module name -> device. Names a device this machine does not have."""
    if device_map is None:
        return None
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(device_map, str):
        if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            return device_map
        values: list[Any] = [device_map]
    elif isinstance(device_map, dict):
        values = list(device_map.values())
    else:
        raise LatentlabError(
            f"cannot read device map {device_map!r}", "pass 'auto' or a dict of module name -> device"
        )
    for v in values:
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            i = int(v)
            ok, shown = i < n_gpu, f"cuda:{i}"
        elif isinstance(v, (str, torch.device)) and str(v) in ("disk", "meta"):
            raise LatentlabError(
                f"the device map offloads part of the model to {v}, which TransformerBridge hooks cannot see "
                "(the bridge computes from the modules' own weights)",
                "use --dtype bfloat16, more or bigger GPUs (--device-map auto spreads over all of them), or an "
                "all-CPU map (--device cpu)",
            )
        elif isinstance(v, (str, torch.device)) and str(v) == "cpu":
            continue
        else:
            try:
                d = torch.device(v)
            except (RuntimeError, TypeError):
                raise LatentlabError(
                    f"device map names {v!r}, which is not a device", "use cpu, cuda:N, N or 'auto'"
                ) from None
            ok, shown = d.type == "cuda" and (d.index or 0) < n_gpu, str(d)
            if d.type == "cpu":
                continue
        if not ok:
            raise LatentlabError(
                f"device map names {shown}, which does not exist (this machine has {n_gpu} CUDA GPU(s))",
                "use --device-map auto, or name only devices this machine has",
            )
    return device_map


def _check_placement(model: Any) -> None:
    """Refuse placements whose hooks would be wrong: the bridge computes from the modules' own
    parameters, which accelerate's disk/meta offload (and CPU offload next to GPUs) replaces."""
    placed = getattr(model, "hf_device_map", None) or {}
    kinds = {str(v).lower() if isinstance(v, str) else "cuda" for v in placed.values()}
    if kinds & {"disk", "meta"} or ({"cpu"} <= kinds and "cuda" in {k.split(":")[0] for k in kinds}):
        where = sorted(kinds)
        raise LatentlabError(
            f"the model does not fit the GPUs: the device map offloads part of it ({', '.join(where)}), which "
            "TransformerBridge hooks cannot see",
            "use --dtype bfloat16, more or bigger GPUs (--device-map auto spreads over all of them), or an "
            "all-CPU map (--device cpu)",
        )


def _oom_error(e: BaseException, where: str) -> LatentlabError:
    return LatentlabError(
        f"out of memory while {where}: {first_line(e)}",
        "use --device-map auto (spread over all GPUs) or --dtype bfloat16, or a smaller model",
    )


def _first_device(model: Any) -> torch.device:
    """Where inputs go under a device map: the input embedding's device."""
    emb = model.get_input_embeddings()
    return next(emb.parameters()).device

