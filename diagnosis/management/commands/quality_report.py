"""manage.py quality_report: the photo-quality gate's calibration against clinicians' feedback, the table of
the drift dashboard's "Quality-gate calibration" section, as text or JSON."""

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from diagnosis.services.quality_monitoring import calibration_report

COLUMNS = ("check", "refused", "reviewed", "marked fine", "false-refusal share")


def _share(value) -> str:
    return "–" if value is None else f"{value:.0%}"


class Command(BaseCommand):
    help = (
        "Per model version and per check: photos the gate refused, how many clinicians reviewed, and how many "
        'they marked "this photo was fine" (an estimate of the check\'s false refusals); and accepted photos '
        "clinicians marked poor."
    )

    def add_arguments(self, parser):
        parser.add_argument("--days", type=float, default=None,
                            help=f"Predictions of the last N days (default: QUALITY_CALIBRATION_DAYS, "
                                 f"{settings.QUALITY_CALIBRATION_DAYS:g}).")  # fmt: skip
        parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

    def handle(self, *args, **options):
        days = options["days"]
        if days is not None and days <= 0:
            raise CommandError("--days must be positive.")
        days = settings.QUALITY_CALIBRATION_DAYS if days is None else days
        report = calibration_report(days=days)
        if options["json"]:
            self.stdout.write(json.dumps({"days": days, "model_versions": [v.as_dict() for v in report]}, indent=2))
            return
        if not report:
            self.stdout.write(f"No photo was judged by the quality gate in the last {days:g} days.")
            return
        self.stdout.write(f"Quality-gate calibration, predictions of the last {days:g} days")
        for version in report:
            self.stdout.write(
                f"\n{version.model_version}: {version.photos} photo{'s' if version.photos != 1 else ''}; "
                f"{version.refused} refused "
                f"({version.refused_reviewed} reviewed, {version.refused_fine} marked fine); {version.accepted} "
                f"accepted ({version.accepted_reviewed} reviewed, {version.accepted_poor} marked poor)"
            )
            if not version.checks:
                continue
            rows = [(c.check, str(c.refused), str(c.reviewed), str(c.marked_fine), _share(c.false_refusal_share))
                    for c in version.checks]  # fmt: skip
            widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
            for row in [COLUMNS, *rows]:
                self.stdout.write("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                            for i, (cell, w) in enumerate(zip(row, widths, strict=True))))  # fmt: skip
