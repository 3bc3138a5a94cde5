"""The clinician portal in a real browser (Chromium via Playwright) against the live server, with the
real Celery workers scoring the photos and computing the explanations."""

from __future__ import annotations

import base64
import re
import uuid

import pytest
from playwright.sync_api import expect

from diagnosis.models import DISCLAIMER, Feedback, LesionImage
from tests.browser.conftest import wait_for_explanations
from tests.conftest import lesion_jpeg

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PERCENT = r"\d+(\.\d+)?%"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
SCROLL_WIDTH = "() => document.documentElement.scrollWidth"
# A DataTransfer carrying one JPEG, as the browser builds it for a file dragged from the desktop.
DATA_TRANSFER_WITH_FILE = """([name, b64]) => {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
  return transfer;
}"""
IMAGE_LOADED = """(selector) => {
  const img = document.querySelector(selector);
  return !!img && !img.hidden && img.complete && img.naturalWidth > 0;
}"""
ALL_LOADED = """(selector) => {
  const images = [...document.querySelectorAll(selector)];
  const pending = images.filter(img => !(img.complete && img.naturalWidth > 0));
  pending.forEach(img => img.scrollIntoView({ block: "center" }));  // lazy images load once in view
  return images.length > 0 && pending.length === 0;
}"""


def wait_for_pictures(page, selector: str) -> None:
    """Every image matching selector has loaded and decoded. Checked in the page, so a part of it that
    the portal's script re-renders meanwhile (the timeline) is simply looked up again."""
    page.wait_for_function(ALL_LOADED, arg=selector)
    page.evaluate("window.scrollTo(0, 0)")


def log_in(page, account, *, start: str = "/patients/") -> None:
    page.goto(start)
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next="))
    page.get_by_label("Username").fill(account.username)
    page.get_by_label("Password").fill(account.password)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(re.escape(start) + "$"))


def shoot(page, folder, name: str) -> None:
    page.screenshot(path=str(folder / name), full_page=True)


def scroll_width(page) -> int:
    return page.evaluate(SCROLL_WIDTH)


