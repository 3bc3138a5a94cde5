"""Print or write a model version's model card (Markdown)."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from diagnosis.models import ModelVersion
from diagnosis.services.model_card import model_card


class Command(BaseCommand):
    help = (
        "The model card of a registered version: intended use, data, metrics overall and per subgroup (skin tone, "
        "body site, sex, age band) and known limits, in Markdown. The admin's model version page links to it too."
    )

    def add_arguments(self, parser):
        parser.add_argument("version")
        parser.add_argument("--output", type=Path, help="Write it to this file instead of printing it.")

    def handle(self, *args, **options):
        try:
            model_version = ModelVersion.objects.get(version=options["version"])
        except ModelVersion.DoesNotExist:
            raise CommandError(f"No model version {options['version']!r}.") from None
        card = model_card(model_version)
        if options["output"] is None:
            self.stdout.write(card)
            return
        try:
            options["output"].write_text(card)
        except OSError as exc:
            raise CommandError(f"Cannot write {options['output']}: {exc}") from None
        self.stdout.write(f"Wrote the model card of {model_version.version} to {options['output']}.")
