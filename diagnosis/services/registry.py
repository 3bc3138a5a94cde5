"""Model registry: register checkpoints, promote and roll back, and cache weights locally."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from mlcore.data import generate_lesion

from ..models import AuditEvent, ImageState, LesionImage, ModelActivation, ModelVersion, ReferenceFeature
from .audit import record_event
from .wakeups import enqueue_prediction

logger = logging.getLogger(__name__)


class VersionCache:
    """One object per process built for one model version, rebuilt when the active version (or its
    weights) changes, so a running worker switches models without a restart. The old object is
    dropped before the new one is built: two models never sit in memory at once."""

    def __init__(self, build) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._key: tuple[int, str] | None = None
        self._value = None

    def get(self, model_version: ModelVersion):
        key = (model_version.pk, model_version.weights_sha256)
        with self._lock:
            if self._key != key:
                self._key, self._value = None, None
                self._value = self._build(model_version)
                self._key = key
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._key, self._value = None, None


class PromotionBlocked(ValidationError):
    """The candidate's AUC is lower than the active model's; promotion needs force."""


def register_model(
    *,
    checkpoint: bytes,
    version: str | None = None,
    activate: bool = False,
    force: bool = False,
    actor=None,
    via: str = "cli",
    plots: dict[str, bytes] | None = None,
    provenance: dict | None = None,
    reference_features: list[dict] | None = None,
    drift_projection: dict | None = None,
    quality_gate: dict | None = None,
) -> ModelVersion:
    """Check that a checkpoint loads and predicts, store it with its plots, and record the
    ModelVersion with its drift reference set in one transaction. On any failure nothing is left:
    no row and no file."""
    meta = _checked_meta(checkpoint)
    sha256 = hashlib.sha256(checkpoint).hexdigest()
    version = version or f"{meta.arch}-{timezone.now():%Y%m%d-%H%M%S}-{sha256[:8]}"
    if ModelVersion.objects.filter(version=version).exists():
        raise ValidationError(f"Model version {version!r} already exists.")
    stored: list[str] = []
    try:
        plot_names = _store_files(checkpoint, sha256, plots or {}, stored)
        with transaction.atomic():
            model_version = ModelVersion.objects.create(
                version=version,
                arch=meta.arch,
                input_size=meta.input_size,
                class_names=list(meta.class_names),
                malignant_classes=list(meta.malignant_classes),
                threshold=meta.threshold,
                metrics=meta.metrics,
                metadata=meta.to_dict(),
                weights=stored[0],
                weights_sha256=sha256,
                plots=plot_names,
                provenance=provenance or {},
                drift_projection=drift_projection or {},
                quality_gate=quality_gate or {},
            )
            _create_reference_features(model_version, reference_features or [])
            if activate:
                activate_model(model_version=model_version, actor=actor, via=via, force=force)
    except BaseException:
        for name in stored:
            default_storage.delete(name)
        raise
    return model_version


def _checked_meta(checkpoint: bytes):
    """The checkpoint's metadata, once it has loaded and predicted on a synthetic lesion; ValidationError
    if it cannot be used."""
    from mlcore.inference import Predictor
    from mlcore.model import CheckpointError, load_checkpoint

    try:
        model, meta = load_checkpoint(io.BytesIO(checkpoint))
        smoke = generate_lesion(np.random.default_rng(0), malignant=True, size=64).image
        Predictor(model, meta, device="cpu").predict([smoke])
    except CheckpointError as exc:
        raise ValidationError(f"The checkpoint cannot be used: {exc}") from exc
    return meta


def _store_files(checkpoint: bytes, sha256: str, plots: dict[str, bytes], stored: list[str]) -> dict[str, str]:
    """Save the weights and the plots to storage; each saved name is appended to `stored` as soon as it
    exists, so that the caller can delete them all on a failure. Returns the plots' stored names."""
    stored.append(default_storage.save(f"models/{sha256}.pt", ContentFile(checkpoint)))
    plot_names = {}
    plot_folder = uuid.uuid4().hex
    for name, png in plots.items():
        plot_names[name] = default_storage.save(f"models/plots/{plot_folder}/{name}.png", ContentFile(png))
        stored.append(plot_names[name])
    return plot_names


def _create_reference_features(model_version: ModelVersion, rows: list[dict]) -> None:
    ReferenceFeature.objects.bulk_create(
        [
            ReferenceFeature(
                model_version=model_version, split=row["split"], label=row["label"], path=row["path"][:500],
                values=row["features"],
            )
            for row in rows
        ],
        batch_size=1000,
    )  # fmt: skip


COMPARED_METRICS = ("auc", "sensitivity", "specificity", "ece")


def headline_metrics(model_version: ModelVersion) -> tuple[str, dict]:
    """The metrics two versions are compared on: the test set when known, else validation."""
    metrics = model_version.metrics or {}
    if metrics.get("test"):
        return "test", metrics["test"]
    return "validation", metrics.get("validation") or {}


