from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.core.files.storage import default_storage
from django.http import FileResponse, Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from .models import (
    ApiToken,
    AuditEvent,
    Clinic,
    ClinicMembership,
    DriftReport,
    Feedback,
    Lesion,
    LesionImage,
    ModelActivation,
    ModelVersion,
    MonitoringAlert,
    Patient,
    Prediction,
    TrainingRun,
)
from .services.model_card import model_card
from .services.quality import LEGACY_NOTE
from .services.registry import (
    PromotionBlocked,
    activate_model,
    active_model_version,
    auc_drop,
    compare_models,
    rollback_model,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records nobody may add, edit or delete by hand: the audit log and the activation history."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Clinic)
class ClinicAdmin(admin.ModelAdmin):
    list_display = ["name", "quality_check", "created_at"]
    list_editable = ["quality_check"]  # the photo-quality check for the clinic's uploads (issue 20)


@admin.register(ClinicMembership)
class ClinicMembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "clinic", "role"]
    list_filter = ["clinic", "role"]


@admin.register(Patient)
class PatientAdmin(admin.ModelAdmin):
    list_display = ["reference", "clinic", "created_at"]
    list_filter = ["clinic"]
    search_fields = ["reference"]

    def get_readonly_fields(self, request, obj=None):
        # A patient never changes clinic: their lesions' photos, predictions and notes belong to the clinic
        # that took them (LesionImage.clinic), and moving the patient would mix two clinics' records.
        return ["clinic"] if obj is not None else []


@admin.register(Lesion)
class LesionAdmin(admin.ModelAdmin):
    list_display = ["id", "patient", "body_site", "created_at"]
    list_filter = ["body_site"]

    def get_readonly_fields(self, request, obj=None):
        return ["patient"] if obj is not None else []  # as PatientAdmin: a lesion never changes patient


class PredictionInline(admin.TabularInline):
    model = Prediction
    extra = 0
    readonly_fields = ["model_version", "probability_malignant", "label", "threshold", "inference_ms", "created_at"]
    fields = readonly_fields
    can_delete = False


@admin.register(LesionImage)
class LesionImageAdmin(admin.ModelAdmin):
    list_display = ["id", "clinic", "state", "created_at", "processed_at", "attempts"]
    list_filter = ["state", "clinic"]
    # The file is shown by name only: media has no public URL, and the admin is not a viewer.
    exclude = ["file"]
    readonly_fields = [
        "stored_file", "drift_feature_table", *[f.name for f in LesionImage._meta.fields if f.name != "file"]
    ]  # fmt: skip
    inlines = [PredictionInline]

    @admin.display(description="stored file")
    def stored_file(self, obj):
        return obj.file.name

    @admin.display(description="drift features against the reference set")
    def drift_feature_table(self, obj):
        """Each feature beside the reference distribution of the model that scored the upload: the
        reference's 1st percentile, median and 99th percentile, and where this upload falls."""
        features = getattr(obj, "drift_features", None) if obj.pk else None
        if features is None:
            return "Not computed (the upload has not been scored yet, or failed)."
        rows = format_html_join(
            "",
            "<tr{}><td>{}</td><td class='num'>{}</td><td class='num'>{}</td><td class='num'>{}</td>"
            "<td class='num'>{}</td><td class='num'>{}</td><td>{}</td></tr>",
            (
                (
                    mark_safe(" style='color:#b42318;font-weight:600'") if row["outlier"] else "",
                    row["feature"], _number(row["value"]), _number(row["reference_p1"]),
                    _number(row["reference_median"]), _number(row["reference_p99"]), f"{row['percentile']:.1f}",
                    f"outlier ({row['direction']})" if row["outlier"] else "",
                )
                for row in features.placement
            ),
        )  # fmt: skip
        return format_html(
            "<table><thead><tr><th>feature</th><th>value</th><th>reference 1%</th><th>median</th>"
            "<th>99%</th><th>percentile</th><th>flag</th></tr></thead><tbody>{}</tbody></table>"
            "<p>Compared with the reference set of {}.</p>",
            rows, features.model_version.version,
        )  # fmt: skip

    def has_add_permission(self, request):
        return False  # uploads go through the API or the portal, which validate and strip metadata

    def has_delete_permission(self, request, obj=None):
        return False  # deleting must also delete files and be audited: a purge command does that


def _number(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, list) and len(value) == 2:
        return f"{value[0]:.3f}–{value[1]:.3f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


