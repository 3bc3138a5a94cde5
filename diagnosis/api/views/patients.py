from __future__ import annotations

from django.db.models import Count
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from ...client_address import client_ip
from ...models import AuditEvent, Patient
from ...services import patients as patient_services
from ...services.audit import record_event
from ...services.clinics import clinic_of
from ..errors import error_responses
from ..serializers import PatientSerializer
from .common import VIA


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
                raise ValidationError({"reference": ["The search text contains control characters."]})
            queryset = queryset.filter(reference__istartswith=reference)
        return queryset

    def perform_create(self, serializer):
        serializer.instance = patient_services.create_patient(
            clinic=clinic_of(self.request.user),
            reference=serializer.validated_data["reference"],
            created_by=self.request.user,
            via=VIA,
        )
        serializer.instance.lesion_count = 0

    def retrieve(self, request, *args, **kwargs):
        patient = self.get_object()
        record_event(
            actor=request.user,
            action=AuditEvent.Action.VIEW_PATIENT,
            obj=patient,
            via=VIA,
            ip_address=client_ip(request),
        )
        return Response(self.get_serializer(patient).data)
