"""The clinician portal: server-rendered pages over the same services as the API.

Every view requires a login and a clinic membership, and looks objects up through the clinic-scoped
managers, so another clinic's patient, lesion, image, overlay or report answers 404 whatever the URL.
Photos and overlays are served by these views (never from a public media URL), with private,
no-store caching rules.

Long because: it holds every page of the portal (about twenty views, each a few lines over the services)
behind one login-and-clinic decorator; the module stays just over 400 lines.
"""

from __future__ import annotations

from functools import wraps
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import Count, Max, OuterRef, Subquery
from django.http import Http404, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from ..client_address import client_ip
from ..models import ApiToken, AuditEvent, Explanation, Feedback, Lesion, LesionImage, Patient, Prediction
from ..request_wait import InvalidWait, hung_up_check, wait_option
from ..services import explanations as explanation_services
from ..services import feedback as feedback_services
from ..services import files as file_services
from ..services import images as image_services
from ..services import patients as patient_services
from ..services import rates, waiting
from ..services import tokens as token_services
from ..services.audit import record_event
from ..services.clinics import clinic_of
from ..services.explanations import METHOD_LABELS, method_label
from ..services.previews import PreviewUnavailable, preview_jpeg
from .forms import AssessmentForm, HistoryFilterForm, LesionForm, OutcomeForm, PatientForm, TokenForm, filter_by_band
from .results import explanation_payload, result_explanations, result_of, status_payload, timeline, with_predictions

VIA = "portal"


# The result page has two feedback forms with a "note" each: distinct ids keep each label on its field.
ASSESSMENT_IDS, OUTCOME_IDS = "assessment_%s", "outcome_%s"


def clinic_required(view):
    """Login required, and the user must belong to a clinic: the clinic is every query's scope."""

    @login_required
    @never_cache
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        clinic = clinic_of(request.user)
        if clinic is None:
            return render(request, "portal/no_clinic.html", status=403)
        request.clinic = clinic
        return view(request, *args, **kwargs)

    return wrapper


