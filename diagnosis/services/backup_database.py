"""The database half of a backup and a restore (manage.py backup and restore, services.backup).

A backup takes one snapshot and reads everything from it: the dump, the per-table row counts and the names
of the stored files the rows refer to.
- PostgreSQL: a REPEATABLE READ transaction exports its snapshot (pg_export_snapshot()); pg_dump
  --format=custom --snapshot=... dumps exactly that snapshot while the transaction counts the rows and reads
  the file names in it. The service keeps writing meanwhile; none of it is in the dump, counts or names.
- SQLite (the embedded default): the online backup API copies the database in one step, under one read
  transaction (in WAL mode the writers go on); the counts and names are read from the copy.

A restore replaces the configured database in one step: on PostgreSQL, one psql transaction drops every
table of the current schema and runs pg_restore's script (a failure leaves the old database as it was); on
SQLite, the backup API copies the archived database over the configured file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from django.apps import apps
from django.db import connection, connections, models
from psycopg.conninfo import make_conninfo

from ..models import ModelVersion
from .backup_archive import BackupError

# Tables `migrate` fills by itself: a freshly migrated database has rows there and is still empty.
BOOKKEEPING_TABLES = frozenset({"django_migrations", "django_content_type", "auth_permission"})
# JSON fields that map a name to a stored file's name (ModelVersion.plots: plot name -> PNG in storage).
JSON_FILE_MAPS = ((ModelVersion, "plots"),)
# OPTIONS of a PostgreSQL DATABASES entry that libpq reads from a connection string as well.
LIBPQ_OPTIONS = frozenset({
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "connect_timeout", "application_name", "options",
    "service", "passfile", "target_session_attrs", "gssencmode", "channel_binding",
})  # fmt: skip
DROP_SQL = """SET lock_timeout = '30s';
DO $$
DECLARE r record;
BEGIN
  FOR r IN SELECT tablename FROM pg_tables WHERE schemaname = current_schema() LOOP
    EXECUTE format('DROP TABLE IF EXISTS %I.%I CASCADE', current_schema(), r.tablename);
  END LOOP;
  FOR r IN SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = current_schema() LOOP
    EXECUTE format('DROP SEQUENCE IF EXISTS %I.%I CASCADE', current_schema(), r.sequence_name);
  END LOOP;
END $$;
"""


@dataclass
class Snapshot:
    """What a backup took of the database: the dump, and from the same snapshot the row count of every
    table and the stored-file names the rows refer to."""

    engine: str
    dump_path: Path
    tables: dict[str, int]
    stored_names: list[str]
    details: dict = field(default_factory=dict)


def engine() -> str:
    """ "postgresql" or "sqlite": the configured database's engine."""
    if connection.vendor in ("postgresql", "sqlite"):
        return connection.vendor
    raise BackupError(f"Backups support PostgreSQL and SQLite; the configured database is {connection.vendor}.")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_names(cursor, vendor: str) -> list[str]:
    if vendor == "postgresql":
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1")
    else:
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY 1")
    return [row[0] for row in cursor.fetchall()]


def count_rows(cursor, vendor: str) -> dict[str, int]:
    """Every table's row count, as the cursor's transaction sees them."""
    counts = {}
    for table in table_names(cursor, vendor):
        cursor.execute(f"SELECT count(*) FROM {_quote(table)}")
        counts[table] = cursor.fetchone()[0]
    return counts


def file_columns() -> list[tuple[str, str]]:
    """(table, column) of every FileField of every installed model: the stored-file names kept in rows."""
    return sorted({
        (model._meta.db_table, field.column)
        for model in apps.get_models() for field in model._meta.concrete_fields if isinstance(field, models.FileField)
    })  # fmt: skip


def stored_names(cursor, tables) -> list[str]:
    """The stored-file names the rows refer to: every FileField, and the names inside JSON_FILE_MAPS."""
    names: set[str] = set()
    for table, column in file_columns():
        if table in tables:
            cursor.execute(f"SELECT {_quote(column)} FROM {_quote(table)} WHERE {_quote(column)} <> ''")
            names.update(row[0] for row in cursor.fetchall() if row[0])
    for model, name in JSON_FILE_MAPS:
        table, column = model._meta.db_table, model._meta.get_field(name).column
        if table in tables:
            cursor.execute(f"SELECT {_quote(column)} FROM {_quote(table)}")
            for (value,) in cursor.fetchall():
                value = json.loads(value) if isinstance(value, str | bytes) else value
                if isinstance(value, dict):
                    names.update(item for item in value.values() if isinstance(item, str) and item)
    return sorted(names)


