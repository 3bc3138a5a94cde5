"""Small transaction and statement helpers shared by the services."""

from __future__ import annotations

import contextlib

from django.db import transaction


def savepoint_if_inside():
    """A savepoint when a transaction is open (so that a failed statement leaves it usable), nothing
    otherwise: outside a transaction one statement is already atomic, and a BEGIN/COMMIT would only add
    two round trips."""
    return transaction.atomic() if transaction.get_connection().in_atomic_block else contextlib.nullcontext()


def update_returning(queryset, **values) -> list:
    """queryset.update(**values), returning the updated rows as model instances, in one statement
    (UPDATE ... RETURNING) where the database has it (PostgreSQL, SQLite 3.35 and later); elsewhere an
    UPDATE then a SELECT of the rows it changed, which is what callers did before: a worker's claim is
    one round trip instead of two. Only for filters on the model's own columns, and values that do
    not change the filtered-on primary keys."""
    from django.core.exceptions import EmptyResultSet
    from django.db import connections
    from django.db.models import sql

    model = queryset.model
    connection = connections[queryset.db]
    if not _has_update_returning(connection):
        with transaction.atomic(using=queryset.db):
            keys = list(queryset.select_for_update().values_list("pk", flat=True))
            if not keys:
                return []
            model._default_manager.filter(pk__in=keys).update(**values)
            return list(model._default_manager.filter(pk__in=keys))
    query = queryset.query.chain(sql.UpdateQuery)
    query.add_update_values(values)
    compiler = query.get_compiler(queryset.db)
    try:
        compiler.pre_sql_setup()
        statement, params = compiler.as_sql()
    except EmptyResultSet:  # a filter that can match nothing, such as pk__in=[]
        return []
    if not statement:
        return []
    columns = ", ".join(connection.ops.quote_name(field.column) for field in model._meta.concrete_fields)
    return list(model._default_manager.raw(f"{statement} RETURNING {columns}", params))


def _has_update_returning(connection) -> bool:
    if connection.vendor == "postgresql":
        return True
    if connection.vendor == "sqlite":
        import sqlite3

        return sqlite3.sqlite_version_info >= (3, 35)
    return False