def compare_models(candidate: ModelVersion, current: ModelVersion | None) -> list[tuple[str, object, object]]:
    """Rows of (metric, active model's value, candidate's value)."""
    if current is None:
        return []
    kind_new, new = headline_metrics(candidate)
    kind_old, old = headline_metrics(current)
    suffix = kind_new if kind_new == kind_old else f"{kind_old} vs {kind_new}"
    return [(f"{name} ({suffix})", old.get(name), new.get(name)) for name in COMPARED_METRICS]


def auc_drop(candidate: ModelVersion, current: ModelVersion | None) -> tuple[float, float] | None:
    """(active AUC, candidate AUC) when the candidate's is lower on the same kind of split."""
    if current is None or current.pk == candidate.pk:
        return None
    kind_new, new = headline_metrics(candidate)
    kind_old, old = headline_metrics(current)
    if kind_new != kind_old or new.get("auc") is None or old.get("auc") is None:
        return None
    return (old["auc"], new["auc"]) if new["auc"] < old["auc"] else None


@transaction.atomic
def activate_model(
    *, model_version: ModelVersion, actor=None, via: str = "cli", force: bool = False, note: str = ""
) -> ModelVersion:
    """Make one version active. Workers read the active version before every task, so they switch
    without a restart. A version with a lower AUC than the active one is refused unless forced.
    A user as the actor needs the change permission on model versions (PermissionDenied otherwise);
    the command line (no actor) has the server's trust."""
    require_model_change(actor)
    current = ModelVersion.objects.select_for_update().filter(is_active=True).first()
    if current is not None and current.pk == model_version.pk:
        return model_version  # already active: nothing changes, and the rollback history stays intact
    drop = auc_drop(model_version, current)
    if drop and not force:
        raise PromotionBlocked(
            f"{model_version.version} has a lower AUC ({drop[1]:.3f}) than the active {current.version} "
            f"({drop[0]:.3f}). Promote it anyway with --force (or the admin's forced action)."
        )
    if current is not None and current.pk != model_version.pk:
        ModelVersion.objects.filter(pk=current.pk).update(is_active=False)
    model_version.is_active = True
    model_version.activated_at = timezone.now()
    model_version.save(update_fields=["is_active", "activated_at"])
    ModelActivation.objects.create(
        model_version=model_version,
        previous=current if current is not None and current.pk != model_version.pk else None,
        actor=actor if getattr(actor, "is_authenticated", False) else None,
        forced=bool(drop),
        note=note[:200],
    )
    record_event(actor=actor, action=AuditEvent.Action.ACTIVATE_MODEL, obj=model_version, via=via)
    if current is None:
        transaction.on_commit(send_waiting_uploads)
    return model_version


WAITING_UPLOADS_SENT = 1000  # at most, per activation; the sweeper sends any others


def send_waiting_uploads() -> int:
    """Once a model is active where none was: one message for each photo still queued. A worker gives its
    photos back to the queue while no model is active (predictions.PredictionWork.open), so photos uploaded
    meanwhile (while the demo model trains, say) start now rather than at the sweeper's next pass. A
    message whose photo another worker's batch took first is a no-op claim. Returns the messages sent."""
    waiting = LesionImage.objects.filter(state=ImageState.QUEUED).order_by("enqueued_at")
    sent = 0
    for image_id in waiting.values_list("pk", flat=True)[:WAITING_UPLOADS_SENT]:
        try:
            enqueue_prediction(str(image_id))
        except Exception as exc:  # the broker is down: the sweeper sends them later
            logger.warning("could not send the photos waiting for a model (%s); the sweeper will", exc)
            break
        sent += 1
    if sent:
        logger.info("a model is active: %d waiting photo(s) sent to the workers", sent)
    return sent


def require_model_change(actor) -> None:
    """PermissionDenied unless `actor` (a user; None for the command line) may change which model runs."""
    if actor is not None and not actor.has_perm("diagnosis.change_modelversion"):
        raise PermissionDenied("Changing the active model needs the change permission on model versions.")


def rollback_model(*, to: ModelVersion | None = None, actor=None, via: str = "cli") -> ModelVersion:
    """Return to the version that was active before the current one, or to a named version.

    A rollback goes back to a version that was trusted before, so the AUC guard does not apply."""
    require_model_change(actor)
    current = active_model_version()
    if to is None:
        last = ModelActivation.objects.filter(model_version=current).first() if current else None
        if last is None or last.previous is None:
            raise ValidationError("There is no earlier active version to roll back to.")
        to = last.previous
    if current is not None and to.pk == current.pk:
        raise ValidationError(f"{to.version} is already active.")
    return activate_model(model_version=to, actor=actor, via=via, force=True, note="rollback")


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
        # Through the storage, not the FieldFile: that would share one open file between threads.
        with os.fdopen(handle, "wb") as out, model_version.weights.storage.open(model_version.weights.name) as source:
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
