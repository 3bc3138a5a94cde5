"""Model registry: register checkpoints, activate one, and fetch weights into a local cache."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from ..models import AuditEvent, ModelVersion
from .audit import record_event


def register_model(
    *, checkpoint: bytes, version: str | None = None, activate: bool = False, actor=None, via: str = "cli"
) -> ModelVersion:
    """Check that a checkpoint loads and predicts, store it, and record a ModelVersion."""
    from mlcore.data import generate_lesion
    from mlcore.inference import Predictor
    from mlcore.model import CheckpointError, load_checkpoint

    try:
        model, meta = load_checkpoint(io.BytesIO(checkpoint))
        import numpy as np

        smoke = generate_lesion(np.random.default_rng(0), malignant=True, size=64).image
        Predictor(model, meta, device="cpu").predict([smoke])
    except CheckpointError as exc:
        raise ValidationError(f"The checkpoint cannot be used: {exc}") from exc

    sha256 = hashlib.sha256(checkpoint).hexdigest()
    version = version or f"{meta.arch}-{timezone.now():%Y%m%d-%H%M%S}-{sha256[:8]}"
    if ModelVersion.objects.filter(version=version).exists():
        raise ValidationError(f"Model version {version!r} already exists.")
    stored_name = default_storage.save(f"models/{sha256}.pt", ContentFile(checkpoint))
    try:
        with transaction.atomic():
            model_version = ModelVersion.objects.create(
                version=version,
                arch=meta.arch,
                input_size=meta.input_size,
                class_names=list(meta.class_names),
                threshold=meta.threshold,
                metrics=meta.metrics,
                metadata=meta.to_dict(),
                weights=stored_name,
                weights_sha256=sha256,
            )
            if activate:
                activate_model(model_version=model_version, actor=actor, via=via)
    except BaseException:
        default_storage.delete(stored_name)
        raise
    return model_version


@transaction.atomic
def activate_model(*, model_version: ModelVersion, actor=None, via: str = "cli") -> ModelVersion:
    """Make one version active. Workers read the active version before every task, so they switch
    without a restart."""
    ModelVersion.objects.select_for_update().filter(is_active=True).exclude(pk=model_version.pk).update(is_active=False)
    model_version.is_active = True
    model_version.activated_at = timezone.now()
    model_version.save(update_fields=["is_active", "activated_at"])
    record_event(actor=actor, action=AuditEvent.Action.ACTIVATE_MODEL, obj=model_version, via=via)
    return model_version


def active_model_version() -> ModelVersion | None:
    return ModelVersion.objects.filter(is_active=True).first()


def cached_weights_path(model_version: ModelVersion) -> Path:
    """A local copy of the weights, keyed by their SHA-256 and verified once when fetched."""
    cache_dir = Path(settings.MODEL_CACHE_DIR)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{model_version.weights_sha256}.pt"
    if target.exists():
        return target
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, model_version.weights.open("rb") as source:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != model_version.weights_sha256:
            raise ValidationError(f"The stored weights of {model_version.version} do not match their SHA-256.")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target