def test_clinician_flow_from_sign_in_to_report_and_sign_out(
    new_tab, clinician_account, active_model, celery_worker, explain_worker, screenshot_dir
):
    tab = new_tab()
    page = tab.page

    # --- sign in: a portal URL sends an anonymous visitor to the login form first ---------------
    page.goto("/patients/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/patients/$"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shoot(page, screenshot_dir, "01-login.png")
    page.get_by_label("Username").fill(clinician_account.username)
    page.get_by_label("Password").fill(clinician_account.password)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/patients/$"))
    expect(page.locator(".topbar .who")).to_contain_text(f"{clinician_account.username} · Northside Dermatology")

    # --- a patient, then a lesion ---------------------------------------------------------------
    page.get_by_label("Pseudonymous reference").fill("PT-7731")
    page.get_by_role("button", name="Create patient").click()
    expect(page).to_have_url(re.compile(rf"/patients/{UUID}/$"))
    expect(page.locator(".messages")).to_contain_text("Patient PT-7731 created.")
    expect(page.get_by_role("heading", name="Patient PT-7731")).to_be_visible()
    patient_url = page.url

    page.locator(".breadcrumbs").get_by_role("link", name="Patients").click()
    expect(page.locator("table")).to_contain_text("PT-7731")
    shoot(page, screenshot_dir, "02-patients.png")
    page.get_by_role("link", name="PT-7731").click()
    expect(page).to_have_url(patient_url)

    page.get_by_label("Body site").select_option(label="Forearm")
    page.get_by_label("Note").fill("Irregular border, 6 mm, followed since spring")
    page.get_by_role("button", name="Add lesion").click()
    expect(page).to_have_url(re.compile(rf"/lesions/{UUID}/$"))
    lesion_url = page.url
    lesion_id = re.search(rf"/lesions/({UUID})/$", lesion_url).group(1)
    expect(page.locator(".messages")).to_contain_text("Lesion on the forearm added.")
    expect(page.locator("#timeline")).to_contain_text("No photos of this lesion yet.")

    # --- choose two photos with the file input, drop a third on the drop zone ------------------
    button = page.locator("#upload-button")
    expect(button).to_be_disabled()
    page.set_input_files(
        "#id_images",
        files=[
            {"name": "left-forearm-1.jpg", "mimeType": "image/jpeg", "buffer": lesion_jpeg(seed=3, size=160)},
            {"name": "left-forearm-2.jpg", "mimeType": "image/jpeg", "buffer": lesion_jpeg(seed=4, size=160)},
        ],
    )
    items = page.locator("#upload-list .upload-item")
    expect(items).to_have_count(2)
    expect(button).to_be_enabled()
    expect(button).to_have_text("Upload 2 photos")

    dropped = base64.b64encode(lesion_jpeg(seed=5, size=160, malignant=False)).decode()
    transfer = page.evaluate_handle(DATA_TRANSFER_WITH_FILE, ["dropped-from-desktop.jpg", dropped])
    zone = page.locator("#dropzone")
    page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": transfer})
    expect(zone).to_have_class(re.compile(r"\bdragover\b"))
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})
    expect(zone).not_to_have_class(re.compile(r"\bdragover\b"))
    expect(items).to_have_count(3)
    expect(items.nth(2).locator(".name")).to_have_text("dropped-from-desktop.jpg")
    expect(button).to_have_text("Upload 3 photos")
    for index in range(3):
        # every preview is the decoded photo itself (a blob URL), not a broken image
        page.wait_for_function(IMAGE_LOADED, arg=f"#upload-list .upload-item:nth-child({index + 1}) img")
        expect(items.nth(index).locator(".status")).to_have_text("Ready to upload")

    # --- upload: each file's state goes to done on this very page -------------------------------
    page.evaluate("window.__sameDocument = 'marker set before the upload'")
    button.click()
    expect(items.locator(".status-line[data-state=done]")).to_have_count(3, timeout=120_000)
    assert page.evaluate("window.__sameDocument") == "marker set before the upload", "the page was reloaded"
    assert page.url == lesion_url
    for index in range(3):
        item = items.nth(index)
        expect(item).to_have_attribute("data-image", re.compile(UUID))
        expect(item.locator(".status-line")).to_contain_text(re.compile(rf"Done\s*{PERCENT} · (Above|Below) referral"))
        expect(item.get_by_role("link", name="Open result")).to_be_visible()
    expect(button).to_have_text("Upload")
    expect(button).to_be_disabled()
    # the timeline below refreshes itself with the three scored photos
    expect(page.locator("#timeline .timeline-item")).to_have_count(3)
    expect(page.locator("#timeline .timeline-item .risk")).to_have_count(3)
    image_ids = [items.nth(index).get_attribute("data-image") for index in range(3)]
    assert set(LesionImage.objects.filter(lesion_id=lesion_id).values_list("id", flat=True).iterator()) == {
        uuid.UUID(image_id) for image_id in image_ids
    }
    wait_for_pictures(page, "#timeline .timeline-item img.thumb")
    shoot(page, screenshot_dir, "03-lesion-uploads-done.png")

    # --- the result page, opened from the upload list -------------------------------------------
    first_image = image_ids[0]
    items.nth(0).get_by_role("link", name="Open result").click()
    expect(page).to_have_url(re.compile(rf"/images/{first_image}/$"))
    summary = page.locator(".result-summary")
    expect(summary.locator(".probability")).to_contain_text(re.compile(rf"Malignancy probability\s+{PERCENT}"))
    expect(summary.locator(".decision")).to_contain_text(
        re.compile(rf"(Above|Below) referral threshold \(threshold {PERCENT}\)")
    )
    expect(summary).to_contain_text("referral threshold")
    expect(summary.locator(".disclaimer")).to_have_text(DISCLAIMER)
    expect(summary).to_contain_text(f"Model version {active_model.version}")
    probability_text = summary.locator(".probability strong").inner_text()

    layer = page.locator("#heatmap-layer")
    expect(layer).to_be_visible(timeout=60_000)
    expect(layer).to_have_attribute("src", re.compile(rf"/explanations/{UUID}/heatmap/$"))
    page.wait_for_function(IMAGE_LOADED, arg="#heatmap-layer", timeout=30_000)
    gradcam = page.locator("#methods input[value=gradcam]")
    expect(gradcam).to_be_checked()
    gradcam_src = layer.get_attribute("src")
    assert gradcam.get_attribute("data-explanation") in gradcam_src
    shoot(page, screenshot_dir, "04-result-heatmap.png")

    # Integrated Gradients comes later from the explain worker: its radio turns enabled in place
    integrated = page.locator("#methods input[value=integrated_gradients]")
    expect(integrated).to_be_enabled(timeout=180_000)
    page.evaluate("window.__resultDocument = 1")
    integrated.check()
    expect(layer).not_to_have_attribute("src", gradcam_src)
    expect(layer).to_have_attribute("src", re.compile(rf"/explanations/{UUID}/heatmap/$"))
    assert integrated.get_attribute("data-explanation") in layer.get_attribute("src")
    expect(page.locator("#heatmap-caption")).to_contain_text("Integrated Gradients")
    expect(page.locator("#overlay-download")).to_have_attribute(
        "href", f"/explanations/{integrated.get_attribute('data-explanation')}/overlay/"
    )
    page.wait_for_function(IMAGE_LOADED, arg="#heatmap-layer")

    # the opacity slider, by value and by keyboard
    assert layer.evaluate("img => img.style.opacity") == "0.7"
    page.fill("#opacity", "30")
    assert layer.evaluate("img => img.style.opacity") == "0.3"
    expect(page.locator("#opacity-value")).to_have_text("30%")
    page.locator("#opacity").press("ArrowRight")
    assert layer.evaluate("img => img.style.opacity") == "0.35"
    expect(page.locator("#opacity-value")).to_have_text("35%")
    assert page.evaluate("window.__resultDocument") == 1  # switching and sliding never reloaded the page
    shoot(page, screenshot_dir, "04b-result-integrated-gradients.png")

    # --- feedback: an assessment, then the histopathology outcome --------------------------------
    page.get_by_label("I agree with the result").check()
    page.get_by_role("button", name="Record assessment").click()
    expect(page).to_have_url(re.compile(rf"/images/{first_image}/#feedback$"))
    expect(page.locator(".messages")).to_contain_text("Your assessment was recorded.")
    history = page.locator(".feedback-list li")
    expect(history).to_have_count(1)
    expect(history.nth(0)).to_contain_text(f"{clinician_account.username} · agrees with the result")

    outcome_form = page.locator("form", has=page.locator("input[name=kind][value=histopathology]"))
    outcome_form.get_by_label("Histopathology outcome").select_option(label="Melanoma in situ")
    outcome_form.locator("textarea[name=note]").fill("Path report 2025/117")
    outcome_form.get_by_role("button", name="Record outcome").click()
    expect(page.locator(".messages")).to_contain_text("The histopathology outcome was recorded.")
    expect(history).to_have_count(2)
    expect(history.nth(0)).to_contain_text("histopathology: Melanoma in situ")
    expect(history.nth(0)).to_contain_text("“Path report 2025/117”")
    expect(history.nth(1)).to_contain_text("agrees with the result")
    assert Feedback.objects.filter(image_id=first_image).count() == 2

    # --- the lesion timeline shows the feedback ---------------------------------------------------
    page.locator(".breadcrumbs").get_by_role("link", name="Forearm").click()
    expect(page).to_have_url(lesion_url)
    row = page.locator(f"#timeline .timeline-item[data-image='{first_image}']")
    expect(row.locator(".feedback-summary")).to_contain_text(f"Clinician agreed ({clinician_account.username}")
    expect(row.locator(".feedback-summary")).to_contain_text("Histopathology: Melanoma in situ")
    expect(row.locator(".risk")).to_have_text(probability_text)
    risks = page.locator("#timeline .timeline-item .risk").all_inner_texts()
    assert len(risks) == 3 and all(re.fullmatch(PERCENT, risk) for risk in risks), risks

    # --- the printable report -----------------------------------------------------------------
    page.get_by_role("link", name="Printable report").click()
    expect(page).to_have_url(re.compile(rf"/lesions/{lesion_id}/report/$"))
    facts = page.locator(".report-header .facts")
    expect(facts).to_contain_text("PT-7731")
    expect(facts).to_contain_text("Forearm")
    expect(facts).to_contain_text("Northside Dermatology")
    expect(facts).to_contain_text(active_model.version)
    expect(page.locator(".report-page .disclaimer")).to_contain_text(DISCLAIMER)
    table_rows = page.locator(".report-table tbody tr")
    expect(table_rows).to_have_count(3)
    report_probabilities = sorted(table_rows.locator("td:nth-child(2)").all_inner_texts())
    assert report_probabilities == sorted(risks)
    expect(table_rows.filter(has_text="Melanoma in situ")).to_contain_text("agreed; Melanoma in situ")
    expect(page.locator(".report-grid .report-figure")).to_have_count(3)
    wait_for_pictures(page, ".report-grid img")
    topbar = page.locator(".topbar")
    expect(topbar).to_be_visible()
    shoot(page, screenshot_dir, "05-report.png")
    page.emulate_media(media="print")
    expect(topbar).to_be_hidden()
    expect(page.locator(".report-actions")).to_be_hidden()
    expect(page.locator(".footer")).to_be_hidden()
    expect(page.locator(".report-page .disclaimer")).to_be_visible()
    shoot(page, screenshot_dir, "05b-report-print-media.png")
    page.emulate_media(media="screen")
    expect(topbar).to_be_visible()

    # --- the lesion page on a phone -----------------------------------------------------------
    page.goto(lesion_url)
    page.set_viewport_size({"width": 375, "height": 800})
    expect(page.locator("#timeline .timeline-item")).to_have_count(3)
    wait_for_pictures(page, "#timeline .timeline-item img.thumb")
    assert scroll_width(page) <= 375, f"the lesion page scrolls sideways: {scroll_width(page)} px wide"
    shoot(page, screenshot_dir, "06-lesion-375.png")
    page.set_viewport_size({"width": 1280, "height": 900})

    # --- sign out: the portal is closed again ---------------------------------------------------
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/$"))
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    expect(page.locator(".topbar nav")).to_have_count(0)
    response = page.goto(lesion_url)
    assert response.ok
    expect(page).to_have_url(re.compile(rf"/accounts/login/\?next=/lesions/{lesion_id}/$"))
    expect(page.locator("body")).not_to_contain_text("PT-7731")

    tab.assert_no_js_errors()
    wait_for_explanations(image_ids)  # nothing left running on the workers when the database is flushed


