import threading

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpResponse
from django.urls import include, path
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from diagnosis import admin_monitoring
from diagnosis.portal.accounts import LoginView
from webapp.health import healthz, readyz
from webapp.metrics import metrics


class SchemaView(SpectacularAPIView):
    """The OpenAPI schema, generated one request at a time: drf-spectacular loads its extensions lazily
    and not thread-safely, and two first requests at once in a threaded server raised a 500."""

    _lock = threading.Lock()

    @extend_schema(exclude=True)
    def get(self, request, *args, **kwargs):
        with self._lock:
            return super().get(request, *args, **kwargs)


def no_favicon(request):
    return HttpResponse(status=204)  # browsers ask for it on photo URLs; the pages link an inline icon


urlpatterns = [
    path("favicon.ico", no_favicon),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("metrics", metrics, name="metrics"),
    path("", include("diagnosis.portal.urls", namespace="portal")),
    path("accounts/login/", LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path(
        "accounts/password/",
        auth_views.PasswordChangeView.as_view(success_url="/accounts/password/done/"),
        name="password_change",
    ),
    path("accounts/password/done/", auth_views.PasswordChangeDoneView.as_view(), name="password_change_done"),
    *admin_monitoring.urls(),
    path("admin/", admin.site.urls),
    path("api/v1/", include("diagnosis.api.urls", namespace="api")),
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
]

handler400 = "webapp.views.bad_request"
handler403 = "webapp.views.permission_denied"
handler404 = "webapp.views.not_found"
handler500 = "webapp.views.server_error"
