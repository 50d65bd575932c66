"""The import graph of src/dovecote: no cycle anywhere, imports only downward, and only the
web layer knows Starlette's routing.

The graph is read from the source with `ast`, never by importing it, so every import
counts: module level, deferred inside functions, and `if TYPE_CHECKING:` (a cycle hidden
behind TYPE_CHECKING or a function-local import is still two modules that cannot be read,
or changed, one without the other). Nodes are modules (a package is its `__init__`):

- `import dovecote.a.b` and `from dovecote.a import b` (b a submodule) are edges to a.b;
- `from dovecote.a import name` (name defined or re-exported by a/__init__.py) is an edge
  to the package dovecote.a, and whatever a/__init__.py imports to re-export it is that
  package's own edge;
- relative imports are resolved against the importing module's package;
- importing a submodule is not counted as importing its parent package: Python runs the
  parent's `__init__` first, but a package that imports its own submodules would
  otherwise always be a cycle.

Layers, lowest first (docs/architecture.md draws the same picture). A module may import
its own layer and any layer below, never one above:

    entry     cli, __main__                                    (the commands)
    server    server (the composition root), workers, ops.probe
    web       web/ (every ASGI endpoint), transport/ (uvicorn's protocol, TLS, below
              ASGI), console/ (templates, sessions, formatting of the console pages),
              client/ (the client library: beside the server, on didcomm/packing.py)
    didcomm   didcomm/, rooms/, ops.admin (what operators see and do)
    delivery  delivery/, and the operations over the store: ops.health, ops.cluster,
              ops.sampler, ops.backup, ops.backup_schedule
    store     store/
    util      util/, errors, files, the package itself (__version__), and the leaves
              every layer uses: ops.settings, ops.settings_fields, ops.metrics,
              ops.logging, ops.lock, ops.audit, ops.status
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "dovecote"

# Edges left in the graph on purpose, each with the reason (none today).
ALLOWED: set[tuple[str, str]] = set()

LAYERS: list[tuple[str, list[str]]] = [
    (
        "util",
        [
            "dovecote",
            "dovecote.util",
            "dovecote.errors",
            "dovecote.files",
            "dovecote.ops",
            "dovecote.ops.settings",
            "dovecote.ops.settings_fields",
            "dovecote.ops.metrics",
            "dovecote.ops.logging",
            "dovecote.ops.lock",
            "dovecote.ops.audit",
            "dovecote.ops.status",
        ],
    ),
    ("store", ["dovecote.store"]),
    (
        "delivery",
        [
            "dovecote.delivery",
            "dovecote.ops.health",
            "dovecote.ops.cluster",
            "dovecote.ops.sampler",
            "dovecote.ops.backup",
            "dovecote.ops.backup_schedule",
        ],
    ),
    ("didcomm", ["dovecote.didcomm", "dovecote.rooms", "dovecote.ops.admin"]),
    ("web", ["dovecote.web", "dovecote.transport", "dovecote.console", "dovecote.client"]),
    ("server", ["dovecote.server", "dovecote.workers", "dovecote.ops.probe"]),
    ("entry", ["dovecote.cli", "dovecote.__main__"]),
]

# Starlette's routing and application: the web layer's alone.
WEB_ONLY = ("starlette.routing", "starlette.applications")
WEB_PACKAGE = "dovecote.web"


def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _imports(tree: ast.AST, package: str) -> Iterator[tuple[str, str | None]]:
    """(module, imported name or None) for every import statement, anywhere in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield module, alias.name


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between dovecote modules, external modules imported) per module."""
    known = modules()
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, (path, is_package) in known.items():
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        targets: set[str] = set()
        outside: set[str] = set()
        for module, imported in _imports(tree, package):
            if module != PACKAGE and not module.startswith(PACKAGE + "."):
                outside.add(module if imported is None else f"{module}.{imported}")
                outside.add(module)
                continue
            if imported is not None and f"{module}.{imported}" in known:
                targets.add(f"{module}.{imported}")
                continue
            while module not in known:  # `import dovecote.a.b` of a name inside a module
                module = module.rpartition(".")[0]
            targets.add(module)
        targets.discard(name)
        edges[name] = targets
        external[name] = outside
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _path(edges: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete loop through `component`, to print: a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for child in sorted(edges[node] & members):
            if child == start:
                loop = [start]
                while node != start:
                    loop.append(node)
                    node = previous[node]
                return [start, *reversed(loop[1:]), start]
            if child not in previous:
                previous[child] = node
                frontier.append(child)
    return component


def layer_of(module: str) -> int:
    """The rank of `module`'s layer: the longest listed prefix decides."""
    best, rank = -1, -1
    for position, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), position
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return rank


def test_no_import_cycle() -> None:
    edges, _ = graph()
    for importer, imported in ALLOWED:
        edges[importer].discard(imported)
    found = cycles(edges)
    loops = "\n".join(" -> ".join(_path(edges, c)) for c in found)
    assert not found, f"import cycles in src/dovecote:\n{loops}"


def test_allowed_edges_still_exist() -> None:
    """An ALLOWED entry whose import is gone must go too (the list only shrinks)."""
    edges, _ = graph()
    stale = sorted(e for e in ALLOWED if e[1] not in edges.get(e[0], set()))
    assert not stale, f"remove from ALLOWED (no longer imported): {stale}"


def test_imports_only_downward() -> None:
    edges, _ = graph()
    upward = sorted(
        f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {imported} "
        f"({LAYERS[layer_of(imported)][0]})"
        for importer, targets in edges.items()
        for imported in targets
        if layer_of(imported) > layer_of(importer)
    )
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_only_web_imports_starlette_routing() -> None:
    _, external = graph()
    offenders = sorted(
        f"{module} imports {name}"
        for module, names in external.items()
        if module != WEB_PACKAGE and not module.startswith(WEB_PACKAGE + ".")
        for name in names
        if name in WEB_ONLY or name.startswith(tuple(n + "." for n in WEB_ONLY))
    )
    assert not offenders, "only dovecote.web may import Starlette routing:\n" + "\n".join(offenders)


def test_the_checks_see_deferred_and_type_checking_imports() -> None:
    """The reader counts what hides in functions and TYPE_CHECKING blocks."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from dovecote.a import b\n"
        "def f():\n    from ..c import d\n    import dovecote.e\n"
    )
    found = set(_imports(tree, "dovecote.x"))
    assert ("dovecote.a", "b") in found
    assert ("dovecote.c", "d") in found
    assert ("dovecote.e", None) in found
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
