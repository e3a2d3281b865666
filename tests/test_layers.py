"""The layers stay apart: imports point one way, with no loops, and the algorithm code imports neither nerfstudio
nor the nerfstudio layer.

The import graph is read from the source (every `import` statement, function-level and TYPE_CHECKING ones
included), so an import that only runs on some path is checked as well as one at the top of a module.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import nerfstudio_pruning

ROOT = Path(nerfstudio_pruning.__file__).parent
PACKAGE = "nerfstudio_pruning"

ALGORITHM_PACKAGES = ("render", "scoring", "pup", "vedal")
ALGORITHM_MODULES = ("types", "errors", "removal")

# Layers, highest first: a module may import its own layer's modules and those of lower layers, never higher
# ones. Layers of one rank (pup, vedal) may not import each other. The low modules import only each other.
LAYERS = {
    "kernel_cache": 7,  # compiles the CPU kernels ahead of the demo and the tests, on testing's synthetic scenes
    "compare": 6,  # ns-prune-compare: drives everything
    "testing": 6,  # helpers for the tests and benchmarks
    "methods": 5,  # nerfstudio models, configs, trainer, entry points
    "data": 4,  # nerfstudio dataparsers and the built-in scene: imports nothing from methods/
    "pup": 3,
    "vedal": 3,
    "scoring": 2,
    "gaussians_ply": 2,  # PLY in and out of `Gaussians`; rotates SH with render's basis
    "render": 1,
    "low": 0,
}
LOW_MODULES = {"types", "errors", "removal", "plugin_guard", "torchvision_fix"}
# Modules that import nothing from the package: the questions everything else asks.
LEAF_MODULES = {"render.constants", "render.backend", "types", "errors", "plugin_guard"}
# Import cycles that are known and scheduled for removal; any other cycle fails.
ALLOWED_CYCLES: list = []


def _modules() -> Dict[str, Path]:
    """Every module of the package by dotted name relative to the package ('' is the package itself)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: Dict[str, Path]) -> str:
    """The module of the package that `name` (relative dotted name) refers to: itself, or the package or module
    that defines it (`render.rasterization` -> `render`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package's modules that `module` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = f"{PACKAGE}.{module}".split(".") if module else [PACKAGE]
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name[len(PACKAGE) + 1:], modules)
                if target != module:
                    found.add(target)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def _layer(module: str) -> str:
    top = module.split(".")[0]
    if top.startswith("compare"):
        return "compare"
    if top in LOW_MODULES or module == "":
        return "low"
    if top not in LAYERS:
        raise AssertionError(f"{PACKAGE}.{module} belongs to no layer: add it to LAYERS or LOW_MODULES in {__file__}")
    return top


def _cycles(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return components


def test_the_graph_is_read():
    graph = _graph()
    assert len(graph) >= 40
    # a top-level import, a function-level one (dispatch loads the compiled backend when used) and a package import
    assert "render.projection" in graph["render.pairs"]
    assert "render.compiled" in graph["render.dispatch"]
    assert "render" in graph["scoring.importance"]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    unexpected = [sorted(c) for c in cycles if c not in ALLOWED_CYCLES]
    assert not unexpected, f"import cycles between modules of {PACKAGE}: {unexpected}"


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [{"a", "b", "c"}]


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in sorted(_graph().items()):
        layer = _layer(module)
        for target in sorted(targets):
            target_layer = _layer(target)
            if layer == "compare" or target_layer == layer:
                continue
            if LAYERS[target_layer] >= LAYERS[layer]:
                wrong.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_leaf_modules_import_nothing_from_the_package():
    graph = _graph()
    assert {module: sorted(graph[module]) for module in LEAF_MODULES if graph[module]} == {}


def test_cpu_kernels_use_only_the_render_leaves():
    """render/cpu/ holds the numba kernels: besides each other they read gsplat's constants only (the torch side,
    `render/compiled.py` and `scoring/cpu_moments.py`, imports them)."""
    graph = _graph()
    kernels = [m for m in graph if m.startswith("render.cpu")]
    assert len(kernels) >= 5
    outside = {m: sorted(t for t in graph[m] if not t.startswith("render.cpu") and t != "render.constants")
               for m in kernels}
    assert {m: t for m, t in outside.items() if t} == {}


def _algorithm_modules():
    names = [f"nerfstudio_pruning.{m}" for m in ALGORITHM_MODULES]
    for package in ALGORITHM_PACKAGES:
        names.append(f"nerfstudio_pruning.{package}")
        names += [f"nerfstudio_pruning.{package}.{info.name}" for info in pkgutil.iter_modules([str(ROOT / package)])]
    return names


def test_algorithm_layers_import_no_nerfstudio():
    modules = _algorithm_modules()
    assert len(modules) >= 15
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'nerfstudio' or m.startswith(('nerfstudio.', 'nerfstudio_pruning.methods', "
        "'nerfstudio_pruning.data', 'nerfstudio_pruning.compare')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"algorithm layers import {result.stdout.strip()} {result.stderr[-2000:]}"
