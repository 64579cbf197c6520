"""The import graph of the package and its entry scripts has no circles: every dependency points one way."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = ("run_generation.py", "run_generation_with_deepspeed.py")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for llmbench/ (packages by their __init__) and the entry scripts."""
    modules = {}
    for path in sorted((ROOT / "llmbench").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for script in ENTRY_SCRIPTS:
        modules[Path(script).stem] = ROOT / script
    return modules


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its file: at module level and inside functions."""
    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {known(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".strip(".")
            # `from package import submodule` imports the submodule; `from module import name` the module
            found |= {known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else known(base)
                      for alias in node.names}
    return found - {None, module}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "llmbench.main" in graph["run_generation"]
    assert graph["llmbench.report"]  # a module-level import at least


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
