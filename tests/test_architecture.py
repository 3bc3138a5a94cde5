"""The shape of the code (docs/architecture.md): imports flow one way (import-linter contracts in
pyproject.toml), no import circles, imports inside functions only for the heavy optional dependencies
named below, and services send tasks by name."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("diagnosis", "webapp", "mlcore")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# Imported inside functions on purpose, each for the reason given; nothing else is.
LAZY_MODULES = {
    # PyTorch and what loads it: only the processes that run a model pay its import (~1 s, ~300 MB);
    # the web tier, the admin and the commands that do not train never load it.
    "torch": "torch",
    "torchvision": "torch",
    "captum": "torch",
    "mlcore.inference": "loads torch",
    "mlcore.explain": "loads torch and captum",
    "mlcore.tensor_decode": "loads torch",
    "mlcore.model": "loads torch",
    "mlcore.train": "loads torch",
    "mlcore.pipeline": "loads torch",
    "mlcore.datasets": "loads torch (through mlcore.inference)",
    "mlcore.evaluation": "loads torch",
    "mlcore.sources": "loads torch (through mlcore.datasets)",
    # Evidently's report stack: only the drift report task and the admin's report pages use it.
    "evidently": "evidently",
    "pandas": "loaded for evidently only",
    # Only deployments on S3 install botocore (django-storages[s3]).
    "boto3": "S3 only",
    "botocore": "S3 only",
}
# Whole modules whose imports run before Django's apps are ready: their functions import Django and
# diagnosis when they are called.
LAZY_FILES = {
    "webapp/celery.py": "imported by webapp/__init__.py (the Celery app) before Django is set up",
    "webapp/celery_signals.py": "imported by webapp/celery.py before Django is set up",
    "webapp/gunicorn.conf.py": "gunicorn's hooks run in the master before Django is loaded",
    "diagnosis/apps.py": "AppConfig.ready() imports the system checks (Django's documented way)",
}


def _function_level_imports() -> list[tuple[str, int, str]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if "migrations" in path.parts or relative in LAZY_FILES:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import):
                        found += [(relative, inner.lineno, alias.name) for alias in inner.names]
                    elif isinstance(inner, ast.ImportFrom):
                        module = inner.module or ""
                        if inner.level:  # relative: name it from its package
                            base = path.relative_to(ROOT).with_suffix("").parts[: -inner.level]
                            module = ".".join([*base, module] if module else base)
                        # "from mlcore import tensor_decode" imports the module mlcore.tensor_decode
                        found += [(relative, inner.lineno, f"{module}.{alias.name}") for alias in inner.names]
    return found


def _allowed(module: str) -> bool:
    return any(module == lazy or module.startswith(lazy + ".") for lazy in LAZY_MODULES)


def test_imports_inside_functions_are_only_the_documented_lazy_ones():
    offending = [f"{path}:{line} imports {module}" for path, line, module in _function_level_imports()
                 if not _allowed(module)]  # fmt: skip
    assert offending == [], "move these imports to the top of their module:\n" + "\n".join(offending)


def test_the_checker_sees_an_import_inside_a_function(tmp_path, monkeypatch):
    package = tmp_path / "diagnosis"
    package.mkdir()
    (package / "sample.py").write_text("def f():\n    import json\n    from . import models\n    import torch\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = _function_level_imports()
    assert [module for _, _, module in found] == ["json", "diagnosis.models", "torch"]
    assert not _allowed("mlcore") and _allowed("mlcore.tensor_decode.decode_batch") and not _allowed("torchx")
    assert [_allowed(module) for _, _, module in found] == [False, False, True]


def _graph():
    import grimp

    return grimp.build_graph(*PACKAGES, cache_dir=None)


def test_no_import_circles():
    graph = _graph()
    modules = {module for module in graph.modules if module.split(".")[0] in PACKAGES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module) & modules:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(modules):
        if module not in index:
            visit(module)
    assert circles == []


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(cwd / "pyproject.toml")], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("diagnosis/services/images.py", "from diagnosis import tasks  # noqa", "never import tasks.py"),
        ("diagnosis/models.py", "from diagnosis.services import clinics  # noqa", "Models import no service"),
        ("mlcore/drift.py", "import django  # noqa", "mlcore knows no Django"),
        ("diagnosis/services/audit.py", "from webapp import request_id  # noqa", "never import tasks.py or the web"),
        ("diagnosis/portal/views.py", "from mlcore import methods  # noqa", "reach mlcore only through the services"),
    ],
    ids=[
        "service-imports-tasks",
        "model-imports-service",
        "mlcore-imports-django",
        "service-imports-webapp",
        "portal-imports-mlcore",
    ],  # fmt: skip
)
def test_the_contracts_fail_when_a_layer_imports_upwards(tmp_path, module, line, contract):
    """The same contracts on a copy of the code with one import against the layers: lint-imports fails
    and names the broken contract."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    summary = " ".join(result.stdout.split("Broken contracts")[0].split())  # the names wrap across lines
    assert f"{contract}" in summary and "BROKEN" in summary, result.stdout
    for other in ("never import tasks.py", "Models import no service", "mlcore knows no Django"):
        if other != contract and other not in contract:
            assert f"{other}" in summary  # listed, and kept


def test_every_task_the_services_send_by_name_exists():
    from diagnosis.services import dispatch
    from webapp.celery import app

    app.loader.import_default_modules()
    names = [value for key, value in vars(dispatch).items() if key.isupper() and value.startswith("diagnosis.tasks.")]
    assert len(names) >= 4
    assert set(names) <= set(app.tasks), set(names) - set(app.tasks)
    # The routes apply by name: predictions and explanations reach their own queues.
    routes = app.conf.task_routes
    assert routes[dispatch.PREDICT]["queue"] == "inference" and routes[dispatch.EXPLAIN]["queue"] == "explain"
