"""Real dermatology layouts end to end (issue 21): train_model and evaluate_model on a HAM10000-layout and
an ISIC 2020-layout CSV written by the synthetic generator; a seven-class model served by a real worker over
the real broker and database, with every diagnosis's probability, the malignant sum, and explanations of
the predicted or a requested class; the API's and the portal's views of it."""

from __future__ import annotations

import csv
import io
import time
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from diagnosis.models import ModelVersion, Prediction
from tests.conftest import token_client, upload_file, wait_for
from tests.factories import ClinicFactory, ClinicianFactory

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
TRAIN = ["--arch", "resnet_tiny", "--image-size", "64", "--epochs", "2", "--no-progress"]


@pytest.fixture(scope="session")
def ham_dir(tmp_path_factory):
    from mlcore.synthetic_sets import write_ham10000

    root = tmp_path_factory.mktemp("ham10000")
    write_ham10000(root, lesions=84, size=64, seed=5, balanced=True)
    return root


@pytest.fixture(scope="session")
def multiclass_outcome(ham_dir):
    """A seven-class resnet_tiny trained through the pipeline on the HAM10000-layout set, once a session."""
    from mlcore.pipeline import finalize, prepare_data, train_candidate
    from mlcore.sources import table_source
    from mlcore.train import TrainConfig

    source = table_source(ham_dir / "HAM10000_metadata.csv", ham_dir, format="ham10000")
    prepared = prepare_data(source, image_size=64, seed=0, progress=False, log=lambda message: None)
    config = TrainConfig(arch="resnet_tiny", input_size=64, epochs=2, device="cpu")
    result = train_candidate(prepared, config, progress=False)
    return finalize(prepared, result, started=time.perf_counter())


@pytest.fixture
def multiclass_model(db, multiclass_outcome):
    from diagnosis.services.registry import register_model
    from mlcore.model import checkpoint_bytes

    outcome = multiclass_outcome
    return register_model(
        checkpoint=checkpoint_bytes(outcome.model, outcome.meta), version=f"ham-{uuid.uuid4().hex[:8]}",
        activate=True, plots=outcome.plots, reference_features=outcome.reference_features,
        drift_projection=outcome.drift_projection,
    )  # fmt: skip


def ham_photo(ham_dir, index: int = 0) -> tuple[str, bytes]:
    """One photo of the set (its id and bytes), as a clinic would upload it."""
    rows = list(csv.DictReader((ham_dir / "HAM10000_metadata.csv").read_text().splitlines()))
    image_id = rows[index]["image_id"]
    path = next(ham_dir.rglob(f"{image_id}.jpg"))
    return image_id, path.read_bytes()


@pytest.mark.django_db
def test_train_model_on_the_ham10000_layout_trains_seven_diagnoses_with_grouped_splits(ham_dir):
    out = io.StringIO()
    call_command("train_model", "--metadata", str(ham_dir / "HAM10000_metadata.csv"), "--format", "ham10000",
                 *TRAIN, "--name", "ham-cli", stdout=out)  # fmt: skip
    stdout = out.getvalue()
    version = ModelVersion.objects.get(version="ham-cli")
    assert version.class_names == HAM_CLASSES and sorted(version.malignant_classes) == ["akiec", "bcc", "mel"]
    diagnoses = version.metrics["test"]["diagnoses"]
    assert set(diagnoses["per_class"]) == set(HAM_CLASSES) and 0 <= diagnoses["balanced_accuracy"] <= 1
    matrix = diagnoses["confusion_matrix"]
    assert len(matrix) == 7 and sum(map(sum, matrix)) == version.metrics["test"]["n"]
    # The binary malignant metrics as before, on the sum over the malignant classes.
    assert version.metrics["test"]["n_positive"] == sum(diagnoses["per_class"][c]["n"] for c in ("akiec", "bcc", "mel"))
    assert 0 < version.threshold < 1 and "confusion_matrix" in version.plots
    # No lesion on both sides: the group check beside the pHash one.
    groups = version.metrics["leakage"]["groups"]
    assert groups["lesions"]["shared"] == 0 and groups["affected"] == 0 and groups["lesions"]["known"][1] > 0
    assert groups["lesions"]["examples"] == groups["patients"]["examples"] == []  # counts only: ids may be PHI
    assert "Group check: 0 lesion(s)" in stdout and "Diagnoses: balanced accuracy" in stdout
    subgroups = version.metrics["subgroups"]["attributes"]
    assert {"skin_tone", "site", "sex", "age_band"} <= set(subgroups)
    assert sum(row["n"] for row in subgroups["site"]) == version.metrics["test"]["n"]
    assert version.provenance["data"]["grouped_splits"] is True
    # The model card: written beside the checkpoint, and served by the admin to staff only.
    card_path = next(
        line.split("Model card: ")[1].split(" (")[0] for line in stdout.splitlines() if "Model card: " in line
    )
    card = Path(card_path).read_text()
    assert "# Model card: ham-cli" in card and "the sum over akiec, bcc, mel" in card
    assert "## Performance by subgroup" in card and "| skin_tone |" in card and "## Known limits" in card

    out = io.StringIO()
    call_command("evaluate_model", "ham-cli", "--metadata", str(ham_dir / "HAM10000_metadata.csv"), "--format",
                 "ham10000", "--no-progress", stdout=out)  # fmt: skip
    assert "balanced accuracy" in out.getvalue() and "skin_tone" in out.getvalue()
    # The training table itself: only the test side training held out, never the images it trained on.
    assert "is the table the model was trained on" in out.getvalue()
    cases = next(line for line in out.getvalue().splitlines() if line.startswith("cases"))
    assert cases.split()[1:] == [str(version.metrics["test"]["n"])] * 2
    with pytest.raises(CommandError, match="own malignant classes"):
        call_command("evaluate_model", "ham-cli", "--metadata", str(ham_dir / "HAM10000_metadata.csv"), "--format",
                     "ham10000", "--malignant", "mel")  # fmt: skip


