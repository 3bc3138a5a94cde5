import os

from django.core.asgi import get_asgi_application

# Production unless told otherwise: a bare `gunicorn webapp.wsgi` or `celery -A webapp` must never run
# the development settings (DEBUG, a public SECRET_KEY). `make run` and manage.py choose dev themselves.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings.prod")
application = get_asgi_application()
