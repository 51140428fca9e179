"""Which library files a pipeline step really runs: its module's effllm imports, transitively.

Snakemake does not track modules that a script imports, so a rule declares these files as inputs
(``common.smk``). Editing one then reruns exactly the jobs whose code reaches it. Imports are read
with ``ast`` (lazy imports inside functions included), so the list follows the code by itself.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT.name
DATA_FILES = {"records.py": ["record.schema.json"]}  # files a module reads at run time


def _file(module: str, root: Path) -> Path | None:
    """The file that defines ``module`` (a package's __init__.py or a module), or None."""
    rel = module.split(".")[1:]
    candidates = [root.joinpath(*rel, "__init__.py")]
    if rel:
        candidates.append(root.joinpath(*rel).with_suffix(".py"))
    return next((c for c in candidates if c.is_file()), None)


def _imports(path: Path) -> set[str]:
    # Every rule's input function asks for overlapping files: parse each file once per version.
    stat = path.stat()
    return _parsed_imports(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _parsed_imports(path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return frozenset(name for name in found
                     if name == PACKAGE or name.startswith(PACKAGE + "."))


def module_files(*modules: str, root: Path = ROOT, exclude: Iterable[str] = ()) -> list[str]:
    """Sorted paths of every package file that importing ``modules`` executes or reads.

    Modules in ``exclude`` are not entered (a lazy import the run never takes); files they
    import still count when another path reaches them.
    """
    seen: set[Path] = set()
    skip = set(exclude)
    stack = list(modules)
    while stack:
        module = stack.pop()
        if module in skip:
            continue
        parts = module.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        stack += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = _file(module, root)
        if path is None or path in seen:
            continue
        seen.add(path)
        seen |= {root / extra for extra in DATA_FILES.get(path.name, [])}
        stack += sorted(_imports(path))
    return sorted(str(p) for p in seen)
