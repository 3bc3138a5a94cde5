"""The backup archive (manage.py backup and restore): one uncompressed tar file holding the database dump,
every stored file the dump refers to, and manifest.json, written last.

Layout:
    database/postgresql.dump   pg_dump --format=custom (compressed by pg_dump), or
    database/sqlite3.db        a copy made with SQLite's online backup API
    files/<stored name>        each stored file as default_storage names it (images/..., explanations/...)
    manifest.json              format and version, times, the database engine, per-table row counts of the
                               dump's snapshot, and each member's name, size and SHA-256

The photos are JPEG or PNG already and the dump is compressed, so the tar itself is not. It is written as
NAME.partial and renamed once the manifest is in: a backup that stopped half-way never has the final name.
Reading checks the archive before anything is restored: a truncated tar, a missing or unreadable manifest, a
format version this release does not read, a member missing or whose size or SHA-256 differs are each named.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

FORMAT = "lesion-triage-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE_MEMBERS = {"postgresql": "database/postgresql.dump", "sqlite": "database/sqlite3.db"}
FILES_PREFIX = "files/"
CHUNK = 1 << 20


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says what is wrong and what to do."""


class ArchiveDamaged(BackupError):
    """The archive is incomplete, damaged or not a backup this release reads; the message names the part."""


class Progress:
    """Progress lines for long runs: one every `every` items or `seconds` seconds, and one at the end.
    `write` None: silent (--no-progress)."""

    def __init__(self, write: Callable[[str], None] | None, label: str, total: int, *, every: int = 1000,
                 seconds: float = 5.0) -> None:  # fmt: skip
        self.write, self.label, self.total, self.every, self.seconds = write, label, total, every, seconds
        self.count, self.bytes = 0, 0
        self.started = self.last = time.monotonic()

    def step(self, nbytes: int = 0) -> None:
        self.count += 1
        self.bytes += nbytes
        now = time.monotonic()
        if self.write and self.count < self.total and (self.count % self.every == 0 or now - self.last >= self.seconds):
            self.last = now
            self._line(now)

    def finish(self) -> None:
        if self.write:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        share = f" ({100 * self.count / self.total:.0f}%)" if self.total else ""
        self.write(f"  {self.label}: {self.count:,} of {self.total:,}{share}, {self.bytes / 1e6:,.1f} MB, "
                   f"{now - self.started:.1f} s")  # fmt: skip


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_member(name: str) -> str:
    return FILES_PREFIX + name


def archive_path(dest: Path, *, now: float | None = None) -> Path:
    """The archive to write for DEST: inside it, as backup-<UTC time>.tar, when DEST is a folder; else DEST
    itself, which must not exist yet and whose folder must. BackupError names what is wrong."""
    dest = Path(dest).expanduser()
    if dest.is_dir():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now or time.time()))
        path = dest / f"backup-{stamp}.tar"
    else:
        path = dest
        if not path.parent.is_dir():
            raise BackupError(f"{path.parent} is not a folder: create it first, or give an existing folder as DEST.")
    if path.exists():
        raise BackupError(f"{path} exists already: a backup never overwrites one. Give another name or a folder.")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise BackupError(f"{path.parent} is not writable by this user: choose a folder it can write to.")
    return path


class _HashingReader:
    """Reads from `source` and hashes what passes (tarfile.addfile reads exactly the member's size)."""

    def __init__(self, source) -> None:
        self.source, self.digest = source, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        return data


