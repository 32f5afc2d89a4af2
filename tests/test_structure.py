"""The package's shape: data flows one way (no import cycles, the package root included), modules
stay readable, and importing exceiver leaves the user's plotting setup alone."""

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

import exceiver

PACKAGE = Path(exceiver.__file__).parent
MAX_LINES = 400
MAX_FUNCTION = 80


def _module_name(path: Path) -> str:
    parts = ("exceiver", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body (imports inside functions
    count too: deferring an import hides a cycle, it does not remove it), and every package whose
    `__init__` such an import runs (importing `a.b.c` runs `a/b/__init__`, whose lazy exports are
    its imports), except the module's own enclosing packages, which have run already."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import name` imports pkg.name when that is a module, else pkg itself.
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = {p for e in edges for p in _packages_run(e, name, modules)}
    return graph


def _packages_run(target: str, importer: str, modules: dict) -> set[str]:
    """`target` and the packages above it that importing it initialises, given who imports it."""
    parts = target.split(".")
    above = {".".join(parts[:i]) for i in range(1, len(parts))}
    enclosing = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    return ({target} | {p for p in above if p in modules}) - enclosing - {importer}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_package_inits_that_an_import_runs_are_edges():
    modules = dict.fromkeys(["exceiver", "exceiver.tl", "exceiver.tl.annotation", "exceiver.model"])
    assert _packages_run("exceiver.tl.annotation", "exceiver.model", modules) == {"exceiver.tl",
                                                                                  "exceiver.tl.annotation"}
    assert _packages_run("exceiver.tl.annotation", "exceiver.tl.imputation", modules) == {"exceiver.tl.annotation"}


def test_the_tools_depend_on_the_model_protocol_not_the_model():
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith(("exceiver.tl", "exceiver.evaluate")):
            assert "exceiver.model" not in imports, module


def function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function, its signature and code, without its docstring (a numpydoc section per
    parameter is documentation to read, not logic to hold in one's head)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_is_long():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and function_lines(node) > MAX_FUNCTION:
                long[f"{path.relative_to(PACKAGE)}:{node.name}"] = function_lines(node)
    assert not long, long
    assert function_lines(ast.parse('def f():\n    """Doc\n    more."""\n    return 1\n').body[0]) == 2


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_among_the_packages_modules():
    graph = import_graph()
    assert {"exceiver", "exceiver.model", "exceiver.data.tokenizer", "exceiver.nn.network"} <= set(graph)
    assert "exceiver.data.cells" in graph["exceiver.data.tokenizer"]  # the graph sees real imports
    assert "exceiver.tl" in graph["exceiver.model"]  # and the package __init__ an import runs
    assert "exceiver.data" not in graph["exceiver.data.tokenizer"]  # but not the importer's own package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_data_never_imports_the_network_or_training():
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith("exceiver.data"):
            assert not {i for i in imports if i.startswith(("exceiver.nn", "exceiver.train", "exceiver.model"))}, module


def test_modules_are_small():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.slow
def test_importing_exceiver_leaves_the_matplotlib_backend_alone():
    code = ("import matplotlib; matplotlib.use('svg'); import exceiver, exceiver.tl, exceiver.evaluate, exceiver.demo; "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "svg"


@pytest.mark.parametrize("package", ["exceiver", "exceiver.tl", "exceiver.evaluate"])
def test_public_names_load_on_first_use_and_star_import_gives_all(package):
    """The packages import their public names lazily (so that the command line starts at once);
    every name of `__all__` still resolves, is listed by dir(), and `import *` gives exactly them."""
    module = importlib.import_module(package)
    namespace: dict = {}
    exec(f"from {package} import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(module.__all__)
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name


def test_pretrain_and_finetune_are_the_functions_though_modules_share_their_names():
    importlib.import_module("exceiver.pretrain")
    importlib.import_module("exceiver.finetune")
    assert exceiver.Exceiver.__name__ == "Exceiver"
    for name in ("pretrain", "finetune"):
        assert isinstance(getattr(exceiver, name), types.FunctionType), name
    from exceiver import finetune, pretrain
    assert pretrain.__module__ == "exceiver.pretrain" and finetune.__module__ == "exceiver.finetune"


def test_the_tools_are_reachable_from_the_package_alone():
    """`import exceiver` then `exceiver.tl.impute` and `exceiver.evaluate.evaluate`, in a fresh
    interpreter (nothing imported the subpackages before)."""
    code = ("import exceiver; print(exceiver.tl.impute.__module__, exceiver.evaluate.evaluate.__module__, "
            "exceiver.tl.annotate.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["exceiver.tl.imputation", "exceiver.evaluate.report", "exceiver.tl.annotation"]
