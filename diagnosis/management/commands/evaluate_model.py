from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from diagnosis.models import ModelVersion
from diagnosis.services.training import evaluate_registered_model, metrics_table


class Command(BaseCommand):
    help = "Re-evaluate a registered model on a labelled folder (DIR/test/<class>/ or DIR/<class>/)."

    def add_arguments(self, parser):
        parser.add_argument("version")
        parser.add_argument("--data", required=True, type=Path)
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **options):
        try:
            model_version = ModelVersion.objects.get(version=options["version"])
        except ModelVersion.DoesNotExist:
            raise CommandError(f"No model version {options['version']!r}.") from None
        try:
            report = evaluate_registered_model(
                model_version=model_version, data_dir=options["data"], progress=not options["no_progress"]
            )
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        recorded = (model_version.metrics or {}).get("test")
        columns = {f"{options['data']}": report}
        if recorded:
            columns["at registration (test)"] = recorded
        self.stdout.write(f"{model_version.version} at threshold {model_version.threshold:.3f}")
        self.stdout.write(metrics_table(columns))
        if report["skipped"]:
            self.stdout.write(f"Skipped {len(report['skipped'])} unreadable file(s).")
