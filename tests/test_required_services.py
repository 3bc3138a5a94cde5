"""A missing PostgreSQL or Redis is a failure under CI=true, never a silent skip.

Each case runs a separate pytest process pointed at a closed port."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_redis_fixture_points_at_a_reachable_broker(redis_service):
    assert redis_service.startswith("redis://")


def run_inner_pytest(ci: bool, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env}
    environment.pop("CI", None)
    if ci:
        environment["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-cov",
         "tests/test_required_services.py::test_redis_fixture_points_at_a_reachable_broker"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_missing_redis_fails_the_run_under_ci():
    result = run_inner_pytest(ci=True, CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 1, result.stdout
    assert "Redis is not reachable at 127.0.0.1:1" in result.stdout
    assert "1 error" in result.stdout  # a failed fixture: the test errors, it is not skipped


def test_missing_redis_is_a_visible_skip_outside_ci():
    result = run_inner_pytest(ci=False, CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout and "Redis is not reachable" in result.stdout


def test_missing_postgres_stops_the_run():
    result = run_inner_pytest(ci=True, DATABASE_URL="postgres://postgres@127.0.0.1:1/melanoma")
    assert result.returncode == 1
    assert "PostgreSQL is not reachable at 127.0.0.1:1" in result.stdout + result.stderr
