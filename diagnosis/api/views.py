from __future__ import annotations

import threading

from django.conf import settings
from django.db.models import Count, Prefetch
from django.http import FileResponse, HttpResponse
from django.urls import reverse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from ..models import (
    DISCLAIMER,
    AuditEvent,
    Explanation,
    ImageState,
    Lesion,
    LesionImage,
    Patient,
    Prediction,
    UploadBatch,
)
from ..services import explanations as explanation_services
from ..services import feedback as feedback_services
from ..services import images as image_services
from ..services import patients as patient_services
from ..services.audit import record_event
from ..services.clinics import clinic_of
from .errors import InvalidImage, RequestRefused, error_responses
from .serializers import (
    BatchSerializer,
    BatchStatusSerializer,
    BatchUploadSerializer,
    ExplanationRequestSerializer,
    ExplanationSerializer,
    FeedbackSerializer,
    ImageSerializer,
    ImageStatusSerializer,
    ImageUploadSerializer,
    LesionSerializer,
    PatientSerializer,
)
from .throttling import UploadRateThrottle

# Status streams this process serves at once: each holds a gunicorn thread while it lasts.
_STREAMS = threading.BoundedSemaphore(max(1, settings.STATUS_STREAM_MAX))
STREAM_PING_SECONDS = 5.0  # a comment line when nothing else was sent for this long


class _Closing:
    """An iterator over `items` whose close() also calls `on_close`."""

    def __init__(self, items, on_close) -> None:
        self.items, self.on_close = items, on_close

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.items)

    def close(self) -> None:
        try:
            self.items.close()
        finally:
            self.on_close()

    def __del__(self) -> None:  # dropped without close(): the slot is still given back
        self.on_close()


