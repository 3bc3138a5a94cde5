"""Serving stored files (photos, heatmaps, raw attributions): the one implementation the API and the
portal both use.

The caller first looks the object up through its clinic-scoped queryset, so another clinic's id answers
404 before anything here runs. Then `serve()`:
1. opens the stored file; a file that is missing (or an explanation with no files yet) raises
   FileUnavailable, which each caller answers with its own 404, and nothing is audited;
2. writes the audit record of who fetched what (unless the caller says the fetch is part of a page
   view that was audited already);
3. answers a 302 to a presigned URL where the caller allows it and the server sets
   MEDIA_PRESIGNED_REDIRECT on a bucket (the URL itself is the permission, so it comes last), and
   otherwise streams the bytes, with nosniff and private, no-store caching.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db.models.fields.files import FieldFile
from django.http import FileResponse, HttpResponse, HttpResponseBase, HttpResponseRedirect

from mlcore.preprocessing import ImageValidationError

from ..models import AuditEvent, Clinic, Explanation, LesionImage
from . import explanation_files
from .audit import record_event
from .explanations import picture_type

PRIVATE = "private, no-store"

# kind: (content type, extension); None: read from the stored name (overlays are JPEGs, PNGs where an
# older release drew them; heatmaps are PNGs).
EXPLANATION_FILES = {
    "overlay": (None, None),
    "heatmap": (None, None),
    "attribution": ("application/octet-stream", "npy"),
}


class FileUnavailable(Exception):
    """There is no file to serve: the caller answers 404 with this message."""


@dataclass(frozen=True)
class Download:
    """One stored file, what to call it, and what fetching it is recorded as."""

    stored: FieldFile
    filename: str
    content_type: str
    as_attachment: bool
    action: str  # the audit action of serving it
    obj: LesionImage | Explanation

    @property
    def noun(self) -> str:
        return "image" if isinstance(self.obj, LesionImage) else "explanation"

    def audit_clinic(self) -> Clinic | None:
        """The audit record's clinic (read only when audited); None: the object's own."""
        return self.obj.image.clinic if isinstance(self.obj, Explanation) else None


def image_download(image: LesionImage) -> Download:
    """The photo as stored (metadata removed), as an attachment."""
    extension = "jpg" if image.content_type == "image/jpeg" else "png"
    return Download(
        stored=image.file, filename=f"lesion-image-{image.pk}.{extension}", content_type=image.content_type,
        as_attachment=True, action=AuditEvent.Action.DOWNLOAD_IMAGE, obj=image,
    )  # fmt: skip


def explanation_download(explanation: Explanation, kind: str) -> Download:
    """One file of an explanation: `kind` is overlay, heatmap or attribution (a KeyError otherwise). The
    pictures are shown inline; the raw attribution (.npy) is an attachment."""
    content_type, extension = EXPLANATION_FILES[kind]
    if explanation.state == Explanation.State.DONE and not explanation.overlay and explanation.raw_map is not None:
        try:  # a Grad-CAM map whose pictures are drawn at their first view (GRADCAM_PICTURES=on_view)
            explanation = explanation_files.draw_on_view(explanation)
        except (FileNotFoundError, ImageValidationError) as exc:
            raise FileUnavailable(f"The pictures of this explanation cannot be drawn: {exc}") from None
    stored = getattr(explanation, kind)
    if explanation.state != Explanation.State.DONE or not stored:
        raise FileUnavailable("This explanation has no files yet.")
    if content_type is None:
        content_type, extension = picture_type(stored.name)
    return Download(
        stored=stored, filename=f"{explanation.method}-{explanation.pk}-{kind}.{extension}",
        content_type=content_type, as_attachment=kind == "attribution", action=AuditEvent.Action.VIEW_EXPLANATION,
        obj=explanation,
    )  # fmt: skip


def serve(
    download: Download, *, actor, via: str, ip_address: str | None, audited: bool = True, presign: bool = False
) -> HttpResponseBase:
    """The response that serves `download`, audited first (see the module's docstring). `presign`: a 302 to
    the bucket is allowed (the API; not the portal, whose pages only load pictures from their own origin)."""
    try:
        handle = download.stored.open("rb")
    except FileNotFoundError:
        raise FileUnavailable(f"The stored file of this {download.noun} is missing.") from None
    if audited:
        record_event(actor=actor, action=download.action, obj=download.obj, clinic=download.audit_clinic(), via=via,
                     ip_address=ip_address)  # fmt: skip
    redirect = (
        presigned_redirect(download.stored, filename=download.filename, content_type=download.content_type,
                           as_attachment=download.as_attachment)
        if presign else None
    )  # fmt: skip
    if redirect is not None:
        handle.close()
        return redirect
    response = FileResponse(handle, as_attachment=download.as_attachment, filename=download.filename,
                            content_type=download.content_type)  # fmt: skip
    return private(response)


def picture_response(data: bytes, *, filename: str, content_type: str = "image/jpeg") -> HttpResponse:
    """Bytes drawn for display (a preview), shown inline under the same caching rules as a stored file."""
    response = HttpResponse(data, content_type=content_type)
    response["Content-Disposition"] = f'inline; filename="{filename}"'
    return private(response)


def private(response: HttpResponseBase) -> HttpResponseBase:
    response["X-Content-Type-Options"] = "nosniff"
    response["Cache-Control"] = PRIVATE
    return response


def presigned_redirect(stored, *, filename: str, content_type: str, as_attachment: bool):
    """With MEDIA_PRESIGNED_REDIRECT on a bucket: a 302 to a signed URL valid for S3_PRESIGNED_URL_SECONDS
    whose answer carries these headers; else None (the file is streamed). Call it only after the clinic
    check and the audit record: the URL itself is the permission."""
    if not settings.MEDIA_PRESIGNED_REDIRECT or not getattr(stored.storage, "querystring_auth", False):
        return None
    disposition = "attachment" if as_attachment else "inline"
    url = stored.storage.url(
        stored.name,
        expire=settings.S3_PRESIGNED_URL_SECONDS,
        parameters={
            "ResponseContentType": content_type,
            "ResponseContentDisposition": f'{disposition}; filename="{filename}"',
            "ResponseCacheControl": PRIVATE,
        },
    )
    response = HttpResponseRedirect(url)
    response["Cache-Control"] = PRIVATE
    response["Referrer-Policy"] = "no-referrer"
    return response
