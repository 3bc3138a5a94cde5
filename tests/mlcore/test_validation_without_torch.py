"""Validating an explanation request is torch-free: mlcore.methods holds the parameters and their checks,
and the web tier's service (diagnosis.services.explanations) validates a request without loading PyTorch.

The Django part runs in a subprocess (nothing in this test process imports Django, see conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlcore import explain, methods

ROOT = Path(__file__).resolve().parents[2]

_WEB_REQUEST = """
import sys
import django

django.setup()

from diagnosis.models import ModelVersion
from diagnosis.services import explanations

version = ModelVersion(input_size=64)
assert explanations._validate("occlusion", None, version) == {"baseline": "blurred", "stride": 4, "window": 8}
try:
    explanations._validate("integrated_gradients", {"n_steps": 10**6}, version)
except explanations.ExplanationRefused as refused:
    assert refused.error_code == "over_budget", refused.error_code
else:
    raise AssertionError("an over-budget request was accepted")
loaded = sorted(name for name in sys.modules if name.split(".")[0] in {"torch", "torchvision", "captum"})
assert not loaded, f"validating an explanation request loaded {loaded[:5]}"
"""


def test_a_web_request_validates_an_explanation_without_loading_torch():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "webapp.settings.test"}
    result = subprocess.run(
        [sys.executable, "-c", _WEB_REQUEST], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_validating_parameters_in_mlcore_methods_does_not_import_torch():
    code = (
        "import sys\n"
        "from mlcore.methods import ExplanationError, validate_params\n"
        "assert validate_params('integrated_gradients', {}, input_size=64) == {'baseline': 'blurred', 'n_steps': 50}\n"
        "try:\n"
        "    validate_params('lime', {'n_segments': 1}, input_size=64)\n"
        "except ExplanationError as error:\n"
        "    assert error.code == 'invalid_params'\n"
        "else:\n"
        "    raise AssertionError('accepted')\n"
        "assert 'torch' not in sys.modules, 'validate_params imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_moved_names_stay_importable_from_mlcore_explain():
    assert explain.ExplanationError is methods.ExplanationError
    assert explain.validate_params is methods.validate_params
    assert explain.evaluations is methods.evaluations
    assert explain._PARAMETERS is methods._PARAMETERS
    assert explain.DEFAULT_MAX_STEPS == methods.DEFAULT_MAX_STEPS
    assert explain.DEFAULT_MAX_EVALUATIONS == methods.DEFAULT_MAX_EVALUATIONS


def test_an_unknown_method_is_refused_with_a_stable_code():
    with pytest.raises(methods.ExplanationError) as caught:
        methods.validate_params("retired_method", {}, input_size=64)
    assert caught.value.code == "unknown_method"
    with pytest.raises(methods.ExplanationError):
        methods.evaluations("retired_method", {}, 64)
