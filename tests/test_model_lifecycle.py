"""The model lifecycle through its real entry points: `train_model` on synthetic ImageFolders (metrics,
calibration, plots, provenance, drift reference set, leakage check, sweeps, bad input), the registry
commands (activate with its AUC guard, --force, rollback, evaluate) and the admin pages and actions.

Training runs are tiny (resnet_tiny, 48-64 px, a few hundred images, 1-4 epochs) so the module stays fast
on two CPU cores."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import pytest
import torch
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.core.management.base import CommandError
from PIL import Image

from diagnosis.models import ModelActivation, ModelVersion, ReferenceFeature, TrainingRun
from mlcore.data import write_image_folder
from mlcore.drift import FEATURE_NAMES
from tests.conftest import lesion_jpeg, upload_file

PLOTS = {"roc", "precision_recall", "reliability", "training_curves", "subgroups_skin_tone"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """One intra-op thread: on a 2-core machine two threads fighting over one free core train several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lifecycle-data")


@pytest.fixture(scope="module")
def lifecycle_data(data_root) -> Path:
    """train/ with 400 and test/ with 120 synthetic lesions, balanced, 64 px."""
    return write_image_folder(data_root / "main", splits={"train": 400, "test": 120}, size=64, seed=5)


@pytest.fixture(scope="module")
def small_data(data_root) -> Path:
    """train/ with 160 and test/ with 60 synthetic lesions, 64 px: for the quicker runs."""
    return write_image_folder(data_root / "small", splits={"train": 160, "test": 60}, size=64, seed=6)


def train(data: Path, output: Path, *extra: str, name: str | None = None, epochs: int = 1, image_size: int = 48):
    """Run train_model; returns its standard output."""
    out = io.StringIO()
    arguments = ["--data", str(data), "--arch", "resnet_tiny", "--image-size", str(image_size), "--epochs",
                 str(epochs), "--seed", "0", "--no-progress", "--output", str(output)]  # fmt: skip
    if name:
        arguments += ["--name", name]
    call_command("train_model", *arguments, *extra, stdout=out)
    return out.getvalue()


def read_png(name: str) -> Image.Image:
    with default_storage.open(name, "rb") as handle:
        data = handle.read()
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_nothing_registered_or_running():
    assert not ModelVersion.objects.exists()
    assert not TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING).exists()


