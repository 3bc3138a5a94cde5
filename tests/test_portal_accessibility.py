"""Every portal page, rendered as a signed-in clinician would see it and parsed with Python's own
html.parser: form controls have labels, pictures have text alternatives, pages fit small screens,
and nothing is loaded from another site (the portal must work offline, inside a hospital network)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest
from django.contrib.staticfiles import finders
from django.db import transaction
from django.urls import reverse

from diagnosis.models import ImageState
from diagnosis.services.tokens import create_api_token
from tests.factories import LesionFactory, PatientFactory, UserFactory
from tests.test_portal_views import PASSWORD, add_explanation, add_image

# Every test uses the database (through the pages rendered once for the module); the mark also makes
# pytest-django create the test database when this file runs alone.
pytestmark = pytest.mark.django_db

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
# A start tag of one of these closes an open <p> (HTML's parsing rules): a <ul> in a <p> ends the <p>.
CLOSES_P = {
    "address", "article", "aside", "blockquote", "details", "div", "dl", "fieldset", "figcaption", "figure",
    "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "menu", "nav", "ol", "p",
    "pre", "section", "table", "ul",
}  # fmt: skip
UNLABELLED_INPUTS = {"hidden", "submit", "button", "reset", "image"}
RESOURCES = {"script": "src", "link": "href", "img": "src", "iframe": "src", "source": "src", "audio": "src",
             "video": "src", "embed": "src"}  # fmt: skip


@dataclass
class Element:
    tag: str
    attrs: dict
    in_label: bool
    text: list[str] = field(default_factory=list)


class Page(HTMLParser):
    """What the checks need from one page: its elements in order, each with the text it holds as a
    browser parses it, whether it sits inside a <label>, and the ids that labels name."""

    def __init__(self, source: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.open: list[Element] = []
        self.label_for: list[str] = []
        self.label_depth = 0
        self.feed(source)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag in CLOSES_P and any(e.tag == "p" for e in self.open):
            self._close("p")
        element = Element(
            tag, {name: (value if value is not None else "") for name, value in attrs}, self.label_depth > 0
        )
        self.elements.append(element)
        if tag == "label":
            self.label_depth += 1
            if "for" in element.attrs:
                self.label_for.append(element.attrs["for"])
        if tag not in VOID:
            self.open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag == "label":
            self.label_depth = max(0, self.label_depth - 1)
        self._close(tag)

    def _close(self, tag):
        if any(e.tag == tag for e in self.open):
            while self.open and self.open.pop().tag != tag:
                pass

    def handle_data(self, data):
        for element in self.open:
            element.text.append(data)

    def find(self, *tags: str) -> list[Element]:
        return [e for e in self.elements if e.tag in tags]

    def ids(self) -> list[str]:
        return [e.attrs["id"] for e in self.elements if "id" in e.attrs]

    def by_id(self, element_id: str) -> list[Element]:
        return [e for e in self.elements if e.attrs.get("id") == element_id]


# --- the pages ---------------------------------------------------------------------------------------


PAGES = [
    "login",
    "patients",
    "patients-with-errors",
    "patient",
    "lesion",
    "image",
    "image-queued",
    "image-not-assessable",
    "image-uncertain",
    "image-with-errors",
    "report",
    "history",
    "history-with-errors",
    "tokens",
    "tokens-created",
    "password-change",
    "no-clinic",
    "not-found",
]


def render_all(checkpoint: bytes) -> dict[str, tuple[int, str]]:
    """Every page in PAGES as (status, HTML), for one clinic with a patient, a lesion followed over
    three photos (one scored with done explanations, one queued) and an API token."""
    from django.test import Client

    from diagnosis.services.registry import register_model
    from tests.factories import ClinicianFactory

    model = register_model(checkpoint=checkpoint, version="a11y-tiny", activate=True)
    clinician = ClinicianFactory()
    patient = PatientFactory(clinic=clinician.clinic_membership.clinic, reference="PT-0001")
    lesion = LesionFactory(patient=patient, note="Irregular border")
    add_image(lesion, clinician, probability=0.2, model=model, days_ago=30)
    image = add_image(lesion, clinician, probability=0.6, model=model, days_ago=1)
    add_explanation(image, model)
    add_explanation(image, model, method="integrated_gradients")
    add_explanation(image, model, method="occlusion", state="queued")
    queued = add_image(lesion, clinician, state=ImageState.QUEUED)
    refused = add_image(lesion, clinician, probability=0.7, model=model, days_ago=2)
    refused.predictions.update(decision="not_assessable", assessable=False, quality={
        "gate": "strict", "reasons": ["out of focus: hold the camera 10–15 cm away"], "warnings": [],
        "checks": [{"name": "focus", "value": -3.0, "threshold": -2.0, "direction": "low", "passed": False,
                    "advice": "out of focus: hold the camera 10–15 cm away"}]})  # fmt: skip
    unsure = add_image(lesion, clinician, probability=0.48, model=model, days_ago=3)
    unsure.predictions.update(decision="uncertain", assessable=True, quality={
        "gate": "strict", "reasons": [], "warnings": [], "checks": [], "band": [0.4, 0.55],
        "advice": "uncertain: specialist review recommended"})  # fmt: skip
    create_api_token(user=clinician, name="EHR integration")

    anonymous, no_clinic, client = Client(), Client(), Client()
    no_clinic.force_login(UserFactory())
    client.force_login(clinician)
    requests = {
        "login": lambda: anonymous.get(reverse("login")),
        "patients": lambda: client.get(reverse("portal:patients")),
        "patients-with-errors": lambda: client.post(reverse("portal:patients"), {"reference": "Jane Doe"}),
        "patient": lambda: client.get(reverse("portal:patient", args=[patient.pk])),
        "lesion": lambda: client.get(reverse("portal:lesion", args=[lesion.pk])),
        "image": lambda: client.get(reverse("portal:image", args=[image.pk])),
        "image-queued": lambda: client.get(reverse("portal:image", args=[queued.pk])),
        "image-not-assessable": lambda: client.get(reverse("portal:image", args=[refused.pk])),
        "image-uncertain": lambda: client.get(reverse("portal:image", args=[unsure.pk])),
        "image-with-errors": lambda: client.post(
            reverse("portal:image-feedback", args=[image.pk]), {"kind": "histopathology", "diagnosis": "nope"}
        ),
        "report": lambda: client.get(reverse("portal:lesion-report", args=[lesion.pk])),
        "history": lambda: client.get(reverse("portal:history")),
        "history-with-errors": lambda: client.get(
            reverse("portal:history"), {"date_from": "2030-01-01", "date_to": "2020-01-01"}
        ),
        "tokens": lambda: client.get(reverse("portal:tokens")),
        "tokens-created": lambda: client.post(
            reverse("portal:tokens"), {"name": "Lab", "expires_in_days": "30", "password": PASSWORD}
        ),
        "password-change": lambda: client.get(reverse("password_change")),
        "no-clinic": lambda: no_clinic.get(reverse("portal:patients")),
        "not-found": lambda: client.get(reverse("portal:patient", args=["00000000-0000-0000-0000-000000000000"])),
    }
    assert set(requests) == set(PAGES)
    rendered = {}
    for name, request in requests.items():
        response = request()
        rendered[name] = (response.status_code, response.content.decode())
    return rendered


@pytest.fixture(scope="module")
def rendered(django_db_setup, django_db_blocker, tiny_checkpoint) -> dict[str, tuple[int, str]]:
    """The pages are rendered once for the module, inside a transaction that is rolled back."""
    with django_db_blocker.unblock(), transaction.atomic():
        pages = render_all(tiny_checkpoint)
        transaction.set_rollback(True)
    return pages


EXPECTED_STATUS = {"patients-with-errors": 400, "image-with-errors": 400, "history-with-errors": 400,
                   "no-clinic": 403, "not-found": 404}  # fmt: skip


@pytest.fixture(params=PAGES)
def page(request, rendered) -> tuple[str, Page]:
    return request.param, Page(rendered[request.param][1])


@pytest.mark.parametrize("name", PAGES)
def test_page_renders(rendered, name):
    status, source = rendered[name]
    assert status == EXPECTED_STATUS.get(name, 200), (name, status)
    assert "Decision support, not a diagnosis." in source


def describe(element: Element) -> str:
    return f"<{element.tag} {' '.join(f'{k}={v!r}' for k, v in element.attrs.items())}>"


# --- the checks: each returns the problems it finds on a page ----------------------------------------------


def labelled_controls(parsed: Page) -> list[Element]:
    return [
        e
        for e in parsed.find("input", "select", "textarea")
        if not (e.tag == "input" and e.attrs.get("type", "text").lower() in UNLABELLED_INPUTS)
    ]


def unlabelled_controls(parsed: Page) -> list[str]:
    problems = []
    for control in labelled_controls(parsed):
        labelled = (
            control.in_label
            or control.attrs.get("id", "") in parsed.label_for
            or control.attrs.get("aria-label", "").strip()
            or control.attrs.get("aria-labelledby", "").strip()
        )
        if not labelled:
            problems.append(f"{describe(control)} has no label")
        for target in control.attrs.get("aria-labelledby", "").split():
            if not parsed.by_id(target):
                problems.append(f"{describe(control)}: aria-labelledby {target!r} points nowhere")
    return problems


def stray_labels(parsed: Page) -> list[str]:
    problems = []
    for target in parsed.label_for:
        found = parsed.by_id(target)
        # A browser uses the first element with the id (repeated_ids reports repeats).
        if not found or found[0].tag not in ("input", "select", "textarea", "output", "meter", "progress"):
            problems.append(f"<label for={target!r}> names no form control")
    return problems


def repeated_ids(parsed: Page) -> list[str]:
    ids = parsed.ids()
    return [f"id {element_id!r} is used {ids.count(element_id)} times" for element_id in sorted(set(ids))
            if ids.count(element_id) > 1]  # fmt: skip


def missing_descriptions(parsed: Page) -> list[str]:
    return [
        f"{describe(element)} is described by {target!r}, which is missing"
        for element in parsed.elements
        for target in element.attrs.get("aria-describedby", "").split()
        if not parsed.by_id(target)
    ]


def empty_descriptions(parsed: Page) -> list[str]:
    problems = []
    for element in parsed.elements:
        for target in element.attrs.get("aria-describedby", "").split():
            for described in parsed.by_id(target)[:1]:
                if described.tag != "output" and not "".join(described.text).strip():  # <output>: set by script
                    problems.append(f"{describe(element)} is described by an empty <{described.tag} id={target!r}>")
    return problems


def images_without_alt(parsed: Page) -> list[str]:
    images = parsed.find("img")
    problems = [f"{describe(image)} has no alt" for image in images if "alt" not in image.attrs]
    described = {other.attrs.get("src") for other in images if other.attrs.get("alt")}
    for image in images:
        # Only a decorative copy of a picture described elsewhere on the page may be silent.
        if image.attrs.get("alt") == "" and "hidden" not in image.attrs and image.attrs.get("src") not in described:
            problems.append(f"{describe(image)} is silent and described nowhere")
    return problems


def small_screen_problems(parsed: Page) -> list[str]:
    problems = []
    viewports = [m for m in parsed.find("meta") if m.attrs.get("name") == "viewport"]
    if len(viewports) != 1 or "width=device-width" not in viewports[0].attrs.get("content", "").replace(" ", ""):
        problems.append(f"viewport: {[describe(v) for v in viewports]}")
    if not any(e.attrs.get("lang") for e in parsed.find("html")):
        problems.append("<html> has no lang")
    if not any("".join(e.text).strip() for e in parsed.find("title")):
        problems.append("no <title>")
    return problems


def external_resources(parsed: Page) -> list[str]:
    problems = []
    for element in parsed.find(*RESOURCES):
        address = element.attrs.get(RESOURCES[element.tag], "").strip()
        if address.lower().startswith(("http://", "https://", "//")):
            problems.append(f"{describe(element)} loads from another site")
        elif address.startswith("/static/") and not finders.find(address.removeprefix("/static/")):
            problems.append(f"{describe(element)} names a static file that does not exist")
    for element in parsed.elements:
        if re.search(r"url\(\s*['\"]?(https?:)?//", element.attrs.get("style", "")):
            problems.append(f"{describe(element)} styles with a file from another site")
    return problems


# --- the pages, checked ------------------------------------------------------------------------------------


def test_every_form_control_has_a_label(page):
    name, parsed = page
    if name in ("login", "patients", "image", "history", "tokens", "password-change"):
        assert labelled_controls(parsed), f"{name}: expected form controls to check"
    problems = unlabelled_controls(parsed)
    assert not problems, f"{name}: {problems}"


def test_every_label_points_at_a_form_control(page):
    name, parsed = page
    problems = stray_labels(parsed)
    assert not problems, f"{name}: {problems}"


def test_ids_are_unique_so_each_label_names_one_control(page):
    """A repeated id makes a `<label for>` (and aria-describedby) name the first element with that id:
    the second control is announced with the wrong label, and clicking its label focuses the other."""
    name, parsed = page
    problems = repeated_ids(parsed)
    assert not problems, f"{name}: {problems}"


def test_every_description_a_control_points_at_exists(page):
    """aria-describedby (Django adds `<id>_helptext` and, on a field with errors, `<id>_error`) must
    name elements of the page, or screen readers announce the field without its help or its error."""
    name, parsed = page
    problems = missing_descriptions(parsed)
    assert not problems, f"{name}: {problems}"


def test_help_texts_that_describe_a_control_keep_their_text(page):
    """The element aria-describedby names must still hold the help text as browsers parse the page
    (a <ul> inside a <p> closes the <p> and leaves it empty)."""
    name, parsed = page
    problems = empty_descriptions(parsed)
    assert not problems, f"{name}: {problems}"


def test_every_image_has_a_text_alternative(page):
    name, parsed = page
    if name in ("lesion", "image", "report", "history"):
        assert parsed.find("img"), f"{name}: expected pictures to check"
    problems = images_without_alt(parsed)
    assert not problems, f"{name}: {problems}"


def test_every_page_fits_small_screens_and_names_its_language(page):
    name, parsed = page
    problems = small_screen_problems(parsed)
    assert not problems, f"{name}: {problems}"


def test_pages_load_nothing_from_other_sites(page):
    name, parsed = page
    assert {e.tag for e in parsed.find("script", "link")} == {"script", "link"}, name
    problems = external_resources(parsed)
    assert not problems, f"{name}: {problems}"


def test_static_files_load_nothing_from_other_sites():
    """The portal's own CSS and script fetch no fonts, styles or scripts from the internet."""
    for name in ("portal/portal.css", "portal/print.css", "portal/portal.js"):
        path = finders.find(name)
        assert path, name
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        assert "https://" not in text and "http://" not in text, name
        assert not re.search(r"(url\(|@import|src\s*=)\s*['\"]?//", text), name


