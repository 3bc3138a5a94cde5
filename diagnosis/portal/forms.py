from __future__ import annotations

from django import forms
from django.contrib.auth import authenticate
from django.db.models import F

from ..models import BodySite, Diagnosis, ImageState, RiskDecision, pseudonymous_reference


class PatientForm(forms.Form):
    reference = forms.CharField(
        label="Pseudonymous reference",
        max_length=64,
        validators=[pseudonymous_reference],
        help_text="A code such as PT-0042. Never enter a patient's name, date of birth or record number.",
        widget=forms.TextInput(attrs={"autocomplete": "off", "placeholder": "PT-0042", "spellcheck": "false"}),
    )


class LesionForm(forms.Form):
    body_site = forms.ChoiceField(label="Body site", choices=[("", "Choose a body site…"), *BodySite.choices])
    note = forms.CharField(
        label="Note",
        required=False,
        max_length=2000,
        help_text="For example size, shape, or why it is followed. No names.",
        widget=forms.Textarea(attrs={"rows": 2}),
    )


class AssessmentForm(forms.Form):
    agrees = forms.TypedChoiceField(
        label="Do you agree with the model's result?",
        choices=[("yes", "I agree with the result"), ("no", "I disagree with the result")],
        coerce=lambda value: value == "yes",
        widget=forms.RadioSelect,
    )
    note = forms.CharField(label="Comment", required=False, max_length=1000, widget=forms.Textarea(attrs={"rows": 2}))


class OutcomeForm(forms.Form):
    diagnosis = forms.ChoiceField(
        label="Histopathology outcome", choices=[("", "Choose the outcome…"), *Diagnosis.choices]
    )
    note = forms.CharField(
        label="Report reference or comment", required=False, max_length=1000, widget=forms.Textarea(attrs={"rows": 2})
    )


class TokenForm(forms.Form):
    name = forms.CharField(
        label="Token name",
        max_length=100,
        help_text="Which system will use it, e.g. 'EHR integration'.",
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )
    expires_in_days = forms.TypedChoiceField(
        label="Expires after",
        choices=[("30", "30 days"), ("90", "90 days"), ("365", "1 year")],
        coerce=int,
        initial="90",
    )
    # A token outlives the session: whoever holds a session (a stolen one, say) must also know the password.
    password = forms.CharField(
        label="Your password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}),
        help_text="A token works without you being signed in, so creating one asks for your password again.",
    )

    def __init__(self, *args, request=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.request = request

    def clean_password(self) -> str:
        """Through authenticate(), so that django-axes counts a wrong guess like a failed sign-in and locks
        the account out after AXES_FAILURE_LIMIT: a stolen session cannot try passwords here at will."""
        password = self.cleaned_data["password"]
        user = self.request.user if self.request is not None else None
        if user is None or authenticate(self.request, username=user.get_username(), password=password) is None:
            raise forms.ValidationError("That is not your password.")
        return password


RISK_BANDS = [
    ("", "Any risk"),
    ("above", "Above referral threshold"),
    ("below", "Below referral threshold"),
    ("uncertain", "Uncertain: specialist review"),
    ("not_assessable", "Not assessable: photo refused"),
]


class HistoryFilterForm(forms.Form):
    state = forms.ChoiceField(label="State", required=False, choices=[("", "Any state"), *ImageState.choices])
    band = forms.ChoiceField(label="Risk", required=False, choices=RISK_BANDS)
    date_from = forms.DateField(label="From", required=False, widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(label="To", required=False, widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self):
        data = super().clean()
        if data.get("date_from") and data.get("date_to") and data["date_from"] > data["date_to"]:
            raise forms.ValidationError("The 'From' date is after the 'To' date.")
        return data


def filter_by_band(queryset, band: str):
    """History's risk filter over the latest prediction: above or below the threshold (photos the gate found
    uncertain or not assessable are neither), uncertain, or not assessable."""
    if band in (RiskDecision.UNCERTAIN, RiskDecision.NOT_ASSESSABLE):
        return queryset.filter(state=ImageState.DONE, latest_decision=band)
    if band not in ("above", "below"):
        return queryset
    queryset = queryset.filter(state=ImageState.DONE).exclude(
        latest_decision__in=[RiskDecision.UNCERTAIN, RiskDecision.NOT_ASSESSABLE]
    )
    if band == "above":
        return queryset.filter(latest_probability__gte=F("latest_threshold"))
    return queryset.filter(latest_probability__lt=F("latest_threshold"))
