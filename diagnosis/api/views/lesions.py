from __future__ import annotations

from django.db.models import Count, F, Q
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, viewsets

from ...models import Lesion
from ...services import patients as patient_services
from ..errors import error_responses
from ..serializers import LesionSerializer
from .common import VIA, uuid_param


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
            Lesion.objects.visible_to(self.request.user)
            .select_related("patient")
            .annotate(image_count=Count("images", filter=Q(images__clinic=F("patient__clinic"))))
        )
        patient = self.request.query_params.get("patient")
        if patient:
            queryset = queryset.filter(patient_id=uuid_param("patient", patient))
        return queryset

    def perform_create(self, serializer):
        data = serializer.validated_data
        serializer.instance = patient_services.create_lesion(
            patient=data["patient"],
            body_site=data["body_site"],
            note=data.get("note", ""),
            created_by=self.request.user,
            via=VIA,
        )
        serializer.instance.image_count = 0