METRIC_ROWS = [
    ("n", "cases"), ("n_positive", "malignant cases"), ("auc", "AUC"), ("auc_ci95", "AUC 95% CI"),
    ("accuracy", "accuracy"), ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"),
    ("npv", "NPV"), ("ece_before_calibration", "ECE before calibration"), ("ece", "ECE (calibrated)"),
]  # fmt: skip


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["version", "arch", "input_size", "threshold", "test_auc", "is_active", "created_at"]
    exclude = ["weights"]
    readonly_fields = [
        "version", "arch", "input_size", "class_names", "threshold", "is_active", "activated_at", "created_at",
        "weights_file", "weights_sha256", "metrics_table", "comparison_with_active", "plot_images", "provenance",
        "metadata", "quality_gate_summary", "model_card_link",
    ]  # fmt: skip
    fields = readonly_fields
    actions = ["activate", "activate_forced", "roll_back"]

    def has_add_permission(self, request):
        return False  # models are registered by train_model / register_model, which check them

    @admin.display(description="test AUC")
    def test_auc(self, obj):
        return _number((obj.metrics or {}).get("test", {}).get("auc"))

    @admin.display(description="photo-quality gate")
    def quality_gate_summary(self, obj):
        """The thresholds, the OOD threshold and the band (mlcore.gate), or the note for a version without."""
        gate = obj.quality_gate or {}
        if not gate:
            return LEGACY_NOTE
        thresholds = format_html_join(
            "",
            "<tr><th>{}</th><td>{}</td></tr>",
            sorted((key, _number(value)) for key, value in gate["thresholds"].items()),
        )
        ood, band = gate.get("ood") or {}, gate.get("band") or [None, None]
        return format_html(
            "<table>{}<tr><th>out of distribution</th><td>score above {} ({} held-out photos, {} flagged)</td></tr>"
            "<tr><th>uncertain between</th><td>{} and {}</td></tr></table><p>Calibrated on {} photos; {}.</p>",
            thresholds, _number(ood.get("threshold")), ood.get("held_out"), ood.get("false_flag"), _number(band[0]),
            _number(band[1]), gate.get("reference_photos"), gate.get("band_source", ""),
        )  # fmt: skip

    @admin.display(description="model card")
    def model_card_link(self, obj):
        """The version's model card (services.model_card): intended use, data, metrics overall and by subgroup,
        known limits; Markdown."""
        return format_html('<a href="{}">Model card (Markdown)</a>', reverse("admin:diagnosis_modelversion_card",
                                                                            args=[obj.pk]))  # fmt: skip

    @admin.display(description="weights")
    def weights_file(self, obj):
        return obj.weights.name

    @admin.display(description="metrics")
    def metrics_table(self, obj):
        metrics = obj.metrics or {}
        columns = [
            (title, metrics.get(key))
            for key, title in (
                ("validation", "validation"), ("test", "test (all)"), ("test_deduplicated", "test (de-duplicated)")
            )
            if metrics.get(key)
        ]  # fmt: skip
        if not columns:
            return "—"
        header = format_html_join("", "<th>{}</th>", ((title,) for title, _ in columns))
        rows = format_html_join(
            "",
            "<tr><th>{}</th>{}</tr>",
            (
                (label, format_html_join("", "<td>{}</td>", ((_number(report.get(key)),) for _, report in columns)))
                for key, label in METRIC_ROWS
            ),
        )
        leakage = metrics.get("leakage")
        note = (
            format_html(
                "<p>{} of {} test images have a near-duplicate in the training folder.</p>",
                leakage["near_duplicates_in_train"], leakage["test_images"],
            )
            if leakage
            else ""
        )  # fmt: skip
        return format_html("<table><tr><th></th>{}</tr>{}</table>{}", header, rows, note)

    @admin.display(description="compared with the active model")
    def comparison_with_active(self, obj):
        current = active_model_version()
        if current is None or current.pk == obj.pk:
            return "This is the active model." if obj.is_active else "No model is active."
        rows = format_html_join(
            "", "<tr><th>{}</th><td>{}</td><td>{}</td></tr>",
            ((name, _number(old), _number(new)) for name, old, new in compare_models(obj, current)),
        )  # fmt: skip
        warning = ""
        if auc_drop(obj, current):
            warning = mark_safe(
                "<p><strong>Lower AUC than the active model: promotion needs the forced action.</strong></p>"
            )
        return format_html(
            "<table><tr><th></th><th>{} (active)</th><th>{}</th></tr>{}</table>{}", current.version, obj.version, rows,
            warning,
        )  # fmt: skip

    @admin.display(description="plots")
    def plot_images(self, obj):
        if not obj.plots:
            return "—"
        return format_html_join(
            "",
            '<figure style="display:inline-block;margin:0 1em 1em 0"><img src="{}" alt="{} plot" '
            'style="max-width:420px"><figcaption>{}</figcaption></figure>',
            (
                (reverse("admin:diagnosis_modelversion_plot", args=[obj.pk, name]), name.replace("_", " "),
                 name.replace("_", " "))
                for name in obj.plots
            ),
        )  # fmt: skip

    def get_urls(self):
        return [
            path(
                "<int:pk>/plot/<slug:name>/",
                self.admin_site.admin_view(self.plot_view),
                name="diagnosis_modelversion_plot",
            ),
            path("<int:pk>/card/", self.admin_site.admin_view(self.card_view), name="diagnosis_modelversion_card"),
            *super().get_urls(),
        ]

    def plot_view(self, request, pk: int, name: str):
        model_version = get_object_or_404(ModelVersion, pk=pk)
        if not self.has_view_permission(request, model_version) or name not in (model_version.plots or {}):
            raise Http404("No such plot.")
        try:
            handle = default_storage.open(model_version.plots[name], "rb")
        except FileNotFoundError:
            raise Http404("The plot file is missing.") from None
        response = FileResponse(handle, content_type="image/png")
        response["X-Content-Type-Options"] = "nosniff"
        return response

    def card_view(self, request, pk: int):
        model_version = get_object_or_404(ModelVersion, pk=pk)
        if not self.has_view_permission(request, model_version):
            raise Http404("No such model version.")
        response = HttpResponse(model_card(model_version), content_type="text/markdown; charset=utf-8")
        response["Content-Disposition"] = f'inline; filename="model-card-{model_version.pk}.md"'
        response["X-Content-Type-Options"] = "nosniff"
        return response

    def _activate(self, request, queryset, *, force: bool):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one model version.", level=messages.ERROR)
            return
        model_version = queryset.get()
        try:
            activate_model(model_version=model_version, actor=request.user, via="admin", force=force)
        except PromotionBlocked as exc:
            self.message_user(request, exc.messages[0], level=messages.ERROR)
            return
        self.message_user(request, f"{model_version.version} is now active.")

    @admin.action(description="Activate the selected version (refused if its AUC is lower)", permissions=["change"])
    def activate(self, request, queryset):
        self._activate(request, queryset, force=False)

    @admin.action(description="Activate the selected version even if its AUC is lower (forced)", permissions=["change"])
    def activate_forced(self, request, queryset):
        self._activate(request, queryset, force=True)

    @admin.action(description="Roll back to the previously active version", permissions=["change"])
    def roll_back(self, request, queryset):
        try:
            model_version = rollback_model(actor=request.user, via="admin")
        except ValidationError as exc:
            self.message_user(request, " ".join(exc.messages), level=messages.ERROR)
            return
        self.message_user(request, f"Rolled back: {model_version.version} is active again.")


