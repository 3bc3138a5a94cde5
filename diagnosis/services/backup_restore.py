"""manage.py restore: an archive of manage.py backup (services.backup) back into the configured database and
storage, checked before and after.

In this order:
1. The archive is read through and checked against its manifest (every member present, with its size and
   SHA-256) before anything is changed: a damaged archive changes nothing and its damaged part is named.
2. The target must be empty (no data in the database beyond what `migrate` writes, no file in storage)
   unless --force: a restore replaces the database.
3. The database, in one step (services.backup_database): a failure leaves it as it was.
4. The files, under their own names (with --force, each replaces a file of the same name; other files stay).
5. Verification of what is now there: every table's row count and every file's SHA-256 against the
   manifest; each mismatch is named.
6. Work in flight at the dump is given back to the workers: claims in the dump belong to workers of the
   database that was replaced, so claimed uploads and explanations are queued again, and the waiting ones
   are sent at once through the sweeper's own function (services.images.requeue_stale_images).

Run it with the web server, the workers and beat stopped; `manage.py migrate` afterwards brings a backup of
an older release up to this one's schema.
"""

from __future__ import annotations

import posixpath
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from django.contrib.contenttypes.models import ContentType
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db.models import F
from django.db.models.functions import Greatest

from ..models import Explanation, ImageState, LesionImage
from . import backup_database
from .backup import STORAGE_THREADS, WINDOW, in_windows, read_stored, storage_description
from .backup_archive import ArchiveDamaged, ArchiveReader, BackupError, Progress, file_member, sha256_of
from .images import requeue_stale_images


@dataclass
class RestoreResult:
    archive: Path
    manifest: dict
    checked_only: bool = False
    problems: list[str] = field(default_factory=list)  # mismatches after the restore, each naming its table or file
    resumed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(self.manifest["tables"].values())

    @property
    def files(self) -> int:
        return len(self.manifest["files"])


def first_stored_file(folder: str = "") -> str | None:
    """The name of some file in storage, or None when it holds none (empty folders do not count)."""
    try:
        folders, files = default_storage.listdir(folder)
    except FileNotFoundError:
        return None
    if files:
        return posixpath.join(folder, files[0])
    for inner in folders:
        found = first_stored_file(posixpath.join(folder, inner))
        if found:
            return found
    return None


def refuse_non_empty() -> None:
    """BackupError naming what is not empty: tables with data, or a file in storage."""
    reasons = []
    tables = backup_database.tables_with_rows()
    if tables:
        listed = [f"{table} ({rows} row{'s' if rows != 1 else ''})" for table, rows in sorted(tables.items())]
        more = f" and {len(listed) - 5} more tables" if len(listed) > 5 else ""
        reasons.append(f"the database has data in {', '.join(listed[:5])}{more}")
    found = first_stored_file()
    if found:
        where = storage_description()
        reasons.append(f"the storage ({where.get('bucket') or where.get('location')}) holds files, for example {found}")
    if reasons:
        raise BackupError("Refusing to restore over existing data: " + "; ".join(reasons) + ". Restore into an empty "
                          "database and storage, or add --force to replace the database and overwrite files of the "
                          "same name.")  # fmt: skip


def check_names(reader: ArchiveReader) -> None:
    """ArchiveDamaged for a stored-file name that could leave the storage's folder."""
    for entry in reader.manifest["files"]:
        name = entry.get("name", "")
        parts = name.split("/")
        if not name or name.startswith("/") or "\\" in name or ".." in parts or "" in parts:
            raise ArchiveDamaged(f"{reader.path}: the manifest lists a file named {name!r}, which is not a stored "
                                 "file's name: the archive is damaged or not a backup of this service.")  # fmt: skip


def _put(item: tuple[str, bytes, bool]) -> int:
    name, data, replace = item
    if replace and default_storage.exists(name):
        default_storage.delete(name)
    saved = default_storage.save(name, ContentFile(data))
    if saved != name:
        default_storage.delete(saved)
        raise BackupError(f"{name} exists in storage already (it was stored meanwhile?): run the restore again with "
                          "--force to overwrite it.")  # fmt: skip
    return len(data)


def restore_files(reader: ArchiveReader, *, force: bool, write) -> None:
    """Every file of the archive into default_storage under its own name, STORAGE_THREADS at a time."""
    names = [entry["name"] for entry in reader.manifest["files"]]
    progress = Progress(write, "files", len(names))
    with ThreadPoolExecutor(max_workers=STORAGE_THREADS) as pool:
        for start in range(0, len(names), WINDOW):
            window = [(name, reader.read(file_member(name)), force) for name in names[start : start + WINDOW]]
            for size in pool.map(_put, window):
                progress.step(size)
    progress.finish()


