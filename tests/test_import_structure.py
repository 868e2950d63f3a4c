"""The package's import structure: every import (module level or inside a function) points down the
floors of docs/design.md or stays on its floor, no module imports a private name of another, and the
module-level imports among dist_compact's modules form no cycle.

The floors are read from docs/design.md's table (between its ``floors`` markers); the checks read the
source with ``ast`` (nothing is imported); the last tests feed them small made-up packages and tables,
so each check is seen to fail on what it forbids.
"""

from __future__ import annotations

import ast
import pathlib
import re
from typing import Dict, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dist_compact"
DESIGN = ROOT / "docs" / "design.md"

#: ``(importing module, imported module, name)`` allowed to stay; each needs a reason.
ALLOWED_PRIVATE: Set[Tuple[str, str, str]] = set()

#: ``(importing module, imported module) -> reason``: the imports allowed to go up a floor (at most two).
ALLOWED_UPWARD: Dict[Tuple[str, str], str] = {
    ("dist_compact.models.train", "dist_compact.run.sampler"):
        "the training command's preview samples the model it trained with the inference sampler",
    ("dist_compact.models.train", "dist_compact.run.report"):
        "the training command's preview writes its frames with the run report's frame-grid helpers",
}


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


def read_floors(text: str) -> List[Tuple[int, List[str]]]:
    """``[(floor, [path, ...])]`` of the table between ``<!-- floors -->`` and ``<!-- /floors -->``:
    a row ``| 3 search | `search/` | ...`` starts a floor, a row ``| | `x.py` | ...`` adds to it."""
    m = re.search(r"<!-- floors -->(.*?)<!-- /floors -->", text, re.S)
    if m is None:
        raise ValueError("no <!-- floors --> table")
    rows: List[Tuple[int, List[str]]] = []
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[1].startswith("`"):
            continue
        paths = re.findall(r"`([^`]+)`", cells[1])
        head = re.match(r"(\d+)\b", cells[0])
        if head:
            rows.append((int(head.group(1)), paths))
        elif cells[0] == "" and rows:
            rows[-1][1].extend(paths)
        else:
            raise ValueError(f"floors table: cannot read the row {line.strip()!r}")
    return rows


def floor_of(module: str, floors: List[Tuple[int, List[str]]], root: str = "dist_compact") -> int:
    """The floor of ``module``: the most specific path of the table that holds it."""
    rel = module[len(root) + 1:].replace(".", "/") if module != root else ""
    best, best_len = None, -1
    for floor, paths in floors:
        for p in paths:
            if p == "__init__.py":
                hit = rel == ""
            elif p.endswith("/"):
                hit = rel == p[:-1] or rel.startswith(p)
            else:
                hit = rel == p[:-3]
            if hit and len(p) > best_len:
                best, best_len = floor, len(p)
    if best is None:
        raise LookupError(f"{module} is on no floor of docs/design.md's table")
    return best


def upward_imports(package: pathlib.Path, floors) -> List[Tuple[str, str, int, int]]:
    """``(module, imported module, its floor, the imported floor)`` of every import (module level and
    inside functions) that goes up a floor."""
    mods = _modules(package)
    out = set()
    for mod, target, _, _ in _imports(package):
        # ``import a.b.c`` / ``from a.b import c``: the deepest module named is what is imported
        while target not in mods and "." in target:
            target = target.rsplit(".", 1)[0]
        if target not in mods or target == mod or mod.startswith(target + "."):
            continue  # a module's own parent packages are imported with it
        a, b = floor_of(mod, floors, package.name), floor_of(target, floors, package.name)
        if b > a:
            out.add((mod, target, a, b))
    return sorted(out)


# ---------------------------------------------------------------------------------------------- the tree
def test_every_module_has_one_floor():
    floors = read_floors(DESIGN.read_text())
    assert [f for f, _ in floors] == sorted({f for f, _ in floors}, reverse=True), "floors listed top to bottom"
    for mod in _modules(PACKAGE):
        floor_of(mod, floors)  # raises for a module on no floor


def test_imports_point_down_the_floors():
    floors = read_floors(DESIGN.read_text())
    bad = [f"{m} (floor {a}) imports {t} (floor {b})" for m, t, a, b in upward_imports(PACKAGE, floors)
           if (m, t) not in ALLOWED_UPWARD]
    assert not bad, "imports going up a floor of docs/design.md (fix them, or list one with its reason):\n" + \
        "\n".join(bad)


def test_allowed_upward_imports_are_few_and_still_exist():
    assert len(ALLOWED_UPWARD) <= 2 and all(reason for reason in ALLOWED_UPWARD.values())
    found = {(m, t) for m, t, _, _ in upward_imports(PACKAGE, read_floors(DESIGN.read_text()))}
    assert set(ALLOWED_UPWARD) <= found, sorted(set(ALLOWED_UPWARD) - found)


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


def test_upward_import_is_found(tmp_path):
    table = """<!-- floors -->
| floor | modules | what |
| --- | --- | --- |
| 2 top | `__init__.py`, `top.py` | x |
| 1 mid | `mid/` | y |
| | `mid/inner.py` | z |
| 0 ground | `base.py` | w |
<!-- /floors -->"""
    floors = read_floors(table)
    assert floors == [(2, ["__init__.py", "top.py"]), (1, ["mid/", "mid/inner.py"]), (0, ["base.py"])]
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "top.py": "from .mid import inner\n",
        "base.py": "def f():\n    from . import top\n",  # inside a function: still an import
        "mid/__init__.py": "",
        "mid/inner.py": "from ..base import f\nimport dist_compact.top\n",
    })
    assert floor_of("dist_compact", floors) == 2 and floor_of("dist_compact.mid.inner", floors) == 1
    assert upward_imports(pkg, floors) == [("dist_compact.base", "dist_compact.top", 0, 2),
                                           ("dist_compact.mid.inner", "dist_compact.top", 1, 2)]
    (pkg / "other.py").write_text("")
    with pytest.raises(LookupError, match="dist_compact.other is on no floor"):
        floor_of("dist_compact.other", floors)
    with pytest.raises(ValueError, match="cannot read the row"):
        read_floors(table.replace("| | `mid/inner.py`", "| x | `mid/inner.py`"))
