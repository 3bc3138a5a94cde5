"""The API's viewsets, one module per resource (the router is in diagnosis/api/urls.py)."""
