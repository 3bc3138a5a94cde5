"""The access-control matrix: every URL pattern of the project x four users x its methods.

The patterns are listed from the URL conf itself (Django admin's own model pages, namespace
`admin`, excepted), and `test_every_url_pattern_has_an_expectation` fails when a pattern exists that
TABLE does not describe, so a new URL cannot be added without saying who may use it.

Users: anonymous; a clinician of clinic A (owner of every object below); a clinician of clinic B;
a staff user without a clinic or any permission; a view-only staff user (every view permission of the
app, no other); an operator (staff who may view and change drift reports and model versions). API
patterns are called with `Authorization: Token ...` (the staff users have tokens too), the rest with a
session (`force_login`).

Clinic A's objects (built once for the module, inside a transaction rolled back at its end; each
test runs in its own savepoint, so POSTs leave nothing behind and no on-commit task is published):
a patient, a lesion, an image processed by the real model with its prediction and a rendered
Grad-CAM explanation (overlay, heatmap, attribution files), an API token of clinician A, and a drift
report with an Evidently HTML file.
"""

from __future__ import annotations

import contextlib
import html
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission
from django.core.exceptions import PermissionDenied
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve, reverse
from django.utils import timezone
from rest_framework.test import APIClient

from diagnosis.models import ApiToken, DriftReport, Explanation, ImageState, Lesion, LesionImage, Patient
from diagnosis.services.explanation_files import render_explanation
from diagnosis.services.images import submit_batch, submit_image
from diagnosis.services.predictions import process_image
from diagnosis.services.registry import register_model
from diagnosis.services.tokens import create_api_token
from tests.conftest import lesion_jpeg, upload_file
from tests.factories import ClinicFactory, ClinicianFactory, LesionFactory, PatientFactory, UserFactory, grant

PASSWORD = "correct-horse-battery"  # tests.factories.UserFactory's password
NEW_PASSWORD = "a-much-longer-Passw0rd-for-tests"
PATIENT_REFERENCE = "PT-MATRIX-A-7731"  # unique text: it must never show up in clinic B's pages
LESION_NOTE = "matrix-lesion-note-c41b"
NO_CLINIC_TEXT = "not attached to a clinic"
USERS = ("anon", "a", "b", "staff", "viewer", "operator")
STAFF_USERS = ("staff", "viewer", "operator")

# Expectations that are more than a status code.
LOGIN = "302 to the portal login"
ADMIN_LOGIN = "302 to the admin login"
NO_CLINIC = "403 'not attached to a clinic' page"
API_NO_CLINIC = "403 IsClinician"


@dataclass(frozen=True)
class Redirect:
    """302 to exactly this place."""

    to: str


API, PORTAL, ACCOUNT, ADMIN, PUBLIC = "api", "portal", "account", "admin", "public"
FORMAT_SUFFIX = ".<format>"

# Every test runs in its own savepoint inside the module's transaction (see `world`); the mark also
# makes pytest-django set the test database up when only the pattern-listing test is selected.
pytestmark = pytest.mark.django_db


# --- the objects of clinic A ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_upload_folder(world):
    """Overrides the conftest fixture of the same name, which empties MEDIA_ROOT/images before each
    test: the module's image lives there for the whole module. Only the files uploads of earlier
    tests left behind (their rows were rolled back) are removed."""
    folder = Path(settings.MEDIA_ROOT) / "images"
    keep = {Path(settings.MEDIA_ROOT) / image.file.name for image in (world.image, world.batch_image)}
    for path in folder.glob("*") if folder.exists() else []:
        if path not in keep:
            path.unlink()


