"""What the API's viewsets share: the client's address, id parameters, file responses, waiting for a
result (`?wait=N`, `Prefer: wait=N`) and their schema."""

from __future__ import annotations

import uuid

from django.utils.cache import patch_vary_headers
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.negotiation import BaseContentNegotiation

from ...client_address import client_ip
from ...models import ImageState
from ...request_wait import InvalidWait, WaitOption, hung_up_check, wait_option
from ...services import files as file_services
from ...services import status as status_services
from ...services import waiting
from ..errors import error_responses

VIA = "api"

PRESIGNED_REDIRECT = {
    302: OpenApiResponse(
        description="Only where the server sets MEDIA_PRESIGNED_REDIRECT: `Location` is a presigned URL of the file, "
        "valid for S3_PRESIGNED_URL_SECONDS (60 s by default). Do not forward the Authorization header to it."
    )
}


def uuid_param(name: str, value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValidationError({name: [f"{value!r} is not a valid id."]}) from None


def serve_file(request, download: file_services.Download):
    """A stored file, through the one implementation the portal uses too (services.files): audited, then a
    presigned redirect where the server allows it, else streamed; a missing file is a 404 saying so."""
    try:
        return file_services.serve(download, actor=request.user, via=VIA, ip_address=client_ip(request), presign=True)
    except file_services.FileUnavailable as exc:
        raise NotFound(str(exc)) from None


class JSONRefusals(BaseContentNegotiation):
    """For the events action, which streams its own text/event-stream: what DRF renders there (a
    refusal: 400, 401, 404, 429) is JSON, whatever the request's Accept header or ?format= asks for."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


# --- waiting for a result --------------------------------------------------------------------------------

WAITED = (
    "\n\nWith `?wait=N` or `Prefer: wait=N`, the request waits up to N seconds for the final state (`done` or "
    "`failed`) and is woken when the worker stores it. {answers} A server whose waiting requests are all taken "
    "answers at once, as without the option (no `Preference-Applied`)."
)
WAITED_GET = WAITED.format(answers="200 once final; 202 when the wait ended first.")


def waited_answers(serializer, *errors: int) -> dict:
    """The answers of a GET that may wait: 200, 202 (the same body, not final yet) and the errors."""
    return {
        200: serializer,
        202: OpenApiResponse(serializer, description="Asked to wait: not final when the wait ended."),
        **error_responses(*errors),
    }


WAIT_PARAMETERS = [
    OpenApiParameter(
        "wait", int, OpenApiParameter.QUERY, required=False,
        description="Seconds to wait for the result before answering, from 0 to RESULT_WAIT_MAX_SECONDS (30 by "
        "default; a larger value is a 400). The request is woken when the worker stores the result: no polling.",
    ),
    OpenApiParameter(
        "Prefer", str, OpenApiParameter.HEADER, required=False,
        description="`wait=N` (RFC 7240): the same as `?wait=N`, except that a value over the maximum is lowered "
        "to it. The answer says what was applied in `Preference-Applied: wait=N`.",
    ),
]  # fmt: skip


class ClientClosedRequest(APIException):
    status_code = 499  # nginx's code for it: nobody reads this answer
    default_detail = "The client closed the connection while its request waited."
    default_code = "client_closed_request"


def requested_wait(request) -> WaitOption:
    """The wait this request asks for; a 400 naming `wait` or `Prefer` when it is not valid."""
    try:
        return wait_option(request.query_params, request.headers)
    except InvalidWait as exc:
        raise ValidationError({exc.source: [str(exc)]}) from None


def wait_until(request, option: WaitOption, *, read, ready, ids):
    """services.waiting.wait_for for this request: its user's share of the waits, and a client that hangs
    up frees the thread (a 499 nobody reads). Returns (the last value read, whether it waited)."""
    try:
        return waiting.wait_for(read, ids=ids, seconds=option.seconds, ready=ready, user_id=request.user.pk,
                                gone=hung_up_check(request.META))  # fmt: skip
    except waiting.ClientGone:
        raise ClientClosedRequest from None


def answer_waited(response, option: WaitOption, *, waited: bool):
    """RFC 7240's answer headers: the applied wait when it was asked with Prefer, and Vary: Prefer."""
    if option.from_header and waited:
        response["Preference-Applied"] = f"wait={option.seconds}"
    patch_vary_headers(response, ["Prefer"])
    return response


def read_status(request, image_id) -> dict | None:
    """services.status.image_status for this request's user (audited as read through the API)."""
    return status_services.image_status(user=request.user, image_id=image_id, via=VIA, ip_address=client_ip(request))


def wait_for_image(request, option: WaitOption, image_id) -> tuple[dict | None, bool]:
    """One image's status once final, or when the wait ends: (the status, whether it waited)."""
    return wait_until(request, option, read=lambda: read_status(request, image_id), ready=status_services.is_final,
                      ids=[image_id])  # fmt: skip


def wait_for_accepted(request, option: WaitOption, accepted: list[dict]) -> tuple[bool, bool]:
    """A batch upload's accepted files (`{"id", ...}` each) once all are final, or when the wait ends: each
    gains its `state` and `prediction`. Returns (all final, whether it waited)."""
    ids = [item["id"] for item in accepted]

    def read() -> dict[str, dict]:
        return status_services.images_status(user=request.user, image_ids=ids, via=VIA, ip_address=client_ip(request))

    statuses, waited = wait_until(request, option, read=read, ids=ids,
                                  ready=lambda found: all(map(status_services.is_final, found.values())))  # fmt: skip
    for item in accepted:
        found = statuses.get(item["id"])  # gone meanwhile (erased): nothing more will come
        item.update(state=found["state"] if found else ImageState.FAILED,
                    prediction=found["prediction"] if found else None)  # fmt: skip
    return all(map(status_services.is_final, statuses.values())), waited
