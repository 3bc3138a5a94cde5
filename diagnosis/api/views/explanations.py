from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound

from ...models import Explanation
from ...services import files as file_services
from ...services.clinics import clinic_of
from ..errors import error_responses
from ..serializers import ExplanationSerializer
from .common import PRESIGNED_REDIRECT, serve_file


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
        explanation = self.get_object()
        try:
            download = file_services.explanation_download(explanation, kind)
        except file_services.FileUnavailable as exc:
            raise NotFound(str(exc)) from None
        return serve_file(request, download)

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
