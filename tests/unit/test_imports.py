"""The library's imports point one way: no cycles, and no room imports a room above it.

A room is a top-level module or package of ``effllm`` (``effllm.models.mla`` is in ``models``).
Imports are read with ``ast``, lazy ones inside functions included (they run too, and
:mod:`effllm.codedeps` follows them); only imports under ``if TYPE_CHECKING:`` are left out.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "effllm"

# Lowest first. A module may import its own room and rooms on lower floors. Rooms on one floor
# (a tuple) stand side by side: neither imports the other. Rooms that do not exist yet are simply
# absent from the graph.
FLOORS = [
    "io",  # files, paths, JSON: the ground floor
    "records",  # the metric record type and its schema
    "distributed",  # device placement, process groups
    "precision",  # what bf16 compute means
    "specs",  # run and method specifications
    "measure",  # timers, FLOPs, memory, energy, KV-cache size
    "data",  # corpora, splits, tokenizer, hub downloads
    "models",  # the decoder family, its variants, baselines, quantised loading
    "evaluation",  # scoring a model on the tasks
    "stage",  # one job of any stage: seed, place, work, write
    ("training", "inference"),  # the two kinds of jobs; they share only what lies below
    "analysis",  # aggregating records into tables
    "plots",  # figures from those tables
    "sweep",  # orchestration: which runs exist,
    "cluster",  # where they run,
    "plan",  # what each of them needs on a GPU (simulated),
    "launch",  # how a job starts (after its plan's check),
    "config",  # checking the pipeline config against all of the above, before any job
    "codedeps",  # which library files it depends on,
    "outputs",  # and what the pipeline produces
]
FLOOR = {room: level for level, rooms in enumerate(FLOORS)
         for room in ((rooms,) if isinstance(rooms, str) else rooms)}


def module_names(src: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__``)."""
    names = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _type_checking(node.test):
            stack += node.orelse
        else:
            stack += ast.iter_child_nodes(node)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module that importing ``name`` names: itself, or its closest enclosing module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from a import b``: the module a.b if there is one, else a.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        found |= {t for t in (_resolve(t, modules) for t in targets
                              if t == PACKAGE or t.startswith(PACKAGE + "."))
                  if t is not None and t != module}
    return found


@functools.lru_cache(maxsize=None)  # parsed once for all the tests
def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = module_names(src)
    return {module: imports(module, modules) for module in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def connect(v):  # Tarjan; the graph has tens of modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for group in groups:
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:  # breadth first: the shortest way back to start
            path = paths.pop(0)
            nxt = sorted(graph[path[-1]] & group)
            if start in nxt:
                found.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return sorted(found)


def room(module: str) -> str | None:
    """``effllm.models.mla`` -> ``models``; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = room(module), room(target)
            if there is None or here == there:
                continue
            if here is None or here not in FLOOR or there not in FLOOR:
                continue  # the root may import its submodules; a room off FLOORS fails elsewhere
            if FLOOR[there] > FLOOR[here]:
                bad.append(f"{module} ({here}) imports {target} ({there}), a higher floor")
            elif FLOOR[there] == FLOOR[here]:
                bad.append(f"{module} ({here}) imports {target} ({there}), beside it")
    return bad


def test_every_room_is_on_a_floor():
    unknown = sorted({room(m) for m in module_names()} - set(FLOOR) - {None})
    assert not unknown, f"rooms missing from FLOORS in {__file__}: {unknown}"


def test_the_reader_follows_lazy_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "sub/__init__.py", "sub/b.py", "c.py", "d.py", "e.py"):
        (pkg / name).write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from effllm.sub import b, NAME\n"
        "if TYPE_CHECKING:\n    import effllm.d\nelse:\n    from . import e\n"
        "def f():\n    import effllm.c\n")
    assert import_graph(tmp_path)["effllm.a"] == {"effllm.sub.b", "effllm.sub", "effllm.c",
                                                 "effllm.e"}


def test_the_models_import_one_way():
    graph = import_graph()
    # The variants build on the shared lower modules and never on the decoder that builds them.
    for variant in ("mla", "nsa", "moe"):
        assert not graph[f"{PACKAGE}.models.{variant}"] & {f"{PACKAGE}.models.decoder",
                                                           f"{PACKAGE}.models"}
    assert f"{PACKAGE}.models.layers" in graph[f"{PACKAGE}.models.decoder"]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_upward_imports():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the floors (FLOORS, lowest first):\n" + "\n".join(bad)
