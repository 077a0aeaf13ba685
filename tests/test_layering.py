"""The package's layers import only the layers below them, and no module imports itself back.

Every ``import`` counts, at the top of a module or inside a function. The order is the
design's (``qarray`` → ``ops`` → ``calibrate`` → ``methods`` → ``quantize`` → ``io`` →
``finetune`` → ``search`` → ``pipeline`` → ``models`` → ``cli``), with the helpers each layer uses
placed where they belong.
"""

from __future__ import annotations

import ast
import pathlib

import jaxquant

PACKAGE = pathlib.Path(jaxquant.__file__).parent

# Each top-level module or subpackage of jaxquant, lowest layer first.
LAYERS: list[tuple[str, ...]] = [
    ("atomic_files", "lazy_exports", "known_models", "host_memory", "native_build", "in_order", "validate",
     "thread_scope", "bitpack"),
    ("qarray",),
    ("recipes", "select", "stats", "problems", "rotations"),
    ("ops",),
    ("calibrate",),
    ("methods", "recipes_named"),
    ("quantize", "embeddings"),
    ("io", "data", "eval"),
    ("finetune",),
    ("search",),
    ("pipeline",),
    ("models",),
    ("train", "quickstart", "reference_quickstart", "cli"),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: pathlib.Path) -> str:
    parts = ("jaxquant", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """``{module: jaxquant modules it imports}``, every import statement counted."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from jaxquant.x import y`` may name the submodule jaxquant.x.y.
                found = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            targets |= {t for t in found if t in modules and t.startswith("jaxquant.")}
        graph[name] = targets - {name}
    return graph


def _top(module: str) -> str:
    return module.split(".")[1]


def test_every_module_has_a_layer():
    tops = {_top(m) for m in _imports() if m != "jaxquant" and _top(m) != "__main__"}
    assert sorted(tops - set(LAYER)) == []


def test_layers_import_only_layers_below():
    bad = [
        f"{src} imports {dst}"
        for src, targets in _imports().items()
        if src != "jaxquant" and _top(src) in LAYER
        for dst in sorted(targets)
        if _top(dst) in LAYER and LAYER[_top(dst)] > LAYER[_top(src)]
    ]
    assert bad == []


def test_no_import_cycle():
    # Package __init__ files re-export (lazily) and are not part of the layering.
    packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    graph = {m: ts - packages for m, ts in _imports().items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node, [node])
    assert cycles == []
