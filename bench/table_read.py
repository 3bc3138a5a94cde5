"""Time reading and splitting a metadata CSV of HAM10000's size (issue 21's goal: under 5 s for 10,000 rows).

Writes a HAM10000-layout CSV (about 1.4 photos per lesion, as the published set) and one tiny file per image,
spread over the two HAM10000_images_part_ folders, in a temporary folder; then times mlcore.tables'
read_table, group_ids and group_split, best of --repeats runs. The files are one byte each: the reader
checks that each exists and never decodes it, so their content does not matter.

    .venv/bin/python bench/table_read.py --rows 10000
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlcore.tables import FORMATS, group_ids, group_split, read_table

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
SHARES = (0.033, 0.051, 0.11, 0.011, 0.111, 0.669, 0.015)  # HAM10000's class mix


def write_layout(root: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images = root / "images"
    parts = [images / "HAM10000_images_part_1", images / "HAM10000_images_part_2"]
    for part in parts:
        part.mkdir(parents=True)
    csv_path = root / "HAM10000_metadata.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        lesion, photos_left, dx = 0, 0, CLASSES[0]
        for i in range(rows):
            if photos_left == 0:
                lesion, photos_left = lesion + 1, int(rng.choice([1, 2, 3, 4], p=[0.75, 0.15, 0.07, 0.03]))
                dx = str(rng.choice(CLASSES, p=SHARES))
            photos_left -= 1
            image_id = f"ISIC_{24306 + i:07d}"
            age = "" if rng.random() < 0.005 else str(int(rng.integers(1, 18)) * 5)
            writer.writerow([f"HAM_{lesion:07d}", image_id, dx, "histo", age, "male", "back"])
            (parts[i * 2 // rows] / f"{image_id}.jpg").write_bytes(b"\xff")
    return csv_path, images


def timed(repeats: int, call):
    """(first run's seconds, best run's seconds, the result)."""
    timings, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        timings.append(time.perf_counter() - start)
    return timings[0], min(timings), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        csv_path, images = write_layout(Path(folder), args.rows)
        read = timed(args.repeats, lambda: read_table(csv_path, images, FORMATS["ham10000"]))
        table = read[2]
        grouping = timed(args.repeats, lambda: group_ids(table.records))
        groups, labels = grouping[2], table.labels
        split = timed(args.repeats, lambda: group_split(labels, groups, 0.2, seed=0))
    held = split[2][1]
    print(f"{len(table.records):,} rows, {groups.max() + 1:,} lesion groups, {len(table.class_names)} classes; "
          f"held out {len(held):,} images ({len(held) / len(labels):.1%}); {args.repeats} runs:")  # fmt: skip
    print(f"  {'':12} {'first':>9} {'best':>9}")
    for name, (first, best, _) in (("read_table", read), ("group_ids", grouping), ("group_split", split)):
        print(f"  {name:12} {first * 1000:6.1f} ms {best * 1000:6.1f} ms")
    total_first, total_best = read[0] + grouping[0] + split[0], read[1] + grouping[1] + split[1]
    print(f"  {'total':12} {total_first * 1000:6.1f} ms {total_best * 1000:6.1f} ms  (goal: under 5,000 ms)")


if __name__ == "__main__":
    main()
