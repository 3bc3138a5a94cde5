"""Explanations: Captum attribution methods on the served model, turned into heatmaps.

What is explained is the target class's log-odds, log p(target) - log(1 - p(target)), which for a
two-logit model is z_target - z_other. Unlike one raw logit it accounts for both outputs, it is
what the decision threshold acts on, and unlike the probability it does not saturate. Integrated
Gradients' completeness then reads: sum(attributions) = log-odds(image) - log-odds(baseline).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .methods import (  # noqa: F401 (re-exported: the torch-free parts live in mlcore.methods)
    _PARAMETERS,
    BASELINES,
    DEFAULT_MAX_EVALUATIONS,
    DEFAULT_MAX_STEPS,
    METHOD_LABELS,
    METHODS,
    PIXEL_LEVEL,
    SIGNED,
    ExplanationError,
    evaluations,
    validate_params,
)
from .model import CheckpointMeta, log_odds
from .preprocessing import TransformSpec, resize_for_model, to_tensor


class LogOdds(nn.Module):
    """Wraps a classifier: output[:, c] = z_c - logsumexp(z_others), the log-odds of class c.

    With bf16=True the model runs under bf16 autocast on channels_last inputs (the tensor cores' fast
    path); the input, its gradient and the log-odds stay fp32."""

    def __init__(self, model: nn.Module, *, bf16: bool = False) -> None:
        super().__init__()
        self.model = model
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bf16:
            return log_odds(self.model(x).float())
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            logits = self.model(x.contiguous(memory_format=torch.channels_last))
        return log_odds(logits.float())


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 on CUDA (its tensor cores) and fp32, the reference, elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


# --- attribution ------------------------------------------------------------------------------------


@dataclass
class Attribution:
    method: str
    params: dict[str, Any]
    target_index: int
    target_class: str
    raw: np.ndarray  # float32: (3, S, S) for pixel methods, (S, S) for Grad-CAM
    map: np.ndarray  # float32 (S, S): per-pixel evidence (signed unless Grad-CAM)
    signed: bool
    convergence_delta: float | None
    seconds: float


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 << 30


class Explainer:
    """Runs one attribution method for one image (explain), or for several (explain_batch: Integrated
    Gradients in one Captum call). Build it once per model and reuse it."""

    def __init__(
        self,
        model: nn.Module,
        meta: CheckpointMeta,
        *,
        device: torch.device | str = "cpu",
        memory_budget_bytes: int = 512 << 20,
        precision: str = "fp32",
        executor: Executor | None = None,
    ) -> None:
        self.meta = meta
        self.executor = executor
        self.memory_budget_bytes = memory_budget_bytes
        self.device = torch.device(device)
        self.spec = TransformSpec(meta.input_size, meta.mean, meta.std)
        self.model = model.to(self.device).eval()
        # Gradients are needed for the input only: not computing the weights' gradients saves a
        # large share of every backward pass.
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.precision = resolve_precision(precision, self.device)
        self.forward = LogOdds(self.model)
        # Only Integrated Gradients runs in bf16: it sums gradients along a path, and its maps agree with
        # fp32's (bench/README.md). The perturbation methods (occlusion, LIME, GradientShap) read small
        # differences between outputs, which bf16 would round away.
        self.ig_forward = LogOdds(self.model, bf16=True) if self.precision == "bf16" else self.forward
        self._sample_bytes: dict[bool, int] = {}

    def target_for(self, probabilities: Sequence[float]) -> int:
        """The predicted class of one row of class probabilities, as the default target: for a binary model
        the class at the operating threshold, for several the most probable diagnosis."""
        return self.meta.class_names.index(self.meta.label_for(probabilities))

    def input_tensor(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(image, self.spec).unsqueeze(0).to(self.device)

    def input_tensors(self, images: list[Image.Image]) -> torch.Tensor:
        """The model inputs of several images, N x 3 x S x S on the device; resized on the executor's
        threads when the Explainer has one (Pillow releases the GIL while it resizes)."""
        if self.executor is not None and len(images) > 1:
            tensors = list(self.executor.map(lambda image: to_tensor(image, self.spec), images))
        else:
            tensors = [to_tensor(image, self.spec) for image in images]
        return torch.stack(tensors).to(self.device)

    def baseline(self, kind: str, image: Image.Image) -> torch.Tensor:
        return self.baseline_for(kind, self.input_tensor(image))

    def baseline_for(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """The baselines of model inputs x (N x 3 x S x S), computed where x is: black, the dataset mean
        (zero after normalisation), or x blurred with a Gaussian of sigma S/12, which keeps the colours
        and removes the shapes and borders. Blurring a normalised input equals normalising the blurred
        photo, since the kernel sums to one."""
        if kind == "mean":
            return torch.zeros_like(x)
        if kind == "black":
            mean = torch.tensor(self.spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            return (-mean / std).expand_as(x).clone()
        if kind == "blurred":
            return gaussian_blur(x, self.meta.input_size / 12)
        raise ExplanationError("invalid_params", f"Unknown baseline {kind!r}.")

    def sample_bytes(self, *, bf16: bool = False) -> int:
        """Memory one sample takes in a forward + backward pass (activations and their gradients),
        measured once per precision with forward hooks (bf16 activations take about half)."""
        if bf16 not in self._sample_bytes:
            total = 0

            def count(_module, _inputs, output):
                nonlocal total
                if isinstance(output, torch.Tensor):
                    total += output.numel() * output.element_size()

            hooks = [m.register_forward_hook(count) for m in self.model.modules() if not list(m.children())]
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                self.model(torch.zeros(1, 3, self.meta.input_size, self.meta.input_size, device=self.device))
            for hook in hooks:
                hook.remove()
            self._sample_bytes[bf16] = max(total * 3, 1)
        return self._sample_bytes[bf16]

    def internal_batch_size(self, steps: int, *, ig: bool = False) -> int:
        """Steps per Captum call: as many as fit in the memory budget and in a quarter of the memory
        free now (Integrated Gradients' samples in its own precision). On the CPU, batches beyond 16
        bring no speed, only memory."""
        budget = min(available_memory_bytes(self.device) // 4, self.memory_budget_bytes)
        per_sample = self.sample_bytes(bf16=ig and self.ig_forward.bf16)
        size = max(1, min(steps, budget // per_sample))
        if self.device.type == "cpu":
            size = min(size, int(os.environ.get("EXPLAIN_CPU_BATCH", "16")))
        return size

    def explain(self, image: Image.Image, method: str, params: dict[str, Any], target_index: int) -> Attribution:
        from captum import attr as captum_attr

        started = time.perf_counter()
        x = self.input_tensor(image)
        delta: float | None = None
        if method == "integrated_gradients":
            baseline = self.baseline_for(params["baseline"], x)
            ig = captum_attr.IntegratedGradients(self.ig_forward)
            raw, deltas = ig.attribute(
                x, baselines=baseline, target=target_index, n_steps=params["n_steps"],
                internal_batch_size=self.internal_batch_size(params["n_steps"], ig=True), return_convergence_delta=True,
            )  # fmt: skip
            delta = float(deltas.abs().max())
        elif method == "gradcam":
            x.requires_grad_(True)
            layer = self.model.layer4
            # Signed, without Grad-CAM's final ReLU: with two classes the evidence for one is the evidence
            # against the other, and the ReLU would blank the map whenever the pooled evidence is negative.
            cam = captum_attr.LayerGradCam(self.forward, layer).attribute(
                x, target=target_index, relu_attributions=False
            )
            raw = captum_attr.LayerAttribution.interpolate(cam, (self.meta.input_size,) * 2, "bilinear")[0, 0]
        elif method == "occlusion":
            window, stride = params["window"], params["stride"]
            raw = captum_attr.Occlusion(self.forward).attribute(
                x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                baselines=self.baseline_for(params["baseline"], x), target=target_index,
                perturbations_per_eval=self.internal_batch_size(64),
            )  # fmt: skip
        elif method == "gradient_shap":
            baselines = torch.cat([self.baseline_for(kind, x) for kind in BASELINES])
            raw, deltas = captum_attr.GradientShap(self.forward).attribute(
                x, baselines=baselines, n_samples=params["n_samples"], stdevs=params["stdevs"], target=target_index,
                return_convergence_delta=True,
            )  # fmt: skip
            delta = float(deltas.abs().mean())
        elif method == "smoothgrad":
            tunnel = captum_attr.NoiseTunnel(captum_attr.IntegratedGradients(self.forward))
            raw = tunnel.attribute(
                x, nt_type="smoothgrad", nt_samples=params["n_samples"], stdevs=params["stdevs"],
                baselines=self.baseline_for(params["baseline"], x), target=target_index, n_steps=params["n_steps"],
                internal_batch_size=self.internal_batch_size(params["n_steps"]),
            )  # fmt: skip
        elif method == "lime":
            segments = superpixels(resize_for_model(image, self.meta.input_size), params["n_segments"])
            mask = torch.from_numpy(segments).to(self.device).long().unsqueeze(0).unsqueeze(0).expand(1, 3, -1, -1)
            raw = captum_attr.Lime(self.forward).attribute(
                x, baselines=self.baseline_for(params["baseline"], x), target=target_index,
                feature_mask=mask, n_samples=params["n_samples"],
                perturbations_per_eval=self.internal_batch_size(32),
            )  # fmt: skip
        else:
            raise ExplanationError("unknown_method", f"Unknown method {method!r}.")
        raw_array = raw.detach().float().cpu().numpy()
        if raw_array.ndim == 4:
            raw_array = raw_array[0]
        return self._attribution(method, params, target_index, raw_array, delta, time.perf_counter() - started)

    def _attribution(
        self, method: str, params: dict[str, Any], target_index: int, raw: np.ndarray, delta: float | None,
        seconds: float,
    ) -> Attribution:  # fmt: skip
        per_pixel = raw if raw.ndim == 2 else raw.sum(axis=0)
        return Attribution(
            method=method,
            params=params,
            target_index=target_index,
            target_class=self.meta.class_names[target_index],
            raw=raw.astype(np.float32),
            map=per_pixel.astype(np.float32),
            signed=method in SIGNED,
            convergence_delta=delta,
            seconds=seconds,
        )

    # --- several images at once ----------------------------------------------------------------------

    def ig_batch_plan(self, n_images: int, steps: int) -> tuple[int, int]:
        """(images per Captum call, steps per internal batch) for Integrated Gradients over n_images
        images: one forward + backward pass holds images x steps samples, and that product stays within
        what internal_batch_size allows one explanation (the memory budget, a quarter of the free
        memory, the CPU cap). Images that do not fit even at one step each are split over several calls."""
        samples = self.internal_batch_size(max(1, n_images) * steps, ig=True)
        per_call = max(1, min(n_images, samples))
        return per_call, max(1, min(steps, samples // per_call))

    def explain_batch(
        self, images: list[Image.Image], method: str, params: dict[str, Any], target_indices: list[int]
    ) -> list[Attribution]:
        """One Attribution per image, equal to what explain() gives for that image alone. Integrated
        Gradients runs the images together: their inputs and baselines stacked along the batch
        dimension, one target each, in one Captum call (several only where the memory budget cannot
        hold one step of every image). Each Attribution carries its own convergence delta, and its
        `seconds` is its share of the call. Other methods run one image at a time."""
        if len(images) != len(target_indices):
            raise ValueError(f"{len(images)} images but {len(target_indices)} targets")
        if method != "integrated_gradients":
            return [
                self.explain(image, method, params, target)
                for image, target in zip(images, target_indices, strict=True)
            ]
        per_call, steps_per_batch = self.ig_batch_plan(len(images), params["n_steps"])
        results: list[Attribution] = []
        for start in range(0, len(images), per_call):
            results += self._integrated_gradients(
                images[start : start + per_call], params, target_indices[start : start + per_call], steps_per_batch
            )
        return results

    def _integrated_gradients(
        self, images: list[Image.Image], params: dict[str, Any], target_indices: list[int], steps_per_batch: int
    ) -> list[Attribution]:
        from captum import attr as captum_attr

        started = time.perf_counter()
        x = self.input_tensors(images)
        baselines = self.baseline_for(params["baseline"], x)
        raw, deltas = captum_attr.IntegratedGradients(self.ig_forward).attribute(
            x, baselines=baselines, target=[int(t) for t in target_indices], n_steps=params["n_steps"],
            internal_batch_size=len(images) * steps_per_batch, return_convergence_delta=True,
        )  # fmt: skip
        raw_array = raw.detach().float().cpu().numpy()
        deltas_array = deltas.detach().abs().float().cpu().numpy().reshape(len(images))
        share = (time.perf_counter() - started) / len(images)
        return [
            self._attribution(
                "integrated_gradients", params, target, raw_array[index], float(deltas_array[index]), share
            )
            for index, target in enumerate(target_indices)
        ]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """N x C x H x W blurred by a Gaussian of standard deviation sigma pixels (two 1-D passes, edges
    extended), on x's device."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def superpixels(image: Image.Image, n_segments: int, *, compactness: float = 10.0, iterations: int = 6) -> np.ndarray:
    """A small SLIC: k-means over colour and position from a regular grid of seeds. Returns an
    (H, W) array of consecutive segment ids."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 * 100.0
    height, width = rgb.shape[:2]
    step = max(1.0, math.sqrt(height * width / n_segments))
    ys = np.arange(step / 2, height, step)
    xs = np.arange(step / 2, width, step)
    centres_yx = np.array([(y, x) for y in ys for x in xs], dtype=np.float32)
    centres_rgb = rgb[centres_yx[:, 0].astype(int), centres_yx[:, 1].astype(int)]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels_yx = np.stack([yy.ravel(), xx.ravel()], axis=1)
    pixels_rgb = rgb.reshape(-1, 3)
    weight = (compactness / step) ** 2
    labels = np.zeros(len(pixels_yx), dtype=np.int64)
    for _ in range(iterations):
        colour = ((pixels_rgb[:, None, :] - centres_rgb[None, :, :]) ** 2).sum(axis=2)
        space = ((pixels_yx[:, None, :] - centres_yx[None, :, :]) ** 2).sum(axis=2)
        labels = np.argmin(colour + weight * space, axis=1)
        for index in range(len(centres_yx)):
            members = labels == index
            if members.any():
                centres_yx[index] = pixels_yx[members].mean(axis=0)
                centres_rgb[index] = pixels_rgb[members].mean(axis=0)
    _, consecutive = np.unique(labels, return_inverse=True)
    return consecutive.reshape(height, width)
