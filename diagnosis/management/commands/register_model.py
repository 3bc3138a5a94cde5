from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from diagnosis.services.registry import register_model


class Command(BaseCommand):
    help = "Register a checkpoint file as a ModelVersion after checking that it loads and predicts."

    def add_arguments(self, parser):
        parser.add_argument("checkpoint", type=Path)
        parser.add_argument("--name", help="A name for this version (default: arch, date and hash).")
        parser.add_argument("--activate", action="store_true", help="Make it the active model at once.")

    def handle(self, *args, **options):
        path: Path = options["checkpoint"]
        if not path.is_file():
            raise CommandError(f"{path} is not a file.")
        try:
            model_version = register_model(
                checkpoint=path.read_bytes(), version=options["name"], activate=options["activate"]
            )
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        state = "active" if model_version.is_active else "registered (not active)"
        self.stdout.write(f"{model_version.version}: {state}")
