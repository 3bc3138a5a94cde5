"""manage.py backup and manage.py restore of 1,000 photos with their explanations (issue 22), timed on
PostgreSQL with local files. The rows and files are made directly (the ORM, and default_storage under the
names the services use), not through the workers: photo-like 1528x1360 JPEGs, each with a Grad-CAM and an
Integrated Gradients explanation (overlay JPEG, heatmap PNG, attribution .npy, drawn by mlcore.heatmap as
the workers draw them), a prediction, drift features, feedback and audit events, plus one model's weights.

    .venv/bin/python bench/backup.py [--images 1000]

Its own database (BENCH_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/melanoma_bench_backup) is
dropped and created afresh, its files live in a temporary folder, and both commands run as an operator runs
them (`manage.py ...` in a process of their own, so the times include Django's start). Between the two, the
database's tables and the media folder are deleted: the restore starts from an empty database.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATABASE_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/melanoma_bench_backup")
MEDIA_ROOT = tempfile.mkdtemp(prefix="bench-backup-media-")
os.environ.update({"DJANGO_SETTINGS_MODULE": "webapp.settings.test", "DATABASE_URL": DATABASE_URL,
                   "MEDIA_ROOT": MEDIA_ROOT})  # fmt: skip
DISTINCT_PHOTOS = 25  # distinct photos, cycled: the copy's cost is in the bytes, not in their content


def fresh_database(*, create: bool = True) -> None:
    """Drop the bench's database, and create it empty."""
    import psycopg

    url = urlparse(DATABASE_URL)
    name = url.path.lstrip("/")
    with psycopg.connect(host=url.hostname, port=url.port or 5432, user=url.username, password=url.password,
                         dbname="postgres", autocommit=True) as admin:  # fmt: skip
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if create:
            admin.execute(f'CREATE DATABASE "{name}"')


def explanation_files(photo: bytes) -> dict[str, dict[str, bytes]]:
    """Per method, the three files the workers store: overlay, heatmap and attribution."""
    import numpy as np

    from mlcore.heatmap import attribution_npy, render, upsample_bilinear
    from mlcore.preprocessing import decode_image

    image = decode_image(photo, max_side=1024).image
    rng = np.random.default_rng(0)
    cam = upsample_bilinear(rng.random((7, 7)).astype(np.float32), 224)  # a 7x7 feature map, as Grad-CAM's
    ig = rng.normal(0, 0.01, (3, 224, 224)).astype(np.float32)  # pixel-level and noisy, as IG's
    files = {}
    for method, raw, label in (("gradcam", cam, "Grad-CAM"), ("integrated_gradients", ig, "Integrated Gradients")):
        attribution = raw if raw.ndim == 2 else raw.sum(axis=0)
        overlay, heatmap = render(image, attribution, signed=True, smooth=method != "gradcam", method_label=label,
                                  target_class="malignant")  # fmt: skip
        files[method] = {"overlay": overlay, "heatmap": heatmap, "attribution": attribution_npy(raw)}
    return files


