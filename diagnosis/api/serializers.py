from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..models import (
    DISCLAIMER,
    BodySite,
    Explanation,
    Feedback,
    ImageState,
    Lesion,
    LesionImage,
    Patient,
    Prediction,
    QualityCheck,
    RiskDecision,
)  # fmt: skip
from ..services.status import EMPTY_OUTCOME, above_threshold, diagnoses, prediction_outcome
from .quality_serializers import DECISION_HELP, OutcomeFields, QualitySerializer, validate_check


class ClinicScopedPrimaryKeyField(serializers.PrimaryKeyRelatedField):
    """A related id that must belong to the requester's clinic; another clinic's id reads as unknown."""

    default_error_messages = {
        "does_not_exist": "Unknown {model_name} {pk_value}: no such {model_name} in your clinic.",
        "incorrect_type": "Expected an id (UUID), got {data_type}.",
    }

    def get_queryset(self):
        return self.queryset.visible_to(self.context["request"].user)

    def to_internal_value(self, data):
        try:
            return self.get_queryset().get(pk=data)
        except (self.queryset.model.DoesNotExist, DjangoValidationError, ValueError, TypeError):
            self.fail("does_not_exist", pk_value=data, model_name=self.queryset.model._meta.verbose_name)


class PatientSerializer(serializers.ModelSerializer):
    lesion_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Patient
        fields = ["id", "reference", "lesion_count", "created_at"]
        read_only_fields = ["id", "created_at"]
        extra_kwargs = {
            "reference": {
                "help_text": "A pseudonymous code such as PT-0042 (letters, digits, . _ / -). Never a real name.",
                "validators": [],
            }
        }


class LesionSerializer(serializers.ModelSerializer):
    patient = ClinicScopedPrimaryKeyField(queryset=Patient.objects.all(), pk_field=serializers.UUIDField())
    body_site = serializers.ChoiceField(choices=BodySite.choices)
    image_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Lesion
        fields = ["id", "patient", "body_site", "note", "image_count", "created_at"]
        read_only_fields = ["id", "created_at"]


class DiagnosisSerializer(serializers.Serializer):
    diagnosis = serializers.CharField(help_text="A class the model knows, e.g. mel or nv for HAM10000's seven")
    probability = serializers.FloatField()
    malignant = serializers.BooleanField(help_text="Whether it counts towards probability_malignant")


class PredictionSerializer(serializers.ModelSerializer):
    model_version = serializers.CharField(source="model_version.version")
    above_threshold = serializers.SerializerMethodField(
        help_text="Whether the probability reaches the model's operating (referral) threshold; null when the "
        "photo is not assessable."
    )
    decision = serializers.SerializerMethodField(help_text=DECISION_HELP)
    assessable = serializers.SerializerMethodField()
    quality = serializers.SerializerMethodField()
    ood_score = serializers.SerializerMethodField()
    diagnoses = serializers.SerializerMethodField(
        help_text="Every class's probability, the most probable first, each marked malignant or not; "
        "probability_malignant is the sum over the malignant ones. A binary model lists its two classes."
    )

    class Meta:
        model = Prediction
        fields = ["probability_malignant", "label", "threshold", "above_threshold", "decision", "assessable",
                  "quality", "ood_score", "diagnoses", "model_version", "created_at"]  # fmt: skip

    def _outcome(self, prediction: Prediction) -> dict:
        return prediction_outcome(prediction)

    @extend_schema_field(serializers.BooleanField(allow_null=True))
    def get_above_threshold(self, prediction: Prediction) -> bool | None:
        return above_threshold(prediction.probability_malignant, prediction.threshold, self.get_decision(prediction))

    @extend_schema_field(serializers.ChoiceField(choices=RiskDecision.choices))
    def get_decision(self, prediction: Prediction) -> str:
        return self._outcome(prediction)["decision"]

    @extend_schema_field(serializers.BooleanField())
    def get_assessable(self, prediction: Prediction) -> bool:
        return self._outcome(prediction)["assessable"]

    @extend_schema_field(QualitySerializer)
    def get_quality(self, prediction: Prediction) -> dict:
        return self._outcome(prediction)["quality"]

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_ood_score(self, prediction: Prediction) -> float | None:
        return prediction.ood_score

    @extend_schema_field(DiagnosisSerializer(many=True))
    def get_diagnoses(self, prediction: Prediction) -> list[dict]:
        return diagnoses(prediction.probabilities, prediction.model_version.malignant_set)


