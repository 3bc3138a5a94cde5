"""manage.py backup DEST: one archive with a consistent database dump, every stored file it refers to and a
manifest of row counts and SHA-256s (services.backup; docs/deployment.md, "Backup and restore")."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from diagnosis.services.backup import create_backup
from diagnosis.services.backup_archive import BackupError


class Command(BaseCommand):
    help = (
        "Back up the database and every stored file it refers to into one archive, with a manifest of row counts "
        "and SHA-256s. Safe while the service runs: the dump is one snapshot, and the files are copied after it."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "dest", help="A folder (the archive is written into it as backup-<UTC time>.tar) or the archive's path."
        )
        parser.add_argument("--no-progress", action="store_true", help="Print no progress lines, only the summary.")
        parser.add_argument("--pg-bin-dir", help="The folder of pg_dump, when it is not the one on PATH.")

    def handle(self, *args, dest, no_progress=False, pg_bin_dir=None, **options):
        try:
            result = create_backup(Path(dest), write=self.stdout.write, progress=not no_progress,
                                   pg_bin_dir=pg_bin_dir)  # fmt: skip
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"Backed up {result.rows:,} rows of {len(result.tables)} tables ({result.engine}) and {result.files:,} "
            f"files ({result.file_bytes / 1e6:,.1f} MB) in {result.seconds:.1f} s to {result.path}"
        )
        if result.missing:
            listed = ", ".join(result.missing[:10]) + (" ..." if len(result.missing) > 10 else "")
            self.stderr.write(
                f"Not in the archive: {len(result.missing):,} of the files the dump names were deleted before they "
                f"could be copied (the manifest lists them under missing_files): {listed}"
            )
