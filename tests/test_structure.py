"""The package's shape: no module reaches into another's private names."""

import ast
from pathlib import Path

import unlearn_fast

PACKAGE = Path(unlearn_fast.__file__).parent
# The compiled extension is private by convention (a leading underscore), not by accident.
ALLOWED = {"_C", "__version__"}


def _private(name: str) -> bool:
    return name.startswith("_") and name not in ALLOWED


def private_imports(path: Path) -> list[str]:
    """``file:line: from X import _name`` for each import of a private unlearn_fast name or module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")  # relative imports stay inside the package
            if node.level == 0 and module.split(".")[0] != "unlearn_fast":
                continue
            names = [alias.name for alias in node.names]
            private = [n for n in names if _private(n)]
            if any(_private(part) for part in module.lstrip(".").split(".") if part):
                private = names  # a private module: every name taken from it
            found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: from {module} import {n}" for n in private]
        elif isinstance(node, ast.Import):
            found += [
                f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: import {alias.name}"
                for alias in node.names
                if alias.name.split(".")[0] == "unlearn_fast" and any(map(_private, alias.name.split(".")))
            ]
    return found


def test_no_module_imports_private_names_of_another():
    found = [line for path in sorted(PACKAGE.rglob("*.py")) for line in private_imports(path)]
    assert not found, (
        "private names imported across modules; make them public (no leading underscore) or keep "
        "them in the module that uses them:\n" + "\n".join(found)
    )


def test_no_function_of_the_methods_is_over_60_lines():
    long = []
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "\n".join(long)
