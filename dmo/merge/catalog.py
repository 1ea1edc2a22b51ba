"""The built-in merge methods' names, read from the source without importing it (torch), for help texts.

:mod:`dmo.merge.registry` registers a method when its module is imported, which imports torch (~2 s); ``dmo merge
--help`` only needs the names. They are read here from the ``merge_method("name", ...)`` calls of the registry and
its :data:`~dmo.merge.registry.BUILTIN_MODULES`, found by their module specs and parsed with :mod:`ast`
(``tests/test_merge_catalog.py`` checks that the two lists agree).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

#: the modules whose ``merge_method`` calls register the built-in methods: the registry and its BUILTIN_MODULES
REGISTRY = "dmo.merge.registry"


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    return Path(spec.origin).read_text()


def _registered(tree: ast.AST) -> list[str]:
    """First arguments of every ``merge_method("name", ...)`` call (as a decorator or applied to a function)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "merge_method":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                out.append(node.args[0].value)
    return out


def builtin_method_names() -> tuple[str, ...]:
    """The built-in merge methods' names, sorted, without importing any of them."""
    tree = ast.parse(_source(REGISTRY))
    modules: list[str] = []
    for node in ast.walk(tree):  # BUILTIN_MODULES = ("dmo.merge.ties", ...)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "BUILTIN_MODULES" for t in node.targets):
            modules = list(ast.literal_eval(node.value))
    names = _registered(tree)
    for module in modules:
        names += _registered(ast.parse(_source(module)))
    return tuple(sorted(set(names)))
