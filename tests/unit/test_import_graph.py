"""train/ has no import cycles, and the training loop is nobody's utility module:
pytest tests/unit/test_import_graph.py

Every `import train...` in train/ (at module level or inside a function) is an edge; names a
package resolves lazily (its _EXPORTS table, PEP 562) lead to the module that defines them.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "train").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def lazy_exports(found: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{package: {name: module}} from each package's _EXPORTS table."""
    tables = {}
    for name, path in found.items():
        if path.name != "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_EXPORTS":
                table = ast.literal_eval(node.value)
                tables[name] = {k: v if v.startswith("train") else f"{name}.{v}" for k, v in table.items()}
    return tables


def import_graph() -> dict[str, set[str]]:
    found = modules()
    tables = lazy_exports(found)

    def resolve(name: str) -> str | None:
        package, _, attr = name.rpartition(".")
        if attr in tables.get(package, {}):
            return tables[package][attr]
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    graph = {name: set() for name in found}
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            resolved = {resolve(target) for target in targets if target.startswith("train.")}
            graph[name].update(resolved - {None, name})
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_no_import_cycles():
    graph = import_graph()
    cycles = [cycle for cycle in (cycle_through(graph, name) for name in graph) if cycle]
    assert not cycles, " | ".join(" -> ".join(cycle) for cycle in cycles)


def test_only_the_job_runner_imports_the_trainer():
    importers = sorted(name for name, targets in import_graph().items() if "train.trainer" in targets)
    assert importers == ["train.engine"]