class ImageUploadSerializer(serializers.Serializer):
    image = serializers.FileField(help_text="A JPEG, PNG or WebP photo of the lesion.", allow_empty_file=True)
    lesion = ClinicScopedPrimaryKeyField(
        queryset=Lesion.objects.all(),
        required=False,
        allow_null=True,
        pk_field=serializers.UUIDField(),
        help_text="Optional: the lesion this photo shows.",
    )
    check = serializers.ChoiceField(
        choices=QualityCheck.choices, required=False,
        help_text="The photo-quality check: strict refuses a photo that fails any check, lenient only one from "
        "which no risk can be read (not skin, too small, unlike the training photos), off refuses none. "
        "Default: the clinic's setting.",
    )  # fmt: skip

    def validate(self, attrs):
        return validate_check(self, attrs)


class ImageSerializer(serializers.ModelSerializer):
    status_url = serializers.SerializerMethodField()
    file_url = serializers.SerializerMethodField()
    lesion = serializers.UUIDField(source="lesion_id", read_only=True, allow_null=True)
    prediction = serializers.SerializerMethodField()
    decision = serializers.SerializerMethodField(help_text=DECISION_HELP + " Null until done.")
    assessable = serializers.SerializerMethodField()
    quality = serializers.SerializerMethodField()
    ood_score = serializers.SerializerMethodField()
    disclaimer = serializers.SerializerMethodField()

    class Meta:
        model = LesionImage
        fields = [
            "id",
            "state",
            "error",
            "status_url",
            "file_url",
            "lesion",
            "width",
            "height",
            "content_type",
            "sha256",
            "created_at",
            "processed_at",
            "prediction",
            "decision",
            "assessable",
            "quality",
            "ood_score",
            "disclaimer",
        ]
        read_only_fields = fields

    def _absolute(self, path: str) -> str:
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path

    def get_status_url(self, image: LesionImage) -> str:
        return self._absolute(reverse("api:image-detail", kwargs={"pk": image.pk}))

    def get_file_url(self, image: LesionImage) -> str:
        return self._absolute(reverse("api:image-file", kwargs={"pk": image.pk}))

    @extend_schema_field(PredictionSerializer(allow_null=True))
    def get_prediction(self, image: LesionImage):
        prediction = image.latest_prediction
        return PredictionSerializer(prediction).data if prediction else None

    def _outcome(self, image: LesionImage) -> dict:
        prediction = image.latest_prediction
        if prediction is None or image.state != ImageState.DONE:
            return EMPTY_OUTCOME
        return prediction_outcome(prediction)

    @extend_schema_field(serializers.ChoiceField(choices=RiskDecision.choices, allow_null=True))
    def get_decision(self, image: LesionImage) -> str | None:
        return self._outcome(image)["decision"]

    @extend_schema_field(serializers.BooleanField(allow_null=True))
    def get_assessable(self, image: LesionImage) -> bool | None:
        return self._outcome(image)["assessable"]

    @extend_schema_field(QualitySerializer(allow_null=True))
    def get_quality(self, image: LesionImage) -> dict | None:
        return self._outcome(image)["quality"]

    @extend_schema_field(serializers.FloatField(allow_null=True))
    def get_ood_score(self, image: LesionImage) -> float | None:
        return self._outcome(image)["ood_score"]

    def get_disclaimer(self, image: LesionImage) -> str:
        return DISCLAIMER


