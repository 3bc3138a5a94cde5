"""The data model: clinics and their members, patients, lesions and their images, predictions and
explanations, clinicians' feedback, model versions and training runs, monitoring, tokens and the audit log.

Long because: the architecture puts every model of the app in this one layer module (Django's
diagnosis.models, imported by services, admin and migrations alike); each model class is short.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone
from knox.models import AbstractAuthToken

DISCLAIMER = "Decision support, not a diagnosis."


class QualityCheck(models.TextChoices):
    """How the photo-quality gate judges a photo (mlcore.quality.assess): strict refuses on any failed
    check, lenient only when no risk can be read at all (not skin, too small, unlike the training photos),
    off refuses nothing (the measures are still reported)."""

    STRICT = "strict", "Strict"
    LENIENT = "lenient", "Lenient"
    OFF = "off", "Off"


class Clinic(models.Model):
    name = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    quality_check = models.CharField(
        max_length=10, choices=QualityCheck.choices, default=QualityCheck.STRICT,
        help_text="The photo-quality check for this clinic's uploads, unless an upload asks for another",
    )  # fmt: skip

    def __str__(self) -> str:
        return self.name


class ClinicMembership(models.Model):
    """A clinician belongs to exactly one clinic, so every request has one unambiguous scope."""

    class Role(models.TextChoices):
        CLINICIAN = "clinician", "Clinician"
        CLINIC_ADMIN = "clinic_admin", "Clinic administrator"

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="clinic_membership")
    clinic = models.ForeignKey(Clinic, on_delete=models.PROTECT, related_name="memberships")
    role = models.CharField(max_length=20, choices=Role.choices, default=Role.CLINICIAN)
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.user} @ {self.clinic}"


class ClinicScopedQuerySet(models.QuerySet):
    clinic_path = "clinic"

    def for_clinic(self, clinic: Clinic | None) -> ClinicScopedQuerySet:
        if clinic is None:
            return self.none()
        return self.filter(**{self.clinic_path: clinic})

    def visible_to(self, user) -> ClinicScopedQuerySet:
        return self.for_clinic(clinic_of(user))


def clinic_of(user) -> Clinic | None:
    """The clinic whose data this user may see, or None (anonymous, or staff without a clinic). Cached
    on the user object for the rest of its request. Here, beside the models, so that a model's
    queryset can scope itself without importing a service (services.clinics re-exports it)."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    cached = getattr(user, "_clinic_cache", None)
    if cached is not None:
        return cached
    membership = ClinicMembership.objects.select_related("clinic").filter(user=user).first()
    clinic = membership.clinic if membership else None
    user._clinic_cache = clinic
    return clinic


class LesionQuerySet(ClinicScopedQuerySet):
    clinic_path = "patient__clinic"


pseudonymous_reference = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$",
    "Use a pseudonymous code such as PT-0042: letters, digits, '.', '_', '/' or '-', no spaces. "
    "Never enter a patient's real name.",
)


class Patient(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    clinic = models.ForeignKey(Clinic, on_delete=models.PROTECT, related_name="patients")
    reference = models.CharField(max_length=64, validators=[pseudonymous_reference])
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = ClinicScopedQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["clinic", "reference"], name="unique_patient_reference")]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.reference


class BodySite(models.TextChoices):
    SCALP = "scalp", "Scalp"
    FACE = "face", "Face"
    NECK = "neck", "Neck"
    CHEST = "chest", "Chest"
    ABDOMEN = "abdomen", "Abdomen"
    BACK = "back", "Back"
    UPPER_ARM = "upper_arm", "Upper arm"
    FOREARM = "forearm", "Forearm"
    HAND = "hand", "Hand"
    THIGH = "thigh", "Thigh"
    LOWER_LEG = "lower_leg", "Lower leg"
    FOOT = "foot", "Foot"
    PALM_SOLE = "palm_sole", "Palm or sole"
    GENITAL = "genital", "Genital area"
    OTHER = "other", "Other"


class Lesion(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    patient = models.ForeignKey(Patient, on_delete=models.PROTECT, related_name="lesions")
    body_site = models.CharField(max_length=20, choices=BodySite.choices)
    note = models.TextField(blank=True, max_length=2000)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    objects = LesionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.patient} / {self.get_body_site_display()}"


class ImageState(models.TextChoices):
    QUEUED = "queued", "Queued"
    PROCESSING = "processing", "Processing"
    DONE = "done", "Done"
    FAILED = "failed", "Failed"


