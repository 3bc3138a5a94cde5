"""The photo-quality gate's fields in the API (issue 20): the schema of `quality`, the fields shared by the
prediction and status payloads, and the upload option `check`."""

from __future__ import annotations

from rest_framework import serializers

from ..models import RiskDecision


class QualityCheckSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="focus, brightness, clipped, skin, lesion_size, lesion_offset or resolution")
    value = serializers.FloatField()
    threshold = serializers.FloatField(allow_null=True, help_text="Null where the model version has none")
    direction = serializers.ChoiceField(choices=["low", "high"], help_text="low: fails below it; high: above it")
    passed = serializers.BooleanField()
    advice = serializers.CharField(allow_blank=True, help_text="What to do about it, in words, when it failed")


class OodSerializer(serializers.Serializer):
    score = serializers.FloatField(allow_null=True)
    threshold = serializers.FloatField(allow_null=True)
    passed = serializers.BooleanField()


class QualitySerializer(serializers.Serializer):
    gate = serializers.ChoiceField(choices=["strict", "lenient", "off"], help_text="How the photo was judged")
    checks = QualityCheckSerializer(many=True)
    reasons = serializers.ListField(child=serializers.CharField(), help_text="Why it cannot be assessed, in words")
    warnings = serializers.ListField(child=serializers.CharField(), required=False,
                                     help_text="Failed checks that did not refuse it (a lenient check)")  # fmt: skip
    ood = OodSerializer(required=False, help_text="The out-of-distribution score against the training photos")
    band = serializers.ListField(child=serializers.FloatField(), allow_null=True, required=False,
                                 help_text="The probabilities between which the result is uncertain")  # fmt: skip
    augmented = serializers.ListField(child=serializers.FloatField(), required=False,
                                      help_text="Test-time augmentation's probabilities, when it ran")  # fmt: skip
    advice = serializers.CharField(required=False, help_text="For an uncertain result")
    note = serializers.CharField(allow_blank=True, required=False)


DECISION_HELP = (
    "above_threshold or below_threshold (the referral call), uncertain (near the threshold, or augmented views "
    "disagree: specialist review recommended) or not_assessable (the photo failed the quality or "
    "out-of-distribution check: see quality.reasons and take another photo)."
)


class OutcomeFields(serializers.Serializer):
    """The quality gate's fields (issue 20), shared by the prediction and the status payloads."""

    decision = serializers.ChoiceField(choices=RiskDecision.choices, allow_null=True, help_text=DECISION_HELP)
    assessable = serializers.BooleanField(allow_null=True, help_text="False: no decision is shown for this photo")
    quality = QualitySerializer(allow_null=True)
    ood_score = serializers.FloatField(
        allow_null=True, help_text="Higher: less like the training photos (about 1.4 is typical)"
    )


def validate_check(serializer, attrs):
    """An empty `check` is an error, not the default: a client that sends the field means a value."""
    if "check" in serializer.initial_data and not serializer.initial_data.get("check"):
        raise serializers.ValidationError(
            {"check": ["Use strict, lenient or off; leave the field out for the clinic's default."]}
        )
    return attrs
