"""ModelVersion.malignant_classes (issue 21): the diagnoses whose probabilities add up to the malignancy
probability. A version registered before it takes its checkpoint's positive class."""

from django.db import migrations, models


def fill_malignant_classes(apps, schema_editor):
    ModelVersion = apps.get_model("diagnosis", "ModelVersion")
    for version in ModelVersion.objects.filter(malignant_classes=[]):
        metadata = version.metadata or {}
        chosen = metadata.get("malignant_classes") or [metadata.get("positive_class") or version.class_names[-1]]
        version.malignant_classes = list(chosen)
        version.save(update_fields=["malignant_classes"])


class Migration(migrations.Migration):
    dependencies = [("diagnosis", "0012_quality_alert")]

    operations = [
        migrations.AddField(
            model_name="modelversion",
            name="malignant_classes",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text="The classes whose probabilities add up to the malignancy probability (empty: the last class)",
            ),
        ),
        migrations.RunPython(fill_malignant_classes, migrations.RunPython.noop),
    ]
