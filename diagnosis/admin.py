from django.contrib import admin

from .models import (
    ApiToken,
    AuditEvent,
    Clinic,
    ClinicMembership,
    Lesion,
    LesionImage,
    ModelVersion,
    Patient,
    Prediction,
)
from .services.registry import activate_model


@admin.register(Clinic)
class ClinicAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]


@admin.register(ClinicMembership)
class ClinicMembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "clinic", "role"]
    list_filter = ["clinic", "role"]


@admin.register(Patient)
class PatientAdmin(admin.ModelAdmin):
    list_display = ["reference", "clinic", "created_at"]
    list_filter = ["clinic"]
    search_fields = ["reference"]


@admin.register(Lesion)
class LesionAdmin(admin.ModelAdmin):
    list_display = ["id", "patient", "body_site", "created_at"]
    list_filter = ["body_site"]


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
    readonly_fields = [f.name for f in LesionImage._meta.fields]
    inlines = [PredictionInline]


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["version", "arch", "input_size", "threshold", "is_active", "created_at", "activated_at"]
    readonly_fields = ["weights", "weights_sha256", "metadata", "is_active", "activated_at"]
    actions = ["activate"]

    @admin.action(description="Activate the selected model version")
    def activate(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one model version to activate.", level="error")
            return
        model_version = queryset.get()
        activate_model(model_version=model_version, actor=request.user, via="admin")
        self.message_user(request, f"{model_version.version} is now active.")


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "token_key", "created", "expiry"]
    readonly_fields = ["digest", "token_key", "user", "created"]
    search_fields = ["name", "user__username"]

    def has_add_permission(self, request):
        return False  # tokens are created by the command (and later the portal), which shows them once


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["at", "actor_username", "action", "object_type", "object_id", "clinic", "via", "ip_address"]
    list_filter = ["action", "via", "clinic"]
    search_fields = ["actor_username", "object_id"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
