"""`make run`: prepare the embedded default and run the web server and one worker until Ctrl-C.

Serve first, train in the background: the web server and the worker start at once, and the banner is
printed as soon as the portal answers. When no model is active, the demo model trains meanwhile in its own
process (`manage.py train_demo`, its log in var/log/training.log, its progress on every portal page).
Photos uploaded meanwhile, the demo patient's too, wait in the queue and are scored once it is registered.
"""

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
from diagnosis.services.demo_training import clear_stale_status, read_status, training_running
from diagnosis.services.registry import active_model_version
from diagnosis.services.tokens import create_api_token

STOP_SECONDS = 20  # how long the processes get to stop on Ctrl-C before they are killed


def _raise_interrupt(*_):
    raise KeyboardInterrupt()


def _command_of(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _parent_of(pid: int) -> int | None:
    try:
        # /proc/PID/stat: "pid (name) state ppid ..."; the name may hold spaces, so split after its ")".
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class Command(BaseCommand):
    help = (
        "Migrate, create the demo clinic, users and token, then run the web server and a worker; trains the demo "
        "model in the background when none is active."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--arch", default="resnet18", help="Demo model architecture (when none is active).")
        parser.add_argument("--input-size", type=int, default=128)
        parser.add_argument("--train-images", type=int, default=1200)
        parser.add_argument("--test-images", type=int, default=300)
        parser.add_argument("--epochs", type=int, default=4)
        parser.add_argument(
            "--no-serve", action="store_true", help="Prepare everything (training the model first), then exit."
        )

    def handle(self, *args, **options):
        log_dir = Path(settings.VAR_DIR) / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=0)
        self._stop_orphan_training()
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
        # Tokens are stored hashed, so a run cannot show an old one: replace the demo token each time.
        ApiToken.objects.filter(user=clinician, name="demo").delete()
        _, token = create_api_token(user=clinician, name="demo", via="cli")
        banner = {"url": f"http://{options['host']}:{options['port']}", "clinician_password": clinician_password,
                  "admin_password": admin_password, "token": token, "log_dir": log_dir}  # fmt: skip

        def seed():
            ensure_demo_patient(clinic=clinic, clinician=clinician, log=self.stdout.write)

        if options["no_serve"]:
            model_version, _ = ensure_demo_model(training=training, progress=True, log=self.stdout.write)
            seed()
            self._banner(model=model_version.version, **banner)
            return
        self._serve(options, training, banner, seed)

    def _serve(self, options, training: DemoTraining, banner: dict, seed) -> None:
        log_dir = banner["log_dir"]
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
        model = active_model_version()
        logs = []
        processes: dict[str, subprocess.Popen] = {}
        signal.signal(signal.SIGTERM, _raise_interrupt)
        # Even when started with SIGINT ignored (in the background of a script), Ctrl-C stops everything.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            for name, command in commands.items():
                logs.append(open(log_dir / name, "ab"))  # noqa: SIM115 - closed in finally
                processes[name] = subprocess.Popen(command, cwd=settings.BASE_DIR, env=env, stdout=logs[-1],
                                                   stderr=subprocess.STDOUT)  # fmt: skip
            if model is None:
                # At once, beside the web server's start. Its own session: a Ctrl-C in the terminal reaches only
                # this command, which stops it with SIGTERM (train_demo then stops at once, where SIGINT would
                # finish the best epoch first).
                logs.append(open(log_dir / "training.log", "ab"))  # noqa: SIM115 - closed in finally
                processes["training.log"] = subprocess.Popen(
                    [sys.executable, manage, "train_demo", *self._training_options(training)], cwd=settings.BASE_DIR,
                    env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            seed()  # while the web server and the worker start: its photos wait in the queue for the worker
            self._wait_for_web(banner["url"], [processes["worker.log"], processes["web.log"]], log_dir)
            self._banner(model=model.version if model else None, training=training, **banner)
            self._watch(processes, log_dir)
        except KeyboardInterrupt:
            self.stdout.write("\nStopping the web server and the worker...")
        finally:
            self._stop(processes)
            for log in logs:
                log.close()
        self.stdout.write("Stopped.")

    @staticmethod
    def _training_options(training: DemoTraining) -> list[str]:
        return ["--arch", training.arch, "--input-size", str(training.input_size), "--train-images",
                str(training.train_images), "--test-images", str(training.test_images), "--epochs",
                str(training.epochs)]  # fmt: skip

    def _watch(self, processes: dict[str, subprocess.Popen], log_dir: Path) -> None:
        """Until Ctrl-C: report the end of the demo training; stop if the web server or the worker stops."""
        while True:
            for name in ("worker.log", "web.log"):
                if processes[name].poll() is not None:
                    raise CommandError(
                        f"A process stopped unexpectedly (exit {processes[name].returncode}); see {log_dir}/{name}."
                    )
            training = processes.get("training.log")
            if training is not None and training.poll() is not None:
                self._training_ended(training.returncode, log_dir)
                processes.pop("training.log")
            time.sleep(0.5)

    def _training_ended(self, returncode: int, log_dir: Path) -> None:
        model_version = active_model_version()
        if returncode == 0 and model_version is not None:
            test = model_version.metrics.get("test", {})
            self.stdout.write(
                f"Demo model {model_version.version} registered and active (test AUC "
                f"{test.get('auc', float('nan')):.3f}, sensitivity {test.get('sensitivity', float('nan')):.2f} at "
                f"threshold {model_version.threshold:.3f}, set on validation for 90% sensitivity): the waiting "
                "photos are being scored. Plots and metrics: admin > Model versions."
            )
        else:
            self.stdout.write(
                f"The demo model's training failed (exit {returncode}); see {log_dir}/training.log. The portal keeps "
                "running and uploads wait in the queue; stop and `make run` again to retry."
            )
        self.stdout.flush()

    def _stop(self, processes: dict[str, subprocess.Popen]) -> None:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for process in processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _stop_orphan_training(self) -> None:
        """A demo training left running by a `make run` that was killed (its own session outlives it) is
        stopped: this run starts its own. A status file that no live training owns is removed."""
        status = read_status()
        if training_running(status):
            pid = status["pid"]
            parent = _parent_of(pid)
            if parent is not None and b"rundemo" in _command_of(parent):
                raise CommandError(
                    f"Another `make run` (process {parent}) is running with {settings.VAR_DIR}: stop it first."
                )
            if b"train_demo" in _command_of(pid):
                self.stdout.write(f"Stopping the demo training left running by an earlier start (process {pid})...")
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + STOP_SECONDS
                while training_running() and time.monotonic() < deadline:
                    time.sleep(0.2)
        clear_stale_status()

    def _wait_for_web(self, url, processes, log_dir, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in processes):
                raise CommandError(f"The web server or the worker failed to start; see {log_dir}.")
            try:
                with urllib.request.urlopen(url + "/", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise CommandError(f"The web server did not answer on {url} within {timeout:.0f} s; see {log_dir}/web.log.")

    def _banner(self, *, url, clinician_password, admin_password, token, model, log_dir, training=None) -> None:
        if model is not None:
            model_line = f"  Model:      {model}"
            logs = f"{log_dir}/web.log, {log_dir}/worker.log"
        else:
            model_line = (
                f"  Model:      {training.version}, training in the background ({training.epochs} epochs; progress "
                "on the portal). Uploads wait and are scored once it is registered."
            )
            logs = f"{log_dir}/web.log, {log_dir}/worker.log, {log_dir}/training.log"
        lines = [
            "",
            "Lesion triage is running (decision support, not a diagnosis).",
            f"  Portal:     {url}/   (sign in as the clinician; patient DEMO-0001 has sample photos)",
            f"  API docs:   {url}/api/docs/",
            f"  Clinician:  demo / {clinician_password}",
            f"  Admin:      admin / {admin_password}   ({url}/admin/)",
            f"  API token:  {token}",
            model_line,
            f"  Logs:       {logs}",
            "",
            "Try it:",
            f'  curl -H "Authorization: Token {token}" -F image=@lesion.jpg {url}/api/v1/images/',
            "",
            "Press Ctrl-C to stop.",
        ]
        self.stdout.write("\n".join(lines))
        self.stdout.flush()
