from rest_framework.routers import SimpleRouter

from .views.batches import BatchViewSet
from .views.explanations import ExplanationViewSet
from .views.images import ImageViewSet
from .views.lesions import LesionViewSet
from .views.patients import PatientViewSet

app_name = "api"

# SimpleRouter: no API root view and no ".json" format-suffix twins of every route; the API speaks JSON only.
router = SimpleRouter(trailing_slash=True)
router.register("patients", PatientViewSet, basename="patient")
router.register("lesions", LesionViewSet, basename="lesion")
router.register("images", ImageViewSet, basename="image")
router.register("explanations", ExplanationViewSet, basename="explanation")
router.register("batches", BatchViewSet, basename="batch")

urlpatterns = router.urls
