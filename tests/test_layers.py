"""The package's layering, read from the source (no imports, no processes): no import cycle between
modules, and no module importing from a layer above its own. Function-level imports count too: a
cycle hidden inside a function is still a cycle (it only fails later, at the call). Imports under
``if TYPE_CHECKING:`` do not: they never run.

A new module goes into ``LAYERS`` (the most specific prefix wins); a module no prefix covers fails
``test_every_module_has_a_layer``, so the table stays the map of what is there.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lepton"

# each layer imports only from its own layer and the ones below it (lower numbers)
LAYERS = {
    # 0: definitions every part shares
    "lepton.errors": 0,
    "lepton.protocol": 0,
    "lepton.spec": 0,
    "lepton.console": 0,
    "lepton.cli_args": 0,
    "lepton.records": 0,
    # 1: data, the model and the training rules
    "lepton.storage": 1,
    "lepton.sampler": 1,
    "lepton.metrics": 1,
    "lepton.policies": 1,
    "lepton.model": 1,
    # 2: talking to other processes
    "lepton.comm": 2,
    "lepton.client": 2,
    "lepton.remote": 2,
    # 3: the two roles
    "lepton.worker": 3,
    "lepton.coordinator": 3,
    # 4: starting a job (open_run, local workers, signals)
    "lepton.launch": 4,
    # 5-6: using a trained model; the export phase (which fine-tunes through launch)
    "lepton.predict": 5,
    "lepton.export": 6,
    # 7: the user's entry points
    "lepton.api": 7,
    "lepton.cli": 7,
    "lepton.export.cli": 7,
    "lepton.runs": 7,
    "lepton": 7,
    "lepton.__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported lepton module, line) for every import statement of module ``name``, at any depth.
    ``from pkg import x`` counts as importing ``pkg.x`` when that is a module, else ``pkg``."""
    tree = ast.parse(source, name)
    package = name.split(".") if is_package else name.split(".")[:-1]
    type_only = {
        id(n)
        for block in ast.walk(tree)
        if _is_type_checking(block)
        for stmt in block.body
        for n in ast.walk(stmt)
    }  # never run: no dependency at run time
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [f"{source}.{a.name}" for a in node.names]
            targets = [n if n in MODULES else source for n in names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import lepton.x.y`` of a name inside a module
                target = target.rpartition(".")[0]
            if target.split(".")[0] == "lepton" and target != name and (target, node.lineno) not in found:
                found.append((target, node.lineno))
    return found


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


GRAPH = {name: _imports(name, path.read_text(), path.name == "__init__.py") for name, path in MODULES.items()}


def layer_of(name: str) -> int | None:
    prefixes = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def _cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle or several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_every_kind_of_import():
    source = (
        "from ..errors import LeptonError\nfrom .. import metrics\nimport lepton.spec\n"
        "def f():\n    from ..launch.run import open_run\n    import json\n"
    )
    want = [("lepton.errors", 1), ("lepton.metrics", 2), ("lepton.spec", 3), ("lepton.launch.run", 5)]
    assert _imports("lepton.export.x", source) == want
    in_package = _imports("lepton.launch", "from .run import open_run\n", is_package=True)
    assert in_package == [("lepton.launch.run", 1)]
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..api import train\n"
    assert _imports("lepton.launch.x", guarded) == [], "annotations-only imports never run"
    prune_imports = [t for t, _ in GRAPH["lepton.export.prune"]]
    assert "lepton.launch" in prune_imports, "a fine-tune goes through launch"


def test_no_import_cycles():
    cycles = _cycles()
    detail = [
        "; ".join(f"{m} -> {t} (line {line})" for m in c for t, line in GRAPH[m] if t in c) for c in cycles
    ]
    assert not cycles, "import cycles between modules:\n" + "\n".join(detail)


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"modules with no layer in tests/test_layers.py LAYERS: {missing}"


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)}) at line {line}"
        for m, imported in GRAPH.items()
        for t, line in imported
        if layer_of(m) is not None and layer_of(t) is not None and layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports against the layering:\n" + "\n".join(upward)
