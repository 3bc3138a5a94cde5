"""Labelled images described by a metadata CSV (HAM10000, the ISIC archive, ISIC 2020, an in-house table),
and splits that keep every lesion and every patient on one side.

Pure Python and numpy, no torch, no image decoded: reading checks that each image file exists and leaves the
pixels to the loader. A TableError names the CSV file, the row as a spreadsheet numbers it (the header is
row 1) and the column, and says what to do; up to ten problems are reported together, with their count.

Several photos of one lesion, or several lesions of one patient, on both sides of a split inflate every
metric: group_ids joins images that share a lesion or a patient, and group_split holds out whole groups.

Long because: the three published layouts and the in-house mapping share one row-by-row reader whose
checks each word their own error; the group split (group_ids to group_overlap, the last ~120 lines)
could live in a module of its own.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAX_REPORTED = 10  # problems listed in one TableError; the rest are counted
COLUMN_FIELDS = ("image_id", "label", "lesion_id", "patient_id", "site", "sex", "age", "fitzpatrick", "path")
OPTIONAL_FIELDS = COLUMN_FIELDS[2:]
_MISSING = {"", "nan", "na", "n/a", "none", "null", "unknown"}  # how exports write "not recorded"
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}
_ID_COLUMNS = ("image_id", "isic_id", "image_name")


class TableError(ValueError):
    """A metadata table, its column mapping or an id list cannot be used; the message says where and why."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class ColumnMapping:
    """How to read one CSV layout: the column behind each field (None: not in this layout), the labels
    allowed, and which of them are malignant. `optional` names the fields whose column may be absent from
    a file (their values are then None); any other mapped column missing is an error."""

    image_id: str
    label: str
    lesion_id: str | None = None
    patient_id: str | None = None
    site: str | None = None
    sex: str | None = None
    age: str | None = None
    fitzpatrick: str | None = None
    path: str | None = None  # a column holding a file path relative to the images folder
    labels: tuple[str, ...] | None = None  # allowed labels after label_map; None: any non-empty value
    ignore_labels: tuple[str, ...] = ()  # rows with these labels (after label_map) are skipped and counted
    label_map: dict[str, str] = field(default_factory=dict)  # e.g. {"0": "benign", "1": "malignant"}
    malignant: tuple[str, ...] = ("malignant",)
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png")
    optional: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("image_id", "label"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise TableError(f"The column mapping needs a column name for {name}.")
        if not self.malignant:
            raise TableError("The column mapping's malignant list is empty: name the malignant labels.")
        if self.labels is not None:
            outside = [label for label in self.malignant if label not in self.labels]
            if outside:
                raise TableError(
                    f"The malignant labels {outside} are not among the labels {list(self.labels)}: "
                    "set malignant to the malignant ones."
                )
        unknown = [name for name in self.optional if name not in OPTIONAL_FIELDS]
        if unknown:
            raise TableError(f"optional names {unknown}; it can name only {list(OPTIONAL_FIELDS)}.")


_ISIC_BINARY = {"labels": ("benign", "malignant"), "malignant": ("malignant",)}
FORMATS: dict[str, ColumnMapping] = {
    "ham10000": ColumnMapping(
        image_id="image_id", label="dx", lesion_id="lesion_id", site="localization", sex="sex", age="age",
        labels=("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"), malignant=("akiec", "bcc", "mel"),
    ),
    "isic-archive": ColumnMapping(
        image_id="isic_id", label="benign_malignant", lesion_id="lesion_id", patient_id="patient_id",
        site="anatom_site_general", sex="sex", age="age_approx", fitzpatrick="fitzpatrick_skin_type",
        ignore_labels=("", "indeterminate", "indeterminate/benign", "indeterminate/malignant"),
        optional=("lesion_id", "patient_id", "site", "sex", "age", "fitzpatrick"), **_ISIC_BINARY,
    ),
    "isic2020": ColumnMapping(
        image_id="image_name", label="benign_malignant", patient_id="patient_id",
        site="anatom_site_general_challenge", sex="sex", age="age_approx", **_ISIC_BINARY,
    ),
}  # fmt: skip


def _as_text(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TableError(f"{where}: expected text, got {value!r}.")
    return str(value)


def _config_value(key: str, value: object, where: str) -> object:
    """One `columns:` entry, as ColumnMapping holds it (YAML reads 0 and 1 as numbers: they become text)."""
    here = f"{where}: {key}"
    if key in COLUMN_FIELDS:
        return None if value is None else _as_text(value, here)
    if key == "label_map":
        if not isinstance(value, dict):
            raise TableError(f"{here} must map values to labels, e.g. {{0: benign, 1: malignant}}.")
        return {_as_text(k, here): _as_text(v, here) for k, v in value.items()}
    if key == "labels" and value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise TableError(f"{here} must be a list, e.g. [{value}].")
    if key == "extensions":  # [JPG, .png] -> (".jpg", ".png")
        return tuple("." + _as_text(item, here).lower().lstrip(".") for item in value)
    return tuple(_as_text(item, here) for item in value)


def mapping_from_config(config: dict, base: str | None = None, where: str = "columns") -> ColumnMapping:
    """A ColumnMapping from a YAML `columns:` section (keys as ColumnMapping's fields), on top of the preset
    `base` when given. A column the config names must be in the file, unless `optional` says otherwise."""
    if not isinstance(config, dict):
        raise TableError(f"{where} must be a mapping of field: column name.")
    allowed = [f.name for f in dataclasses.fields(ColumnMapping)]
    unknown = sorted(str(key) for key in config if key not in allowed)
    if unknown:
        raise TableError(f"{where} has unknown keys {unknown}; the keys allowed are {allowed}.")
    if base is not None and base not in FORMATS:
        raise TableError(f"Unknown format {base!r}; the formats are {sorted(FORMATS)}.")
    if base is None and not {"image_id", "label"} <= set(config):
        raise TableError(f"{where} needs at least image_id and label (the columns holding them).")
    values = {key: _config_value(key, value, where) for key, value in config.items()}
    start = FORMATS[base] if base else ColumnMapping(image_id=values["image_id"], label=values["label"])
    if "optional" not in values:
        values["optional"] = tuple(name for name in start.optional if name not in values)
    return dataclasses.replace(start, **values)


@dataclass(frozen=True)
class Record:
    """One labelled image: its file, its lesion and patient where known, and what subgroup reports use."""

    image_id: str
    label: str
    path: Path
    lesion_id: str | None = None
    patient_id: str | None = None
    attributes: dict[str, str | float | int | None] = field(default_factory=dict)  # site, sex, age, fitzpatrick


class Skipped(NamedTuple):
    """A row left out on purpose (its label is in ignore_labels), counted for the report."""

    row: int
    image_id: str
    reason: str


@dataclass
class Table:
    """The records of one metadata CSV, checked, with what identifies the file (its path and SHA-256)."""

    records: list[Record]
    class_names: tuple[str, ...]  # the mapping's labels in their order, else sorted
    malignant: tuple[str, ...]
    skipped: list[Skipped]  # rows with an ignored label
    source: Path
    sha256: str  # of the CSV's bytes
    absent: tuple[str, ...] = ()  # optional fields whose column this file lacks

    @property
    def labels(self) -> np.ndarray:
        """Each record's label as its index in class_names."""
        index = {name: i for i, name in enumerate(self.class_names)}
        return np.asarray([index[record.label] for record in self.records], dtype=int)


class _Problems:
    """The problems found in one file: the first MAX_REPORTED worded in full, all counted."""

    def __init__(self, source: Path):
        self.source, self.lines, self.count = source, [], 0

    def add(self, row: int | None, column: str, message: str) -> None:
        self.count += 1
        if len(self.lines) < MAX_REPORTED:
            self.lines.append(f'{"" if row is None else f"row {row}, "}column "{column}": {message}')

    def raise_any(self) -> None:
        if self.count:
            more = f"\n  ... and {self.count - len(self.lines)} more" if self.count > len(self.lines) else ""
            listed = "\n  ".join(self.lines)
            raise TableError(f"{self.source}: {self.count} problem(s):\n  {listed}{more}", self.lines)


def _read_rows(path: Path, what: str = "metadata CSV (--metadata)") -> tuple[bytes, list[list[str]]]:
    """The CSV's bytes and rows (UTF-8, with or without a BOM; comma, or semicolon or tab when the header
    has no comma, as some spreadsheet programs save)."""
    if not path.is_file():
        raise TableError(f"The {what} {path} does not exist or is not a file.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        row = data[: exc.start].count(b"\n") + 1
        raise TableError(f"{path}: row {row} is not UTF-8 text (byte {exc.start}); save the file as CSV UTF-8.")
    first_line = text.split("\n", 1)[0]
    delimiter = next((d for d in (",", ";", "\t") if d in first_line), ",")
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise TableError(f"{path} is empty: it needs a header row naming its columns.")
    return data, rows


def _column_positions(path: Path, header: list[str], mapping: ColumnMapping) -> tuple[dict[str, int], tuple]:
    """Each mapped field's column position; absent optional fields are left out and returned apart."""
    names = [cell.strip() for cell in header]
    folded = {name.casefold(): i for i, name in reversed(list(enumerate(names)))}
    positions, absent, problems = {}, [], _Problems(path)
    for name in COLUMN_FIELDS:
        column = getattr(mapping, name)
        if column is None:
            continue
        position = names.index(column) if column in names else folded.get(column.casefold())
        if position is not None:
            positions[name] = position
        elif name in mapping.optional:
            absent.append(name)
        else:
            present = ", ".join(names)
            problems.add(1, column, f"not found ({name}); the columns are: {present}. Check --format or columns:.")
    problems.raise_any()
    return positions, tuple(absent)


def index_images(images_dir: Path, extensions: Iterable[str]) -> dict[str, list[str]]:
    """Every image file under images_dir (all subfolders, walked once), by file stem and by file name;
    hidden files such as macOS's ._ copies are left out."""
    wanted = {extension.lower() for extension in extensions}
    found: dict[str, list[str]] = {}
    for directory, folders, files in os.walk(images_dir):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            stem, extension = os.path.splitext(name)
            if extension.lower() in wanted and not name.startswith("."):
                full = os.path.join(directory, name)
                found.setdefault(stem, []).append(full)
                found.setdefault(name, []).append(full)
    return found


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _fitzpatrick(text: str) -> int | None:
    """I..VI or 1..6 (also "2.0" and "type II") as 1..6; None when not one of them."""
    cleaned = text.upper().removeprefix("TYPE").removeprefix("FST").strip()
    value = _ROMAN.get(cleaned) or _number(cleaned)
    return int(value) if value in (1, 2, 3, 4, 5, 6) else None


@dataclass
class _RowReader:
    """Turns one data row into a Record, or adds its problems."""

    mapping: ColumnMapping
    positions: dict[str, int]
    images_dir: Path
    index: dict[str, list[str]] | None
    problems: _Problems

    def cell(self, cells: list[str], name: str) -> str | None:
        position = self.positions.get(name)
        if position is None:
            return None
        return cells[position].strip() if position < len(cells) else ""

    def listed_path(self, row: int, cells: list[str], image_id: str) -> Path | None:
        """The image file the mapping's path column names, relative to the images folder."""
        relative = self.cell(cells, "path")
        where = self.images_dir / relative if relative else None
        if where is None:
            problem = "the path is empty"
        elif not where.is_file():
            problem = f"no image file {where}"
        elif where.suffix.lower() not in self.mapping.extensions:
            problem = f"{where.name} is not a {'/'.join(self.mapping.extensions)} file"
        else:
            return where
        self.problems.add(row, self.mapping.path, f"{problem} (image id {image_id!r}); correct the path.")
        return None

    def image_path(self, row: int, cells: list[str], image_id: str) -> Path | None:
        """The image file of this row: from the path column, else found by id anywhere under the images folder."""
        if self.index is None:
            return self.listed_path(row, cells, image_id)
        paths = self.index.get(image_id, [])
        if len(paths) == 1:
            return Path(paths[0])
        if paths:
            self.problems.add(row, self.mapping.image_id, f"{image_id!r} matches {len(paths)} files: "
                              f"{', '.join(paths[:3])}; keep one.")  # fmt: skip
        else:
            looked = "/".join(self.mapping.extensions)
            self.problems.add(row, self.mapping.image_id, f"no image file for {image_id!r} under {self.images_dir} "
                              f"(looked for {image_id}{{{looked}}} in all its folders); check --images.")  # fmt: skip
        return None

    def attributes(self, row: int, cells: list[str]) -> dict[str, str | float | int | None] | None:
        values = {name: self.cell(cells, name) or None for name in ("site", "sex", "age", "fitzpatrick")}
        values = {k: None if v is None or v.casefold() in _MISSING else v for k, v in values.items()}
        sex = (values["sex"] or "").casefold()
        values["sex"] = {"m": "male", "f": "female"}.get(sex, sex) or None
        ok = True
        if values["age"] is not None:
            age = _number(values["age"])
            if age is None or age < 0:
                self.problems.add(row, self.mapping.age, f"age {values['age']!r} is not a number of years.")
                ok = False
            values["age"] = age
        if values["fitzpatrick"] is not None:
            skin_type = _fitzpatrick(values["fitzpatrick"])
            if skin_type is None:
                self.problems.add(row, self.mapping.fitzpatrick, f"{values['fitzpatrick']!r} is not a Fitzpatrick "
                                  "skin type (I to VI, or 1 to 6); correct it or leave it empty.")  # fmt: skip
                ok = False
            values["fitzpatrick"] = skin_type
        return values if ok else None

    def record(self, row: int, cells: list[str], label: str) -> Record | None:
        """The row's record once its id and label are known to be good; None (problems added) otherwise."""
        image_id = self.cell(cells, "image_id")
        path = self.image_path(row, cells, image_id)
        attributes = self.attributes(row, cells)
        if path is None or attributes is None:
            return None
        lesion, patient = self.cell(cells, "lesion_id") or None, self.cell(cells, "patient_id") or None
        return Record(image_id, label, path, lesion, patient, attributes)


def read_table(metadata_csv: str | Path, images_dir: str | Path, mapping: ColumnMapping) -> Table:
    """The records of a metadata CSV whose images lie under images_dir; TableError naming each bad row."""
    source, images_dir = Path(metadata_csv), Path(images_dir)
    data, rows = _read_rows(source)
    positions, absent = _column_positions(source, rows[0], mapping)
    if not images_dir.is_dir():
        raise TableError(f"The images folder {images_dir} does not exist: check --images.")
    index = None if mapping.path else index_images(images_dir, mapping.extensions)
    problems = _Problems(source)
    reader = _RowReader(mapping, positions, images_dir, index, problems)
    records, skipped, first_row, labelled = [], [], {}, set()
    for row, cells in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue  # a blank line
        label = _checked_label(reader, row, cells, first_row)
        if isinstance(label, Skipped):
            skipped.append(label)
        elif label is not None:
            labelled.add(label)
            if (record := reader.record(row, cells, label)) is not None:
                records.append(record)
    class_names = _class_names(mapping, labelled, problems)
    problems.raise_any()
    malignant = tuple(name for name in mapping.malignant if name in class_names)
    sha256 = hashlib.sha256(data).hexdigest()
    return Table(records, class_names, malignant, skipped, source, sha256, absent)


def _checked_label(reader: _RowReader, row: int, cells: list[str], first_row: dict) -> str | Skipped | None:
    """The row's label when its image id and label are good, Skipped for an ignored label, None (problems
    added) otherwise."""
    mapping, problems = reader.mapping, reader.problems
    image_id = reader.cell(cells, "image_id")
    ok = bool(image_id)
    if not image_id:
        problems.add(row, mapping.image_id, "the image id is empty; fill it in or delete the row.")
    elif first_row.setdefault(image_id, row) != row:
        problems.add(row, mapping.image_id, f"duplicate image id {image_id!r}, also on row {first_row[image_id]}; "
                     "list each image once.")  # fmt: skip
        ok = False
    raw = reader.cell(cells, "label")
    label = mapping.label_map.get(raw, raw)
    if label in mapping.ignore_labels:
        return Skipped(row, image_id, f"label {raw!r} is ignored") if ok else None
    allowed = mapping.labels
    if not label or (allowed is not None and label not in allowed):
        expected = f"one of {list(allowed)}" if allowed else "a label"
        what = f"unknown label {raw!r}" if raw else "empty label"
        problems.add(row, mapping.label, f"{what}; expected {expected}. Correct it, or map it "
                     "with label_map or skip it with ignore_labels in columns:.")  # fmt: skip
        ok = False
    return label if ok else None


def _class_names(mapping: ColumnMapping, present: set[str], problems: _Problems) -> tuple[str, ...]:
    """The classes, after checking that each has rows (with a good label) and that one of them is malignant."""
    if mapping.labels is None:
        class_names = tuple(sorted(present))
        if len(class_names) < 2 and not problems.count:
            problems.add(None, mapping.label, f"only the labels {class_names} occur; training needs two or more.")
    else:
        class_names = mapping.labels
        for name in class_names:
            if name not in present:
                problems.add(None, mapping.label, f"no row has the label {name!r} (an empty class); add its images "
                             "or leave it out of labels in columns:.")  # fmt: skip
    if class_names and not set(mapping.malignant) & set(class_names) and not problems.count:
        problems.add(None, mapping.label, f"none of the malignant labels {list(mapping.malignant)} occurs; set "
                     "malignant in columns:.")  # fmt: skip
    return class_names


def group_ids(records: Sequence[Record]) -> np.ndarray:
    """A group number per record (0, 1, ... in order of first appearance): records that share a lesion id or a
    patient id, directly or through others, are one group; a record with neither is a group of its own."""
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, str], int] = {}
    for i, record in enumerate(records):
        for key in (("lesion", record.lesion_id), ("patient", record.patient_id)):
            if key[1] is not None:
                parent[root(i)] = root(owner.setdefault(key, i))
    numbers: dict[int, int] = {}
    return np.asarray([numbers.setdefault(root(i), len(numbers)) for i in range(len(records))], dtype=int)


def _held_count(sizes: np.ndarray, fraction: float) -> int:
    """How many of these (shuffled) groups to hold out so that their images come closest to the fraction;
    at least one and never all."""
    cumulative = np.concatenate([[0], np.cumsum(sizes)])
    count = int(np.argmin(np.abs(cumulative - fraction * cumulative[-1])))
    return min(max(count, 1), len(sizes) - 1)


def group_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): whole groups only, about `fraction` of each class's images held out, seeded.

    Each group is stratified by its rarest label, so that a group mixing a rare class with a common one
    counts for the rare one; each class found in two or more groups ends up on both sides."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if labels.ndim != 1 or labels.shape != groups.shape:
        raise ValueError(f"labels {labels.shape} and groups {groups.shape} must be 1-D and of one length.")
    if not 0 < fraction < 1:
        raise ValueError(f"The held-out fraction must be between 0 and 1, not {fraction}.")
    _, group_of = np.unique(groups, return_inverse=True)
    classes, label_of = np.unique(labels, return_inverse=True)
    rank = np.argsort(np.argsort(np.bincount(label_of), kind="stable"), kind="stable")  # 0: the rarest class
    stratum = np.full(group_of.max(initial=-1) + 1, len(classes))
    np.minimum.at(stratum, group_of, rank[label_of])
    sizes = np.bincount(group_of, minlength=len(stratum))
    rng = np.random.default_rng(seed)
    held = np.zeros(len(stratum), dtype=bool)
    for r in range(len(classes)):
        members = rng.permutation(np.flatnonzero(stratum == r))
        if len(members) >= 2:
            held[members[: _held_count(sizes[members], fraction)]] = True
    _both_sides(held, group_of, label_of, sizes, rank)
    mask = held[group_of]
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _both_sides(held: np.ndarray, group_of: np.ndarray, label_of: np.ndarray, sizes: np.ndarray, rank) -> None:
    """Move the smallest group of a class found in two or more groups but on one side only to the other side
    (possible only when groups mix classes), rarest class first."""
    for label in np.argsort(rank):
        members = np.unique(group_of[label_of == label])
        if len(members) < 2:
            continue
        for side in (True, False):
            if not (held[members] == side).any():
                held[members[np.argmin(sizes[members])]] = side


