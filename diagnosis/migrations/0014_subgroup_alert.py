"""MonitoringAlert.Kind gains SUBGROUP (issue 21): a subgroup's sensitivity on confirmed outcomes falls short
of the overall sensitivity (services.subgroup_monitoring)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("diagnosis", "0013_model_malignant_classes")]

    operations = [
        migrations.AlterField(
            model_name="monitoringalert",
            name="kind",
            field=models.CharField(
                choices=[
                    ("drift", "Data drift"),
                    ("failures", "Share of failed uploads"),
                    ("latency", "Processing latency"),
                    ("quality", "Share of photos not assessable"),
                    ("subgroup", "Sensitivity gap in a subgroup"),
                ],
                max_length=20,
            ),
        ),
    ]
