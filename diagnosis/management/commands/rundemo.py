"""`make run`: prepare the embedded default and run the web server and one worker until Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from diagnosis.models import ApiToken
from diagnosis.services.demo import DemoTraining, ensure_demo_accounts, ensure_demo_model, ensure_demo_patient
from diagnosis.services.registry import active_model_version
from diagnosis.services.tokens import create_api_token


class Command(BaseCommand):
    help = "Migrate, create the demo clinic, users, model and token, then run the web server and a worker."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--arch", default="resnet18", help="Demo model architecture (when none is active).")
        parser.add_argument("--input-size", type=int, default=128)
        parser.add_argument("--train-images", type=int, default=1200)
        parser.add_argument("--test-images", type=int, default=300)
        parser.add_argument("--epochs", type=int, default=4)
        parser.add_argument("--no-serve", action="store_true", help="Prepare everything, then exit.")

    def handle(self, *args, **options):
        var_dir = Path(settings.VAR_DIR)
        log_dir = var_dir / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=0)

        clinician_password = os.environ.get("DEMO_PASSWORD", "demo-clinician")
        admin_password = os.environ.get("DEMO_ADMIN_PASSWORD", "demo-admin")
        clinic, clinician, _ = ensure_demo_accounts(
            clinician_password=clinician_password, admin_password=admin_password
        )
        training = DemoTraining(
            arch=options["arch"],
            input_size=options["input_size"],
            train_images=options["train_images"],
            test_images=options["test_images"],
            epochs=options["epochs"],
        )
        if active_model_version() is None:
            self.stdout.write(
                f"No model is registered: training a demo {training.arch} on {training.train_images} synthetic "
                f"lesions at {training.input_size} px ({training.epochs} epochs; a few minutes on 2 CPU cores)..."
            )
        model_version, trained = ensure_demo_model(training=training, progress=True, log=self.stdout.write)
        if trained:
            test = model_version.metrics.get("test", {})
            self.stdout.write(
                f"Registered {model_version.version}: test AUC {test.get('auc', float('nan')):.3f}, "
                f"sensitivity {test.get('sensitivity', float('nan')):.2f} at threshold {model_version.threshold:.3f} "
                "(set on validation for 90% sensitivity). Plots and metrics: admin > Model versions."
            )
        ensure_demo_patient(clinic=clinic, clinician=clinician, log=self.stdout.write)
        # Tokens are stored hashed, so a run cannot show an old one: replace the demo token each time.
        ApiToken.objects.filter(user=clinician, name="demo").delete()
        _, token = create_api_token(user=clinician, name="demo", via="cli")

        url = f"http://{options['host']}:{options['port']}"
        if options["no_serve"]:
            self._banner(url, clinician_password, admin_password, token, model_version.version, log_dir)
            return
        self._serve(url, options, log_dir, clinician_password, admin_password, token, model_version.version)

    def _serve(self, url, options, log_dir, clinician_password, admin_password, token, version):
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "webapp.settings.dev"),
            "CELERY_WORKER_CONCURRENCY": "1",
            "PYTHONUNBUFFERED": "1",
        }
        manage = str(Path(settings.BASE_DIR) / "manage.py")
        schedule = str(Path(settings.VAR_DIR) / "celerybeat-schedule")
        commands = {
            "worker.log": [sys.executable, "-m", "celery", "-A", "webapp", "worker", "--beat", "--schedule", schedule,
                           "-Q", "inference,explain,default", "--concurrency", "1", "--loglevel", "INFO",
                           "--hostname", "demo@%h"],
            "web.log": [sys.executable, manage, "runserver", f"{options['host']}:{options['port']}", "--noreload",
                        "--skip-checks"],
        }  # fmt: skip
        logs = [open(log_dir / name, "ab") for name in commands]  # noqa: SIM115 - closed in finally
        processes: list[subprocess.Popen] = []
        try:
            for command, log in zip(commands.values(), logs, strict=True):
                processes.append(
                    subprocess.Popen(command, cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
                )
            self._wait_for_web(url, processes, log_dir)
            self._banner(url, clinician_password, admin_password, token, version, log_dir)
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
            while all(process.poll() is None for process in processes):
                time.sleep(0.5)
            failed = [p for p in processes if p.poll() is not None]
            raise CommandError(
                f"A process stopped unexpectedly (exit {failed[0].returncode}); see {log_dir}/worker.log and web.log."
            )
        except KeyboardInterrupt:
            self.stdout.write("\nStopping the web server and the worker...")
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            for process in processes:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            for log in logs:
                log.close()
        self.stdout.write("Stopped.")

    def _wait_for_web(self, url, processes, log_dir, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in processes):
                raise CommandError(f"The web server or the worker failed to start; see {log_dir}.")
            try:
                with urllib.request.urlopen(url + "/", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        raise CommandError(f"The web server did not answer on {url} within {timeout:.0f} s; see {log_dir}/web.log.")

    def _banner(self, url, clinician_password, admin_password, token, version, log_dir) -> None:
        lines = [
            "",
            "Lesion triage is running (decision support, not a diagnosis).",
            f"  Portal:     {url}/   (sign in as the clinician; patient DEMO-0001 has sample photos)",
            f"  API docs:   {url}/api/docs/",
            f"  Clinician:  demo / {clinician_password}",
            f"  Admin:      admin / {admin_password}   ({url}/admin/)",
            f"  API token:  {token}",
            f"  Model:      {version}",
            f"  Logs:       {log_dir}/web.log, {log_dir}/worker.log",
            "",
            "Try it:",
            f'  curl -H "Authorization: Token {token}" -F image=@lesion.jpg {url}/api/v1/images/',
            "",
            "Press Ctrl-C to stop.",
        ]
        self.stdout.write("\n".join(lines))
        self.stdout.flush()
