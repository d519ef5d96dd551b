"""The project's module import graph (read with ast, nothing imported): no import cycle among the
modules of substrate/, models/ and studies/ (a cycle broken by deferring an import into a function
counts), and no import inside a function body but of the heavy optional modules."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("substrate", "models", "studies")

# Imported where they are used, never at a module's top: torch (the optional `torch` extra) and the
# project modules that import it at theirs; Dask's cluster client (only `substrate sweep --scheduler`).
HEAVY = ("torch", "torchdiffeq", "models.dpm", "substrate.torch_backend", "distributed", "dask", "yaml")
# A Dask worker imports studies.dask_executor when it unpickles _execute_on_worker; that function sets
# the thread variables (one BLAS, OpenMP and Numba thread) before numpy and Numba load, so the module's
# top imports the standard library only and these project modules are imported in its functions.
DEFERRED = {"studies.dask_executor": ("studies.sweep", "studies.config", "substrate.archive"),
            # measured: at the top they would add ~0.25 s to `import substrate`; only the implicit gradient uses them
            "substrate.adjoint": ("scipy.linalg", "scipy.sparse.linalg"),
            # the digits set's fallback loader; scikit-learn takes over 1 s to import
            "models.data": ("sklearn.datasets",)}


def project_modules() -> dict:
    """{module name: (path, is a package)} of every module of PACKAGES."""
    out = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            for f in files:
                if f.endswith(".py"):
                    parts = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                    is_package = parts[-1] == "__init__"
                    out[".".join(parts[:-1] if is_package else parts)] = (os.path.join(folder, f), is_package)
    return out


MODULES = project_modules()


def _is_type_checking(node) -> bool:
    test = node.test
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING" or
                                         getattr(test, "attr", None) == "TYPE_CHECKING")


def imports(module: str) -> list:
    """(imported module, line, inside a function) for every import statement of ``module``: ``from X
    import y`` names the module X.y where that is a project module, else X; relative imports resolved.
    Imports under ``if TYPE_CHECKING:`` are left out (they never run)."""
    path, is_package = MODULES[module]
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([child.module] if child.module else []))
                for alias in child.names:
                    name = f"{base}.{alias.name}"
                    found.append((name if name in MODULES else base, child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return found


def _heavy(target: str) -> bool:
    return any(target == h or target.startswith(h + ".") for h in HEAVY)


def import_graph() -> dict:
    """{module: set of project modules it imports}: at its top, or in a function (but the heavy
    optional modules, imported there by design)."""
    return {m: {target for target, _, inside in imports(m)
                if target in MODULES and target != m and not (inside and _heavy(target))} for m in MODULES}


def find_cycle(graph: dict) -> list | None:
    """One cycle of ``graph`` as a list of modules (the first repeated at the end), or None."""
    state, stack = {}, []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = dfs(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = dfs(m)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_every_package_and_their_imports():
    graph = import_graph()
    assert {m.split(".")[0] for m in graph} == set(PACKAGES)
    # relative and `from package import module` imports are resolved to the module
    assert "substrate.network" in graph["substrate"]
    assert {"studies.catalogue.ep", "studies.catalogue.relaxation"} <= graph["studies.catalogue"]
    assert "studies.catalogue" in graph["studies.sweep"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _allowed(module: str, target: str) -> bool:
    return _heavy(target) or any(target == d or target.startswith(d + ".") for d in DEFERRED.get(module, ()))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_level_import_but_the_heavy_optional_ones(package):
    found = [f"{MODULES[m][0]}:{line}: import {target}" for m in sorted(MODULES) if m.split(".")[0] == package
             for target, line, inside in imports(m) if inside and not _allowed(m, target)]
    assert not found, "imports inside functions (move them to the module's top):\n" + "\n".join(found)