class UploadBatch(models.Model):
    """Several photos uploaded in one request (POST /api/v1/images/batch/); each is an ordinary image."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    clinic = models.ForeignKey(Clinic, on_delete=models.PROTECT, related_name="batches")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    submitted = models.PositiveIntegerField(help_text="Files in the request")
    rejected = models.JSONField(default=list, help_text="Per refused file: its position, error code and message")

    objects = ClinicScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"batch {self.pk} ({self.submitted} files)"


class LesionImage(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    clinic = models.ForeignKey(Clinic, on_delete=models.PROTECT, related_name="images")
    lesion = models.ForeignKey(Lesion, on_delete=models.PROTECT, null=True, blank=True, related_name="images")
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    # Stored under a random key; the client's file name is never used or kept (it may hold a name).
    file = models.FileField(max_length=255)
    content_type = models.CharField(max_length=50)
    sha256 = models.CharField(max_length=64, db_index=True, help_text="SHA-256 of the bytes the client uploaded")
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    file_size = models.PositiveBigIntegerField(help_text="Size of the stored, metadata-free file in bytes")
    upload_bytes = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Size of the file as uploaded (a drift feature: it changes with the camera)"
    )
    batch = models.ForeignKey(UploadBatch, on_delete=models.SET_NULL, null=True, blank=True, related_name="images")
    idempotency_key = models.CharField(
        max_length=200, blank=True, help_text="The client's Idempotency-Key: a retry with it returns this image"
    )
    quality_check = models.CharField(
        max_length=10, choices=QualityCheck.choices, default=QualityCheck.STRICT,
        help_text="The photo-quality check this upload gets: its own option, or its clinic's",
    )  # fmt: skip
    camera = models.CharField(
        max_length=100, blank=True, help_text="The camera's make and model from the photo's metadata (then stripped)"
    )
    state = models.CharField(max_length=12, choices=ImageState.choices, default=ImageState.QUEUED)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    claimed_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.CharField(max_length=255, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    objects = ClinicScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["clinic", "-created_at"], name="image_clinic_newest"),
            models.Index(fields=["state", "enqueued_at"], name="image_state_enqueued"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["clinic", "uploaded_by", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="one_image_per_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        return f"image {self.pk} ({self.state})"

    @property
    def latest_prediction(self) -> Prediction | None:
        predictions = list(self.predictions.all())  # prefetched, newest first
        return predictions[0] if predictions else None


class ModelVersion(models.Model):
    version = models.CharField(max_length=100, unique=True)
    arch = models.CharField(max_length=50)
    input_size = models.PositiveIntegerField()
    class_names = models.JSONField()
    malignant_classes = models.JSONField(
        default=list, blank=True,
        help_text="The classes whose probabilities add up to the malignancy probability (empty: the last class)",
    )  # fmt: skip
    threshold = models.FloatField(help_text="Operating threshold on the malignancy probability")
    metrics = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True, help_text="The checkpoint's full metadata")
    weights = models.FileField(max_length=255)
    weights_sha256 = models.CharField(max_length=64)
    plots = models.JSONField(default=dict, blank=True, help_text="Plot name -> PNG file in storage")
    provenance = models.JSONField(
        default=dict, blank=True, help_text="Training config, data set hash, library versions, git commit, duration"
    )
    drift_projection = models.JSONField(
        default=dict, blank=True, help_text="PCA of the training set's embeddings, for embedding drift (mlcore.drift)"
    )
    quality_gate = models.JSONField(
        default=dict, blank=True,
        help_text="The photo-quality thresholds, OOD reference and refer-when-unsure band (mlcore.gate); "
        "empty for a version registered before the gate",
    )  # fmt: skip
    is_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    activated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["is_active"], condition=Q(is_active=True), name="one_active_model")
        ]

    def __str__(self) -> str:
        return self.version + (" (active)" if self.is_active else "")

    @property
    def malignant_set(self) -> list[str]:
        """The malignant classes; for a row made without them, the checkpoint's positive class."""
        return list(self.malignant_classes) or [(self.metadata or {}).get("positive_class", "malignant")]


class ModelActivation(models.Model):
    """Every promotion and rollback, in order: the history a rollback walks back through."""

    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="activations")
    previous = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    activated_at = models.DateTimeField(default=timezone.now)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    forced = models.BooleanField(
        default=False, help_text="Promoted despite a lower test AUC than the model it replaced"
    )
    note = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-activated_at", "-id"]

    def __str__(self) -> str:
        return f"{self.activated_at:%Y-%m-%d %H:%M} {self.model_version.version}"


