"""The layout of docs/architecture.md: the model core imports no application, no application
imports another, and the command line sits above them all. Read from the source (every import
statement, at any depth), so a lazy import inside a function counts too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
APPLICATIONS = ("training", "evaluation", "export", "serving", "clients")
ABOVE = ("cli", "benchmarks", "studies")  # may import anything


def imported_packages(folder: str) -> dict[str, set[str]]:
    """{top-level package imported: files importing it} for the .py files under `folder`."""
    found: dict[str, set[str]] = {}
    for file in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(file.relative_to(ROOT)))
    return found


def test_the_walk_sees_imports_inside_functions():
    assert "training" in imported_packages("cli")  # cli/train.py imports it inside run()


def test_the_core_imports_no_application():
    imports = imported_packages("advmoe")
    offending = {pkg: files for pkg, files in imports.items() if pkg in APPLICATIONS + ABOVE}
    assert not offending, f"the model core imports applications: {offending}"


@pytest.mark.parametrize("application", APPLICATIONS)
def test_no_application_imports_another(application):
    imports = imported_packages(application)
    others = set(APPLICATIONS + ABOVE) - {application}
    offending = {pkg: files for pkg, files in imports.items() if pkg in others}
    assert not offending, f"{application}/ imports {offending}"
