"""No module of ours above about 400 lines, and no function above about 60, without a reason written at its
top (issue 17, item 4): a module or function that is long on purpose says why in its docstring, in a
sentence starting with "Long because:". Pure ast, no imports of the code it reads."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diagnosis", "webapp", "mlcore")
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 65
REASON = "Long because:"


def _has_reason(node: ast.AST) -> bool:
    return REASON in (ast.get_docstring(node, clean=False) or "")  # type: ignore[arg-type]


def oversized(path: Path, name: str) -> list[str]:
    """What in one module is too long without a reason: the module, and each function or method."""
    text = path.read_text()
    tree = ast.parse(text, filename=name)
    found = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES and not _has_reason(tree):
        found.append(f"{name}: {lines} lines (over {MAX_MODULE_LINES}) and no '{REASON}' in its docstring")
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            length = node.end_lineno - start + 1
            if length > MAX_FUNCTION_LINES and not _has_reason(node):
                found.append(
                    f"{name}:{node.lineno} {node.name}: {length} lines (over {MAX_FUNCTION_LINES}) "
                    f"and no '{REASON}' in its docstring"
                )
    return found


def _our_modules(root: Path):
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path, path.relative_to(root).as_posix()


def test_no_module_or_function_is_long_without_a_reason():
    found = [problem for path, name in _our_modules(ROOT) for problem in oversized(path, name)]
    assert found == [], "split these, or write why they are long at their top:\n" + "\n".join(found)


def test_the_checker_finds_a_long_module_and_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    long_function = f"def long_one():\n{body}\n"
    reasoned = f'def reasoned():\n    """Long because: a loop that reads best in one piece."""\n{body}\n'
    padding = "\n".join(f"y{i} = {i}" for i in range(MAX_MODULE_LINES))
    sample = tmp_path / "sample.py"
    sample.write_text(f'"""A sample."""\n{long_function}\n{reasoned}\n{padding}\n')
    found = oversized(sample, "sample.py")
    assert len(found) == 2, found
    assert found[0].startswith("sample.py: ") and "lines (over 420)" in found[0]
    assert found[1].startswith("sample.py:2 long_one: ")

    sample.write_text(f'"""A sample.\n\nLong because: generated."""\n{reasoned}\n{padding}\n')
    assert oversized(sample, "sample.py") == []
    sample.write_text(f'"""A short one."""\n{reasoned}\n')
    assert oversized(sample, "sample.py") == []


def test_the_checker_walks_our_packages_and_skips_migrations(tmp_path):
    for relative in ("diagnosis/models.py", "diagnosis/migrations/0001_initial.py", "mlcore/a.py", "bench/b.py"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("")
    (tmp_path / "webapp").mkdir()
    assert [name for _, name in _our_modules(tmp_path)] == ["diagnosis/models.py", "mlcore/a.py"]
