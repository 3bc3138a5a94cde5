"""One JSON error shape for every API failure: {"detail": ..., "code": ..., "errors": {...}}."""

from __future__ import annotations

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.http import Http404, JsonResponse
from drf_spectacular.utils import OpenApiResponse
from rest_framework import exceptions, serializers, status
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="What went wrong, in words.")
    code = serializers.CharField(help_text="A stable machine-readable code, e.g. truncated_image or not_found.")
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="Messages per field, for validation errors.",
    )


class InvalidImage(exceptions.APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid_image"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(detail=message, code=code)
        self.image_code = code
        self.message = message


class ServiceUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "The service is temporarily unavailable. Try again shortly."
    default_code = "service_unavailable"


def _flatten(detail) -> dict[str, list[str]]:
    if isinstance(detail, dict):
        return {
            str(field): [str(item) for item in (messages if isinstance(messages, list) else [messages])]
            for field, messages in detail.items()
        }
    if isinstance(detail, list):
        return {"non_field_errors": [str(item) for item in detail]}
    return {"non_field_errors": [str(detail)]}


def exception_handler(exc, context):
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(
            exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        )
    elif isinstance(exc, (OperationalError, InterfaceError)):
        logger.error("database unavailable: %s", exc)
        exc = ServiceUnavailable("The database is temporarily unavailable. Try again shortly.")
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound("Not found.")
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()

    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, InvalidImage):
        body = {"detail": exc.message, "code": exc.image_code, "errors": {"image": [exc.message]}}
    elif isinstance(exc, exceptions.ValidationError):
        errors = _flatten(exc.detail)
        first_field, first_messages = next(iter(errors.items()))
        summary = first_messages[0] if first_field == "non_field_errors" else f"{first_field}: {first_messages[0]}"
        body = {"detail": summary, "code": "invalid", "errors": errors}
    else:
        detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
        codes = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
        body = {"detail": str(detail), "code": codes if isinstance(codes, str) else "error"}
    response.data = body
    return response


def json_not_found(request, exception=None):
    return JsonResponse({"detail": "Not found.", "code": "not_found"}, status=404)


def json_server_error(request):
    return JsonResponse({"detail": "Internal server error.", "code": "server_error"}, status=500)


def error_responses(*codes: int) -> dict:
    """Schema entries for the error responses an endpoint can give."""
    descriptions = {
        400: "Invalid input; `errors` names each bad field.",
        401: "Missing, invalid, expired or revoked token.",
        403: "The account is not attached to a clinic.",
        404: "No such object in your clinic.",
        409: "The object is not in a state that allows this (or an Idempotency-Key was reused for another file).",
        429: "Too many requests; `Retry-After` says how many seconds to wait.",
        503: "A backing service (database) is temporarily unavailable.",
    }
    return {code: OpenApiResponse(ErrorSerializer, description=descriptions[code]) for code in codes}


class RequestRefused(exceptions.APIException):
    """A service refusal with its own status (400 or 409) and stable code."""

    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "invalid"

    def __init__(self, message: str, *, code: str, status_code: int = 400, wait: int | None = None) -> None:
        super().__init__(detail=message, code=code)
        self.status_code = status_code
        self.wait = wait  # DRF's handler turns it into Retry-After