class ArchiveWriter:
    """Writes PATH.partial; finish() adds the manifest and renames it to PATH, abort() deletes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        try:
            self._tar = tarfile.open(self.partial, "x", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by finish()
        except OSError as exc:
            raise BackupError(f"Cannot write {self.partial}: {exc.strerror or exc}.") from None

    def _info(self, member: str, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = size, int(time.time()), 0o600
        return info

    def add_path(self, member: str, source: Path) -> dict:
        """Add a file from disk (the database dump); its entry for the manifest."""
        with open(source, "rb") as handle:
            reader = _HashingReader(handle)
            size = os.fstat(handle.fileno()).st_size
            self._tar.addfile(self._info(member, size), reader)
        return {"member": member, "size": size, "sha256": reader.digest.hexdigest()}

    def add_bytes(self, member: str, data: bytes) -> None:
        self._tar.addfile(self._info(member, len(data)), io.BytesIO(data))

    def finish(self, manifest: dict) -> Path:
        self.add_bytes(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        self._tar.close()
        with open(self.partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._tar.close()
        except Exception:  # closing a half-written tar may fail; it is deleted anyway
            pass
        self.partial.unlink(missing_ok=True)


class ArchiveReader:
    """An archive opened for restoring: its members listed (a truncated tar is named here) and its
    manifest read and checked. BackupError for a missing path, ArchiveDamaged for a bad archive."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise BackupError(f"{self.path} does not exist: give the path of an archive written by manage.py backup.")
        if not self.path.is_file():
            raise BackupError(f"{self.path} is not a file: give the archive itself (backup-<time>.tar), not a folder.")
        try:
            self._tar = tarfile.open(self.path, "r:")  # noqa: SIM115 - closed by close()
        except (tarfile.TarError, OSError) as exc:
            message = f"{self.path} is not a readable tar archive ({exc}): not a backup, or damaged."
            raise ArchiveDamaged(message) from None
        self.members: dict[str, tarfile.TarInfo] = {}
        last = None
        try:
            while (member := self._tar.next()) is not None:
                self.members[member.name] = member
                last = member.name
        except (tarfile.TarError, OSError) as exc:  # the data of the member before is cut short
            where = f"it ends inside {last}" if last else "it ends before its first member"
            raise ArchiveDamaged(f"{self.path} is truncated: {where} ({exc}).") from None
        self.last_member = last
        self.manifest = self._read_manifest()

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _read_manifest(self) -> dict:
        if MANIFEST not in self.members:
            raise ArchiveDamaged(
                f"{self.path} has no {MANIFEST}, which manage.py backup writes last: the archive is incomplete "
                f"(it ends after {self.last_member or 'nothing'}) or is not a backup of this service."
            )
        try:
            manifest = json.loads(self.read(MANIFEST))
        except (ValueError, tarfile.TarError, OSError) as exc:
            raise ArchiveDamaged(f"{self.path}: {MANIFEST} cannot be read ({exc}).") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ArchiveDamaged(f"{self.path}: {MANIFEST} is not the manifest of a {FORMAT} archive.")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ArchiveDamaged(
                f"{self.path}: {MANIFEST} has format version {version!r}; this release reads version "
                f"{FORMAT_VERSION}. Restore it with the release that wrote it."
            )
        missing = [key for key in ("database", "tables", "files") if key not in manifest]
        if missing or manifest["database"].get("engine") not in DATABASE_MEMBERS:
            raise ArchiveDamaged(f"{self.path}: {MANIFEST} lacks {', '.join(missing) or 'a known database engine'}.")
        return manifest

    def read(self, member: str) -> bytes:
        with self.open(member) as handle:
            return handle.read()

    def open(self, member: str):
        """The member's bytes as a file object (tarfile raises ReadError if the archive ends inside it)."""
        return self._tar.extractfile(self.members[member])

    def entries(self) -> list[dict]:
        """Every member the manifest lists, the database dump first: member, size, sha256."""
        files = [{"member": file_member(entry["name"]), **entry} for entry in self.manifest["files"]]
        return [self.manifest["database"], *files]

    def verify(self, progress: Progress | None = None) -> list[str]:
        """Read every member the manifest lists and compare its size and SHA-256; the problems, each naming
        its member (empty: the archive is whole)."""
        problems = []
        for entry in self.entries():
            member = entry["member"]
            problem = self._check(member, entry)
            if problem:
                problems.append(f"{member}: {problem}")
            if progress:
                progress.step(entry.get("size", 0))
        if progress:
            progress.finish()
        return problems

    def _check(self, member: str, entry: dict) -> str:
        if member not in self.members:
            return "listed in the manifest but not in the archive"
        if self.members[member].size != entry["size"]:
            return f"{self.members[member].size} bytes, the manifest says {entry['size']}"
        digest = hashlib.sha256()
        try:
            with self.open(member) as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
        except (tarfile.TarError, OSError) as exc:
            return f"cannot be read ({exc}): the archive is truncated or damaged here"
        if digest.hexdigest() != entry["sha256"]:
            return "its SHA-256 differs from the manifest: the archive is damaged"
        return ""

    def extract_to(self, member: str, target: Path) -> None:
        """Copy a member (the database dump) to a file on disk."""
        with self.open(member) as source, open(target, "wb") as out:
            while chunk := source.read(CHUNK):
                out.write(chunk)
