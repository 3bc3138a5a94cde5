"""An explanation's files: a JPEG overlay with a legend, a transparent PNG heatmap and the raw
attribution as a float16 .npy, all in storage, written before the row is marked done.

Grad-CAM comes with every prediction. The inference worker keeps its small raw map in the row itself
(`raw_map`: a few hundred bytes, in the batch's one INSERT, so it writes no file per photo) and sends
one message per batch; a worker on the default queue then draws the pictures and writes the .npy
(render_explanations)."""

from __future__ import annotations

import io
import logging
import time
import uuid

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.utils import timezone

from mlcore.heatmap import attribution_npy, render, upsample_bilinear
from mlcore.methods import METHOD_LABELS, PIXEL_LEVEL
from mlcore.preprocessing import ImageValidationError, decode_image

from .. import metrics
from ..log_context import set_image_id
from ..models import Explanation, LesionImage, ModelVersion
from . import dispatch, notify
from .explanations import canonical_key
from .transactions import savepoint_if_inside

DISPLAY_MAX_SIDE = 1024  # = mlcore.heatmap.DISPLAY_MAX_SIDE; explanations never need more pixels

logger = logging.getLogger(__name__)


def store_result(*, explanation: Explanation, image, attribution_map, raw=None, seconds: float,
                 convergence_delta: float | None, on_view: bool = False) -> bool:  # fmt: skip
    """Render and store the files, then mark the explanation done (files first, so a done explanation
    always has them). With raw=None no attribution file is written (one stored earlier is kept).
    False when another worker finished it first (its files are kept, these deleted)."""
    overlay, heatmap = render(
        image, attribution_map, signed=True, smooth=explanation.method in PIXEL_LEVEL,
        method_label=METHOD_LABELS[explanation.method], target_class=explanation.target_class,
    )  # fmt: skip
    folder = f"explanations/{uuid.uuid4().hex}"
    names = []
    try:
        names.append(default_storage.save(f"{folder}/overlay.jpg", ContentFile(overlay)))
        names.append(default_storage.save(f"{folder}/heatmap.png", ContentFile(heatmap)))
        fields = {"overlay": names[0], "heatmap": names[1]}
        if raw is not None:
            names.append(default_storage.save(f"{folder}/attribution.npy", ContentFile(attribution_npy(raw))))
            fields["attribution"] = names[2]
        rows = Explanation.objects.filter(pk=explanation.pk)
        # Drawn at a first view: the row is done already, and only its first drawing is kept.
        rows = rows.filter(overlay="") if on_view else rows.exclude(state=Explanation.State.DONE)
        updated = rows.update(
            state=Explanation.State.DONE, error="", convergence_delta=convergence_delta, duration_ms=seconds * 1000,
            finished_at=timezone.now(), claimed_at=None, raw_map=None, **fields,
        )  # fmt: skip
    except BaseException:
        for name in names:
            default_storage.delete(name)
        raise
    if not on_view:
        metrics.observe_explanation(method=explanation.method, seconds=seconds)
    if updated and not on_view:
        notify.changed([explanation.image_id], notify.EXPLAINED)
    if not updated:  # another worker finished it first: keep theirs
        for name in names:
            default_storage.delete(name)
    return bool(updated)


def drawn_on_view() -> bool:
    """GRADCAM_PICTURES: `on_view` (the default) keeps a Grad-CAM map done in its row and draws its pictures
    at the first request for them (draw_on_view); `eager` draws them at once, on the default queue."""
    return settings.GRADCAM_PICTURES != "eager"


def _gradcam_row(image: LesionImage, model_version: ModelVersion, result, cam, seconds: float) -> Explanation:
    target_index = list(model_version.class_names).index(result.label)
    now, on_view = timezone.now(), drawn_on_view()
    return Explanation(
        image=image, model_version=model_version, method="gradcam", params_key=canonical_key("gradcam", {},
        target_index), params={}, target_index=target_index, target_class=result.label,
        state=Explanation.State.DONE if on_view else Explanation.State.PROCESSING,
        claimed_at=None if on_view else now, finished_at=now if on_view else None, raw_map=_map_bytes(cam),
        duration_ms=seconds * 1000,
    )  # fmt: skip