def test_another_clinics_clinician_gets_404_for_result_photo_and_report(
    new_tab, clinician_account, make_clinician, scored_lesion
):
    patient, lesion, image = scored_lesion["patient"], scored_lesion["lesion"], scored_lesion["image"]
    explanation = scored_lesion["explanation"]
    urls = {
        "result": f"/images/{image.pk}/",
        "photo": f"/images/{image.pk}/photo/",
        "report": f"/lesions/{lesion.pk}/report/",
        "lesion": f"/lesions/{lesion.pk}/",
        "patient": f"/patients/{patient.pk}/",
        "heatmap": f"/explanations/{explanation.pk}/heatmap/",
    }

    # the owner's clinician opens every one of them: the URLs are right
    owner = new_tab()
    log_in(owner.page, clinician_account)
    for name, url in urls.items():
        response = owner.page.goto(url)
        assert response.status == 200, (name, url, response.status)
    owner.page.goto(urls["result"])
    expect(owner.page.locator(".breadcrumbs")).to_contain_text(patient.reference)

    intruder_account = make_clinician("Southside Skin Clinic", "dr.south")
    intruder = new_tab()
    log_in(intruder.page, intruder_account)
    expect(intruder.page.locator("body")).not_to_contain_text(patient.reference)
    for name, url in urls.items():
        response = intruder.page.goto(url)
        assert response.status == 404, (name, url, response.status)
        expect(intruder.page.get_by_role("heading", name="Not found")).to_be_visible()
        expect(intruder.page.locator("body")).to_contain_text("belongs to another clinic")
        assert patient.reference not in intruder.page.content(), (name, url)
        assert str(response.headers.get("content-type", "")).startswith("text/html"), (name, url)
    # Opened as documents of their own, the photo and the heatmap make Chromium ask for /favicon.ico
    # (the portal's pages declare an inline icon); nothing else may have failed on the owner's side.
    assert [error for error in owner.errors if "/favicon.ico" not in error] == []


