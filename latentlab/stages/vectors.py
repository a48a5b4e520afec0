"""``latentlab export`` / ``latentlab import``: directions as llama.cpp control vectors, and back.

The layer-index and scale conventions, and the readers and writers, are in :mod:`latentlab.vectors`.
No model is loaded: both configs check their files before anything is read or written. ``export``
writes one file (no run folder); ``import`` writes a run folder with the direction and a manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentlab.errors import LatentlabError
from latentlab.stages.base import Context, OutOptions, Stage, StageConfig, option

SCALES = ("unit", "resid_norm")


@dataclass(kw_only=True)
class ExportConfig(StageConfig):
    """Write a direction as a llama.cpp control vector (direction.N = output of block N)."""

    command = "export"
    direction: Path = option(help="Saved direction .safetensors (from `latentlab direction`).")
    out: Path = option(help="Control-vector file to write (FILE.gguf).")
    format: str = option("gguf", help="Output format: gguf (llama.cpp control vector).", flags=("--format",))
    layers: str = option(
        "all", help="e.g. 6,12 or 4-10 or all (all = the direction's layers except 0, which llama.cpp cannot steer)."
    )
    scale: str = option(
        "unit",
        help="unit (strength in raw residual units), resid_norm (llama.cpp strength = latentlab alpha) or a number.",
    )
    model_hint: str | None = option(None, help="controlvector.model_hint (default: the direction's model).")

    def __post_init__(self) -> None:
        out, direction = Path(self.out), Path(self.direction)
        if self.format != "gguf":
            raise LatentlabError(f"--format {self.format!r} is not supported", "use --format gguf")
        if out.suffix != ".gguf":
            raise LatentlabError(f"--out {out} does not end in .gguf", "pass --out FILE.gguf")
        if self.scale not in SCALES:
            try:
                s = float(self.scale)
            except ValueError:
                s = float("nan")
            if not math.isfinite(s) or s == 0.0:
                raise LatentlabError(
                    f"--scale {self.scale!r} is not unit, resid_norm or a non-zero number",
                    "pass --scale unit or --scale resid_norm",
                )
        if direction.suffix != ".safetensors" and not direction.is_dir():
            raise LatentlabError(
                f"--direction {direction} is not a saved direction (.safetensors)",
                "pass a file written by `latentlab direction` (direction.safetensors)",
            )
        super().__post_init__()


@dataclass
class ExportResult:
    """The control-vector file written, the direction it came from, and the layers exported."""

    path: Path
    direction: Any  # latentlab.direction.Direction
    layers: list[int]


def run_export_stage(cfg: ExportConfig, ctx: Context) -> ExportResult:
    """Load the direction, check the layers, write the GGUF (no run folder: the output is one file)."""
    from latentlab.direction import Direction
    from latentlab.vectors import export_gguf, export_layers

    d = Direction.load(cfg.direction)
    layers = export_layers(d, cfg.layers)
    scale: str | float = cfg.scale if cfg.scale in SCALES else float(cfg.scale)
    return ExportResult(export_gguf(d, cfg.out, layers, scale, cfg.model_hint), d, layers)


def show_export(res: ExportResult, cfg: ExportConfig, console: Any) -> None:
    shown = ",".join(map(str, res.layers))
    console.print(
        f"{res.direction.name} direction, layers {shown} (blocks.N.hook_resid_post -> direction.N), scale {cfg.scale}"
        f" -> {res.path}\n"
        f"llama.cpp: --control-vector-scaled {res.path} ALPHA"
        + (" (ALPHA = latentlab alpha)" if cfg.scale == "resid_norm" else "")
    )


@dataclass(kw_only=True)
class ImportConfig(OutOptions):
    """Read a control vector or steering vector back as a latentlab direction."""

    command = "import"
    source: Path = option(
        help="A .gguf control vector, or a repeng / steering-vectors .json / .safetensors.", argument=True
    )
    out: Path = option(help="Folder to write (OUT/direction.safetensors + sidecar, manifest.json).")

    def __post_init__(self) -> None:
        from latentlab.vectors import PICKLE_SUFFIXES, import_vector

        source = Path(self.source)
        if source.suffix.lower() in PICKLE_SUFFIXES:
            import_vector(source)  # raises the pickle refusal
        if not source.is_file():
            raise LatentlabError(f"{source} does not exist", "pass the path of a .gguf, .safetensors or .json file")
        super().__post_init__()


@dataclass
class ImportResult:
    """The direction written (``out/direction.safetensors``) and the direction itself."""

    path: Path
    direction: Any  # latentlab.direction.Direction


def run_import_stage(cfg: ImportConfig, ctx: Context) -> ImportResult:
    """Read the vector before the folder is touched, then write OUT/direction.safetensors + manifest."""
    from latentlab.vectors import import_vector, save_imported

    d = import_vector(cfg.source)
    run = ctx.start()
    path = save_imported(d, run.out)
    ctx.finish(direction=str(path), layers=d.layers, source_format=d.meta.get("source_format"))
    return ImportResult(path, d)


def show_import(res: ImportResult, cfg: ImportConfig, console: Any) -> None:
    d = res.direction
    console.print(
        f"{d.meta.get('source_format')} vector, layers {','.join(map(str, d.layers))}, "
        f"width {d.vectors.shape[-1]} -> {res.path}"
    )


STAGES = [
    Stage("export", ExportConfig, run_export_stage, show_export),
    Stage("import", ImportConfig, run_import_stage, show_import),
]
run_export, run_import = STAGES
