"""Fuzzing the API against its own OpenAPI schema with schemathesis.

The schema is the one the site serves at /api/schema/ (drf-spectacular), loaded through the Django
WSGI application itself; every generated request goes to that application in this process, with the
real token of a clinician whose clinic owns a patient, a lesion, a processed image and its Grad-CAM
explanation. Each operation gets a bounded number of examples, positive (data that fits the
schema) and negative (data that does not), with random ids and with the ids of those real objects,
deterministically (hypothesis' derandomize). Every response must pass:

- not_a_server_error: no 5xx;
- status_code_conformance: the status code is documented for the operation;
- content_type_conformance: the Content-Type is one documented for that status;
- response_schema_conformance: the body matches the documented schema;
- response_headers_conformance: documented response headers are present and valid.

Every problem found in any operation is collected and reported at the end, with the request to
reproduce it, so one run shows them all. The requests run in the test's transaction, each in a
savepoint rolled back after it, so examples do not pile up state and a server error in one cannot
poison the next; nothing commits, so no task is ever published.
"""

from __future__ import annotations

import collections
import contextlib
import time

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections, transaction
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup

from diagnosis.models import Explanation, LesionImage
from diagnosis.services.explanation_files import render_explanation
from diagnosis.services.images import submit_batch, submit_image
from diagnosis.services.predictions import process_image
from diagnosis.services.tokens import create_api_token
from tests.conftest import lesion_jpeg, upload_file
from tests.factories import LesionFactory, PatientFactory

MAX_EXAMPLES = 25  # per operation, per generation mode
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same examples on every run
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
    report_multiple_bugs=True,  # every distinct failure of an operation, not just the first
)
REPORT_LIMIT = 3000  # characters of schemathesis' report per problem


@pytest.fixture
def in_process_wsgi():
    """Requests go through Django's real WSGI handler in this thread. Its request_started and
    request_finished signals would close the test's database connection (in a transaction, which
    a WSGI server never is); Django's own test client disconnects the same receiver."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def owned_objects(clinician, clinic, active_model, django_capture_on_commit_callbacks):
    """A patient, a lesion, a processed image of the clinician's clinic with its Grad-CAM explanation
    rendered, and an upload batch: the objects the fuzzer's real ids point at."""

    patient = PatientFactory(clinic=clinic, reference="PT-FUZZ-0001", created_by=clinician)
    lesion = LesionFactory(patient=patient, created_by=clinician)
    with django_capture_on_commit_callbacks():
        image = submit_image(
            uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=4, size=160)), lesion=lesion
        )
        assert process_image(image_id=str(image.pk), worker_id="fuzz") == "done"
        batch, accepted, _ = submit_batch(
            uploader=clinician, clinic=clinic, uploads=[upload_file(lesion_jpeg(seed=5, size=96))], lesion=lesion
        )
        assert accepted
    gradcam = Explanation.objects.get(image=image, method="gradcam")
    assert render_explanation(explanation_id=str(gradcam.pk)) == "done"
    _, token = create_api_token(user=clinician, name="schemathesis")
    return {
        "token": token,
        "/api/v1/patients/{id}": str(patient.pk),
        "/api/v1/lesions/{id}": str(lesion.pk),
        "/api/v1/images/{id}": str(LesionImage.objects.get(pk=image.pk).pk),
        "/api/v1/explanations/{id}": str(gradcam.pk),
        "/api/v1/batches/{id}": str(batch.pk),
    }


def real_id_for(path: str, owned: dict) -> str | None:
    return next((value for prefix, value in owned.items() if path.startswith(prefix)), None)


@contextlib.contextmanager
def rolled_back():
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


def check_failures(group: BaseExceptionGroup) -> list[str]:
    """schemathesis' report of each failing example (one FailureGroup each, possibly several in the
    group hypothesis raises for distinct bugs). Anything else is an error of the test: re-raised."""
    if isinstance(group, FailureGroup):
        return [str(group).strip()]
    reports = []
    for exc in group.exceptions:
        if not isinstance(exc, BaseExceptionGroup):
            raise group
        reports.extend(check_failures(exc))
    return reports


def fuzzer(strategy, auth: dict, statuses: collections.Counter):
    @FUZZ_SETTINGS
    @given(case=strategy)
    def fuzz(case):
        with rolled_back():
            response = case.call(headers=auth)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS, headers=auth)

    return fuzz


def test_api_conforms_to_its_schema_under_fuzzing(db, in_process_wsgi, owned_objects):
    started = time.monotonic()
    schema = schemathesis.openapi.from_wsgi("/api/schema/", in_process_wsgi)
    auth = {"Authorization": f"Token {owned_objects['token']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 18, [op.label for op in operations]

    problems: list[str] = []
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for operation in operations:
        real_id = real_id_for(operation.path, owned_objects)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)
            if real_id is not None:  # ids random or the clinic's real object's
                real = operation.as_strategy(generation_mode=mode, path_parameters={"id": real_id})
                strategy = st.one_of(strategy, real)

            try:
                fuzzer(strategy, auth, statuses[operation.label])()
            except BaseExceptionGroup as group:
                for report in check_failures(group):
                    if len(report) > REPORT_LIMIT:
                        report = report[:REPORT_LIMIT] + " [...]"
                    problems.append(f"### {operation.label} ({mode.value} data)\n{report}")

    summary = "\n".join(f"{label}: {dict(sorted(counts.items()))}" for label, counts in statuses.items())
    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {len(operations)} operations in {elapsed:.1f} s; status codes seen:\n{summary}")

    # The run reached the clinic's objects: authenticated, and the real ids answered 200.
    for operation in operations:
        seen = statuses[operation.label]
        if not set(seen) - {401, 403}:
            problems.append(f"### {operation.label}: never past authentication: {dict(seen)}")
        elif operation.method.upper() == "GET" and real_id_for(operation.path, owned_objects) and not seen[200]:
            problems.append(f"### {operation.label}: never answered 200 for the real id: {dict(seen)}")
    assert not problems, f"schemathesis found {len(problems)} problem(s):\n\n" + "\n\n".join(problems)