def test_lesion_and_result_pages_fit_a_375_px_phone(new_tab, clinician_account, scored_lesion, screenshot_dir):
    lesion, image = scored_lesion["lesion"], scored_lesion["image"]
    tab = new_tab(width=375, height=800)
    page = tab.page
    log_in(page, clinician_account)

    page.goto(f"/lesions/{lesion.pk}/")
    expect(page.locator("#timeline .timeline-item")).to_have_count(1)
    expect(page.locator("#dropzone")).to_be_visible()
    wait_for_pictures(page, "#timeline .timeline-item img.thumb")
    assert scroll_width(page) <= 375, f"the lesion page scrolls sideways: {scroll_width(page)} px wide"
    shoot(page, screenshot_dir, "07-lesion-375-phone.png")

    page.goto(f"/images/{image.pk}/")
    expect(page.locator(".result-summary .probability")).to_contain_text("%")
    expect(page.locator("#heatmap-layer")).to_be_visible()
    page.wait_for_function(IMAGE_LOADED, arg="#heatmap-layer")
    expect(page.locator("#opacity")).to_be_visible()
    assert scroll_width(page) <= 375, f"the result page scrolls sideways: {scroll_width(page)} px wide"
    shoot(page, screenshot_dir, "08-result-375-phone.png")
    tab.assert_no_js_errors()


