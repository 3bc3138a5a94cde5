"""The synthetic multi-class generator (mlcore.synthetic_classes), skin tone by ITA (mlcore.data), and the
HAM10000, ISIC archive and ISIC 2020 layouts (mlcore.synthetic_sets)."""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from mlcore.data import ita_of_rgb, skin_rgb_for_ita
from mlcore.skintone import band_of as ita_band
from mlcore.skintone import lab_to_srgb, srgb_to_lab
from mlcore.synthetic_classes import DIAGNOSES, MALIGNANT_DIAGNOSES, generate_diagnosis, photograph_lesion
from mlcore.synthetic_sets import (
    FITZPATRICK_BY_BAND,
    HAM10000_COLUMNS,
    ISIC2020_COLUMNS,
    ISIC_ARCHIVE_COLUMNS,
    TRUTH_COLUMNS,
    plan_cohort,
    write_ham10000,
    write_isic2020,
    write_isic_archive,
)

from .helpers import pixels

HAM_LOCALIZATIONS = {
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity", "neck",
    "scalp", "trunk", "unknown", "upper extremity",
}  # fmt: skip


def read_csv(path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        header = handle.readline().rstrip("\n")
        handle.seek(0)
        return header.split(","), list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def ham(tmp_path_factory):
    root = write_ham10000(tmp_path_factory.mktemp("ham") / "HAM10000", lesions=40, size=32, seed=4)
    return root, read_csv(root / "HAM10000_metadata.csv"), read_csv(root / "synthetic_truth.csv")[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = write_isic_archive(tmp_path_factory.mktemp("archive"), lesions=60, size=32, seed=5)
    return root, read_csv(root / "metadata.csv"), read_csv(root / "synthetic_truth.csv")[1]


@pytest.fixture(scope="module")
def isic2020(tmp_path_factory):
    root = write_isic2020(tmp_path_factory.mktemp("isic2020"), lesions=30, size=32, seed=6)
    return root, read_csv(root / "train.csv"), read_csv(root / "synthetic_truth.csv")[1]


# Colour science ----------------------------------------------------------------------------------------------


def test_rgb_to_lab_matches_reference_values_and_inverts():
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [128, 128, 128]]))
    assert np.allclose(lab[0], [100, 0, 0], atol=0.01)
    assert np.allclose(lab[1], [0, 0, 0], atol=0.01)
    assert np.allclose(lab[2], [53.24, 80.09, 67.20], atol=0.02)
    assert np.allclose(lab[3], [53.59, 0, 0], atol=0.02)
    colours = np.random.default_rng(0).uniform(0, 255, (50, 3))
    assert np.allclose(lab_to_srgb(srgb_to_lab(colours), clip=False), colours, atol=1e-6)


@pytest.mark.parametrize("ita", [-60, -50, -31, -10, 0, 10, 27.5, 35, 48, 56, 70, 80])
def test_skin_rgb_for_ita_has_that_ita_and_a_skin_hue(ita):
    rng = np.random.default_rng(int(ita) + 100)
    for colour in (skin_rgb_for_ita(ita), skin_rgb_for_ita(ita, rng), skin_rgb_for_ita(ita, rng)):
        assert colour.shape == (3,)
        assert colour.min() >= 0 and colour.max() <= 255
        assert abs(ita_of_rgb(colour) - ita) < 1.0
        assert abs(ita_of_rgb(np.round(colour)) - ita) < 1.5  # stored as 8 bits
        lightness, a_star, b_star = srgb_to_lab(colour)
        assert 19.9 <= lightness <= 90.1
        assert 0 < a_star < 15 and 0 < b_star < 23  # reddish-yellow: skin, not grey or green
        assert colour[0] >= colour[1] >= colour[2]


def test_skin_rgb_for_ita_refuses_an_impossible_angle():
    with pytest.raises(ValueError, match="ITA 95"):
        skin_rgb_for_ita(95)


@pytest.mark.parametrize(
    ("ita", "band"),
    [(70, "very_light"), (55.1, "very_light"), (50, "light"), (30, "intermediate"), (12, "tan"), (0, "brown"),
     (-29, "brown"), (-45, "dark")],
)  # fmt: skip
def test_ita_bands(ita, band):
    assert ita_band(ita) == band


# The seven diagnoses ------------------------------------------------------------------------------------------