def read_id_list(csv_path: str | Path) -> list[str]:
    """The ids of an official test split: a CSV with a header row, read from its image_id, isic_id or
    image_name column, else its first column; empty cells are passed over, repeats kept once."""
    path = Path(csv_path)
    _, rows = _read_rows(path, "test split CSV (--test-split)")
    header = [cell.strip().casefold() for cell in rows[0]]
    position = next((header.index(name) for name in _ID_COLUMNS if name in header), 0)
    ids = [row[position].strip() for row in rows[1:] if position < len(row) and row[position].strip()]
    if not ids:
        raise TableError(f"{path} lists no ids under its column {rows[0][position].strip()!r}: add one id per row.")
    return list(dict.fromkeys(ids))


def split_by_ids(table: Table, ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of table.records: the test side is exactly the listed images. An id may carry an
    image file extension; ids of rows skipped for an ignored label are passed over; other ids not in the table
    are a TableError naming them."""
    where = {record.image_id: i for i, record in enumerate(table.records)}
    skipped = {entry.image_id for entry in table.skipped}
    test, unknown = set(), []
    for image_id in ids:
        stem, extension = os.path.splitext(image_id)
        key = stem if image_id not in where and extension.lower() in (".jpg", ".jpeg", ".png") else image_id
        if key in where:
            test.add(where[key])
        elif key not in skipped:
            unknown.append(image_id)
    if unknown:
        raise TableError(
            f"{len(unknown)} test id(s) are not in {table.source}: {', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}. The test list must name images of this table."
        )
    mask = np.zeros(len(table.records), dtype=bool)
    mask[list(test)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def group_overlap(records_a: Sequence[Record], records_b: Sequence[Record], examples: int = 20) -> dict:
    """Lesions and patients present on both sides (a: training, b: test), for the leakage report. Per kind
    ("lesions", "patients"): the number shared, up to `examples` of them, and how many records of a and of b
    carry such an id at all (none: the check could not be made). "affected": the records of b that share a
    lesion or a patient with a."""
    report: dict = {}
    shared_sets = []
    for kind in ("lesion_id", "patient_id"):
        a = [getattr(record, kind) for record in records_a]
        b = [getattr(record, kind) for record in records_b]
        shared = (set(a) & set(b)) - {None}
        shared_sets.append(shared)
        known = (sum(x is not None for x in a), sum(x is not None for x in b))
        name = kind.removesuffix("_id") + "s"
        report[name] = {"shared": len(shared), "examples": sorted(shared)[:examples], "known": known}
    lesions, patients = shared_sets
    report["affected"] = sum(r.lesion_id in lesions or r.patient_id in patients for r in records_b)
    return report
