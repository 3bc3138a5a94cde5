"""The portal's photo previews: drawing one (read the stored photo, decode it in draft mode, turn it
upright, resize, encode a JPEG) against reading the copy kept by the first request
(diagnosis/services/previews.py), side by side on the same photos.

    .venv/bin/python bench/previews.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import make_photos
from mlcore.heatmap import DISPLAY_MAX_SIDE, display_jpeg

SIDES = {"thumb": 240, "display": DISPLAY_MAX_SIDE}


def draw(path: Path, side: int) -> bytes:
    """What the portal does for a preview not kept yet (diagnosis/services/previews.py)."""
    return display_jpeg(path.read_bytes(), side, quality=85 if side == 240 else 90)


def main() -> None:
    photos = make_photos(12)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, data in enumerate(photos):
            paths.append(Path(folder) / f"photo-{index}.jpg")
            paths[-1].write_bytes(data)
        print(f"{len(photos)} JPEGs of 1528x1360, {statistics.mean(len(p) for p in photos) / 1e6:.2f} MB each")
        for size, side in SIDES.items():
            kept = []
            for path in paths:
                kept.append(path.with_suffix(f".{size}.jpg"))
                kept[-1].write_bytes(draw(path, side))
            drawn_ms, read_ms = [], []
            for _ in range(5):  # interleaved, so both see the same machine
                for path, copy in zip(paths, kept, strict=True):
                    started = time.perf_counter()
                    draw(path, side)
                    drawn_ms.append((time.perf_counter() - started) * 1000)
                    started = time.perf_counter()
                    copy.read_bytes()
                    read_ms.append((time.perf_counter() - started) * 1000)
            drawn, read = statistics.median(drawn_ms), statistics.median(read_ms)
            print(f"{size} ({side} px, {statistics.mean(p.stat().st_size for p in kept) / 1e3:.0f} KB): drawn "
                  f"{drawn:.2f} ms, kept copy read {read:.3f} ms, {drawn / read:.0f}x")  # fmt: skip


if __name__ == "__main__":
    main()
