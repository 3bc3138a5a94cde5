from django.core.management.base import BaseCommand, CommandError

from diagnosis.models import ModelVersion
from diagnosis.services.registry import activate_model


class Command(BaseCommand):
    help = "Make a registered model version the active one; workers switch without a restart."

    def add_arguments(self, parser):
        parser.add_argument("version")

    def handle(self, *args, **options):
        try:
            model_version = ModelVersion.objects.get(version=options["version"])
        except ModelVersion.DoesNotExist:
            known = ", ".join(ModelVersion.objects.values_list("version", flat=True)[:20]) or "none"
            raise CommandError(f"No model version {options['version']!r}. Registered: {known}.") from None
        activate_model(model_version=model_version)
        self.stdout.write(f"{model_version.version} is now active.")
