"""Synthetic dermatology collections written in the exact layouts of HAM10000, the ISIC archive's CSV export
and ISIC 2020, for testing readers, group-aware splits and skin-tone subgroup metrics.

A cohort (plan_cohort) is patients, each with one skin tone (an ITA drawn uniformly from [ita_low,
ita_high]), a sex and an age, and 1-3 lesions each; a lesion has one diagnosis and body site and 2-4
photos (mlcore.synthetic_classes.photograph_lesion: the same lesion under another pose and light). All of it
is deterministic from the seed.

Every writer also writes ``synthetic_truth.csv`` (TRUTH_COLUMNS): for each image its lesion, its patient
(which HAM10000's own CSV does not carry), the diagnosis, and the skin's true ITA, band and Fitzpatrick
type, so tests and benchmarks can check an ITA measurement and a planted skin-tone gap (faint_on_dark,
described in mlcore.synthetic_classes).

Values follow the published files: HAM10000's and ISIC 2020's ages are written "45.0", the archive's "45";
missing values are empty cells; a few archive rows are "indeterminate" or have no benign_malignant.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlcore.data import skin_rgb_for_ita
from mlcore.skintone import band_of
from mlcore.synthetic_classes import DIAGNOSES, HAM10000_MIX, MALIGNANT_DIAGNOSES, photograph_lesion

HAM10000_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
ISIC_ARCHIVE_COLUMNS = (
    "isic_id", "patient_id", "lesion_id", "benign_malignant", "diagnosis_1", "diagnosis_2", "diagnosis_3",
    "anatom_site_general", "age_approx", "sex", "fitzpatrick_skin_type",
)  # fmt: skip
ISIC2020_COLUMNS = (
    "image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
    "benign_malignant", "target",
)  # fmt: skip
TRUTH_COLUMNS = (
    "image_id", "lesion_id", "patient_id", "photo", "dx", "malignant", "skin_ita", "ita_band", "photo_ita",
    "fitzpatrick",
)  # fmt: skip
FITZPATRICK_BY_BAND = {"very_light": "I", "light": "II", "intermediate": "III", "tan": "IV", "brown": "V", "dark": "VI"}

# The ISIC archive's diagnosis hierarchy (diagnosis_1, _2, _3) for each HAM10000 class; one is drawn per lesion.
ISIC_ARCHIVE_DIAGNOSES = {
    "akiec": [("Malignant", "Malignant epidermal proliferations", "Squamous cell carcinoma in situ")],
    "bcc": [("Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma")],
    "bkl": [("Benign", "Benign epidermal proliferations", "Seborrheic keratosis"),
            ("Benign", "Benign epidermal proliferations", "Pigmented benign keratosis"),
            ("Benign", "Flat melanotic pigmentations - not melanocytic nevus", "Solar lentigo")],
    "df": [("Benign", "Benign soft tissue proliferations - Fibro-histiocytic", "Dermatofibroma")],
    "mel": [("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive"),
            ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma in situ")],
    "nv": [("Benign", "Benign melanocytic proliferations", "Nevus")],
    "vasc": [("Benign", "Benign soft tissue proliferations - Vascular", "Hemangioma")],
}  # fmt: skip
# What an "indeterminate" archive row says instead, for the classes that have one.
ISIC_ARCHIVE_INDETERMINATE = {
    "akiec": ("Indeterminate", "Indeterminate epidermal proliferations", "Solar or actinic keratosis"),
    "mel": ("Indeterminate", "Indeterminate melanocytic proliferations", "Atypical melanocytic neoplasm"),
    "nv": ("Indeterminate", "Indeterminate melanocytic proliferations", "Atypical melanocytic neoplasm"),
}
# ISIC 2020 has only these classes (its target is melanoma); most naevi there are "unknown".
ISIC2020_DIAGNOSES = {
    "mel": ["melanoma"],
    "nv": ["unknown", "unknown", "unknown", "nevus"],
    "bkl": ["seborrheic keratosis", "lentigo NOS", "lichenoid keratosis", "solar lentigo"],
}
ISIC2020_MIX = {"bkl": 0.1, "mel": 0.15, "nv": 0.75}

# Body sites by HAM10000's localization; the ISIC files use coarser names.
_SITES = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity", "neck",
    "scalp", "trunk", "unknown", "upper extremity",
)  # fmt: skip
_SUN_EXPOSED = (4, 0, 18, 8, 3, 30, 0, 0, 4, 10, 5, 6, 2, 2, 12)  # weights for akiec, bcc, bkl
_ELSEWHERE = (10, 2, 28, 5, 0, 4, 3, 1, 1, 22, 1, 0, 12, 1, 10)
_ARCHIVE_SITE = {
    "abdomen": "anterior torso", "acral": "palms/soles", "back": "posterior torso", "chest": "anterior torso",
    "ear": "head/neck", "face": "head/neck", "foot": "lower extremity", "genital": "oral/genital",
    "hand": "upper extremity", "lower extremity": "lower extremity", "neck": "head/neck", "scalp": "head/neck",
    "trunk": "lateral torso", "unknown": "", "upper extremity": "upper extremity",
}  # fmt: skip
_DX_TYPES = {
    "akiec": {"histo": 1.0}, "bcc": {"histo": 1.0}, "mel": {"histo": 1.0},
    "bkl": {"histo": 0.5, "consensus": 0.3, "confocal": 0.2}, "df": {"histo": 0.4, "consensus": 0.6},
    "nv": {"follow_up": 0.5, "histo": 0.4, "consensus": 0.08, "confocal": 0.02},
    "vasc": {"histo": 0.3, "consensus": 0.7},
}  # fmt: skip


@dataclass(frozen=True)
class CohortLesion:
    """One lesion of a synthetic cohort, and its patient's traits (one skin tone, sex and age per patient)."""

    number: int
    patient: int
    dx: str
    site: str  # a HAM10000 localization
    photos: int
    skin_ita: float
    sex: str  # "male" or "female"
    age: int  # a multiple of 5


