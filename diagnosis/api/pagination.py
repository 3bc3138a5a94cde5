from django.utils.dateparse import parse_datetime
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination


class NewestFirstPagination(CursorPagination):
    """Cursor pagination stays stable while new uploads arrive, unlike page numbers."""

    ordering = "-created_at"
    page_size_query_param = "page_size"
    max_page_size = 200

    def decode_cursor(self, request):
        try:
            cursor = super().decode_cursor(request)
        except NotFound:
            raise ValidationError({"cursor": ["Invalid cursor; follow the 'next' and 'previous' links."]}) from None
        if cursor is not None and cursor.position is not None:
            try:
                valid = parse_datetime(cursor.position) is not None
            except ValueError:
                valid = False
            if not valid:
                raise ValidationError({"cursor": ["Invalid cursor; follow the 'next' and 'previous' links."]})
        return cursor
