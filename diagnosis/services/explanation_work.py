"""Computing explanations: a kind of work for the batch engine (services.engine) on the `explain` queue.
Integrated Gradients explanations of one model version and one set of parameters share one Captum
call (their targets may differ); other methods go one at a time. Only what differs from predictions is
here: which explanations are claimed, the explainer of their model version, the full decode of their
photos, and the files stored per explanation (services.explanation_files)."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db.models import F, Q, prefetch_related_objects
from django.db.models.functions import Greatest
from django.utils import timezone

from mlcore.preprocessing import ImageValidationError, decode_image

from ..log_context import set_image_id
from ..models import Explanation
from . import notify
from .engine import Batch, Engine, Work, done_future
from .errors import DATABASE_ERRORS, TransientError, bucket_errors, storage_errors
from .explanation_files import DISPLAY_MAX_SIDE, store_result
from .explanations import explain_batch_size
from .runtime import decoder_pool, explainer_for
from .transactions import first_of, update_returning

logger = logging.getLogger(__name__)

BATCHED_METHODS = ("integrated_gradients",)


def claim_explanations(*, explanation_ids: list[str], worker_id: str) -> list[Explanation]:
    """The task's own explanations that are ours to take (queued, a stale claim, or this very message
    redelivered), in one UPDATE that returns them."""
    now = timezone.now()
    stale = now - timedelta(seconds=settings.CLAIM_TIMEOUT_SECONDS)
    claimable = (
        Q(state=Explanation.State.QUEUED)
        | Q(state=Explanation.State.PROCESSING, claimed_at__lt=stale)
        | Q(state=Explanation.State.PROCESSING, claimed_by=worker_id)
    )
    return _with_relations(update_returning(Explanation.objects.filter(pk__in=explanation_ids).filter(claimable),
                                            state=Explanation.State.PROCESSING, claimed_at=now, claimed_by=worker_id,
                                            attempts=F("attempts") + 1))  # fmt: skip


def compatible_queued(explanation: Explanation):
    """The queued, never-attempted explanations that can share this one's Captum call: the same method,
    model version and parameters (targets may differ). One that was in a batch when its worker died
    goes alone, so it cannot use up its batch-mates' attempts."""
    # Parameter by parameter (canonical parameters have every key of their method): equal on SQLite too,
    # where comparing whole JSON documents would depend on the order of their keys.
    same_params = {f"params__{name}": value for name, value in explanation.params.items()}
    return Explanation.objects.filter(
        state=Explanation.State.QUEUED, attempts=0, method=explanation.method,
        model_version_id=explanation.model_version_id, **same_params,
    )  # fmt: skip


def gather_queued_explanations(*, explanation: Explanation, limit: int) -> list[str]:
    """Up to `limit` other explanations that can share this one's Captum call, oldest first."""
    if limit <= 0 or explanation.method not in BATCHED_METHODS:
        return []
    candidates = compatible_queued(explanation).exclude(pk=explanation.pk)
    return [str(pk) for pk in candidates.order_by("created_at").values_list("pk", flat=True)[:limit]]


def claim_compatible(*, explanation: Explanation, limit: int, worker_id: str, exclude=(),
                     full: bool = False) -> list[Explanation]:  # fmt: skip
    """Claim up to `limit` explanations that can share this one's Captum call, oldest first, in one
    statement (see predictions.claim_oldest_queued); with `full`, only when `limit` are waiting."""
    if limit <= 0 or explanation.method not in BATCHED_METHODS:
        return []
    waiting = compatible_queued(explanation).exclude(pk__in=[explanation.pk, *exclude])
    if full and waiting.order_by()[:limit].count() < limit:
        return []
    oldest = first_of(waiting.order_by("created_at"), limit)
    now = timezone.now()
    claimed = update_returning(oldest.filter(state=Explanation.State.QUEUED, attempts=0),
                               state=Explanation.State.PROCESSING, claimed_at=now, claimed_by=worker_id,
                               attempts=F("attempts") + 1)  # fmt: skip
    return sorted(_with_relations(claimed), key=lambda row: row.created_at)


def _with_relations(rows: list[Explanation]) -> list[Explanation]:
    """The image and model version of claimed rows, in one query each for the lot."""
    if rows:
        prefetch_related_objects(rows, "image", "model_version")
    return rows


def release_explanation(*, explanation_id: str, worker_id: str) -> None:
    """Give our claim back after a temporary error (database, storage): it is queued again, and the
    attempt is not counted towards MAX_PROCESSING_ATTEMPTS. The sweeper sends it again if its own
    message was already spent."""
    _release(Explanation.objects.filter(pk=explanation_id), worker_id)


def release_explanations(*, worker_id: str) -> None:
    """release_explanation for every explanation this worker id has claimed, in one statement."""
    _release(Explanation.objects.all(), worker_id)


def _release(explanations, worker_id: str) -> None:
    explanations.filter(state=Explanation.State.PROCESSING, claimed_by=worker_id).update(
        state=Explanation.State.QUEUED, claimed_at=None, claimed_by="", attempts=Greatest(F("attempts") - 1, 0)
    )


def fail_explanation(*, explanation_id: str, reason: str, worker_id: str) -> None:
    failed = Explanation.objects.filter(pk=explanation_id, claimed_by=worker_id).exclude(state=Explanation.State.DONE)
    image_ids = list(failed.values_list("image_id", flat=True)[:1])
    if failed.update(state=Explanation.State.FAILED, error=reason[:2000], finished_at=timezone.now(), claimed_at=None):
        notify.changed(image_ids, notify.EXPLAINED)


