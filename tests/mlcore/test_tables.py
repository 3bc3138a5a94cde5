"""mlcore.tables: the metadata readers on each published layout, their errors, and the group-aware split."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest

from mlcore.tables import (
    FORMATS,
    ColumnMapping,
    Record,
    TableError,
    group_ids,
    group_overlap,
    group_split,
    mapping_from_config,
    read_id_list,
    read_table,
    split_by_ids,
)

HAM_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
ISIC_ARCHIVE_HEADER = [
    "isic_id", "attribution", "copyright_license", "patient_id", "lesion_id", "benign_malignant", "diagnosis_1",
    "diagnosis_2", "diagnosis_3", "anatom_site_general", "age_approx", "sex", "fitzpatrick_skin_type",
]  # fmt: skip
ISIC2020_HEADER = [
    "image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis", "benign_malignant",
    "target",
]  # fmt: skip
HAM_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def touch(folder, *names):
    """Image files of one byte: the reader checks that they exist and never decodes them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"\xff")


def ham_rows():
    """One row per class, the last two photos of one lesion; a missing age, unknown sex and site."""
    rows = [
        [f"HAM_{i:07d}", f"ISIC_{i:07d}", dx, "histo", str(30 + i), "male", "back"] for i, dx in enumerate(HAM_CLASSES)
    ]
    rows.append(["HAM_0000006", "ISIC_0000007", "vasc", "consensus", "", "unknown", "unknown"])
    return rows


def ham_layout(tmp_path, rows=None):
    """HAM10000 as published: the metadata CSV and the images spread over two folders."""
    rows = ham_rows() if rows is None else rows
    csv_path = write_csv(tmp_path / "HAM10000_metadata.csv", HAM_HEADER, rows)
    ids = [row[1] for row in rows]
    touch(tmp_path / "images" / "HAM10000_images_part_1", *(f"{i}.jpg" for i in ids[:4]))
    touch(tmp_path / "images" / "HAM10000_images_part_2", *(f"{i}.jpg" for i in ids[4:]))
    return csv_path, tmp_path / "images"


def problem_of(call) -> str:
    with pytest.raises(TableError) as info:
        call()
    return str(info.value)


def test_ham10000_on_its_exact_layout_finds_images_in_both_folders(tmp_path):
    csv_path, images = ham_layout(tmp_path)
    (images / "HAM10000_images_part_1" / "._ISIC_0000000.jpg").write_bytes(b"")  # a macOS copy: left out
    table = read_table(csv_path, images, FORMATS["ham10000"])
    assert [r.image_id for r in table.records] == [f"ISIC_{i:07d}" for i in range(8)]
    assert table.class_names == HAM_CLASSES and table.malignant == ("akiec", "bcc", "mel")
    assert table.records[0].path == images / "HAM10000_images_part_1" / "ISIC_0000000.jpg"
    assert table.records[7].path == images / "HAM10000_images_part_2" / "ISIC_0000007.jpg"
    assert table.records[0].attributes == {"site": "back", "sex": "male", "age": 30.0, "fitzpatrick": None}
    assert table.records[7].attributes == {"site": None, "sex": None, "age": None, "fitzpatrick": None}
    assert table.records[6].lesion_id == table.records[7].lesion_id == "HAM_0000006"
    assert table.records[0].patient_id is None and table.skipped == [] and table.absent == ()
    assert table.sha256 == hashlib.sha256(csv_path.read_bytes()).hexdigest() and table.source == csv_path
    assert table.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 6]


def isic_archive_rows():
    return [
        ["ISIC_0000001", "x", "CC-BY", "IP_1", "IL_1", "benign", "Benign", "", "", "back", "45", "female", "II"],
        ["ISIC_0000002", "x", "CC-BY", "IP_1", "IL_2", "malignant", "Malignant", "", "", "face", "45", "female", "5"],
        ["ISIC_0000003", "x", "CC-BY", "", "", "indeterminate/benign", "", "", "", "", "", "", ""],
        ["ISIC_0000004", "x", "CC-BY", "", "", "", "", "", "", "", "", "", ""],
        ["ISIC_0000005", "x", "CC-BY", "", "", "benign", "Benign", "", "", "", "60", "male", ""],
    ]