def _class_counts(mix: Mapping[str, float], count: int) -> dict[str, int]:
    """Lesions per class: proportional to the mix (largest remainders), at least one of each when possible."""
    names = sorted(mix)
    share = np.array([mix[name] for name in names], dtype=np.float64)
    if (share < 0).any() or share.sum() <= 0:
        raise ValueError(f"class mix {dict(mix)} needs non-negative weights with a positive sum")
    exact = share / share.sum() * count
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[: count - counts.sum()]] += 1
    if count >= len(names):
        while (counts == 0).any():
            counts[np.argmax(counts)] -= 1
            counts[np.argmin(counts)] += 1
    return dict(zip(names, counts.tolist(), strict=True))


def plan_cohort(
    lesions: int,
    *,
    seed: int = 0,
    ita_low: float = -50.0,
    ita_high: float = 70.0,
    mix: Mapping[str, float] | None = None,
    balanced: bool = False,
    photos_per_lesion: tuple[int, int] = (2, 4),
) -> list[CohortLesion]:
    """Patients with 1-3 lesions each until there are `lesions`: diagnoses in the proportions of ``mix``
    (HAM10000's by default) or equal (``balanced``), patient skin tones uniform in [ita_low, ita_high]."""
    mix = dict(HAM10000_MIX if mix is None else mix)
    unknown = sorted(set(mix) - set(DIAGNOSES))
    if unknown:
        raise ValueError(f"unknown diagnoses {unknown} in the class mix: use {', '.join(DIAGNOSES)}")
    if lesions < 1 or not -89 <= ita_low <= ita_high <= 89:
        raise ValueError(
            f"need lesions >= 1 and -89 <= ita_low <= ita_high <= 89, got {lesions}, {ita_low}, {ita_high}"
        )
    low, high = photos_per_lesion
    if not 1 <= low <= high:
        raise ValueError(f"photos_per_lesion {photos_per_lesion} must be (low, high) with 1 <= low <= high")
    if balanced:
        mix = dict.fromkeys(mix, 1.0)
    rng = np.random.default_rng([seed, 0])
    counts = _class_counts(mix, lesions)
    diagnoses = rng.permutation([name for name in sorted(counts) for _ in range(counts[name])])
    cohort: list[CohortLesion] = []
    patient = 0
    while len(cohort) < lesions:
        ita, sex = float(rng.uniform(ita_low, ita_high)), str(rng.choice(["female", "male"]))
        age = int(np.clip(5 * round(rng.normal(55, 15) / 5), 5, 85))
        for _ in range(min(int(rng.integers(1, 4)), lesions - len(cohort))):
            dx = str(diagnoses[len(cohort)])
            weights = np.array(_SUN_EXPOSED if dx in ("akiec", "bcc", "bkl") else _ELSEWHERE, dtype=np.float64)
            site = str(rng.choice(_SITES, p=weights / weights.sum()))
            photos = int(rng.integers(low, high + 1))
            cohort.append(CohortLesion(len(cohort), patient, dx, site, photos, ita, sex, age))
        patient += 1
    return cohort


