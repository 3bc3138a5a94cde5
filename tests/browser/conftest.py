"""Real-browser fixtures: Debian's Chromium driven by Playwright's sync API against pytest-django's
live server (which also serves the static files), on the real PostgreSQL test database.

Playwright's sync API keeps an asyncio loop running in the main thread while it is started, and
Django refuses ORM calls from a thread with a running loop (SynchronousOnlyOperation). The browser
fixture therefore allows them for as long as Playwright runs: the tests, the database fixtures and
the live server's own threads are all plain synchronous code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
PASSWORD = "Lesion-triage-42!"


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@dataclass
class Tab:
    """A page in its own browser context, with the JavaScript errors it has seen."""

    page: object
    errors: list[str]

    def assert_no_js_errors(self) -> None:
        assert self.errors == [], f"JavaScript errors in the browser: {self.errors}"


@pytest.fixture
def new_tab(browser, live_server):
    """Opens a page in a fresh context (own cookies) on the live server; closed after the test."""
    contexts = []

    def open_tab(*, width: int = 1280, height: int = 900) -> Tab:
        context = browser.new_context(base_url=live_server.url, viewport={"width": width, "height": height})
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []

        def on_console(message) -> None:
            if message.type == "error":
                errors.append(f"console: {message.text} ({message.location.get('url', '')})")

        page.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
        page.on("console", on_console)
        return Tab(page=page, errors=errors)

    yield open_tab
    for context in contexts:
        context.close()


@pytest.fixture
def screenshot_dir():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@dataclass
class Account:
    user: object
    username: str
    password: str
    clinic: object


@pytest.fixture
def make_clinician(transactional_db):
    """make_clinician(clinic_name, username): a clinician with the known PASSWORD, member of that clinic."""
    from diagnosis.services.clinics import create_clinician
    from tests.factories import ClinicFactory

    def make(clinic_name: str, username: str) -> Account:
        clinic = ClinicFactory(name=clinic_name)
        user = create_clinician(clinic=clinic, username=username, password=PASSWORD)
        return Account(user=user, username=username, password=PASSWORD, clinic=clinic)

    return make


@pytest.fixture
def clinician_account(make_clinician) -> Account:
    return make_clinician("Northside Dermatology", "dr.north")


@pytest.fixture
def scored_lesion(clinician_account, active_model, celery_worker, explain_worker):
    """A patient of the clinician's clinic with one lesion and one photo scored by the real worker,
    its explanations finished (so no task is left running when the database is flushed)."""
    from diagnosis.models import Explanation, ImageState, LesionImage
    from diagnosis.services import images as image_services
    from diagnosis.services import patients as patient_services
    from tests.conftest import lesion_jpeg, upload_file, wait_for

    clinic, user = clinician_account.clinic, clinician_account.user
    patient = patient_services.create_patient(clinic=clinic, reference="PT-SECRET-0815", created_by=user)
    lesion = patient_services.create_lesion(patient=patient, body_site="back", note="Followed", created_by=user)
    image = image_services.submit_image(
        uploader=user, clinic=clinic, upload=upload_file(lesion_jpeg(seed=21, size=160)), lesion=lesion
    )
    wait_for(
        lambda: LesionImage.objects.filter(pk=image.pk, state__in=[ImageState.DONE, ImageState.FAILED]).exists(),
        90,
        message="the photo to be scored",
    )
    image.refresh_from_db()
    assert image.state == ImageState.DONE, (image.error, celery_worker.log()[-3000:])
    wait_for_explanations([image.pk])
    explanation = Explanation.objects.filter(image=image, state=Explanation.State.DONE).first()
    assert explanation is not None
    return {"patient": patient, "lesion": lesion, "image": image, "explanation": explanation}


def wait_for_explanations(image_ids, timeout: float = 180) -> None:
    """Wait until each image has its Grad-CAM and its automatic explanations, none queued or running."""
    from django.conf import settings

    from diagnosis.models import Explanation
    from tests.conftest import wait_for

    expected = len(image_ids) * (1 + len(settings.AUTO_EXPLAIN_METHODS))

    def settled():
        explanations = Explanation.objects.filter(image_id__in=image_ids)
        return (
            explanations.count() >= expected
            and not explanations.exclude(state__in=[Explanation.State.DONE, Explanation.State.FAILED]).exists()
        )

    wait_for(settled, timeout, interval=0.5, message="the explanations to finish")