def populate(count: int) -> dict[str, int]:
    """`count` done photos with everything a worker and a clinician leave behind; returns the sizes."""
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from bench.inprocess import make_photos
    from diagnosis import models
    from tests.factories import ClinicFactory, ClinicianFactory, LesionFactory, PatientFactory

    photos = make_photos(DISTINCT_PHOTOS)
    drawn = explanation_files(photos[0])
    weights = os.urandom(45 * 1024 * 1024)  # a ResNet-18 checkpoint's size
    version = models.ModelVersion.objects.create(
        version="bench-backup", arch="resnet18", input_size=224, class_names=["benign", "malignant"], threshold=0.5,
        weights=default_storage.save("models/bench-backup.pt", ContentFile(weights)), weights_sha256="0" * 64,
        is_active=True,
    )  # fmt: skip
    clinic = ClinicFactory(name="Bench clinic")
    user = ClinicianFactory(membership__clinic=clinic)
    lesion = LesionFactory(patient=PatientFactory(clinic=clinic))
    images, predictions, explanations, features, feedback, audit = [], [], [], [], [], []
    for index in range(count):
        photo = photos[index % len(photos)]
        image = models.LesionImage(
            clinic=clinic, lesion=lesion, uploaded_by=user, content_type="image/jpeg", sha256=f"{index:064x}",
            width=1528, height=1360, file_size=len(photo), state=models.ImageState.DONE, attempts=1,
            file=default_storage.save(f"images/{uuid.uuid4().hex}.jpg", ContentFile(photo)),
        )  # fmt: skip
        images.append(image)
        predictions.append(models.Prediction(image=image, model_version=version, probability_malignant=0.3,
                                             label="benign", threshold=0.5, probabilities={"benign": 0.7}))  # fmt: skip
        for method, files in drawn.items():
            folder = f"explanations/{uuid.uuid4().hex}"
            stored = {
                kind: default_storage.save(f"{folder}/{kind}.{extension}", ContentFile(files[kind]))
                for kind, extension in (("overlay", "jpg"), ("heatmap", "png"), ("attribution", "npy"))
            }
            explanations.append(models.Explanation(
                image=image, model_version=version, method=method, params_key=uuid.uuid4().hex, target_index=1,
                target_class="malignant", state=models.Explanation.State.DONE, **stored,
            ))  # fmt: skip
        features.append(models.UploadFeatures(image=image, model_version=version, values={"brightness": 120.0}))
        feedback.append(models.Feedback(image=image, kind="assessment", agrees=True, recorded_by=user))
        audit.append(models.AuditEvent(
            actor=user, actor_username=user.username, clinic=clinic, via="api", action="upload_image",
            object_type="image", object_id=str(image.pk),
        ))  # fmt: skip
    for model, rows in ((models.LesionImage, images), (models.Prediction, predictions),
                        (models.Explanation, explanations), (models.UploadFeatures, features),
                        (models.Feedback, feedback), (models.AuditEvent, audit)):  # fmt: skip
        model.objects.bulk_create(rows, batch_size=500)
    per_image = len(photos[0]) + sum(len(data) for files in drawn.values() for data in files.values())
    return {"files": 1 + 7 * count, "mean_photo": sum(map(len, photos)) // len(photos), "per_image": per_image}


def manage(*args: str) -> tuple[float, str]:
    """Run a command as an operator does; its seconds and its output, each line stamped with the seconds
    since the start at which it was printed (the stages of the command)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=os.environ.copy(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines = [f"  {time.perf_counter() - started:5.1f} s  {line.rstrip()}" for line in process.stdout]
    seconds = time.perf_counter() - started
    if process.wait() != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n" + "\n".join(lines))
    return seconds, "\n".join(lines)


def wipe() -> None:
    """Every table dropped (an empty database) and the media folder emptied."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        tables = [row[0] for row in cursor.fetchall()]
        cursor.execute("DROP TABLE " + ", ".join(f'"{table}"' for table in tables) + " CASCADE")
    connection.close()
    shutil.rmtree(MEDIA_ROOT)
    os.mkdir(MEDIA_ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    options = parser.parse_args()
    fresh_database()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from diagnosis.services.backup_database import live_counts

    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    sizes = populate(options.images)
    rows = live_counts()
    print(f"made {options.images:,} photos ({sizes['mean_photo'] / 1e6:.2f} MB each; {sizes['per_image'] / 1e6:.2f} MB "
          f"per photo with its explanations), {sizes['files']:,} files and {sum(rows.values()):,} rows in "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    backups = Path(tempfile.mkdtemp(prefix="bench-backup-archive-"))
    try:
        backup_s, output = manage("backup", str(backups), "--no-progress")
        print(f"manage.py backup:\n{output}")
        archive = next(backups.glob("backup-*.tar"))
        wipe()
        restore_s, output = manage("restore", str(archive), "--no-requeue", "--no-progress")
        print(f"manage.py restore:\n{output}")
        assert live_counts() == rows, "the restored database differs"
        print(f"archive {archive.stat().st_size / 1e9:.2f} GB; backup {backup_s:.1f} s, restore {restore_s:.1f} s "
              f"(each with manage.py's start)")  # fmt: skip
    finally:
        shutil.rmtree(backups, ignore_errors=True)
        shutil.rmtree(MEDIA_ROOT, ignore_errors=True)
        connection.close()
        fresh_database(create=False)  # leave no bench database behind


if __name__ == "__main__":
    main()