def test_every_diagnosis_draws_a_framed_lesion_of_its_own_look():
    """Mean lesion colour relative to the skin: vasc is the reddest-purple, bcc and akiec pinker than nv and
    mel, df and bkl lighter than nv; and every lesion lies inside the photo."""
    relative = {}
    for diagnosis in DIAGNOSES:
        ratios = []
        for index in range(6):
            photo = generate_diagnosis(np.random.default_rng([1, index]), diagnosis, size=48, skin_ita=40.0)
            mask, image = photo.mask, pixels(photo.image).astype(np.float64)
            assert photo.image.size == (48, 48) and photo.diagnosis == diagnosis
            assert 0.005 < mask.mean() < 0.5
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            ratios.append(image[mask].mean(0) / np.median(image[~mask], 0))
        relative[diagnosis] = np.mean(ratios, axis=0)
    green_over_red = {name: ratio[1] / ratio[0] for name, ratio in relative.items()}
    assert min(green_over_red, key=green_over_red.get) == "vasc"
    assert green_over_red["bcc"] < green_over_red["nv"] and green_over_red["akiec"] < green_over_red["nv"]
    assert relative["bkl"].mean() > relative["nv"].mean() and relative["df"].mean() > relative["mel"].mean()


def test_unknown_diagnosis_and_bad_faint_on_dark_are_refused():
    with pytest.raises(ValueError, match="unknown diagnosis 'scc'"):
        generate_diagnosis(np.random.default_rng(0), "scc", size=32)
    with pytest.raises(ValueError, match="faint_on_dark"):
        generate_diagnosis(np.random.default_rng(0), "mel", size=32, faint_on_dark=1.5)


def test_photos_of_one_lesion_differ_in_pose_and_light_but_not_in_lesion():
    photos = photograph_lesion("mel", lesion_seed=[3, 1], photos=3, skin_ita=30.0, size=48)
    arrays = [pixels(photo.image) for photo in photos]
    for first in range(3):
        for second in range(first + 1, 3):
            assert np.abs(arrays[first] - arrays[second]).mean() > 3  # moved and relit
    areas = [photo.mask.mean() for photo in photos]
    assert max(areas) < 1.35 * min(areas)  # the same lesion: zoom changes its area by at most ~17% each way
    colours = [array[photo.mask].mean(0) for array, photo in zip(arrays, photos, strict=True)]
    assert np.abs(colours[0] - colours[1]).max() < 12
    again = photograph_lesion("mel", lesion_seed=[3, 1], photos=3, skin_ita=30.0, size=48)
    assert all(np.array_equal(a, pixels(b.image)) for a, b in zip(arrays, again, strict=True))


def _lesion_statistics(diagnosis: str, ita: float, faint: float) -> tuple[float, float, float]:
    """Over eight lesions: colour variegation (the spread of chromaticity, which ignores shading), the area,
    and the mean colour's distance from a plain brown, relative to the skin (so dark and light skin compare)."""
    variegation, area, contrast = [], [], []
    for index in range(8):
        photo = photograph_lesion(diagnosis, lesion_seed=[7, index], photos=1, skin_ita=ita, size=48,
                                  faint_on_dark=faint)[0]  # fmt: skip
        image = pixels(photo.image).astype(np.float64)
        inside = image[photo.mask]
        variegation.append((inside / inside.sum(1, keepdims=True)).std(0).sum())
        area.append(photo.mask.mean())
        relative = inside.mean(0) / np.median(image[~photo.mask], 0)
        contrast.append(np.abs(relative - np.array([0.66, 0.55, 0.46])).sum())
    return float(np.mean(variegation)), float(np.mean(area)), float(np.mean(contrast))


def test_faint_on_dark_makes_malignant_features_fainter_on_dark_skin_only():
    variegation, area, _ = _lesion_statistics("mel", -40.0, 0.0)
    faint_variegation, faint_area, _ = _lesion_statistics("mel", -40.0, 0.8)
    naevus_variegation, naevus_area, _ = _lesion_statistics("nv", -40.0, 0.0)
    assert faint_variegation < 0.75 * variegation and faint_area < 0.75 * area
    assert faint_variegation < 1.15 * naevus_variegation and faint_area < 1.15 * naevus_area  # naevus-like
    for diagnosis in ("bcc", "akiec"):
        contrast = _lesion_statistics(diagnosis, -20.0, 0.0)[2]
        faint_contrast = _lesion_statistics(diagnosis, -20.0, 0.8)[2]
        assert faint_contrast < 0.8 * contrast  # less pink or red, nearer a plain brown
    for diagnosis, ita in (("mel", 20.0), ("bcc", 45.0), ("nv", -40.0), ("vasc", -40.0)):
        plain = photograph_lesion(diagnosis, lesion_seed=[7, 0], photos=1, skin_ita=ita, size=32)[0]
        faint = photograph_lesion(diagnosis, lesion_seed=[7, 0], photos=1, skin_ita=ita, size=32, faint_on_dark=0.8)
        assert np.array_equal(pixels(plain.image), pixels(faint[0].image)), (diagnosis, ita)


# Cohorts -----------------------------------------------------------------------------------------------------


