"""Delete images older than IMAGE_RETENTION_DAYS (also run daily by the beat schedule)."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand

from diagnosis.services.retention import purge_expired_images


class Command(BaseCommand):
    help = "Delete images (with results and files) older than IMAGE_RETENTION_DAYS; 0 keeps them forever."

    def handle(self, *args, **options):
        if settings.IMAGE_RETENTION_DAYS <= 0:
            self.stdout.write("IMAGE_RETENTION_DAYS is 0: images are kept; nothing to do.")
            return
        counts = purge_expired_images()
        self.stdout.write(f"Deleted {counts['images']} images older than {settings.IMAGE_RETENTION_DAYS} days "
                          f"({counts['files']} stored files).")  # fmt: skip
