"""What every benchmark result records besides its numbers, and how it is written."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latentlab.io import read_json, write_json, write_text
from latentlab.runs import package_versions

HERE = Path(__file__).resolve().parent


def provenance(device: Any, load_before: tuple[float, float, float]) -> dict[str, Any]:
    """Machine, packages and date: a timing means nothing without them (load average included,
    because a second process on a 2-core machine slows torch by far more than 2x)."""
    return {
        "machine": {
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "packages": package_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def benchmark_args(
    ap: argparse.ArgumentParser, name: str, markdown: Callable[[dict[str, Any]], str]
) -> argparse.Namespace:
    """Parse the options every benchmark shares (--out, --markdown-only). With --markdown-only,
    re-render OUT.md from an existing OUT.json and exit: no model is loaded."""
    ap.add_argument("--out", type=Path, default=HERE / "results" / f"{name}.json")
    ap.add_argument("--markdown-only", action="store_true", help="re-render OUT.md from an existing OUT")
    args = ap.parse_args()
    if args.markdown_only:
        write_text(args.out.with_suffix(".md"), markdown(read_json(args.out)))
        raise SystemExit(0)
    return args


def load_timed(name: str) -> tuple[Any, float, tuple[float, float, float]]:
    """(model on CPU, load seconds, load average before): the load average is taken first, before
    this process adds to it."""
    import latentlab

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model = latentlab.load_model(name, device="cpu", progress=True)
    return model, time.perf_counter() - t0, load_before


def write_results(out: Path, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write the JSON result and its markdown table (both atomically), and print the table."""
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