def _map_bytes(cam) -> bytes:
    """The map as kept in the row: a float32 .npy (at the feature map's size, a few hundred bytes)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(cam, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def record_gradcams(items, *, model_version: ModelVersion, seconds: float) -> None:
    """Keep the Grad-CAM maps that a batch's prediction pass computed, for (image, result, cam) items:
    one INSERT with the raw maps in the rows. The pictures are drawn at their first view (draw_on_view),
    or, with GRADCAM_PICTURES=eager, by one message on the default queue (render_explanations): either
    way an inference worker (a GPU machine, say) spends no time encoding images or writing files. When
    the INSERT fails (an image predicted again already has its row, say), each is recorded on its own.
    Never raises: a heatmap problem must not undo stored predictions."""
    if not items:
        return
    try:
        rows = [_gradcam_row(image, model_version, result, cam, seconds) for image, result, cam in items]
        with savepoint_if_inside():
            Explanation.objects.bulk_create(rows)
    except Exception as exc:
        if not isinstance(exc, IntegrityError):
            logger.warning("Grad-CAM maps of a batch of %d could not be stored together (%s); one by one",
                           len(items), type(exc).__name__)  # fmt: skip
        rows = []
        for image, result, cam in items:
            try:
                rows.append(record_gradcam(image=image, model_version=model_version, result=result, cam=cam,
                                           seconds=seconds))  # fmt: skip
            except Exception:
                logger.exception("Grad-CAM could not be stored for image %s", image.pk)
        rows = [row for row in rows if row is not None]
    if drawn_on_view():  # ready to be viewed: the waiting pages read them
        notify.changed({row.image_id for row in rows}, notify.EXPLAINED)
        return
    ids = [str(row.pk) for row in rows if row.state != Explanation.State.DONE]
    if ids:
        transaction.on_commit(lambda: enqueue_render(ids), robust=True)


def record_gradcam(*, image: LesionImage, model_version: ModelVersion, result, cam, seconds: float) -> Explanation:
    """record_gradcams for one image whose row may exist already (predicted again): its map is replaced
    unless its pictures are drawn. The caller sends the render message."""
    row = _gradcam_row(image, model_version, result, cam, seconds)
    try:
        with savepoint_if_inside():  # a first prediction, the usual case: one INSERT
            row.save(force_insert=True)
            return row
    except IntegrityError:  # predicted again (a redelivered message, say): the row exists
        explanation = Explanation.objects.get(image=image, model_version=model_version, method="gradcam",
                                              params_key=row.params_key)  # fmt: skip
        if not explanation.overlay:  # its pictures are not drawn yet: they will show this map
            Explanation.objects.filter(pk=explanation.pk).update(raw_map=row.raw_map, duration_ms=row.duration_ms)
        return explanation


def enqueue_render(explanation_ids: list[str]) -> None:
    """One message to draw the pictures of several Grad-CAM explanations."""
    dispatch.send(dispatch.RENDER, args=list(explanation_ids))


def render_explanations(*, explanation_ids: list[str]) -> dict[str, str]:
    """render_explanation for each of a batch's Grad-CAM explanations; one's problem is its own."""
    outcomes = {}
    for explanation_id in explanation_ids:
        try:
            outcomes[explanation_id] = render_explanation(explanation_id=explanation_id)
        except Exception:
            logger.exception("the Grad-CAM pictures of %s could not be drawn now", explanation_id)
            outcomes[explanation_id] = "error"  # the sweeper sends it again
    return outcomes


def draw_on_view(explanation: Explanation) -> Explanation:
    """The first request for a Grad-CAM explanation's pictures (GRADCAM_PICTURES=on_view) draws them, in
    that request, and keeps them: overlay, heatmap and the .npy, as the render task would. Two requests at
    once may both draw; the first drawing stored is kept. Returns the explanation with its files. Raises
    FileNotFoundError or ImageValidationError when the photo cannot be read."""
    if explanation.overlay or explanation.method != "gradcam" or explanation.raw_map is None:
        return explanation
    started = time.perf_counter()
    raw = _raw_map(explanation)
    with explanation.image.file.open("rb") as handle:
        decoded = decode_image(handle.read(), max_bytes=1 << 31, max_pixels=settings.MAX_IMAGE_PIXELS,
                               max_side=DISPLAY_MAX_SIDE)  # fmt: skip
    store_result(explanation=explanation, image=decoded.image, attribution_map=raw, raw=raw, on_view=True,
                 seconds=(explanation.duration_ms or 0) / 1000 + time.perf_counter() - started,
                 convergence_delta=None)  # fmt: skip
    # Erased meanwhile: the drawing was deleted with it, and serving the old row finds no file (a 404).
    return Explanation.objects.select_related("image", "model_version").filter(pk=explanation.pk).first() or explanation


def render_explanation(*, explanation_id: str) -> str:
    """Draw the overlay and heatmap of an explanation whose raw map is stored (Grad-CAM), and write the
    map as the downloadable .npy."""
    explanation = Explanation.objects.select_related("image", "model_version").filter(pk=explanation_id).first()
    if explanation is None or explanation.overlay:
        return "skipped"
    if explanation.state == Explanation.State.DONE:  # a map kept to be drawn at its first view: drawn now
        if explanation.raw_map is None:
            return "skipped"
        try:
            draw_on_view(explanation)
        except (FileNotFoundError, ImageValidationError, ValueError):
            return "failed"  # asked for, its download says why
        return "done"
    if explanation.raw_map is None and not explanation.attribution:
        return "skipped"
    set_image_id(explanation.image_id)
    started = time.perf_counter()
    try:
        raw = _raw_map(explanation)
        with explanation.image.file.open("rb") as handle:
            decoded = decode_image(
                handle.read(), max_bytes=1 << 31, max_pixels=settings.MAX_IMAGE_PIXELS, max_side=DISPLAY_MAX_SIDE
            )
    except (FileNotFoundError, ImageValidationError, ValueError) as exc:
        Explanation.objects.filter(pk=explanation_id).exclude(state=Explanation.State.DONE).update(
            state=Explanation.State.FAILED,
            error=f"The explanation could not be drawn: {exc}",
            finished_at=timezone.now(),
        )
        notify.changed([explanation.image_id], notify.EXPLAINED)
        return "failed"
    attribution_map = raw if raw.ndim == 2 else raw.sum(axis=0)
    store_result(explanation=explanation, image=decoded.image, attribution_map=attribution_map,
                 raw=raw if explanation.raw_map is not None else None,
                 seconds=(explanation.duration_ms or 0) / 1000 + time.perf_counter() - started,
                 convergence_delta=None)  # fmt: skip
    return "done"


def _raw_map(explanation: Explanation) -> np.ndarray:
    """The map kept in the row, brought to the model's input size, or (stored by an older release) the
    map in its .npy file."""
    if explanation.raw_map is not None:
        raw = np.load(io.BytesIO(bytes(explanation.raw_map)), allow_pickle=False).astype(np.float32)
        size = explanation.model_version.input_size
        if raw.ndim == 2 and raw.shape != (size, size):
            raw = upsample_bilinear(raw, size)  # the prediction pass's interpolation, without torch
        return raw
    with explanation.attribution.open("rb") as handle:
        return np.load(handle, allow_pickle=False).astype(np.float32)