# --- 1. one full training run -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_train_model_evaluates_calibrates_plots_and_registers(lifecycle_data, tmp_path):
    from mlcore.model import load_checkpoint, sha256_file

    output = tmp_path / "m.pt"
    stdout = train(lifecycle_data, output, name="lc-1", epochs=4, image_size=64)

    version = ModelVersion.objects.get(version="lc-1")
    assert not version.is_active  # registering never activates without --activate
    assert "Registered lc-1" in stdout
    assert "Leakage check: 0 of 120 test images" in stdout
    assert "AUC" in stdout and "sensitivity" in stdout

    # Test metrics: the whole clinical table, with an interval around the AUC.
    test = version.metrics["test"]
    assert test["n"] == 120 and test["n_positive"] == 60
    assert test["auc"] > 0.6
    low, high = test["auc_ci95"]
    assert 0.0 <= low <= test["auc"] <= high <= 1.0 and high - low > 0
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "ece", "ece_before_calibration"):
        assert isinstance(test[key], float) and 0.0 <= test[key] <= 1.0, key
    confusion = test["confusion"]
    assert set(confusion) == {"tp", "fp", "tn", "fn"} and sum(confusion.values()) == 120
    assert confusion["tp"] + confusion["fn"] == 60
    assert test["sensitivity"] == pytest.approx(confusion["tp"] / 60)
    assert test["threshold"] == pytest.approx(version.threshold)
    assert version.metrics["leakage"]["near_duplicates_in_train"] == 0
    assert version.metrics["test_deduplicated"]["auc"] == test["auc"]  # nothing removed
    assert version.metrics["leakage"]["groups"] is None  # an image folder has no lesion or patient ids
    # Performance by skin tone (the ITA measured around each lesion): every test photo in one band or unknown.
    by_tone = version.metrics["subgroups"]["attributes"]["skin_tone"]
    assert sum(row["n"] for row in by_tone) == 120 and len(by_tone) >= 2
    assert version.metrics["subgroups"]["overall"]["sensitivity"] == pytest.approx(test["sensitivity"])
    assert "By subgroup" in stdout and "skin_tone" in stdout

    # The operating threshold comes from validation, where it reaches the target sensitivity.
    validation = version.metrics["validation"]
    assert validation["threshold"] == pytest.approx(version.threshold)
    assert validation["sensitivity"] >= 0.9
    assert 0.0 < version.threshold < 1.0
    assert version.metadata["temperature"] > 0
    assert version.metadata["threshold"] == pytest.approx(version.threshold)

    # Four valid PNG plots in storage.
    assert set(version.plots) == PLOTS
    for name, stored in version.plots.items():
        image = read_png(stored)
        assert image.format == "PNG", name
        assert 300 <= image.width <= 2000 and 200 <= image.height <= 2000, (name, image.size)

    # Provenance: what was trained, on what, with what, for how long.
    provenance = version.provenance
    assert provenance["config"]["arch"] == "resnet_tiny" and provenance["config"]["input_size"] == 64
    assert provenance["config"]["epochs"] == 4 and provenance["config"]["seed"] == 0
    assert re.fullmatch(r"[0-9a-f]{64}", provenance["data"]["file_list_sha256"])
    assert provenance["data"]["test_split_made"] is False
    assert provenance["data"]["skipped"] == []
    counts = provenance["data"]["counts"]
    assert sum(counts["train"].values()) + sum(counts["validation"].values()) == 400
    assert counts["test"] == {"benign": 60, "malignant": 60}
    assert {"python", "torch", "torchvision", "numpy", "pillow"} <= set(provenance["libraries"])
    assert provenance["libraries"]["torch"] == str(torch.__version__)
    assert isinstance(provenance["duration_seconds"], float) and provenance["duration_seconds"] > 0
    assert "git_commit" in provenance
    if provenance["git_commit"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", provenance["git_commit"])

    # The drift reference set: every training, validation and test image, with every feature, and
    # the embedding projection fitted on the training set.
    references = ReferenceFeature.objects.filter(model_version=version)
    assert references.count() == 520
    assert references.filter(split="train").count() == sum(counts["train"].values())
    assert references.filter(split="validation").count() == sum(counts["validation"].values())
    assert references.filter(split="test").count() == 120
    assert len(set(references.values_list("path", flat=True))) == 520
    for row in references:
        assert set(FEATURE_NAMES) <= set(row.values), row.path
        assert 0.0 <= row.values["probability_malignant"] <= 1.0
        assert row.path.split("/")[0] == ("test" if row.split == "test" else "train")
        assert row.label in ("benign", "malignant") and row.label == row.path.split("/")[1]
    projection = version.drift_projection
    assert len(projection["components"]) == 4 and len(projection["mean"]) == len(projection["components"][0])
    assert 0 < sum(projection["explained_variance_ratio"]) <= 1.0 + 1e-9

    # The photo-quality gate (issue 20), calibrated on the same photos and stored with the version: the
    # thresholds from the training photos, the OOD threshold on the held-out ones, the band on validation.
    gate = version.quality_gate
    assert gate["reference_photos"] == references.filter(split="train").count()
    assert gate["thresholds"]["resolution:low"] == 64 and gate["thresholds"]["focus:low"] < 0
    assert gate["ood"]["held_out"] == references.exclude(split="train").count() and gate["ood"]["threshold"] > 0
    assert gate["band"][0] < version.threshold < gate["band"][1]

    # The training run: recorded, finished, selected, linked.
    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.FINISHED and run.finished_at is not None
    assert run.selected and run.model_version == version and run.sweep is None
    assert run.data_sha256 == provenance["data"]["file_list_sha256"]
    assert run.metrics["auc"] == pytest.approx(validation["auc"])
    assert [h["epoch"] for h in run.metrics["history"]] == list(range(1, len(run.metrics["history"]) + 1))

    # The checkpoint at --output is the registered one and loads.
    model, meta = load_checkpoint(output)
    assert sha256_file(output) == version.weights_sha256
    assert meta.arch == "resnet_tiny" and meta.input_size == 64
    assert meta.threshold == pytest.approx(version.threshold)
    assert meta.metrics["test"]["auc"] == pytest.approx(test["auc"])
    assert meta.training["provenance"]["data"]["file_list_sha256"] == provenance["data"]["file_list_sha256"]
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


# --- 2. reproducibility -----------------------------------------------------------------------------------------


def _pipeline_run(data: Path, seed: int, *, prepared=None):
    """prepare_data + train_candidate + finalize, as train_model runs them, without the database."""
    import time

    from mlcore.pipeline import finalize, prepare_data, train_candidate
    from mlcore.train import TrainConfig

    if prepared is None:
        prepared = prepare_data(data, image_size=48, seed=seed, progress=False, log=lambda message: None)
    config = TrainConfig(arch="resnet_tiny", input_size=48, epochs=2, batch_size=32, seed=seed, device="cpu")
    result = train_candidate(prepared, config, progress=False)
    return prepared, finalize(prepared, result, started=time.perf_counter())


@pytest.fixture(scope="module")
def small_run(small_data):
    """One pipeline run on small_data with seed 0: (prepared data, training outcome)."""
    return _pipeline_run(small_data, seed=0)


def test_same_seed_gives_identical_training_on_the_cpu(small_data, small_run):
    prepared, first = small_run
    _, second = _pipeline_run(small_data, seed=0)  # everything again, from reading the folder

    assert first.result.history == second.result.history
    assert first.meta.threshold == second.meta.threshold
    assert first.meta.temperature == second.meta.temperature
    assert first.meta.metrics["validation"] == second.meta.metrics["validation"]
    assert first.meta.metrics["test"]["auc"] == second.meta.metrics["test"]["auc"]
    assert first.meta.metrics["test"]["auc_ci95"] == second.meta.metrics["test"]["auc_ci95"]
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    assert first.provenance["data"]["file_list_sha256"] == second.provenance["data"]["file_list_sha256"]
    assert first.reference_features == second.reference_features

    _, other = _pipeline_run(small_data, seed=1, prepared=prepared)
    assert other.result.history != first.result.history  # the comparison above can fail


# --- 3. leakage between test and train --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def leaky_data(data_root) -> tuple[Path, dict[str, str]]:
    """A folder whose test/ holds copies of train/ images: exact, resized 2x and 0.5x, re-encoded at quality 50.
    Returns the folder and {planted test path: its training original}."""
    root = write_image_folder(data_root / "leaky", splits={"train": 160, "test": 60}, size=64, seed=7)

    def original(label: str, index: int) -> Path:
        return root / "train" / label / f"train_{index:05d}.jpg"

    planted = {}
    exact = original("benign", 0)
    shutil.copy(exact, root / "test" / "benign" / "copy_exact.jpg")
    planted["test/benign/copy_exact.jpg"] = exact
    with Image.open(original("malignant", 1)) as image:
        image.resize((128, 128), Image.Resampling.BICUBIC).save(root / "test" / "malignant" / "copy_2x.png")
    planted["test/malignant/copy_2x.png"] = original("malignant", 1)
    with Image.open(original("benign", 2)) as image:
        image.resize((32, 32), Image.Resampling.LANCZOS).save(root / "test" / "benign" / "copy_half.jpg", quality=90)
    planted["test/benign/copy_half.jpg"] = original("benign", 2)
    with Image.open(original("malignant", 3)) as image:
        image.save(root / "test" / "malignant" / "copy_q50.jpg", quality=50)
    planted["test/malignant/copy_q50.jpg"] = original("malignant", 3)
    return root, {test: train.relative_to(root).as_posix() for test, train in planted.items()}


@pytest.mark.django_db
def test_train_model_reports_planted_near_duplicates(leaky_data, tmp_path):
    root, planted = leaky_data
    stdout = train(root, tmp_path / "leaky.pt", name="leaky")

    metrics = ModelVersion.objects.get(version="leaky").metrics
    leakage = metrics["leakage"]
    assert leakage["test_images"] == 64
    assert leakage["near_duplicates_in_train"] == len(planted) == 4
    assert {example["test"]: example["train"] for example in leakage["examples"]} == planted
    assert metrics["test"]["n"] == 64
    assert metrics["test_deduplicated"]["n"] == metrics["test"]["n"] - len(planted)
    assert metrics["test_deduplicated"]["n_positive"] == metrics["test"]["n_positive"] - 2
    assert "Leakage check: 4 of 64 test images have a near-duplicate" in stdout
    assert "test (de-duplicated)" in stdout


# --- 4. a single folder is split ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_single_folder_is_split_into_train_and_test(data_root, tmp_path):
    folder = write_image_folder(data_root / "single", splits={"all": 150}, size=64, seed=8) / "all"
    assert sorted(p.name for p in folder.iterdir()) == ["benign", "malignant"]

    stdout = train(folder, tmp_path / "single.pt", name="single")

    version = ModelVersion.objects.get(version="single")
    data = version.provenance["data"]
    assert data["test_split_made"] is True
    assert data["counts"]["test"] == {"benign": 15, "malignant": 15}  # 20% of each class
    assert version.metrics["test"]["n"] == 30
    assert sum(data["counts"]["train"].values()) + sum(data["counts"]["validation"].values()) == 120
    assert "held out 30 images" in stdout
    # The held-out images are not part of the training reference set.
    assert ReferenceFeature.objects.filter(model_version=version).count() == 150  # training, validation, held-out test


# --- 5. bad input -----------------------------------------------------------------------------------------------


def _make_empty(root: Path) -> Path:
    root.mkdir()
    return root


def _make_one_class(root: Path) -> Path:
    write_image_folder(root, splits={"train": 10}, size=48, seed=1)
    shutil.rmtree(root / "train" / "malignant")
    return root


def _make_unreadable_malignant(root: Path) -> Path:
    write_image_folder(root, splits={"train": 10, "test": 4}, size=48, seed=1)
    for path in (root / "train" / "malignant").iterdir():
        path.write_bytes(b"this is not an image")
    return root


def _make_mismatched_test(root: Path) -> Path:
    write_image_folder(root, splits={"train": 10, "test": 4}, size=48, seed=1)
    (root / "test" / "malignant").rename(root / "test" / "melanoma")
    return root


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (_make_empty, "found no class folders"),
        (_make_one_class, "found only ['benign']"),
        (_make_unreadable_malignant, "the training set has no images of malignant"),
        (_make_mismatched_test, "but test/ has"),
    ],
    ids=["missing-directory", "empty-directory", "one-class", "unreadable-class", "mismatched-test-classes"],
)
def test_unusable_data_is_refused_with_a_clear_message(tmp_path, make, message):
    data = make(tmp_path / "data")
    with pytest.raises(CommandError) as info:
        train(data, tmp_path / "never.pt")
    assert message in str(info.value)
    assert_nothing_registered_or_running()
    assert not TrainingRun.objects.exists()
    assert not (tmp_path / "never.pt").exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--arch", "resnet9000"], "invalid choice: 'resnet9000'"),
        (["--image-size", "16"], "--image-size must be at least 32"),
        (["--lr", "3"], "--lr must lie between 0 and 1"),
        (["--epochs", "0"], "epochs must be at least 1"),
    ],
    ids=["unknown-arch", "tiny-image-size", "bad-lr", "zero-epochs"],
)
def test_bad_options_are_refused(small_data, tmp_path, extra, message):
    with pytest.raises((CommandError, SystemExit)) as info:
        # later options win in argparse, so these override the helper's defaults
        train(small_data, tmp_path / "never.pt", *extra)
    assert message in str(info.value)
    assert_nothing_registered_or_running()