class ReferenceFeature(models.Model):
    """Drift features (mlcore.drift) of one training image, the reference set for drift monitoring."""

    model_version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="reference_features")
    split = models.CharField(max_length=20)
    label = models.CharField(max_length=50)
    path = models.CharField(max_length=500)
    values = models.JSONField()

    class Meta:
        indexes = [models.Index(fields=["model_version", "split"], name="reference_version_split")]

    def __str__(self) -> str:
        return f"{self.model_version.version}: {self.path}"


class TrainingRun(models.Model):
    """One training run (a sweep has several): its config and validation metrics, kept offline."""

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        FINISHED = "finished", "Finished"
        FAILED = "failed", "Failed"
        INTERRUPTED = "interrupted", "Interrupted"

    sweep = models.UUIDField(null=True, blank=True, db_index=True, help_text="Runs of one sweep share this id")
    data_directory = models.CharField(max_length=500)
    data_sha256 = models.CharField(max_length=64, blank=True)
    config = models.JSONField()
    metrics = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.RUNNING)
    error = models.TextField(blank=True)
    selected = models.BooleanField(default=False, help_text="The best run of its sweep, the one registered")
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.SET_NULL, null=True, blank=True, related_name="training_runs"
    )
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"run {self.pk} ({self.status})"


class RiskDecision(models.TextChoices):
    ABOVE = "above_threshold", "Above the referral threshold"
    BELOW = "below_threshold", "Below the referral threshold"
    UNCERTAIN = "uncertain", "Uncertain: specialist review recommended"
    NOT_ASSESSABLE = "not_assessable", "Not assessable: take another photo"


class Prediction(models.Model):
    image = models.ForeignKey(LesionImage, on_delete=models.CASCADE, related_name="predictions")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="predictions")
    probability_malignant = models.FloatField()
    label = models.CharField(max_length=50)
    threshold = models.FloatField()
    probabilities = models.JSONField(default=dict)
    inference_ms = models.FloatField(null=True, blank=True)
    decision = models.CharField(
        max_length=20, choices=RiskDecision.choices, blank=True,
        help_text="Empty for a prediction stored before the quality gate: read it from the threshold",
    )  # fmt: skip
    assessable = models.BooleanField(null=True, blank=True)
    quality = models.JSONField(default=dict, blank=True, help_text="The quality checks, OOD and band (mlcore.gate)")
    ood_score = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["image", "model_version"], name="one_prediction_per_image_and_model")
        ]

    def __str__(self) -> str:
        return f"{self.label} p={self.probability_malignant:.3f} ({self.model_version.version})"


class Explanation(models.Model):
    """A heatmap of why the model scored an image as it did, by one method with one set of parameters."""

    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        PROCESSING = "processing", "Processing"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    image = models.ForeignKey(LesionImage, on_delete=models.CASCADE, related_name="explanations")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="explanations")
    method = models.CharField(max_length=30)
    params = models.JSONField(default=dict, help_text="Canonical parameters, defaults filled in")
    params_key = models.CharField(max_length=64, help_text="SHA-256 of the canonical method, parameters and target")
    target_index = models.PositiveSmallIntegerField()
    target_class = models.CharField(max_length=50)
    state = models.CharField(max_length=12, choices=State.choices, default=State.QUEUED)
    error = models.TextField(blank=True)
    overlay = models.FileField(max_length=255, blank=True)
    heatmap = models.FileField(max_length=255, blank=True)
    attribution = models.FileField(max_length=255, blank=True)
    raw_map = models.BinaryField(
        null=True, blank=True, editable=False,
        help_text="A Grad-CAM map (float16 .npy) kept in the row until its pictures and file are drawn",
    )  # fmt: skip
    convergence_delta = models.FloatField(null=True, blank=True, help_text="IG completeness error (log-odds units)")
    duration_ms = models.FloatField(null=True, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    claimed_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.CharField(max_length=255, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+",
        help_text="Empty for the automatic explanations of every prediction",
    )  # fmt: skip
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["image", "model_version", "method", "params_key"], name="one_explanation_per_request"
            )
        ]
        # The explain worker gathers the oldest queued explanations of its kind into one batch.
        indexes = [models.Index(fields=["state", "created_at"], name="explanation_state_created")]

    def __str__(self) -> str:
        return f"{self.method} of {self.image_id} ({self.state})"


