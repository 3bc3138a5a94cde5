"""The explanation methods' names and labels, as plain data.

Torch-free on purpose (no torch, no Django): the web tier (portal, API) reads these to label and list
the methods without loading PyTorch. mlcore.explain, which computes the attributions, imports them
from here.
"""

from __future__ import annotations

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
