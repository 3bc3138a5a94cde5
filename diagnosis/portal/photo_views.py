"""The portal's side of the photo-quality gate (issue 20): the clinician's word that a photo the gate
refused was fine. Recorded through services.feedback (kind "photo", audited there), for the calibration
report; the photo keeps its verdict, so it still shows no risk."""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import JsonResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from ..services import feedback as feedback_services
from .results import result_of
from .views import VIA, clinic_required, image_or_404, wants_json

ONLY_REFUSED = "Only a photo the quality check refused can be marked as fine."
RECORDED = (
    "Thank you: your word that this photo was fine was recorded, and helps tune the photo check. "
    "The photo still has no result: take another photo for one."
)


@clinic_required
@require_POST
def image_photo_fine(request, pk):
    """ "This photo was fine" on a photo the quality gate refused (POST, with an optional `note`). The page's
    script reads JSON ({"ok", "message"}); without script the answer goes back to the result page (or to
    `next`, a page of this site) with the confirmation as a message."""
    image = image_or_404(request, pk)
    decision = result_of(image)
    error = ONLY_REFUSED if decision is None or decision.assessable else ""
    if not error:
        try:
            feedback_services.record_photo_feedback(image=image, photo_was_fine=True,
                                                    note=request.POST.get("note", ""), recorded_by=request.user,
                                                    via=VIA)  # fmt: skip
        except ValidationError as exc:
            error = " ".join(exc.messages)
    if wants_json(request):
        body = {"ok": False, "error": error} if error else {"ok": True, "message": RECORDED}
        return JsonResponse(body, status=400 if error else 201)
    if error:
        messages.error(request, error)
    else:
        messages.success(request, RECORDED)
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}, require_https=False):
        target = reverse("portal:image", args=[image.pk]) + "#result"
    return redirect(target)