def take_snapshot(workdir: Path, *, pg_bin_dir: str | None = None) -> Snapshot:
    """Dump the configured database into `workdir`, with its counts and stored-file names (see the module)."""
    vendor = engine()
    if vendor == "postgresql":
        return _postgres_snapshot(workdir, pg_bin_dir)
    return _sqlite_snapshot(workdir)


# --- PostgreSQL -----------------------------------------------------------------------------------------


def _libpq() -> tuple[str, str]:
    """The configured database as a libpq connection string (without the password), and the password."""
    settings_dict = connection.settings_dict
    params = {"dbname": settings_dict["NAME"], "host": settings_dict.get("HOST"), "port": settings_dict.get("PORT"),
              "user": settings_dict.get("USER")}  # fmt: skip
    params.update({key: value for key, value in (settings_dict.get("OPTIONS") or {}).items() if key in LIBPQ_OPTIONS})
    conninfo = make_conninfo(**{key: str(value) for key, value in params.items() if value not in (None, "")})
    return conninfo, settings_dict.get("PASSWORD") or ""


def _tool_env(password: str) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": password} if password else dict(os.environ)


def pg_tool(name: str, bin_dir: str | None) -> tuple[str, int]:
    """The path and major version of a PostgreSQL client program (pg_dump, pg_restore, psql)."""
    path = shutil.which(name, path=bin_dir) if bin_dir else shutil.which(name)
    where = f"in {bin_dir}" if bin_dir else "on PATH"
    if not path:
        raise BackupError(
            f"{name} is not {where}: install the PostgreSQL client programs of the server's major version "
            "(Debian: apt install postgresql-client) or name their folder with --pg-bin-dir."
        )
    output = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"\)\s+(\d+)", output)
    if not match:
        raise BackupError(f"{path} --version answered {output.strip()!r}: not a PostgreSQL client program.")
    return path, int(match.group(1))


@contextmanager
def _exported_snapshot():
    """A REPEATABLE READ, read-only transaction on its own connection, with its snapshot exported; yields
    (cursor, snapshot id, server version number, server version)."""
    conninfo, password = _libpq()
    with psycopg.connect(conninfo, password=password or None, autocommit=True) as raw:
        cursor = raw.cursor()
        cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            cursor.execute("SELECT pg_export_snapshot(), current_setting('server_version_num')::int, "
                           "current_setting('server_version')")  # fmt: skip
            snapshot_id, version_num, version = cursor.fetchone()
            yield cursor, snapshot_id, version_num, version
        finally:
            cursor.execute("ROLLBACK")


