"""The core's import graph, read from the source with ast: the core imports no family and no experiment, and
its modules form no import cycle."""
import ast
import importlib.metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "neon"


def _plugin_packages() -> set[str]:
    """Top-level packages of every installed family plus the experiments (never imported by the core)."""
    found = {"experiments"}
    for ep in importlib.metadata.entry_points(group="neon.families"):
        found.add(ep.value.split(":")[0].split(".")[0])
    return found - {"neon"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules `path` imports ('from neon import dist' counts as neon.dist when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: level 1 is the module's own package
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in CORE.rglob("*.py")}
    return {name: {m for m in _imports(path, top_level_only) if m in modules and m != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_core_imports_no_family_and_no_experiment():
    plugins = _plugin_packages()
    assert {"edm", "var", "xar", "imm", "experiments"} <= plugins   # what the entry points name, at least
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p, top_level_only=False)
                                                  if m.split(".")[0] in plugins)
                 for p in CORE.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_core_modules_import_each_other_without_a_cycle():
    assert _cycles(_graph(top_level_only=True)) == []


def test_no_cycle_hides_in_imports_inside_functions():
    assert _cycles(_graph(top_level_only=False)) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
