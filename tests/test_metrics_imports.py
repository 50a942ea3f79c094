"""neon/metrics imports form a tree: every import of another neon module is at the top of its file, and the
graph of those imports has no cycle (a cycle hidden by imports inside functions breaks on the next refactor)."""
import ast
from pathlib import Path

import neon

PACKAGE = Path(neon.__file__).parent


def _neon_imports(path: Path) -> tuple[set[str], list[int]]:
    """(neon modules imported at the top of `path`, lines of neon imports inside functions or classes)."""
    tree = ast.parse(path.read_text())
    top = {n for node in tree.body for n in _names(node)}
    nested = [node.lineno for node in ast.walk(tree) if _names(node) and node not in tree.body]
    return top, nested


def _names(node) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neon"):
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("neon")]
    return []


def test_metrics_imports_are_at_the_top_and_acyclic():
    modules = {f"neon.metrics.{p.stem}": p for p in (PACKAGE / "metrics").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        top, nested = _neon_imports(path)
        assert not nested, f"{path.name}: neon imports inside functions at lines {nested}"
        graph[name] = {m for m in top if m in modules and m != name}

    state: dict[str, str] = {}

    def visit(node, trail):
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        if state.get(node) == "done":
            return
        state[node] = "open"
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        visit(name, [])
    assert graph["neon.metrics.features"] >= {"neon.metrics.nvidia_detector", "neon.metrics.compat"}