@admin.register(ModelActivation)
class ModelActivationAdmin(ReadOnlyAdmin):
    list_display = ["activated_at", "model_version", "previous", "actor", "forced", "note"]


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "sweep", "status", "validation_auc", "selected", "model_version", "started_at"]
    list_filter = ["status", "selected"]
    readonly_fields = [f.name for f in TrainingRun._meta.fields]

    @admin.display(description="validation AUC")
    def validation_auc(self, obj):
        return _number((obj.metrics or {}).get("auc"))

    def has_add_permission(self, request):
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "token_key", "created", "expiry"]
    readonly_fields = ["digest", "token_key", "user", "created"]
    search_fields = ["name", "user__username"]

    def has_add_permission(self, request):
        return False  # tokens are created by the command (and later the portal), which shows them once


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    list_display = ["at", "actor_username", "action", "object_type", "object_id", "clinic", "via", "ip_address"]
    list_filter = ["action", "via", "clinic"]
    search_fields = ["actor_username", "object_id"]


@admin.register(DriftReport)
class DriftReportAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "status", "window_description", "current_count", "model_version", "triggered_by"]
    list_filter = ["status"]
    exclude = ["features"]

    def changelist_view(self, request, extra_context=None):
        return redirect("drift-dashboard")


@admin.register(MonitoringAlert)
class MonitoringAlertAdmin(ReadOnlyAdmin):
    list_display = ["kind", "opened_at", "closed_at", "reports_seen", "message"]
    list_filter = ["kind"]


@admin.register(Feedback)
class FeedbackAdmin(ReadOnlyAdmin):
    list_display = ["recorded_at", "kind", "agrees", "diagnosis", "ground_truth", "recorded_by", "image"]
    list_filter = ["kind", "ground_truth"]
