"""The packages' public names: listed once (each package's lazy table), each resolving to the object
its submodule defines, and unknown names answered with the known ones."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import lqae
import lqae.fewshot
import lqae.images
import lqae.model
import lqae.probe
import lqae.tokendata
import lqae.training

LAZY_PACKAGES = (lqae, lqae.model, lqae.probe, lqae.fewshot, lqae.images, lqae.training)


def _is_submodule(package, name: str) -> bool:
    return importlib.util.find_spec(f"{package.__name__}.{name}") is not None


@pytest.mark.parametrize("package", LAZY_PACKAGES, ids=lambda p: p.__name__)
def test_every_exported_name_resolves_to_its_submodules_object(package):
    listed = [name for names in package._LAZY.values() for name in names]
    assert sorted(listed) == [name for name in package.__all__ if name != "__version__"]
    assert len(listed) == len(set(listed))
    for module, names in package._LAZY.items():
        defined = importlib.import_module(module)
        for name in names:
            if _is_submodule(package, name):
                continue  # the submodule of that name shadows it (see the next test)
            assert getattr(package, name) is getattr(defined, name), f"{package.__name__}.{name}"


def test_no_exported_name_is_a_submodule_too():
    assert [f"{p.__name__}.{n}" for p in LAZY_PACKAGES for n in p.__all__ if _is_submodule(p, n)] == []


def test_tokendata_names_resolve_and_unknown_names_list_the_known_ones():
    for name in lqae.tokendata.__all__:
        assert getattr(lqae.tokendata, name) is not None
    with pytest.raises(AttributeError, match=r"has no attribute 'no_such_name'; it has: .*LQAE"):
        lqae.no_such_name  # noqa: B018


def _import_graph() -> dict[str, set[str]]:
    """lqae's and lqae_cli's modules -> the modules of theirs they import, function-level imports
    included (TYPE_CHECKING blocks are not run, so not counted); a name from a lazy package counts
    as an import of the submodule its `_LAZY` table names."""
    root = Path(__file__).resolve().parent.parent
    files = {}
    for package in ("lqae", "lqae_cli"):
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    lazy = {}
    for module, path in files.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets):
                lazy[module] = {n: sub for sub, names in ast.literal_eval(node.value).items() for n in names}
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        unrun = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in unrun:
                continue
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in files:
                deps.add(node.module)
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in files else lazy.get(node.module, {}).get(a.name, node.module))
        graph[module] = deps - {module}
    return graph


def test_no_import_cycle_among_the_packages_modules():
    graph, done, path, cycles = _import_graph(), set(), [], []

    def visit(module: str) -> None:
        path.append(module)
        for dep in sorted(graph[module]):
            if dep in path:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    assert "lqae.model.autoencoder" in graph["lqae.checkpoint"]  # the graph sees through lazy names
    assert cycles == []


def test_the_packages_and_the_configs_import_without_torch():
    """`import lqae.images`, `lqae.training`, `lqae.model` and the configs stay light: torch loads
    only with the submodule that needs it."""
    code = (
        "import sys, lqae, lqae.config, lqae.presets, lqae.layout, lqae.legacy, lqae.images, lqae.training, lqae.model\n"
        "import lqae.model.codebook\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
