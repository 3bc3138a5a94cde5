"""Ctrl-C during `train_model` keeps the best checkpoint so far, evaluated, and registers nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_ctrl_c_leaves_the_best_checkpoint_and_registers_nothing(tmp_path):
    from mlcore.data import write_image_folder
    from mlcore.model import load_checkpoint

    data = write_image_folder(tmp_path / "data", splits={"train": 120, "test": 40}, size=64, seed=5)
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "webapp.settings.dev", "VAR_DIR": str(tmp_path / "var"),
                "PYTHONUNBUFFERED": "1"})  # fmt: skip
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=120)
    output = tmp_path / "best.pt"
    process = subprocess.Popen(
        [sys.executable, "manage.py", "train_model", "--data", str(data), "--arch", "resnet_tiny",
         "--image-size", "48", "--epochs", "500", "--patience", "500", "--no-progress", "--output", str(output)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("epoch 2/500"):
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0, "".join(lines)
    text = "".join(lines)
    assert "Training was interrupted. The best checkpoint so far is at" in text
    assert "AUC 95% CI" in text  # the best epoch was still evaluated on the test set
    model, meta = load_checkpoint(output)
    assert meta.training["interrupted"] is True
    assert len(meta.training["history"]) < 500
    assert "test" in meta.metrics
    with sqlite3.connect(tmp_path / "var" / "db.sqlite3") as database:
        assert database.execute("select count(*) from diagnosis_modelversion").fetchone() == (0,)
        assert database.execute("select status from diagnosis_trainingrun").fetchall() == [("interrupted",)]