def _ids(rng: np.random.Generator, count: int, prefix: str, *, start: int | None = None) -> list[str]:
    """`count` distinct ids such as ISIC_0024306: shuffled from `start` on, or random 7-digit numbers."""
    numbers = start + rng.permutation(count) if start is not None else rng.choice(10_000_000, count, replace=False)
    return [f"{prefix}{number:07d}" for number in numbers]


def _pick(rng: np.random.Generator, count: int, fraction: float) -> set[int]:
    """A seeded `fraction` of range(count), at least one when count >= 10: rare cases still show up in tests."""
    chosen = round(fraction * count) if count < 10 else max(1, round(fraction * count))
    return set(rng.choice(count, size=min(chosen, count), replace=False).tolist())


def _render(
    root: Path,
    cohort: list[CohortLesion],
    image_ids: list[str],
    folder: Callable[[str], str],
    *,
    size: int,
    seed: int,
    faint_on_dark: float,
) -> list[dict[str, object]]:
    """Photograph every lesion into root/folder(image_id)/image_id.jpg (image ids in cohort order, photo by
    photo) and return the truth rows."""
    truth: list[dict[str, object]] = []
    skins = {}
    names = iter(image_ids)
    for lesion in cohort:
        if lesion.patient not in skins:
            skins[lesion.patient] = skin_rgb_for_ita(lesion.skin_ita, np.random.default_rng([seed, 2, lesion.patient]))
        photos = photograph_lesion(
            lesion.dx, lesion_seed=[seed, 1, lesion.number], photos=lesion.photos, skin_ita=lesion.skin_ita,
            skin_rgb=skins[lesion.patient], size=size, faint_on_dark=faint_on_dark,
        )  # fmt: skip
        for index, photo in enumerate(photos):
            image_id = next(names)
            directory = root / folder(image_id)
            directory.mkdir(parents=True, exist_ok=True)
            photo.image.save(directory / f"{image_id}.jpg", format="JPEG")
            band = band_of(lesion.skin_ita)
            truth.append({
                "image_id": image_id, "lesion_id": "", "patient_id": "", "photo": index, "dx": lesion.dx,
                "malignant": int(lesion.dx in MALIGNANT_DIAGNOSES), "skin_ita": f"{lesion.skin_ita:.2f}",
                "ita_band": band, "photo_ita": f"{photo.photo_ita:.2f}", "fitzpatrick": FITZPATRICK_BY_BAND[band],
            })  # fmt: skip
    return truth