def test_cohort_patients_have_one_skin_tone_and_one_to_three_lesions_of_two_to_four_photos():
    cohort = plan_cohort(80, seed=2, ita_low=-20, ita_high=30)
    assert [lesion.number for lesion in cohort] == list(range(80))
    by_patient = defaultdict(list)
    for lesion in cohort:
        by_patient[lesion.patient].append(lesion)
        assert 2 <= lesion.photos <= 4
        assert -20 <= lesion.skin_ita <= 30
        assert lesion.age % 5 == 0 and lesion.sex in ("male", "female")
    assert all(1 <= len(lesions) <= 3 for lesions in by_patient.values())
    assert Counter(len(lesions) for lesions in by_patient.values()).keys() == {1, 2, 3}
    for lesions in by_patient.values():
        assert len({(lesion.skin_ita, lesion.sex, lesion.age) for lesion in lesions}) == 1
    assert plan_cohort(80, seed=2, ita_low=-20, ita_high=30) == cohort
    assert plan_cohort(80, seed=3, ita_low=-20, ita_high=30) != cohort


def test_cohort_class_mix_is_hams_by_default_or_balanced():
    counts = Counter(lesion.dx for lesion in plan_cohort(100, seed=0))
    assert set(counts) == set(DIAGNOSES)
    assert counts.most_common(1)[0] == ("nv", 67)
    balanced = Counter(lesion.dx for lesion in plan_cohort(70, seed=0, balanced=True))
    assert balanced == dict.fromkeys(DIAGNOSES, 10)
    with pytest.raises(ValueError, match="unknown diagnoses"):
        plan_cohort(10, mix={"nv": 1, "scc": 1})
    with pytest.raises(ValueError, match="photos_per_lesion"):
        plan_cohort(10, photos_per_lesion=(3, 2))


# The layouts -------------------------------------------------------------------------------------------------


def check_truth_and_groups(truth: list[dict[str, str]], images: dict[str, str]) -> None:
    """Each lesion has 2-4 photos, all of one diagnosis and one patient; each patient one skin tone; the
    truth's band and Fitzpatrick type follow from its ITA."""
    assert set(truth[0]) == set(TRUTH_COLUMNS)
    assert sorted(row["image_id"] for row in truth) == sorted(images)
    lesions, patients = defaultdict(list), defaultdict(set)
    for row in truth:
        lesions[row["lesion_id"]].append(row)
        patients[row["patient_id"]].add(row["skin_ita"])
        assert row["ita_band"] == ita_band(float(row["skin_ita"]))
        assert row["fitzpatrick"] == FITZPATRICK_BY_BAND[row["ita_band"]]
        assert abs(float(row["photo_ita"]) - float(row["skin_ita"])) < 6  # exposure: up to ~4 degrees near 0
        assert row["malignant"] == str(int(row["dx"] in MALIGNANT_DIAGNOSES))
        assert images[row["image_id"]] == row["dx"]  # the published file agrees
    for photos in lesions.values():
        assert 2 <= len(photos) <= 4
        assert len({(row["dx"], row["patient_id"]) for row in photos}) == 1
        assert sorted(int(row["photo"]) for row in photos) == list(range(len(photos)))
    assert all(len(tones) == 1 for tones in patients.values())
    assert len(patients) < len(lesions)  # some patients have several lesions


def test_ham10000_layout(ham):
    root, (header, rows), truth = ham
    assert ",".join(header) == ",".join(HAM10000_COLUMNS) == "lesion_id,image_id,dx,dx_type,age,sex,localization"
    assert sorted(path.name for path in root.iterdir()) == [
        "HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_metadata.csv", "synthetic_truth.csv"
    ]  # fmt: skip
    parts = [sorted(path.name for path in (root / f"HAM10000_images_part_{n}").iterdir()) for n in (1, 2)]
    assert all(re.fullmatch(r"ISIC_00\d{5}\.jpg", name) for part in parts for name in part)
    assert parts[0] and parts[1] and parts[0][-1] < parts[1][0]
    assert sorted(parts[0] + parts[1]) == sorted(f"{row['image_id']}.jpg" for row in rows)
    assert len({row["image_id"] for row in rows}) == len(rows)
    assert [(row["dx"], row["lesion_id"]) for row in rows] == sorted((row["dx"], row["lesion_id"]) for row in rows)
    for row in rows:
        assert re.fullmatch(r"HAM_\d{7}", row["lesion_id"])
        assert row["dx"] in DIAGNOSES
        assert row["dx_type"] in {"histo", "follow_up", "consensus", "confocal"}
        assert row["age"] == "" or (row["age"].endswith(".0") and float(row["age"]) % 5 == 0)
        assert row["sex"] in {"male", "female", "unknown"}
        assert row["localization"] in HAM_LOCALIZATIONS
    assert any(row["age"] == "" for row in rows) and any(row["sex"] == "unknown" for row in rows)
    assert {row["dx_type"] for row in rows if row["dx"] in MALIGNANT_DIAGNOSES} == {"histo"}
    check_truth_and_groups(truth, {row["image_id"]: row["dx"] for row in rows})
    lesion_of = {row["image_id"]: row["lesion_id"] for row in rows}
    assert all(lesion_of[row["image_id"]] == row["lesion_id"] for row in truth)


