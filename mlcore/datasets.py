"""Labelled image folders (ImageFolder layout) loaded once, validated, fingerprinted and split.

Accepted layouts:
  DIR/train/<class>/*.jpg and DIR/test/<class>/*.jpg   (the Kaggle melanoma set, for example)
  DIR/<class>/*.jpg                                      (one folder: a stratified test split is made)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .drift import feature_thumbnail, file_features, image_features
from .inference import decode_side
from .leakage import Fingerprint, fingerprint
from .preprocessing import DEFAULT_MAX_PIXELS, ImageValidationError, decode_image, resize_for_model
from .quality import measure
from .skintone import band_from_metadata_or_image, measure_skin_tone
from .tables import group_ids

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}


class DataError(ValueError):
    """The data directory cannot be used; the message says why and what to do."""


@dataclass
class LoadedImage:
    path: str  # relative to the data directory
    label: int
    image: Image.Image  # RGB at the training input size
    fingerprint: Fingerprint
    features: dict[str, float]
    quality: dict[str, float] = field(default_factory=dict)  # mlcore.quality.measure, as a worker measures it
    # mlcore.skintone.band_from_metadata_or_image: the band (from the metadata's Fitzpatrick type, else the
    # measured ITA) and the measured ITA; None when neither is known.
    skin: dict | None = None
    record: Any = None  # the mlcore.tables.Record of an image read from a metadata table: ids, site, sex, age

    def attribute(self, name: str):
        """A metadata attribute (site, sex, age, fitzpatrick, lesion_id, patient_id), None when unknown."""
        if self.record is None:
            return None
        if name in ("lesion_id", "patient_id", "image_id"):
            return getattr(self.record, name)
        return self.record.attributes.get(name)


@dataclass
class LoadedSplit:
    items: list[LoadedImage] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([item.label for item in self.items], dtype=int)

    def pairs(self) -> list[tuple[Image.Image, int]]:
        return [(item.image, item.label) for item in self.items]

    @property
    def groups(self) -> np.ndarray:
        """Each item's group (mlcore.tables.group_ids: shared lesion or patient ids; else its own)."""
        records = [item.record for item in self.items]
        if any(record is None for record in records):
            return np.arange(len(records))
        return group_ids(records)

    def subset(self, indices) -> LoadedSplit:
        return LoadedSplit([self.items[i] for i in indices], [])


@dataclass
class ImageFolderData:
    root: Path
    class_names: tuple[str, ...]
    train: LoadedSplit
    test: LoadedSplit
    test_split_made: bool  # True when the test set was carved out of a single folder (or of a table's rows)
    file_list_sha256: str
    malignant: tuple[str, ...] = ()  # a table's malignant classes; empty for a folder: its positive class
    source: str = ""  # a table: its CSV and images folder; empty for a folder (root says it)
    skipped_rows: list[dict] = field(default_factory=list)  # a table's rows skipped for an ignored label

    @property
    def grouped(self) -> bool:
        """Whether the images carry lesion or patient ids: validation is then split by group too."""
        return any(
            item.record is not None and (item.record.lesion_id or item.record.patient_id) for item in self.train.items
        )

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.train.skipped + self.test.skipped


def _list_files(folder: Path, class_names: tuple[str, ...], root: Path) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(class_names):
        directory = folder / name
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                files.append((path, label))
    return files


