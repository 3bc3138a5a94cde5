from django.conf import settings
from django.core.checks import Error, register


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
    }
    return [
        Error(f"{name} is {getattr(settings, name)!r}; use one of {', '.join(allowed)}.", id="diagnosis.E002")
        for name, allowed in choices.items()
        if str(getattr(settings, name)).strip().lower() not in allowed
    ]
