#!/usr/bin/env python3
"""Fail on an upward import or a cross-module private import inside the flashmath package.

The layers, lowest first (a module may import its own package and any lower layer)::

    0  flashmath.dtypes, flashmath.text, ... (the bottom modules listed in BOTTOM)
    1  flashmath.softmax
    2  flashmath.attention
    3  flashmath.conformance | flashmath.measure
    4  flashmath.triton | flashmath.distributed
    5  flashmath.torch          (the torch op over the CPU kernels; CUDA goes to triton)
    6  flashmath.integrations   (transformers and other frameworks)
    7  flashmath.lab
    8  flashmath.cli, flashmath.__main__

Packages that share a layer (conformance and measure; triton and distributed) may not
import each other. The public facades (``flashmath`` itself, ``flashmath.naive``,
``flashmath.testing`` and the compatibility re-exports in FACADES) are for users: only
lab and cli may import them. No module imports or reads a leading-underscore name of
another flashmath module (dunders aside).

Usage: ``python scripts/check_layers.py [PACKAGE_DIR]`` (default: ./flashmath). Prints one
line per violation and exits 1 if there is any, 0 otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

BOTTOM = ("dtypes", "text", "rounding", "parallel", "files", "blas", "scratch")
PACKAGES = {
    "softmax": 1,
    "attention": 2,
    "conformance": 3,
    "measure": 3,
    "triton": 4,
    "distributed": 4,
    "torch": 5,
    "integrations": 6,
    "lab": 7,
    "cli": 8,
}
FACADES = {
    "flashmath",
    "flashmath.naive",
    "flashmath.testing",
    "flashmath.numerics",
    "flashmath.online",
    "flashmath.safety",
    "flashmath.mp_oracle",
    "flashmath.iomodel",
    "flashmath.attention.flash",
    "flashmath.distributed.decode",
}
FACADE_USERS = 7  # lab and cli


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> tuple[int, str] | None:
    """(rank, group) of a flashmath module, None for a facade, KeyError if unassigned."""
    if module in FACADES:
        return None
    parts = module.split(".")
    top = "cli" if parts[1] == "__main__" else parts[1]
    if top in BOTTOM:
        return 0, top
    return PACKAGES[top], top


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every flashmath import."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names
                      if a.name.split(".")[0] == "flashmath"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            if base.split(".")[0] == "flashmath":
                found += [(node.lineno, base, a.name) for a in node.names]
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def check_file(path: Path, root: Path, modules: set[str]) -> list[str]:
    module = module_name(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    where = f"{path}"
    problems: list[str] = []
    try:
        own = layer(module)
    except KeyError:
        return [f"{where}: module {module} has no layer (add it to scripts/check_layers.py)"]
    bound: dict[str, str] = {}  # local name -> flashmath module it names
    for line, target, name in _imports(tree, module, path.name == "__init__.py"):
        full = f"{target}.{name}" if name and f"{target}.{name}" in modules else target
        if name and _is_private(name) and full == target and target != module:
            problems.append(f"{where}:{line}: imports private name {name} from {target}")
        if name:
            bound[name] = full
        else:
            bound[target.split(".")[0]] = "flashmath"
        if own is None or full == module:
            continue  # facades may import anything below them
        try:
            theirs = layer(full)
        except KeyError:
            problems.append(f"{where}:{line}: imports {full}, which has no layer")
            continue
        if theirs is None:
            if own[0] < FACADE_USERS:
                problems.append(f"{where}:{line}: imports the facade {full}; "
                                f"import the module that defines the name instead")
        elif theirs[0] > own[0]:
            problems.append(f"{where}:{line}: upward import: {module} (layer {own[0]}) "
                            f"imports {full} (layer {theirs[0]})")
        elif theirs[0] == own[0] and theirs[1] != own[1]:
            problems.append(f"{where}:{line}: sideways import: {module} imports {full} "
                            f"(both layer {own[0]}, different packages)")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and _is_private(node.attr)
                and bound[node.value.id] != module):
            problems.append(f"{where}:{node.lineno}: reads private name "
                            f"{node.value.id}.{node.attr} of {bound[node.value.id]}")
    return problems


def check_tree(root: Path) -> list[str]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    problems: list[str] = []
    for f in files:
        problems += check_file(f, root, modules)
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else Path(__file__).resolve().parent.parent / "flashmath")
    problems = check_tree(root.resolve())
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} layer violation(s)")
        return 1
    print(f"layers: {len(list(root.rglob('*.py')))} modules, no upward or private imports")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
