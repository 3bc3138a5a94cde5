"""The portal's retake flow in a real browser (issue 20, item 5): a blurred photo, scored by the real worker
with a model that has a photo-quality gate, is refused right where it was uploaded, with the advice in
words, no risk, and a "Take another photo" action; the sharp photo taken through that action gets a result.

The photos are checked against the fixture's gate first, with mlcore itself (as the worker decides), so that
a gate that no longer refuses the blurred photo, or refuses the sharp one, fails here with a clear message
rather than as a browser timeout."""

from __future__ import annotations

import io
import re

import pytest
from playwright.sync_api import expect

from diagnosis.models import Feedback, LesionImage, RiskDecision
from tests.browser.test_portal_browser import PERCENT, log_in, shoot, wait_for_pictures
from tests.conftest import lesion_jpeg

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# A synthetic lesion whose sharp photo passes the tiny gate and whose σ 4 blur fails its focus check. The sharp
# one is sent as PNG: the tiny gate is calibrated on the generator's own pixels, and JPEG's loss of fine detail
# moves the focus measure towards "blurred".
SEED = 33
OUT_OF_FOCUS = "out of focus"
RESULT_LINE = re.compile(
    rf"(Uncertain \({PERCENT}\): specialist review recommended|{PERCENT} · (Above|Below) referral threshold)"
)


def lesion_png(*, seed: int, size: int) -> bytes:
    import numpy as np

    from mlcore.data import generate_lesion

    buffer = io.BytesIO()
    generate_lesion(np.random.default_rng(seed), malignant=True, size=size).image.save(buffer, format="PNG")
    return buffer.getvalue()


def blurred_jpeg(data: bytes, radius: float = 4) -> bytes:
    """The photo decoded, blurred (Gaussian, σ = radius pixels) and encoded again as JPEG."""
    from PIL import Image, ImageFilter

    image = Image.open(io.BytesIO(data)).convert("RGB").filter(ImageFilter.GaussianBlur(radius))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def gate_decision(data: bytes, checkpoint: bytes, gate_data: dict):
    """What the worker decides for this photo under the fixture's gate: the photo's quality measures (on the
    feature thumbnail, as the decode step takes them), its OOD score from the model's embedding, the band."""
    from PIL import Image

    from mlcore.drift import feature_thumbnail
    from mlcore.gate import Gate, decide
    from mlcore.inference import Predictor
    from mlcore.quality import measure

    image = Image.open(io.BytesIO(data)).convert("RGB")
    gate = Gate.from_dict(gate_data)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    (result,), _, embeddings = predictor.predict_with_gradcam([image], embeddings=True)
    measures = {**measure(feature_thumbnail(image)), "resolution": float(min(image.size))}
    return decide(probability=result.probability_malignant, threshold=result.threshold, gate=gate,
                  measures=measures, ood_score=float(gate.ood.scores(embeddings)[0]))  # fmt: skip


