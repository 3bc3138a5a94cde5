"""The options that say what to train or evaluate on, shared by train_model and evaluate_model: an image folder,
or a metadata CSV with its images (HAM10000, the ISIC archive, ISIC 2020, or an in-house table described by a
`columns:` mapping in the YAML config)."""

from __future__ import annotations

from pathlib import Path

import yaml
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from diagnosis.services import training

FORMATS = ("ham10000", "isic-archive", "isic2020")
CONFIG_KEYS = {"data", "metadata", "images", "format", "columns", "malignant", "test_split"}


def add_data_arguments(parser) -> None:
    parser.add_argument(
        "--data", type=Path,
        help="An image folder: DIR/train/<class>/ and DIR/test/<class>/, or DIR/<class>/ (a test set is held out).",
    )  # fmt: skip
    parser.add_argument(
        "--metadata", type=Path,
        help="A metadata CSV instead of a folder: HAM10000_metadata.csv, an ISIC archive export, ISIC 2020's "
        "train.csv, or your own with a `columns:` mapping in --config.",
    )  # fmt: skip
    parser.add_argument("--images", type=Path, help="The folder the CSV's images are under, at any depth "
                        "(default: the CSV's folder).")  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, help="The CSV's published layout (a preset column mapping).")
    parser.add_argument(
        "--test-split", type=Path,
        help="A CSV listing the image ids of your own (official) test set, used as is; without it a test set of "
        "whole lesions and patients is held out.",
    )  # fmt: skip
    parser.add_argument(
        "--malignant", help="Classes that count as malignant, separated by commas (default: the format's preset, "
        "e.g. mel,bcc,akiec for HAM10000).",
    )  # fmt: skip


def data_source(options: dict, config: dict | None = None):
    """The folder or TableSource the options (over the YAML config's keys of CONFIG_KEYS) describe."""
    values = {key: value for key, value in (config or {}).items() if key in CONFIG_KEYS}
    for key in CONFIG_KEYS - {"columns"}:
        if options.get(key) is not None:
            values[key] = options[key]
    try:
        return training.data_source(**values)
    except ValidationError as exc:
        raise CommandError(" ".join(exc.messages)) from None


def read_config(path: Path) -> dict:
    """A YAML mapping (e.g. a `columns:` section), keys with - read as _; CommandError when unreadable."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CommandError(f"Cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError(f"{path} must hold a mapping of option names to values.")
    return {key.replace("-", "_"): value for key, value in data.items()}
