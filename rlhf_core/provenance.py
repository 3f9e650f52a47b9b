"""What code produced a result: the project's source files a module runs (its imports, at any
depth, lazy ones too) and their digest. Stage cache keys and training checkpoints carry it, so an
edit to the code a stage or a trainer runs is never mistaken for the same work."""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path
from types import ModuleType

from rlhf_core.config import PROJECT_ROOT


def _module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=1024)
def _imported_names(path: Path, mtime_ns: int) -> tuple[str, ...]:
    """Every absolute module name a file imports, at any depth (`from m import x`: m and m.x)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return tuple(names)


def import_closure(
    files: list[Path], root: Path, packages: tuple[str, ...] = ("rlhf_core",)
) -> list[Path]:
    """The project's source files that `files` import, directly or through each other, at any
    depth in the file (imports inside functions too), with the packages' __init__ files; sorted."""
    seen: set[Path] = set()
    todo = [f.resolve() for f in files]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path, path.stat().st_mtime_ns):
            parts = name.split(".")
            if parts[0] not in packages:
                continue
            for depth in range(1, len(parts) + 1):  # the packages on the way execute too
                found = _module_file(".".join(parts[:depth]), root)
                if found and found.resolve() not in seen:
                    todo.append(found.resolve())
    return sorted(seen)


def files_version(
    sources: list[Path], data: list[Path], root: Path, packages: tuple[str, ...] = ("rlhf_core",)
) -> str:
    """Digest of source files (with their import closure within `packages`) and data files
    under root."""
    files = import_closure(sources, root, packages) + sorted(data)
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.resolve().relative_to(root.resolve())).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def module_code_version(*modules: ModuleType) -> str:
    """files_version of library modules, with every library module they import."""
    return files_version([Path(m.__file__) for m in modules], [], PROJECT_ROOT)