@pytest.mark.django_db
def test_the_admin_serves_the_model_card_to_staff_only(client, multiclass_model, clinician):
    from django.contrib.auth import get_user_model
    from django.urls import reverse

    url = reverse("admin:diagnosis_modelversion_card", args=[multiclass_model.pk])
    client.force_login(clinician)
    assert client.get(url).status_code == 302  # to the admin login: not staff
    staff = get_user_model().objects.create_user("card-staff", password="x", is_staff=True, is_superuser=True)
    client.force_login(staff)
    response = client.get(url)
    assert response.status_code == 200 and response["Content-Type"].startswith("text/markdown")
    text = response.content.decode()
    assert f"# Model card: {multiclass_model.version}" in text and "Skin tone of the training photos" in text
    page = client.get(reverse("admin:diagnosis_modelversion_change", args=[multiclass_model.pk])).content.decode()
    assert url in page


@pytest.mark.django_db
def test_the_portal_shows_the_top_diagnoses_and_explains_a_chosen_one(
    client, clinician, multiclass_model, ham_dir, django_capture_on_commit_callbacks
):
    from django.urls import reverse

    from diagnosis.models import Explanation, LesionImage
    from diagnosis.services.predictions import process_image

    api = token_client(clinician)
    _, data = ham_photo(ham_dir, 3)
    with django_capture_on_commit_callbacks():
        response = api.post("/api/v1/images/", {"image": upload_file(data)}, format="multipart")
    image_id = response.json()["id"]
    with django_capture_on_commit_callbacks():
        assert process_image(image_id=image_id, worker_id="w1") == "done"
    prediction = Prediction.objects.get(image_id=image_id)
    ranked = sorted(prediction.probabilities.items(), key=lambda item: -item[1])
    client.force_login(clinician)
    page = client.get(reverse("portal:image", args=[image_id])).content.decode()
    assert "Most likely diagnoses" in page
    shown = page.split("Most likely diagnoses")[1].split("</ol>")[0]
    assert [name for name, _ in ranked[:3]] == [
        part.split("</span>")[0] for part in shown.split('<span class="diagnosis-name">')[1:]
    ]
    assert f"{ranked[0][1] * 100:.0f}%" in shown and 'name="target"' in page
    assert ("counts as malignant" in shown) == any(name in ("akiec", "bcc", "mel") for name, _ in ranked[:3])
    target = ranked[-1][0]  # the least probable diagnosis, explained on request
    answer = client.post(
        reverse("portal:image-explanations", args=[image_id]), {"method": "occlusion", "target": target}
    )
    assert answer.status_code == 302
    explanation = Explanation.objects.get(image_id=image_id, method="occlusion")
    assert explanation.target_class == target and LesionImage.objects.get(pk=image_id).state == "done"


@pytest.mark.django_db
def test_an_official_test_split_is_used_as_it_is(tmp_path):
    from mlcore.synthetic_sets import write_isic2020

    write_isic2020(tmp_path, lesions=40, size=64, seed=9)
    rows = list(csv.DictReader((tmp_path / "train.csv").read_text().splitlines()))
    official = [row["image_name"] for row in rows[:24]]
    (tmp_path / "test_ids.csv").write_text("image_name\n" + "\n".join(official) + "\n")
    out = io.StringIO()
    call_command("train_model", "--metadata", str(tmp_path / "train.csv"), "--images", str(tmp_path / "train"),
                 "--format", "isic2020", "--test-split", str(tmp_path / "test_ids.csv"), *TRAIN, "--name", "isic",
                 stdout=out)  # fmt: skip
    version = ModelVersion.objects.get(version="isic")
    assert version.class_names == ["benign", "malignant"] and version.malignant_classes == ["malignant"]
    counts = version.provenance["data"]["counts"]
    assert sum(counts["test"].values()) == 24 and version.provenance["data"]["test_split_made"] is False
    assert "diagnoses" not in version.metrics["test"]  # a binary model: as before
    # The official split is the user's: lesions shared with training are reported, not hidden.
    assert version.metrics["leakage"]["groups"]["patients"]["known"][1] == 24


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--metadata", "missing.csv", "--format", "ham10000"], "missing.csv"),
        ([], "--data DIR"),
        (["--data", "x", "--metadata", "y.csv"], "not both"),
        (["--data", "x", "--format", "ham10000"], "go with --metadata"),
    ],
)
def test_bad_data_options_are_named(arguments, message):
    with pytest.raises(CommandError, match=message):
        call_command("train_model", *arguments, *TRAIN)


