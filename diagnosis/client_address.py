"""The client's address, for the login lockout (django-axes: AXES_CLIENT_IP_CALLABLE) and the audit log
alike.

Production runs behind a TLS-terminating proxy, so REMOTE_ADDR is the proxy's address for every
client. With TRUSTED_PROXY_COUNT = N (the proxies in front of gunicorn, each appending the address it
received the request from to X-Forwarded-For), the client is the N-th entry from the right of that
header: the entries further left were written by the client itself and are never trusted. A request
that did not pass through all N proxies (a health probe inside the deployment's network) keeps
REMOTE_ADDR. With 0 (the default: no proxy, `make run`), the header is ignored."""

from __future__ import annotations

import ipaddress

from django.conf import settings


def client_ip(request) -> str | None:
    remote = request.META.get("REMOTE_ADDR")
    count = settings.TRUSTED_PROXY_COUNT
    if count <= 0:
        return remote
    forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
    if len(forwarded) < count:
        return remote
    candidate = forwarded[-count]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:  # a proxy that writes something else is misconfigured: do not trust it
        return remote
