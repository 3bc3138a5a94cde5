"""Issue 21's goals on synthetic data: a planted skin-tone gap exposed by the subgroup report, the ITA band
accuracy, the time to read and split a 10,000-row metadata CSV, and no lesion or patient on both sides of a
split.

    nice .venv/bin/python bench/subgroups.py [--seed 0] [--train-dark-lesions 20]

Everything is made here, in one run, with no downloads and no Django (2-3 minutes on 2 cores):

1. **The planted gap.** Three HAM10000-layout sets from mlcore.synthetic_sets.write_ham10000, balanced over
   the seven diagnoses, read together as one table (one metadata CSV, images found under one folder): for
   training, TRAIN_LIGHT_LESIONS lesions of patients with skin ITA in TRAIN_LIGHT_ITA and a few
   (--train-dark-lesions) in TRAIN_DARK_ITA, mostly light skin as in the public sets; and a held-out test set
   with ITA uniform over TEST_ITA, half of it brown or dark, given as an official list of test ids
   (TableSource(test_ids=...)). So the test's skin-tone mix is shifted from training's. The model
   (resnet_tiny) is trained and evaluated by the product's own pipeline (mlcore.pipeline: prepare_data,
   train_candidate, finalize), whose evaluation holds the subgroup report (bands from the measured ITA).
   Twice, with one seed: with faint_on_dark = PLANTED (malignant features fainter on skin of ITA < 10°) and,
   as the control, with faint_on_dark = 0. Everything else (patients, lesions, poses, training seed) is the
   same, so what differs between the two runs' tables is the planted effect's doing.
2. **ITA band accuracy.** mlcore.skintone.measure_skin_tone on each photo of a fresh HAM10000-mix set with ITA
   across all six bands, against the generator's truth (synthetic_truth.csv): the band of the tone as
   photographed (photo_ita, which includes the photo's exposure) and the patient's band (ita_band); and
   the bands the pipeline itself stored for the planted run's test photos (those of the subgroup table).
3. **Reading and splitting 10,000 rows.** bench/table_read.py's layout and steps (read_table, group_ids,
   group_split), best of 5.
4. **Leakage.** An ISIC-archive-layout set (patient and lesion ids): lesions and patients found on both sides
   of group_split's split, and of the pipeline's validation split inside it, against a naive random split of
   the images, over SPLIT_SEEDS seeds.

It prints a plain-text report and writes it to bench/results/subgroups.txt (bench/README.md, "Subgroups, skin
tone and grouped splits (issue 21)", says what the figures mean).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.table_read import timed, write_layout  # noqa: E402
from mlcore.pipeline import VALIDATION_FRACTION, finalize, prepare_data, train_candidate  # noqa: E402
from mlcore.skintone import BAND_SLUGS, band_of, measure_skin_tone  # noqa: E402
from mlcore.sources import table_source  # noqa: E402
from mlcore.subgroups import format_subgroup_table  # noqa: E402
from mlcore.synthetic_sets import HAM10000_COLUMNS, write_ham10000, write_isic_archive  # noqa: E402
from mlcore.tables import FORMATS, group_ids, group_overlap, group_split, read_table  # noqa: E402
from mlcore.train import TrainConfig  # noqa: E402

PHOTO_SIZE = 96  # the written photos' side, px
INPUT_SIZE = 64  # the model's input
# 2-4 photos a lesion. Training: many patients of light skin and a few of dark (as the public sets); test:
# every tone alike, so half its photos are of the brown and dark bands (ITA < 10), where faint_on_dark acts.
TRAIN_LIGHT_LESIONS, TRAIN_DARK_LESIONS, TEST_LESIONS = 380, 20, 300
TRAIN_LIGHT_ITA, TRAIN_DARK_ITA, TEST_ITA = (10.0, 70.0), (-50.0, 10.0), (-50.0, 70.0)
PLANTED = 0.8  # faint_on_dark of the planted run; the control's is 0
EPOCHS = 8
ITA_LESIONS = 200  # the ITA check's set
ARCHIVE_LESIONS = 400  # the leakage check's set
SPLIT_SEEDS = 20
FIRST_IMAGE = {"train_light": 24306, "train_dark": 24306 + 50_000, "test": 24306 + 100_000}  # ids apart


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write_shifted_sets(root: Path, faint: float, seed: int, dark_lesions: int) -> tuple[Path, Path, dict]:
    """The training sets (light skin, and `dark_lesions` lesions of dark skin) and the test set under root/,
    one metadata CSV for all, and the test ids as an official test list: (metadata CSV, test ids CSV, each
    set's truth rows by name)."""
    plan = {"train_light": (TRAIN_LIGHT_LESIONS, seed, TRAIN_LIGHT_ITA), "test": (TEST_LESIONS, seed + 1, TEST_ITA)}
    if dark_lesions:
        plan["train_dark"] = (dark_lesions, seed + 2, TRAIN_DARK_ITA)
    rows, truth = {}, {}
    for name, (lesions, set_seed, (low, high)) in plan.items():
        write_ham10000(root / name, lesions=lesions, size=PHOTO_SIZE, seed=set_seed, faint_on_dark=faint,
                       balanced=True, ita_low=low, ita_high=high, first_image=FIRST_IMAGE[name])  # fmt: skip
        rows[name] = _read_csv(root / name / "HAM10000_metadata.csv")
        truth[name] = _read_csv(root / name / "synthetic_truth.csv")
    lesion_ids = [{row["lesion_id"] for row in set_rows} for set_rows in rows.values()]
    if sum(map(len, lesion_ids)) != len(set().union(*lesion_ids)):
        raise RuntimeError("two of the synthetic sets drew a common lesion id; choose another --seed")
    metadata = root / "HAM10000_metadata.csv"
    with metadata.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(HAM10000_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(row for set_rows in rows.values() for row in set_rows)
    test_ids = root / "test_ids.csv"
    test_ids.write_text("image_id\n" + "".join(f"{row['image_id']}\n" for row in rows["test"]))
    return metadata, test_ids, truth


def train_and_evaluate(faint: float, seed: int, dark_lesions: int, log) -> dict:
    """One run of the planted-gap experiment through the product's pipeline: its subgroup report, its test
    metrics, the validation split's group overlap and how each test photo's band was stored."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="subgroups-") as folder:
        root = Path(folder)
        metadata, test_ids, truth = write_shifted_sets(root, faint, seed, dark_lesions)
        source = table_source(metadata, root, format="ham10000", test_ids=test_ids)
        prepared = prepare_data(source, image_size=INPUT_SIZE, seed=seed, progress=False, log=lambda _: None)
        config = TrainConfig(arch="resnet_tiny", input_size=INPUT_SIZE, epochs=EPOCHS, seed=seed, lr=2e-3,
                             patience=EPOCHS, device="cpu")  # fmt: skip
        result = train_candidate(prepared, config, progress=False, log=lambda _: None)
        outcome = finalize(prepared, result, started=started)
    truth_rows = {row["image_id"]: row for rows in truth.values() for row in rows}
    test = prepared.data.test.items
    stored = [(item.skin["band"] if item.skin else None, truth_rows[item.record.image_id]) for item in test]
    validation = group_overlap([i.record for i in prepared.train.items], [i.record for i in prepared.validation.items])
    training = prepared.train.items + prepared.validation.items
    mix = {name: Counter(truth_rows[item.record.image_id]["ita_band"] for item in items)
           for name, items in (("training", training), ("test", test))}  # fmt: skip
    log(f"  faint_on_dark {faint}: {len(prepared.train.items)} training, {len(prepared.validation.items)} validation,"
        f" {len(test)} test photos; {time.perf_counter() - started:.0f} s")  # fmt: skip
    return {
        "faint": faint, "dark_lesions": dark_lesions, "subgroups": outcome.evaluation["subgroups"],
        "test": outcome.evaluation["test"], "leakage": outcome.evaluation["leakage"]["groups"],
        "validation_overlap": validation, "threshold": outcome.meta.threshold, "stored_bands": stored,
        "seconds": time.perf_counter() - started, "mix": mix,
        "sizes": (len(prepared.train.items), len(prepared.validation.items), len(test)),
    }  # fmt: skip


def _cell(value, interval) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} [{interval[0]:.2f}–{interval[1]:.2f}]" if interval else f"{value:.2f}"


def _difference(a: dict, b: dict, key: str) -> str:
    return "—" if a[key] is None or b[key] is None else f"{a[key] - b[key]:+.2f}"


def side_by_side(planted: dict, control: dict) -> list[str]:
    """Per skin-tone band: cases and positives (planted/control where they differ: a band is measured on each
    run's own photos), sensitivity, AUC and specificity of the planted run and of the control, their
    differences, and each band's sensitivity minus the overall one in either run (what the alert compares)."""
    runs = (planted["subgroups"], control["subgroups"])
    rows = [("band", "n", "pos.", "sens. planted", "sens. control", "AUC planted", "AUC control", "spec. planted",
             "spec. control", "Δ sens.", "Δ AUC", "sens.-overall planted", "sens.-overall control")]  # fmt: skip
    by_group = [{row["group"]: row for row in run["attributes"]["skin_tone"]} for run in runs]
    for name in ["overall", *[name for name in by_group[0] if name in by_group[1]]]:
        a, b = (run["overall"] if name == "overall" else group[name] for run, group in zip(runs, by_group, strict=True))
        counts = [str(a[key]) if a[key] == b[key] else f"{a[key]}/{b[key]}" for key in ("n", "n_positive")]
        overall = ["—", "—"] if name == "overall" else [_difference(r, run["overall"], "sensitivity")
                                                       for r, run in ((a, runs[0]), (b, runs[1]))]  # fmt: skip
        rows.append((name, counts[0] + ("*" if a["too_small"] else ""), counts[1],
                     _cell(a["sensitivity"], a["sensitivity_ci"]), _cell(b["sensitivity"], b["sensitivity_ci"]),
                     _cell(a["auc"], a["auc_ci"]), _cell(b["auc"], b["auc_ci"]),
                     _cell(a["specificity"], a["specificity_ci"]), _cell(b["specificity"], b["specificity_ci"]),
                     _difference(a, b, "sensitivity"), _difference(a, b, "auc"), *overall))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def _gaps(run: dict) -> list[str]:
    gaps = run["subgroups"]["gaps"]
    if not gaps:
        return ["  none (no group with >= 20 positives more than 10 points below the overall sensitivity)"]
    return [f"  {g['attribute']}={g['group']}: sensitivity {g['sensitivity']:.3f} [{g['sensitivity_ci'][0]:.3f}–"
            f"{g['sensitivity_ci'][1]:.3f}] against {g['overall_sensitivity']:.3f} overall, gap {g['gap']:.3f} "
            f"({g['n_positive']} positives of {g['n']})" for g in gaps]  # fmt: skip


def _skin_only(report: dict) -> dict:
    return {**report, "attributes": {"skin_tone": report["attributes"]["skin_tone"]}}


def gap_section(planted: dict, control: dict) -> list[str]:
    mix = planted["mix"]
    shares = "; ".join(
        f"{name} " + ", ".join(f"{band} {mix[name][band] / sum(mix[name].values()):.0%}" for band in BAND_SLUGS)
        for name in ("training", "test")
    )
    lines = [f"1. The planted gap: faint_on_dark {PLANTED} against 0 (the control), all else the same",
             f"   training: {TRAIN_LIGHT_LESIONS} lesions of skin ITA {TRAIN_LIGHT_ITA[0]:g}..{TRAIN_LIGHT_ITA[1]:g}"
             " and "
             f"{planted['dark_lesions']} of {TRAIN_DARK_ITA[0]:g}..{TRAIN_DARK_ITA[1]:g}; test (official test ids): "
             f"{TEST_LESIONS} lesions of {TEST_ITA[0]:g}..{TEST_ITA[1]:g}",
             f"   photos per true band: {shares}",
             f"   resnet_tiny, {INPUT_SIZE} px input ({PHOTO_SIZE} px photos), {EPOCHS} epochs, balanced 7 diagnoses; "
             f"training/validation/test photos {planted['sizes'][0]}/{planted['sizes'][1]}/{planted['sizes'][2]}",
             ""]  # fmt: skip
    for name, run in (("planted", planted), ("control", control)):
        test = run["test"]
        diagnoses = test.get("diagnoses", {})
        low, high = test["auc_ci95"]
        lines.append(f"   {name}: malignant AUC {test['auc']:.3f} [{low:.3f}–{high:.3f}], sensitivity "
                     f"{test['sensitivity']:.3f}, specificity {test['specificity']:.3f} at threshold "
                     f"{run['threshold']:.3f}; balanced accuracy (7 classes) "
                     f"{diagnoses.get('balanced_accuracy', 0):.3f}; {run['seconds']:.0f} s")  # fmt: skip
    lines += ["", "Side by side by skin tone (measured ITA band; 95% CI: AUC bootstrap, sensitivity/specificity Wilson;"
              " * too few to judge):", *side_by_side(planted, control), ""]  # fmt: skip
    for name, run in (("planted", planted), ("control", control)):
        lines += [
            f"Sensitivity gaps found, {name} run (mlcore.subgroups.sensitivity_gaps, all attributes):",
            *_gaps(run),
        ]
    lines += ["", "The planted run's subgroup table as the evaluation report prints it (skin tone):",
              format_subgroup_table(_skin_only(planted["subgroups"])), "",
              "The control run's:", format_subgroup_table(_skin_only(control["subgroups"]))]  # fmt: skip
    return lines


def _confusion(pairs: list[tuple[str | None, str]], against: str) -> list[str]:
    """Accuracy per true band and overall, and the confusion table (rows: truth, columns: measured)."""
    columns = [*BAND_SLUGS, "none"]
    corner = "true \\ measured"
    header = f"{corner:<16}" + "".join(f"{c:>13}" for c in columns) + f"{'accuracy':>11}"
    lines = [f"   against {against}:", "   " + header]
    for band in BAND_SLUGS:
        row = [measured for measured, truth in pairs if truth == band]
        counts = [sum((m or "none") == c for m in row) for c in columns]
        accuracy = f"{counts[BAND_SLUGS.index(band)] / len(row):.1%}" if row else "—"
        lines.append("   " + f"{band:<16}" + "".join(f"{c:>13}" for c in counts) + f"{accuracy:>11}")
    correct = sum(measured == truth for measured, truth in pairs)
    lines.append(f"   overall: {correct} of {len(pairs)} = {correct / len(pairs):.1%} (goal >= 90%)")
    return lines


def ita_section(seed: int, planted: dict) -> list[str]:
    """The ITA check on a fresh set, and on the bands the pipeline stored for the planted run's test photos."""
    with tempfile.TemporaryDirectory(prefix="subgroups-ita-") as folder:
        root = write_ham10000(Path(folder), lesions=ITA_LESIONS, size=PHOTO_SIZE, seed=seed + 2,
                              ita_low=TEST_ITA[0], ita_high=TEST_ITA[1])  # fmt: skip
        truth = _read_csv(root / "synthetic_truth.csv")
        measured = []
        for row in truth:
            path = next(root.glob(f"HAM10000_images_part_*/{row['image_id']}.jpg"))
            measured.append(measure_skin_tone(Image.open(path)))
    signed = [m["ita"] - float(r["photo_ita"]) for m, r in zip(measured, truth, strict=True) if m]
    errors = np.abs(signed)
    skin_errors = [abs(m["ita"] - float(r["skin_ita"])) for m, r in zip(measured, truth, strict=True) if m]
    bands = [m["band"] if m else None for m in measured]
    lines = [f"2. ITA band accuracy: measure_skin_tone on {len(truth)} photos ({ITA_LESIONS} lesions, HAM10000 mix, "
             f"{PHOTO_SIZE} px, patient ITA uniform in {TEST_ITA[0]:g}..{TEST_ITA[1]:g}); "
             f"{sum(m is None for m in measured)} photos with no tone measured",
             f"   mean absolute ITA error: {np.mean(errors):.2f}° against photo_ita (median "
             f"{np.median(errors):.2f}°, 95th percentile {np.percentile(errors, 95):.2f}°, mean signed error "
             f"{np.mean(signed):+.2f}°); "
             f"{np.mean(skin_errors):.2f}° against skin_ita"]  # fmt: skip
    lines += _confusion(list(zip(bands, [band_of(float(r["photo_ita"])) for r in truth], strict=True)),
                        "the band of photo_ita (the tone as photographed)")  # fmt: skip
    lines += _confusion(list(zip(bands, [r["ita_band"] for r in truth], strict=True)),
                        "ita_band (the patient's tone)")  # fmt: skip
    stored = planted["stored_bands"]
    lines += [
        "   The bands the pipeline stored for the planted run's test photos (the subgroup table's groups):",
        *_confusion([(band, band_of(float(r["photo_ita"]))) for band, r in stored], "the band of photo_ita")[1:],
    ]
    return lines


def table_section(rows: int = 10_000, repeats: int = 5) -> list[str]:
    """bench/table_read.py's measurement: read_table, group_ids and group_split on a 10,000-row HAM10000 CSV."""
    with tempfile.TemporaryDirectory(prefix="subgroups-table-") as folder:
        csv_path, images = write_layout(Path(folder), rows)
        read = timed(repeats, lambda: read_table(csv_path, images, FORMATS["ham10000"]))
        grouping = timed(repeats, lambda: group_ids(read[2].records))
        split = timed(repeats, lambda: group_split(read[2].labels, grouping[2], 0.2, seed=0))
    lines = [f"3. Reading and splitting a {rows:,}-row HAM10000 metadata CSV (bench/table_read.py's layout; "
             f"{grouping[2].max() + 1:,} lesions; first and best of {repeats}):"]  # fmt: skip
    for name, (first, best, _) in (("read_table", read), ("group_ids", grouping), ("group_split", split)):
        lines.append(f"   {name:12} {first * 1000:7.1f} ms {best * 1000:7.1f} ms")
    total = (read[0] + grouping[0] + split[0], read[1] + grouping[1] + split[1])
    lines.append(f"   {'total':12} {total[0] * 1000:7.1f} ms {total[1] * 1000:7.1f} ms   (goal: under 5,000 ms)")
    return lines


def _shared(records, kept, held) -> tuple[int, int, int, int]:
    """Lesions and patients on both sides, the held-out images that share one with the kept side, and the
    held-out images."""
    overlap = group_overlap([records[i] for i in kept], [records[i] for i in held])
    return overlap["lesions"]["shared"], overlap["patients"]["shared"], overlap["affected"], len(held)


def leakage_section(seed: int, planted: dict) -> list[str]:
    """Lesions and patients on both sides: group_split (and the validation split inside its training side, as
    prepare_data makes it) against a naive random split of the images, over SPLIT_SEEDS seeds."""
    with tempfile.TemporaryDirectory(prefix="subgroups-archive-") as folder:
        root = write_isic_archive(Path(folder), lesions=ARCHIVE_LESIONS, size=32, seed=seed + 3)
        table = read_table(root / "metadata.csv", root / "images", FORMATS["isic-archive"])
    records, labels = table.records, table.labels
    groups = group_ids(records)
    results = {"grouped test": [], "grouped validation": [], "naive random test": []}
    for split_seed in range(SPLIT_SEEDS):
        kept, held = group_split(labels, groups, 0.2, split_seed)
        results["grouped test"].append(_shared(records, kept, held))
        inner_kept, inner_held = group_split(labels[kept], groups[kept], VALIDATION_FRACTION, split_seed)
        results["grouped validation"].append(_shared(records, kept[inner_kept], kept[inner_held]))
        order = np.random.default_rng(split_seed).permutation(len(records))
        naive_held = order[: round(0.2 * len(records))]
        results["naive random test"].append(_shared(records, order[len(naive_held) :], naive_held))
    lesions = len({r.lesion_id for r in records})
    patients = len({r.patient_id for r in records})
    lines = [f"4. Leakage: ISIC archive layout, {len(records)} images of {lesions} lesions and {patients} patients "
             f"({len(table.skipped)} indeterminate rows skipped); 20% test split, {SPLIT_SEEDS} seeds",
             f"   {'split':<22}{'lesions on both sides':>24}{'patients on both sides':>26}"
             f"{'held-out images affected (mean)':>34}"]  # fmt: skip
    for name, values in results.items():
        array = np.array(values)
        cells = [f"mean {array[:, k].mean():.1f}, max {array[:, k].max()}" for k in range(3)]
        cells[2] = f"{array[:, 2].mean():.1f} of {array[:, 3].mean():.0f} ({array[:, 2].sum() / array[:, 3].sum():.0%})"
        lines.append(f"   {name:<22}{cells[0]:>24}{cells[1]:>26}{cells[2]:>34}")
    lines.append(f"   (the grouped validation split is taken from the grouped test split's training side, as "
                 f"prepare_data does, with {VALIDATION_FRACTION:.0%})")  # fmt: skip
    overlap, test_overlap = planted["validation_overlap"], planted["leakage"]
    lines.append(f"   The planted run's own pipeline (HAM10000 layout, lesion ids only): training/validation "
                 f"lesions on both sides {overlap['lesions']['shared']}; training/test "
                 f"{test_overlap['lesions']['shared'] if test_overlap else '—'}")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-dark-lesions", type=int, default=TRAIN_DARK_LESIONS,
        help="lesions of dark skin (ITA < 10) in training; 0: none, the test's dark skin unseen",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "subgroups.txt")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    planted = train_and_evaluate(PLANTED, args.seed, args.train_dark_lesions, print)
    control = train_and_evaluate(0.0, args.seed, args.train_dark_lesions, print)
    sections = [gap_section(planted, control), ita_section(args.seed, planted), table_section(),
                leakage_section(args.seed, planted)]  # fmt: skip
    command = f".venv/bin/python bench/subgroups.py --seed {args.seed} --train-dark-lesions {args.train_dark_lesions}"
    lines = [
        f"Subgroups, skin tone and grouped splits (issue 21): {command} ({time.strftime('%Y-%m-%d')}, "
        f"{time.perf_counter() - started:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads)"
    ]
    for section in sections:
        lines += ["", *section]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
