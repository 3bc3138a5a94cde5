"""What the API's viewsets share: the client's address, id parameters, file responses and their schema."""

from __future__ import annotations

import uuid

from drf_spectacular.utils import OpenApiResponse
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.negotiation import BaseContentNegotiation

from ...client_address import client_ip
from ...services import files as file_services

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
