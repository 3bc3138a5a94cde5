from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from diagnosis.models import ModelVersion
from diagnosis.services.registry import PromotionBlocked, activate_model, active_model_version, compare_models


def format_value(value) -> str:
    return "—" if value is None else f"{value:.3f}"


class Command(BaseCommand):
    help = (
        "Make a registered model version the active one; workers switch without a restart. Shows its metrics "
        "beside the active model's and refuses a lower AUC unless --force."
    )

    def add_arguments(self, parser):
        parser.add_argument("version")
        parser.add_argument("--force", action="store_true", help="Promote even if its AUC is lower.")

    def handle(self, *args, **options):
        try:
            model_version = ModelVersion.objects.get(version=options["version"])
        except ModelVersion.DoesNotExist:
            known = ", ".join(ModelVersion.objects.values_list("version", flat=True)[:20]) or "none"
            raise CommandError(f"No model version {options['version']!r}. Registered: {known}.") from None
        current = active_model_version()
        rows = compare_models(model_version, current)
        if rows:
            self.stdout.write(f"{'':28}{current.version[:28]:>30}{model_version.version[:28]:>30}")
            for name, old, new in rows:
                self.stdout.write(f"{name:28}{format_value(old):>30}{format_value(new):>30}")
        try:
            activate_model(model_version=model_version, force=options["force"])
        except PromotionBlocked as exc:
            raise CommandError(exc.messages[0]) from None
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        self.stdout.write(f"{model_version.version} is now active.")