class JSONRefusals(BaseContentNegotiation):
    """For the events action, which streams its own text/event-stream: what DRF renders there (a
    refusal: 400, 401, 404, 429) is JSON, whatever the request's Accept header or ?format= asks for."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


def client_ip(request) -> str | None:
    return request.META.get("REMOTE_ADDR")


PRESIGNED_REDIRECT = {
    302: OpenApiResponse(
        description="Only where the server sets MEDIA_PRESIGNED_REDIRECT: `Location` is a presigned URL of the file, "
        "valid for S3_PRESIGNED_URL_SECONDS (60 s by default). Do not forward the Authorization header to it."
    )
}


def presigned_redirect(stored, *, filename: str, content_type: str, as_attachment: bool):
    """With MEDIA_PRESIGNED_REDIRECT on a bucket: a 302 to a signed URL valid for S3_PRESIGNED_URL_SECONDS
    whose answer carries these headers; else None (the view streams the file). Call it only after the
    clinic check and the audit record: the URL itself is the permission."""
    from django.conf import settings
    from django.http import HttpResponseRedirect

    if not settings.MEDIA_PRESIGNED_REDIRECT or not getattr(stored.storage, "querystring_auth", False):
        return None
    disposition = "attachment" if as_attachment else "inline"
    url = stored.storage.url(
        stored.name,
        expire=settings.S3_PRESIGNED_URL_SECONDS,
        parameters={
            "ResponseContentType": content_type,
            "ResponseContentDisposition": f'{disposition}; filename="{filename}"',
            "ResponseCacheControl": "private, no-store",
        },
    )
    response = HttpResponseRedirect(url)
    response["Cache-Control"] = "private, no-store"
    response["Referrer-Policy"] = "no-referrer"
    return response


@extend_schema_view(
    list=extend_schema(
        summary="List your clinic's patients",
        parameters=[OpenApiParameter("reference", str, description="Only references starting with this text")],
        responses={200: PatientSerializer(many=True), **error_responses(400, 401, 403)},
    ),
    retrieve=extend_schema(summary="One patient", responses={200: PatientSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(
        summary="Create a patient under a pseudonymous reference",
        responses={201: PatientSerializer, **error_responses(400, 401, 403)},
    ),
)
class PatientViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    serializer_class = PatientSerializer

    def get_queryset(self):
        queryset = Patient.objects.visible_to(self.request.user).annotate(lesion_count=Count("lesions"))
        reference = self.request.query_params.get("reference")
        if reference:
            if not reference.isprintable():
                from rest_framework.exceptions import ValidationError

                raise ValidationError({"reference": ["The search text contains control characters."]})
            queryset = queryset.filter(reference__istartswith=reference)
        return queryset

    def perform_create(self, serializer):
        serializer.instance = patient_services.create_patient(
            clinic=clinic_of(self.request.user),
            reference=serializer.validated_data["reference"],
            created_by=self.request.user,
            via="api",
        )
        serializer.instance.lesion_count = 0

    def retrieve(self, request, *args, **kwargs):
        patient = self.get_object()
        record_event(
            actor=request.user,
            action=AuditEvent.Action.VIEW_PATIENT,
            obj=patient,
            via="api",
            ip_address=client_ip(request),
        )
        return Response(self.get_serializer(patient).data)


@extend_schema_view(
    list=extend_schema(
        summary="List your clinic's lesions",
        parameters=[OpenApiParameter("patient", str, description="Only this patient's lesions (patient id)")],
        responses={200: LesionSerializer(many=True), **error_responses(400, 401, 403)},
    ),
    retrieve=extend_schema(summary="One lesion", responses={200: LesionSerializer, **error_responses(401, 403, 404)}),
    create=extend_schema(
        summary="Add a lesion to a patient", responses={201: LesionSerializer, **error_responses(400, 401, 403)}
    ),
)
class LesionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    serializer_class = LesionSerializer

    def get_queryset(self):
        queryset = (
            Lesion.objects.visible_to(self.request.user).select_related("patient").annotate(image_count=Count("images"))
        )
        patient = self.request.query_params.get("patient")
        if patient:
            queryset = queryset.filter(patient_id=_uuid_param("patient", patient))
        return queryset

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = patient_services.create_lesion(
            patient=data["patient"],
            body_site=data["body_site"],
            note=data.get("note", ""),
            created_by=self.request.user,
            via="api",
        )
        serializer.instance.image_count = 0


def _uuid_param(name: str, value: str):
    import uuid

    from rest_framework.exceptions import ValidationError

    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationError({name: [f"{value!r} is not a valid id."]}) from None


@extend_schema_view(
    list=extend_schema(
        summary="List your clinic's images, newest first",
        parameters=[
            OpenApiParameter("lesion", str, description="Only this lesion's images (lesion id)"),
            OpenApiParameter("state", str, enum=[s.value for s in ImageState], description="Only images in this state"),
        ],
        responses={200: ImageSerializer(many=True), **error_responses(400, 401, 403)},
    ),
    retrieve=extend_schema(
        summary="An image's status and result (the status URL)",
        description="Poll until `state` is `done` (then `prediction` is set) or `failed` (then `error` says why).",
        responses={200: ImageSerializer, **error_responses(401, 403, 404)},
    ),
    create=extend_schema(
        summary="Upload a lesion photo for triage",
        description=(
            "Multipart upload with the field `image` (JPEG, PNG or WebP) and optionally `lesion`. "
            "The photo is validated, its metadata (EXIF, GPS) is removed, and it is queued for the model. "
            "Answers 202 with the image's id, `state: queued` and the `status_url` to poll.\n\n"
            "Send an `Idempotency-Key` header (e.g. a UUID) to make retries safe: a retry with the same key "
            "returns the image stored the first time (with `Idempotent-Replayed: true`) instead of a second one. "
            "Uploads are rate-limited per user (429 with `Retry-After`)."
        ),
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                required=False,
                description="1 to 200 letters, digits, '.', '_', ':' or '-'; reuse it only to retry the same file.",
            )
        ],  # fmt: skip
        request={"multipart/form-data": ImageUploadSerializer},
        responses={202: ImageSerializer, **error_responses(400, 401, 403, 409, 429, 503)},
    ),
)
class ImageViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet):
    serializer_class = ImageSerializer

    def get_queryset(self):
        queryset = LesionImage.objects.visible_to(self.request.user).prefetch_related(
            Prefetch("predictions", queryset=Prediction.objects.select_related("model_version"))
        )
        params = self.request.query_params
        if lesion := params.get("lesion"):
            queryset = queryset.filter(lesion_id=_uuid_param("lesion", lesion))
        if state := params.get("state"):
            if state not in ImageState.values:
                from rest_framework.exceptions import ValidationError

                raise ValidationError(
                    {"state": [f"Unknown state {state!r}; use one of {', '.join(ImageState.values)}."]}
                )
            queryset = queryset.filter(state=state)
        return queryset

    def get_serializer_class(self):
        return ImageUploadSerializer if self.action == "create" else ImageSerializer

    def get_throttles(self):
        throttles = super().get_throttles()
        if self.action in ("create", "batch"):
            throttles.append(UploadRateThrottle())
        return throttles

    @extend_schema(
        summary="Upload several photos in one request",
        description=(
            "Multipart with the field `images` repeated once per file (at most MAX_BATCH_FILES, 100 by default) "
            "and optionally `lesion`. Each file is validated on its own: the valid ones are accepted and queued "
            "exactly like single uploads, each invalid one is listed in `rejected` with its error. Answers 202 "
            "when at least one file was accepted, 400 when none was. Follow the batch at its `status_url`."
        ),
        request={"multipart/form-data": BatchUploadSerializer},
        responses={202: BatchSerializer, **error_responses(400, 401, 403, 429, 503)},
    )
    @action(detail=False, methods=["post"], url_path="batch", url_name="batch")
    def batch(self, request):
        body = BatchUploadSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        batch, accepted, rejected = image_services.submit_batch(
            uploader=request.user, clinic=clinic_of(request.user), uploads=body.validated_data["images"],
            lesion=body.validated_data.get("lesion"), via="api",
        )  # fmt: skip
        status_url = request.build_absolute_uri(reverse("api:batch-detail", kwargs={"pk": batch.pk}))
        data = {
            "id": str(batch.pk), "status_url": status_url, "submitted": batch.submitted,
            "accepted": [
                {"position": position, "id": str(image.pk),
                 "status_url": request.build_absolute_uri(reverse("api:image-detail", kwargs={"pk": image.pk}))}
                for position, image in accepted
            ],
            "rejected": batch.rejected,
        }  # fmt: skip
        if not accepted:
            return Response({"detail": f"None of the {batch.submitted} files was accepted; see `rejected`.",
                             "code": "no_valid_file", **data}, status=status.HTTP_400_BAD_REQUEST)  # fmt: skip
        return Response(data, status=status.HTTP_202_ACCEPTED, headers={"Location": status_url})

    def create(self, request, *args, **kwargs):
        upload = ImageUploadSerializer(data=request.data, context={"request": request})
        upload.is_valid(raise_exception=True)
        try:
            image = image_services.submit_image(
                uploader=request.user,
                clinic=clinic_of(request.user),
                upload=upload.validated_data["image"],
                lesion=upload.validated_data.get("lesion"),
                via="api",
                idempotency_key=request.headers.get("Idempotency-Key", "").strip(),
            )
        except image_services.ImageValidationError as exc:
            raise InvalidImage(exc.code, exc.message) from None
        except image_services.IdempotencyConflict as exc:
            raise RequestRefused(str(exc), code="idempotency_key_reused", status_code=409) from None
        if image.replayed:
            image = self.get_queryset().get(pk=image.pk)
            data = ImageSerializer(image, context={"request": request}).data
            return Response(data, status=status.HTTP_202_ACCEPTED,
                            headers={"Location": data["status_url"], "Idempotent-Replayed": "true"})  # fmt: skip
        # Describe the upload as accepted (queued, no prediction), even if a fast worker has already
        # claimed it by now: the status URL is where progress is read.
        image._prefetched_objects_cache = {"predictions": Prediction.objects.none()}
        data = ImageSerializer(image, context={"request": request}).data
        return Response(data, status=status.HTTP_202_ACCEPTED, headers={"Location": data["status_url"]})

    @extend_schema(
        summary="Poll an upload's state: one indexed query",
        description=(
            "The state, the error in words when it failed, and the latest prediction once done, read with a "
            "single SQL statement (primary key, clinic and latest prediction together), for clients that poll. "
            "Reading a finished result is written to the audit log, as for the full record."
        ),
        responses={200: ImageStatusSerializer, **error_responses(400, 401, 403, 404)},
    )
    @action(detail=True, methods=["get"], url_path="status", url_name="status")
    def image_status(self, request, pk=None):
        response = Response(ImageStatusSerializer(self._status(request, pk)).data)
        response["Cache-Control"] = "no-store"
        return response

    @extend_schema(
        summary="Follow an upload's state as server-sent events",
        description=(
            "A `text/event-stream` for clients that would rather be told than poll. `event: status` carries the "
            "same JSON as `GET .../status/`: at once, then each time it changes. `event: end` follows the final "
            "state (`done` or `failed`); `event: timeout` closes a stream that saw none within "
            "`STATUS_STREAM_SECONDS` (reconnect, or poll). The server reads the state with the status endpoint's "
            "single statement every `STATUS_STREAM_INTERVAL_MS`. Each web process serves at most "
            "`STATUS_STREAM_MAX` streams at once; beyond that the answer is 429 with `Retry-After`. A comment "
            "line (`: ping`) keeps a quiet stream alive. The `end` event has the id `end`: a browser's EventSource "
            "reconnecting with `Last-Event-ID: end` gets 204 and stops."
        ),
        responses={
            (200, "text/event-stream"): OpenApiResponse(description="`event: status`, then `end` or `timeout`"),
            204: OpenApiResponse(description="Sent `Last-Event-ID: end`: the stream had ended (stops EventSource)"),
            **error_responses(400, 401, 403, 404, 429),
        },
    )
    @action(detail=True, methods=["get"], url_path="events", url_name="events",
            renderer_classes=[JSONRenderer], content_negotiation_class=JSONRefusals)  # fmt: skip
    def image_events(self, request, pk=None):
        import json
        import time

        from django.core.serializers.json import DjangoJSONEncoder
        from django.http import StreamingHttpResponse

        if request.headers.get("Last-Event-ID") == "end":
            # A browser's EventSource reconnects by itself after a stream closes; the `end` event's id
            # comes back with it, and 204 is what tells it to stop.
            return HttpResponse(status=204)
        if settings.STATUS_STREAM_MAX <= 0 or not _STREAMS.acquire(blocking=False):
            from rest_framework.exceptions import Throttled

            raise Throttled(wait=5, detail="Too many status streams are open on this server; poll GET .../status/ "
                                           "or try again in a few seconds.")  # fmt: skip
        released = threading.Event()

        def release() -> None:  # once, whichever comes first: the stream's end or the client leaving
            if not released.is_set():
                released.set()
                _STREAMS.release()

        try:
            first = self._status(request, pk)  # a 404 or 400 comes before any stream starts
        except BaseException:
            release()
            raise

        def event(name: str, data: dict, *, event_id: str = "") -> str:
            ident = f"id: {event_id}\n" if event_id else ""
            return f"event: {name}\n{ident}data: {json.dumps(data, cls=DjangoJSONEncoder)}\n\n"

        def stream():
            from django.db import DatabaseError
            from rest_framework.exceptions import APIException

            try:
                data, sent, last_write = first, None, time.monotonic()
                deadline = time.monotonic() + settings.STATUS_STREAM_SECONDS
                while True:
                    if data != sent:
                        yield event("status", ImageStatusSerializer(data).data)
                        sent, last_write = data, time.monotonic()
                    if data["state"] in (ImageState.DONE, ImageState.FAILED):
                        yield event("end", {"state": data["state"]}, event_id="end")
                        return
                    if time.monotonic() >= deadline:
                        yield event("timeout", {"state": data["state"]})
                        return
                    if time.monotonic() - last_write >= STREAM_PING_SECONDS:
                        yield ": ping\n\n"  # a client that went away is noticed here, not at the deadline
                        last_write = time.monotonic()
                    time.sleep(settings.STATUS_STREAM_INTERVAL_MS / 1000)
                    try:
                        data = self._status(request, pk)
                    except APIException as exc:  # deleted meanwhile (retention), or access withdrawn
                        yield event("error", {"detail": str(exc.detail), "code": exc.get_codes()})
                        return
                    except DatabaseError:
                        yield event(
                            "error",
                            {
                                "detail": "The database is temporarily unavailable; reconnect or poll GET .../status/.",
                                "code": "service_unavailable",
                            },
                        )
                        return
            finally:
                release()

        # Django closes the content when the response is closed, also when the client left before the
        # first event (a generator that never started would not run its finally).
        response = StreamingHttpResponse(_Closing(stream(), release), content_type="text/event-stream")
        response["Cache-Control"] = "no-store"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response

    def _status(self, request, pk) -> dict:
        """The status of one image of the requester's clinic, read with one indexed statement. Reading a
        finished result is written to the audit log."""
        from django.db.models import OuterRef, Subquery

        from ..models import ClinicMembership

        image_id = _uuid_param("id", str(pk))
        latest = Prediction.objects.filter(image=OuterRef("pk")).order_by("-created_at")
        row = (
            LesionImage.objects.filter(
                pk=image_id, clinic_id__in=ClinicMembership.objects.filter(user=request.user).values("clinic_id")
            )
            .annotate(**{
                name: Subquery(latest.values(field)[:1])
                for name, field in (("p", "probability_malignant"), ("label", "label"), ("threshold", "threshold"),
                                    ("version", "model_version__version"))
            })
            .values("pk", "clinic_id", "state", "error", "processed_at", "p", "label", "threshold", "version")
            .first()
        )  # fmt: skip
        if row is None:
            from rest_framework.exceptions import NotFound

            raise NotFound("No image with this id in your clinic.")
        done = row["state"] == ImageState.DONE and row["p"] is not None
        if done:
            from ..models import Clinic

            record_event(actor=request.user, action=AuditEvent.Action.VIEW_IMAGE, obj=LesionImage(pk=row["pk"]),
                         clinic=Clinic(pk=row["clinic_id"]), via="api", ip_address=client_ip(request))  # fmt: skip
        data = {
            "id": str(row["pk"]), "state": row["state"],
            "error": row["error"] if row["state"] == ImageState.FAILED else "",
            "processed_at": row["processed_at"],
            "prediction": {
                "probability_malignant": row["p"], "label": row["label"], "threshold": row["threshold"],
                "above_threshold": row["p"] >= row["threshold"], "model_version": row["version"],
            } if done else None,
            "disclaimer": DISCLAIMER,
        }  # fmt: skip
        return data

    def retrieve(self, request, *args, **kwargs):
        image = self.get_object()
        if image.state == ImageState.DONE:
            record_event(
                actor=request.user,
                action=AuditEvent.Action.VIEW_IMAGE,
                obj=image,
                via="api",
                ip_address=client_ip(request),
            )
        return Response(self.get_serializer(image).data)

    @extend_schema(
        summary="Download the stored photo",
        description=(
            "The photo as stored: the client's own compressed pixels with every metadata block removed (a valid "
            "colour profile and the EXIF orientation tag stay, so it displays upright). Served as an attachment."
        ),
        responses={
            (200, "image/jpeg"): OpenApiResponse(description="The photo (JPEG or PNG)."),
            **PRESIGNED_REDIRECT,
            **error_responses(401, 403, 404),
        },
    )
    @action(detail=True, methods=["get"], url_path="file", url_name="file")
    def file(self, request, pk=None):
        from rest_framework.exceptions import NotFound

        image = self.get_object()
        try:
            handle = image.file.open("rb")
        except FileNotFoundError:
            raise NotFound("The stored file of this image is missing.") from None
        record_event(actor=request.user, action=AuditEvent.Action.DOWNLOAD_IMAGE, obj=image, via="api",
                     ip_address=client_ip(request))  # fmt: skip
        extension = "jpg" if image.content_type == "image/jpeg" else "png"
        filename = f"lesion-image-{image.pk}.{extension}"
        redirect = presigned_redirect(image.file, filename=filename, content_type=image.content_type,
                                      as_attachment=True)  # fmt: skip
        if redirect is not None:
            handle.close()
            return redirect
        response = FileResponse(handle, as_attachment=True, filename=filename, content_type=image.content_type)
        response["X-Content-Type-Options"] = "nosniff"
        response["Cache-Control"] = "private, no-store"
        return response

    @extend_schema(
        methods=["GET"],
        summary="List an image's explanations",
        responses={200: ExplanationSerializer(many=True), **error_responses(401, 403, 404)},
    )
    @extend_schema(
        methods=["POST"],
        summary="Request an explanation (heatmap) of the image's prediction",
        description=(
            "Answers 202 with the new explanation and its status URL, or 200 with the stored one when an identical "
            "request (method, canonical parameters, target, model version) was made before. 400 for an unknown "
            "method, bad parameters or a cost over the budget; 409 while the image has no prediction."
        ),
        request=ExplanationRequestSerializer,
        responses={
            200: ExplanationSerializer,
            202: ExplanationSerializer,
            **error_responses(400, 401, 403, 404, 409),
        },
    )
    @action(
        detail=True, methods=["get", "post"], url_path="explanations", url_name="explanations", pagination_class=None
    )
    def explanations(self, request, pk=None):
        image = self.get_object()
        if request.method == "GET":
            explanations = image.explanations.select_related("model_version").order_by("created_at")
            return Response(ExplanationSerializer(explanations, many=True, context={"request": request}).data)
        body = ExplanationRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            explanation, created = explanation_services.request_explanation(
                image=image, method=body.validated_data["method"], params=body.validated_data.get("params"),
                target=body.validated_data.get("target"), requested_by=request.user, via="api",
            )  # fmt: skip
        except explanation_services.ExplanationRefused as exc:
            raise RequestRefused(exc.reason, code=exc.error_code, status_code=exc.status) from None
        data = ExplanationSerializer(explanation, context={"request": request}).data
        return Response(
            data,
            status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK,
            headers={"Location": data["status_url"]},
        )

    @extend_schema(
        methods=["GET"],
        summary="List the clinicians' assessments and histopathology outcomes recorded for an image",
        responses={200: FeedbackSerializer(many=True), **error_responses(401, 403, 404)},
    )
    @extend_schema(
        methods=["POST"],
        summary="Record an assessment (agree or disagree) or a histopathology outcome",
        description=(
            '`{"kind": "assessment", "agrees": false, "note": "..."}` once the image is done, or '
            '`{"kind": "histopathology", "diagnosis": "melanoma"}` at any time. Records are append-only; the '
            "newest of each kind is the image's ground truth for monitoring."
        ),
        request=FeedbackSerializer,
        responses={201: FeedbackSerializer, **error_responses(400, 401, 403, 404, 409)},
    )
    @action(detail=True, methods=["get", "post"], url_path="feedback", url_name="feedback", pagination_class=None)
    def feedback(self, request, pk=None):
        from django.core.exceptions import ValidationError as DjangoValidationError

        image = self.get_object()
        if request.method == "GET":
            records = image.feedback.select_related("recorded_by", "prediction__model_version")
            return Response(FeedbackSerializer(records, many=True).data)
        body = FeedbackSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            if data["kind"] == "assessment":
                record = feedback_services.record_assessment(
                    image=image, agrees=data["agrees"], note=data.get("note", ""), recorded_by=request.user, via="api"
                )
            else:
                record = feedback_services.record_outcome(
                    image=image, diagnosis=data["diagnosis"], note=data.get("note", ""), recorded_by=request.user,
                    via="api",
                )  # fmt: skip
        except DjangoValidationError as exc:
            raise RequestRefused(" ".join(exc.messages), code="no_prediction", status_code=409) from None
        return Response(FeedbackSerializer(record).data, status=status.HTTP_201_CREATED)


@extend_schema_view(
    retrieve=extend_schema(
        summary="A batch's progress: its images by state, and the files it refused",
        responses={200: BatchStatusSerializer, **error_responses(401, 403, 404)},
    )
)
class BatchViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = BatchStatusSerializer

    def get_queryset(self):
        return UploadBatch.objects.visible_to(self.request.user)

    def retrieve(self, request, *args, **kwargs):
        batch = self.get_object()
        images = list(batch.images.order_by("created_at").values_list("pk", "state"))
        states = {state: 0 for state in ImageState.values}
        for _, state in images:
            states[state] += 1
        return Response({
            "id": str(batch.pk), "created_at": batch.created_at, "submitted": batch.submitted,
            "accepted": len(images), "rejected": batch.rejected, "states": states,
            "finished": states[ImageState.QUEUED] == states[ImageState.PROCESSING] == 0,
            "images": [
                {"id": str(pk), "state": state,
                 "status_url": request.build_absolute_uri(reverse("api:image-detail", kwargs={"pk": pk}))}
                for pk, state in images
            ],
        })  # fmt: skip


EXPLANATION_FILES = {
    "overlay": ("overlay", None, None),  # JPEG (PNG if drawn by an older release): from the stored name
    "heatmap": ("heatmap", None, None),
    "attribution": ("attribution", "application/octet-stream", "npy"),
}


@extend_schema_view(
    retrieve=extend_schema(
        summary="An explanation's state and file links (its status URL)",
        responses={200: ExplanationSerializer, **error_responses(401, 403, 404)},
    )
)
class ExplanationViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = ExplanationSerializer

    def get_queryset(self):
        clinic = clinic_of(self.request.user)
        return Explanation.objects.filter(image__clinic=clinic).select_related("model_version", "image")

    def _file(self, request, kind: str):
        from rest_framework.exceptions import NotFound

        explanation = self.get_object()
        field, content_type, extension = EXPLANATION_FILES[kind]
        stored = getattr(explanation, field)
        if explanation.state != Explanation.State.DONE or not stored:
            raise NotFound("This explanation has no files yet.")
        if content_type is None:
            content_type, extension = explanation_services.picture_type(stored.name)
        try:
            handle = stored.open("rb")
        except FileNotFoundError:
            raise NotFound("The stored file of this explanation is missing.") from None
        record_event(actor=request.user, action=AuditEvent.Action.VIEW_EXPLANATION, obj=explanation,
                     clinic=explanation.image.clinic, via="api", ip_address=client_ip(request))  # fmt: skip
        filename = f"{explanation.method}-{explanation.pk}-{kind}.{extension}"
        redirect = presigned_redirect(stored, filename=filename, content_type=content_type,
                                      as_attachment=kind == "attribution")  # fmt: skip
        if redirect is not None:
            handle.close()
            return redirect
        response = FileResponse(handle, content_type=content_type, as_attachment=kind == "attribution",
                                filename=filename)  # fmt: skip
        response["X-Content-Type-Options"] = "nosniff"
        response["Cache-Control"] = "private, no-store"
        return response

    @extend_schema(
        summary="The heatmap over the photo, with a legend (JPEG)",
        responses={
            (200, "image/jpeg"): OpenApiResponse(description="JPEG; PNG for overlays drawn by earlier versions"),
            **PRESIGNED_REDIRECT,
            **error_responses(401, 403, 404),
        },
    )
    @action(detail=True, methods=["get"], url_path="overlay", url_name="overlay")
    def overlay(self, request, pk=None):
        return self._file(request, "overlay")

    @extend_schema(
        summary="The heatmap alone, transparent where evidence is weak (PNG)",
        responses={
            (200, "image/png"): OpenApiResponse(description="PNG"),
            **PRESIGNED_REDIRECT,
            **error_responses(401, 403, 404),
        },
    )
    @action(detail=True, methods=["get"], url_path="heatmap", url_name="heatmap")
    def heatmap(self, request, pk=None):
        return self._file(request, "heatmap")

    @extend_schema(
        summary="The raw attribution as a float16 NumPy .npy file",
        description="Shape (3, S, S) for pixel methods and (S, S) for Grad-CAM, S being the model's input size.",
        responses={
            (200, "application/octet-stream"): OpenApiResponse(description=".npy"),
            **PRESIGNED_REDIRECT,
            **error_responses(401, 403, 404),
        },
    )
    @action(detail=True, methods=["get"], url_path="attribution", url_name="attribution")
    def attribution(self, request, pk=None):
        return self._file(request, "attribution")
