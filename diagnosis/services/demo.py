"""The embedded demo: a clinic, a clinician, an admin and a model trained on synthetic lesions."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import transaction
from django.utils import timezone

from mlcore.data import generate_lesion, write_image_folder

from ..models import Clinic, ClinicMembership, LesionImage, ModelVersion, Patient
from .images import submit_image
from .patients import create_lesion, create_patient
from .registry import activate_model, active_model_version
from .training import train_and_register

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

    @property
    def version(self) -> str:
        """The registered demo model's version name."""
        return f"demo-{self.arch}-{self.input_size}px-seed{self.seed}"


def write_demo_data(training: DemoTraining) -> Path:
    """A synthetic ImageFolder (train/ and test/) under var/, written once per size and seed."""

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
    lesions (through the same pipeline as train_model) if none is active. A demo model that a stopped run
    registered (one transaction) but did not get to activate is activated rather than trained again.
    Returns (the model version, whether it was trained now)."""
    existing = active_model_version()
    if existing is not None:
        return existing, False
    registered = ModelVersion.objects.filter(version=training.version).first()
    if registered is not None:
        log(f"Activating {registered.version}, registered by an earlier run that stopped before activating it.")
        return activate_model(model_version=registered), False
    from mlcore.train import TrainConfig

    config = TrainConfig(
        arch=training.arch, input_size=training.input_size, epochs=training.epochs, seed=training.seed, lr=2e-3
    )
    report = train_and_register(
        data_dir=write_demo_data(training),
        config=config,
        output=Path(settings.VAR_DIR) / "training" / "demo.pt",
        version=training.version,
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


DEMO_PATIENT = "DEMO-0001"


@transaction.atomic  # whole or not at all: a Ctrl-C while seeding must not leave a patient with some photos
def ensure_demo_patient(*, clinic: Clinic, clinician, log=print) -> bool:
    """Seed a demo patient with synthetic lesion photos, once, so a new user sees the portal working.

    The back lesion is followed over three visits and changes from benign-looking to malignant-looking;
    the forearm lesion has one benign-looking photo. Their predictions are computed by the worker like
    any upload: while no model is active they wait in the queue. Returns False when the clinic already has
    the demo patient.
    """

    if Patient.objects.filter(clinic=clinic, reference=DEMO_PATIENT).exists():
        return False
    patient = create_patient(clinic=clinic, reference=DEMO_PATIENT, created_by=clinician, via="cli")
    visits = {
        ("back", "Followed since the first visit: irregular border noted."): [
            (0, False, 180),
            (1, False, 90),
            (2, True, 3),
        ],
        ("forearm", "Stable naevus."): [(3, False, 30)],
    }
    now = timezone.now()
    for (site, note), photos in visits.items():
        lesion = create_lesion(patient=patient, body_site=site, note=note, created_by=clinician, via="cli")
        for seed, malignant, days_ago in photos:
            photo = generate_lesion(np.random.default_rng(1000 + seed), malignant=malignant, size=384).image
            buffer = io.BytesIO()
            photo.save(buffer, format="JPEG", quality=92)
            upload = SimpleUploadedFile("demo.jpg", buffer.getvalue(), content_type="image/jpeg")
            image = submit_image(uploader=clinician, clinic=clinic, upload=upload, lesion=lesion, via="cli")
            LesionImage.objects.filter(pk=image.pk).update(created_at=now - timedelta(days=days_ago))
    log(f"Seeded demo patient {DEMO_PATIENT} with {sum(len(p) for p in visits.values())} synthetic photos.")
    return True