@pytest.mark.django_db
def test_bad_sweep_and_config_files_are_refused(small_data, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("method: grid\nparameters:\n  momentum: [0.9, 0.99]\n")
    with pytest.raises(CommandError, match=r"Cannot sweep over \['momentum'\]"):
        train(small_data, tmp_path / "never.pt", "--sweep", str(sweep))
    config = tmp_path / "config.yaml"
    config.write_text("epochs: 1\nlearning_rate: 0.1\n")
    with pytest.raises(CommandError, match=r"Unknown keys .*\['learning_rate'\]"):
        train(small_data, tmp_path / "never.pt", "--config", str(config))
    assert_nothing_registered_or_running()
    assert not TrainingRun.objects.exists()


@pytest.mark.django_db
def test_a_class_too_small_for_the_validation_split_is_refused_before_training(tmp_path):
    """One malignant training image leaves none for validation: said plainly, before any training."""
    root = write_image_folder(tmp_path / "data", splits={"train": 24, "test": 6}, size=48, seed=2)
    for path in sorted((root / "train" / "malignant").iterdir())[1:]:
        path.unlink()
    with pytest.raises(CommandError, match="has no malignant images after the 10% validation split"):
        train(root, tmp_path / "never.pt")
    assert not TrainingRun.objects.exists()
    assert not ModelVersion.objects.exists()


@pytest.mark.django_db
def test_training_that_fails_is_recorded_as_failed_and_registers_nothing(tmp_path, small_data):
    """ImageNet weights of the wrong architecture make the run fail once it starts."""
    import torch

    from mlcore.model import build_model

    weights = tmp_path / "tiny-weights.pth"
    torch.save(build_model("resnet_tiny").state_dict(), weights)
    with pytest.raises(CommandError, match="Training failed: .*not a resnet18 ImageNet state dict"):
        call_command(
            "train_model", "--data", str(small_data), "--arch", "resnet18", "--pretrained-weights", str(weights),
            "--image-size", "48", "--epochs", "1", "--no-progress", "--output", str(tmp_path / "never.pt"),
            stdout=io.StringIO(),
        )  # fmt: skip
    run = TrainingRun.objects.get()
    assert run.status == TrainingRun.Status.FAILED and run.error and run.finished_at is not None
    assert not run.selected and run.model_version is None
    assert not ModelVersion.objects.exists()


@pytest.mark.django_db
def test_a_taken_name_is_refused_before_training(tmp_path, small_data, tiny_checkpoint):
    from diagnosis.services.registry import register_model

    register_model(checkpoint=tiny_checkpoint, version="taken")
    with pytest.raises(CommandError, match="'taken' already exists"):
        train(small_data, tmp_path / "never.pt", "--name", "taken")
    assert not TrainingRun.objects.exists()
    assert not (tmp_path / "never.pt").exists()


@pytest.mark.django_db
def test_corrupt_files_are_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "data", splits={"train": 60, "test": 20}, size=64, seed=3)
    whole = (root / "train" / "benign" / "train_00000.jpg").read_bytes()
    for index in range(3):
        (root / "train" / "benign" / f"broken_{index}.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "train" / "malignant" / "notes.txt").write_text("scanned on the old camera")

    stdout = train(root, tmp_path / "m.pt", name="with-corrupt-files")

    version = ModelVersion.objects.get(version="with-corrupt-files")
    skipped = {item["path"]: item["reason"] for item in version.provenance["data"]["skipped"]}
    assert set(skipped) == {f"train/benign/broken_{i}.jpg" for i in range(3)} | {"train/malignant/notes.txt"}
    for index in range(3):
        assert "truncated" in skipped[f"train/benign/broken_{index}.jpg"]
    assert "not a JPEG, PNG or WebP" in skipped["train/malignant/notes.txt"]
    counts = version.provenance["data"]["counts"]
    assert sum(counts["train"].values()) + sum(counts["validation"].values()) == 60  # the readable ones
    assert "Skipped 4 unreadable file(s)" in stdout
    assert TrainingRun.objects.get().status == TrainingRun.Status.FINISHED


# --- 6. a sweep --------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_grid_sweep_records_every_trial_and_registers_the_best(small_data, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("method: grid\nparameters:\n  lr: [0.003, 0.0005]\n  batch_size: [16, 32]\n")
    output = tmp_path / "sweep.pt"

    stdout = train(small_data, output, "--sweep", str(sweep), name="swept", epochs=2)

    runs = list(TrainingRun.objects.order_by("id"))
    assert len(runs) == 4
    assert len({run.sweep for run in runs}) == 1 and runs[0].sweep is not None
    assert {(run.config["lr"], run.config["batch_size"]) for run in runs} == {
        (0.003, 16), (0.003, 32), (0.0005, 16), (0.0005, 32)
    }  # fmt: skip
    assert all(run.config["epochs"] == 2 for run in runs)
    assert all(run.status == TrainingRun.Status.FINISHED for run in runs)
    selected = [run for run in runs if run.selected]
    assert len(selected) == 1

    version = ModelVersion.objects.get()
    assert version.version == "swept"
    assert selected[0].model_version == version
    assert list(version.training_runs.all()) == selected
    assert selected[0].metrics["auc"] == max(run.metrics["auc"] for run in runs)
    assert version.metrics["validation"]["auc"] == pytest.approx(selected[0].metrics["auc"])
    assert version.provenance["sweep"] == str(runs[0].sweep)
    assert version.provenance["config"]["lr"] == selected[0].config["lr"]
    assert version.provenance["config"]["batch_size"] == selected[0].config["batch_size"]
    assert stdout.count("Trial ") >= 4
    for index in range(1, 5):
        assert (tmp_path / f"sweep-trial{index}.pt").is_file()
    assert output.is_file()


@pytest.mark.django_db
def test_train_model_activate_is_refused_for_a_lower_auc(small_data, tmp_path, tiny_checkpoint):
    from diagnosis.services.registry import register_model

    register_model(checkpoint=checkpoint_with_metrics(tiny_checkpoint, 0.999), activate=True, version="incumbent")

    stdout = train(small_data, tmp_path / "m.pt", "--activate", name="challenger")

    assert "Registered challenger" in stdout
    assert "Not activated: challenger has a lower AUC" in stdout and "--force" in stdout
    assert active_version() == "incumbent"
    assert not ModelVersion.objects.get(version="challenger").is_active
    assert TrainingRun.objects.get().selected


# --- 7. the registry commands ------------------------------------------------------------------------------------


def checkpoint_with_metrics(tiny_checkpoint: bytes, auc: float) -> bytes:
    from mlcore.model import checkpoint_bytes, load_checkpoint

    model, meta = load_checkpoint(tiny_checkpoint)
    meta.metrics = {
        "validation": {"auc": auc},
        "test": {"auc": auc, "sensitivity": 0.9, "specificity": auc - 0.2, "ece": 0.05, "n": 100},
    }
    return checkpoint_bytes(model, meta)


@pytest.fixture
def better_and_worse(db, tiny_checkpoint):
    """'better' (test AUC 0.9, active) and 'worse' (test AUC 0.8, registered only)."""
    from diagnosis.services.registry import register_model

    better = register_model(checkpoint=checkpoint_with_metrics(tiny_checkpoint, 0.9), version="better")
    call_command("activate_model", "better", stdout=io.StringIO())
    worse = register_model(checkpoint=checkpoint_with_metrics(tiny_checkpoint, 0.8), version="worse")
    better.refresh_from_db()
    return better, worse


def active_version() -> str | None:
    return ModelVersion.objects.filter(is_active=True).values_list("version", flat=True).first()


def test_activating_a_worse_model_needs_force(better_and_worse):
    better, worse = better_and_worse
    assert active_version() == "better"

    out = io.StringIO()
    with pytest.raises(CommandError) as info:
        call_command("activate_model", "worse", stdout=out)
    assert "--force" in str(info.value) and "lower AUC" in str(info.value)
    assert "0.800" in str(info.value) and "0.900" in str(info.value)
    assert "auc (test)" in out.getvalue()  # the comparison table was shown first
    assert active_version() == "better"
    assert not ModelActivation.objects.filter(model_version=worse).exists()

    out = io.StringIO()
    call_command("activate_model", "worse", "--force", stdout=out)
    assert "worse is now active" in out.getvalue()
    assert active_version() == "worse"
    activation = ModelActivation.objects.filter(model_version=worse).get()
    assert activation.forced is True and activation.previous == better


def test_activating_a_better_model_is_not_forced(better_and_worse, tiny_checkpoint):
    from diagnosis.services.registry import register_model

    register_model(checkpoint=checkpoint_with_metrics(tiny_checkpoint, 0.95), version="best")
    call_command("activate_model", "best", stdout=io.StringIO())
    assert active_version() == "best"
    assert ModelActivation.objects.get(model_version__version="best").forced is False


def test_rollback_reactivates_the_previous_version(better_and_worse):
    better, worse = better_and_worse
    call_command("activate_model", "worse", "--force", stdout=io.StringIO())

    out = io.StringIO()
    call_command("rollback_model", stdout=out)
    assert "better is active again" in out.getvalue()
    assert active_version() == "better"
    latest = ModelActivation.objects.first()
    assert latest.model_version == better and latest.previous == worse and latest.note == "rollback"
    assert latest.forced is False  # going back to a higher AUC is not a forced promotion

    call_command("rollback_model", "--to", "worse", stdout=io.StringIO())  # a named version, guard not applied
    assert active_version() == "worse"


def test_rollback_without_an_earlier_version_is_refused(better_and_worse):
    # 'better' was the first version ever activated: nothing to go back to.
    with pytest.raises(CommandError, match="no earlier active version"):
        call_command("rollback_model", stdout=io.StringIO())
    assert active_version() == "better"
    with pytest.raises(CommandError, match="already active"):
        call_command("rollback_model", "--to", "better", stdout=io.StringIO())
    with pytest.raises(CommandError, match="No model version 'nope'"):
        call_command("rollback_model", "--to", "nope", stdout=io.StringIO())


def test_reactivating_the_active_version_keeps_the_rollback_history(better_and_worse):
    call_command("activate_model", "worse", "--force", stdout=io.StringIO())
    call_command("activate_model", "worse", stdout=io.StringIO())  # run twice, e.g. by a retried deploy script
    call_command("rollback_model", stdout=io.StringIO())
    assert active_version() == "better"


@pytest.mark.django_db
def test_rollback_with_no_active_model_is_refused():
    with pytest.raises(CommandError, match="no earlier active version"):
        call_command("rollback_model", stdout=io.StringIO())


@pytest.mark.django_db
def test_activate_unknown_version_lists_the_registered_ones(better_and_worse):
    with pytest.raises(CommandError, match=r"No model version 'v9'\. Registered: .*better"):
        call_command("activate_model", "v9", stdout=io.StringIO())


def test_evaluate_model_prints_the_metrics_table(better_and_worse, small_data):
    from mlcore.inference import Predictor
    from mlcore.metrics import roc_auc
    from mlcore.model import load_checkpoint
    from mlcore.preprocessing import decode_image

    better, _ = better_and_worse
    out = io.StringIO()
    call_command("evaluate_model", "better", "--data", str(small_data), "--no-progress", stdout=out)
    table = out.getvalue()

    assert table.startswith(f"better at threshold {better.threshold:.3f}")
    assert "at registration (test)" in table
    rows = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "AUC 95% CI" in rows and "TP / FP / TN / FN" in rows and "ECE (calibrated)" in rows
    # The AUC on small_data/test, computed independently with the serving Predictor.
    with better.weights.open("rb") as handle:
        predictor = Predictor(*load_checkpoint(handle.read()), device="cpu")
    files = sorted((small_data / "test").rglob("*.jpg"))
    labels = [path.parent.name == "malignant" for path in files]
    results = predictor.predict([decode_image(path.read_bytes()).image for path in files])
    expected = roc_auc(labels, [r.probability_malignant for r in results])
    auc_cells = rows["AUC"].split()
    assert auc_cells[1] == f"{expected:.3f}"  # evaluated on the folder
    assert auc_cells[2] == "0.900"  # recorded at registration
    assert rows["cases"].split()[1] == "60"


def test_evaluate_model_refuses_bad_input(better_and_worse, tmp_path):
    with pytest.raises(CommandError, match="No model version 'nope'"):
        call_command("evaluate_model", "nope", "--data", str(tmp_path), stdout=io.StringIO())
    with pytest.raises(CommandError, match="does not exist"):
        call_command("evaluate_model", "better", "--data", str(tmp_path / "missing"), stdout=io.StringIO())


# --- 8. the admin ------------------------------------------------------------------------------------------------


@pytest.fixture
def superuser(db, django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.org", "correct-horse-battery")


@pytest.fixture
def admin_client_(client, superuser):
    client.force_login(superuser)
    return client


@pytest.fixture
def trained_version(db, small_run) -> ModelVersion:
    """The small pipeline run registered with its plots, provenance and reference set, as train_model does."""
    from diagnosis.services.registry import register_model
    from mlcore.model import checkpoint_bytes

    _, outcome = small_run
    return register_model(
        checkpoint=checkpoint_bytes(outcome.model, outcome.meta), version="admin-trained", plots=outcome.plots,
        provenance=outcome.provenance, reference_features=outcome.reference_features,
        drift_projection=outcome.drift_projection, quality_gate=outcome.quality_gate,
    )  # fmt: skip


def change_url(model: str, pk) -> str:
    return f"/admin/diagnosis/{model}/{pk}/change/"


def test_admin_change_page_shows_metrics_and_plots(admin_client_, trained_version):
    response = admin_client_.get(change_url("modelversion", trained_version.pk))
    assert response.status_code == 200
    html = response.content.decode()
    assert "test (de-duplicated)" in html and "ECE (calibrated)" in html and "AUC 95% CI" in html
    assert f"{trained_version.metrics['test']['auc']:.3f}" in html
    assert "0 of 60 test images have a near-duplicate" in html

    sources = re.findall(r'<img src="([^"]+)" alt="([a-z ]+) plot"', html)
    assert {alt.replace(" ", "_") for _, alt in sources} == PLOTS
    for src, alt in sources:
        assert src == f"/admin/diagnosis/modelversion/{trained_version.pk}/plot/{alt.replace(' ', '_')}/"
        plot = admin_client_.get(src)
        assert plot.status_code == 200
        assert plot["Content-Type"] == "image/png" and plot["X-Content-Type-Options"] == "nosniff"
        body = b"".join(plot.streaming_content)  # the test client closes the response (and file) at the end
        assert body.startswith(PNG_SIGNATURE)
        assert Image.open(io.BytesIO(body)).format == "PNG"

    assert admin_client_.get(f"/admin/diagnosis/modelversion/{trained_version.pk}/plot/nope/").status_code == 404
    assert admin_client_.get("/admin/diagnosis/modelversion/999999/plot/roc/").status_code == 404


def test_admin_pages_and_plots_need_a_staff_login(client, trained_version, clinician, django_user_model):
    plot_url = f"/admin/diagnosis/modelversion/{trained_version.pk}/plot/roc/"
    for url in (plot_url, change_url("modelversion", trained_version.pk)):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/admin/login/"), url

    client.force_login(clinician)  # a clinician is not staff
    response = client.get(plot_url)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")

    # Staff without permission on model versions does not get the plot either.
    staff = django_user_model.objects.create_user("staff", password="correct-horse-battery", is_staff=True)
    client.force_login(staff)
    assert client.get(plot_url).status_code == 404


def test_admin_lesion_image_page_renders_for_an_uploaded_image(admin_client_, clinic, clinician, active_model):
    from diagnosis.services.images import submit_image
    from diagnosis.services.predictions import process_image

    image = submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=4)))
    assert process_image(image_id=str(image.pk), worker_id="admin-test") == "done"

    response = admin_client_.get(change_url("lesionimage", image.pk))
    assert response.status_code == 200
    html = response.content.decode()
    assert image.file.name in html
    assert active_model.version in html  # the prediction inline
    assert admin_client_.get("/admin/diagnosis/lesionimage/").status_code == 200


