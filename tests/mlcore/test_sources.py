"""The readers and the group-aware splits on the generator's exact HAM10000, ISIC archive and ISIC 2020 layouts
(mlcore.sources, mlcore.pipeline.prepare_data): no lesion and no patient on both sides of any split, the
generator's truth as the check; an official test list used as it is; the image folder path unchanged."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest

from mlcore.data import write_image_folder
from mlcore.datasets import DataError
from mlcore.pipeline import prepare_data
from mlcore.sources import load_data, table_source
from mlcore.synthetic_sets import write_ham10000, write_isic2020, write_isic_archive
from mlcore.train import TrainConfig, train_classifier

WRITERS = {
    "ham10000": (write_ham10000, "HAM10000_metadata.csv", ""),
    "isic-archive": (write_isic_archive, "metadata.csv", "images"),
    "isic2020": (write_isic2020, "train.csv", "train"),
}


def truth(root) -> dict[str, dict]:
    with open(root / "synthetic_truth.csv", newline="") as handle:
        return {row["image_id"]: row for row in csv.DictReader(handle)}


def image_id(item) -> str:
    return item.record.image_id


@pytest.mark.parametrize("format", sorted(WRITERS))
def test_no_lesion_and_no_patient_is_on_both_sides_of_any_split(tmp_path, format):
    writer, metadata, images = WRITERS[format]
    writer(tmp_path, lesions=90, size=48, seed=3, balanced=True)
    source = table_source(tmp_path / metadata, tmp_path / images, format=format)
    prepared = prepare_data(source, image_size=32, seed=0, progress=False, log=lambda message: None)
    known = truth(tmp_path)
    sides = {"train": prepared.train, "validation": prepared.validation, "test": prepared.data.test}
    for kind in ("lesion_id", "patient_id"):
        owners = {name: {known[image_id(item)][kind] for item in split.items} for name, split in sides.items()}
        for first, second in (("train", "validation"), ("train", "test"), ("validation", "test")):
            shared = owners[first] & owners[second]
            # HAM10000 records no patient and ISIC 2020 no lesion: what the file does not say cannot be kept
            # together, and the generator's truth shows which of those the split still kept apart.
            if (format, kind) in (("ham10000", "patient_id"), ("isic2020", "lesion_id")):
                continue
            assert not shared, (format, kind, first, second, sorted(shared)[:3])
    assert prepared.data.grouped and len(prepared.data.test.items) > 0
    present = {name: set(split.labels.tolist()) for name, split in sides.items()}
    assert present["train"] == present["test"] == set(range(len(prepared.data.class_names)))  # stratified
    assert prepared.data.malignant == {"ham10000": ("akiec", "bcc", "mel")}.get(format, ("malignant",))
    # Every photo carries its metadata and its skin tone for the subgroup report.
    item = prepared.data.test.items[0]
    assert item.skin is not None and item.skin["band"] and item.attribute("site") is not None


def test_a_shifted_skin_tone_is_measured_from_the_photos(tmp_path):
    write_ham10000(tmp_path, lesions=30, size=64, seed=4, ita_low=-50, ita_high=-35)
    data = load_data(table_source(tmp_path / "HAM10000_metadata.csv", tmp_path, format="ham10000"),
                     image_size=32, progress=False, log=lambda message: None)  # fmt: skip
    bands = [item.skin["band"] for item in data.train.items + data.test.items]
    assert bands.count("dark") / len(bands) >= 0.9


def test_an_official_test_list_is_the_test_set_as_it_is(tmp_path):
    write_isic_archive(tmp_path, lesions=40, size=48, seed=6)
    rows = list(csv.DictReader((tmp_path / "metadata.csv").read_text().splitlines()))
    labelled = [row["isic_id"] for row in rows if row["benign_malignant"] in ("benign", "malignant")]
    listed = labelled[::3]
    (tmp_path / "test.csv").write_text("isic_id\n" + "\n".join(listed) + "\n")
    source = table_source(tmp_path / "metadata.csv", tmp_path / "images", format="isic-archive",
                          test_ids=tmp_path / "test.csv")  # fmt: skip
    data = load_data(source, image_size=32, progress=False, log=lambda message: None)
    assert sorted(image_id(item) for item in data.test.items) == sorted(listed)
    assert not data.test_split_made
    assert {image_id(item) for item in data.train.items}.isdisjoint(listed)
    (tmp_path / "bad.csv").write_text("isic_id\nISIC_0000000\n")
    with pytest.raises(DataError, match="ISIC_0000000"):
        load_data(dataclasses.replace(source, test_ids=tmp_path / "bad.csv"), image_size=32, progress=False)


def test_the_malignant_set_must_name_a_label(tmp_path):
    write_ham10000(tmp_path, lesions=20, size=48, seed=2)
    with pytest.raises(DataError, match=r"malignant labels \['scc'\]"):
        table_source(tmp_path / "HAM10000_metadata.csv", tmp_path, format="ham10000", malignant=["scc"])
    doubled = table_source(tmp_path / "HAM10000_metadata.csv", tmp_path, format="ham10000", malignant=["mel", "mel"])
    assert doubled.mapping.malignant == ("mel",)  # counted once: the malignant sum stays a probability
    typo = {"image_id": "image_id", "label": "dx", "malignant": ["mel", "akeic"]}  # in-house: labels undeclared
    with pytest.raises(DataError, match=r"\['akeic'\] are not labels"):
        load_data(table_source(tmp_path / "HAM10000_metadata.csv", tmp_path, columns=typo), image_size=32,
                  progress=False)  # fmt: skip
    custom = {"image_id": "image_id", "label": "dx", "malignant": ["scc"]}  # an in-house mapping, labels undeclared
    with pytest.raises(DataError, match=r"none of the malignant labels \[.scc.\] occurs"):
        load_data(table_source(tmp_path / "HAM10000_metadata.csv", tmp_path, columns=custom), image_size=32,
                  progress=False)  # fmt: skip
    with pytest.raises(DataError, match="--format"):
        table_source(tmp_path / "HAM10000_metadata.csv", tmp_path)


def test_an_image_folder_is_split_as_before(tmp_path):
    write_image_folder(tmp_path, splits={"train": 40, "test": 10}, size=48, seed=1)
    prepared = prepare_data(tmp_path, image_size=32, seed=0, progress=False, log=lambda message: None)
    assert not prepared.data.grouped and prepared.data.malignant == ()
    assert len(prepared.validation.items) == 4 and len(prepared.data.test.items) == 10  # 10% of train/, stratified
    assert all(item.record is None and item.attribute("site") is None for item in prepared.train.items)


def test_balanced_sampling_trains_an_imbalanced_multi_class_set(tmp_path):
    write_ham10000(tmp_path, lesions=60, size=48, seed=8)  # HAM10000's own mix: two thirds naevi
    prepared = prepare_data(table_source(tmp_path / "HAM10000_metadata.csv", tmp_path, format="ham10000"),
                            image_size=32, seed=0, progress=False, log=lambda message: None)  # fmt: skip
    config = TrainConfig(arch="resnet_tiny", input_size=32, epochs=1, device="cpu", class_balance="sampling",
                         class_names=prepared.data.class_names, positive_class="mel",
                         malignant_classes=prepared.data.malignant)  # fmt: skip
    result = train_classifier(prepared.train.pairs(), prepared.validation.pairs(), config, progress=False)
    assert result.meta.malignant_classes == ("akiec", "bcc", "mel") and not result.meta.binary
    assert result.meta.training["config"]["class_balance"] == "sampling"
    assert np.isfinite(result.history[0]["loss"])
    with pytest.raises(ValueError, match="class_balance"):
        train_classifier(prepared.train.pairs(), prepared.validation.pairs(),
                         dataclasses.replace(config, class_balance="oversample"), progress=False)  # fmt: skip
