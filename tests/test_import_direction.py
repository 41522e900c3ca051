"""The import graph runs one way: front ends (cli, server, convert) above engine; engine a star
over models, scheduler, cache, loaders and kernels; scheduler -> cache; cache, loaders and kernels
leaves; nothing imports bench. A new upward import fails here (STYLE.md A.1)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMESPACE = "stream_run"
PACKAGES = ("cli", "server", "convert", "engine", "models", "scheduler", "cache", "loaders",
            "kernels", "bench")
LIBRARY = {"engine", "models", "scheduler", "cache", "loaders", "kernels"}
ALLOWED = {
    # front ends sit above the library; stream-eval --compare drives the converter
    "cli": {"server", "convert"} | LIBRARY,
    "server": {"engine"},
    "convert": {"engine", "models", "loaders", "kernels"},
    "engine": {"models", "scheduler", "cache", "loaders", "kernels"},
    "models": {"kernels", "loaders"},  # a pass is model calls; the runner makes them Steps
    "scheduler": {"cache"},
    "cache": set(),
    "loaders": set(),
    "kernels": set(),
    "bench": set(PACKAGES) - {"bench"},
}


def imported_packages(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == NAMESPACE:
                names = [f"{NAMESPACE}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            # every project import goes through the one namespace (issue 14): a bare
            # `import kernels` would pick up whatever top-level `kernels` is installed
            assert parts[0] not in PACKAGES, f"{path}: bare import of {name}"
            if parts[0] == NAMESPACE and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for dep in imported_packages(path) - ALLOWED[package] - {package}:
            bad.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert bad == []


def test_nothing_imports_bench():
    for package in PACKAGES:
        if package == "bench":
            continue
        for path in (ROOT / package).rglob("*.py"):
            assert "bench" not in imported_packages(path), path
