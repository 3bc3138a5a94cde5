"""manage.py backup: one archive (services.backup_archive) with a consistent database dump, every stored file
the dump refers to and a manifest of row counts and SHA-256s. Safe while the service runs.

The consistency it gives, in this order:
1. The database is dumped from one snapshot (services.backup_database): every table as of one instant, with
   the row counts and the stored-file names read from that same snapshot.
2. Then the files those rows name are copied from storage (local folder or bucket, through default_storage),
   with the portal's kept previews of the photos in the dump. The service writes a file before the row that
   names it, so every row of the dump has its file in the archive. A file created after the dump (a new
   upload, an explanation drawn meanwhile) is not in the archive, and neither is its row. A file deleted
   between the dump and the copy (a patient erased meanwhile) is listed in the manifest's missing_files and
   reported; its rows are in the dump, and erasing the patient again after a restore removes them.
3. The manifest is written last: an archive with a manifest is complete.

Work in flight at the dump (an upload queued or being predicted, an explanation being computed) is in the
dump as queued or claimed; manage.py restore gives it back to the workers (services.backup_restore).
"""

from __future__ import annotations

import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.core.files.storage import default_storage

from . import backup_database
from .backup_archive import (
    DATABASE_MEMBERS,
    FORMAT,
    FORMAT_VERSION,
    ArchiveWriter,
    Progress,
    archive_path,
    file_member,
    sha256_of,
)
from .previews import preview_names

# Files are read (and, in a restore, written) by this many threads: a bucket answers each request in
# milliseconds, so one at a time would leave the copy waiting on the network.
STORAGE_THREADS = 8
WINDOW = 64  # files in memory at once per batch of threads
CONSISTENCY = (
    "database: one snapshot (row counts and file names from the same snapshot); files: copied after the dump, "
    "so every row's file is here unless it was deleted meanwhile (missing_files); files created after the dump "
    "are not included"
)


@dataclass
class BackupResult:
    path: Path
    engine: str
    tables: dict[str, int]
    files: int
    file_bytes: int
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.tables.values())


def storage_description() -> dict:
    """Where default_storage keeps files: the backend and its folder or bucket (for the manifest)."""
    bucket = getattr(default_storage, "bucket_name", None)
    if bucket:
        return {"backend": "s3", "bucket": bucket, "endpoint": getattr(default_storage, "endpoint_url", None)}
    return {"backend": "local", "location": str(getattr(default_storage, "location", settings.MEDIA_ROOT))}


def read_stored(name: str) -> bytes | None:
    """A stored file's bytes, or None when there is no such file."""
    try:
        with default_storage.open(name, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def in_windows(function: Callable, items: list, threads: int = STORAGE_THREADS) -> Iterator[tuple]:
    """(item, function(item)) in order, `threads` at a time, at most WINDOW results held in memory."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(items), WINDOW):
            window = items[start : start + WINDOW]
            yield from zip(window, pool.map(function, window), strict=True)


def kept_previews(image_names: list[str]) -> list[str]:
    """The previews (services.previews) kept in storage for these photos: one listing of the folder."""
    try:
        _, files = default_storage.listdir("previews")
    except FileNotFoundError:
        return []
    kept = {posixpath.join("previews", name) for name in files}
    return [name for name in preview_names(image_names) if name in kept]


def _photo_names(names: list[str]) -> list[str]:
    """The photos among stored names (services.images stores them as images/<random>.<ext>)."""
    return [name for name in names if name.startswith("images/")]


def copy_files(writer: ArchiveWriter, names: list[str], *, write) -> tuple[list[dict], list[str]]:
    """Copy stored files into the archive; their manifest entries, and the names no longer in storage."""
    entries, missing = [], []
    progress = Progress(write, "files", len(names))
    for name, data in in_windows(read_stored, names):
        if data is None:
            missing.append(name)
            progress.step()
            continue
        writer.add_bytes(file_member(name), data)
        entries.append({"name": name, "size": len(data), "sha256": sha256_of(data)})
        progress.step(len(data))
    progress.finish()
    return entries, missing


def create_backup(dest: Path, *, write: Callable[[str], None] | None = None, progress: bool = True,
                  pg_bin_dir: str | None = None) -> BackupResult:  # fmt: skip
    """Write the archive for DEST (a folder, or the archive's path; services.backup_archive.archive_path).
    `write` receives what to tell the operator; `progress` False keeps only the stage lines. Raises
    BackupError (nothing is left behind: a half-written archive is deleted)."""
    started, created_at = time.monotonic(), datetime.now(UTC)
    path = archive_path(Path(dest))
    tell = write or (lambda line: None)
    writer = ArchiveWriter(path)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".backup-") as work:
            tell(f"Dumping the {backup_database.engine()} database ...")
            snapshot = backup_database.take_snapshot(Path(work), pg_bin_dir=pg_bin_dir)
            database = writer.add_path(DATABASE_MEMBERS[snapshot.engine], snapshot.dump_path)
        names = snapshot.stored_names + kept_previews(_photo_names(snapshot.stored_names))
        tell(f"Dumped {sum(snapshot.tables.values()):,} rows of {len(snapshot.tables)} tables "
             f"({database['size'] / 1e6:,.1f} MB); copying {len(names):,} stored files ...")  # fmt: skip
        files, missing = copy_files(writer, names, write=write if progress else None)
        writer.finish({
            "format": FORMAT, "format_version": FORMAT_VERSION, "created_at": created_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(), "consistency": CONSISTENCY,
            "database": {"engine": snapshot.engine, **database, **snapshot.details},
            "tables": snapshot.tables, "storage": storage_description(), "files": files, "missing_files": missing,
        })  # fmt: skip
    except BaseException:
        writer.abort()
        raise
    return BackupResult(path=path, engine=snapshot.engine, tables=snapshot.tables, files=len(files),
                        file_bytes=sum(entry["size"] for entry in files), missing=missing,
                        seconds=time.monotonic() - started)  # fmt: skip
