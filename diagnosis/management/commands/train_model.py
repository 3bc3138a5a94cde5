"""Train a ResNet on a labelled image folder, evaluate it like a clinical study, and register it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from diagnosis.management.data_options import CONFIG_KEYS, add_data_arguments, data_source, read_config
from diagnosis.services import training
from diagnosis.services.model_card import model_card
from diagnosis.services.training import train_and_register

OPTION_FIELDS = {
    # command option -> TrainConfig field
    "arch": "arch",
    "pretrained_weights": "pretrained_weights",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "image_size": "input_size",
    "seed": "seed",
    "target_sensitivity": "target_sensitivity",
    "weight_decay": "weight_decay",
    "patience": "patience",
    "device": "device",
    "class_balance": "class_balance",
}


class Command(BaseCommand):
    help = (
        "Train on an image folder (--data DIR: train/ and test/, or one folder that is split) or a metadata CSV "
        "(--metadata CSV --images DIR, --format ham10000|isic-archive|isic2020 or a `columns:` mapping), pick the "
        "operating threshold on validation, report test metrics (also without near-duplicates of training images, "
        "and per subgroup), and register the model. Options override --config FILE.yaml, which overrides the "
        "defaults."
    )

    def add_arguments(self, parser):
        add_data_arguments(parser)
        parser.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50", "resnet_tiny"])
        parser.add_argument("--pretrained-weights", type=Path, help="A torchvision ImageNet state dict (a file).")
        parser.add_argument(
            "--pretrained", action="store_true",
            help="Let torchvision download ImageNet weights (needs the internet; never used by default).",
        )  # fmt: skip
        parser.add_argument("--epochs", type=int)
        parser.add_argument("--batch-size", type=int)
        parser.add_argument("--lr", type=float)
        parser.add_argument("--weight-decay", type=float)
        parser.add_argument("--patience", type=int, help="Early stopping: epochs without a better validation AUC.")
        parser.add_argument("--image-size", type=int)
        parser.add_argument("--seed", type=int)
        parser.add_argument("--target-sensitivity", type=float, help="For the operating threshold (default 0.90).")
        parser.add_argument("--device", help="auto (default), cpu or cuda.")
        parser.add_argument(
            "--class-balance", choices=["weights", "sampling"],
            help="Evening out an imbalanced set: a class-weighted loss (default) or batches sampled evenly by class.",
        )  # fmt: skip
        parser.add_argument("--config", type=Path, help="A YAML file with any of the options above.")
        parser.add_argument("--sweep", type=Path, help="A YAML sweep: method grid|random, trials, parameters.")
        parser.add_argument("--name", help="The version name to register (default: arch, date and hash).")
        parser.add_argument("--output", type=Path, help="Where to write the checkpoint (default under var/).")
        parser.add_argument("--activate", action="store_true", help="Promote the new model if its AUC is not lower.")
        parser.add_argument("--force", action="store_true", help="With --activate: promote even if its AUC is lower.")
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **options):
        yaml_values = self._read_yaml(options["config"]) if options["config"] else {}
        source = data_source(options, yaml_values)
        config = self._config(options)
        sweep = self._read_yaml(options["sweep"]) if options["sweep"] else None
        output = options["output"] or Path(settings.VAR_DIR) / "training" / f"{timezone.now():%Y%m%d-%H%M%S}.pt"
        try:
            report = train_and_register(
                data_dir=source, config=config, output=output, version=options["name"],
                activate=options["activate"], force=options["force"], sweep=sweep,
                progress=not options["no_progress"], log=self.stdout.write,
            )  # fmt: skip
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from None
        except KeyboardInterrupt:
            raise CommandError("Interrupted before the first epoch finished; nothing was saved.") from None
        self._write_evaluation(report)
        self._write_outcome(report, activate=options["activate"])

    def _config(self, options: dict):
        """The TrainConfig: the command's defaults, overridden by --config FILE.yaml, overridden by the options."""
        values = self._read_yaml(options["config"]) if options["config"] else {}
        unknown = set(values) - set(OPTION_FIELDS) - {"pretrained"} - CONFIG_KEYS
        if unknown:
            raise CommandError(f"Unknown keys in {options['config']}: {sorted(unknown)}.")
        for option in OPTION_FIELDS:
            if options.get(option) is not None:
                values[option] = options[option]
        if options["pretrained"]:
            values["pretrained"] = True
        config = training.train_config(arch="resnet18", input_size=224, epochs=20, batch_size=32, lr=1e-3, patience=4)
        changes = {OPTION_FIELDS[key]: value for key, value in values.items() if key in OPTION_FIELDS}
        if "pretrained_weights" in changes:
            path = Path(changes["pretrained_weights"])
            if not path.is_file():
                raise CommandError(f"--pretrained-weights: {path} is not a file.")
            changes["pretrained_weights"] = str(path)
        changes["download_pretrained"] = bool(values.get("pretrained"))
        try:
            config = dataclasses.replace(config, **changes)
        except TypeError as exc:
            raise CommandError(str(exc)) from None
        self._validate(config)
        return config

    def _write_evaluation(self, report) -> None:
        """The test metrics (all, and without near-duplicates of training images) and the skipped files."""
        evaluation = report.evaluation
        leakage = evaluation["leakage"]
        self.stdout.write("")
        self.stdout.write(
            f"Leakage check: {leakage['near_duplicates_in_train']} of {leakage['test_images']} test images have a "
            "near-duplicate in the training folder."
        )
        self.stdout.write(
            training.metrics_table(
                {"test (all)": evaluation["test"], "test (de-duplicated)": evaluation["test_deduplicated"]}
            )
        )
        for line in training.report_lines(evaluation):
            self.stdout.write(line)
        if report.skipped:
            self.stdout.write(f"Skipped {len(report.skipped)} unreadable file(s):")
            for path, reason in report.skipped[:20]:
                self.stdout.write(f"  {path}: {reason}")

    def _write_outcome(self, report, *, activate: bool) -> None:
        """What became of the model: interrupted (and how to register it), registered, activated or not."""
        if report.interrupted:
            self.stdout.write(
                self.style.WARNING(
                    f"Training was interrupted. The best checkpoint so far is at {report.checkpoint_path}; "
                    f"register it with: python manage.py register_model {report.checkpoint_path}"
                )
            )
            return
        version = report.model_version
        self.stdout.write(self.style.SUCCESS(f"Registered {version.version} (checkpoint {report.checkpoint_path})."))
        card = Path(report.checkpoint_path).with_suffix(".card.md")
        try:
            card.write_text(model_card(version))
            self.stdout.write(f"Model card: {card} (also: python manage.py model_card {version.version}).")
        except OSError as exc:
            warning = f"Could not write the model card to {card} ({exc}); manage.py model_card {version.version}."
            self.stdout.write(self.style.WARNING(warning))
        if report.activation_refused:
            self.stdout.write(self.style.WARNING(f"Not activated: {report.activation_refused}"))
        elif activate:
            self.stdout.write(self.style.SUCCESS(f"{version.version} is now active."))

    def _read_yaml(self, path: Path) -> dict:
        return read_config(path)

    def _validate(self, config) -> None:
        known = training.architectures()
        if config.arch not in known:
            raise CommandError(f"Unknown architecture {config.arch!r}; choose one of {', '.join(known)}.")
        for name in ("epochs", "batch_size", "input_size", "patience"):
            if getattr(config, name) < 1:
                raise CommandError(f"{name} must be at least 1.")
        if config.input_size < 32:
            raise CommandError("--image-size must be at least 32.")
        if not 0 < config.lr < 1:
            raise CommandError("--lr must lie between 0 and 1.")
        if not 0 < config.target_sensitivity <= 1:
            raise CommandError("--target-sensitivity must lie in (0, 1].")
