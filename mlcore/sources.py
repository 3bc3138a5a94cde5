"""Where labelled images come from: an image folder (the Kaggle melanoma set's train|test/<class>/ layout, as
before) or a metadata table (HAM10000, the ISIC archive, ISIC 2020, an in-house CSV; mlcore.tables).

A table's test set is either the user's own official list of ids (`test_ids`), used as is, or carved out by
mlcore.tables.group_split: whole lesions and patients, stratified by label and seeded. Either way the
training side is later split for validation the same way (mlcore.pipeline.prepare_data), so that no lesion
and no patient is on both sides of any split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import tables
from .datasets import DataError, ImageFolderData, LoadedSplit, load_files, load_image_folder
from .preprocessing import DEFAULT_MAX_PIXELS

TEST_SEED_OFFSET = 7919  # the test split's seed is the run's plus this, as for an image folder
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class TableSource:
    """A metadata CSV, the folder its images are under, how to read it, and optionally a CSV of test ids."""

    metadata: Path
    images: Path
    mapping: tables.ColumnMapping
    test_ids: Path | None = None

    def describe(self) -> str:
        return f"{self.metadata} (images under {self.images})"

    def __str__(self) -> str:
        return str(self.metadata)


def table_source(
    metadata: str | Path,
    images: str | Path,
    *,
    format: str | None = None,
    columns: dict | None = None,
    malignant: Sequence[str] | None = None,
    test_ids: str | Path | None = None,
) -> TableSource:
    """A TableSource from the commands' options: a preset (`format`), a YAML `columns:` mapping on top of it
    (or alone, for an in-house CSV), and a malignant set that replaces the preset's. DataError when the
    format is unknown or neither a format nor columns are given."""
    if format is not None and format not in tables.FORMATS:
        raise DataError(f"Unknown format {format!r}; choose one of {', '.join(sorted(tables.FORMATS))}.")
    if format is None and not columns:
        raise DataError(
            "A metadata CSV needs --format (ham10000, isic-archive or isic2020) or a `columns:` mapping in the "
            "YAML config naming at least its image_id and label columns."
        )
    try:
        mapping = tables.mapping_from_config(columns or {}, base=format)
        if malignant:
            mapping = replace(mapping, malignant=tuple(dict.fromkeys(malignant)))
    except tables.TableError as exc:
        raise DataError(str(exc)) from None
    return TableSource(Path(metadata), Path(images), mapping, Path(test_ids) if test_ids else None)


def load_data(
    source: str | Path | TableSource,
    *,
    image_size: int,
    seed: int = 0,
    test_fraction: float = TEST_FRACTION,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ImageFolderData:
    """The training and test images of an image folder (a path) or of a table."""
    if not isinstance(source, TableSource):
        return load_image_folder(
            source, image_size=image_size, seed=seed, test_fraction=test_fraction, max_pixels=max_pixels,
            progress=progress, log=log,
        )  # fmt: skip
    table = read(source)
    unknown = [name for name in source.mapping.malignant if name not in table.class_names]
    if unknown:
        raise DataError(
            f"The malignant classes {unknown} are not labels of {source.metadata} ({list(table.class_names)}): "
            "correct `malignant:` in the config or --malignant."
        )
    malignant = list(source.mapping.malignant)
    labels = np.asarray([table.class_names.index(record.label) for record in table.records])
    if source.test_ids is not None:
        try:
            train_at, test_at = tables.split_by_ids(table, tables.read_id_list(source.test_ids))
        except tables.TableError as exc:
            raise DataError(str(exc)) from None
        log(f"Test set: the {len(test_at)} images listed in {source.test_ids}, used as they are.")
    else:
        groups = tables.group_ids(table.records)
        train_at, test_at = tables.group_split(labels, groups, test_fraction, seed + TEST_SEED_OFFSET)
        log(
            f"Held out {len(test_at)} of {len(labels)} images ({test_fraction:.0%}, whole lesions and patients, "
            "stratified by label) as the test set."
        )
    train = _load(source, table, train_at, "training", image_size, max_pixels, progress)
    test = _load(source, table, test_at, "test", image_size, max_pixels, progress)
    for name, split in (("training", train), ("test", test)):
        _check_both_kinds(split, [table.class_names.index(c) for c in malignant], f"The {name} set of {source}")
    return ImageFolderData(
        source.images, table.class_names, train, test, test_split_made=source.test_ids is None,
        file_list_sha256=table.sha256, malignant=tuple(malignant), source=source.describe(),
        skipped_rows=[{"row": s.row, "image_id": s.image_id, "reason": s.reason} for s in table.skipped],
    )  # fmt: skip


def read(source: TableSource) -> tables.Table:
    try:
        table = tables.read_table(source.metadata, source.images, source.mapping)
    except tables.TableError as exc:
        raise DataError(str(exc)) from None
    if len(table.class_names) < 2:
        raise DataError(f"{source.metadata} has one label only ({list(table.class_names)}); training needs two.")
    return table


def _load(
    source: TableSource, table: tables.Table, indices, what: str, image_size: int, max_pixels: int, progress: bool
) -> LoadedSplit:
    records = [table.records[i] for i in indices]
    files = [(record.path, table.class_names.index(record.label)) for record in records]
    return load_files(
        files, root=source.images, image_size=image_size, what=what, with_features=True,
        max_pixels=max_pixels, progress=progress, records=records,
    )  # fmt: skip


def load_evaluation_table(
    source: TableSource,
    *,
    class_names: Sequence[str],
    malignant: Sequence[str],
    image_size: int,
    trained_on: tuple[str, int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> LoadedSplit:
    """A table's images to evaluate a registered model on: the listed test ids when there is a list; for the
    very table the model was trained on (`trained_on`: its CSV's SHA-256 and the training seed), the test
    side of the split training made, never its training images; else every row. DataError when the table has
    labels the model does not know, or lacks malignant or benign cases."""
    table = read(source)
    unknown = sorted(set(table.class_names) - set(class_names))
    if unknown:
        raise DataError(f"{source.metadata} has labels {unknown} that the model does not know ({list(class_names)}).")
    if source.test_ids is not None:
        try:
            _, indices = tables.split_by_ids(table, tables.read_id_list(source.test_ids))
        except tables.TableError as exc:
            raise DataError(str(exc)) from None
    elif trained_on is not None and trained_on[0] == table.sha256:
        labels = np.asarray([table.class_names.index(record.label) for record in table.records])
        groups = tables.group_ids(table.records)
        _, indices = tables.group_split(labels, groups, TEST_FRACTION, trained_on[1] + TEST_SEED_OFFSET)
        log(f"{source.metadata} is the table the model was trained on: evaluating its {len(indices)} held-out test "
            "images only, as training split them.")  # fmt: skip
    else:
        indices = np.arange(len(table.records))
    records = [table.records[i] for i in indices]
    files = [(record.path, list(class_names).index(record.label)) for record in records]
    split = load_files(
        files, root=source.images, image_size=image_size, what="evaluation", with_features=True,
        progress=progress, records=records,
    )  # fmt: skip
    _check_both_kinds(split, [list(class_names).index(c) for c in malignant], f"The evaluation set of {source}")
    return split


def _check_both_kinds(split: LoadedSplit, malignant: list[int], what: str) -> None:
    """DataError unless the split has readable malignant and benign images: sensitivity, specificity and the
    AUC need both."""
    is_malignant = np.isin(split.labels, malignant)
    if not is_malignant.any() or is_malignant.all():
        missing = "malignant" if not is_malignant.any() else "benign"
        raise DataError(f"{what} has no readable {missing} images ({len(split.items)} in all); it needs both.")
