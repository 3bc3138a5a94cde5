"""A worker's CPU per image outside the decode and the forward pass, for this checkout and, side by
side in the same run, for another commit (the code before a change):

    .venv/bin/python bench/worker_overhead.py [--against 4063c30] [--images 256] [--batch 16] [--rounds 3]

For each code tree, in a fresh process with its own database (`melanoma_overhead` on the local
PostgreSQL) and Redis db 7: N photos are uploaded through the service's own submit_image, then the
worker's process_images runs on them as inference tasks do (its own image plus gathered ones, again
until none is queued), with torch on one thread (as each child of the two-process worker). The
process's CPU time over that loop, per image, is T. In the same process, the same photos are decoded
and preprocessed exactly as the worker does (mlcore.preprocessing.decode_image in draft mode, then
to_tensor): D; and the model runs them in batches of --batch with Grad-CAM and embeddings: F. What the
worker spends outside the decode and the forward pass is T - D - F: claims, reading files, recording
rows, messages, drift features. The CPU of the task's own thread alone (claims, records; in the old
code also the model and the drift features) is printed beside it. Automatic Integrated Gradients is
on (its messages are published; no explain worker runs). The database and Redis servers' CPU is not
counted. Rounds alternate the trees.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "melanoma_overhead"


def measure(tree: Path, images: int, batch: int) -> dict:
    """Runs in a child process whose sys.path starts with `tree`."""
    out = Path(tempfile.mkdtemp(prefix="overhead-"))
    os.environ.update({
        "DJANGO_SETTINGS_MODULE": "webapp.settings.prod", "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "localhost", "SECURE_SSL_REDIRECT": "false", "MEDIA_ROOT": str(out / "media"),
        "VAR_DIR": str(out), "MODEL_CACHE_DIR": str(out / "model-cache"), "LOG_LEVEL": "WARNING",
        "AUTO_EXPLAIN_METHODS": "integrated_gradients", "INFERENCE_BATCH_SIZE": str(batch),
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DATABASE}", "INFERENCE_WARMUP": "false",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/7", "CACHE_URL": "redis://127.0.0.1:6379/7",
    })  # fmt: skip
    subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", DATABASE], check=True)
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", DATABASE], check=True)
    subprocess.run(["redis-cli", "-n", "7", "flushdb"], check=True, capture_output=True)
    import django

    django.setup()
    import torch
    from django.conf import settings
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.core.management import call_command

    from diagnosis.models import Clinic, ImageState, LesionImage
    from diagnosis.services.clinics import create_clinician
    from diagnosis.services.images import submit_image
    from diagnosis.services.predictions import process_images
    from diagnosis.services.registry import register_model
    from mlcore.inference import Predictor, decode_side
    from mlcore.model import CheckpointMeta, build_model, checkpoint_bytes
    from mlcore.preprocessing import decode_image, to_tensor

    call_command("migrate", verbosity=0)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    meta = CheckpointMeta(arch="resnet18", input_size=224)
    model = build_model("resnet18").eval()
    register_model(checkpoint=checkpoint_bytes(model, meta), version="overhead", activate=True)
    clinic = Clinic.objects.create(name="Overhead clinic")
    user = create_clinician(clinic=clinic, username="overhead", password=None)
    sys.path.insert(0, str(ROOT / "bench"))
    photos = _photos(16)

    def upload(count: int) -> list[str]:
        return [str(submit_image(uploader=user, clinic=clinic, via="bench",
                                 upload=SimpleUploadedFile("p.jpg", photos[i % len(photos)], "image/jpeg")).pk)
                for i in range(count)]  # fmt: skip

    def drain(tag: str) -> int:
        done = 0
        while True:
            waiting = LesionImage.objects.filter(state=ImageState.QUEUED).order_by("enqueued_at").first()
            if waiting is None:
                return done
            outcomes = process_images(image_ids=[str(waiting.pk)], worker_id=f"{tag}:{done}", gather=batch - 1)
            done += sum(1 for outcome in outcomes.values() if outcome == "done")

    upload(batch * 2)
    drain("warm")  # loads the model, the code paths, the connections
    upload(images)
    cpu, own_thread = time.process_time(), time.thread_time()
    done = drain("run")
    total = (time.process_time() - cpu) / done * 1000
    task_thread = (time.thread_time() - own_thread) / done * 1000

    predictor = Predictor(model, meta, device="cpu")
    side = decode_side(meta.input_size)
    data = [photos[i % len(photos)] for i in range(images)]
    cpu = time.process_time()
    tensors = [to_tensor(decode_image(item, max_bytes=settings.MAX_UPLOAD_BYTES, max_pixels=settings.MAX_IMAGE_PIXELS,
                                      max_side=side, copy_pixels=False).image, predictor.spec)
               for item in data]  # fmt: skip
    decode = (time.process_time() - cpu) / images * 1000
    cpu = time.process_time()
    for start in range(0, images, batch):
        predictor.predict_with_gradcam_tensors(torch.stack(tensors[start : start + batch]), embeddings=True)
    forward = (time.process_time() - cpu) / images * 1000
    shutil.rmtree(out, ignore_errors=True)
    return {"images": done, "total": total, "decode": decode, "forward": forward,
            "outside": total - decode - forward, "task_thread": task_thread}  # fmt: skip


def _photos(count: int) -> list[bytes]:
    from throughput import make_photos  # bench/throughput.py's photo-like JPEGs (1528x1360)

    return make_photos(count)


def run_tree(tree: Path, images: int, batch: int) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[2]); "
            "from worker_overhead import measure; from pathlib import Path; "
            "print('RESULT', json.dumps(measure(Path(sys.argv[1]), int(sys.argv[3]), int(sys.argv[4]))))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, str(tree), str(ROOT / "bench"), str(images), str(batch)],
                            cwd=tree, capture_output=True, text=True, check=False)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise SystemExit(f"{tree}: failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default="4063c30", help="the commit to compare with ('' for none)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"this checkout": ROOT}
    worktree = None
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="overhead-tree-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.against],
                       check=True, capture_output=True)  # fmt: skip
        trees = {args.against: worktree, **trees}
    try:
        results: dict[str, list[dict]] = {name: [] for name in trees}
        for round_number in range(args.rounds):
            for name, tree in trees.items():
                result = run_tree(tree, args.images, args.batch)
                results[name].append(result)
                print(f"round {round_number + 1} {name:>14}: total {result['total']:6.1f}  decode "
                      f"{result['decode']:5.1f}  forward {result['forward']:6.1f}  outside {result['outside']:5.1f}  "
                      f"(the task's own thread {result['task_thread']:5.1f}) CPU-ms per image", flush=True)  # fmt: skip
        print("\nmedians (CPU-ms per image):")
        for name, rows in results.items():
            keys = ("total", "decode", "forward", "outside", "task_thread")
            medians = {key: statistics.median(row[key] for row in rows) for key in keys}
            print(f"  {name:>14}: total {medians['total']:.1f}, decode {medians['decode']:.1f}, forward "
                  f"{medians['forward']:.1f}, outside {medians['outside']:.1f}, the task's own thread "
                  f"{medians['task_thread']:.1f}")  # fmt: skip
        if len(results) == 2:
            before, after = (statistics.median(row["outside"] for row in rows) for rows in results.values())
            print(f"\noutside the decode and the forward pass: {after:.1f} / {before:.1f} = {after / before:.2f}x")
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)],
                           capture_output=True)  # fmt: skip


if __name__ == "__main__":
    main()