def test_isic_archive_skips_indeterminate_and_empty_labels_and_reads_fitzpatrick(tmp_path):
    csv_path = write_csv(tmp_path / "metadata.csv", ISIC_ARCHIVE_HEADER, isic_archive_rows())
    touch(tmp_path / "images", "ISIC_0000001.jpg", "ISIC_0000002.JPG", "ISIC_0000005.png")  # 3 and 4 absent
    table = read_table(csv_path, tmp_path / "images", FORMATS["isic-archive"])
    assert [r.image_id for r in table.records] == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000005"]
    assert [(s.row, s.image_id) for s in table.skipped] == [(4, "ISIC_0000003"), (5, "ISIC_0000004")]
    assert "indeterminate/benign" in table.skipped[0].reason
    assert [r.attributes["fitzpatrick"] for r in table.records] == [2, 5, None]
    assert table.records[1].attributes["site"] == "face" and table.records[1].lesion_id == "IL_2"
    assert table.records[2].patient_id is None and table.records[2].lesion_id is None
    assert table.class_names == ("benign", "malignant") and table.malignant == ("malignant",)


def test_isic_archive_export_without_its_optional_columns(tmp_path):
    header = ["isic_id", "benign_malignant", "age_approx"]
    csv_path = write_csv(tmp_path / "metadata.csv", header, [["ISIC_1", "benign", "30"], ["ISIC_2", "malignant", ""]])
    touch(tmp_path / "images", "ISIC_1.jpg", "ISIC_2.jpg")
    table = read_table(csv_path, tmp_path / "images", FORMATS["isic-archive"])
    assert len(table.records) == 2
    assert set(table.absent) == {"lesion_id", "patient_id", "site", "sex", "fitzpatrick"}


def isic2020_layout(tmp_path):
    rows = [
        ["ISIC_2637011", "IP_7279968", "male", "45.0", "head/neck", "unknown", "benign", "0"],
        ["ISIC_0015719", "IP_3075186", "female", "45.0", "upper extremity", "unknown", "benign", "0"],
        ["ISIC_0052212", "IP_2842074", "female", "50.0", "lower extremity", "nevus", "benign", "0"],
        ["ISIC_0074268", "IP_6890425", "female", "", "", "melanoma", "malignant", "1"],
    ]
    csv_path = write_csv(tmp_path / "train.csv", ISIC2020_HEADER, rows)
    touch(tmp_path / "data" / "train", *(f"{row[0]}.jpg" for row in rows))
    return csv_path, tmp_path / "data"


def test_isic2020_on_its_exact_layout(tmp_path):
    csv_path, images = isic2020_layout(tmp_path)
    table = read_table(csv_path, images, FORMATS["isic2020"])
    assert [r.label for r in table.records] == ["benign", "benign", "benign", "malignant"]
    assert table.records[0].patient_id == "IP_7279968" and table.records[0].lesion_id is None
    assert table.records[3].path == images / "train" / "ISIC_0074268.jpg"
    assert table.records[1].attributes == {"site": "upper extremity", "sex": "female", "age": 45.0, "fitzpatrick": None}
    assert table.records[3].attributes["age"] is None


def test_isic2020_target_column_through_a_label_map(tmp_path):
    csv_path, images = isic2020_layout(tmp_path)
    mapping = mapping_from_config({"label": "target", "label_map": {0: "benign", 1: "malignant"}}, base="isic2020")
    assert mapping.label_map == {"0": "benign", "1": "malignant"} and mapping.image_id == "image_name"
    table = read_table(csv_path, images, mapping)
    assert [r.label for r in table.records] == ["benign", "benign", "benign", "malignant"]


