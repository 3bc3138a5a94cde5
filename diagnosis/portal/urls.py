from django.urls import path

from . import photo_views, views

app_name = "portal"

urlpatterns = [
    path("", views.index, name="index"),
    path("patients/", views.patients, name="patients"),
    path("patients/<uuid:pk>/", views.patient_detail, name="patient"),
    path("lesions/<uuid:pk>/", views.lesion_detail, name="lesion"),
    path("lesions/<uuid:pk>/upload/", views.lesion_upload, name="lesion-upload"),
    path("lesions/<uuid:pk>/report/", views.lesion_report, name="lesion-report"),
    path("images/<uuid:pk>/", views.image_detail, name="image"),
    path("images/<uuid:pk>/status/", views.image_status, name="image-status"),
    path("images/<uuid:pk>/photo/", views.image_photo, name="image-photo"),
    path("images/<uuid:pk>/explanations/", views.image_explanations, name="image-explanations"),
    path("images/<uuid:pk>/feedback/", views.image_feedback, name="image-feedback"),
    path("images/<uuid:pk>/photo-fine/", photo_views.image_photo_fine, name="image-photo-fine"),
    path("explanations/<uuid:pk>/<str:kind>/", views.explanation_file, name="explanation-file"),
    path("history/", views.history, name="history"),
    path("tokens/", views.tokens, name="tokens"),
    path("tokens/<str:key>/revoke/", views.token_revoke, name="token-revoke"),
]