class Diagnosis(models.TextChoices):
    """Histopathology outcomes a clinician can record; each maps to the model's two classes."""

    BENIGN = "benign", "Benign (unspecified)"
    MALIGNANT = "malignant", "Malignant (unspecified)"
    MELANOMA = "melanoma", "Melanoma (invasive)"
    MELANOMA_IN_SITU = "melanoma_in_situ", "Melanoma in situ"
    DYSPLASTIC_NAEVUS = "dysplastic_naevus", "Dysplastic naevus"
    BENIGN_NAEVUS = "benign_naevus", "Benign naevus"
    SEBORRHOEIC_KERATOSIS = "seborrhoeic_keratosis", "Seborrhoeic keratosis"
    DERMATOFIBROMA = "dermatofibroma", "Dermatofibroma"
    VASCULAR = "vascular", "Vascular lesion"
    BASAL_CELL_CARCINOMA = "basal_cell_carcinoma", "Basal cell carcinoma"
    SQUAMOUS_CELL_CARCINOMA = "squamous_cell_carcinoma", "Squamous cell carcinoma"
    OTHER = "other", "Other diagnosis"


# Ground truth for the model's question (is this lesion malignant?). "Other" has no label.
MALIGNANT_DIAGNOSES = {
    Diagnosis.MALIGNANT, Diagnosis.MELANOMA, Diagnosis.MELANOMA_IN_SITU, Diagnosis.BASAL_CELL_CARCINOMA,
    Diagnosis.SQUAMOUS_CELL_CARCINOMA,
}  # fmt: skip
BENIGN_DIAGNOSES = {
    Diagnosis.BENIGN, Diagnosis.DYSPLASTIC_NAEVUS, Diagnosis.BENIGN_NAEVUS, Diagnosis.SEBORRHOEIC_KERATOSIS,
    Diagnosis.DERMATOFIBROMA, Diagnosis.VASCULAR,
}  # fmt: skip


class Feedback(models.Model):
    """A clinician's assessment of a result (agree or disagree), or a histopathology outcome.

    Append-only: a correction is a newer record, so the history of who said what, and when, stays.
    The newest record of each kind is the image's current ground truth for monitoring.
    """

    class Kind(models.TextChoices):
        ASSESSMENT = "assessment", "Clinician assessment"
        HISTOPATHOLOGY = "histopathology", "Histopathology outcome"
        PHOTO = "photo", "Photo quality (agrees: the gate's call on the photo was right)"

    class GroundTruth(models.TextChoices):
        MALIGNANT = "malignant", "Malignant"
        BENIGN = "benign", "Benign"
        UNKNOWN = "", "Unknown"

    image = models.ForeignKey(LesionImage, on_delete=models.CASCADE, related_name="feedback")
    prediction = models.ForeignKey(
        Prediction, on_delete=models.SET_NULL, null=True, blank=True, related_name="feedback",
        help_text="The prediction the clinician saw when recording an assessment",
    )  # fmt: skip
    kind = models.CharField(max_length=20, choices=Kind.choices)
    agrees = models.BooleanField(null=True, blank=True, help_text="Assessment: does the clinician agree?")
    diagnosis = models.CharField(max_length=40, choices=Diagnosis.choices, blank=True)
    ground_truth = models.CharField(max_length=10, choices=GroundTruth.choices, blank=True)
    note = models.TextField(blank=True, max_length=1000)
    recorded_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    recorded_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-recorded_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(kind__in=["assessment", "photo"], agrees__isnull=False, diagnosis="")
                           | Q(kind="histopathology", agrees__isnull=True) & ~Q(diagnosis="")),
                name="feedback_fields_match_kind",
            )
        ]  # fmt: skip

    def __str__(self) -> str:
        if self.kind == self.Kind.ASSESSMENT:
            return "agrees" if self.agrees else "disagrees"
        return self.get_diagnosis_display()


class UploadFeatures(models.Model):
    """The drift features of one processed upload (mlcore.drift), and where each lies in the reference
    set of the model that scored it: its percentile, and a flag when it is outside the reference range."""

    image = models.OneToOneField(LesionImage, on_delete=models.CASCADE, related_name="drift_features")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    values = models.JSONField()
    placement = models.JSONField(default=list, help_text="Per feature: value, reference percentile, outlier flag")
    outlier_features = models.JSONField(default=list, blank=True)
    computed_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        verbose_name_plural = "upload features"

    def __str__(self) -> str:
        return f"features of {self.image_id}"


