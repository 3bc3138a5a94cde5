"""Sign-in for the portal. django-axes (settings.AXES_*) throttles failed attempts."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views


class LoginView(auth_views.LoginView):
    template_name = "registration/login.html"
    redirect_authenticated_user = True

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), "axes_limit": settings.AXES_FAILURE_LIMIT,
                "axes_cooloff": settings.AXES_COOLOFF_TIME}  # fmt: skip
