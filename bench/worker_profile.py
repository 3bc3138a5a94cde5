"""Where a worker's CPU goes, per image, outside the model: cProfile with a CPU-time clock around the
worker's own `process_images`, on batches of queued uploads, in one process.

    .venv/bin/python bench/worker_profile.py [--images 128] [--batch 16] [--top 25]

Torch runs on --torch-threads threads (1, as each child of the two-process worker of the best
throughput configuration: no OpenMP threads spinning in the profile). Uses a fresh database
`melanoma_profile` on the local PostgreSQL and var/profile/, webapp.settings.prod, resnet18 at 224 px
with random weights, the photos of bench/throughput.py. Uploads go through the
service's own submit_image (no HTTP); each batch is one call of process_images, as a task runs it. Prints
the CPU milliseconds per image of the functions that matter (inclusive), the forward pass among them,
so the rest can be compared with it. The clock is the whole process's CPU time, so what other threads
(decoding, torch's) spend meanwhile counts towards the function running; cProfile's own overhead
inflates Python-heavy code. The database server's CPU is not counted (bench/throughput.py does that).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "melanoma_profile"
WATCH = (
    "process_images", "run", "claim_images", "claim_oldest_queued", "active_model_version", "_prepare_all",
    "predict_with_gradcam_tensors", "resnet_features", "record_batch", "record_predictions", "record_gradcams",
    "record_upload_features_many", "image_features", "request_automatic_explanations_many", "enqueue_render",
    "enqueue_explanation", "send_task", "save", "execute", "_launch", "_finish", "_read_and_prepare", "result",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--torch-threads", type=int, default=1, help="1: as each of two prefork children")
    parser.add_argument("--callees", nargs="*", default=[], help="also print what these functions call")
    parser.add_argument("--clock", choices=("process", "thread"), default="process",
                        help="thread: the task's own thread only (the decode threads and the device thread, "
                        "which run the photos and the model, are left out)")  # fmt: skip
    args = parser.parse_args()
    out = ROOT / "var" / "profile"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "webapp.settings.prod", "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "localhost", "SECURE_SSL_REDIRECT": "false", "MEDIA_ROOT": str(out / "media"),
        "VAR_DIR": str(out), "MODEL_CACHE_DIR": str(out / "model-cache"),
        "AUTO_EXPLAIN_METHODS": os.environ.get("AUTO_EXPLAIN_METHODS", "none"),
        "LOG_LEVEL": "WARNING", "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DATABASE}",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/6", "CACHE_URL": "redis://127.0.0.1:6379/6",
    })  # fmt: skip
    subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", DATABASE], check=True)
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", DATABASE], check=True)
    subprocess.run(["redis-cli", "-n", "6", "flushdb"], check=True, capture_output=True)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    import torch

    from bench.throughput import make_photos
    from diagnosis.models import Clinic
    from diagnosis.services.clinics import create_clinician
    from diagnosis.services.images import submit_image
    from diagnosis.services.predictions import process_images
    from diagnosis.services.registry import register_model
    from mlcore.model import CheckpointMeta, build_model, checkpoint_bytes

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    meta = CheckpointMeta(arch="resnet18", input_size=224)
    register_model(checkpoint=checkpoint_bytes(build_model("resnet18").eval(), meta), version="profile", activate=True)
    clinic = Clinic.objects.create(name="Profile clinic")
    user = create_clinician(clinic=clinic, username="profile", password=None)
    photos = make_photos(32)

    def upload(count: int) -> list[str]:
        return [str(submit_image(uploader=user, clinic=clinic, via="bench",
                                 upload=SimpleUploadedFile("p.jpg", photos[i % len(photos)], "image/jpeg")).pk)
                for i in range(count)]  # fmt: skip

    process_images(image_ids=upload(args.batch)[:1], worker_id="warm:0", gather=args.batch - 1)  # warm-up
    ids = upload(args.images)
    profiler = cProfile.Profile(time.thread_time if args.clock == "thread" else time.process_time)
    started, cpu_started = time.perf_counter(), time.process_time()
    done = 0
    profiler.enable()
    for start in range(0, len(ids), args.batch):
        outcomes = process_images(image_ids=[ids[start]], worker_id=f"profile:{start}", gather=args.batch - 1)
        done += sum(1 for outcome in outcomes.values() if outcome == "done")
    profiler.disable()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"{done} images in batches of {args.batch}: {wall / done * 1000:.1f} ms wall, {cpu / done * 1000:.1f} CPU-ms "
          f"per image (this process, every thread)")  # fmt: skip
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        if name in WATCH and ("diagnosis" in filename or "mlcore" in filename or name in ("send_task", "execute")
                              and ("celery" in filename or "django/db/backends/utils" in filename)
                              or name == "save" and "storage" in filename):  # fmt: skip
            rows.append((cumulative / done * 1000, f"{Path(filename).parent.name}/{Path(filename).name}:{name}"))
    print("CPU-ms per image, inclusive (the process's CPU time while each ran):")
    for milliseconds, where in sorted(rows, reverse=True)[: args.top]:
        print(f"  {milliseconds:7.2f}  {where}")

    for name in args.callees:
        print(f"\nwhat {name} calls (cumulative seconds over all {done} images):")
        stats.sort_stats("cumulative").print_callees(f"\\b{name}\\b")


if __name__ == "__main__":
    main()
