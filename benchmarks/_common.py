"""What every benchmark result records besides its numbers, and how it is written."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latentlab.io import write_json, write_text
from latentlab.runs import package_versions


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


def write_results(out: Path, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write the JSON result and its markdown table (both atomically), and print the table."""
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