def test_a_blurred_photo_is_refused_with_advice_and_the_photo_taken_again_gets_a_result(
    new_tab, clinician_account, gated_model, celery_worker, tiny_checkpoint, tiny_gate, screenshot_dir
):
    """One clinician's path through the retake flow, checked at each step."""
    from diagnosis.services import patients as patient_services

    sharp = lesion_png(seed=SEED, size=128)
    blurred = blurred_jpeg(lesion_jpeg(seed=SEED, size=128))
    refused = gate_decision(blurred, tiny_checkpoint, tiny_gate)
    assert refused.decision == RiskDecision.NOT_ASSESSABLE, ("the gate should refuse the σ 4 blur", refused.quality)
    assert any(reason.startswith(OUT_OF_FOCUS) for reason in refused.reasons), refused.quality
    accepted = gate_decision(sharp, tiny_checkpoint, tiny_gate)
    assert accepted.assessable, ("the gate should accept the sharp photo", accepted.quality)

    clinic, user = clinician_account.clinic, clinician_account.user
    patient = patient_services.create_patient(clinic=clinic, reference="PT-RETAKE-1", created_by=user)
    lesion = patient_services.create_lesion(patient=patient, body_site="back", note="", created_by=user)
    tab = new_tab(width=800, height=900)
    page = tab.page
    log_in(page, clinician_account, start=f"/lesions/{lesion.pk}/")

    # --- the blurred photo: refused where it was uploaded, with the advice and no risk -------------------
    page.set_input_files("#id_images", files=[{"name": "blurred.jpg", "mimeType": "image/jpeg", "buffer": blurred}])
    page.locator("#upload-button").click()
    items = page.locator("#upload-list .upload-item")
    first = items.nth(0)
    expect(first.locator(".status-line[data-state=done]")).to_have_count(1, timeout=90_000)
    expect(first.locator(".status-line")).to_contain_text("Not assessable: take another photo")
    expect(first.locator(".reasons li").first).to_contain_text("Out of focus: hold the camera")
    expect(first).not_to_contain_text("%")
    expect(first).to_have_class(re.compile(r"\brefused\b"))
    retake = first.get_by_role("button", name="Take another photo")
    expect(retake).to_be_visible()
    refused_image = LesionImage.objects.get(lesion=lesion)
    assert refused_image.predictions.get().decision == RiskDecision.NOT_ASSESSABLE
    # the timeline below shows it in words too, with no risk and no change
    row = page.locator(f"#timeline .timeline-item[data-image='{refused_image.pk}']")
    expect(row.locator(".refused")).to_contain_text("Not assessable: take another photo")
    expect(row.locator(".reasons")).to_contain_text("Out of focus")
    expect(row).not_to_contain_text("%")

    # "This photo was fine", recorded in place
    first.get_by_role("button", name="This photo was fine").click()
    expect(first.locator(".confirmation")).to_contain_text("your word that this photo was fine was recorded")
    feedback = Feedback.objects.get(image=refused_image)
    assert feedback.kind == Feedback.Kind.PHOTO and feedback.agrees is False and feedback.recorded_by == user
    expect(row.locator(".refused")).to_contain_text(f"Marked as fine by {clinician_account.username}.")
    wait_for_pictures(page, "#timeline .timeline-item img.thumb")
    shoot(page, screenshot_dir, "quality-01-refused-with-advice.png")

    # --- "Take another photo" opens the camera input; the photo taken goes up at once ----------------------
    with page.expect_file_chooser() as chooser_info:
        retake.click()
    chooser = chooser_info.value
    assert chooser.element.get_attribute("id") == "id_camera"
    assert chooser.element.get_attribute("capture") == "environment"
    chooser.set_files(files=[{"name": "sharp.png", "mimeType": "image/png", "buffer": sharp}])
    expect(items).to_have_count(2)
    second = items.nth(1)
    expect(second.locator(".status-line[data-state=done]")).to_have_count(1, timeout=90_000)
    expect(second.locator(".status-line")).to_contain_text(RESULT_LINE)
    expect(second).not_to_have_class(re.compile(r"\brefused\b"))
    expect(first).to_have_class(re.compile(r"\breplaced\b"))
    expect(first).to_contain_text("Replaced by the photo below.")
    sharp_image = LesionImage.objects.filter(lesion=lesion).exclude(pk=refused_image.pk).get()
    assert sharp_image.predictions.get().assessable is True
    newest = page.locator(f"#timeline .timeline-item[data-image='{sharp_image.pk}']")
    expect(newest.locator(".risk")).to_contain_text(re.compile(PERCENT))
    expect(page.locator("#timeline .timeline-item")).to_have_count(2)
    wait_for_pictures(page, "#timeline .timeline-item img.thumb")
    shoot(page, screenshot_dir, "quality-02-retaken-photo-result.png")

    # --- the refused photo's own page: the reasons, no risk, the way back to the camera --------------------
    page.goto(f"/images/{refused_image.pk}/")
    summary = page.locator(".result-summary.refused")
    expect(summary.locator(".decision")).to_have_text("Not assessable: take another photo")
    expect(summary.locator(".reasons")).to_contain_text("Out of focus")
    expect(summary).to_contain_text(f"Marked as fine by {clinician_account.username}")
    expect(page.locator("#result")).not_to_contain_text("%")
    expect(page.locator(".probability")).to_have_count(0)
    page.wait_for_function("() => [...document.images].every(img => img.complete && img.naturalWidth > 0)")
    shoot(page, screenshot_dir, "quality-03-refused-result-page.png")
    summary.get_by_role("link", name="Take another photo").click()
    expect(page).to_have_url(re.compile(rf"/lesions/{lesion.pk}/\?retake={refused_image.pk}#add-photos$"))
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'id_camera'")
    tab.assert_no_js_errors()
