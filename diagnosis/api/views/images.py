from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Prefetch
from django.http import HttpResponse, StreamingHttpResponse
from django.urls import reverse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, Throttled, ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from ...client_address import client_ip
from ...models import AuditEvent, ImageState, LesionImage, Prediction
from ...services import events as event_services
from ...services import explanations as explanation_services
from ...services import feedback as feedback_services
from ...services import files as file_services
from ...services import images as image_services
from ...services import status as status_services
from ...services.audit import record_event
from ...services.clinics import clinic_of
from ..errors import InvalidImage, RequestRefused, error_responses
from ..serializers import (
    BatchSerializer,
    BatchUploadSerializer,
    ExplanationRequestSerializer,
    ExplanationSerializer,
    FeedbackSerializer,
    ImageSerializer,
    ImageStatusSerializer,
    ImageUploadSerializer,
)
from ..throttling import UploadRateThrottle
from .common import (
    PRESIGNED_REDIRECT,
    VIA,
    WAIT_PARAMETERS,
    WAITED,
    WAITED_GET,
    JSONRefusals,
    answer_waited,
    read_status,
    requested_wait,
    serve_file,
    uuid_param,
    wait_for_accepted,
    wait_for_image,
    wait_until,
    waited_answers,
)


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
        description="`state` is `done` (then `prediction` is set) or `failed` (then `error` says why) once the "
        "model has run: wait for it with `?wait=N` rather than polling." + WAITED_GET,
        parameters=WAIT_PARAMETERS,
        responses=waited_answers(ImageSerializer, 400, 401, 403, 404),
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
        )
        + WAITED.format(
            answers="201 with the whole record (`prediction` set when done) once final; 202 as "
            "without the option when the wait ended first."
        ),
        parameters=[
            *WAIT_PARAMETERS,
            OpenApiParameter(
                "Idempotency-Key",
                str,
                OpenApiParameter.HEADER,
                required=False,
                description="1 to 200 letters, digits, '.', '_', ':' or '-'; reuse it only to retry the same file.",
            ),
        ],  # fmt: skip
        request={"multipart/form-data": ImageUploadSerializer},
        responses={
            201: OpenApiResponse(ImageSerializer, description="Asked to wait: the result was stored within the wait."),
            202: ImageSerializer,
            **error_responses(400, 401, 403, 409, 429, 503),
        },
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
            queryset = queryset.filter(lesion_id=uuid_param("lesion", lesion))
        if state := params.get("state"):
            if state not in ImageState.values:
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
        )
        + WAITED.format(
            answers="201 once every accepted file is final, each with its `state` and `prediction`; "
            "202 when the wait ended first (then with each file's `state` too)."
        ),
        parameters=WAIT_PARAMETERS,
        request={"multipart/form-data": BatchUploadSerializer},
        responses={
            201: OpenApiResponse(BatchSerializer, description="Asked to wait: every accepted file is final."),
            202: BatchSerializer,
            **error_responses(400, 401, 403, 429, 503),
        },
    )
    @action(detail=False, methods=["post"], url_path="batch", url_name="batch")
    def batch(self, request):
        option = requested_wait(request)  # before anything is stored
        body = BatchUploadSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        batch, accepted, rejected = image_services.submit_batch(
            uploader=request.user, clinic=clinic_of(request.user), uploads=body.validated_data["images"],
            lesion=body.validated_data.get("lesion"), via=VIA, quality_check=body.validated_data.get("check", ""),
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
        finished, waited = wait_for_accepted(request, option, data["accepted"]) if option.seconds else (False, False)
        code = status.HTTP_201_CREATED if finished else status.HTTP_202_ACCEPTED
        return answer_waited(Response(data, status=code, headers={"Location": status_url}), option, waited=waited)

    def create(self, request, *args, **kwargs):
        option = requested_wait(request)  # before anything is stored
        upload = ImageUploadSerializer(data=request.data, context={"request": request})
        upload.is_valid(raise_exception=True)
        try:
            image = image_services.submit_image(
                uploader=request.user,
                clinic=clinic_of(request.user),
                upload=upload.validated_data["image"],
                lesion=upload.validated_data.get("lesion"),
                via=VIA,
                idempotency_key=request.headers.get("Idempotency-Key", "").strip(),
                quality_check=upload.validated_data.get("check", ""),
            )
        except image_services.ImageValidationError as exc:
            raise InvalidImage(exc.code, exc.message) from None
        except image_services.IdempotencyConflict as exc:
            raise RequestRefused(str(exc), code="idempotency_key_reused", status_code=409) from None
        except image_services.UploadBusy as exc:
            raise RequestRefused(str(exc), code="server_busy", status_code=503, wait=exc.retry_after) from None
        headers = {"Idempotent-Replayed": "true"} if image.replayed else {}
        code, waited = status.HTTP_202_ACCEPTED, False
        if option.seconds:
            found, waited = wait_for_image(request, option, image.pk)
            if found is not None and status_services.is_final(found):
                code = status.HTTP_201_CREATED
        if image.replayed or waited:
            image = self.get_queryset().get(pk=image.pk)
        else:
            # Describe the upload as accepted (queued, no prediction), even if a fast worker has already
            # claimed it by now: the status URL is where progress is read.
            image._prefetched_objects_cache = {"predictions": Prediction.objects.none()}
        data = ImageSerializer(image, context={"request": request}).data
        response = Response(data, status=code, headers={"Location": data["status_url"], **headers})
        return answer_waited(response, option, waited=waited)

    @extend_schema(
        summary="Poll an upload's state: one indexed query",
        description=(
            "The state, the error in words when it failed, and the latest prediction once done, read with a "
            "single SQL statement (primary key, clinic and latest prediction together), for clients that poll. "
            "Reading a finished result is written to the audit log, as for the full record."
        )
        + WAITED_GET,
        parameters=WAIT_PARAMETERS,
        responses=waited_answers(ImageStatusSerializer, 400, 401, 403, 404),
    )
    @action(detail=True, methods=["get"], url_path="status", url_name="status")
    def image_status(self, request, pk=None):
        option = requested_wait(request)
        data, waited = wait_for_image(request, option, uuid_param("id", str(pk)))
        if data is None:
            raise NotFound(status_services.NO_SUCH_IMAGE)
        final = status_services.is_final(data)
        response = Response(ImageStatusSerializer(data).data, status=202 if option.seconds and not final else 200)
        response["Cache-Control"] = "no-store"
        return answer_waited(response, option, waited=waited)

    @extend_schema(
        summary="Follow an upload's state as server-sent events",
        description=(
            "A `text/event-stream` for clients that would rather be told than poll. `event: status` carries the "
            "same JSON as `GET .../status/`: at once, then each time it changes. `event: end` follows the final "
            "state (`done` or `failed`); `event: timeout` closes a stream that saw none within "
            "`STATUS_STREAM_SECONDS` (reconnect, or poll). The server reads the state with the status endpoint's "
            "single statement when the worker notifies it of a change, never on a timer. Each web process serves "
            "at most "
            "`STATUS_STREAM_MAX` streams at once, `STATUS_STREAM_MAX_PER_USER` of them to one user; beyond that the "
            "answer is 429 with `Retry-After`. A comment "
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
        if request.headers.get("Last-Event-ID") == event_services.END_EVENT_ID:
            # A browser's EventSource reconnects by itself after a stream closes; the `end` event's id
            # comes back with it, and 204 is what tells it to stop.
            return HttpResponse(status=204)
        image_id = uuid_param("id", str(pk))
        try:
            stream = event_services.open_status_stream(
                image_id=image_id,
                read=lambda: read_status(request, image_id),
                present=lambda data: ImageStatusSerializer(data).data,
                user_id=request.user.pk,
            )
        except event_services.StreamsBusy:
            raise Throttled(wait=5, detail="Too many status streams are open on this server; poll GET .../status/ "
                                           "or try again in a few seconds.") from None  # fmt: skip
        if stream is None:  # a 404 comes before any stream starts
            raise NotFound(status_services.NO_SUCH_IMAGE)
        # Django closes the stream when the response is closed, which gives its slot back.
        response = StreamingHttpResponse(stream, content_type="text/event-stream")
        response["Cache-Control"] = "no-store"
        response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response

    def retrieve(self, request, *args, **kwargs):
        option = requested_wait(request)
        image = self.get_object()
        waited = False
        if option.seconds and image.state not in status_services.FINAL_STATES:
            _, waited = wait_until(
                request, option, ids=[image.pk], ready=lambda state: state in (None, *status_services.FINAL_STATES),
                read=lambda: LesionImage.objects.filter(pk=image.pk).values_list("state", flat=True).first(),
            )  # fmt: skip
            image = self.get_object()
        final = image.state in status_services.FINAL_STATES
        if image.state == ImageState.DONE:
            record_event(
                actor=request.user,
                action=AuditEvent.Action.VIEW_IMAGE,
                obj=image,
                via=VIA,
                ip_address=client_ip(request),
            )
        response = Response(self.get_serializer(image).data, status=202 if option.seconds and not final else 200)
        return answer_waited(response, option, waited=waited)

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
        return serve_file(request, file_services.image_download(self.get_object()))

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
            "method, bad parameters or a cost over the budget; 409 while the image has no prediction or already "
            "has EXPLAIN_MAX_PER_IMAGE requested explanations; 429 (with Retry-After) over EXPLAIN_RATE_LIMIT or "
            "with EXPLAIN_MAX_PENDING_PER_USER of the user's explanations still waiting."
        ),
        request=ExplanationRequestSerializer,
        responses={
            200: ExplanationSerializer,
            202: ExplanationSerializer,
            **error_responses(400, 401, 403, 404, 409, 429),
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
                target=body.validated_data.get("target"), requested_by=request.user, via=VIA,
            )  # fmt: skip
        except explanation_services.ExplanationRefused as exc:
            raise RequestRefused(
                exc.reason, code=exc.error_code, status_code=exc.status, wait=exc.retry_after
            ) from None
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
        summary="Record an assessment (agree or disagree), feedback on the photo, or a histopathology outcome",
        description=(
            '`{"kind": "assessment", "agrees": false, "note": "..."}` or `{"kind": "photo", "photo_was_fine": true}` '
            '(on the quality gate\'s verdict) once the image is done, or `{"kind": "histopathology", "diagnosis": '
            '"melanoma"}` at any time. Records are append-only; the newest of each kind is the image\'s ground truth '
            "for monitoring and the quality gate's calibration report."
        ),
        request=FeedbackSerializer,
        responses={201: FeedbackSerializer, **error_responses(400, 401, 403, 404, 409)},
    )
    @action(detail=True, methods=["get", "post"], url_path="feedback", url_name="feedback", pagination_class=None)
    def feedback(self, request, pk=None):
        image = self.get_object()
        if request.method == "GET":
            records = image.feedback.select_related("recorded_by", "prediction__model_version")
            return Response(FeedbackSerializer(records, many=True).data)
        body = FeedbackSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        who = {"image": image, "note": data.get("note", ""), "recorded_by": request.user, "via": VIA}
        try:
            if data["kind"] == "assessment":
                record = feedback_services.record_assessment(agrees=data["agrees"], **who)
            elif data["kind"] == "photo":
                record = feedback_services.record_photo_feedback(photo_was_fine=data["photo_was_fine"], **who)
            else:
                record = feedback_services.record_outcome(diagnosis=data["diagnosis"], **who)
        except DjangoValidationError as exc:
            raise RequestRefused(" ".join(exc.messages), code="no_prediction", status_code=409) from None
        return Response(FeedbackSerializer(record).data, status=status.HTTP_201_CREATED)
