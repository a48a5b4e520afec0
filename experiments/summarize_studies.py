"""Rebuild summary.json and report.html of every committed study copy from its files alone.

    python experiments/summarize_studies.py [experiments/results/studies]
"""

from __future__ import annotations

import sys
from pathlib import Path

from latentlab.io import write_json
from latentlab.study import summarize_study, write_report


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/studies")
    for d in sorted(p for p in root.glob("*") if (p / "study.json").is_file()):
        summary = summarize_study(d)
        write_json(d / "summary.json", summary)
        write_report(d, summary)
        print(f"{d}: {', '.join(summary['sections'])}")


if __name__ == "__main__":
    main()
