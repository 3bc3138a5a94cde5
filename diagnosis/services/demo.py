"""The embedded demo: a clinic, a clinician, an admin and a model trained on synthetic lesions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction

from ..models import Clinic, ClinicMembership, ModelVersion
from .registry import active_model_version

logger = logging.getLogger(__name__)

DEMO_CLINIC = "Demo Dermatology Clinic"


@dataclass
class DemoTraining:
    arch: str = "resnet18"
    input_size: int = 128
    train_images: int = 1200
    test_images: int = 300
    epochs: int = 4
    seed: int = 0


def write_demo_data(training: DemoTraining) -> Path:
    """A synthetic ImageFolder (train/ and test/) under var/, written once per size and seed."""
    from mlcore.data import write_image_folder

    root = Path(settings.VAR_DIR) / "demo-data" / f"{training.train_images}-{training.test_images}-{training.seed}"
    marker = root / ".complete"
    if not marker.exists():
        write_image_folder(
            root, splits={"train": training.train_images, "test": training.test_images},
            size=max(128, training.input_size), seed=training.seed,
        )  # fmt: skip
        marker.touch()
    return root


def ensure_demo_model(*, training: DemoTraining, progress: bool = True, log=print) -> tuple[ModelVersion, bool]:
    """Return the active model, first training, evaluating and registering a demo model on synthetic
    lesions (through the same pipeline as train_model) if none is active."""
    existing = active_model_version()
    if existing is not None:
        return existing, False
    from mlcore.train import TrainConfig

    from .training import train_and_register

    config = TrainConfig(
        arch=training.arch, input_size=training.input_size, epochs=training.epochs, seed=training.seed, lr=2e-3
    )
    report = train_and_register(
        data_dir=write_demo_data(training),
        config=config,
        output=Path(settings.VAR_DIR) / "training" / "demo.pt",
        version=f"demo-{training.arch}-{training.input_size}px-seed{training.seed}",
        activate=True,
        progress=progress,
        log=log,
    )
    if report.model_version is None:
        raise RuntimeError("Demo training was interrupted; run it again.")
    return report.model_version, True


@transaction.atomic
def ensure_demo_accounts(*, clinician_password: str, admin_password: str) -> tuple[Clinic, object, object]:
    clinic, _ = Clinic.objects.get_or_create(name=DEMO_CLINIC)
    user_model = get_user_model()
    clinician, _ = user_model.objects.get_or_create(username="demo", defaults={"first_name": "Demo"})
    clinician.set_password(clinician_password)
    clinician.save()
    ClinicMembership.objects.get_or_create(user=clinician, defaults={"clinic": clinic})
    admin, _ = user_model.objects.get_or_create(username="admin", defaults={"is_staff": True, "is_superuser": True})
    admin.is_staff = admin.is_superuser = True
    admin.set_password(admin_password)
    admin.save()
    return clinic, clinician, admin
