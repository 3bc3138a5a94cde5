from __future__ import annotations

from django.urls import reverse
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.response import Response

from ...models import UploadBatch
from ...services import status as status_services
from ..errors import error_responses
from ..serializers import BatchStatusSerializer


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
        progress = status_services.batch_progress(self.get_object())
        for image in progress["images"]:
            image["status_url"] = request.build_absolute_uri(reverse("api:image-detail", kwargs={"pk": image["id"]}))
        return Response(progress)