def test_in_house_csv_with_a_path_column_semicolons_and_a_bom(tmp_path):
    text = "file_id;subject;diagnosis;file\nA1;P1;benign;clinic_a/A1.jpeg\nB2;P2;malignant;clinic_b/2024/B2.png\n"
    (tmp_path / "inhouse.csv").write_bytes("\ufeff".encode() + text.encode())
    touch(tmp_path / "photos" / "clinic_a", "A1.jpeg")
    touch(tmp_path / "photos" / "clinic_b" / "2024", "B2.png")
    config = {"image_id": "file_id", "label": "diagnosis", "path": "file", "patient_id": "subject"}
    mapping = mapping_from_config(config)
    table = read_table(tmp_path / "inhouse.csv", tmp_path / "photos", mapping)
    assert [(r.image_id, r.label, r.patient_id) for r in table.records] == [
        ("A1", "benign", "P1"),
        ("B2", "malignant", "P2"),
    ]
    assert table.records[1].path == tmp_path / "photos" / "clinic_b" / "2024" / "B2.png"
    assert table.class_names == ("benign", "malignant") and table.malignant == ("malignant",)


def test_in_house_path_column_errors_name_row_and_column(tmp_path):
    rows = [["A1", "benign", "a/A1.jpg"], ["A2", "benign", ""], ["A3", "malignant", "a/A3.gif"], ["A4", "", "a/A4.jpg"]]
    csv_path = write_csv(tmp_path / "inhouse.csv", ["id", "dx", "file"], rows)
    touch(tmp_path / "photos" / "a", "A3.gif", "A4.jpg")
    mapping = mapping_from_config({"image_id": "id", "label": "dx", "path": "file", "labels": ["benign", "malignant"]})
    message = problem_of(lambda: read_table(csv_path, tmp_path / "photos", mapping))
    assert f'row 2, column "file": no image file {tmp_path / "photos" / "a" / "A1.jpg"}' in message
    assert "row 3, column \"file\": the path is empty (image id 'A2')" in message
    assert 'row 4, column "file": A3.gif is not a .jpg/.jpeg/.png file' in message
    assert "row 5, column \"dx\": empty label; expected one of ['benign', 'malignant']" in message


def test_in_house_mapping_errors_name_what_to_change(tmp_path):
    assert "allowed are" in problem_of(lambda: mapping_from_config({"image_id": "a", "label": "b", "lable": "c"}))
    assert "'lable'" in problem_of(lambda: mapping_from_config({"image_id": "a", "label": "b", "lable": "c"}))
    assert "isic2020" in problem_of(lambda: mapping_from_config({}, base="isic2019"))
    assert "image_id and label" in problem_of(lambda: mapping_from_config({"label": "dx"}))
    extensions = mapping_from_config({"image_id": "a", "label": "b", "extensions": ["JPG", ".png"]}).extensions
    assert extensions == (".jpg", ".png")
    assert "must be a list" in problem_of(lambda: mapping_from_config({"image_id": "a", "label": "b", "labels": "x"}))
    assert "not among the labels" in problem_of(
        lambda: mapping_from_config({"image_id": "a", "label": "b", "labels": ["x", "y"], "malignant": ["z"]})
    )
    # A column the config names must be in the file, even where the preset had it optional.
    csv_path = write_csv(tmp_path / "m.csv", ["isic_id", "benign_malignant"], [["I1", "benign"], ["I2", "malignant"]])
    touch(tmp_path / "images", "I1.jpg", "I2.jpg")
    mapping = mapping_from_config({"patient_id": "patient"}, base="isic-archive")
    message = problem_of(lambda: read_table(csv_path, tmp_path / "images", mapping))
    assert 'row 1, column "patient": not found (patient_id); the columns are: isic_id, benign_malignant' in message


def test_a_missing_csv_or_images_folder(tmp_path):
    message = problem_of(lambda: read_table(tmp_path / "none.csv", tmp_path, FORMATS["ham10000"]))
    assert f"The metadata CSV (--metadata) {tmp_path / 'none.csv'} does not exist" in message
    csv_path = write_csv(tmp_path / "HAM10000_metadata.csv", HAM_HEADER, ham_rows())
    message = problem_of(lambda: read_table(csv_path, tmp_path / "nowhere", FORMATS["ham10000"]))
    assert "nowhere does not exist" in message and "--images" in message