def verify_restored(manifest: dict, *, write) -> list[str]:
    """What differs from the manifest now: each table whose row count differs, each file missing or whose
    SHA-256 differs, by name."""
    problems = []
    counts = backup_database.live_counts()
    for table, rows in sorted(manifest["tables"].items()):
        if table not in counts:
            problems.append(f"table {table}: missing after the restore (the backup has {rows} rows)")
        elif counts[table] != rows:
            problems.append(f"table {table}: {counts[table]} rows, the backup has {rows}")
    expected = {entry["name"]: entry["sha256"] for entry in manifest["files"]}
    progress = Progress(write, "verifying files", len(expected))
    for name, data in in_windows(read_stored, sorted(expected)):
        if data is None:
            problems.append(f"file {name}: missing after the restore")
        elif sha256_of(data) != expected[name]:
            problems.append(f"file {name}: its SHA-256 differs from the backup's")
        progress.step(len(data or b""))
    progress.finish()
    return problems


def resume_work(*, send: bool) -> dict[str, int]:
    """Give the work that was in flight at the dump back to the workers (step 6 of the module). The attempt
    a void claim stood for is not counted against the upload, as when a worker gives a claim back."""
    images = LesionImage.objects.filter(state=ImageState.PROCESSING).update(
        state=ImageState.QUEUED, claimed_at=None, claimed_by="", enqueued_at=None,
        attempts=Greatest(F("attempts") - 1, 0),
    )  # fmt: skip
    waiting = LesionImage.objects.filter(state=ImageState.QUEUED).update(enqueued_at=None)
    explanations = Explanation.objects.filter(state=Explanation.State.PROCESSING).update(
        state=Explanation.State.QUEUED, claimed_at=None, claimed_by="", attempts=Greatest(F("attempts") - 1, 0)
    )
    waiting_explanations = Explanation.objects.filter(state=Explanation.State.QUEUED).update(claimed_at=None)
    sent = {"requeued": 0, "explanations": 0}
    if send and (waiting or waiting_explanations):
        sent = requeue_stale_images()  # explanations queued in the last REQUEUE_AFTER_SECONDS: the next sweep
    return {"images_reclaimed": images, "images_waiting": waiting, "images_sent": sent["requeued"],
            "explanations_reclaimed": explanations, "explanations_waiting": waiting_explanations,
            "explanations_sent": sent["explanations"]}  # fmt: skip


def _restore_database(reader: ArchiveReader, pg_bin_dir: str | None) -> None:
    database = reader.manifest["database"]
    with tempfile.TemporaryDirectory(prefix="restore-") as work:
        dump = Path(work) / "database"
        reader.extract_to(database["member"], dump)
        if database["engine"] == "postgresql":
            backup_database.restore_postgres(dump, dump_major=int(database.get("pg_dump_major") or 0),
                                             pg_bin_dir=pg_bin_dir)  # fmt: skip
        else:
            backup_database.restore_sqlite(dump)
    ContentType.objects.clear_cache()  # ids as the restored database has them


def restore_backup(archive: Path, *, force: bool = False, check_only: bool = False, requeue: bool = True,
                   write: Callable[[str], None] | None = None, progress: bool = True,
                   pg_bin_dir: str | None = None) -> RestoreResult:  # fmt: skip
    """Restore ARCHIVE (see the module). `check_only`: steps 1 only. Raises BackupError (ArchiveDamaged for
    the archive) before anything is changed; mismatches found after the restore are in the result."""
    started = time.monotonic()
    tell = write or (lambda line: None)
    shown = write if progress else None
    with ArchiveReader(Path(archive)) as reader:
        manifest = reader.manifest
        check_names(reader)
        tell(f"Checking {reader.path} (a backup of {manifest.get('created_at', '?')}) ...")
        damaged = reader.verify(Progress(shown, "checking the archive", len(manifest["files"]) + 1))
        if damaged:
            raise ArchiveDamaged(f"{reader.path} is damaged; nothing was restored:\n  " + "\n  ".join(damaged))
        if check_only:
            return RestoreResult(reader.path, manifest, checked_only=True, seconds=time.monotonic() - started)
        engine = manifest["database"]["engine"]
        if engine != backup_database.engine():
            raise BackupError(f"The archive holds a {engine} database and the configured one is "
                              f"{backup_database.engine()}: set DATABASE_URL to a {engine} database.")  # fmt: skip
        if not force:
            refuse_non_empty()
        tell(f"Restoring the {engine} database ({sum(manifest['tables'].values()):,} rows) ...")
        _restore_database(reader, pg_bin_dir)
        tell(f"Restoring {len(manifest['files']):,} files ...")
        restore_files(reader, force=force, write=shown)
    tell("Verifying the restored database and files against the manifest ...")
    problems = verify_restored(manifest, write=shown)
    resumed = {} if problems else resume_work(send=requeue)
    return RestoreResult(reader.path, manifest, problems=problems, resumed=resumed, seconds=time.monotonic() - started)
