"""`train_model`: train on a labelled folder (optionally a sweep), evaluate, and register the best."""

from __future__ import annotations

import dataclasses
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone

from mlcore.subgroups import format_subgroup_table

from ..models import ModelVersion, TrainingRun
from .registry import PromotionBlocked, activate_model, cached_weights_path, register_model


@dataclass
class TrainingReport:
    checkpoint_path: Path
    model_version: ModelVersion | None
    evaluation: dict
    runs: list[TrainingRun] = field(default_factory=list)
    interrupted: bool = False
    activation_refused: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=settings.BASE_DIR, capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def train_and_register(
    *,
    data_dir,
    config,
    output: Path,
    version: str | None = None,
    activate: bool = False,
    force: bool = False,
    sweep: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainingReport:
    """Train one model (or every trial of a sweep, selected on validation AUC), evaluate the chosen
    one on the test set, write its checkpoint to `output`, and register it. `data_dir`: an image folder, or
    a metadata table (data_source's mlcore.sources.TableSource).

    Raises ValidationError for unusable data; nothing is registered then. On Ctrl-C during training
    the best epoch so far is evaluated and written to `output`, and is not registered.
    """
    from mlcore.model import save_checkpoint
    from mlcore.pipeline import finalize

    started = time.perf_counter()
    if version and ModelVersion.objects.filter(version=version).exists():
        raise ValidationError(f"Model version {version!r} already exists; choose another --name.")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    prepared, configs = _prepare(data_dir, config, sweep, progress=progress, log=log)
    sweep_id = uuid.uuid4() if sweep else None
    trials = _Trials(prepared, output, sweep_id=sweep_id, progress=progress, log=log)
    for index, candidate in enumerate(configs, start=1):
        if not trials.run(index, candidate, total=len(configs)):
            break
    if trials.best is None:
        raise ValidationError("Every trial of the sweep failed; see the errors above.")
    run, result = trials.best
    outcome = finalize(
        prepared, result, started=started, extra_provenance={"git_commit": git_commit(), "sweep": str(sweep_id or "")}
    )
    save_checkpoint(outcome.model, outcome.meta, output)
    report = TrainingReport(
        output, None, outcome.evaluation, trials.runs, trials.interrupted, skipped=prepared.data.skipped
    )
    if not trials.interrupted:
        _register(report, outcome, run, version=version, activate=activate, force=force)
    return report


def _prepare(data_dir: str | Path, config, sweep: dict | None, *, progress: bool, log: Callable[[str], None]):
    """The data split for training and the configurations to train (one, or a sweep's trials); logs what
    was found. Unusable data or an invalid sweep raise ValidationError."""
    from mlcore.datasets import DataError
    from mlcore.pipeline import prepare_data, sweep_configs

    try:
        prepared = prepare_data(data_dir, image_size=config.input_size, seed=config.seed, progress=progress, log=log)
        configs = sweep_configs(sweep, config, seed=config.seed) if sweep else [config]
    except (DataError, ValueError) as exc:
        raise ValidationError(str(exc)) from None
    data = prepared.data
    if data.skipped:
        log(f"Skipped {len(data.skipped)} unreadable file(s), e.g. {data.skipped[0][0]}: {data.skipped[0][1]}")
    if data.skipped_rows:
        first = data.skipped_rows[0]
        log(
            f"Skipped {len(data.skipped_rows)} row(s) with an ignored label, e.g. row {first['row']}: {first['reason']}"
        )
    log(
        f"Data: {len(prepared.train.items)} training, {len(prepared.validation.items)} validation and "
        f"{len(data.test.items)} test images; classes {', '.join(data.class_names)}"
        + (f"; malignant: {', '.join(data.malignant)}." if data.malignant else ".")
    )
    if data.grouped:
        log("Splits keep every lesion and every patient on one side (by the table's lesion and patient ids).")
    return prepared, configs


class _Trials:
    """The trials of one training (one, or a sweep's): each recorded as a TrainingRun, the best kept on
    validation AUC. A trial that is interrupted stops the sweep."""

    def __init__(self, prepared, output: Path, *, sweep_id, progress: bool, log: Callable[[str], None]) -> None:
        self.prepared = prepared
        self.output = output
        self.sweep_id = sweep_id
        self.progress = progress
        self.log = log
        self.runs: list[TrainingRun] = []
        self.best: tuple[TrainingRun, object] | None = None
        self.interrupted = False

    def run(self, index: int, candidate, *, total: int) -> bool:
        """Train one candidate; False once training was interrupted (no further trial runs)."""
        from mlcore.model import CheckpointError, save_checkpoint
        from mlcore.pipeline import train_candidate

        sweep, output, data = self.sweep_id is not None, self.output, self.prepared.data
        if sweep:
            changed = {k: getattr(candidate, k) for k in ("arch", "lr", "batch_size", "epochs", "weight_decay")}
            self.log(f"Trial {index}/{total}: {changed}")
        run = TrainingRun.objects.create(
            sweep=self.sweep_id, data_directory=(data.source or str(data.root))[:500],
            data_sha256=data.file_list_sha256, config=dataclasses.asdict(candidate),
        )  # fmt: skip
        self.runs.append(run)
        trial_output = output if not sweep else output.with_name(f"{output.stem}-trial{index}{output.suffix}")

        def keep_best(model, meta, path=trial_output):
            save_checkpoint(model, meta, path)

        try:
            result = train_candidate(
                self.prepared, candidate, progress=self.progress, on_improve=keep_best, log=self.log
            )
        except KeyboardInterrupt:
            _finish(run, TrainingRun.Status.INTERRUPTED, error="Interrupted before the first epoch finished.")
            raise
        except (CheckpointError, RuntimeError, ValueError) as exc:
            _finish(run, TrainingRun.Status.FAILED, error=str(exc))
            if not sweep:
                raise ValidationError(f"Training failed: {exc}") from exc
            self.log(f"Trial {index} failed: {exc}")
            return True
        validation = result.meta.metrics.get("validation", {})
        _finish(
            run,
            TrainingRun.Status.INTERRUPTED if result.interrupted else TrainingRun.Status.FINISHED,
            metrics={**validation, "history": result.history},
        )
        best = self.best
        if best is None or validation.get("auc", -1) > best[1].meta.metrics["validation"].get("auc", -1):
            self.best = (run, result)
        if result.interrupted:
            self.interrupted = True
            return False
        return True


def _register(report: TrainingReport, outcome, run: TrainingRun, *, version: str | None, activate: bool,
              force: bool) -> None:  # fmt: skip
    """Register the checkpoint written to report.checkpoint_path, mark its run as the selected one, and
    activate it if asked (a refusal is recorded in the report)."""
    with open(report.checkpoint_path, "rb") as handle:
        model_version = register_model(
            checkpoint=handle.read(), version=version, plots=outcome.plots, provenance=outcome.provenance,
            reference_features=outcome.reference_features,
            drift_projection=outcome.drift_projection,
            quality_gate=outcome.quality_gate,
        )  # fmt: skip
    TrainingRun.objects.filter(pk=run.pk).update(selected=True, model_version=model_version)
    report.model_version = model_version
    if activate:
        try:
            activate_model(model_version=model_version, force=force)
        except PromotionBlocked as exc:
            report.activation_refused = exc.messages[0]


def _finish(run: TrainingRun, status: str, *, metrics: dict | None = None, error: str = "") -> None:
    run.status = status
    run.metrics = metrics or {}
    run.error = error
    run.finished_at = timezone.now()
    run.save(update_fields=["status", "metrics", "error", "finished_at"])


def evaluate_registered_model(
    *, model_version: ModelVersion, data_dir, progress: bool = True, log: Callable[[str], None] = print
) -> dict:
    """Re-evaluate a registered model on a labelled folder or a metadata table (data_source), with the
    metrics of training and the subgroup table."""
    from mlcore.datasets import DataError, load_evaluation_folder
    from mlcore.evaluation import evaluate_split, subgroup_report
    from mlcore.model import load_checkpoint
    from mlcore.sources import TableSource, load_evaluation_table

    model, meta = load_checkpoint(cached_weights_path(model_version))
    try:
        if isinstance(data_dir, TableSource):
            trained = (model_version.provenance or {}).get("data") or {}
            seed = int(((model_version.provenance or {}).get("config") or {}).get("seed", 0))
            same = (trained["file_list_sha256"], seed) if trained.get("test_split_made") else None
            split = load_evaluation_table(
                data_dir, class_names=meta.class_names, malignant=meta.malignant_classes, image_size=meta.input_size,
                trained_on=same, progress=progress, log=log,
            )  # fmt: skip
        else:
            split = load_evaluation_folder(
                data_dir, class_names=meta.class_names, image_size=meta.input_size, progress=progress
            )
    except DataError as exc:
        raise ValidationError(str(exc)) from None
    report = evaluate_split(model, meta, split)
    scores = report.pop("_scores")
    report["subgroups"] = subgroup_report(split, scores["labels"], scores["calibrated"], meta.threshold)
    report["skipped"] = split.skipped
    return report


def data_source(
    *, data=None, metadata=None, images=None, format: str | None = None, columns: dict | None = None,
    malignant=None, test_split=None,
):  # fmt: skip
    """What to train or evaluate on, from the commands' options: an image folder (`data`) or a metadata CSV
    (mlcore.sources.TableSource) with its images folder (default: the CSV's folder), a preset format or a
    column mapping, a malignant set (a list, or names separated by commas) and a CSV of official test ids.
    ValidationError when the options do not make one source."""
    from mlcore.datasets import DataError
    from mlcore.sources import table_source

    if data is not None and metadata is not None:
        raise ValidationError("Give either --data (an image folder) or --metadata (a CSV), not both.")
    if metadata is None:
        if data is None:
            raise ValidationError("Say what to train on: --data DIR (an image folder) or --metadata CSV --images DIR.")
        if any(value for value in (images, format, columns, malignant, test_split)):
            raise ValidationError("--images, --format, columns, --malignant and --test-split go with --metadata CSV.")
        return Path(data)
    if isinstance(malignant, str):
        malignant = [name.strip() for name in malignant.split(",") if name.strip()]
    try:
        return table_source(
            metadata, images if images is not None else Path(metadata).parent, format=format, columns=columns,
            malignant=malignant or None, test_ids=test_split,
        )  # fmt: skip
    except DataError as exc:
        raise ValidationError(str(exc)) from None


# --- what the training commands need from mlcore (torch: loaded only when a command trains) --------------


def train_config(**values):
    """A mlcore.train.TrainConfig."""
    from mlcore.train import TrainConfig

    return TrainConfig(**values)


def architectures() -> tuple[str, ...]:
    from mlcore.model import ARCHITECTURES

    return tuple(ARCHITECTURES)


def metrics_table(metrics: dict) -> str:
    """The test metrics as the table training prints."""
    from mlcore.pipeline import format_metrics_table

    return format_metrics_table(metrics)


def report_lines(evaluation: dict) -> list[str]:
    """What a test report says beyond the metrics table, in plain text: the group leakage check beside the
    near-duplicate one, every diagnosis's one-vs-rest AUC and recall with the balanced accuracy (a model with
    several classes), and the subgroup table with the gaps it found."""
    lines = []
    leakage = evaluation.get("leakage") or {}
    groups = leakage.get("groups")
    if groups:
        lines.append(
            f"Group check: {groups['lesions']['shared']} lesion(s) and {groups['patients']['shared']} patient(s) of "
            f"the test set are also in training ({groups['affected']} test images)."
        )
    diagnoses = (evaluation.get("test") or {}).get("diagnoses")
    if diagnoses:
        lines.append(
            f"Diagnoses: balanced accuracy {diagnoses['balanced_accuracy']:.3f}, accuracy {diagnoses['accuracy']:.3f}"
        )
        lines.append(f"  {'class':<12}{'cases':>8}{'AUC (1 vs rest)':>18}{'recall':>10}")
        for name, row in diagnoses["per_class"].items():
            auc = f"{row['auc']:.3f}" if row["auc"] is not None else "—"
            recall = f"{row['recall']:.3f}" if row["recall"] is not None else "—"
            lines.append(f"  {name:<12}{row['n']:>8}{auc:>18}{recall:>10}")
    subgroups = evaluation.get("subgroups")
    if subgroups:
        lines += ["", "By subgroup (95% intervals; * too few cases to judge):", format_subgroup_table(subgroups)]
        for gap in subgroups.get("gaps") or []:
            lines.append(
                f"Gap: {gap['attribute']} = {gap['group']}: sensitivity {gap['sensitivity']:.3f} against "
                f"{gap['overall_sensitivity']:.3f} overall ({gap['n_positive']} malignant cases)."
            )
    return lines
