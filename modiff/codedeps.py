"""The code a stage runs: the import closure of its module, fingerprinted on code that runs.

A module's closure is its file, its parent packages' ``__init__`` files and, transitively, every
package module it imports anywhere in its code (a function's import may run): a superset of what
running it can load. The fingerprint hashes each file's syntax tree without docstrings (comments
are not in the tree), so an edit to prose reruns nothing while any change to what runs, a
constant included, changes it. Files beside a module that it names in a string (data it reads)
count by their bytes.
"""

from __future__ import annotations

import ast
import copy
import hashlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent


def module_file(module: str) -> Path | None:
    """``modiff.x.y`` -> its file (a module or a package's __init__.py), None if not the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_statements(tree: ast.AST, package: str) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Each import anywhere under ``tree`` as ``(module, names)``: ``import a.b`` is ``("a.b",
    ())``, ``from x import y, z`` is ``("x", ("y", "z"))`` with a relative ``x`` made absolute
    (``package`` anchors it)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield base, tuple(alias.name for alias in node.names)


def imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Modules named by the imports anywhere under ``tree`` (absolute, relative and ``from pkg
    import submodule``), in the package or not."""
    found = set()
    for module, names in import_statements(tree, package):
        found.add(module)
        found |= {f"{module}.{name}" for name in names}  # a module, or skipped
    return found


def _data_files(tree: ast.AST, folder: Path) -> set[Path]:
    """Files beside a module that it names in a string (data it reads)."""
    beside = {p.name: p for p in folder.iterdir() if p.is_file() and p.suffix != ".py"}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    return {path for name, path in beside.items() if name in strings}


@cache
def closure(module: str) -> frozenset[Path]:
    """The files running ``module`` can load or read (see the module docstring)."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        files.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent __init__s run first
        tree = _syntax_tree(path)
        package = name if path.name == "__init__.py" else ".".join(parts[:-1])
        todo += sorted(imported_modules(tree, package))
        files |= _data_files(tree, path.parent)
    return frozenset(files)


def _syntax_tree(path: Path) -> ast.Module:
    """``path`` parsed, once per version of the file (read-only: shared between callers)."""
    stat = path.stat()
    return _parse(path, stat.st_mtime_ns, stat.st_size)


@cache
def _parse(path: Path, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(path.read_text())


def code_files(module: str) -> tuple[str, ...]:
    """:func:`closure` as sorted paths relative to the project root."""
    return tuple(sorted(str(f.relative_to(ROOT)) for f in closure(module)))


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_digest(path: Path) -> str:
    """sha256 of what runs in ``path``: a Python file's syntax tree without docstrings and
    without positions (so comments, blank lines and layout do not count), else its bytes."""
    stat = path.stat()  # each file parsed once per version (Snakemake asks for every rule)
    return _code_digest(path, stat.st_mtime_ns, stat.st_size)


@cache
def _code_digest(path: Path, mtime_ns: int, size: int) -> str:
    if path.suffix != ".py":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    tree = _without_docstrings(copy.deepcopy(_parse(path, mtime_ns, size)))  # the shared tree
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def fingerprint(module: str) -> str:
    """One digest of the code ``module`` runs: its closure's files by path and code digest."""
    digest = hashlib.sha256()
    for rel in code_files(module):
        digest.update(f"{rel}\0{code_digest(ROOT / rel)}\n".encode())
    return digest.hexdigest()[:16]
