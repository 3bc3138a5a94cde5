"""manage.py restore ARCHIVE: an archive of manage.py backup back into the configured database and storage,
checked before and verified after (services.backup_restore; docs/deployment.md, "Backup and restore")."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from diagnosis.services.backup_archive import BackupError
from diagnosis.services.backup_restore import restore_backup


class Command(BaseCommand):
    help = (
        "Restore an archive of manage.py backup: check it, restore the database, then the files, then verify every "
        "row count and file SHA-256 against its manifest. Refuses a database or storage that is not empty unless "
        "--force. Stop the web server, the workers and beat first."
    )

    def add_arguments(self, parser):
        parser.add_argument("archive", help="The archive written by manage.py backup (backup-<time>.tar).")
        parser.add_argument(
            "--force", action="store_true",
            help="Restore over data: the database is replaced, files of the archive overwrite those of the same name "
            "and other files stay.",
        )  # fmt: skip
        parser.add_argument("--check", action="store_true", help="Only check the archive against its manifest.")
        parser.add_argument(
            "--no-requeue", action="store_true",
            help="Do not send the uploads and explanations that were waiting at the backup; the sweeper (beat) will.",
        )  # fmt: skip
        parser.add_argument("--no-progress", action="store_true", help="Print no progress lines, only the summary.")
        parser.add_argument("--pg-bin-dir", help="The folder of pg_restore and psql, when not the ones on PATH.")

    def handle(self, *args, archive, force=False, check=False, no_requeue=False, no_progress=False, pg_bin_dir=None,
               **options):  # fmt: skip
        try:
            result = restore_backup(
                Path(archive), force=force, check_only=check, requeue=not no_requeue, write=self.stdout.write,
                progress=not no_progress, pg_bin_dir=pg_bin_dir,
            )  # fmt: skip
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        if result.checked_only:
            self.stdout.write(f"{result.archive} is whole: {result.rows:,} rows and {result.files:,} files, every "
                              f"SHA-256 as its manifest says ({result.seconds:.1f} s).")  # fmt: skip
            return
        for problem in result.problems:
            self.stderr.write(f"MISMATCH {problem}")
        if result.problems:
            raise CommandError(f"The restored data does not match the backup: {len(result.problems)} mismatches "
                               "(listed above).")  # fmt: skip
        self.stdout.write(
            f"Restored {result.rows:,} rows and {result.files:,} files in {result.seconds:.1f} s; verified: every row "
            "count and file SHA-256 matches the backup."
        )
        self._report_work(result)

    def _report_work(self, result) -> None:
        resumed = result.resumed
        missing = result.manifest.get("missing_files") or []
        if missing:
            self.stderr.write(f"Restored without their files, which were deleted while the backup was taken: "
                              f"{plural(len(missing), 'file')}: {', '.join(missing[:10])}")  # fmt: skip
        claimed = f"{plural(resumed['images_reclaimed'], 'upload')} and "
        claimed += f"{plural(resumed['explanations_reclaimed'], 'explanation')}"
        sent = f"{plural(resumed['images_sent'], 'waiting upload')} and "
        sent += f"{plural(resumed['explanations_sent'], 'explanation')}"
        self.stdout.write(
            f"In flight at the backup: {claimed} being processed, queued again; {sent} sent to the workers now "
            "(the sweeper sends the rest)."
        )
        self.stdout.write("Next: manage.py migrate (a backup of an older release), then start the service.")


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
