from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from diagnosis.management.data_options import add_data_arguments, data_source, read_config
from diagnosis.models import ModelVersion
from diagnosis.services.training import evaluate_registered_model, metrics_table, report_lines


class Command(BaseCommand):
    help = (
        "Re-evaluate a registered model on a labelled folder (--data DIR: DIR/test/<class>/ or DIR/<class>/) or a "
        "metadata CSV (--metadata CSV --images DIR --format ...: the rows of --test-split, or all of them), with "
        "the subgroup table."
    )

    def add_arguments(self, parser):
        parser.add_argument("version")
        add_data_arguments(parser)
        parser.add_argument("--config", type=Path, help="A YAML file with a `columns:` mapping for an in-house CSV.")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **options):
        try:
            model_version = ModelVersion.objects.get(version=options["version"])
        except ModelVersion.DoesNotExist:
            raise CommandError(f"No model version {options['version']!r}.") from None
        if options["malignant"]:
            raise CommandError("--malignant is for training: a model is evaluated with its own malignant classes.")
        source = data_source(options, read_config(options["config"]) if options["config"] else {})
        try:
            report = evaluate_registered_model(
                model_version=model_version,
                data_dir=source,
                progress=not options["no_progress"],
                log=self.stdout.write,
            )
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        recorded = (model_version.metrics or {}).get("test")
        columns = {f"{options['data'] or options['metadata']}": report}
        if recorded:
            columns["at registration (test)"] = recorded
        self.stdout.write(f"{model_version.version} at threshold {model_version.threshold:.3f}")
        self.stdout.write(metrics_table(columns))
        for line in report_lines({"test": report, "subgroups": report.get("subgroups")}):
            self.stdout.write(line)
        if report["skipped"]:
            self.stdout.write(f"Skipped {len(report['skipped'])} unreadable file(s).")
