"""The package's dependency rules, checked on the import graph read from the source (every import statement,
top-level or inside a function; ``if TYPE_CHECKING:`` blocks excluded, as they never run).

Rules (issue 14): math (mixture, merge methods) knows no CLI, scoring or search; scoring knows nothing of Optuna;
analysis reads tables, not studies, models or scorers; only the CLI (and tests) import the tiny world; no import
cycles; no private name imported across modules; importing dmo changes no global state.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dmo"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` for every import that can run."""
    out: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _graph() -> dict[str, list[tuple[str, list[str]]]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph[module] = _imports(ast.parse(path.read_text()), module, path.name == "__init__.py")
    return graph


GRAPH = _graph()
MODULES = set(GRAPH)


def _target(imported: str, names: list[str]) -> list[str]:
    """The dmo modules an import statement loads (``from dmo.search import study`` loads ``dmo.search.study``)."""
    if not imported.startswith("dmo"):
        return []
    out = [imported] if imported in MODULES else []
    out += [f"{imported}.{n}" for n in names if f"{imported}.{n}" in MODULES]
    return out


def _deps(module: str) -> set[str]:
    return {t for imported, names in GRAPH[module] for t in _target(imported, names)} - {module}


def _external(module: str) -> set[str]:
    return {imported.split(".")[0] for imported, _ in GRAPH[module] if imported and not imported.startswith("dmo")}


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


CORE = (
    "dmo.errors",
    "dmo.atomic",
    "dmo.paths",
    "dmo.progress",
    "dmo.plugins",
    "dmo.mixture",
    "dmo.presets",
    "dmo.results",
    "dmo.sources",
    "dmo._lazy",
    "dmo.configfile",
    "dmo.manifest",
    "dmo.calibration",
    "dmo.hub",
    "dmo.paper_names",
    "dmo.pareto",
)
#: (who, what it must not import, why)
RULES = [
    (("dmo.mixture", "dmo.merge"), ("dmo.cli", "dmo.scoring", "dmo.search", "dmo.analysis", "dmo.session",
                                    "dmo.groundtruth", "dmo.tinyworld"), "math knows no CLI, scoring or search"),
    (("dmo.scoring",), ("dmo.search", "dmo.analysis", "dmo.cli", "dmo.session", "dmo.tinyworld"),
     "scoring knows nothing of studies"),
    (("dmo.analysis",), ("dmo.search", "dmo.scoring", "dmo.merge", "dmo.session", "dmo.cli", "dmo.tinyworld",
                         "dmo.groundtruth"), "analysis reads tables"),
    (("dmo.search",), ("dmo.analysis", "dmo.cli", "dmo.session", "dmo.tinyworld", "dmo.groundtruth"),
     "search drives a scorer it is given"),
    (("dmo.groundtruth",), ("dmo.search", "dmo.analysis", "dmo.cli", "dmo.session", "dmo.tinyworld"),
     "the ground truth is trained and read, not searched"),
    (CORE, ("dmo.cli", "dmo.search", "dmo.analysis", "dmo.session", "dmo.groundtruth", "dmo.tinyworld",
            "dmo.merge", "dmo.scoring"), "the shared core depends on no stage"),
]  # fmt: skip


@pytest.mark.parametrize("who,banned,why", RULES, ids=[r[2] for r in RULES])
def test_dependencies_run_one_way(who: tuple[str, ...], banned: tuple[str, ...], why: str) -> None:
    broken = sorted(
        f"{m} imports {d}" for m in MODULES if _in(m, *who) for d in _deps(m) if _in(d, *banned) and not _in(d, *who)
    )
    assert not broken, f"{why}: {broken}"


def test_only_the_cli_imports_the_tiny_world() -> None:
    broken = sorted(
        f"{m} imports {d}"
        for m in MODULES
        if not _in(m, "dmo.cli", "dmo.tinyworld")
        for d in _deps(m)
        if _in(d, "dmo.tinyworld")
    )
    assert not broken, broken


@pytest.mark.parametrize("package", ["dmo.scoring", "dmo.analysis", "dmo.merge", "dmo.mixture", "dmo.config"])
def test_no_optuna_outside_search(package: str) -> None:
    broken = sorted(m for m in MODULES if _in(m, package) and "optuna" in _external(m))
    assert not broken, f"{broken} import optuna; only dmo.search (and the CLI) may"


def test_optuna_private_names_only_behind_one_module() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        text = path.read_text()
        if module == "dmo.search.optuna_private":
            continue
        for imported, _ in GRAPH[module]:
            if imported.startswith("optuna") and any(part.startswith("_") for part in imported.split(".")):
                offenders.append(f"{module} imports {imported}")
        for private in ("._trial_id", "._storage", "._heartbeat"):
            if private in text:
                offenders.append(f"{module} uses {private}")
    assert not offenders, offenders


def test_no_import_cycles() -> None:
    deps = {m: _deps(m) for m in MODULES}
    # a package's __init__ importing its own submodules is not a cycle of the design
    for m in MODULES:
        deps[m] = {d for d in deps[m] if not (d.startswith(m + ".") and m in GRAPH)}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(deps[m]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_imported_across_modules() -> None:
    broken = sorted(
        f"{m}: from {imported} import {n}"
        for m in MODULES
        for imported, names in GRAPH[m]
        if imported.startswith("dmo") and imported != "dmo._lazy"
        for n in names
        if n.startswith("_") and f"{imported}.{n}" not in MODULES
    )
    assert not broken, broken


def test_packages_declare_their_public_names() -> None:
    for path in sorted(PACKAGE.rglob("__init__.py")):
        tree = ast.parse(path.read_text())
        assigned = {
            t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)
        }
        assigned |= {
            node.target.id
            for node in tree.body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        }
        assert "__all__" in assigned, f"{path.relative_to(ROOT)} has no __all__"


def test_cli_and_tests_rules_hold_for_the_real_modules_too() -> None:
    """The graph above is read from the source; check it against what Python actually loads for a core import."""
    code = "import sys, dmo.config, dmo.session; print(' '.join(sorted(m for m in sys.modules if m.startswith('dmo'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "dmo.session" in loaded and not [m for m in loaded if _in(m, "dmo.tinyworld", "dmo.cli")]


def test_importing_dmo_changes_no_global_state() -> None:
    """Importing any dmo module installs no warnings filter, logging filter or logger level (third parties may)."""
    code = """
import importlib, logging, pkgutil, sys, warnings
calls = []
def spy(owner, name):
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if '/dmo/' in caller:
            calls.append(f'{name} from {caller}')
        return real(*args, **kwargs)
    setattr(owner, name, wrapper)
spy(warnings, 'filterwarnings'); spy(warnings, 'simplefilter')
spy(logging.Logger, 'addFilter'); spy(logging.Logger, 'setLevel'); spy(logging, 'disable')
import dmo
skip = ('dmo.cli.__main__', 'dmo.scoring.vllm.worker', 'dmo.scoring.vllm.lmms', 'dmo.scoring.plugin',
        'dmo.scoring.paper_tasks')
for m in pkgutil.walk_packages(dmo.__path__, 'dmo.'):
    if not m.name.startswith(skip):
        importlib.import_module(m.name)
print(len([m for m in sys.modules if m.startswith('dmo.')]))
print('\\n'.join(calls))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert int(lines[0]) > 40  # every module was imported
    assert lines[1:] == [], f"importing dmo's modules changed global state: {lines[1:]}"


def test_the_graph_sees_real_dependencies() -> None:
    """The rules above would pass on an empty graph: check it holds edges that exist."""
    assert "dmo.search.trials" in _deps("dmo.session")
    assert "dmo.search.study" in _deps("dmo.search.trials")
    assert "dmo.scoring.vllm.engine" in _deps("dmo.scoring.vllm.lmms")  # a function-level import
    assert "optuna" in _external("dmo.search.storage")
    assert not _deps("dmo.errors")


def _lazy_table(tree: ast.Module) -> dict[str, str] | None:
    """A package's ``_EXPORTS`` (name -> module it is imported from on first use), or None without one."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def _type_checking_imports(tree: ast.Module) -> dict[str, str]:
    """``name -> module`` for every ``from module import name as name`` under a top-level ``if TYPE_CHECKING:``."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                if isinstance(child, ast.ImportFrom) and child.module and not child.level:
                    for alias in child.names:
                        # `as name` marks it re-exported, for mypy and ruff alike
                        assert alias.asname == alias.name, f"{child.module}.{alias.name} not imported `as` itself"
                        out[alias.name] = child.module
    return out


LAZY_PACKAGES = sorted(
    path for path in PACKAGE.rglob("__init__.py") if _lazy_table(ast.parse(path.read_text())) is not None
)


def test_lazy_packages_are_found() -> None:
    found = {_module_name(p) for p in LAZY_PACKAGES}
    assert {"dmo", "dmo.search", "dmo.merge", "dmo.scoring", "dmo.analysis", "dmo.groundtruth"} <= found


@pytest.mark.parametrize("path", LAZY_PACKAGES, ids=lambda p: _module_name(p))
def test_lazy_exports_are_visible_to_a_type_checker(path: Path) -> None:
    """Each lazily exported name is also imported under ``TYPE_CHECKING`` from the same module, and every name in
    ``__all__`` is one of them: a type checker sees what ``__getattr__`` returns at run time."""
    tree = ast.parse(path.read_text())
    table = _lazy_table(tree)
    assert table is not None
    typed = _type_checking_imports(tree)
    assert typed == table, f"{path.relative_to(ROOT)}: TYPE_CHECKING imports and _EXPORTS disagree"
    exported = _all_names(tree, table)
    assert exported <= set(typed), f"{path.relative_to(ROOT)}: {sorted(exported - set(typed))} not typed"


def _all_names(tree: ast.Module, table: dict[str, str] | None) -> set[str]:
    """The names of ``__all__``: a literal list, or ``sorted(_EXPORTS)``."""
    value = next(
        node.value
        for node in tree.body
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets))
        or (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "__all__")
    )
    assert value is not None
    if ast.unparse(value) == "sorted(_EXPORTS)":
        assert table is not None, "__all__ = sorted(_EXPORTS) without _EXPORTS"
        return set(table)
    return set(ast.literal_eval(value))


def _bound_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level, ``if TYPE_CHECKING:`` imports included."""
    out: set[str] = set()
    for node in tree.body:
        body = node.body if isinstance(node, ast.If) and _is_type_checking(node) else [node]
        for child in body:
            if isinstance(child, ast.Import | ast.ImportFrom):
                out |= {(a.asname or a.name).split(".")[0] for a in child.names}
            elif isinstance(child, ast.Assign):
                out |= {t.id for t in child.targets if isinstance(t, ast.Name)}
            elif isinstance(child, ast.AnnAssign) and isinstance(child.target, ast.Name):
                out.add(child.target.id)
            elif isinstance(child, ast.FunctionDef | ast.ClassDef):
                out.add(child.name)
    return out


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: _module_name(p))
def test_every_public_name_of_a_package_is_visible_to_a_type_checker(path: Path) -> None:
    """Each name in ``__all__`` is bound where a type checker reads it: imported (under ``TYPE_CHECKING`` for a lazy
    export) or defined in the package itself, never only reachable through ``__getattr__``."""
    tree = ast.parse(path.read_text())
    missing = _all_names(tree, _lazy_table(tree)) - _bound_names(tree)
    assert not missing, f"{path.relative_to(ROOT)}: {sorted(missing)} in __all__ but not bound for a type checker"


def test_lazy_exports_name_real_objects() -> None:
    """The table agrees with the modules: each name exists where the table says (checked by importing)."""
    code = (
        "import ast, importlib, pathlib, sys\n"
        "for p in sys.argv[1:]:\n"
        "    tree = ast.parse(pathlib.Path(p).read_text())\n"
        "    table = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)"
        " and any(getattr(t, 'id', '') == '_EXPORTS' for t in n.targets))\n"
        "    for name, module in table.items():\n"
        "        getattr(importlib.import_module(module), name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *map(str, LAZY_PACKAGES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
