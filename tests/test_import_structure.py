"""The package's import structure: no module imports a private name of another, and the
module-level imports among dist_compact's modules form no cycle (issue #17's floors).

Both checks read the source with ``ast`` (nothing is imported); the last tests feed them small
made-up packages, so each check is seen to fail on what it forbids.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dist_compact"

#: ``(importing module, imported module, name)`` allowed to stay; each needs a reason.
ALLOWED_PRIVATE: Set[Tuple[str, str, str]] = set()


def _modules(package: pathlib.Path) -> Dict[str, pathlib.Path]:
    """``{dotted name: path}`` of every module of ``package`` (packages by their ``__init__``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(package: pathlib.Path) -> List[Tuple[str, str, List[str], bool]]:
    """``(module, imported module, names, at module level)`` of every ``from X import ...`` and
    ``import X`` inside ``package`` (names empty for ``import X``)."""
    root = package.name
    mods = _modules(package)
    out = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        top = set(map(id, tree.body))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_pkg, node)
                if target == root or target.startswith(root + "."):
                    names = [a.name for a in node.names]
                    # `from pkg import submodule` imports the submodule
                    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
                    out.append((mod, target, [n for n in names if f"{target}.{n}" not in mods], id(node) in top))
                    out.extend((mod, s, [], id(node) in top) for s in subs)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == root or a.name.startswith(root + "."):
                        out.append((mod, a.name, [], id(node) in top))
    return out


def private_imports(package: pathlib.Path) -> List[str]:
    """``"module: from X import _name"`` for every private name imported from another module."""
    bad = []
    for mod, target, names, _ in _imports(package):
        for n in names:
            if n.startswith("_") and not n.startswith("__") and target != mod \
                    and (mod, target, n) not in ALLOWED_PRIVATE:
                bad.append(f"{mod}: from {target} import {n}")
    return sorted(bad)


def import_cycles(package: pathlib.Path) -> List[List[str]]:
    """Cycles of module-level imports between modules (a package counts as its ``__init__``;
    importing ``a.b`` also runs ``a``'s ``__init__``). Imports inside functions are not edges."""
    mods = _modules(package)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, target, _, top in _imports(package):
        if not top:
            continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the target and the packages above it
            t = ".".join(parts[:i])
            # a module's own parent packages are already being imported: not an edge
            if t in mods and t != mod and not mod.startswith(t + "."):
                graph[mod].add(t)
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


# ---------------------------------------------------------------------------------------------- the tree
def test_no_private_name_imported_across_modules():
    bad = private_imports(PACKAGE)
    assert not bad, "private names imported from another module (make them public or move them):\n" + "\n".join(bad)


def test_no_import_cycle_among_modules():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_allowed_private_imports_still_exist():
    # an entry whose import is gone must leave the list, or the list hides nothing but keeps growing
    seen = {(m, t, n) for m, t, names, _ in _imports(PACKAGE) for n in names}
    assert ALLOWED_PRIVATE <= seen, sorted(ALLOWED_PRIVATE - seen)


# ---------------------------------------------------------------------------------------------- the checks fail
def _package(tmp_path: pathlib.Path, files: Dict[str, str]) -> pathlib.Path:
    pkg = tmp_path / "dist_compact"
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


def test_private_import_is_found(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "def _helper():\n    return 1\n\n\ndef public():\n    return 2\n",
        "b.py": "from .a import _helper, public\n",
        "sub/__init__.py": "",
        "sub/c.py": "def f():\n    from ..a import _helper\n    return _helper()\n",
        "d.py": "from dist_compact.a import public\nfrom .a import __doc__\n",
    })
    assert private_imports(pkg) == ["dist_compact.b: from dist_compact.a import _helper",
                                    "dist_compact.sub.c: from dist_compact.a import _helper"]


def test_import_cycle_is_found(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "from .a import x\n",
        "a.py": "from .b import y\nx = 1\n",
        "b.py": "def y():\n    from .a import x\n    return x\n",  # lazy: no edge
        "c.py": "from . import d\n",
        "d.py": "from .sub.e import z\n",
        "sub/__init__.py": "",
        "sub/e.py": "import dist_compact.c\nz = 0\n",
    })
    cycles = import_cycles(pkg)
    # c -> d -> sub.e -> c; and sub.e -> dist_compact (its parent: no edge), a -> b only
    assert cycles == [["dist_compact.c", "dist_compact.d", "dist_compact.sub.e", "dist_compact.c"]]
    (pkg / "c.py").write_text("def f():\n    from . import d\n")
    assert import_cycles(pkg) == []

