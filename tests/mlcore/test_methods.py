"""mlcore.methods: the explanation methods as plain data, importable without PyTorch (the web tier)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlcore import explain, methods

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_methods_does_not_import_torch():
    code = "import mlcore.methods, sys; assert 'torch' not in sys.modules, 'mlcore.methods imported torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_methods_are_the_ones_explain_computes_and_stay_importable_from_it():
    assert tuple(explain._PARAMETERS) == methods.METHODS
    assert set(methods.METHOD_LABELS) == set(methods.METHODS)
    assert methods.PIXEL_LEVEL.issubset(methods.METHODS) and methods.SIGNED.issubset(methods.METHODS)
    assert explain.METHOD_LABELS is methods.METHOD_LABELS and explain.PIXEL_LEVEL is methods.PIXEL_LEVEL
    assert explain.METHODS is methods.METHODS and explain.SIGNED is methods.SIGNED


def test_an_unknown_method_is_shown_as_stored():
    assert methods.method_label("gradcam") == "Grad-CAM"
    assert methods.method_label("retired_method") == "retired_method"