class StatusPredictionSerializer(OutcomeFields):
    probability_malignant = serializers.FloatField()
    label = serializers.CharField()
    threshold = serializers.FloatField()
    above_threshold = serializers.BooleanField(allow_null=True)
    diagnoses = DiagnosisSerializer(many=True)
    model_version = serializers.CharField()


class ImageStatusSerializer(OutcomeFields):
    """What a polling client needs, read in one query (ImageViewSet.image_status). The quality gate's
    fields are the latest prediction's, null until it is done."""

    id = serializers.UUIDField()
    state = serializers.ChoiceField(choices=ImageState.choices)
    error = serializers.CharField(allow_blank=True)
    processed_at = serializers.DateTimeField(allow_null=True)
    prediction = StatusPredictionSerializer(allow_null=True)
    disclaimer = serializers.CharField()


class ExplanationRequestSerializer(serializers.Serializer):
    method = serializers.CharField(
        help_text="integrated_gradients, gradcam, occlusion, gradient_shap, smoothgrad or lime."
    )
    params = serializers.DictField(
        required=False,
        default=dict,
        help_text=(
            "Method parameters; omitted ones take their defaults. integrated_gradients: n_steps (default 50), "
            "baseline (black|blurred|mean). occlusion: window, stride, baseline. gradient_shap: n_samples, stdevs. "
            "smoothgrad: n_samples, stdevs, n_steps, baseline. lime: n_segments, n_samples, baseline."
        ),
    )
    target = serializers.CharField(
        required=False, help_text="The class to explain (default: the predicted class at the operating threshold)."
    )


class ExplanationSerializer(serializers.ModelSerializer):
    image = serializers.UUIDField(source="image_id", read_only=True)
    model_version = serializers.CharField(source="model_version.version", read_only=True)
    status_url = serializers.SerializerMethodField()
    overlay_url = serializers.SerializerMethodField()
    heatmap_url = serializers.SerializerMethodField()
    attribution_url = serializers.SerializerMethodField()

    class Meta:
        model = Explanation
        fields = [
            "id", "image", "method", "params", "target_class", "model_version", "state", "error", "status_url",
            "overlay_url", "heatmap_url", "attribution_url", "convergence_delta", "duration_ms", "created_at",
            "finished_at",
        ]  # fmt: skip
        read_only_fields = fields

    def _absolute(self, name: str, explanation: Explanation) -> str:
        path = reverse(f"api:explanation-{name}", kwargs={"pk": explanation.pk})
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path

    def get_status_url(self, explanation: Explanation) -> str:
        return self._absolute("detail", explanation)

    def get_overlay_url(self, explanation: Explanation) -> str | None:
        return self._absolute("overlay", explanation) if explanation.state == Explanation.State.DONE else None

    def get_heatmap_url(self, explanation: Explanation) -> str | None:
        return self._absolute("heatmap", explanation) if explanation.state == Explanation.State.DONE else None

    def get_attribution_url(self, explanation: Explanation) -> str | None:
        return self._absolute("attribution", explanation) if explanation.state == Explanation.State.DONE else None


