"""The architecture, checked from the code's own import graph (docs/architecture.md).

Five layers, bottom to top; a module may import its own layer and the layers below, never above:

0. base: errors, utils, the package face, the bundled sample;
1. runtime: checkpoint bundles, devices, image decoding, the classifier runtime and export, plus the
   model registry and the shipped weights (a checkpoint names its architecture, so loading one
   builds the network by name: the registry sits with the runtime, not above it);
2. library: config, data, training, evaluation, detection, reporting;
3. jobs: the workflows a command runs;
4. faces: the command line and the service.

Every import counts, at the top of a module or inside a function, so a local import cannot hide an
upward dependency. Project imports inside functions are allowed in cli.py alone (it keeps
``leukodetect --help`` fast; its docstring says why).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {
    "base": ("leukodetect", "leukodetect.errors", "leukodetect.utils", "leukodetect.sample"),
    "runtime": ("leukodetect.runtime", "leukodetect.models", "leukodetect.weights"),
    "library": ("leukodetect.config", "leukodetect.data", "leukodetect.training", "leukodetect.evaluation",
                "leukodetect.detection", "leukodetect.reporting"),
    "jobs": ("leukodetect.jobs",),
    "faces": ("leukodetect.cli", "leukodetect.__main__", "leukodetect.serving"),
}
ORDER = list(LAYERS)
#: Pure maths: evaluation may import only itself, the base layer and the class names.
PURE = "leukodetect.evaluation"
PURE_MAY_IMPORT = ("leukodetect.evaluation", "leukodetect.errors", "leukodetect.runtime.checkpoint")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer of a module: the one whose prefix is the longest match."""
    best, length = None, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = layer, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__} and to docs/architecture.md")
    return best


def project_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a leukodetect module."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0 and child.module.split(".")[0] == "leukodetect":
                for alias in child.names:  # "from leukodetect.x import y" may import the module x.y
                    sub = f"{child.module}.{alias.name}"
                    target = sub if (SRC / Path(*sub.split("."))).with_suffix(".py").exists() or (SRC / Path(*sub.split("."))).is_dir() else child.module
                    found.append((target, child.lineno, inside))
            elif isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inside) for a in child.names if a.name.split(".")[0] == "leukodetect")
            elif isinstance(child, ast.ImportFrom) and child.level:
                found.append((f"<relative import level {child.level}>", child.lineno, inside))
            visit(child, inside)

    visit(tree, False)
    return found


GRAPH = {module_name(p): project_imports(p) for p in sorted((SRC / "leukodetect").rglob("*.py"))}


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_or_sideways(module):
    here = ORDER.index(layer_of(module))
    upward = [f"line {line}: {target} ({layer_of(target)})" for target, line, _ in GRAPH[module]
              if not target.startswith("<") and ORDER.index(layer_of(target)) > here]
    assert not upward, f"{module} ({layer_of(module)}) imports a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_absolute_imports_at_module_top(module):
    relative = [line for target, line, _ in GRAPH[module] if target.startswith("<")]
    assert not relative, f"{module}: relative imports at lines {relative}; write leukodetect.x.y"
    if module == "leukodetect.cli":
        return
    local = [f"line {line}: {target}" for target, line, inside in GRAPH[module] if inside]
    assert not local, f"{module} imports project modules inside functions, which hides the direction of its dependencies: {local}"


def test_evaluation_is_pure():
    for module, imports in GRAPH.items():
        if module == PURE or module.startswith(PURE + "."):
            bad = [t for t, _, _ in imports if not t.startswith(PURE_MAY_IMPORT)]
            assert not bad, f"{module} (pure metric maths) imports {bad}"


def test_no_import_circle():
    edges = {m: {t for t, _, _ in imports if t in GRAPH and t != m} for m, imports in GRAPH.items()}
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            connect(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph reader catches an import inside a function (the case a top-of-file grep would miss)."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from leukodetect.jobs.train import run_train\n    return run_train\n")
    [(target, line, inside)] = project_imports(source)
    assert (target, line, inside) == ("leukodetect.jobs.train", 2, True)
    assert ORDER.index(layer_of(target)) > ORDER.index(layer_of("leukodetect.runtime.classifier"))