def _class_names(folder: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): the held-out part takes `fraction` of each class, at least one case."""
    rng = np.random.default_rng(seed)
    held_out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        count = max(1, int(round(len(members) * fraction))) if len(members) > 1 else 0
        held_out.extend(members[:count].tolist())
    held = np.zeros(len(labels), dtype=bool)
    held[held_out] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def load_image_folder(
    root: str | Path,
    *,
    image_size: int,
    positive_class: str = "malignant",
    test_fraction: float = 0.2,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ImageFolderData:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"The data directory {root} does not exist.")
    has_splits = (root / "train").is_dir()
    train_folder = root / "train" if has_splits else root
    class_names = _checked_class_names(root, train_folder, has_splits, positive_class)
    train_files = _list_files(train_folder, class_names, root)
    test_files = _list_files(root / "test", class_names, root) if has_splits and (root / "test").is_dir() else []
    if not train_files:
        raise DataError(f"No files found under {train_folder}/{{{','.join(class_names)}}}.")
    listing = "\n".join(
        f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}" for path, _ in train_files + test_files
    )
    file_list_sha256 = hashlib.sha256(listing.encode()).hexdigest()

    def load(files: list[tuple[Path, int]], what: str, with_features: bool) -> LoadedSplit:
        return load_files(
            files, root=root, image_size=image_size, what=what, with_features=with_features,
            max_pixels=max_pixels, progress=progress,
        )  # fmt: skip

    train = load(train_files, "training", with_features=True)
    test = load(test_files, "test", with_features=True) if test_files else LoadedSplit()
    test_split_made = not test_files
    if test_split_made:
        kept, held = stratified_split(train.labels, test_fraction, seed + 7919)
        test = train.subset(held)
        skipped = train.skipped
        train = train.subset(kept)
        train.skipped = skipped
        log(f"No test/ folder: held out {len(test.items)} images ({test_fraction:.0%}, stratified) as the test set.")
    for name, split in (("training", train), ("test", test)):
        present = set(split.labels.tolist())
        if len(present) < 2:
            raise DataError(
                f"After skipping unreadable files, the {name} set has no images of "
                f"{', '.join(n for i, n in enumerate(class_names) if i not in present)}."
            )
    return ImageFolderData(root, class_names, train, test, test_split_made, file_list_sha256)


def _checked_class_names(root: Path, train_folder: Path, has_splits: bool, positive_class: str) -> tuple[str, ...]:
    """The class folders of the training folder: exactly two, the same as test/'s when there is one, and
    the positive class among them; DataError otherwise."""
    class_names = _class_names(train_folder)
    if has_splits and (root / "test").is_dir():
        test_classes = _class_names(root / "test")
        if test_classes and test_classes != class_names:
            raise DataError(f"train/ has classes {list(class_names)} but test/ has {list(test_classes)}.")
    if len(class_names) < 2:
        found = f"only {list(class_names)}" if class_names else "no class folders"
        raise DataError(
            f"Training needs two class folders (e.g. benign/ and malignant/) in {train_folder}; found {found}."
        )
    if len(class_names) > 2:
        raise DataError(f"Only binary classification is supported; {train_folder} has classes {list(class_names)}.")
    if positive_class not in class_names:
        raise DataError(f"The positive class {positive_class!r} is not among the class folders {list(class_names)}.")
    return class_names


def load_files(
    files: list[tuple[Path, int]],
    *,
    root: Path,
    image_size: int,
    what: str,
    with_features: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    records: list | None = None,
) -> LoadedSplit:
    """Decode each file once with the serving decoder; unreadable files are skipped with a reason. `records`:
    the mlcore.tables.Record of each file, when they come from a metadata table."""
    split = LoadedSplit()
    records = records if records is not None else [None] * len(files)
    listed = zip(files, records, strict=True)
    for (path, label), record in tqdm(listed, total=len(files), desc=f"reading {what} images", disable=not progress,
                                      leave=False):  # fmt: skip
        relative = path.relative_to(root).as_posix()
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            split.skipped.append((relative, f"not a JPEG, PNG or WebP file ({path.suffix or 'no extension'})"))
            continue
        try:
            data = path.read_bytes()
            # As an inference worker decodes an upload (Pillow's draft mode for a large JPEG), so that the
            # model and the drift reference see the same pixels as in service: a full decode measured
            # the sharpness of 3,000-pixel photos 3-4% higher than the worker does.
            decoded = decode_image(data, max_bytes=1 << 31, max_pixels=max_pixels, max_side=decode_side(image_size))
        except ImageValidationError as exc:
            split.skipped.append((relative, exc.message))
            continue
        split.items.append(
            LoadedImage(
                path=relative,
                label=label,
                image=resize_for_model(decoded.image, image_size),
                fingerprint=fingerprint(decoded.image),
                features=_features(decoded, file_size=len(data)) if with_features else {},
                quality=measure(decoded.image, full_size=(decoded.full_width, decoded.full_height))
                if with_features
                else {},
                skin=_skin(decoded.image, record),
                record=record,
            )
        )
    return split


def _skin(image: Image.Image, record) -> dict | None:
    """The photo's skin-tone band: the metadata's Fitzpatrick type where the table has one, else the ITA of the
    skin around the lesion (mlcore.skintone)."""
    fitzpatrick = record.attributes.get("fitzpatrick") if record is not None else None
    measured = measure_skin_tone(feature_thumbnail(image))  # as a worker measures an upload: the same pixels
    try:
        return band_from_metadata_or_image(fitzpatrick, measured)
    except ValueError:  # an unreadable Fitzpatrick value: the measured tone
        return band_from_metadata_or_image(None, measured)


def _features(decoded, *, file_size: int) -> dict[str, float]:
    """An image's drift features, its file features from the photo's own size (not the decoded copy's),
    exactly as a worker describes an upload (diagnosis.services.monitoring)."""
    return {**image_features(decoded.image),
            **file_features(width=decoded.full_width, height=decoded.full_height, file_size=file_size)}  # fmt: skip


def load_evaluation_folder(
    root: str | Path, *, class_names: tuple[str, ...], image_size: int, progress: bool = True
) -> LoadedSplit:
    """A labelled folder to evaluate a model on: DIR/test/<class>/ when there is one, else DIR/<class>/."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"The data directory {root} does not exist.")
    folder = root / "test" if (root / "test").is_dir() else root
    present = _class_names(folder)
    unknown = set(present) - set(class_names)
    if unknown:
        raise DataError(
            f"{folder} has class folders {sorted(unknown)} that the model does not know ({list(class_names)})."
        )
    split = load_files(
        _list_files(folder, class_names, root), root=root, image_size=image_size, what="evaluation",
        with_features=False, progress=progress,
    )  # fmt: skip
    if len(set(split.labels.tolist())) < 2:
        raise DataError(f"Evaluation needs readable images of both classes under {folder}.")
    return split
