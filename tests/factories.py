from __future__ import annotations

import factory
from django.contrib.auth import get_user_model

from diagnosis.models import BodySite, Clinic, ClinicMembership, Lesion, Patient


class ClinicFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Clinic
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"Clinic {n}")


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.PostGenerationMethodCall("set_password", "correct-horse-battery")

    @factory.post_generation
    def save_password(obj, create, extracted, **kwargs):
        if create:
            obj.save()


class ClinicianFactory(UserFactory):
    membership = factory.RelatedFactory(
        "tests.factories.MembershipFactory", factory_related_name="user", clinic=factory.SubFactory(ClinicFactory)
    )


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ClinicMembership

    user = factory.SubFactory(UserFactory)
    clinic = factory.SubFactory(ClinicFactory)


class PatientFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Patient

    clinic = factory.SubFactory(ClinicFactory)
    reference = factory.Sequence(lambda n: f"PT-{n:04d}")


class LesionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Lesion

    patient = factory.SubFactory(PatientFactory)
    body_site = BodySite.BACK


def grant(user, *codenames: str):
    """Give `user` these permissions of the diagnosis app (e.g. "view_driftreport") and return it, read
    again so that no permission cache of the old object hides them."""
    from django.contrib.auth.models import Permission

    permissions = list(Permission.objects.filter(content_type__app_label="diagnosis", codename__in=codenames))
    assert {permission.codename for permission in permissions} == set(codenames), codenames
    user.user_permissions.add(*permissions)
    return type(user).objects.get(pk=user.pk)