@pytest.mark.django_db
def test_a_test_list_without_malignant_cases_is_refused_before_training(tmp_path):
    from mlcore.synthetic_sets import write_isic2020

    write_isic2020(tmp_path, lesions=30, size=48, seed=3)
    rows = list(csv.DictReader((tmp_path / "train.csv").read_text().splitlines()))
    benign = [row["image_name"] for row in rows if row["benign_malignant"] == "benign"][:10]
    (tmp_path / "ids.csv").write_text("image_name\n" + "\n".join(benign) + "\n")
    with pytest.raises(CommandError, match="test set of .*train.csv has no readable malignant images"):
        call_command("train_model", "--metadata", str(tmp_path / "train.csv"), "--images", str(tmp_path / "train"),
                     "--format", "isic2020", "--test-split", str(tmp_path / "ids.csv"), *TRAIN)  # fmt: skip
    assert not ModelVersion.objects.exists()


@pytest.mark.django_db
def test_a_bad_row_is_named_by_row_and_column(ham_dir, tmp_path):
    text = (ham_dir / "HAM10000_metadata.csv").read_text().splitlines()
    text[3] = ",".join(cell if i != 2 else "melanoma" for i, cell in enumerate(text[3].split(",")))
    bad = tmp_path / "HAM10000_metadata.csv"
    bad.write_text("\n".join(text) + "\n")
    with pytest.raises(CommandError, match=r"row 4.*dx.*melanoma"):
        call_command("train_model", "--metadata", str(bad), "--images", str(ham_dir), "--format", "ham10000", *TRAIN)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_seven_class_model_is_served_and_explained_by_real_workers(
    celery_worker, explain_worker, multiclass_model, ham_dir
):
    clinic = ClinicFactory(name=f"Multi {uuid.uuid4().hex[:6]}")
    client = token_client(ClinicianFactory(membership__clinic=clinic))
    _, data = ham_photo(ham_dir, 0)
    response = client.post("/api/v1/images/", {"image": upload_file(data)}, format="multipart")
    assert response.status_code == 202, response.content
    status_url = response.json()["status_url"]

    def done():
        body = client.get(status_url).json()
        return body if body["state"] in ("done", "failed") else None

    status = wait_for(done, 90, interval=0.1, message="the upload to be scored")
    assert status["state"] == "done", celery_worker.log()[-3000:]
    prediction = status["prediction"]
    listed = prediction["diagnoses"]
    assert [row["diagnosis"] for row in listed] != [] and {row["diagnosis"] for row in listed} == set(HAM_CLASSES)
    assert [row["probability"] for row in listed] == sorted((row["probability"] for row in listed), reverse=True)
    malignant = sum(row["probability"] for row in listed if row["malignant"])
    assert prediction["probability_malignant"] == pytest.approx(malignant, abs=1e-6)
    assert {row["diagnosis"] for row in listed if row["malignant"]} == {"akiec", "bcc", "mel"}
    assert prediction["label"] == listed[0]["diagnosis"]  # the most probable diagnosis
    record = client.get(f"/api/v1/images/{status['id']}/").json()
    assert record["prediction"]["diagnoses"] == listed

    # Explanations: the predicted class by default, or the one asked for.
    image_url = f"/api/v1/images/{status['id']}/explanations/"
    default = client.post(image_url, {"method": "gradcam"}, format="json")
    chosen = client.post(image_url, {"method": "gradcam", "target": "vasc" if listed[0]["diagnosis"] != "vasc"
                                     else "nv"}, format="json")  # fmt: skip
    assert default.status_code in (200, 201, 202) and chosen.status_code in (200, 201, 202), chosen.content
    assert default.json()["target_class"] == listed[0]["diagnosis"]
    assert chosen.json()["target_class"] != listed[0]["diagnosis"]
    unknown = client.post(image_url, {"method": "gradcam", "target": "melanoma"}, format="json")
    assert unknown.status_code == 400 and "akiec" in unknown.json()["detail"]

    def explained():
        items = [client.get(f"/api/v1/explanations/{body.json()['id']}/").json() for body in (default, chosen)]
        return items if all(item["state"] in ("done", "failed") for item in items) else None

    finished = wait_for(explained, 120, interval=0.2, message="both explanations")
    assert [item["state"] for item in finished] == ["done", "done"], explain_worker.log()[-3000:]
    assert Prediction.objects.get(image_id=status["id"]).model_version == multiclass_model