def _postgres_snapshot(workdir: Path, pg_bin_dir: str | None) -> Snapshot:
    pg_dump, dump_major = pg_tool("pg_dump", pg_bin_dir)
    conninfo, password = _libpq()
    dump_path = workdir / "postgresql.dump"
    with _exported_snapshot() as (cursor, snapshot_id, version_num, version):
        server_major = version_num // 10000
        if dump_major < server_major:
            raise BackupError(f"{pg_dump} is version {dump_major} and cannot dump the PostgreSQL {server_major} "
                              f"server: install postgresql-client-{server_major} (or newer) and put it on PATH "
                              "or name its folder with --pg-bin-dir.")  # fmt: skip
        dump = subprocess.Popen(
            [pg_dump, "--format=custom", f"--snapshot={snapshot_id}", "--no-password", f"--file={dump_path}",
             f"--dbname={conninfo}"],
            env=_tool_env(password), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            tables = count_rows(cursor, "postgresql")  # in the same snapshot, while pg_dump runs
            names = stored_names(cursor, tables)
            _, errors = dump.communicate()
        finally:
            if dump.poll() is None:  # stopped by an error here (or Ctrl-C): pg_dump goes too
                dump.kill()
                dump.wait()
    if dump.returncode != 0:
        raise BackupError(f"pg_dump failed (exit status {dump.returncode}): {errors.strip()[-2000:]}")
    details = {"server_version": version, "pg_dump_major": dump_major, "schema": _current_schema()}
    return Snapshot("postgresql", dump_path, tables, names, details)


def _current_schema() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_schema()")
        return cursor.fetchone()[0]


def restore_postgres(dump_path: Path, *, dump_major: int, pg_bin_dir: str | None) -> None:
    """Replace the configured database's tables with the dump's, in one transaction: every table (and
    sequence) of the current schema is dropped, then pg_restore's script runs; any error undoes it all."""
    pg_restore, restore_major = pg_tool("pg_restore", pg_bin_dir)
    psql, _ = pg_tool("psql", pg_bin_dir)
    if restore_major < dump_major:
        raise BackupError(f"{pg_restore} is version {restore_major}; the dump was written by pg_dump {dump_major}. "
                          f"Install postgresql-client-{dump_major} (or newer).")  # fmt: skip
    conninfo, password = _libpq()
    env = _tool_env(password)
    connections.close_all()  # this process holds no lock on the tables it is about to drop
    with tempfile.TemporaryDirectory(prefix="restore-") as work:
        drop, errors = Path(work) / "drop.sql", Path(work) / "pg_restore.err"
        drop.write_text(DROP_SQL)
        with open(errors, "w+") as restore_errors:
            script = subprocess.Popen([pg_restore, "--no-owner", "--no-acl", "--file=-", str(dump_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=restore_errors)  # fmt: skip
            apply = subprocess.Popen(
                [psql, "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", str(drop),
                 "-f", "-", f"--dbname={conninfo}"],
                env=env, stdin=script.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            script.stdout.close()  # psql holds the pipe now; pg_restore sees it close if psql stops
            _, psql_errors = apply.communicate()
            script.wait()
            restore_errors.seek(0)
            pg_restore_errors = restore_errors.read()
    if script.returncode != 0 or apply.returncode != 0:
        raise BackupError(
            "The database was not restored (the restore runs in one transaction: the database is as it was). "
            f"pg_restore: {pg_restore_errors.strip()[-1500:] or 'ok'}; psql: {psql_errors.strip()[-1500:] or 'ok'}"
        )
    connections.close_all()


# --- SQLite ---------------------------------------------------------------------------------------------


def _sqlite_path() -> Path:
    name = str(connection.settings_dict["NAME"])
    if name == ":memory:" or "mode=memory" in name:
        raise BackupError("The configured SQLite database lives in memory: there is nothing to back up or restore.")
    return Path(name)


def _sqlite_snapshot(workdir: Path) -> Snapshot:
    source_path, copy_path = _sqlite_path(), workdir / "sqlite3.db"
    if not source_path.exists():
        raise BackupError(f"The SQLite database {source_path} does not exist: nothing to back up.")
    source = sqlite3.connect(source_path, timeout=20)
    copy = sqlite3.connect(copy_path)
    try:
        source.backup(copy)  # one step: one read transaction, one consistent snapshot
        copy.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file, no -wal beside it
        cursor = copy.cursor()
        tables = count_rows(cursor, "sqlite")
        names = stored_names(cursor, tables)
    finally:
        copy.close()
        source.close()
    return Snapshot("sqlite", copy_path, tables, names, {"sqlite_version": sqlite3.sqlite_version})


def restore_sqlite(copy_path: Path) -> None:
    """Copy the archived database over the configured SQLite file (created if missing), in one step."""
    target = _sqlite_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    connections.close_all()
    source = sqlite3.connect(copy_path)
    destination = sqlite3.connect(target, timeout=20)
    try:
        destination.execute("PRAGMA journal_mode=DELETE")  # the copy may change the page size (not in WAL)
        source.backup(destination)
        destination.execute("PRAGMA journal_mode=WAL")  # as the service runs it (webapp/settings/base.py)
    except sqlite3.Error as exc:
        raise BackupError(f"The SQLite database {target} could not be replaced ({exc}): stop the web server and "
                          "the workers, then run the restore again.") from None  # fmt: skip
    finally:
        destination.close()
        source.close()


# --- the configured database, as the restore sees it ---------------------------------------------------------


def live_counts() -> dict[str, int]:
    """Every table's row count in the configured database now."""
    connections.close_all()
    with connection.cursor() as cursor:
        return count_rows(cursor, engine())


def tables_with_rows() -> dict[str, int]:
    """The tables of the configured database that hold data (not only what `migrate` writes itself)."""
    if engine() == "sqlite" and not _sqlite_path().exists():
        return {}
    return {table: rows for table, rows in live_counts().items() if rows and table not in BOOKKEEPING_TABLES}
