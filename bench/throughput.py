"""Throughput, latency and memory of the whole system, side by side with the model's own ceiling.

    .venv/bin/python bench/throughput.py                      # everything below, resnet18 at 224 px
    .venv/bin/python bench/throughput.py --images 1000 --clients 8 --latency-uploads 50 --skip-embedded

One run measures, on the same JPEGs (1528x1360, photo-like, about 0.7 MB each) and the same cores:

1. Ceiling: in this process, decode and preprocess (DECODE_THREADS threads, the worker's own
   decode_image in draft mode) then batched forward passes, not overlapped. Images/s.
2. In-process single image: decode plus forward at batch 1 (the latency floor), in this process.
3. Idle latency: LATENCY_UPLOADS sequential uploads through the API (gunicorn, PostgreSQL, Redis, one
   real worker), each waited for before the next: upload row created -> prediction stored, and ->
   Grad-CAM stored, from the database's own timestamps (the client's polling does not count). Between
   two uploads, while the system idles, the same photo goes through the in-process floor three times
   (after 0.1 s idle, then back to back: the third counts), and the CPU the system's processes used
   meanwhile is reported: the ratio compares the two through the same minutes of this shared
   machine's noise, which moves either figure by 10-20% from one minute to the next.
4. System throughput: CLIENTS concurrent API clients (keep-alive connections, bodies encoded once)
   upload IMAGES photos, one per request or FILES_PER_REQUEST through the batch API, ROUNDS times;
   the worker gathers queued images into batches. Images/s from the first upload row to the last
   prediction stored, and the CPU each part of the system used per image.
5. Memory: resident and peak memory (VmRSS, VmHWM) of every web and worker process after half of the
   images and after all of them.
6. The embedded default (`make run`'s SQLite, filesystem broker, runserver): idle latency again.

Uses a fresh database `melanoma_bench`, Redis database 7, and var/bench/. The model is a freshly
initialised ResNet (weights do not change its speed). Automatic explanations are off: in production IG
runs on its own worker, for which this 2-core machine has no room (bench/explain_bench.py measures it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.inprocess import InProcess, make_photos  # make_photos: also bench.throughput's, for other scripts
from bench.system import ROOT, Stack, idle_latency, print_memory, throughput

__all__ = ["main", "make_photos"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--latency-uploads", type=int, default=50)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--worker-concurrency", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: every core / worker concurrency")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--queues", default="inference,default",
                        help="the worker's queues: with default it also draws the Grad-CAM pictures")  # fmt: skip
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--coalesce", type=int, default=None,
                        help="INFERENCE_COALESCE_MESSAGES for the system (0: a message per upload)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="throughput runs, one after the other, each reported")
    parser.add_argument("--files-per-request", type=int, default=1,
                        help="above 1: clients use the batch API, this many photos per request")  # fmt: skip
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch_threads = args.torch_threads or max(1, cores // args.worker_concurrency)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings.test")

    photos = make_photos(32)
    print(f"{len(photos)} JPEGs of 1528x1360, {np.mean([len(p) for p in photos]) / 1e6:.2f} MB each on average; "
          f"{cores} cores; {args.arch} at {args.input_size} px")  # fmt: skip
    decode_threads = int(os.environ.get("DECODE_THREADS", "2"))
    reference = InProcess(arch=args.arch, input_size=args.input_size, threads=decode_threads)
    ceiling_before = reference.ceiling(photos, images=256, batch=args.batch)
    print(f"ceiling: {ceiling_before['images_per_s']:.1f} images/s (decode+preprocess "
          f"{ceiling_before['decode_ms']:.1f} ms/image on {decode_threads} threads, forward "
          f"{ceiling_before['forward_ms']:.1f} ms/image at batch {args.batch}); in-process single image "
          f"{ceiling_before['single_ms']:.1f} ms")  # fmt: skip

    coalesce = {} if args.coalesce is None else {"INFERENCE_COALESCE_MESSAGES": str(args.coalesce)}
    stack = Stack(out=ROOT / "var" / "bench" / "system", embedded=False, port=args.port,
                  worker_concurrency=args.worker_concurrency, torch_threads=torch_threads,
                  web_workers=args.web_workers, arch=args.arch, input_size=args.input_size, queues=args.queues,
                  extra_env=coalesce)  # fmt: skip
    try:
        latency = idle_latency(stack, photos, args.latency_uploads, reference)
        rounds = [throughput(stack, photos, args.images, args.clients, args.files_per_request)
                  for _ in range(args.rounds)]  # fmt: skip
        system = rounds[-1]
    finally:
        stack.stop()
    ceiling_after = reference.ceiling(photos, images=256, batch=args.batch)
    ceiling_rate = (ceiling_before["images_per_s"] + ceiling_after["images_per_s"]) / 2
    single_ms = (ceiling_before["single_ms"] + ceiling_after["single_ms"]) / 2

    print(f"\nceiling again after the system run: {ceiling_after['images_per_s']:.1f} images/s; mean of both "
          f"{ceiling_rate:.1f}; single image back to back {single_ms:.1f} ms")  # fmt: skip
    warm, cold = latency["single_warm_ms"], latency["single_cold_ms"]
    print(f"idle latency over {args.latency_uploads} sequential uploads (Redis broker, PostgreSQL): prediction stored "
          f"p50 {latency['prediction_p50']:.0f} ms, p95 {latency['prediction_p95']:.0f} ms; Grad-CAM stored p50 "
          f"{latency['gradcam_p50']:.0f} ms, p95 {latency['gradcam_p95']:.0f} ms")  # fmt: skip
    print(f"  in-process single image between the uploads: {warm:.1f} ms back to back (the third in a row), "
          f"{cold:.1f} ms after 0.1 s idle like each upload; the system's processes used "
          f"{latency['system_cpu_during_reference'] * 1000:.0f} CPU-ms during those "
          f"{latency['reference_seconds']:.1f} s")  # fmt: skip
    print(f"  p50 / in-process single image (back to back, between the uploads) = "
          f"{latency['prediction_p50'] / warm:.2f}x (goal <= 1.5x); / the idle one = "
          f"{latency['prediction_p50'] / cold:.2f}x; / the back-to-back one of the ceiling runs = "
          f"{latency['prediction_p50'] / single_ms:.2f}x")  # fmt: skip
    how = "single uploads" if args.files_per_request == 1 else f"the batch API, {args.files_per_request} per request"
    for number, result in enumerate(rounds, 1):
        print(f"system throughput{f' (round {number})' if len(rounds) > 1 else ''}: {result['images']} images from "
              f"{args.clients} clients ({how}) in {result['seconds']:.1f} s = {result['images_per_s']:.1f} images/s; "
              f"/ ceiling = {result['images_per_s'] / ceiling_rate:.2f}x (goal >= 0.8x); worker queues {args.queues}, "
              f"concurrency {args.worker_concurrency}, torch threads {torch_threads}, gunicorn workers "
              f"{args.web_workers}")  # fmt: skip
    if len(rounds) > 1:
        ratios = sorted(result["images_per_s"] / ceiling_rate for result in rounds)
        print(f"  median of {len(rounds)} rounds: {statistics.median(ratios):.2f}x; the memory and CPU below are "
              "the last round's")  # fmt: skip
    print_memory(system["memory"])
    total = sum(system["cpu"].values())
    print(f"\nCPU seconds during the throughput run ({system['wall']:.0f} s of wall time, {cores} cores = "
          f"{system['wall'] * cores:.0f} CPU-s available):")  # fmt: skip
    for name, seconds in sorted(system["cpu"].items(), key=lambda item: -item[1]):
        print(f"  {name}: {seconds:.1f} CPU-s ({seconds / max(total, 1e-9):.0%}), "
              f"{seconds / system['images'] * 1000:.1f} ms per image")  # fmt: skip

    if not args.skip_embedded:
        embedded = Stack(out=ROOT / "var" / "bench" / "embedded", embedded=True, port=args.port + 1,
                         worker_concurrency=1, torch_threads=cores, web_workers=1, arch=args.arch,
                         input_size=args.input_size, queues="inference,default")  # fmt: skip
        try:
            latency = idle_latency(embedded, photos, min(args.latency_uploads, 30))
        finally:
            embedded.stop()
        print(f"\nembedded default (SQLite, filesystem broker, runserver): prediction stored p50 "
              f"{latency['prediction_p50']:.0f} ms, p95 {latency['prediction_p95']:.0f} ms; Grad-CAM stored p50 "
              f"{latency['gradcam_p50']:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
