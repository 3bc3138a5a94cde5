"""Small transaction and statement helpers shared by the services."""

from __future__ import annotations

import contextlib
import sqlite3

from django.core.exceptions import EmptyResultSet
from django.db import connections, router, transaction
from django.db.models import sql


def savepoint_if_inside():
    """A savepoint when a transaction is open (so that a failed statement leaves it usable), nothing
    otherwise: outside a transaction one statement is already atomic, and a BEGIN/COMMIT would only add
    two round trips."""
    return transaction.atomic() if transaction.get_connection().in_atomic_block else contextlib.nullcontext()


def update_returning(queryset, **values) -> list:
    """queryset.update(**values), returning the updated rows as model instances, in one statement
    (UPDATE ... RETURNING) where the database has it (PostgreSQL, SQLite 3.35 and later); elsewhere the
    rows are locked, updated and read back in one transaction. A worker's claim is one round trip.
    Only for plain filters on the model's own table (no slicing, combined queries or fields of a
    parent model)."""

    model = queryset.model
    query = queryset.query
    if query.is_sliced or query.combinator:
        raise TypeError("update_returning() takes a filtered queryset, not a sliced or combined one")
    database = router.db_for_write(model)
    connection = connections[database]
    if not _has_update_returning(connection):
        with transaction.atomic(using=database):
            keys = list(queryset.using(database).select_for_update().values_list("pk", flat=True))
            if not keys:
                return []
            queryset.using(database).filter(pk__in=keys).update(**values)
            return list(model._default_manager.using(database).filter(pk__in=keys))
    update = query.chain(sql.UpdateQuery)
    update.add_update_values(values)
    if update.related_updates:
        raise TypeError("update_returning() cannot update fields of a parent model")
    update.annotations = {}
    try:
        statement, params = update.get_compiler(database).as_sql()
    except EmptyResultSet:  # a filter that can match nothing, such as pk__in=[]
        return []
    if not statement:
        return []
    columns = ", ".join(connection.ops.quote_name(field.column) for field in model._meta.concrete_fields)
    with transaction.mark_for_rollback_on_error(using=database):
        return list(model._default_manager.raw(f"{statement} RETURNING {columns}", params, using=database))


def _has_update_returning(connection) -> bool:
    if connection.vendor == "postgresql":
        return True
    if connection.vendor == "sqlite":
        return sqlite3.sqlite_version_info >= (3, 35)
    return False


def first_of(candidates, limit: int):
    """The rows of `candidates` (an ordered queryset) among its first `limit`, as a filter to claim them
    with: on PostgreSQL `pk = ANY(ARRAY(subquery))`, which the planner evaluates once and then finds the
    rows by primary key, where `pk IN (subquery ... LIMIT n)` made it scan the whole table (a semi-join
    over every row); elsewhere `pk IN (subquery)`."""
    model = candidates.model
    inner = candidates.values("pk")[:limit]
    connection = connections[router.db_for_write(model)]
    if connection.vendor != "postgresql":
        return model._default_manager.filter(pk__in=inner)
    sql, params = inner.query.get_compiler(connection=connection).as_sql()
    quote = connection.ops.quote_name
    column = f"{quote(model._meta.db_table)}.{quote(model._meta.pk.column)}"
    return model._default_manager.extra(where=[f"{column} = ANY(ARRAY({sql}))"], params=list(params))
