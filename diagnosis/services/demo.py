"""The embedded demo: a clinic, a clinician, an admin and a model trained on synthetic lesions."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction

from ..models import Clinic, ClinicMembership, ModelVersion
from .registry import active_model_version, register_model

logger = logging.getLogger(__name__)

DEMO_CLINIC = "Demo Dermatology Clinic"


@dataclass
class DemoTraining:
    arch: str = "resnet18"
    input_size: int = 128
    train_images: int = 1200
    val_images: int = 200
    epochs: int = 4
    seed: int = 0


def ensure_demo_model(*, training: DemoTraining, progress: bool = True) -> tuple[ModelVersion, bool]:
    """Return the active model, training and registering a demo model first if none is active."""
    existing = active_model_version()
    if existing is not None:
        return existing, False
    from mlcore.data import SyntheticLesions
    from mlcore.model import checkpoint_bytes
    from mlcore.train import TrainConfig, train_classifier

    size = training.input_size
    from tqdm import tqdm

    def generate(count: int, seed: int, what: str) -> list:
        lesions = SyntheticLesions(count, size=size, seed=seed)
        return list(tqdm(lesions, total=count, desc=f"generating {what} lesions", disable=not progress, leave=False))

    train_items = generate(training.train_images, training.seed * 10 + 1, "training")
    val_items = generate(training.val_images, training.seed * 10 + 2, "validation")
    config = TrainConfig(arch=training.arch, input_size=size, epochs=training.epochs, seed=training.seed)
    result = train_classifier(train_items, val_items, config, progress=progress)
    result.meta.training["data"] = "synthetic lesions (mlcore.data), demo model: not for clinical use"
    model_version = register_model(
        checkpoint=checkpoint_bytes(result.model, result.meta),
        version=f"demo-{training.arch}-{size}px-seed{training.seed}",
        activate=True,
        via="cli",
    )
    return model_version, True


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
