"""``latentlab export`` / ``latentlab import``: directions as llama.cpp control vectors (latentlab.vectors).

Each command parses its options into a config (validated before anything is read or written), calls
one library function (:func:`latentlab.vectors.run_export`, :func:`latentlab.vectors.run_import`)
and prints. No model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from latentlab.cli._common import _command_line, app, out_console


@app.command("export")
def export_cmd(
    direction: Annotated[Path, typer.Option(help="Saved direction .safetensors (from `latentlab direction`).")],
    out: Annotated[Path, typer.Option(help="Control-vector file to write (FILE.gguf).")],
    format: Annotated[str, typer.Option("--format", help="Output format: gguf (llama.cpp control vector).")] = "gguf",
    layers: Annotated[
        str,
        typer.Option(
            help="e.g. 6,12 or 4-10 or all (all = the direction's layers except 0, which llama.cpp cannot steer)."
        ),
    ] = "all",
    scale: Annotated[
        str,
        typer.Option(
            help="unit (strength in raw residual units), resid_norm (llama.cpp strength = latentlab alpha) or a number."
        ),
    ] = "unit",
    model_hint: Annotated[
        str | None, typer.Option(help="controlvector.model_hint (default: the direction's model).")
    ] = None,
) -> None:
    """Write a direction as a llama.cpp control vector (direction.N = output of block N)."""
    from latentlab.vectors import ExportConfig, run_export

    cfg = ExportConfig(direction=direction, out=out, format=format, layers=layers, scale=scale, model_hint=model_hint)
    path, d, chosen = run_export(cfg)
    shown = ",".join(map(str, chosen))
    out_console.print(
        f"{d.name} direction, layers {shown} (blocks.N.hook_resid_post -> direction.N), scale {cfg.scale} -> {path}\n"
        f"llama.cpp: --control-vector-scaled {path} ALPHA"
        + (" (ALPHA = latentlab alpha)" if cfg.scale == "resid_norm" else "")
    )


@app.command("import")
def import_cmd(
    source: Annotated[
        Path, typer.Argument(help="A .gguf control vector, or a repeng / steering-vectors .json / .safetensors.")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write (OUT/direction.safetensors + sidecar, manifest.json).")],
) -> None:
    """Read a control vector or steering vector back as a latentlab direction."""
    from latentlab.vectors import ImportConfig, run_import

    cfg = ImportConfig(source=source, out=out)
    path, d = run_import(cfg, _command_line())
    out_console.print(
        f"{d.meta.get('source_format')} vector, layers {','.join(map(str, d.layers))}, "
        f"width {d.vectors.shape[-1]} -> {path}"
    )