def wants_json(request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def audit(request, action: str, obj) -> None:
    record_event(actor=request.user, action=action, obj=obj, clinic=request.clinic, via=VIA,
                 ip_address=client_ip(request))  # fmt: skip


# --- pages -------------------------------------------------------------------------------------


@login_required
def index(request):
    return redirect("portal:patients")


@clinic_required
def patients(request):
    form = PatientForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            patient = patient_services.create_patient(
                clinic=request.clinic, reference=form.cleaned_data["reference"], created_by=request.user, via=VIA
            )
        except ValidationError as exc:
            for field_name, errors in exc.message_dict.items():
                for error in errors:
                    form.add_error(field_name if field_name in form.fields else None, error)
        else:
            messages.success(request, f"Patient {patient.reference} created.")
            return redirect("portal:patient", pk=patient.pk)
    query = request.GET.get("q", "").strip()
    queryset = Patient.objects.for_clinic(request.clinic).annotate(
        lesion_count=Count("lesions", distinct=True),
        image_count=Count("lesions__images", distinct=True),
        last_image_at=Max("lesions__images__created_at"),
    )
    if query:
        queryset = queryset.filter(reference__icontains=query)
    page = Paginator(queryset.order_by("-created_at"), settings.PORTAL_PAGE_SIZE).get_page(request.GET.get("page"))
    status = 400 if request.method == "POST" else 200
    context = {"form": form, "page": page, "query": query, "filters": urlencode({"q": query}) if query else ""}
    return render(request, "portal/patients.html", context, status=status)


@clinic_required
def patient_detail(request, pk):
    patient = get_object_or_404(Patient.objects.for_clinic(request.clinic), pk=pk)
    form = LesionForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        lesion = patient_services.create_lesion(
            patient=patient, body_site=form.cleaned_data["body_site"], note=form.cleaned_data["note"],
            created_by=request.user, via=VIA,
        )  # fmt: skip
        messages.success(request, f"Lesion on the {lesion.get_body_site_display().lower()} added.")
        return redirect("portal:lesion", pk=lesion.pk)
    if request.method == "GET":
        audit(request, AuditEvent.Action.VIEW_PATIENT, patient)
    lesions = []
    for lesion in patient.lesions.order_by("created_at"):
        rows = timeline(lesion)
        latest = next((row for row in rows if row.decision and row.decision.assessable), None)  # the latest risk
        last_at = rows[0].image.created_at if rows else None
        lesions.append({"lesion": lesion, "image_count": len(rows), "latest": latest, "last_at": last_at})
    status = 400 if request.method == "POST" else 200
    return render(request, "portal/patient.html", {"patient": patient, "lesions": lesions, "form": form}, status=status)


def lesion_or_404(request, pk) -> Lesion:
    return get_object_or_404(Lesion.objects.for_clinic(request.clinic).select_related("patient"), pk=pk)


@clinic_required
@require_GET
def lesion_detail(request, pk):
    lesion = lesion_or_404(request, pk)
    context = {
        "lesion": lesion, "patient": lesion.patient, "rows": timeline(lesion),
        "rise_flag_points": f"{settings.RISK_RISE_FLAG * 100:.0f}",
        "max_upload_mb": settings.MAX_UPLOAD_BYTES // (1024 * 1024), "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
    }  # fmt: skip
    if request.GET.get("partial") == "timeline":
        return render(request, "portal/_timeline.html", context)
    audit(request, AuditEvent.Action.VIEW_LESION, lesion)
    return render(request, "portal/lesion.html", context)


@clinic_required
@require_POST
def lesion_upload(request, pk):
    """Multipart upload of one or several photos (field `images`). The page's script sends one file
    per request to show each file's progress, and reads JSON; without script the form posts all
    files at once and the answer is the lesion page with a message per file."""
    lesion = lesion_or_404(request, pk)
    files = request.FILES.getlist("images")
    try:  # the API's upload limit, counted together with the user's API uploads
        rates.take("uploads", request.user.pk, settings.API_UPLOAD_RATE_LIMIT, cost=max(1, len(files)))
    except rates.RateExceeded as exc:
        message = f"Too many uploads in a short time. Try again in {exc.retry_after} s."
        if wants_json(request):
            return json_retry_after({"error": message, "code": "throttled", "files": []}, 429, exc.retry_after)
        messages.error(request, message)
        return redirect("portal:lesion", pk=lesion.pk)
    # The script sends each file with its own Idempotency-Key, so a retried or double-sent request
    # returns the image already stored instead of a second one.
    key = request.headers.get("Idempotency-Key", "").strip() if len(files) == 1 else ""
    results = []
    for upload in files:
        try:
            image = image_services.submit_image(
                uploader=request.user, clinic=request.clinic, upload=upload, lesion=lesion, via=VIA,
                idempotency_key=key,
            )  # fmt: skip
        except image_services.ImageValidationError as exc:
            results.append({"name": upload.name, "ok": False, "code": exc.code, "error": exc.message})
        except (image_services.IdempotencyConflict, ValidationError) as exc:
            message = exc.messages[0] if isinstance(exc, ValidationError) else str(exc)
            results.append({"name": upload.name, "ok": False, "code": "idempotency_key", "error": message})
        except image_services.UploadBusy as exc:
            results.append({"name": upload.name, "ok": False, "code": "server_busy", "error": str(exc)})
        else:
            results.append({"name": upload.name, "ok": True, **status_payload(image)})
    accepted = sum(result["ok"] for result in results)
    if wants_json(request):
        if not files:
            return JsonResponse({"error": "Choose at least one image to upload.", "files": []}, status=400)
        if not accepted and all(result.get("code") == "server_busy" for result in results):
            # Not the files' fault: the page's script sends them again.
            return json_retry_after({"files": results}, 503, image_services.UploadBusy.retry_after)
        return JsonResponse({"files": results}, status=202 if accepted else 400)
    if not files:
        messages.error(request, "Choose at least one image to upload.")
    for position, result in enumerate(results, start=1):
        if not result["ok"]:  # by position: the client's file name may hold a person's name
            messages.error(request, f"File {position} of {len(results)}: {result['error']}")
    if accepted:
        messages.success(request, f"{accepted} image{'s' if accepted != 1 else ''} uploaded; results appear below.")
    return redirect("portal:lesion", pk=lesion.pk)


def json_retry_after(body: dict, status: int, seconds: int) -> JsonResponse:
    response = JsonResponse(body, status=status)
    response["Retry-After"] = str(seconds)
    return response


@clinic_required
@require_GET
def lesion_report(request, pk):
    lesion = lesion_or_404(request, pk)
    rows = timeline(lesion)
    audit(request, AuditEvent.Action.VIEW_REPORT, lesion)
    versions = sorted({row.decision.model_version for row in rows if row.decision})
    context = {
        "lesion": lesion, "patient": lesion.patient, "rows": rows, "versions": versions, "generated_at": timezone.now(),
        "pictured": [r for r in rows if r.decision and r.decision.assessable][:4],  # not the refused photos
    }  # fmt: skip
    return render(request, "portal/report.html", context)


def image_or_404(request, pk) -> LesionImage:
    return get_object_or_404(
        with_predictions(LesionImage.objects.for_clinic(request.clinic)).select_related("lesion__patient"), pk=pk
    )


def image_page(request, image: LesionImage, *, assessment_form=None, outcome_form=None, status: int = 200):
    decision = result_of(image)
    explanations = result_explanations(image, decision)
    for explanation in explanations:
        explanation.label = method_label(explanation.method)
    done = [e for e in explanations if e.state == Explanation.State.DONE]
    preferred = next((e for e in done if e.method == "gradcam"), done[0] if done else None)
    requested = {e.method for e in explanations}
    context = {
        "image": image, "lesion": image.lesion, "patient": image.lesion.patient if image.lesion else None,
        "decision": decision, "explanations": explanations, "done_explanations": done, "selected": preferred,
        # A model with several diagnoses can explain any of them, by any method: all stay requestable.
        "requestable": [(m, label) for m, label in METHOD_LABELS.items()
                        if m not in requested or (decision and decision.diagnoses)],  # fmt: skip
        "targets": [row["diagnosis"] for row in decision.diagnoses] if decision else [],
        "assessment_form": assessment_form or AssessmentForm(auto_id=ASSESSMENT_IDS),
        "outcome_form": outcome_form or OutcomeForm(auto_id=OUTCOME_IDS),
        "feedback": image.feedback.select_related("recorded_by", "prediction").order_by("-recorded_at", "-id"),
        "photo": feedback_services.latest_feedback(image)["photo"],  # "this photo was fine", once said
    }  # fmt: skip
    return render(request, "portal/image.html", context, status=status)


@clinic_required
@require_GET
def image_detail(request, pk):
    image = image_or_404(request, pk)
    audit(request, AuditEvent.Action.VIEW_IMAGE, image)
    return image_page(request, image)


@clinic_required
@require_GET
def image_status(request, pk):
    """The photo's state, result and explanations as JSON. With `?wait=N&since=VERSION` (the page's
    script), the answer waits up to N seconds for a version other than VERSION, woken by the worker's
    notifications (services.waiting): a long poll, never a timer."""
    payload = status_payload(image_or_404(request, pk))
    try:
        option = wait_option(request.GET, {}, header_allowed=False)
    except InvalidWait as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    since = request.GET.get("since", "")
    if option.seconds and payload["version"] == since:

        def read() -> dict | None:
            image = with_predictions(LesionImage.objects.for_clinic(request.clinic)).filter(pk=pk).first()
            return status_payload(image) if image is not None else None

        try:
            payload, _ = waiting.wait_for(read, ids=[pk], seconds=option.seconds, final_only=False,
                                          ready=lambda found: found is None or found["version"] != since,
                                          user_id=request.user.pk, gone=hung_up_check(request.META))  # fmt: skip
        except waiting.ClientGone:
            return HttpResponse(status=499)  # nobody reads it
        if payload is None:
            raise Http404("No such photo in your clinic.")
    response = JsonResponse(payload)
    response["Cache-Control"] = "no-store"
    return response


@clinic_required
@require_GET
def image_photo(request, pk):
    """The stored photo: `?size=thumb` (240 px) or the display size (1,024 px, the default), as JPEG,
    drawn once and kept (services.previews); `?size=original` downloads the stored file itself (logged)."""
    image = get_object_or_404(LesionImage.objects.for_clinic(request.clinic), pk=pk)
    size = request.GET.get("size", "display")
    if size not in ("thumb", "display", "original"):
        return HttpResponseBadRequest("size must be thumb, display or original.")
    if size == "original":
        return serve_file(request, file_services.image_download(image), audited=True)
    try:
        data = preview_jpeg(image, size)
    except PreviewUnavailable:
        raise Http404("The stored photo cannot be shown; see the image's error.") from None
    return file_services.picture_response(data, filename=f"lesion-image-{image.pk}-{size}.jpg")


@clinic_required
@require_GET
def explanation_file(request, pk, kind):
    if kind not in ("overlay", "heatmap"):
        raise Http404
    explanation = get_object_or_404(Explanation.objects.filter(image__clinic=request.clinic), pk=pk)
    try:
        download = file_services.explanation_download(explanation, kind)
    except file_services.FileUnavailable as exc:
        raise Http404(str(exc)) from None
    # A picture of the result page, whose visit is audited (VIEW_IMAGE): fetching it is not another visit.
    return serve_file(request, download, audited=False)


def serve_file(request, download: file_services.Download, *, audited: bool):
    """A stored file, through the one implementation the API uses too (services.files). Streamed, never
    a redirect to the bucket: the portal's pages load pictures from their own origin only (CSP)."""
    try:
        return file_services.serve(download, actor=request.user, via=VIA, ip_address=client_ip(request),
                                   audited=audited, presign=False)  # fmt: skip
    except file_services.FileUnavailable as exc:
        raise Http404(str(exc)) from None


@clinic_required
@require_POST
def image_explanations(request, pk):
    """Request another explanation method with its default parameters."""
    image = image_or_404(request, pk)
    method = request.POST.get("method", "")
    try:
        explanation, _ = explanation_services.request_explanation(
            image=image, method=method, requested_by=request.user, via=VIA, target=request.POST.get("target") or None
        )
    except explanation_services.ExplanationRefused as exc:
        if wants_json(request):
            return JsonResponse({"error": exc.reason, "code": exc.error_code}, status=exc.status)
        messages.error(request, exc.reason)
        return redirect("portal:image", pk=image.pk)
    if wants_json(request):
        return JsonResponse(explanation_payload(explanation), status=202)
    messages.success(request, f"{method_label(method)} requested; it appears here when ready.")
    return redirect("portal:image", pk=image.pk)


@clinic_required
@require_POST
def image_feedback(request, pk):
    image = image_or_404(request, pk)
    kind = request.POST.get("kind")
    if kind == Feedback.Kind.ASSESSMENT:
        form = AssessmentForm(request.POST, auto_id=ASSESSMENT_IDS)
        if form.is_valid():
            try:
                feedback_services.record_assessment(
                    image=image, agrees=form.cleaned_data["agrees"], note=form.cleaned_data["note"],
                    recorded_by=request.user, via=VIA,
                )  # fmt: skip
            except ValidationError as exc:
                form.add_error(None, exc)
            else:
                messages.success(request, "Your assessment was recorded.")
                return redirect(reverse("portal:image", args=[image.pk]) + "#feedback")
        return image_page(request, image, assessment_form=form, status=400)
    if kind == Feedback.Kind.HISTOPATHOLOGY:
        form = OutcomeForm(request.POST, auto_id=OUTCOME_IDS)
        if form.is_valid():
            feedback_services.record_outcome(
                image=image, diagnosis=form.cleaned_data["diagnosis"], note=form.cleaned_data["note"],
                recorded_by=request.user, via=VIA,
            )  # fmt: skip
            messages.success(request, "The histopathology outcome was recorded.")
            return redirect(reverse("portal:image", args=[image.pk]) + "#feedback")
        return image_page(request, image, outcome_form=form, status=400)
    return HttpResponseBadRequest("Unknown kind of feedback.")


@clinic_required
@require_GET
def history(request):
    form = HistoryFilterForm(request.GET or None)
    latest = Prediction.objects.filter(image=OuterRef("pk")).order_by("-created_at")
    queryset = (
        with_predictions(LesionImage.objects.for_clinic(request.clinic))
        .select_related("lesion__patient")
        .annotate(latest_probability=Subquery(latest.values("probability_malignant")[:1]),
                  latest_threshold=Subquery(latest.values("threshold")[:1]),
                  latest_decision=Subquery(latest.values("decision")[:1]))
        .order_by("-created_at")
    )  # fmt: skip
    if form.is_valid():
        data = form.cleaned_data
        if data["state"]:
            queryset = queryset.filter(state=data["state"])
        queryset = filter_by_band(queryset, data["band"])
        if data["date_from"]:
            queryset = queryset.filter(created_at__date__gte=data["date_from"])
        if data["date_to"]:
            queryset = queryset.filter(created_at__date__lte=data["date_to"])
    elif form.is_bound:
        queryset = queryset.none()
    page = Paginator(queryset, settings.PORTAL_PAGE_SIZE).get_page(request.GET.get("page"))
    record_event(actor=request.user, action=AuditEvent.Action.VIEW_HISTORY, clinic=request.clinic, via=VIA,
                 ip_address=client_ip(request))  # fmt: skip
    filters = request.GET.copy()
    filters.pop("page", None)
    rows = [{"image": image, "decision": result_of(image)} for image in page.object_list]
    return render(request, "portal/history.html", {"form": form, "page": page, "rows": rows,
                                                   "filters": filters.urlencode()},
                  status=400 if form.is_bound and not form.is_valid() else 200)  # fmt: skip


@clinic_required
def tokens(request):
    form = TokenForm(request.POST or None, request=request)
    created = None
    if request.method == "POST" and form.is_valid():
        token, plain = token_services.create_api_token(
            user=request.user, name=form.cleaned_data["name"], expires_in_days=form.cleaned_data["expires_in_days"],
            via=VIA,
        )  # fmt: skip
        created = {"token": token, "plain": plain}
        form = TokenForm(request=request)
    user_tokens = ApiToken.objects.filter(user=request.user).order_by("-created")
    status = 400 if request.method == "POST" and created is None else 200
    return render(request, "portal/tokens.html", {"form": form, "tokens": user_tokens, "created": created,
                                                  "now": timezone.now()}, status=status)  # fmt: skip


@clinic_required
@require_POST
def token_revoke(request, key):
    token = get_object_or_404(ApiToken, user=request.user, token_key=key)
    name = token.name
    token_services.revoke_api_token(token=token, actor=request.user, via=VIA)
    messages.success(request, f"Token '{name}' revoked. Systems using it can no longer call the API.")
    return redirect("portal:tokens")
