"""Explanations: Grad-CAM with every prediction, Integrated Gradients (and others on request) on
the `explain` queue. Files: a PNG overlay with a legend, a transparent PNG heatmap, and the raw
attribution as float16 .npy, all in storage."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from webapp.request_id import set_image_id

from .. import metrics
from ..models import AuditEvent, Explanation, ImageState, LesionImage, ModelVersion, Prediction
from .audit import record_event
from .registry import VersionCache
from .transactions import savepoint_if_inside

DISPLAY_MAX_SIDE = 1024  # = mlcore.heatmap.DISPLAY_MAX_SIDE; explanations never need more pixels

logger = logging.getLogger(__name__)


class ExplanationRefused(ValidationError):
    """A request the API answers with 400 (bad method or parameters) or 409 (no prediction yet)."""

    def __init__(self, message: str, *, code: str, status: int = 400) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.reason = message
        self.error_code = code


def canonical_key(method: str, params: dict, target_index: int) -> str:
    text = json.dumps({"method": method, "params": params, "target": target_index}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _validate(method: str, params: dict | None, model_version: ModelVersion) -> dict:
    from mlcore.explain import ExplanationError, validate_params

    try:
        return validate_params(
            method, params, input_size=model_version.input_size, max_steps=settings.EXPLAIN_MAX_STEPS,
            max_evaluations=settings.EXPLAIN_MAX_EVALUATIONS,
        )  # fmt: skip
    except ExplanationError as exc:
        raise ExplanationRefused(exc.message, code=exc.code) from None


def request_explanation(
    *, image: LesionImage, method: str, params: dict | None = None, target: str | None = None, requested_by=None,
    via: str = "",
) -> tuple[Explanation, bool]:  # fmt: skip
    """Ask for an explanation of the image's current prediction. Returns (explanation, created):
    an identical earlier request (same image, model version, method, canonical parameters and
    target) is returned instead of computing it again; a failed one is queued again."""
    prediction = Prediction.objects.filter(image=image).select_related("model_version").order_by("-created_at").first()
    if image.state != ImageState.DONE or prediction is None:
        raise ExplanationRefused(
            f"This image has no prediction yet (state: {image.state}); explanations can be requested once it is done.",
            code="no_prediction",
            status=409,
        )
    model_version = prediction.model_version
    canonical = _validate(method, params, model_version)
    class_names = list(model_version.class_names)
    if target is None:
        target_index = class_names.index(prediction.label)
    elif target in class_names:
        target_index = class_names.index(target)
    else:
        raise ExplanationRefused(
            f"Unknown target {target!r}; choose one of {', '.join(class_names)}.", code="invalid_target"
        )
    key = canonical_key(method, canonical, target_index)
    explanation = Explanation.objects.filter(
        image=image, model_version=model_version, method=method, params_key=key
    ).first()
    created = False
    if explanation is None:
        try:
            with transaction.atomic():
                explanation = Explanation.objects.create(
                    image=image, model_version=model_version, method=method, params=canonical, params_key=key,
                    target_index=target_index, target_class=class_names[target_index],
                    requested_by=requested_by if getattr(requested_by, "is_authenticated", False) else None,
                )  # fmt: skip
                created = True
        except IntegrityError:  # an identical request won the race
            explanation = Explanation.objects.get(
                image=image, model_version=model_version, method=method, params_key=key
            )
    elif explanation.state == Explanation.State.FAILED:
        Explanation.objects.filter(pk=explanation.pk, state=Explanation.State.FAILED).update(
            state=Explanation.State.QUEUED, error="", attempts=0
        )
        explanation.refresh_from_db()
        created = True
    if requested_by is not None:
        record_event(actor=requested_by, action=AuditEvent.Action.REQUEST_EXPLANATION, obj=explanation,
                     clinic=image.clinic, via=via)  # fmt: skip
    if created:
        explanation_id = str(explanation.pk)
        transaction.on_commit(lambda: enqueue_explanation(explanation_id), robust=True)
    return explanation, created


def enqueue_explanation(explanation_id: str) -> None:
    from ..tasks import explain_image_task

    explain_image_task.apply_async(args=[explanation_id])


# --- computing ---------------------------------------------------------------------------------------


def _build_explainer(model_version: ModelVersion):
    from mlcore.explain import Explainer

    from .predictions import predictor_for

    predictor = predictor_for(model_version)  # share its model: no second copy in memory
    return Explainer(
        predictor.model, predictor.meta, device=predictor.device,
        memory_budget_bytes=settings.EXPLAIN_MEMORY_BUDGET_MB << 20, precision=settings.EXPLAIN_PRECISION,
        executor=_decoder_pool(),
    )  # fmt: skip


explainers = VersionCache(_build_explainer)


def explainer_for(model_version: ModelVersion):
    """The process-wide Explainer of this version."""
    return explainers.get(model_version)


def store_result(*, explanation: Explanation, image, attribution_map, raw=None, seconds: float,
                 convergence_delta: float | None) -> None:  # fmt: skip
    """Render and store the files, then mark the explanation done (files first, so a done explanation
    always has them). With raw=None the attribution file stored earlier is kept."""
    from mlcore.explain import METHOD_LABELS, PIXEL_LEVEL
    from mlcore.heatmap import attribution_npy, render

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
        updated = Explanation.objects.filter(pk=explanation.pk).exclude(state=Explanation.State.DONE).update(
            state=Explanation.State.DONE, error="", convergence_delta=convergence_delta, duration_ms=seconds * 1000,
            finished_at=timezone.now(), claimed_at=None, **fields,
        )  # fmt: skip
    except BaseException:
        for name in names:
            default_storage.delete(name)
        raise
    metrics.observe_explanation(method=explanation.method, seconds=seconds)
    if not updated:  # another worker finished it first: keep theirs
        for name in names:
            default_storage.delete(name)


def record_gradcam(*, image: LesionImage, model_version: ModelVersion, result, cam, seconds: float) -> Explanation:
    """Keep the Grad-CAM that the prediction pass computed. Only its raw map is written here (a few
    KB); the pictures are drawn by render_explanation_task on the default queue, so an inference
    worker (a GPU machine, say) spends no time encoding PNGs."""
    from mlcore.heatmap import attribution_npy

    class_names = list(model_version.class_names)
    target_index = class_names.index(result.label)
    key = canonical_key("gradcam", {}, target_index)
    name = default_storage.save(f"explanations/{uuid.uuid4().hex}/attribution.npy", ContentFile(attribution_npy(cam)))
    try:
        try:
            # A first prediction, the usual case: one INSERT (in a savepoint only inside a transaction).
            with savepoint_if_inside():
                explanation = Explanation.objects.create(
                    image=image, model_version=model_version, method="gradcam", params_key=key, params={},
                    target_index=target_index, target_class=result.label, state=Explanation.State.PROCESSING,
                    claimed_at=timezone.now(), attribution=name, duration_ms=seconds * 1000,
                )  # fmt: skip
        except IntegrityError:  # predicted again (a redelivered message, say): the row exists
            explanation = Explanation.objects.get(image=image, model_version=model_version, method="gradcam",
                                                  params_key=key)  # fmt: skip
            if explanation.state == Explanation.State.DONE:
                default_storage.delete(name)
                return explanation
            Explanation.objects.filter(pk=explanation.pk).update(attribution=name, duration_ms=seconds * 1000)
    except BaseException:
        default_storage.delete(name)  # no row refers to it
        raise
    explanation_id = str(explanation.pk)
    transaction.on_commit(lambda: enqueue_render(explanation_id), robust=True)
    return explanation


def record_gradcams(items, *, model_version: ModelVersion, seconds: float) -> None:
    """record_gradcam for a batch of (image, result, cam): the raw maps are written, then the rows are
    stored with one INSERT. When that INSERT fails (an image predicted again already has its row, say),
    each is recorded on its own. Never raises: a heatmap problem must not undo stored predictions."""
    from mlcore.heatmap import attribution_npy

    if not items:
        return
    names: list[str] = []
    try:
        class_names = list(model_version.class_names)
        rows = []
        for image, result, cam in items:
            target_index = class_names.index(result.label)
            names.append(default_storage.save(f"explanations/{uuid.uuid4().hex}/attribution.npy",
                                              ContentFile(attribution_npy(cam))))  # fmt: skip
            rows.append(Explanation(
                image=image, model_version=model_version, method="gradcam", params_key=canonical_key("gradcam", {},
                target_index), params={}, target_index=target_index, target_class=result.label,
                state=Explanation.State.PROCESSING, claimed_at=timezone.now(), attribution=names[-1],
                duration_ms=seconds * 1000,
            ))  # fmt: skip
        with savepoint_if_inside():
            Explanation.objects.bulk_create(rows)
    except Exception as exc:
        for name in names:  # no row refers to them
            _delete_quietly(name)
        if not isinstance(exc, IntegrityError):
            logger.warning("Grad-CAM maps of a batch of %d could not be stored together (%s); one by one",
                           len(items), type(exc).__name__)  # fmt: skip
        for image, result, cam in items:
            try:
                record_gradcam(image=image, model_version=model_version, result=result, cam=cam, seconds=seconds)
            except Exception:
                logger.exception("Grad-CAM could not be stored for image %s", image.pk)
        return
    for row in rows:
        explanation_id = str(row.pk)
        transaction.on_commit(lambda explanation_id=explanation_id: enqueue_render(explanation_id), robust=True)


def _delete_quietly(name: str) -> None:
    try:
        default_storage.delete(name)
    except Exception:
        logger.warning("could not delete %s", name)


PICTURE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png"}


def picture_type(name: str) -> tuple[str, str]:
    """(content type, extension) of a stored overlay or heatmap, from its name: overlays are JPEGs, and
    PNGs where they were drawn before overlays became JPEGs; heatmaps are PNGs."""
    extension = name.rsplit(".", 1)[-1].lower()
    return PICTURE_TYPES.get(extension, "application/octet-stream"), extension


def enqueue_render(explanation_id: str) -> None:
    from ..tasks import render_explanation_task

    render_explanation_task.apply_async(args=[explanation_id])


def render_explanation(*, explanation_id: str) -> str:
    """Draw the overlay and heatmap of an explanation whose raw map is stored (Grad-CAM)."""
    import numpy as np

    from mlcore.preprocessing import ImageValidationError, decode_image

    explanation = Explanation.objects.select_related("image").filter(pk=explanation_id).first()
    if explanation is None or explanation.state == Explanation.State.DONE or not explanation.attribution:
        return "skipped"
    set_image_id(explanation.image_id)
    started = time.perf_counter()
    try:
        with explanation.attribution.open("rb") as handle:
            raw = np.load(handle, allow_pickle=False).astype(np.float32)
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
        return "failed"
    attribution_map = raw if raw.ndim == 2 else raw.sum(axis=0)
    store_result(explanation=explanation, image=decoded.image, attribution_map=attribution_map,
                 seconds=(explanation.duration_ms or 0) / 1000 + time.perf_counter() - started,
                 convergence_delta=None)  # fmt: skip
    return "done"


def request_automatic_explanations(*, image: LesionImage) -> None:
    """Queue the explanations every prediction gets (Integrated Gradients by default)."""
    for method in settings.AUTO_EXPLAIN_METHODS:
        try:
            request_explanation(image=image, method=method)
        except ExplanationRefused as exc:  # a misconfigured setting must not fail predictions
            logger.error("automatic %s explanation refused: %s", method, exc.reason)


def claim_explanation(*, explanation_id: str, worker_id: str) -> Explanation | None:
    now = timezone.now()
    stale = now - timedelta(seconds=settings.CLAIM_TIMEOUT_SECONDS)
    claimable = (
        Q(state=Explanation.State.QUEUED)
        | Q(state=Explanation.State.PROCESSING, claimed_at__lt=stale)
        | Q(state=Explanation.State.PROCESSING, claimed_by=worker_id)
    )
    updated = (
        Explanation.objects.filter(pk=explanation_id)
        .filter(claimable)
        .update(state=Explanation.State.PROCESSING, claimed_at=now, claimed_by=worker_id, attempts=F("attempts") + 1)
    )
    if updated != 1:
        return None
    return Explanation.objects.select_related("image", "model_version").get(pk=explanation_id)


def compute_explanation(*, explanation_id: str, worker_id: str, gather: int | None = None) -> str:
    """Returns 'done', 'failed' or 'skipped'. Bad or unreadable inputs end failed with a reason.

    An Integrated Gradients explanation on its first attempt takes up to `gather` (by default
    EXPLAIN_BATCH_SIZE - 1) other queued ones of the same model version and parameters into one
    Captum call (compute_explanations); their own messages later find them finished."""
    if gather is None:
        gather = settings.EXPLAIN_BATCH_SIZE - 1
    return compute_explanations(explanation_ids=[explanation_id], worker_id=worker_id, gather=gather)[explanation_id]


BATCHED_METHODS = ("integrated_gradients",)


def gather_queued_explanations(*, explanation: Explanation, limit: int) -> list[str]:
    """Up to `limit` other explanations that can share this one's Captum call, oldest first: queued,
    never attempted (one that was in a batch when its worker died goes alone, so it cannot use up its
    batch-mates' attempts), the same method, model version and parameters. Targets may differ."""
    if limit <= 0 or explanation.method not in BATCHED_METHODS:
        return []
    # Parameter by parameter (canonical parameters have every key of their method): equal on SQLite too,
    # where comparing whole JSON documents would depend on the order of their keys.
    same_params = {f"params__{name}": value for name, value in explanation.params.items()}
    candidates = Explanation.objects.filter(
        state=Explanation.State.QUEUED, attempts=0, method=explanation.method,
        model_version_id=explanation.model_version_id, **same_params,
    ).exclude(pk=explanation.pk)  # fmt: skip
    return [str(pk) for pk in candidates.order_by("created_at").values_list("pk", flat=True)[:limit]]


def release_explanation(*, explanation_id: str, worker_id: str) -> None:
    """Give our claim back after a temporary error (database, storage): it is queued again, and the
    attempt is not counted towards MAX_PROCESSING_ATTEMPTS. The sweeper sends it again if its own
    message was already spent."""
    from django.db.models.functions import Greatest

    Explanation.objects.filter(pk=explanation_id, state=Explanation.State.PROCESSING, claimed_by=worker_id).update(
        state=Explanation.State.QUEUED, claimed_at=None, claimed_by="", attempts=Greatest(F("attempts") - 1, 0)
    )


def compute_explanations(*, explanation_ids: list[str], worker_id: str, gather: int = 0) -> dict[str, str]:
    """Claim each explanation, decode their photos in parallel, explain them together, store each.
    The first is the one the task was sent for; with gather > 0, and only once it is claimed on its
    first attempt, others join it (gather_queued_explanations). Returns an outcome per id: 'done',
    'failed', 'skipped' or 'released'. A database error anywhere gives back every claim of this call
    that has no outcome yet and becomes a TransientError, for the task's bounded retry."""
    from django.db import InterfaceError, OperationalError

    from .predictions import TransientError, release_unfinished

    outcomes: dict[str, str] = {}
    explanation_ids = list(explanation_ids)  # grows with the gathered ones, so all of them can be given back
    try:
        _ExplainBatch(explanation_ids=explanation_ids, worker_id=worker_id, outcomes=outcomes, gather=gather).run()
    except (OperationalError, InterfaceError) as exc:
        release_unfinished(explanation_ids, outcomes,
                           lambda explanation_id: release_explanation(explanation_id=explanation_id,
                                                                      worker_id=worker_id))  # fmt: skip
        raise TransientError(str(exc)) from exc
    return outcomes


def _decoder_pool():
    """The process's decode threads (DECODE_THREADS), shared with the inference path."""
    from .predictions import _decoder_pool as shared

    return shared()


def _read_and_decode(explanation: Explanation):
    from mlcore.preprocessing import decode_image

    with explanation.image.file.open("rb") as handle:
        data = handle.read()
    return decode_image(data, max_bytes=1 << 31, max_pixels=settings.MAX_IMAGE_PIXELS, max_side=DISPLAY_MAX_SIDE)


def _in_this_thread(function, *args):
    """A finished Future of function(*args): one photo is decoded without a hand-off to the pool."""
    from concurrent.futures import Future

    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


class _ExplainBatch:
    """One explain task's work. Only an explanation's own faults fail it; a temporary error on a
    gathered one gives its claim back for its own message, and on the task's own one raises a
    TransientError once the others are handled. Running out of time fails every one without an outcome."""

    TOO_LONG = "The explanation took too long and was stopped; try fewer steps or samples."

    def __init__(self, *, explanation_ids: list[str], worker_id: str, outcomes: dict[str, str], gather: int) -> None:
        self.ids = explanation_ids
        self.own = explanation_ids[0]
        self.worker_id = worker_id
        self.outcomes = outcomes
        self.gather = gather
        self.deferred: Exception | None = None

    def fail(self, explanation_id: str, reason: str) -> None:
        Explanation.objects.filter(pk=explanation_id, claimed_by=self.worker_id).exclude(
            state=Explanation.State.DONE
        ).update(state=Explanation.State.FAILED, error=reason[:2000], finished_at=timezone.now(), claimed_at=None)
        self.outcomes[explanation_id] = "failed"

    def give_back(self, explanation_id: str, exc: BaseException | None = None) -> None:
        from .predictions import TransientError

        try:
            release_explanation(explanation_id=explanation_id, worker_id=self.worker_id)
        except Exception:  # the database itself is down; the sweeper recovers the claim later
            logger.warning("could not release explanation %s", explanation_id)
        self.outcomes[explanation_id] = "released"
        if exc is not None and explanation_id == self.own:
            self.deferred = TransientError(str(exc))

    def run(self) -> None:
        from celery.exceptions import SoftTimeLimitExceeded

        claimed = self.claim()
        try:
            explainer = self.explainer(claimed) if claimed else None
            ready = self.decode(claimed) if explainer is not None else []
            if ready:
                self.explain_and_store(ready, explainer)
        except SoftTimeLimitExceeded:
            # Only the task's own explanation has used up its time; the gathered ones go back to wait
            # for their own messages, where each has the whole limit to itself.
            for explanation in claimed:
                if str(explanation.pk) not in self.outcomes:
                    if str(explanation.pk) == self.own:
                        self.fail(self.own, self.TOO_LONG)
                    else:
                        self.give_back(str(explanation.pk))
        if self.deferred is not None:
            raise self.deferred

    def claim(self) -> list[Explanation]:
        claimed: list[Explanation] = []
        for explanation_id in self.ids:  # grows while it is walked: the gathered ones are claimed in turn
            explanation = claim_explanation(explanation_id=explanation_id, worker_id=self.worker_id)
            if explanation_id == self.own and explanation is not None:
                set_image_id(explanation.image_id)  # this task's log lines are about its own image
                if self.gather > 0 and explanation.attempts == 1:
                    # The whole batch shares this task's time limit: at most EXPLAIN_BATCH_MAX_STEPS steps.
                    steps = int(explanation.params.get("n_steps") or 1)
                    limit = min(self.gather, settings.EXPLAIN_BATCH_MAX_STEPS // max(1, steps) - 1)
                    self.ids += gather_queued_explanations(explanation=explanation, limit=limit)
            if explanation is None:
                self.outcomes[explanation_id] = "skipped"
            elif explanation.attempts > settings.MAX_PROCESSING_ATTEMPTS:
                self.fail(explanation_id, "The explanation was started several times and never finished (the "
                                          "worker stopped each time).")  # fmt: skip
            else:
                claimed.append(explanation)
        return claimed

    def explainer(self, claimed: list[Explanation]):
        from celery.exceptions import SoftTimeLimitExceeded
        from django.db import InterfaceError, OperationalError

        from .predictions import TransientError, bucket_errors

        try:
            return explainer_for(claimed[0].model_version)  # one model version per batch (gathered so)
        except (OperationalError, InterfaceError, SoftTimeLimitExceeded):
            raise
        except (ConnectionError, TimeoutError, *bucket_errors()) as exc:  # the weights could not be fetched
            for explanation in claimed:
                self.give_back(str(explanation.pk))
            raise TransientError(str(exc)) from exc
        except Exception as exc:
            logger.exception("the explainer of model %s cannot be built", claimed[0].model_version.version)
            for explanation in claimed:  # not the gathered photos' fault: they wait for their own messages
                if str(explanation.pk) == self.own:
                    self.fail(self.own, f"The explanation could not be computed (internal error: "
                                        f"{type(exc).__name__}).")  # fmt: skip
                else:
                    self.give_back(str(explanation.pk))
            return None

    def decode(self, claimed: list[Explanation]) -> list[tuple[Explanation, object]]:
        """Read and decode in parallel (one photo: in this thread, no hand-off), always with
        mlcore.preprocessing.decode_image (EXIF orientation, colour profile, draft mode)."""
        from celery.exceptions import SoftTimeLimitExceeded
        from django.db import InterfaceError, OperationalError

        from mlcore.preprocessing import ImageValidationError

        from .predictions import bucket_errors

        if len(claimed) == 1:
            jobs = [_in_this_thread(_read_and_decode, claimed[0])]
        else:
            jobs = [_decoder_pool().submit(_read_and_decode, explanation) for explanation in claimed]
        ready = []
        for explanation, job in zip(claimed, jobs, strict=True):
            explanation_id = str(explanation.pk)
            try:
                ready.append((explanation, job.result()))
            except FileNotFoundError:
                self.fail(explanation_id, "The stored image file is missing.")
            except ImageValidationError as exc:
                self.fail(explanation_id, f"The stored image could not be read: {exc.message}")
            except (OperationalError, InterfaceError, SoftTimeLimitExceeded):
                raise
            except (OSError, *bucket_errors()) as exc:  # storage briefly unavailable: not the photo's fault
                logger.warning("explanation %s: the stored image could not be read now (%s)", explanation_id,
                               type(exc).__name__)  # fmt: skip
                self.give_back(explanation_id, exc)
            except Exception as exc:
                logger.exception("explanation %s: the stored image could not be read", explanation_id)
                self.fail(explanation_id, f"The stored image could not be read (internal error: "
                                          f"{type(exc).__name__}).")  # fmt: skip
        return ready

    def explain_and_store(self, ready: list[tuple[Explanation, object]], explainer) -> None:
        """All of them in one call; if that raises, one by one, so that only the broken one fails."""
        output = self.attempt(ready, explainer)
        if isinstance(output, Exception) and len(ready) > 1:
            for item in ready:
                self.store([item], self.attempt([item], explainer))
        else:
            self.store(ready, output)

    def attempt(self, group: list[tuple[Explanation, object]], explainer):
        """The group's attributions (Integrated Gradients of several photos: one call), or the
        exception that stopped them."""
        from celery.exceptions import SoftTimeLimitExceeded
        from django.db import InterfaceError, OperationalError

        first = group[0][0]
        try:
            if len(group) == 1:
                return [explainer.explain(group[0][1].image, first.method, first.params, first.target_index)]
            return explainer.explain_batch([decoded.image for _, decoded in group], first.method, first.params,
                                           [explanation.target_index for explanation, _ in group])  # fmt: skip
        except (OperationalError, InterfaceError, SoftTimeLimitExceeded):
            raise
        except Exception as exc:
            logger.exception("explanation failed on a batch of %d (first %s)", len(group), first.pk)
            return exc

    def store(self, group: list[tuple[Explanation, object]], output) -> None:
        from celery.exceptions import SoftTimeLimitExceeded
        from django.db import InterfaceError, OperationalError

        from .predictions import bucket_errors

        if isinstance(output, Exception):
            self.fail(str(group[0][0].pk), f"The explanation could not be computed (internal error: "
                                           f"{type(output).__name__}).")  # fmt: skip
            return
        for (explanation, decoded), result in zip(group, output, strict=True):
            explanation_id = str(explanation.pk)
            try:
                store_result(explanation=explanation, image=decoded.image, attribution_map=result.map, raw=result.raw,
                             seconds=result.seconds, convergence_delta=result.convergence_delta)  # fmt: skip
            except (OperationalError, InterfaceError, SoftTimeLimitExceeded):
                raise
            except (OSError, *bucket_errors()) as exc:  # storage briefly unavailable
                logger.warning("explanation %s could not be stored now (%s)", explanation_id, type(exc).__name__)
                self.give_back(explanation_id, exc)
            except Exception as exc:
                logger.exception("explanation %s could not be stored", explanation_id)
                self.fail(explanation_id, f"The explanation could not be stored (internal error: "
                                          f"{type(exc).__name__}).")  # fmt: skip
            else:
                self.outcomes[explanation_id] = "done"