def test_admin_activate_actions(admin_client_, superuser, trained_version, tiny_checkpoint):
    from diagnosis.services.registry import register_model

    better = register_model(checkpoint=checkpoint_with_metrics(tiny_checkpoint, 0.999), version="hand-better")
    call_command("activate_model", "hand-better", stdout=io.StringIO())
    changelist = "/admin/diagnosis/modelversion/"

    # The comparison with the active model warns before anyone acts.
    html = admin_client_.get(change_url("modelversion", trained_version.pk)).content.decode()
    assert "hand-better (active)" in html and "Lower AUC than the active model" in html

    response = admin_client_.post(
        changelist, {"action": "activate", "_selected_action": [trained_version.pk]}, follow=True
    )
    assert response.status_code == 200
    messages = [str(message) for message in response.context["messages"]]
    assert any("lower AUC" in message and "forced" in message for message in messages), messages
    assert active_version() == "hand-better"

    response = admin_client_.post(
        changelist, {"action": "activate_forced", "_selected_action": [trained_version.pk]}, follow=True
    )
    messages = [str(message) for message in response.context["messages"]]
    assert "admin-trained is now active." in messages
    assert active_version() == "admin-trained"
    activation = ModelActivation.objects.get(model_version=trained_version)
    assert activation.forced is True and activation.actor == superuser and activation.previous == better

    response = admin_client_.post(changelist, {"action": "roll_back", "_selected_action": [better.pk]}, follow=True)
    messages = [str(message) for message in response.context["messages"]]
    assert "Rolled back: hand-better is active again." in messages
    assert active_version() == "hand-better"


def test_admin_activate_needs_exactly_one_selection(admin_client_, trained_version, tiny_checkpoint):
    from diagnosis.services.registry import register_model

    other = register_model(checkpoint=checkpoint_with_metrics(tiny_checkpoint, 0.7), version="other")
    response = admin_client_.post(
        "/admin/diagnosis/modelversion/",
        {"action": "activate_forced", "_selected_action": [trained_version.pk, other.pk]},
        follow=True,
    )
    messages = [str(message) for message in response.context["messages"]]
    assert "Select exactly one model version." in messages
    assert active_version() is None


def test_admin_training_run_list_renders(admin_client_, trained_version):
    TrainingRun.objects.create(
        data_directory="/data", config={"lr": 0.001}, metrics={"auc": 0.8125}, status=TrainingRun.Status.FINISHED,
        selected=True, model_version=trained_version,
    )  # fmt: skip
    response = admin_client_.get("/admin/diagnosis/trainingrun/")
    assert response.status_code == 200
    assert "0.812" in response.content.decode()
    assert admin_client_.get(f"/admin/diagnosis/trainingrun/{TrainingRun.objects.get().pk}/change/").status_code == 200