BAD_PAGE = """<!doctype html><html><head><meta name="viewport" content="initial-scale=1">
<script src="https://cdn.example/x.js"></script><link rel="stylesheet" href="//fonts.example/f.css">
<link rel="stylesheet" href="/static/portal/missing.css"></head><body>
<label for="a">A</label><input id="a" name="a" aria-describedby="a_help a_error"><input id="a" name="b">
<select name="c"></select><label>Wrapped <textarea name="d"></textarea></label><label for="nothing">X</label>
<p id="a_help"><ul><li>help</li></ul></p><input type="hidden" name="e"><input type="submit"><input type="text" name="f">
<img src="/p.jpg"><img src="/q.jpg" alt=""><div style="background: url('https://x.example/b.png')"></div>
</body></html>"""


def test_the_checks_find_the_problems_of_a_bad_page():
    """The checker is only as good as what it catches: every kind of problem, and nothing made up."""
    parsed = Page(BAD_PAGE)
    # (the second id="a" input counts as labelled: repeated_ids reports it)
    assert unlabelled_controls(parsed) == [
        "<select name='c'> has no label",
        "<input type='text' name='f'> has no label",
    ]
    assert stray_labels(parsed) == ["<label for='nothing'> names no form control"]
    assert repeated_ids(parsed) == ["id 'a' is used 2 times"]
    assert missing_descriptions(parsed) == [
        "<input id='a' name='a' aria-describedby='a_help a_error'> is described by 'a_error', which is missing"
    ]
    assert empty_descriptions(parsed) == [
        "<input id='a' name='a' aria-describedby='a_help a_error'> is described by an empty <p id='a_help'>"
    ]
    assert images_without_alt(parsed) == [
        "<img src='/p.jpg'> has no alt",
        "<img src='/q.jpg' alt=''> is silent and described nowhere",
    ]
    assert small_screen_problems(parsed) == [
        "viewport: [\"<meta name='viewport' content='initial-scale=1'>\"]",
        "<html> has no lang",
        "no <title>",
    ]
    assert len(external_resources(parsed)) == 4
