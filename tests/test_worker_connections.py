"""A worker keeps its database connection from one task to the next (a new PostgreSQL backend costs
about 7 ms per task), and closes it around a task only when it is broken or older than CONN_MAX_AGE."""

from __future__ import annotations

import time

import pytest
from celery.fixups.django import DjangoWorkerFixup
from django.db import connection

from webapp.celery import _close_old_database_connections, app


@pytest.fixture
def reusable_connection():
    """The connection as production has it (the tests' settings close it after every task)."""
    saved = connection.settings_dict["CONN_MAX_AGE"]
    connection.close()
    connection.settings_dict["CONN_MAX_AGE"] = 60
    connection.ensure_connection()
    yield connection
    connection.settings_dict["CONN_MAX_AGE"] = saved
    connection.close()


@pytest.mark.django_db(transaction=True)
def test_celerys_own_fixup_no_longer_closes_the_connection_between_tasks(reusable_connection):
    fixup = DjangoWorkerFixup(app)
    assert fixup.db_reuse_max and fixup.db_reuse_max > 10**9
    raw = reusable_connection.connection
    for _ in range(5):  # before and after five tasks
        fixup.close_database()
        _close_old_database_connections()
        fixup.close_database()
        _close_old_database_connections()
    assert reusable_connection.connection is raw
    with reusable_connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


@pytest.mark.django_db(transaction=True)
def test_a_connection_past_its_age_is_closed_before_the_next_task(reusable_connection):
    reusable_connection.close_at = time.monotonic() - 1
    _close_old_database_connections()
    assert reusable_connection.connection is None


@pytest.mark.django_db(transaction=True)
def test_a_broken_connection_is_closed_before_the_next_task(reusable_connection):
    reusable_connection.errors_occurred = True
    reusable_connection.connection.close()  # the server went away
    _close_old_database_connections()
    assert reusable_connection.connection is None
