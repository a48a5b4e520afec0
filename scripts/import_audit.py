"""Count imports inside functions outside ``latentlab/stages`` and find import cycles among modules.

Why: algorithm modules are library code that imports only downward; only the stage layer may import
heavy modules lazily (so ``latentlab --help`` stays fast). Run: ``python scripts/import_audit.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "latentlab"
LAZY_OK = ("stages", "cli")


def module_name(p: Path) -> str:
    parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def audit() -> tuple[list[str], list[list[str]]]:
    """(in-function latentlab imports outside stages/ and cli/, import cycles of top-level imports)."""
    inner: list[str] = []
    graph: dict[str, set[str]] = {}
    for p in sorted(ROOT.rglob("*.py")):
        mod = module_name(p)
        tree = ast.parse(p.read_text())
        graph[mod] = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("latentlab"):
                graph[mod].add(node.module)
            elif isinstance(node, ast.If):  # TYPE_CHECKING blocks do not run
                continue
        lazy_ok = p.relative_to(ROOT).parts[0] in LAZY_OK
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latentlab") \
                            and not lazy_ok:
                        inner.append(f"{p.relative_to(ROOT.parent)}:{node.lineno} {node.module}")
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            n = n if n in graph else n.rsplit(".", 1)[0]
            if n not in graph or n == m or m.startswith(n + ".") or n.startswith(m + "."):
                continue  # a package re-exporting its own submodules is not a cycle
            if state.get(n) == 1:
                cycles.append([*stack[stack.index(n):], n] if n in stack else [m, n])
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return inner, cycles


if __name__ == "__main__":
    inner, cycles = audit()
    print("\n".join(inner))
    print(f"{len(inner)} in-function latentlab imports outside stages/ and cli/; {len(cycles)} import cycles")
    for c in cycles:
        print(" -> ".join(c))
    sys.exit(0)
