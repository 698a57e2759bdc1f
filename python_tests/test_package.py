"""Every module of the package can be imported by its path (no public function shadows a
module of the same name), and the package's modules do not import each other in a cycle."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import sama_ext

PKG = Path(sama_ext.__file__).parent
MODULES = sorted(m.name for m in pkgutil.iter_modules([str(PKG)]) if m.name != "__main__")


def test_every_module_is_importable_by_its_path():
    for name in MODULES:
        mod = importlib.import_module(f"sama_ext.{name}")
        attr = getattr(sama_ext, name, mod)
        assert isinstance(attr, types.ModuleType), f"sama_ext.{name} is {type(attr).__name__}, not the module"
        exec(f"import sama_ext.{name} as m", {}, ns := {})  # the statement users write
        assert ns["m"] is mod


def _imports(name: str) -> set[str]:
    tree = ast.parse((PKG / f"{name}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
    return out & set(MODULES)


def test_no_import_cycles_between_modules():
    graph = {m: _imports(m) for m in MODULES}

    def visit(m, path):
        assert m not in path, "import cycle: " + " -> ".join(path + [m])
        for n in graph[m]:
            visit(n, path + [m])

    for m in MODULES:
        visit(m, [])