def test_a_required_column_missing_lists_the_columns_present(tmp_path):
    csv_path = write_csv(tmp_path / "HAM10000_metadata.csv", ["lesion_id", "image_id", "diagnosis"], [["L", "I", "nv"]])
    message = problem_of(lambda: read_table(csv_path, tmp_path, FORMATS["ham10000"]))
    assert str(csv_path) in message and 'column "dx": not found (label)' in message
    assert "the columns are: lesion_id, image_id, diagnosis" in message


def test_an_empty_csv(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    assert "empty" in problem_of(lambda: read_table(tmp_path / "empty.csv", tmp_path, FORMATS["ham10000"]))


def ham_error(tmp_path, change) -> str:
    """The message for HAM10000 rows with one change made (rows: ham_rows(), images all present)."""
    rows = ham_rows()
    csv_path, images = ham_layout(tmp_path, rows)
    change(rows)
    write_csv(csv_path, HAM_HEADER, rows)
    return problem_of(lambda: read_table(csv_path, images, FORMATS["ham10000"]))


def test_an_empty_image_id_names_row_and_column(tmp_path):
    message = ham_error(tmp_path, lambda rows: rows[2].__setitem__(1, " "))
    assert 'row 4, column "image_id": the image id is empty' in message and "HAM10000_metadata.csv" in message


def test_a_missing_image_names_row_column_id_and_where_it_looked(tmp_path):
    message = ham_error(tmp_path, lambda rows: rows[3].__setitem__(1, "ISIC_9999999"))
    assert "row 5, column \"image_id\": no image file for 'ISIC_9999999'" in message
    assert str(tmp_path / "images") in message and "all its folders" in message


def test_an_unknown_label_names_row_column_value_and_the_labels_allowed(tmp_path):
    message = ham_error(tmp_path, lambda rows: rows[1].__setitem__(2, "melanoma"))
    assert "row 3, column \"dx\": unknown label 'melanoma'" in message
    assert "['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']" in message


def test_duplicate_image_ids_name_both_rows(tmp_path):
    message = ham_error(tmp_path, lambda rows: rows[5].__setitem__(1, rows[1][1]))
    assert "row 7, column \"image_id\": duplicate image id 'ISIC_0000001', also on row 3" in message


def test_an_empty_class_is_named(tmp_path):
    message = ham_error(tmp_path, lambda rows: rows.pop(3))  # the only df
    assert "column \"dx\": no row has the label 'df' (an empty class)" in message


def test_a_non_numeric_age_and_a_bad_skin_type_name_row_and_column(tmp_path):
    message = ham_error(tmp_path, lambda rows: rows[4].__setitem__(4, "forty"))
    assert "row 6, column \"age\": age 'forty' is not a number" in message
    rows = isic_archive_rows()
    rows[0][12] = "VII"
    csv_path = write_csv(tmp_path / "metadata.csv", ISIC_ARCHIVE_HEADER, rows)
    touch(tmp_path / "isic", "ISIC_0000001.jpg", "ISIC_0000002.jpg", "ISIC_0000005.jpg")
    message = problem_of(lambda: read_table(csv_path, tmp_path / "isic", FORMATS["isic-archive"]))
    assert "row 2, column \"fitzpatrick_skin_type\": 'VII' is not a Fitzpatrick skin type" in message


def test_many_problems_are_reported_together_with_a_count(tmp_path):
    rows = [[f"L{i}", f"I{i}", HAM_CLASSES[i % 7], "histo", "", "", ""] for i in range(25)]
    csv_path = write_csv(tmp_path / "HAM10000_metadata.csv", HAM_HEADER, rows)
    touch(tmp_path / "images", *(f"I{i}.jpg" for i in range(10)))
    with pytest.raises(TableError) as info:
        read_table(csv_path, tmp_path / "images", FORMATS["ham10000"])
    message = str(info.value)
    assert "15 problem(s)" in message and "... and 5 more" in message and len(info.value.problems) == 10
    assert "row 12, column" in message and "row 21, column" in message and "row 22, column" not in message


def test_one_id_matching_two_files_is_an_error(tmp_path):
    rows = ham_rows()
    csv_path, images = ham_layout(tmp_path, rows)
    touch(images / "HAM10000_images_part_2", "ISIC_0000000.jpg")
    message = problem_of(lambda: read_table(csv_path, images, FORMATS["ham10000"]))
    assert "row 2, column \"image_id\": 'ISIC_0000000' matches 2 files" in message


def test_a_file_that_is_not_utf8_names_its_row(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"image_id,dx\nI1,nv\nI\xe92,nv\n")
    assert "row 3 is not UTF-8" in problem_of(lambda: read_table(tmp_path / "m.csv", tmp_path, FORMATS["ham10000"]))


def record(image_id, lesion=None, patient=None, label="benign"):
    return Record(image_id, label, None, lesion, patient)


def test_group_ids_join_lesions_and_patients_transitively():
    records = [
        record("a", lesion="L1"),
        record("b", lesion="L1", patient="P1"),
        record("c", lesion="L2", patient="P1"),  # L2 joins L1 through the patient
        record("d", lesion="L3"),
        record("e"),
        record("f"),
        record("g", lesion="L2"),
        record("h", patient="L3"),  # a patient id equal to a lesion id is another group
    ]
    assert group_ids(records).tolist() == [0, 0, 0, 1, 2, 3, 0, 4]
    assert group_ids([]).tolist() == []


def synthetic_groups(seed: int = 0, patients: int = 900):
    """Records of 1-3 lesions per patient, 2-4 photos per lesion, labels per lesion of uneven frequency;
    a third of patients unknown (their lesions stand alone)."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(patients):
        patient = f"P{p}" if rng.random() > 0.33 else None
        for lesion in range(rng.integers(1, 4)):
            label = rng.choice(["nv", "mel", "bkl", "df"], p=[0.6, 0.2, 0.15, 0.05])
            for photo in range(rng.integers(2, 5)):
                records.append(record(f"I{p}_{lesion}_{photo}", f"L{p}_{lesion}", patient, str(label)))
    return records


def test_group_split_keeps_each_lesion_and_patient_on_one_side_stratified():
    records = synthetic_groups()
    assert len(records) > 3000
    labels = np.asarray([r.label for r in records])
    groups = group_ids(records)
    kept, held = group_split(labels, groups, 0.2, seed=3)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(records)))
    assert not set(groups[kept]) & set(groups[held])
    report = group_overlap([records[i] for i in kept], [records[i] for i in held])
    assert report["lesions"]["shared"] == report["patients"]["shared"] == report["affected"] == 0
    for name in ("nv", "mel", "bkl", "df"):
        share = (labels[held] == name).sum() / (labels == name).sum()
        assert 0.12 < share < 0.28, (name, share)


def test_group_split_is_seeded():
    records = synthetic_groups(patients=300)
    labels, groups = np.asarray([r.label for r in records]), group_ids(records)
    first = group_split(labels, groups, 0.25, seed=1)
    again = group_split(labels, groups, 0.25, seed=1)
    other = group_split(labels, groups, 0.25, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[1], other[1])


def test_group_split_puts_a_rare_class_on_both_sides_even_in_mixed_groups():
    # "rare" occurs only inside two patients' groups, each dominated by common images.
    labels = np.asarray(["common"] * 40 + ["rare", "common", "common", "rare", "common", "common"])
    groups = np.concatenate([np.arange(40), [100, 100, 100, 101, 101, 101]])
    kept, held = group_split(labels, groups, 0.2, seed=0)
    assert "rare" in labels[kept] and "rare" in labels[held]
    assert not set(groups[kept]) & set(groups[held])
    # "c" is only in groups held by rarer classes, one group each (so neither is split): one goes to the other side.
    kept, held = group_split(np.asarray(["r1", "c", "r2", "c"]), np.asarray([0, 0, 1, 1]), 0.2, seed=0)
    assert kept.tolist() == [2, 3] and held.tolist() == [0, 1]
    # One group of a class cannot be on both sides: it stays on the kept side.
    kept, held = group_split(np.asarray(["a", "a", "b", "b", "b"]), np.asarray([0, 0, 1, 2, 3]), 0.3, seed=0)
    assert held.tolist() in ([2], [3], [4]) and kept.tolist()[:2] == [0, 1]


def test_group_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="between 0 and 1"):
        group_split(np.zeros(4), np.arange(4), 1.0, seed=0)
    with pytest.raises(ValueError, match="one length"):
        group_split(np.zeros(4), np.arange(3), 0.2, seed=0)
    kept, held = group_split(np.asarray([], dtype=int), np.asarray([], dtype=int), 0.2, seed=0)
    assert kept.tolist() == held.tolist() == []


def test_read_id_list_by_column_name_or_first_column(tmp_path):
    write_csv(tmp_path / "a.csv", ["split", "isic_id"], [["test", "ISIC_1"], ["test", "ISIC_2"], ["test", "ISIC_1"]])
    assert read_id_list(tmp_path / "a.csv") == ["ISIC_1", "ISIC_2"]
    write_csv(tmp_path / "b.csv", ["id", "note"], [["X1", ""], ["", ""], ["X2", "n"]])
    assert read_id_list(tmp_path / "b.csv") == ["X1", "X2"]
    (tmp_path / "c.csv").write_text("image_name\n")
    assert "lists no ids under its column 'image_name'" in problem_of(lambda: read_id_list(tmp_path / "c.csv"))
    (tmp_path / "d.csv").write_text("")
    assert "empty" in problem_of(lambda: read_id_list(tmp_path / "d.csv"))
    assert "test split CSV (--test-split)" in problem_of(lambda: read_id_list(tmp_path / "none.csv"))


def test_split_by_ids_uses_the_list_as_is_and_names_unknown_ids(tmp_path):
    csv_path = write_csv(tmp_path / "metadata.csv", ISIC_ARCHIVE_HEADER, isic_archive_rows())
    touch(tmp_path / "images", "ISIC_0000001.jpg", "ISIC_0000002.jpg", "ISIC_0000005.jpg")
    table = read_table(csv_path, tmp_path / "images", FORMATS["isic-archive"])
    train, test = split_by_ids(table, ["ISIC_0000002.jpg", "ISIC_0000003"])  # 3: a skipped row, passed over
    assert train.tolist() == [0, 2] and test.tolist() == [1]
    unknown = [f"ISIC_99{i}" for i in range(7)]
    message = problem_of(lambda: split_by_ids(table, ["ISIC_0000001", *unknown]))
    assert "7 test id(s) are not in" in message and "ISIC_990, ISIC_991" in message and "ISIC_995" not in message


def test_group_overlap_counts_shared_lesions_and_patients():
    train = [record("a", "L1", "P1"), record("b", "L2", "P2"), record("c", "L3"), record("d")]
    test = [record("e", "L1", "P9"), record("f", "L7", "P2"), record("g", "L8", "P2"), record("h"), record("i", "L9")]
    report = group_overlap(train, test)
    assert report["lesions"] == {"shared": 1, "examples": ["L1"], "known": (3, 4)}
    assert report["patients"] == {"shared": 1, "examples": ["P2"], "known": (2, 3)}
    assert report["affected"] == 3
    many = group_overlap(
        [record(str(i), f"L{i:02d}") for i in range(30)], [record("x" + str(i), f"L{i:02d}") for i in range(30)]
    )
    assert many["lesions"]["shared"] == 30 and len(many["lesions"]["examples"]) == 20


def test_a_mapping_without_declared_labels_takes_the_sorted_labels_found(tmp_path):
    csv_path = write_csv(tmp_path / "m.csv", ["id", "y"], [["a", "z"], ["b", "malignant"], ["c", "k"]])
    touch(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    table = read_table(csv_path, tmp_path, ColumnMapping(image_id="id", label="y"))
    assert table.class_names == ("k", "malignant", "z") and table.labels.tolist() == [2, 1, 0]
    mapping = ColumnMapping(image_id="id", label="y", malignant=("mel",))
    assert "none of the malignant labels ['mel']" in problem_of(lambda: read_table(csv_path, tmp_path, mapping))