def test_isic_archive_layout(archive):
    root, (header, rows), truth = archive
    assert header == list(ISIC_ARCHIVE_COLUMNS)
    assert ",".join(header) == (
        "isic_id,patient_id,lesion_id,benign_malignant,diagnosis_1,diagnosis_2,diagnosis_3,"
        "anatom_site_general,age_approx,sex,fitzpatrick_skin_type"
    )
    assert sorted(path.name for path in root.iterdir()) == ["images", "metadata.csv", "synthetic_truth.csv"]
    files = sorted(path.name for path in (root / "images").iterdir())
    assert files == sorted(f"{row['isic_id']}.jpg" for row in rows)
    assert all(re.fullmatch(r"ISIC_\d{7}\.jpg", name) for name in files)
    truth_of = {row["image_id"]: row for row in truth}
    for row in rows:
        real = truth_of[row["isic_id"]]
        assert (row["patient_id"], row["lesion_id"]) == (real["patient_id"], real["lesion_id"])
        assert re.fullmatch(r"IP_\d{7}", row["patient_id"]) and re.fullmatch(r"IL_\d{7}", row["lesion_id"])
        assert row["fitzpatrick_skin_type"] in ("", real["fitzpatrick"])
        assert row["age_approx"] == "" or int(row["age_approx"]) % 5 == 0
        if row["benign_malignant"] in ("benign", "malignant"):
            assert row["benign_malignant"] == ("malignant" if real["malignant"] == "1" else "benign")
            assert row["diagnosis_1"] == row["benign_malignant"].capitalize()
    states = Counter(row["benign_malignant"] for row in rows)
    assert set(states) == {"benign", "malignant", "indeterminate", ""}
    assert states["indeterminate"] + states[""] < 0.2 * len(rows)
    types = [row["fitzpatrick_skin_type"] for row in rows]
    assert "" in types and len(set(types) - {""}) >= 3
    check_truth_and_groups(truth, {row["isic_id"]: truth_of[row["isic_id"]]["dx"] for row in rows})


def test_isic2020_layout(isic2020):
    root, (header, rows), truth = isic2020
    assert (
        ",".join(header)
        == ",".join(ISIC2020_COLUMNS)
        == ("image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target")
    )
    assert sorted(path.name for path in root.iterdir()) == ["synthetic_truth.csv", "train", "train.csv"]
    assert sorted(path.name for path in (root / "train").iterdir()) == sorted(f"{r['image_name']}.jpg" for r in rows)
    truth_of = {row["image_id"]: row for row in truth}
    for row in rows:
        assert row["target"] == ("1" if row["diagnosis"] == "melanoma" else "0")
        assert row["benign_malignant"] == ("malignant" if row["target"] == "1" else "benign")
        assert row["patient_id"] == truth_of[row["image_name"]]["patient_id"]
        assert row["anatom_site_general_challenge"] in {
            "", "head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital"
        }  # fmt: skip
    assert {"melanoma", "unknown"} <= {row["diagnosis"] for row in rows}
    check_truth_and_groups(truth, {row["image_name"]: truth_of[row["image_name"]]["dx"] for row in rows})
    with pytest.raises(ValueError, match="ISIC 2020 has no \\['bcc'\\]"):
        write_isic2020(root / "no", lesions=5, mix={"bcc": 1, "nv": 1})


def test_writers_are_deterministic_by_seed_and_take_a_skin_tone_range(tmp_path, ham):
    root, (_, rows), truth = ham
    again = write_ham10000(tmp_path / "again", lesions=40, size=32, seed=4)
    assert (again / "HAM10000_metadata.csv").read_bytes() == (root / "HAM10000_metadata.csv").read_bytes()
    for name in (rows[0]["image_id"], rows[-1]["image_id"]):
        part = next(
            p for p in ("HAM10000_images_part_1", "HAM10000_images_part_2") if (root / p / f"{name}.jpg").exists()
        )
        assert (again / part / f"{name}.jpg").read_bytes() == (root / part / f"{name}.jpg").read_bytes()
    other = write_ham10000(tmp_path / "other", lesions=40, size=32, seed=5, ita_low=-50, ita_high=-31, balanced=True)
    assert (other / "HAM10000_metadata.csv").read_bytes() != (root / "HAM10000_metadata.csv").read_bytes()
    shifted = read_csv(other / "synthetic_truth.csv")[1]
    assert {row["ita_band"] for row in shifted} == {"dark"}
    assert len({row["ita_band"] for row in truth}) >= 5  # the default range spans the bands
