"""The floors of ARCHITECTURE.md, read from the imports themselves (module-level and inside functions):
no import runs upward.

    cli.py                 -> pipeline (and click)
    pipeline/commands/     -> pipeline core, extract, heads, cache
    pipeline/ (core)       -> extract, heads, cache (never pipeline/commands)
    extract/               -> cache (never heads or pipeline)
    cache/, heads/         -> nothing of the project but themselves
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cache", "extract", "heads", "pipeline")


def project_imports(path: Path) -> set[str]:
    """Dotted names of the project modules `path` imports (relative imports made absolute)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES + ("cli",))
    return found


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def allowed(importer: str, imported: str) -> bool:
    top = imported.split(".")[0]
    if importer == "cli":
        return top == "pipeline"
    if importer.startswith("pipeline.commands"):
        return top in PACKAGES
    if importer.startswith("pipeline"):
        return top in ("cache", "extract", "heads") or (top == "pipeline" and not imported.startswith("pipeline.commands"))
    if importer.startswith("extract"):
        return top in ("cache", "extract")
    return top == importer.split(".")[0]  # cache/, heads/: only themselves


@pytest.mark.parametrize("path", [ROOT / "cli.py", *(p for pkg in PACKAGES for p in modules(pkg))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_upward(path):
    importer = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    upward = sorted(name for name in project_imports(path) if not allowed(importer, name))
    assert not upward, f"{path.relative_to(ROOT)} imports {upward} (see ARCHITECTURE.md)"


def test_cli_imports_only_click_and_the_standard_library_besides_pipeline():
    tree = ast.parse((ROOT / "cli.py").read_text())
    tops = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    tops |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    import sys
    assert tops - set(sys.stdlib_module_names) - {"__future__"} == {"click", "pipeline"}


def test_the_checker_sees_an_upward_import():
    """The test above can fail: a module of cache/ that imports extract/ is caught."""
    assert not allowed("cache.reader", "extract.writer") and not allowed("heads.msdn", "cache.reader")
    assert not allowed("extract.manifest", "pipeline.config") and not allowed("pipeline.train", "pipeline.commands.cache")
    assert not allowed("cli", "cache.store") and allowed("cli", "pipeline.commands.cache")
