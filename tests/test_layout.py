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


# -- size: the study and evaluation layers read like the core, each file one job ----------------------
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


@pytest.mark.parametrize("folder", ["studies", "evaluation"])
def test_no_file_or_function_of_the_study_and_evaluation_layers_is_too_long(folder):
    long_files, long_functions = [], []
    for file in sorted((ROOT / folder).rglob("*.py")):
        text = file.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{file.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text, str(file))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{file.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long_files, f"over {MAX_FILE_LINES} lines: {long_files}"
    assert not long_functions, f"over {MAX_FUNCTION_LINES} lines: {long_functions}"
