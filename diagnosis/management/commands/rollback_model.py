from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from diagnosis.models import ModelVersion
from diagnosis.services.registry import rollback_model


class Command(BaseCommand):
    help = "Reactivate the model version that was active before the current one (or --to VERSION)."

    def add_arguments(self, parser):
        parser.add_argument("--to", help="A specific earlier version.")

    def handle(self, *args, **options):
        target = None
        if options["to"]:
            try:
                target = ModelVersion.objects.get(version=options["to"])
            except ModelVersion.DoesNotExist:
                raise CommandError(f"No model version {options['to']!r}.") from None
        try:
            model_version = rollback_model(to=target)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        self.stdout.write(f"Rolled back: {model_version.version} is active again.")
