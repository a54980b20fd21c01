"""The package as a whole: its modules meet through public names only."""

import ast
from pathlib import Path

import pyro_amortized

PACKAGE = Path(pyro_amortized.__file__).parent
TESTS = Path(__file__).parent


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_from_package(tree: ast.Module, module: str) -> list[tuple[str, str]]:
    """``(module imported from, name)`` for every name imported from the package."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative: from .guides import ...
            source = node.module or module
        elif node.module and node.module.startswith("pyro_amortized"):
            source = node.module.removeprefix("pyro_amortized").lstrip(".") or "__init__"
        else:
            continue
        found += [(source, alias.name) for alias in node.names]
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_a_private_name_of_another():
    offending = [
        f"{path.name}: from .{source} import {name}"
        for path in sorted(PACKAGE.glob("*.py"))
        for source, name in _imported_from_package(_tree(path), path.stem)
        if _private(name) and source != path.stem
    ]
    assert offending == []


def test_no_test_reaches_a_private_name_of_the_objective():
    objectives = _tree(PACKAGE / "objectives.py")
    private = {
        node.name
        for node in ast.walk(objectives)
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and _private(node.name)
    } | {
        node.attr
        for node in ast.walk(objectives)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and _private(node.attr)
    }
    assert {"_setup", "_terms", "_local_name", "_traces"} <= private  # what it would catch
    offending = []
    for path in sorted(TESTS.glob("*.py")):
        tree = _tree(path)
        for source, name in _imported_from_package(tree, ""):
            if source == "objectives" and _private(name):
                offending.append(f"{path.name}: imports {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                offending.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert offending == []


def test_every_public_module_lists_its_names_in_order():
    for path in sorted(PACKAGE.glob("*.py")):
        tree = _tree(path)
        names = [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        ]
        assert len(names) == 1, f"{path.name} has no __all__"
        listed = [element.value for element in names[0].elts]
        assert listed == sorted(listed, key=lambda n: (not n.isupper(), n)), path.name
