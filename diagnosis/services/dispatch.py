"""The one way services send Celery tasks: by name, so that no service imports diagnosis.tasks (tasks
sit above the services and call them). The routes (CELERY_TASK_ROUTES) and the publish retry policy
apply by name as they do to apply_async. tests/test_architecture.py checks that every name here is a
registered task."""

from __future__ import annotations

from celery import current_app

PREDICT = "diagnosis.tasks.predict_image_task"
EXPLAIN = "diagnosis.tasks.explain_image_task"
RENDER = "diagnosis.tasks.render_explanation_task"
DRIFT_REPORT = "diagnosis.tasks.drift_report_task"

# A prediction message's header naming the stored photo, so that an idle worker can start decoding it
# before it claims the image (services.decoding.decode_ahead). Older workers ignore unknown headers.
UPLOAD_FILE_HEADER = "upload_file"


def send(name: str, *, args: list | tuple = (), kwargs: dict | None = None, headers: dict | None = None) -> None:
    """Publish one message for the task `name`."""
    current_app.send_task(name, args=list(args), kwargs=kwargs or {}, headers=headers)
