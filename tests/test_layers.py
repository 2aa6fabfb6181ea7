"""The package's layers are one-way: what each part may import (README, Layout).

Read from the source (every import statement, function-level ones too), so a
violation fails here before it becomes an import circle at run time.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The command-line entry points chain the stages; nothing else in the library may.
STAGE_USERS = {"aphq_cli.cli", "aphq_cli.demo"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


SOURCES = {_module(p): p for folder in ("aphq_cli", "stages") for p in sorted((ROOT / folder).rglob("*.py"))
           if "configs" not in p.parts}
IMPORTS = {name: _imports(path) for name, path in SOURCES.items()}


def _hits(name: str, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in IMPORTS[name] if m.split(".")[0] in prefixes or m.startswith(prefixes))


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n.startswith("aphq_cli") and n not in STAGE_USERS))
def test_the_library_never_imports_a_stage(name):
    assert not _hits(name, ("stages",)), f"{name} imports {_hits(name, ('stages',))}"


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n.startswith("aphq_cli.quant")))
def test_quantization_code_knows_no_model_and_no_mmdetection(name):
    bad = _hits(name, ("aphq_cli.models", "mmdet", "mmcv"))
    assert not bad, f"{name} imports {bad}"


def _nested_imports(path: Path) -> list[int]:
    """Lines of imports inside a function."""
    return [sub.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n != "aphq_cli.cli"))
def test_imports_are_at_the_top_of_the_module(name):
    """What a file touches is read from its head; only cli.py defers imports (a fast ``--help``)."""
    lines = _nested_imports(SOURCES[name])
    assert not lines, f"{name} imports inside a function at lines {lines}"


def test_no_import_circle():
    ours = {n: {m for m in IMPORTS[n] if m in SOURCES and m != n} for n in SOURCES}
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(ours[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(ours):
        visit(node)


def test_the_checks_see_a_violation(tmp_path):
    """The parser finds imports at any depth, so a function-level import cannot hide."""
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from stages.eval import evaluate\n    import mmdet.apis\n")
    assert {"stages.eval", "stages.eval.evaluate", "mmdet.apis"} <= _imports(source)
    assert _nested_imports(source) == [2, 3]
