from __future__ import annotations

from django.urls import reverse
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.response import Response

from ...client_address import client_ip
from ...models import ImageState, UploadBatch
from ...services import status as status_services
from ..serializers import BatchStatusSerializer
from .common import VIA, WAIT_PARAMETERS, answer_waited, requested_wait, wait_until, waited_answers


@extend_schema_view(
    retrieve=extend_schema(
        summary="A batch's progress: its images by state, with their predictions, and the files it refused",
        description="With `?wait=N` or `Prefer: wait=N`, the request waits up to N seconds for every image to be "
        "final (`finished`), woken when the worker stores the results: 200 once finished, 202 when the wait ended "
        "first.",
        parameters=WAIT_PARAMETERS,
        responses=waited_answers(BatchStatusSerializer, 400, 401, 403, 404),
    )
)
class BatchViewSet(mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = BatchStatusSerializer

    def get_queryset(self):
        return UploadBatch.objects.visible_to(self.request.user)

    def retrieve(self, request, *args, **kwargs):
        option = requested_wait(request)
        batch = self.get_object()
        progress = status_services.batch_progress(batch)
        waited = False
        if option.seconds and not progress["finished"]:
            waiting_for = [image["id"] for image in progress["images"] if image["state"] not in FINAL]
            progress, waited = wait_until(request, option, read=lambda: status_services.batch_progress(batch),
                                          ready=lambda found: found["finished"], ids=waiting_for)  # fmt: skip
        done = [image["id"] for image in progress["images"] if image["state"] == ImageState.DONE]
        statuses = status_services.images_status(user=request.user, image_ids=done, via=VIA,
                                                 ip_address=client_ip(request)) if done else {}  # fmt: skip
        for image in progress["images"]:
            image["status_url"] = request.build_absolute_uri(reverse("api:image-detail", kwargs={"pk": image["id"]}))
            image["prediction"] = statuses[image["id"]]["prediction"] if image["id"] in statuses else None
        code = 202 if option.seconds and not progress["finished"] else 200
        return answer_waited(Response(progress, status=code), option, waited=waited)


FINAL = status_services.FINAL_STATES