def _read_and_decode(explanation: Explanation):
    """Always mlcore.preprocessing.decode_image (EXIF orientation, colour profile, draft mode)."""
    with explanation.image.file.open("rb") as handle:
        data = handle.read()
    return decode_image(data, max_bytes=1 << 31, max_pixels=settings.MAX_IMAGE_PIXELS, max_side=DISPLAY_MAX_SIDE)


class ExplanationWork(Work):
    label = "explanation"
    exhausted = "The explanation was started several times and never finished (the worker stopped each time)."
    too_long = "The explanation took too long and was stopped; try fewer steps or samples."

    def claim(self, ids, worker_id):
        return claim_explanations(explanation_ids=ids, worker_id=worker_id)

    def gather(self, first, *, exclude, limit, worker_id, full=False):
        if first is None:
            return []
        return claim_compatible(explanation=first, limit=limit, worker_id=worker_id, exclude=exclude, full=full)

    def batch_size(self, first) -> int:
        if first is None or first.method not in BATCHED_METHODS:
            return 1
        return explain_batch_size(first.params)

    def fail(self, item_id, reason, worker_id):
        fail_explanation(explanation_id=item_id, reason=reason, worker_id=worker_id)

    def release(self, item_id, worker_id):
        release_explanation(explanation_id=item_id, worker_id=worker_id)

    def release_all(self, worker_id):
        release_explanations(worker_id=worker_id)

    def open(self, engine: Engine, batch: Batch):
        """The explainer of the batch's model version (one version per batch: gathered so)."""
        first = batch.items[0]
        if engine.batches == 1:
            set_image_id(first.image_id)  # this task's log lines are about its own image
        try:
            return explainer_for(first.model_version)
        except DATABASE_ERRORS:
            raise
        except (ConnectionError, TimeoutError, *bucket_errors()) as exc:  # the weights could not be fetched
            for explanation in batch.items:
                engine.give_back(str(explanation.pk))
            raise TransientError(str(exc)) from exc
        except Exception as exc:
            logger.exception("the explainer of model %s cannot be built", first.model_version.version)
            for explanation in batch.items:  # not the gathered ones' fault: they wait for their own messages
                if str(explanation.pk) in engine.own:
                    engine.fail(str(explanation.pk), f"The explanation could not be computed (internal error: "
                                                     f"{type(exc).__name__}).")  # fmt: skip
                else:
                    engine.give_back(str(explanation.pk))
            return None

    def prepare(self, engine: Engine, batch: Batch):
        if len(batch.items) == 1:  # one photo: in this thread, no hand-off
            return [done_future(_read_and_decode, batch.items[0])]
        return [decoder_pool().submit(_read_and_decode, explanation) for explanation in batch.items]

    def read_fault(self, exc):
        if isinstance(exc, FileNotFoundError):
            return "The stored image file is missing."
        if isinstance(exc, ImageValidationError):
            return f"The stored image could not be read: {exc.message}"
        if isinstance(exc, storage_errors()):
            return None
        raise exc

    def run(self, explainer, group):
        """Integrated Gradients of several photos: one call."""
        first = group[0][0]
        if len(group) == 1:
            return [explainer.explain(group[0][1].image, first.method, first.params, first.target_index)]
        return explainer.explain_batch([decoded.image for _, decoded in group], first.method, first.params,
                                       [explanation.target_index for explanation, _ in group])  # fmt: skip

    def run_failed(self, exc):
        return f"The explanation could not be computed (internal error: {type(exc).__name__})."

    def record(self, engine: Engine, batch: Batch, group, outputs) -> None:
        for (explanation, decoded), result in zip(group, outputs, strict=True):
            explanation_id = str(explanation.pk)
            try:
                store_result(explanation=explanation, image=decoded.image, attribution_map=result.map, raw=result.raw,
                             seconds=result.seconds, convergence_delta=result.convergence_delta)  # fmt: skip
            except DATABASE_ERRORS:
                raise
            except storage_errors() as exc:  # storage briefly unavailable
                logger.warning("explanation %s could not be stored now (%s)", explanation_id, type(exc).__name__)
                engine.give_back(explanation_id, exc)
            except Exception as exc:
                logger.exception("explanation %s could not be stored", explanation_id)
                engine.fail(explanation_id, f"The explanation could not be stored (internal error: "
                                            f"{type(exc).__name__}).")  # fmt: skip
            else:
                engine.outcomes[explanation_id] = "done"


def compute_explanation(*, explanation_id: str, worker_id: str, gather: int | None = None) -> str:
    """Returns 'done', 'failed' or 'skipped'. Bad or unreadable inputs end failed with a reason.

    An Integrated Gradients explanation on its first attempt takes other queued ones of the same model
    version and parameters into one Captum call (up to `gather`, by default EXPLAIN_BATCH_SIZE - 1, and
    the limit of steps per batch), and further batches follow while such explanations are queued."""
    return compute_explanations(explanation_ids=[explanation_id], worker_id=worker_id, gather=gather)[explanation_id]


def compute_explanations(*, explanation_ids: list[str], worker_id: str, gather: int | None = None) -> dict[str, str]:
    """The engine on explanations: the first ids are the task's own. Returns an outcome per id: 'done',
    'failed', 'skipped' or 'released'. A database error anywhere gives back every claim of this call that
    has no outcome yet and becomes a TransientError, for the task's bounded retry."""
    if gather is None:
        gather = settings.EXPLAIN_BATCH_SIZE - 1
    engine = Engine(ExplanationWork(), ids=list(explanation_ids), worker_id=worker_id, gather=gather,
                    pipeline=gather > 0)  # fmt: skip
    return engine.run()
