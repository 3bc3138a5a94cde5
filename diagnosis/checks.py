from django.conf import settings
from django.core.checks import Error, register

from mlcore.quality import BOUNDS


@register()
def claim_timeout_outlives_tasks(app_configs, **kwargs):
    """A claim younger than the task time limit may belong to a live worker; handing it to another
    would process the image twice."""
    if settings.CLAIM_TIMEOUT_SECONDS <= settings.CELERY_TASK_TIME_LIMIT:
        return [
            Error(
                f"CLAIM_TIMEOUT_SECONDS ({settings.CLAIM_TIMEOUT_SECONDS}) must be longer than "
                f"CELERY_TASK_TIME_LIMIT ({settings.CELERY_TASK_TIME_LIMIT}).",
                hint="Raise CLAIM_TIMEOUT_SECONDS or lower the task time limit.",
                id="diagnosis.E001",
            )
        ]
    return []


@register()
def known_choices(app_configs, **kwargs):
    """Settings that take one of a few words: a typo must stop the start, not change the behaviour."""
    choices = {
        "GRADCAM_PICTURES": ("on_view", "eager"),
        "RESULT_NOTIFY": ("auto", "redis", "postgres", "local", "off"),
        "TEST_TIME_AUGMENTATION": ("auto", "on", "off"),
    }
    return [
        Error(f"{name} is {getattr(settings, name)!r}; use one of {', '.join(allowed)}.", id="diagnosis.E002")
        for name, allowed in choices.items()
        if str(getattr(settings, name)).strip().lower() not in allowed
    ]


@register()
def quality_gate_overrides(app_configs, **kwargs):
    """QUALITY_GATE_OVERRIDES: known keys with numbers, so that a typo cannot turn a check off unseen."""
    allowed = {f"{name}:{direction}" for name, direction in BOUNDS} | {"resolution:low", "ood", "band"}
    overrides = settings.QUALITY_GATE_OVERRIDES
    if not isinstance(overrides, dict):
        return [Error("QUALITY_GATE_OVERRIDES must be a JSON object.", id="diagnosis.E003")]
    errors = []
    for key, value in overrides.items():
        if key not in allowed:
            errors.append(f"{key!r} is not a threshold; use one of {', '.join(sorted(allowed))}")
        elif key == "band":
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
                    and 0 <= value[0] <= value[1] <= 1):  # fmt: skip
                errors.append("'band' must be [low, high], two probabilities with low <= high")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            errors.append(f"{key!r} must be a number")
    return [Error(f"QUALITY_GATE_OVERRIDES: {message}.", id="diagnosis.E003") for message in errors]