class DriftReport(models.Model):
    """One comparison of a window of uploads with the active model's reference set."""

    class Status(models.TextChoices):
        NO_DRIFT = "no_drift", "No drift"
        DRIFT = "drift", "Drift"
        INSUFFICIENT = "insufficient_data", "Too few uploads"
        FAILED = "failed", "Failed"

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, null=True, related_name="drift_reports")
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    window_description = models.CharField(max_length=100)
    current_count = models.PositiveIntegerField(default=0)
    reference_count = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=20, choices=Status.choices)
    message = models.TextField(blank=True)
    alpha = models.FloatField(help_text="Family-wise false-alarm rate per report")
    method = models.CharField(max_length=30, default="ks")
    features = models.JSONField(default=list, help_text="Per feature: test, p-value, threshold, drifted, histograms")
    drifted_features = models.JSONField(default=list, blank=True)
    embedding_drifted = models.BooleanField(default=False)
    operations = models.JSONField(default=dict, blank=True, help_text="Uploads, failures and latency in the window")
    snapshot = models.FileField(max_length=255, blank=True, help_text="Evidently snapshot (JSON)")
    html = models.FileField(max_length=255, blank=True, help_text="Evidently HTML report")
    triggered_by = models.CharField(max_length=150, default="schedule")
    duration_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M} {self.get_status_display()}"


class MonitoringAlert(models.Model):
    """One episode of a monitored condition (drift, failed uploads, latency): opened and notified
    once, kept open while the condition lasts, closed when a report finds it gone."""

    class Kind(models.TextChoices):
        DRIFT = "drift", "Data drift"
        FAILURES = "failures", "Share of failed uploads"
        LATENCY = "latency", "Processing latency"
        QUALITY = "quality", "Share of photos not assessable"
        SUBGROUP = "subgroup", "Sensitivity gap in a subgroup"

    kind = models.CharField(max_length=20, choices=Kind.choices)
    opened_at = models.DateTimeField(default=timezone.now, db_index=True)
    last_seen_at = models.DateTimeField(default=timezone.now)
    closed_at = models.DateTimeField(null=True, blank=True)
    report = models.ForeignKey(DriftReport, on_delete=models.SET_NULL, null=True, related_name="alerts",
                               help_text="The report that opened the episode")  # fmt: skip
    reports_seen = models.PositiveIntegerField(default=1)
    message = models.TextField()
    emailed_to = models.JSONField(default=list, blank=True)
    email_error = models.TextField(blank=True)
    webhook_status = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-opened_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind"], condition=Q(closed_at__isnull=True), name="one_open_alert_per_kind"
            )
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} since {self.opened_at:%Y-%m-%d %H:%M}"


class ApiToken(AbstractAuthToken):
    """A knox token (stored as a SHA-512 digest) with a name, so people can tell their tokens apart."""

    name = models.CharField(max_length=100)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.name} ({self.token_key}…, {self.user})"


class AuditEvent(models.Model):
    """Who did what to which patient data, and when. Written by services; never edited."""

    class Action(models.TextChoices):
        VIEW_IMAGE = "view_image", "Viewed an image result"
        DOWNLOAD_IMAGE = "download_image", "Downloaded an image"
        UPLOAD_IMAGE = "upload_image", "Uploaded an image"
        VIEW_PATIENT = "view_patient", "Viewed a patient"
        CREATE_PATIENT = "create_patient", "Created a patient"
        CREATE_LESION = "create_lesion", "Created a lesion"
        CREATE_TOKEN = "create_token", "Created an API token"
        REVOKE_TOKEN = "revoke_token", "Revoked an API token"
        ACTIVATE_MODEL = "activate_model", "Activated a model version"
        REQUEST_EXPLANATION = "request_explanation", "Requested an explanation"
        VIEW_EXPLANATION = "view_explanation", "Downloaded an explanation file"
        VIEW_LESION = "view_lesion", "Viewed a lesion timeline"
        VIEW_REPORT = "view_report", "Opened a lesion report"
        VIEW_HISTORY = "view_history", "Listed the clinic's images"
        RECORD_FEEDBACK = "record_feedback", "Recorded feedback or an outcome"
        PURGE_PATIENT = "purge_patient", "Erased a patient and their files"
        PURGE_EXPIRED = "purge_expired", "Deleted images past the retention period"

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="+")
    actor_username = models.CharField(max_length=150, blank=True)
    clinic = models.ForeignKey(Clinic, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    action = models.CharField(max_length=30, choices=Action.choices)
    object_type = models.CharField(max_length=50, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    via = models.CharField(max_length=20, blank=True, help_text="api, portal, admin or cli")
    ip_address = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.actor_username} {self.action} {self.object_type} {self.object_id}"
