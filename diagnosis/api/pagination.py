from rest_framework.pagination import CursorPagination


class NewestFirstPagination(CursorPagination):
    """Cursor pagination stays stable while new uploads arrive, unlike page numbers."""

    ordering = "-created_at"
    page_size_query_param = "page_size"
    max_page_size = 200