def test_each_feedback_field_on_the_result_page_is_its_own_labelled_control(new_tab, clinician_account, scored_lesion):
    """Both feedback forms have a comment box; each label must lead to the box of its own form."""
    tab = new_tab()
    page = tab.page
    log_in(page, clinician_account)
    page.goto(f"/images/{scored_lesion['image'].pk}/")
    expect(page.locator(".result-summary")).to_be_visible()
    duplicated = page.evaluate(
        """() => {
          const seen = {};
          document.querySelectorAll("[id]").forEach(node => { seen[node.id] = (seen[node.id] || 0) + 1; });
          return Object.keys(seen).filter(id => seen[id] > 1);
        }"""
    )
    assert duplicated == [], f"ids used more than once on the result page: {duplicated}"
    assessment = page.locator("form", has=page.locator("input[name=kind][value=assessment]"))
    outcome = page.locator("form", has=page.locator("input[name=kind][value=histopathology]"))
    expect(assessment.get_by_label("Comment")).to_be_visible()
    expect(outcome.get_by_label("Report reference or comment")).to_be_visible()
    tab.assert_no_js_errors()


def test_an_uploaded_photos_result_arrives_through_the_notification_not_by_polling(
    new_tab, clinician_account, active_model, celery_worker
):
    """The page's script asks the portal's status with ?wait=25&since=VERSION: the server holds the
    request until the worker's notification says the photo changed. So the result shows long before the
    25 s a missed notification would take, with one or two status requests per photo, not a poll a second."""
    from diagnosis.services import patients as patient_services

    clinic, user = clinician_account.clinic, clinician_account.user
    patient = patient_services.create_patient(clinic=clinic, reference="PT-WAIT-1", created_by=user)
    lesion = patient_services.create_lesion(patient=patient, body_site="back", note="", created_by=user)
    tab = new_tab()
    page = tab.page
    status_requests = []
    page.on("request", lambda request: "/status/" in request.url and status_requests.append(request.url))
    log_in(page, clinician_account, start=f"/lesions/{lesion.pk}/")
    page.set_input_files("#id_images", files=[{"name": "back.jpg", "mimeType": "image/jpeg",
                                               "buffer": lesion_jpeg(seed=8, size=160)}])  # fmt: skip
    page.locator("#upload-button").click()
    item = page.locator("#upload-list .upload-item")
    expect(item.locator(".status-line[data-state=done]")).to_have_count(1, timeout=20_000)  # < the 25 s wait
    expect(item).to_contain_text(re.compile(PERCENT))
    image = LesionImage.objects.get(lesion=lesion)
    own = [url for url in status_requests if str(image.pk) in url]
    assert own and all("wait=25" in url and "since=" in url for url in own), status_requests
    assert len(own) <= 3, own  # the first answer at once, then one held until the result
    tab.assert_no_js_errors()