def _write_csv(path: Path, columns: Iterable[str], rows: Iterable[Mapping[str, object]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _photo_ids(cohort: list[CohortLesion]) -> list[tuple[CohortLesion, int]]:
    return [(lesion, index) for lesion in cohort for index in range(lesion.photos)]


def _truth(truth: list[dict[str, object]], lesion_ids: list[str], patient_ids: list[str], photos) -> list[dict]:
    for row, (lesion, _) in zip(truth, photos, strict=True):
        row["lesion_id"], row["patient_id"] = lesion_ids[lesion.number], patient_ids[lesion.patient]
    return sorted(truth, key=lambda row: str(row["image_id"]))


def write_ham10000(
    root: str | Path,
    *,
    lesions: int = 60,
    size: int = 64,
    seed: int = 0,
    faint_on_dark: float = 0.0,
    first_image: int = 24306,
    **cohort,
) -> Path:
    """HAM10000 as published: root/HAM10000_metadata.csv (HAM10000_COLUMNS, rows grouped by dx and lesion) and
    root/HAM10000_images_part_1|2/ISIC_00xxxxx.jpg (image numbers from ``first_image`` on, as HAM10000's from
    ISIC_0024306, shuffled across lesions; the lower half in part 1), plus root/synthetic_truth.csv. Two sets
    meant to be read together need first_images apart (lesion ids are random 7-digit numbers). ``cohort``:
    plan_cohort's options (ita_low, ita_high, mix, balanced, photos_per_lesion)."""
    root = Path(root)
    plan = plan_cohort(lesions, seed=seed, **cohort)
    photos = _photo_ids(plan)
    rng = np.random.default_rng([seed, 3])
    image_ids = _ids(rng, len(photos), "ISIC_", start=first_image)
    lesion_ids = _ids(rng, len(plan), "HAM_")
    patients = plan[-1].patient + 1
    patient_ids = _ids(rng, patients, "HAMP_")  # in the truth file only: HAM10000 publishes no patient ids
    no_age, unknown_sex = _pick(rng, patients, 0.02), _pick(rng, patients, 0.01)
    no_site = _pick(rng, len(plan), 0.02)
    lesion_site = {lesion.number: "unknown" if lesion.number in no_site else lesion.site for lesion in plan}
    dx_type = {lesion.number: str(rng.choice(list(_DX_TYPES[lesion.dx]), p=list(_DX_TYPES[lesion.dx].values())))
               for lesion in plan}  # fmt: skip
    split = first_image + len(photos) // 2
    truth = _render(root, plan, image_ids, lambda name: f"HAM10000_images_part_{1 if int(name[5:]) < split else 2}",
                    size=size, seed=seed, faint_on_dark=faint_on_dark)  # fmt: skip
    rows = [
        {"lesion_id": lesion_ids[lesion.number], "image_id": image_id, "dx": lesion.dx,
         "dx_type": dx_type[lesion.number], "age": "" if lesion.patient in no_age else f"{lesion.age:.1f}",
         "sex": "unknown" if lesion.patient in unknown_sex else lesion.sex, "localization": lesion_site[lesion.number]}
        for (lesion, _), image_id in zip(photos, image_ids, strict=True)
    ]  # fmt: skip
    _write_csv(root / "HAM10000_metadata.csv", HAM10000_COLUMNS, sorted(rows, key=lambda r: (r["dx"], r["lesion_id"])))
    _write_csv(root / "synthetic_truth.csv", TRUTH_COLUMNS, _truth(truth, lesion_ids, patient_ids, photos))
    return root


def _archive_row(rng: np.random.Generator, lesion: CohortLesion, state: str) -> dict[str, str]:
    """The diagnosis columns of one archive lesion; state "" (as published), "indeterminate" or "missing"."""
    if state == "indeterminate":
        return dict(zip(("diagnosis_1", "diagnosis_2", "diagnosis_3"), ISIC_ARCHIVE_INDETERMINATE[lesion.dx],
                        strict=True)) | {"benign_malignant": "indeterminate"}  # fmt: skip
    choices = ISIC_ARCHIVE_DIAGNOSES[lesion.dx]
    first, second, third = choices[int(rng.integers(len(choices)))]
    benign_malignant = "" if state == "missing" else first.lower()
    return {"benign_malignant": benign_malignant, "diagnosis_1": first, "diagnosis_2": second, "diagnosis_3": third}


def write_isic_archive(
    root: str | Path, *, lesions: int = 60, size: int = 64, seed: int = 0, faint_on_dark: float = 0.0, **cohort
) -> Path:
    """An ISIC archive CSV export: root/metadata.csv (ISIC_ARCHIVE_COLUMNS, by isic_id) and
    root/images/ISIC_xxxxxxx.jpg, plus root/synthetic_truth.csv. Some 5% of the melanocytic lesions and
    actinic keratoses are "indeterminate", some 3% of lesions have no benign_malignant, and about a third of
    patients no Fitzpatrick type (the published exports have it only sometimes). ``cohort``: plan_cohort's."""
    root = Path(root)
    plan = plan_cohort(lesions, seed=seed, **cohort)
    photos = _photo_ids(plan)
    rng = np.random.default_rng([seed, 4])
    image_ids = _ids(rng, len(photos), "ISIC_")
    lesion_ids, patient_ids = _ids(rng, len(plan), "IL_"), _ids(rng, plan[-1].patient + 1, "IP_")
    eligible = [lesion.number for lesion in plan if lesion.dx in ISIC_ARCHIVE_INDETERMINATE]
    indeterminate = {eligible[index] for index in _pick(rng, len(eligible), 0.05)}
    missing = _pick(rng, len(plan), 0.03) - indeterminate
    no_type, no_age, no_sex = (_pick(rng, len(patient_ids), share) for share in (0.35, 0.03, 0.03))
    diagnosis = {
        lesion.number: _archive_row(rng, lesion, "indeterminate" if lesion.number in indeterminate
                                    else "missing" if lesion.number in missing else "")
        for lesion in plan
    }  # fmt: skip
    truth = _render(root, plan, image_ids, lambda name: "images", size=size, seed=seed, faint_on_dark=faint_on_dark)
    rows = [
        {"isic_id": image_id, "patient_id": patient_ids[lesion.patient], "lesion_id": lesion_ids[lesion.number],
         **diagnosis[lesion.number], "anatom_site_general": _ARCHIVE_SITE[lesion.site],
         "age_approx": "" if lesion.patient in no_age else str(lesion.age),
         "sex": "" if lesion.patient in no_sex else lesion.sex,
         "fitzpatrick_skin_type": "" if lesion.patient in no_type else row["fitzpatrick"]}
        for (lesion, _), image_id, row in zip(photos, image_ids, truth, strict=True)
    ]  # fmt: skip
    _write_csv(root / "metadata.csv", ISIC_ARCHIVE_COLUMNS, sorted(rows, key=lambda row: row["isic_id"]))
    _write_csv(root / "synthetic_truth.csv", TRUTH_COLUMNS, _truth(truth, lesion_ids, patient_ids, photos))
    return root


def write_isic2020(
    root: str | Path, *, lesions: int = 60, size: int = 64, seed: int = 0, faint_on_dark: float = 0.0, **cohort
) -> Path:
    """ISIC 2020's training set: root/train.csv (ISIC2020_COLUMNS, by image_name; target 1 for melanoma, no
    lesion id) and root/train/ISIC_xxxxxxx.jpg, plus root/synthetic_truth.csv. Only nv, mel and bkl exist
    there; the default mix is ISIC2020_MIX (more melanomas than the real 1.8%, so small sets have some)."""
    root = Path(root)
    cohort.setdefault("mix", ISIC2020_MIX)
    extra = sorted(set(cohort["mix"]) - set(ISIC2020_DIAGNOSES))
    if extra:
        raise ValueError(
            f"ISIC 2020 has no {extra}: its class mix may hold only {', '.join(sorted(ISIC2020_DIAGNOSES))}"
        )
    plan = plan_cohort(lesions, seed=seed, **cohort)
    photos = _photo_ids(plan)
    rng = np.random.default_rng([seed, 5])
    image_ids = _ids(rng, len(photos), "ISIC_")
    lesion_ids, patient_ids = _ids(rng, len(plan), "IL_"), _ids(rng, plan[-1].patient + 1, "IP_")
    # 2020's CSV has no lesion ids: the truth file's IL_ ids are the only ones
    no_age, no_sex = _pick(rng, len(patient_ids), 0.02), _pick(rng, len(patient_ids), 0.02)
    no_site = _pick(rng, len(plan), 0.03)
    names = {lesion.number: str(rng.choice(ISIC2020_DIAGNOSES[lesion.dx])) for lesion in plan}
    truth = _render(root, plan, image_ids, lambda name: "train", size=size, seed=seed, faint_on_dark=faint_on_dark)
    rows = []
    for (lesion, _), image_id in zip(photos, image_ids, strict=True):
        site = "" if lesion.number in no_site else _ARCHIVE_SITE[lesion.site]
        site = "torso" if site.endswith("torso") else site  # 2020 does not tell the torso's sides apart
        rows.append({
            "image_name": image_id, "patient_id": patient_ids[lesion.patient],
            "sex": "" if lesion.patient in no_sex else lesion.sex,
            "age_approx": "" if lesion.patient in no_age else f"{lesion.age:.1f}",
            "anatom_site_general_challenge": site, "diagnosis": names[lesion.number],
            "benign_malignant": "malignant" if lesion.dx == "mel" else "benign", "target": int(lesion.dx == "mel"),
        })  # fmt: skip
    _write_csv(root / "train.csv", ISIC2020_COLUMNS, sorted(rows, key=lambda row: row["image_name"]))
    _write_csv(root / "synthetic_truth.csv", TRUTH_COLUMNS, _truth(truth, lesion_ids, patient_ids, photos))
    return root
