from rest_framework.routers import DefaultRouter

from .views import BatchViewSet, ExplanationViewSet, ImageViewSet, LesionViewSet, PatientViewSet

app_name = "api"

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("patients", PatientViewSet, basename="patient")
router.register("lesions", LesionViewSet, basename="lesion")
router.register("images", ImageViewSet, basename="image")
router.register("explanations", ExplanationViewSet, basename="explanation")
router.register("batches", BatchViewSet, basename="batch")

urlpatterns = router.urls
