"""The explanation methods' names, labels and parameters, as plain data and plain Python.

Torch-free on purpose (no torch, no Django): the web tier (portal, API) reads these to label and list
the methods, and validates a request's parameters, without loading PyTorch. mlcore.explain, which
computes the attributions, imports them from here and re-exports them.
"""

from __future__ import annotations

import math
from typing import Any

METHOD_LABELS = {
    "integrated_gradients": "Integrated Gradients",
    "gradcam": "Grad-CAM",
    "occlusion": "Occlusion",
    "gradient_shap": "GradientSHAP",
    "smoothgrad": "SmoothGrad (IG)",
    "lime": "LIME",
}
METHODS = tuple(METHOD_LABELS)
SIGNED = set(METHODS)  # every map is signed: red towards the target class, blue away from it
PIXEL_LEVEL = {"integrated_gradients", "gradient_shap", "smoothgrad"}  # speckled: blurred for display
BASELINES = ("black", "blurred", "mean")


def method_label(method: str) -> str:
    """A method's name for people; an unknown method (a row from another release) is shown as stored."""
    return METHOD_LABELS.get(method, method)


DEFAULT_MAX_STEPS = 300  # IG steps per explanation
DEFAULT_MAX_EVALUATIONS = 2000  # model evaluations (forward, or forward + backward) per explanation


class ExplanationError(ValueError):
    """A request for an explanation that cannot be honoured; `code` is stable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- parameters --------------------------------------------------------------------------------------

_PARAMETERS: dict[str, dict[str, tuple]] = {
    # name: (type, default, low, high) for numbers; (str, default, choices) for strings
    # The default baseline is the blurred photo, not black: a black image looks like dark pigment,
    # the most melanoma-like thing there is, so against it even a malignant-looking lesion reads as
    # evidence *against* malignancy. Blurring keeps the colours and removes what the ABCD rule looks
    # at (asymmetry, border, colour variegation), which is what a clinician wants attributed.
    "integrated_gradients": {"n_steps": (int, 50, 2, None), "baseline": (str, "blurred", BASELINES)},
    "gradcam": {},
    "occlusion": {"window": (int, None, 4, None), "stride": (int, None, 1, None),
                  "baseline": (str, "blurred", BASELINES)},
    "gradient_shap": {"n_samples": (int, 32, 1, None), "stdevs": (float, 0.1, 0.0, 2.0)},
    "smoothgrad": {"n_samples": (int, 8, 1, 64), "stdevs": (float, 0.15, 0.0, 2.0), "n_steps": (int, 20, 2, None),
                   "baseline": (str, "blurred", BASELINES)},
    "lime": {"n_segments": (int, 40, 4, 400), "n_samples": (int, 200, 10, None),
             "baseline": (str, "blurred", BASELINES)},
}  # fmt: skip
# tests/mlcore/test_methods.py checks that _PARAMETERS names the same methods as METHOD_LABELS.


def evaluations(method: str, params: dict[str, Any], input_size: int) -> int:
    """How many model evaluations a request costs: the budget is checked against this."""
    if method == "integrated_gradients":
        return params["n_steps"]
    if method == "gradcam":
        return 1
    if method == "occlusion":
        positions = math.ceil((input_size - params["window"]) / params["stride"] + 1) ** 2
        return positions + 1
    if method == "gradient_shap":
        return params["n_samples"]
    if method == "smoothgrad":
        return params["n_samples"] * params["n_steps"]
    if method == "lime":
        return params["n_samples"]
    raise ExplanationError("unknown_method", f"Unknown method {method!r}.")


def validate_params(
    method: str,
    params: dict[str, Any] | None,
    *,
    input_size: int,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
) -> dict[str, Any]:
    """Canonical parameters (defaults filled in, sorted keys) or an ExplanationError naming the problem."""
    if method not in _PARAMETERS:
        raise ExplanationError("unknown_method", f"Unknown method {method!r}. Choose one of: {', '.join(METHODS)}.")
    params = dict(params or {})
    if not isinstance(params, dict):
        raise ExplanationError("invalid_params", "params must be an object.")
    spec = _PARAMETERS[method]
    unknown = sorted(set(params) - set(spec))
    if unknown:
        allowed = ", ".join(spec) or "none"
        raise ExplanationError(
            "invalid_params", f"Unknown parameter(s) for {method}: {', '.join(unknown)}. Allowed: {allowed}."
        )
    canonical: dict[str, Any] = {}
    for name, rule in spec.items():
        kind, default = rule[0], rule[1]
        value = params.get(name, default)
        if method == "occlusion" and value is None:
            value = max(4, input_size // 8) if name == "window" else max(1, canonical["window"] // 2)
        if kind is str:
            if value not in rule[2]:
                raise ExplanationError("invalid_params", f"{name} must be one of {', '.join(rule[2])}, not {value!r}.")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ExplanationError(
                    "invalid_params", f"{name} must be {'an integer' if kind is int else 'a number'}."
                )
            value = kind(value)
            low, high = rule[2], rule[3]
            if low is not None and value < low or high is not None and value > high:
                bounds = f"at least {low}" if high is None else f"between {low} and {high}"
                raise ExplanationError("invalid_params", f"{name} must be {bounds}, not {value}.")
        canonical[name] = value
    if method == "occlusion" and canonical["window"] > input_size // 2:
        raise ExplanationError("invalid_params", f"window must be at most {input_size // 2} (half the model input).")
    steps = canonical.get("n_steps", 0)
    if steps > max_steps:
        raise ExplanationError("over_budget", f"n_steps={steps} is over the budget of {max_steps} steps.")
    cost = evaluations(method, canonical, input_size)
    if cost > max_evaluations:
        raise ExplanationError(
            "over_budget", f"This request needs {cost} model evaluations; the budget is {max_evaluations}."
        )
    return dict(sorted(canonical.items()))