def build_world(tiny_checkpoint: bytes) -> SimpleNamespace:
    clinic_a, clinic_b = ClinicFactory(name="Matrix clinic A"), ClinicFactory(name="Matrix clinic B")
    a = ClinicianFactory(membership__clinic=clinic_a)
    b = ClinicianFactory(membership__clinic=clinic_b)
    staff = UserFactory(is_staff=True, username=f"matrix-staff-{uuid.uuid4().hex[:8]}")
    viewer = grant(
        UserFactory(is_staff=True, username=f"matrix-viewer-{uuid.uuid4().hex[:8]}"),
        *Permission.objects.filter(content_type__app_label="diagnosis", codename__startswith="view_").values_list(
            "codename", flat=True
        ),
    )
    operator = grant(
        UserFactory(is_staff=True, username=f"matrix-operator-{uuid.uuid4().hex[:8]}"),
        "view_driftreport", "change_driftreport", "view_modelversion", "change_modelversion",
    )  # fmt: skip
    model = register_model(checkpoint=tiny_checkpoint, version=f"matrix-{uuid.uuid4().hex[:8]}", activate=True)
    patient = PatientFactory(clinic=clinic_a, reference=PATIENT_REFERENCE, created_by=a)
    lesion = LesionFactory(patient=patient, note=LESION_NOTE, created_by=a)
    image = submit_image(
        uploader=a, clinic=clinic_a, upload=upload_file(lesion_jpeg(seed=4, size=160)), lesion=lesion, via="api"
    )
    assert process_image(image_id=str(image.pk), worker_id="matrix") == "done"
    gradcam = Explanation.objects.get(image=image, method="gradcam")
    assert render_explanation(explanation_id=str(gradcam.pk)) == "done"
    gradcam.refresh_from_db()
    assert gradcam.overlay and gradcam.heatmap and gradcam.attribution
    image = LesionImage.objects.get(pk=image.pk)
    assert image.state == ImageState.DONE and image.predictions.exists()
    batch, accepted, rejected = submit_batch(
        uploader=a, clinic=clinic_a, lesion=lesion, via="api",
        uploads=[upload_file(lesion_jpeg(seed=5, size=96)), upload_file(b"not an image", name="notes.txt")],
    )  # fmt: skip
    assert len(accepted) == 1 and len(rejected) == 1
    token_a, plain_a = create_api_token(user=a, name="matrix A")
    _, plain_b = create_api_token(user=b, name="matrix B")
    _, plain_staff = create_api_token(user=staff, name="matrix staff")
    _, plain_viewer = create_api_token(user=viewer, name="matrix viewer")
    _, plain_operator = create_api_token(user=operator, name="matrix operator")
    now = timezone.now()
    report = DriftReport.objects.create(
        model_version=model, window_start=now - timedelta(days=7), window_end=now,
        window_description="last 7 days", status=DriftReport.Status.INSUFFICIENT, alpha=0.05,
        message="Too few uploads (matrix test).", triggered_by="matrix",
    )  # fmt: skip
    report.html = default_storage.save(
        f"monitoring/matrix-{uuid.uuid4().hex}/report.html",
        ContentFile(b"<!doctype html><title>Evidently</title><p>matrix report</p>"),
    )
    report.save(update_fields=["html"])
    return SimpleNamespace(
        clinic_a=clinic_a, clinic_b=clinic_b, a=a, b=b, staff=staff, viewer=viewer, operator=operator, model=model,
        patient=patient, lesion=lesion,
        image=image, gradcam=gradcam, batch=batch, batch_image=accepted[0][1], token_a=token_a,
        tokens={"a": plain_a, "b": plain_b, "staff": plain_staff, "viewer": plain_viewer, "operator": plain_operator},
        report=report,
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(django_db_setup, django_db_blocker, tiny_checkpoint):
    """Clinic A's objects, for every test of the module, in a transaction rolled back at its end."""
    files = []
    with django_db_blocker.unblock():
        atomic = transaction.atomic()
        atomic.__enter__()
        atomic._from_testcase = True  # as django.test.TestCase marks its class-wide transaction
        try:
            data = build_world(tiny_checkpoint)
            files = [data.image.file.name, data.batch_image.file.name, data.report.html.name] + [
                getattr(data.gradcam, name).name for name in ("overlay", "heatmap", "attribution")
            ]
            yield data
        finally:
            transaction.set_rollback(True)
            atomic.__exit__(None, None, None)
            for name in files:
                default_storage.delete(name)


# --- the table -----------------------------------------------------------------------------------


SAME = object()  # the viewer and the operator: as the plain staff user, unless said otherwise


def expect(anon, a, b, staff, viewer=SAME, operator=SAME) -> dict[str, object]:
    return {"anon": anon, "a": a, "b": b, "staff": staff, "viewer": staff if viewer is SAME else viewer,
            "operator": staff if operator is SAME else operator}  # fmt: skip


# Shorthands for the usual rows. Clinic A's object: A sees it, B gets 404.
def portal_object(a=200, b=404):
    return expect(LOGIN, a, b, NO_CLINIC)


def api_object(a=200, b=404):
    return expect(401, a, b, API_NO_CLINIC)


def admin_only(staff=200, viewer=SAME, operator=SAME):
    return expect(ADMIN_LOGIN, ADMIN_LOGIN, ADMIN_LOGIN, staff, viewer, operator)


@dataclass(frozen=True)
class Entry:
    kind: str
    # The concrete URLs to call, as reverse() kwargs built from clinic A's objects (one dict per URL).
    kwargs: Callable[[SimpleNamespace], list[dict]]
    get: dict[str, object]
    post: dict[str, object] | None = None
    # The POST body (Django test client data; API bodies are JSON unless they hold a file).
    post_data: Callable[[SimpleNamespace], dict] | None = None
    # Query strings the GETs are also tried with (POSTs go to the bare URL).
    queries: tuple[str, ...] = ("",)


def none(w) -> list[dict]:
    return [{}]


def image_kw(w) -> list[dict]:
    return [{"pk": w.image.pk}]


def gradcam_kw(w) -> list[dict]:
    return [{"pk": w.gradcam.pk}]


def jpeg_upload(field: str, **extra):
    return lambda w: {field: upload_file(lesion_jpeg(seed=9, size=96)), **{k: v(w) for k, v in extra.items()}}


# fmt: off
BASE_TABLE: dict[str, Entry] = {
    # --- site-wide ---
    "favicon.ico": Entry(PUBLIC, none, get=expect(204, 204, 204, 204)),
    "healthz": Entry(PUBLIC, none, get=expect(200, 200, 200, 200)),
    "readyz": Entry(PUBLIC, none, get=expect(200, 200, 200, 200)),
    # No METRICS_TOKEN in tests: served to local clients only (the test client is 127.0.0.1).
    "metrics": Entry(PUBLIC, none, get=expect(200, 200, 200, 200)),
    "login": Entry(
        ACCOUNT, none, get=expect(200, 302, 302, 302),
        post=expect(302, 302, 302, 302), post_data=lambda w: {"username": w.a.username, "password": PASSWORD},
    ),
    "logout": Entry(ACCOUNT, none, get=expect(405, 405, 405, 405), post=expect(*[Redirect("/accounts/login/")] * 4)),
    "password_change": Entry(
        ACCOUNT, none, get=expect(LOGIN, 200, 200, 200),
        post=expect(LOGIN, 302, 302, 302),
        post_data=lambda w: {"old_password": PASSWORD, "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
    ),
    "password_change_done": Entry(ACCOUNT, none, get=expect(LOGIN, 200, 200, 200)),
    "schema": Entry(PUBLIC, none, get=expect(200, 200, 200, 200)),
    "api-docs": Entry(PUBLIC, none, get=expect(200, 200, 200, 200)),
    # --- the project's admin views (staff only) ---
    # Seeing the drift dashboard needs the view permission on drift reports; "run now" the change one.
    "drift-dashboard": Entry(ADMIN, none, get=admin_only(403, viewer=200, operator=200)),
    "drift-run": Entry(ADMIN, none, get=admin_only(405), post=admin_only(403, viewer=403, operator=302)),
    "drift-evidently": Entry(ADMIN, lambda w: [{"pk": w.report.pk}], get=admin_only(403, viewer=200, operator=200)),
    # --- portal (session) ---
    "portal:index": Entry(PORTAL, none, get=expect(LOGIN, 302, 302, 302)),
    "portal:patients": Entry(
        PORTAL, none, get=portal_object(200, 200), post=portal_object(302, 302),
        post_data=lambda w: {"reference": "PT-MATRIX-NEW"}, queries=("", "?q=PT-MATRIX"),
    ),
    "portal:patient": Entry(
        PORTAL, lambda w: [{"pk": w.patient.pk}], get=portal_object(), post=portal_object(302),
        post_data=lambda w: {"body_site": "back", "note": "added by the matrix"},
    ),
    "portal:lesion": Entry(
        PORTAL, lambda w: [{"pk": w.lesion.pk}], get=portal_object(), queries=("", "?partial=timeline")
    ),
    "portal:lesion-upload": Entry(
        PORTAL, lambda w: [{"pk": w.lesion.pk}], get=portal_object(405, 405), post=portal_object(302),
        post_data=jpeg_upload("images"),
    ),
    "portal:lesion-report": Entry(PORTAL, lambda w: [{"pk": w.lesion.pk}], get=portal_object()),
    "portal:image": Entry(PORTAL, image_kw, get=portal_object()),
    "portal:image-status": Entry(PORTAL, image_kw, get=portal_object()),
    "portal:image-photo": Entry(
        PORTAL, image_kw, get=portal_object(), queries=("", "?size=thumb", "?size=display", "?size=original")
    ),
    "portal:image-explanations": Entry(
        PORTAL, image_kw, get=portal_object(405, 405), post=portal_object(302),
        post_data=lambda w: {"method": "occlusion"},
    ),
    "portal:image-feedback": Entry(
        PORTAL, image_kw, get=portal_object(405, 405), post=portal_object(302),
        post_data=lambda w: {"kind": "histopathology", "diagnosis": "melanoma", "note": "matrix"},
    ),
    "portal:image-photo-fine": Entry(
        PORTAL, image_kw, get=portal_object(405, 405), post=portal_object(302), post_data=lambda w: {"note": "matrix"}
    ),
    "portal:explanation-file": Entry(
        PORTAL, lambda w: [{"pk": w.gradcam.pk, "kind": "overlay"}, {"pk": w.gradcam.pk, "kind": "heatmap"}],
        get=portal_object(),
    ),
    "portal:history": Entry(PORTAL, none, get=portal_object(200, 200), queries=("", "?state=done")),
    "portal:tokens": Entry(
        PORTAL, none, get=portal_object(200, 200), post=portal_object(200, 200),
        post_data=lambda w: {"name": "matrix token", "expires_in_days": "30", "password": PASSWORD},
    ),
    "portal:token-revoke": Entry(
        PORTAL, lambda w: [{"key": w.token_a.token_key}], get=portal_object(405, 405), post=portal_object(302)
    ),
    # --- API (token) ---
    "api:patient-list": Entry(
        API, none, get=api_object(200, 200), post=api_object(201, 201),
        post_data=lambda w: {"reference": "PT-MATRIX-API"},
    ),
    "api:patient-detail": Entry(API, lambda w: [{"pk": w.patient.pk}], get=api_object()),
    "api:lesion-list": Entry(
        # B names clinic A's patient: refused as an unknown patient (400), nothing created.
        API, none, get=api_object(200, 200), post=api_object(201, 400),
        post_data=lambda w: {"patient": str(w.patient.pk), "body_site": "back"},
    ),
    "api:lesion-detail": Entry(API, lambda w: [{"pk": w.lesion.pk}], get=api_object()),
    "api:image-list": Entry(
        # B names clinic A's lesion: refused as an unknown lesion (400), nothing stored.
        API, none, get=api_object(200, 200), post=api_object(202, 400),
        post_data=jpeg_upload("image", lesion=lambda w: str(w.lesion.pk)),
    ),
    "api:image-batch": Entry(
        # B names clinic A's lesion: refused as an unknown lesion (400), nothing stored.
        API, none, get=api_object(405, 405), post=api_object(202, 400),
        post_data=jpeg_upload("images", lesion=lambda w: str(w.lesion.pk)),
    ),
    "api:batch-detail": Entry(API, lambda w: [{"pk": w.batch.pk}], get=api_object()),
    "api:image-detail": Entry(API, image_kw, get=api_object()),
    "api:image-explanations": Entry(
        API, image_kw, get=api_object(), post=api_object(202), post_data=lambda w: {"method": "occlusion"}
    ),
    "api:image-feedback": Entry(
        API, image_kw, get=api_object(), post=api_object(201),
        post_data=lambda w: {"kind": "histopathology", "diagnosis": "melanoma"},
    ),
    "api:image-file": Entry(API, image_kw, get=api_object()),
    "api:image-status": Entry(API, image_kw, get=api_object()),
    "api:image-events": Entry(API, image_kw, get=api_object()),
    "api:explanation-detail": Entry(API, gradcam_kw, get=api_object()),
    "api:explanation-overlay": Entry(API, gradcam_kw, get=api_object()),
    "api:explanation-heatmap": Entry(API, gradcam_kw, get=api_object()),
    "api:explanation-attribution": Entry(API, gradcam_kw, get=api_object()),
}
# fmt: on


# No ".json" format-suffix twins: the API router serves JSON only (a suffix route would fail completeness).
TABLE: dict[str, Entry] = dict(BASE_TABLE)


# --- the URL conf --------------------------------------------------------------------------------


def walk(patterns, namespaces=(), prefix="") -> Iterator[tuple[tuple[str, ...], URLPattern, str]]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            spaces = (*namespaces, pattern.namespace) if pattern.namespace else namespaces
            yield from walk(pattern.url_patterns, spaces, prefix + str(pattern.pattern))
        else:
            yield namespaces, pattern, prefix + str(pattern.pattern)


def pattern_key(namespaces: tuple[str, ...], name: str | None, route: str, has_format: bool) -> str:
    key = ":".join((*namespaces, name)) if name else route
    return key + FORMAT_SUFFIX if has_format else key


def project_patterns() -> list[tuple[str, str]]:
    """(key, route) of every URL pattern, Django admin's own pages (namespace `admin`) excepted."""
    return [
        (pattern_key(spaces, pattern.name, route, "format" in pattern.pattern.regex.groupindex), route)
        for spaces, pattern, route in walk(get_resolver().url_patterns)
        if not spaces or spaces[0] != "admin"
    ]


def test_every_url_pattern_has_an_expectation():
    patterns = project_patterns()
    keys = [key for key, _ in patterns]
    duplicated = [key for key, count in Counter(keys).items() if count > 1]
    assert not duplicated, f"patterns the matrix cannot tell apart (give them distinct names): {duplicated}"
    missing = {key: route for key, route in patterns if key not in TABLE}
    assert not missing, f"URL patterns without an access expectation in TABLE: {missing}"
    stale = set(TABLE) - set(keys)
    assert not stale, f"TABLE entries for URL patterns that no longer exist: {sorted(stale)}"
    # The custom admin views are covered, not hidden behind the admin namespace.
    assert {"drift-dashboard", "drift-run", "drift-evidently", "login", "logout", "password_change"} <= set(keys)


# --- the cells -----------------------------------------------------------------------------------


def client_for(world, user: str, kind: str, *, enforce_csrf: bool = False):
    """A client as `user`; a view's exception comes back as the 500 a browser would get."""
    if kind == API:
        client = APIClient(raise_request_exception=False)
        if user != "anon":
            client.credentials(HTTP_AUTHORIZATION=f"Token {world.tokens[user]}")
        return client
    client = Client(enforce_csrf_checks=enforce_csrf, raise_request_exception=False)
    if user != "anon":
        client.force_login(getattr(world, user))
    return client


def urls_of(world, key: str, entry: Entry, method: str = "GET") -> list[str]:
    name = key.removesuffix(FORMAT_SUFFIX)
    if name == "favicon.ico":
        return ["/favicon.ico"]
    queries = entry.queries if method == "GET" else ("",)
    return [reverse(name, kwargs=kwargs) + query for kwargs in entry.kwargs(world) for query in queries]


def send(client, kind: str, method: str, url: str, data: dict | None):
    if method == "GET":
        return client.get(url)
    if kind == API:
        has_file = any(hasattr(value, "read") for value in (data or {}).values())
        return client.post(url, data or {}, format="multipart" if has_file else "json")
    return client.post(url, data or {})


def drain(response) -> bytes:
    """The body. A streamed one is read to its end, which is where the test client closes the file
    (calling response.close() again would fire request_finished and close the test's connection)."""
    return b"".join(response.streaming_content) if response.streaming else response.content


def body_text(response) -> str:
    if getattr(response, "streaming", False):
        return ""
    return html.unescape(response.content.decode(errors="replace"))


def check(response, expected, *, kind: str, url: str) -> str | None:
    """None if the response is what the table expects, else what differs."""
    status, location = response.status_code, response.get("Location", "")
    got = f"{status}" + (f" -> {location}" if location else "")
    if expected == LOGIN:
        ok = status == 302 and location.startswith(reverse("login") + "?next=")
    elif expected == ADMIN_LOGIN:
        ok = status == 302 and location.startswith(reverse("admin:login") + "?next=")
    elif expected == NO_CLINIC:
        ok = status == 403 and NO_CLINIC_TEXT in body_text(response)
    elif isinstance(expected, Redirect):
        ok = status == 302 and location == expected.to
    elif expected == API_NO_CLINIC:
        ok = status == 403 and NO_CLINIC_TEXT in response.json()["detail"]
    else:
        ok = status == expected
        if ok and status == 302:  # a real redirect, not a login wall in disguise
            ok = not location.startswith((reverse("login"), reverse("admin:login")))
        if ok and status == 401:
            ok = response.json()["code"] == "not_authenticated"
        if ok and status == 404 and kind == API:
            ok = response.json()["code"] == "not_found"
    return None if ok else f"{url}: expected {expected}, got {got} {body_text(response)[:300]!r}"


def withdraw_drift_runs(triggered_by: str) -> None:
    """The admin's "run now" really publishes a drift report task (not on commit): take this test's
    message back off the broker's queue, so no worker later computes a report for it."""
    from kombu.exceptions import OperationalError

    from webapp.celery import app

    if not triggered_by:
        return
    with contextlib.suppress(OSError, OperationalError), app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        client = connection.default_channel.client  # the Redis transport's client
        queue = settings.CELERY_TASK_DEFAULT_QUEUE
        for raw in client.lrange(queue, 0, -1):
            headers = json.loads(raw).get("headers") or {}
            if headers.get("task") == "diagnosis.tasks.drift_report_task" and repr(triggered_by) in str(
                headers.get("kwargsrepr")
            ):
                client.lrem(queue, 1, raw)


CELLS = [
    pytest.param(key, method, user, id=f"{key}|{method}|{user}")
    for key, entry in TABLE.items()
    for method, expectations in (("GET", entry.get), ("POST", entry.post))
    if expectations is not None
    for user in USERS
]


@pytest.mark.parametrize(("key", "method", "user"), CELLS)
def test_access(world, key, method, user, django_capture_on_commit_callbacks):
    entry = TABLE[key]
    expected = (entry.get if method == "GET" else entry.post)[user]
    client = client_for(world, user, entry.kind)
    problems = []
    for url in urls_of(world, key, entry, method):
        match = resolve(url.split("?")[0])
        resolved = pattern_key(tuple(match.namespaces), match.url_name, match.route, "format" in match.kwargs)
        assert resolved == key, f"{url} resolves to {resolved}, not to {key}"
        data = entry.post_data(world) if (method == "POST" and entry.post_data) else None
        # Uploads and explanation requests publish their task on commit: captured here, never run.
        with django_capture_on_commit_callbacks():
            response = send(client, entry.kind, method, url, data)
        problems.append(check(response, expected, kind=entry.kind, url=url))
        if key == "drift-run" and method == "POST":
            withdraw_drift_runs(triggered_by=getattr(world, user).get_username() if user != "anon" else "")
        if user in ("b", *STAFF_USERS):  # whatever they get, it never shows clinic A's data
            text = body_text(response)
            assert PATIENT_REFERENCE not in text and LESION_NOTE not in text, url
            assert str(world.image.pk) not in text and str(world.batch.pk) not in text, url
        drain(response)
    problems = [problem for problem in problems if problem]
    assert not problems, "\n".join(problems)


# --- lists: clinic B never sees clinic A's objects -----------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "of_a"),
    [
        ("/api/v1/patients/", "id", lambda w: str(w.patient.pk)),
        (f"/api/v1/patients/?reference={PATIENT_REFERENCE}", "id", lambda w: str(w.patient.pk)),
        ("/api/v1/lesions/", "id", lambda w: str(w.lesion.pk)),
        ("/api/v1/lesions/?patient={patient}", "id", lambda w: str(w.lesion.pk)),
        ("/api/v1/images/", "id", lambda w: str(w.image.pk)),
        ("/api/v1/images/?lesion={lesion}", "id", lambda w: str(w.image.pk)),
        ("/api/v1/images/?state=done", "id", lambda w: str(w.image.pk)),
    ],
)
def test_api_lists_show_only_the_own_clinic(world, path, field, of_a):
    path = path.format(patient=world.patient.pk, lesion=world.lesion.pk)
    seen = {}
    for user in ("a", "b"):
        response = client_for(world, user, API).get(path)
        assert response.status_code == 200, (user, response.content)
        seen[user] = [item[field] for item in response.json()["results"]]
    assert of_a(world) in seen["a"]
    assert seen["b"] == []


@pytest.mark.parametrize(
    "path", ["/patients/", f"/patients/?q={PATIENT_REFERENCE}", "/history/", "/history/?state=done"]
)
def test_portal_lists_show_only_the_own_clinic(world, path):
    pages = {}
    for user in ("a", "b"):
        response = client_for(world, user, PORTAL).get(path)
        assert response.status_code == 200, user
        pages[user] = body_text(response)
    # Links to A's patient or image (the search box echoes B's own search text, so not the reference).
    marker = f"/patients/{world.patient.pk}/" if path.startswith("/patients/") else f"/images/{world.image.pk}/"
    assert marker in pages["a"]
    assert marker not in pages["b"] and str(world.patient.pk) not in pages["b"]
    assert str(world.image.pk) not in pages["b"] and LESION_NOTE not in pages["b"]


def test_a_portal_session_does_not_authenticate_the_api(world):
    client = client_for(world, "a", PORTAL)
    for path in ("/api/v1/patients/", f"/api/v1/images/{world.image.pk}/file/"):
        response = client.get(path)
        assert response.status_code == 401, path


# --- CSRF ----------------------------------------------------------------------------------------


def csrf_cells():
    """Every form POST outside the API, by a user for whom the POST otherwise succeeds."""
    for key, entry in TABLE.items():
        if entry.post is None or entry.kind == API:
            continue
        user = next(
            u for u in ("a", "operator", "staff", "anon")
            if isinstance(entry.post[u], Redirect) or (isinstance(entry.post[u], int) and entry.post[u] < 400)
        )  # fmt: skip
        yield pytest.param(key, user, id=f"{key}|{user}")


@pytest.mark.parametrize(("key", "user"), list(csrf_cells()))
def test_form_posts_without_a_csrf_token_are_refused(world, key, user):
    entry = TABLE[key]
    client = client_for(world, user, entry.kind, enforce_csrf=True)
    patients_before, lesions_before = Patient.objects.count(), Lesion.objects.count()
    for url in urls_of(world, key, entry, "POST"):
        data = entry.post_data(world) if entry.post_data else {}
        response = client.post(url, data)
        assert response.status_code == 403, (url, response.status_code)
        assert "CSRF" in body_text(response), url
    assert (Patient.objects.count(), Lesion.objects.count()) == (patients_before, lesions_before)
    assert ApiToken.objects.filter(pk=world.token_a.pk).exists()


def test_the_same_form_post_with_its_csrf_token_is_accepted(world):
    """The control for the test above: the refusals are about the token, not the form."""
    client = client_for(world, "a", PORTAL, enforce_csrf=True)
    assert client.get("/tokens/").status_code == 200
    token = client.cookies[settings.CSRF_COOKIE_NAME].value
    response = client.post(
        "/tokens/", {"name": "with csrf", "expires_in_days": "30", "password": PASSWORD, "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 200


# --- downloads -----------------------------------------------------------------------------------

DOWNLOADS = [
    # (user, kind, url builder, content type, attachment?)
    ("a", PORTAL, lambda w: f"/images/{w.image.pk}/photo/", "image/jpeg", False),
    ("a", PORTAL, lambda w: f"/images/{w.image.pk}/photo/?size=thumb", "image/jpeg", False),
    ("a", PORTAL, lambda w: f"/images/{w.image.pk}/photo/?size=original", "image/jpeg", True),
    ("a", PORTAL, lambda w: f"/explanations/{w.gradcam.pk}/overlay/", "image/jpeg", False),
    ("a", PORTAL, lambda w: f"/explanations/{w.gradcam.pk}/heatmap/", "image/png", False),
    ("a", API, lambda w: f"/api/v1/images/{w.image.pk}/file/", "image/jpeg", True),
    ("a", API, lambda w: f"/api/v1/explanations/{w.gradcam.pk}/overlay/", "image/jpeg", False),
    ("a", API, lambda w: f"/api/v1/explanations/{w.gradcam.pk}/heatmap/", "image/png", False),
    ("a", API, lambda w: f"/api/v1/explanations/{w.gradcam.pk}/attribution/", "application/octet-stream", True),
    ("viewer", ADMIN, lambda w: f"/admin/monitoring/drift/{w.report.pk}/evidently/", "text/html", False),
]


@pytest.mark.parametrize(("user", "kind", "url", "content_type", "attachment"), DOWNLOADS)
def test_file_downloads_are_private_and_typed(world, user, kind, url, content_type, attachment):
    url = url(world)
    response = client_for(world, user, kind).get(url)
    assert response.status_code == 200, url
    assert response["Content-Type"].startswith(content_type)
    assert response["X-Content-Type-Options"] == "nosniff"
    assert "no-store" in response["Cache-Control"] and "private" in response["Cache-Control"]
    disposition = response.get("Content-Disposition", "")
    if attachment:
        assert disposition.startswith("attachment;") and "filename=" in disposition, disposition
    else:
        assert not disposition.startswith("attachment"), disposition
    assert drain(response)


@pytest.mark.parametrize(
    "url",
    [
        lambda w: f"/patients/{w.patient.pk}/",
        lambda w: f"/lesions/{w.lesion.pk}/",
        lambda w: f"/lesions/{w.lesion.pk}/report/",
        lambda w: f"/images/{w.image.pk}/",
        lambda w: f"/images/{w.image.pk}/status/",
        lambda w: "/history/",
    ],
)
def test_portal_pages_with_patient_data_are_not_cached(world, url):
    response = client_for(world, "a", PORTAL).get(url(world))
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"] and "private" in response["Cache-Control"]
    if response["Content-Type"].startswith("application/json"):
        json.loads(response.content)


# --- the admin's model actions ---------------------------------------------------------------------


@pytest.fixture
def second_model(world, tiny_checkpoint):
    from diagnosis.models import ModelVersion

    other = register_model(checkpoint=tiny_checkpoint, version=f"matrix-other-{uuid.uuid4().hex[:8]}")
    yield other
    weights = ModelVersion.objects.filter(pk=other.pk).values_list("weights", flat=True).first()
    if weights:
        default_storage.delete(weights)


@pytest.mark.parametrize("action", ["activate", "activate_forced", "roll_back"])
def test_a_view_only_staff_user_cannot_change_the_active_model(world, second_model, action):
    from diagnosis.models import ModelVersion
    from diagnosis.services.registry import activate_model, rollback_model

    changelist = reverse("admin:diagnosis_modelversion_changelist")
    client = client_for(world, "viewer", ADMIN)
    page = client.get(changelist)
    assert page.status_code == 200 and world.model.version in body_text(page)
    assert f'value="{action}"' not in body_text(page)  # not offered
    response = client.post(changelist, {"action": action, "_selected_action": [second_model.pk]}, follow=True)
    assert response.status_code == 200
    assert ModelVersion.objects.get(is_active=True) == world.model
    with pytest.raises(PermissionDenied):  # nor through the service the action calls
        activate_model(model_version=second_model, actor=world.viewer, via="admin", force=True)
    with pytest.raises(PermissionDenied):
        rollback_model(to=second_model, actor=world.viewer, via="admin")
    assert ModelVersion.objects.get(is_active=True) == world.model


def test_an_operator_may_change_the_active_model(world, second_model):
    from diagnosis.models import ModelVersion

    changelist = reverse("admin:diagnosis_modelversion_changelist")
    client = client_for(world, "operator", ADMIN)
    assert 'value="activate_forced"' in body_text(client.get(changelist))
    client.post(changelist, {"action": "activate_forced", "_selected_action": [second_model.pk]})
    assert ModelVersion.objects.get(is_active=True) == second_model


# --- records never cross clinics through the admin ----------------------------------------------------


def test_the_admin_cannot_move_a_patient_or_lesion_to_another_clinic(world, django_user_model):
    root = django_user_model.objects.create_superuser(f"root-{uuid.uuid4().hex[:6]}", "root@example.org", "x")
    client = Client(raise_request_exception=False)
    client.force_login(root)
    patient_page = reverse("admin:diagnosis_patient_change", args=[world.patient.pk])
    form = client.get(patient_page)
    assert form.status_code == 200 and 'name="clinic"' not in body_text(form)
    client.post(patient_page, {"reference": PATIENT_REFERENCE, "clinic": world.clinic_b.pk})
    lesion_page = reverse("admin:diagnosis_lesion_change", args=[world.lesion.pk])
    assert 'name="patient"' not in body_text(client.get(lesion_page))
    other = PatientFactory(clinic=world.clinic_b)
    client.post(lesion_page, {"patient": other.pk, "body_site": world.lesion.body_site, "note": LESION_NOTE})
    world.patient.refresh_from_db()
    world.lesion.refresh_from_db()
    assert world.patient.clinic == world.clinic_a and world.lesion.patient == world.patient


def test_a_lesion_moved_anyway_shows_no_photo_of_the_other_clinic(world):
    """Had a lesion been moved by hand (the database, an older release's admin), clinic B's pages must
    still show none of clinic A's photos, predictions, notes or explanations."""
    other = PatientFactory(clinic=world.clinic_b, reference="PT-MATRIX-B-MOVED")
    Lesion.objects.filter(pk=world.lesion.pk).update(patient=other)
    client = client_for(world, "b", PORTAL)
    for url in (f"/lesions/{world.lesion.pk}/", f"/patients/{other.pk}/", f"/lesions/{world.lesion.pk}/report/"):
        response = client.get(url)
        assert response.status_code == 200, url
        text = body_text(response)
        assert str(world.image.pk) not in text and str(world.gradcam.pk) not in text, url
    listed = client_for(world, "b", API).get(f"/api/v1/lesions/{world.lesion.pk}/").json()
    assert listed["image_count"] == 0
