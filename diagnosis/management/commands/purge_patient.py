"""Erase one patient and every stored file of theirs (audited)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from diagnosis.models import Clinic, Patient
from diagnosis.services.retention import purge_patient


class Command(BaseCommand):
    help = "Erase a patient (by reference) with all lesions, images, results, heatmaps, outcomes and files."

    def add_arguments(self, parser):
        parser.add_argument("reference")
        parser.add_argument("--clinic", help="The clinic's name (needed when several clinics use the reference).")
        parser.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")

    def handle(self, *args, reference, clinic=None, yes=False, **options):
        patients = Patient.objects.filter(reference=reference)
        if clinic:
            if not Clinic.objects.filter(name=clinic).exists():
                raise CommandError(f"No clinic is named {clinic!r}.")
            patients = patients.filter(clinic__name=clinic)
        found = list(patients.select_related("clinic"))
        if not found:
            raise CommandError(f"No patient has the reference {reference!r}" + (f" in {clinic!r}." if clinic else "."))
        if len(found) > 1:
            names = ", ".join(sorted(p.clinic.name for p in found))
            raise CommandError(f"Several clinics have a patient {reference!r} ({names}); name one with --clinic.")
        patient = found[0]
        if not yes:
            answer = input(f"Erase patient {reference} of {patient.clinic.name} and every file of theirs? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                raise CommandError("Nothing was erased.")
        counts = purge_patient(patient=patient, via="cli")
        self.stdout.write(
            f"Erased patient {reference}: {counts['lesions']} lesions, {counts['images']} images, "
            f"{counts['files']} stored files."
        )