class FeedbackSerializer(serializers.ModelSerializer):
    image = serializers.UUIDField(source="image_id", read_only=True)
    recorded_by = serializers.CharField(source="recorded_by.get_username", read_only=True, default=None)
    model_version = serializers.CharField(source="prediction.model_version.version", read_only=True, default=None)
    photo_was_fine = serializers.BooleanField(
        required=False, write_only=True,
        help_text="kind=photo: true for \"this photo was fine\" (on a photo the quality gate refused), false when "
        "the photo was poor (on one it accepted). Stored as `agrees`: whether the gate's verdict was right.",
    )  # fmt: skip

    class Meta:
        model = Feedback
        fields = ["id", "image", "kind", "agrees", "photo_was_fine", "diagnosis", "ground_truth", "note",
                  "model_version", "recorded_by", "recorded_at"]  # fmt: skip
        read_only_fields = ["id", "ground_truth", "recorded_at"]
        extra_kwargs = {
            "agrees": {"help_text": "kind=assessment: does the clinician agree with the result? Read back for "
                                    "kind=photo: was the quality gate's verdict on the photo right?"},
            "diagnosis": {"help_text": "kind=histopathology: the outcome."},
        }  # fmt: skip

    def validate(self, attrs):
        kind = attrs.get("kind")
        if kind == Feedback.Kind.ASSESSMENT and attrs.get("agrees") is None:
            raise serializers.ValidationError({"agrees": ["An assessment needs agrees: true or false."]})
        if kind == Feedback.Kind.HISTOPATHOLOGY and not attrs.get("diagnosis"):
            raise serializers.ValidationError({"diagnosis": ["A histopathology outcome needs a diagnosis."]})
        if kind == Feedback.Kind.PHOTO and ("photo_was_fine" not in attrs or "agrees" in attrs):
            field = "agrees" if "agrees" in attrs else "photo_was_fine"
            message = "Feedback on a photo needs photo_was_fine: true or false (agrees is read back, not sent)."
            raise serializers.ValidationError({field: [message]})
        if kind != Feedback.Kind.PHOTO and "photo_was_fine" in attrs:
            raise serializers.ValidationError({"photo_was_fine": ["photo_was_fine is for kind=photo only."]})
        return attrs


class BatchUploadSerializer(serializers.Serializer):
    images = serializers.ListField(
        child=serializers.FileField(allow_empty_file=True), allow_empty=False,
        help_text="The photos: repeat the multipart field `images` once per file.",
    )  # fmt: skip
    lesion = ClinicScopedPrimaryKeyField(
        queryset=Lesion.objects.all(), required=False, allow_null=True, pk_field=serializers.UUIDField(),
        help_text="Optional: the lesion all these photos show.",
    )  # fmt: skip
    check = serializers.ChoiceField(
        choices=QualityCheck.choices,
        required=False,
        help_text="The photo-quality check for every file (as one upload's).",
    )

    def validate_images(self, files):
        if len(files) > settings.MAX_BATCH_FILES:
            raise serializers.ValidationError(
                f"{len(files)} files were sent; a batch takes at most {settings.MAX_BATCH_FILES}."
            )
        return files

    def validate(self, attrs):
        return validate_check(self, attrs)


class BatchItemSerializer(serializers.Serializer):
    position = serializers.IntegerField(help_text="The file's position in the request, from 0.")
    id = serializers.UUIDField(required=False)
    status_url = serializers.URLField(required=False)
    code = serializers.CharField(required=False, help_text="Why the file was refused (rejected files).")
    detail = serializers.CharField(required=False)
    state = serializers.ChoiceField(
        choices=ImageState.choices, required=False, help_text="Accepted files, when the upload asked to wait."
    )
    prediction = StatusPredictionSerializer(
        allow_null=True, required=False, help_text="Accepted files done within the wait: the prediction."
    )


class BatchImageSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    state = serializers.ChoiceField(choices=ImageState.choices)
    status_url = serializers.URLField()
    prediction = StatusPredictionSerializer(allow_null=True, help_text="Set once the image is done.")


class BatchSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status_url = serializers.URLField()
    submitted = serializers.IntegerField()
    accepted = BatchItemSerializer(many=True)
    rejected = BatchItemSerializer(many=True)


class BatchStatusSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    created_at = serializers.DateTimeField()
    submitted = serializers.IntegerField()
    accepted = serializers.IntegerField()
    rejected = BatchItemSerializer(many=True)
    states = serializers.DictField(child=serializers.IntegerField(), help_text="Accepted images per state.")
    finished = serializers.BooleanField(help_text="Every accepted image is done or failed.")
    images = BatchImageSerializer(many=True)
