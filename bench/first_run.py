"""Issue 22's first-run goals: how long `make run` takes to its banner on a fresh var/, to a registered demo
model and to a scored demo patient, and how long a second start takes to its banner.

    .venv/bin/python bench/first_run.py [--keep VAR_DIR]

The install is not measured here: run it first (`make install`), so that `make run` finds its stamp. Each
start is the real `make run` in its own session, stopped as a terminal's Ctrl-C stops it (SIGINT to its whole
process group), with VAR_DIR set to a fresh temporary folder and PORT to a free port. The timings:

- banner: from `make run`'s start to the banner ("Press Ctrl-C to stop.");
- model registered: to rundemo's line saying the demo model is registered and active;
- demo patient scored: to the API (with the banner's token) listing the demo patient's photos all done;
- second start: `make run` again on the same var/ (the model present), to its banner.

It also checks that neither start reinstalled anything (`make -q` on the install stamp before and after),
prints a report and writes it to bench/results/first-run.txt (bench/README.md, "First run (issue 22)").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "first-run.txt"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install_up_to_date() -> bool:
    """`make -q` on the base install's stamp: True when `make run` would install nothing."""
    return subprocess.run(["make", "-q", ".venv/.installed-base"], cwd=ROOT).returncode == 0


class Start:
    """One `make run`, in its own session so that Ctrl-C can go to its whole process group."""

    def __init__(self, var_dir: Path, log: Path) -> None:
        self.port, self.log = free_port(), log
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "MEDIA_ROOT", "MODEL_CACHE_DIR", "STATIC_ROOT")
        }
        env.update({"VAR_DIR": str(var_dir), "PORT": str(self.port), "PYTHONUNBUFFERED": "1"})
        self.started = time.monotonic()
        with open(log, "wb") as out:
            self.process = subprocess.Popen(["make", "run"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, predicate, timeout: float, what: str) -> float:
        """Seconds from the start until predicate() holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return time.monotonic() - self.started
            if self.process.poll() is not None:
                raise SystemExit(f"`make run` stopped (exit {self.process.returncode}) before {what}:\n{self.text()}")
            time.sleep(0.1)
        raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.text()[-3000:]}")

    def scored(self) -> bool:
        token = re.search(r"API token:\s+(mlt_\w+)", self.text()).group(1)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v1/images/",
                                         headers={"Authorization": f"Token {token}"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            images = json.load(response)["results"]
        return len(images) == 4 and all(image["state"] == "done" for image in images)

    def ctrl_c(self) -> float:
        """SIGINT to the whole process group, as a terminal sends it; the seconds until `make run` ended."""
        stopping = time.monotonic()
        os.killpg(self.process.pid, signal.SIGINT)
        returncode = self.process.wait(timeout=120)
        # make itself dies of the SIGINT once rundemo has stopped (exit -2, "make: *** [run] Interrupt").
        if returncode not in (0, -signal.SIGINT) or "Stopped." not in self.text():
            raise SystemExit(f"`make run` did not stop cleanly (exit {returncode}):\n{self.text()[-3000:]}")
        return time.monotonic() - stopping


def measure(var_dir: Path, logs: Path) -> dict:
    figures = {"install_up_to_date_before": install_up_to_date(), "load_before": os.getloadavg()[0]}
    first = Start(var_dir, logs / "first.log")
    figures["banner_s"] = first.wait_for(lambda: "Press Ctrl-C" in first.text(), 300, "the banner")
    figures["banner_said_training"] = "training in the background" in first.text()
    figures["registered_s"] = first.wait_for(lambda: "registered and active" in first.text(), 900, "the model")
    figures["scored_s"] = first.wait_for(first.scored, 300, "the demo patient's photos to be scored")
    status = json.loads((var_dir / "demo-training.json").read_text())
    figures["training"] = {key: status.get(key) for key in ("state", "epochs_seconds", "finished_seconds")}
    print(f"first start: {figures}", flush=True)
    figures["first_stop_s"] = first.ctrl_c()
    second = Start(var_dir, logs / "second.log")
    figures["second_banner_s"] = second.wait_for(lambda: "Press Ctrl-C" in second.text(), 300, "the second banner")
    figures["second_trained"] = "training in the background" in second.text()
    figures["second_stop_s"] = second.ctrl_c()
    figures["install_up_to_date_after"] = install_up_to_date()
    figures["reinstalled"] = any("pip install" in start.text() for start in (first, second))
    figures["training_log"] = (var_dir / "log" / "training.log").read_text().splitlines()
    return figures


def report(figures: dict) -> str:
    epochs = [line for line in figures["training_log"] if line.startswith("epoch ")]
    lines = [
        f"First run (issue 22), {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
        f"load average {figures['load_before']:.2f} before",
        f"  install up to date before / after:        {figures['install_up_to_date_before']} / "
        f"{figures['install_up_to_date_after']} (pip ran: {figures['reinstalled']})",
        f"  first start, `make run` to the banner:    {figures['banner_s']:.1f} s "
        f"(banner said training in the background: {figures['banner_said_training']})",
        f"  first start, to a registered demo model:  {figures['registered_s']:.1f} s (training process: "
        f"{figures['training']['epochs_seconds']} s of epochs, {figures['training']['finished_seconds']} s with the "
        "evaluation and registration, from the end of the data preparation)",
        f"  first start, demo patient scored:         {figures['scored_s']:.1f} s",
        f"  first start, Ctrl-C to stopped:           {figures['first_stop_s']:.1f} s",
        f"  second start, `make run` to the banner:   {figures['second_banner_s']:.1f} s "
        f"(trained again: {figures['second_trained']})",
        f"  second start, Ctrl-C to stopped:          {figures['second_stop_s']:.1f} s",
        "  training log's epochs:",
        *(f"    {line}" for line in epochs),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Use (and keep) this var/ instead of a temporary one.")
    args = parser.parse_args()
    if not install_up_to_date():
        sys.exit("Run `make install` first: this measures `make run` after the install.")
    with tempfile.TemporaryDirectory(prefix="first-run-") as temporary:
        var_dir = args.keep or Path(temporary) / "var"
        if var_dir.exists() and any(var_dir.iterdir()):
            sys.exit(f"{var_dir} is not empty: the first start needs a fresh var/.")
        text = report(measure(var_dir, Path(temporary)))
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
