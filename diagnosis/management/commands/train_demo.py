"""`manage.py train_demo`: train and register the demo model, in its own process, with its progress in
var/demo-training.json (the portal's notice) and its log on stdout. `make run` (rundemo) starts it in the
background when no model is active and stops it with SIGTERM on Ctrl-C."""

from __future__ import annotations

import signal

from django.core.management.base import BaseCommand, CommandError

from diagnosis.services.demo import DemoTraining
from diagnosis.services.demo_training import TrainingStopped, train_demo_model, training_running
from diagnosis.services.registry import active_model_version


def _stop(signum, frame):
    # Once: a second signal while the stop is being recorded must not interrupt that.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise TrainingStopped(signal.Signals(signum).name)


class Command(BaseCommand):
    help = "Train, register and activate the demo model on synthetic lesions, unless a model is active."

    def add_arguments(self, parser):
        parser.add_argument("--arch", default="resnet18")
        parser.add_argument("--input-size", type=int, default=128)
        parser.add_argument("--train-images", type=int, default=1200)
        parser.add_argument("--test-images", type=int, default=300)
        parser.add_argument("--epochs", type=int, default=4)

    def handle(self, *args, **options):
        existing = active_model_version()
        if existing is not None:
            self.stdout.write(f"A model is active ({existing.version}): nothing to train.")
            return
        if training_running():
            raise CommandError("Another demo training is running (var/demo-training.json names its process).")
        training = DemoTraining(arch=options["arch"], input_size=options["input_size"],
                                train_images=options["train_images"], test_images=options["test_images"],
                                epochs=options["epochs"])  # fmt: skip
        self.stdout.write(
            f"Training a demo {training.arch} on {training.train_images} synthetic lesions at {training.input_size} "
            f"px ({training.epochs} epochs) in the background; uploads wait and are scored once it is registered."
        )
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            model_version = train_demo_model(training, write_line=self.stdout.write)
        except TrainingStopped as stop:
            self.stdout.write(f"Demo training stopped ({stop}); no model was activated. The next start trains again.")
            return
        test = model_version.metrics.get("test", {})
        self.stdout.write(
            f"Registered and activated {model_version.version}: test AUC {test.get('auc', float('nan')):.3f}, "
            f"sensitivity {test.get('sensitivity', float('nan')):.2f} at threshold {model_version.threshold:.3f}."
        )
