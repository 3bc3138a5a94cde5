"""Predictor: load a checkpoint once, predict batches under inference_mode (bf16 autocast on CUDA)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from .drift import FEATURE_SIZE
from .model import CheckpointMeta, load_checkpoint, log_odds, resnet_features, resnet_head
from .preprocessing import TransformSpec, to_tensor


def select_device(preference: str | None = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU; anything else is taken literally ('cpu', 'cuda:1')."""
    preference = (preference or "auto").strip().lower()
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} was requested but CUDA is not available")
    return device


@dataclass(frozen=True)
class PredictionResult:
    probability_malignant: float
    label: str
    threshold: float
    probabilities: dict[str, float]


class Predictor:
    def __init__(
        self, model: torch.nn.Module, meta: CheckpointMeta, *, device: str | None = "auto", max_batch_size: int = 32
    ) -> None:
        self.meta = meta
        self.device = select_device(device)
        self.max_batch_size = max_batch_size
        self.spec = TransformSpec(meta.input_size, meta.mean, meta.std)
        model = model.to(self.device).eval()
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    @classmethod
    def from_checkpoint(cls, source: str | Path | BinaryIO | bytes, **kwargs: object) -> Predictor:
        model, meta = load_checkpoint(source)
        return cls(model, meta, **kwargs)  # type: ignore[arg-type]

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return to_tensor(image, self.spec)

    @torch.inference_mode()
    def predict_tensors(self, batch: torch.Tensor) -> torch.Tensor:
        """Calibrated softmax probabilities for a preprocessed batch, as float32 on the CPU."""
        outputs = []
        for chunk in batch.split(self.max_batch_size):
            chunk = self.to_device(chunk)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(chunk)
            outputs.append(torch.softmax(logits.float() / self.meta.temperature, dim=1).cpu())
        return torch.cat(outputs)

    def _results(self, probabilities: torch.Tensor) -> list[PredictionResult]:
        """One result per row of calibrated class probabilities: the malignancy probability (the sum over the
        malignant classes), the label (mlcore.model.CheckpointMeta.label_for) and every class's probability."""
        meta = self.meta
        results = []
        for row in probabilities.tolist():
            results.append(
                PredictionResult(
                    probability_malignant=float(sum(row[i] for i in meta.malignant_indices)),
                    label=meta.label_for(row),
                    threshold=meta.threshold,
                    probabilities=dict(zip(meta.class_names, (float(v) for v in row), strict=True)),
                )
            )
        return results

    def predict(self, images: Sequence[Image.Image]) -> list[PredictionResult]:
        if not images:
            return []
        return self._results(self.predict_tensors(torch.stack([self.preprocess(image) for image in images])))

    def predict_with_gradcam(
        self, images: Sequence[Image.Image], *, embeddings: bool = False
    ) -> tuple[list[PredictionResult], list[np.ndarray]] | tuple[list[PredictionResult], list[np.ndarray], np.ndarray]:
        """Predictions and, per image, the signed Grad-CAM map of its predicted class on the log-odds
        (mlcore.explain.LogOdds), at the model's input size, from the same forward pass.

        The gradient of the log-odds with respect to layer4's output is taken in closed form through
        the head (average pooling and one linear layer), so the whole call runs under inference_mode
        and the map costs next to nothing beyond the prediction itself, unlike a separate Captum
        LayerGradCam call (a second forward and a full backward pass). A model with any other head
        has only its head differentiated by autograd. With embeddings=True, also the pooled
        penultimate features (the embedding that drift monitoring projects), one row per image.
        """
        if not images:
            return ([], [], np.zeros((0, 0), np.float32)) if embeddings else ([], [])
        return self.predict_with_gradcam_tensors(torch.stack([self.preprocess(image) for image in images]),
                                                 embeddings=embeddings)  # fmt: skip

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A preprocessed batch on the model's device: from pinned memory without blocking on CUDA, in
        channels_last there."""
        if self.device.type != "cuda":
            return batch.to(self.device)
        if batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device).contiguous(memory_format=torch.channels_last)

    def predict_with_gradcam_tensors(
        self, batch: torch.Tensor, *, embeddings: bool = False, upsample: bool = True, augment: bool = False
    ):
        """predict_with_gradcam for a batch already preprocessed (on the CPU, or on the model's device
        when it was decoded there: mlcore.tensor_decode). upsample=False: the maps at the feature map's
        own size (7 x 7 for a ResNet at 224 px), for mlcore.heatmap.upsample_bilinear later.

        augment=True: test-time augmentation, the photos' AUGMENTATIONS in the same forward pass, and
        one more item returned last: per photo, the calibrated malignancy probability of each view."""
        batch = self.to_device(batch)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        head = linear_head(self.model)
        if head is None:  # a head other than average pooling and one linear layer: let autograd do it
            found = self._gradcam_by_autograd(batch, autocast, embeddings, upsample)
            return (*found, self.augmented_probabilities(batch)) if augment else found
        weight, bias = head
        count = len(batch)
        with torch.inference_mode():
            with autocast:
                features = resnet_features(self.model, augmented(batch) if augment else batch)
            features = features.float()
            pooled = features.mean(dim=(2, 3))
            logits = torch.nn.functional.linear(pooled, weight.float(), bias.float() if bias is not None else None)
            views = None
            if augment:
                views = self._positive(logits[count:]).reshape(len(AUGMENTATIONS), count).T
                features, pooled, logits = features[:count], pooled[:count], logits[:count]
            found = self._gradcam_from_head(features, pooled, logits, weight, embeddings, upsample)
            return (*found, views) if augment else found

    def _positive(self, logits: torch.Tensor) -> np.ndarray:
        probabilities = torch.softmax(logits.float() / self.meta.temperature, dim=1)
        return self.meta.malignant_probability(probabilities).cpu().numpy().astype(np.float64)

    @torch.inference_mode()
    def augmented_probabilities(self, batch: torch.Tensor) -> np.ndarray:
        """Per photo, the calibrated malignancy probability of each of its AUGMENTATIONS (one forward)."""
        count = len(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(views_of(self.to_device(batch)))
        return self._positive(logits).reshape(len(AUGMENTATIONS), count).T

    def _gradcam_from_head(self, features, pooled, logits, weight, embeddings: bool, upsample: bool):
        with torch.inference_mode():
            results = self._results(torch.softmax(logits / self.meta.temperature, dim=1).cpu())
            targets = torch.tensor([self.meta.class_names.index(r.label) for r in results], device=logits.device)
            # The gradient of the target's log-odds z_c - logsumexp(z_others) with respect to the pooled
            # features is W_c - sum over the others of softmax(z_others)_j W_j; average pooling spreads
            # it evenly over the H x W positions, so Grad-CAM's channel weights (the gradient's spatial
            # mean) are that vector / (H * W). The same numbers autograd gives, without a backward pass.
            is_target = torch.nn.functional.one_hot(targets, logits.shape[1]).bool()
            shares = torch.softmax(logits.masked_fill(is_target, float("-inf")), dim=1)
            gradients = weight.float()[targets] - shares @ weight.float()
            height, width = features.shape[2:]
            weights = (gradients / (height * width))[:, :, None, None]
            cams = self._upsample((weights * features).sum(dim=1, keepdim=True), upsample)
            if embeddings:
                return results, cams, pooled.cpu().numpy().astype(np.float32)
            return results, cams

    def _upsample(self, cams: torch.Tensor, upsample: bool = True) -> list[np.ndarray]:
        if upsample:
            size = (self.meta.input_size, self.meta.input_size)
            cams = torch.nn.functional.interpolate(cams, size=size, mode="bilinear", align_corners=False)
        return list(cams[:, 0].float().cpu().numpy())  # one copy to the host for the whole batch

    def _gradcam_by_autograd(self, batch: torch.Tensor, autocast, embeddings: bool, upsample: bool = True):
        with torch.no_grad(), autocast:
            features = resnet_features(self.model, batch)
        features = features.float().requires_grad_(True)
        with torch.enable_grad():
            logits = resnet_head(self.model, features).float()
            probabilities = torch.softmax(logits.detach() / self.meta.temperature, dim=1).cpu()
            results = self._results(probabilities)
            targets = torch.tensor(
                [self.meta.class_names.index(result.label) for result in results], device=logits.device
            )
            selected = log_odds(logits).gather(1, targets.unsqueeze(1)).sum()
            (gradients,) = torch.autograd.grad(selected, features)
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cams = self._upsample((weights * features.detach()).sum(dim=1, keepdim=True), upsample)
        if embeddings:
            return results, cams, features.detach().mean(dim=(2, 3)).cpu().numpy().astype(np.float32)
        return results, cams


# Test-time augmentation's views of a photo: a lesion has no up, down, left or right.
AUGMENTATIONS = ("horizontal flip", "vertical flip", "transpose")


def views_of(batch: torch.Tensor) -> torch.Tensor:
    """The AUGMENTATIONS of a batch (N x C x H x W, square), view after view: V * N rows."""
    return torch.cat([batch.flip(3), batch.flip(2), batch.transpose(2, 3)])


def augmented(batch: torch.Tensor) -> torch.Tensor:
    """The batch, then its views: (1 + V) * N rows, for one forward pass."""
    return torch.cat([batch, views_of(batch)])


def linear_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a ResNet whose head is global average pooling then one linear layer (every
    architecture build_model makes), else None."""
    pool, fc = getattr(model, "avgpool", None), getattr(model, "fc", None)
    if type(fc) is not torch.nn.Linear or type(pool) is not torch.nn.AdaptiveAvgPool2d:
        return None  # exactly these: a subclass may compute something else
    if any(module._forward_hooks or module._forward_pre_hooks for module in (fc, pool)):
        return None  # a hook would be skipped by the closed form
    size = pool.output_size
    if (size if isinstance(size, tuple) else (size, size)) != (1, 1):
        return None
    return fc.weight, fc.bias


def warm_up(predictor: Predictor, batch_sizes: Sequence[int] = (1,)) -> float:
    """One pass per batch size on grey images, so that the first real upload does not pay for CUDA's
    context, cuDNN's algorithm search or the allocator's first blocks. Returns the seconds it took."""

    started = time.perf_counter()
    size = predictor.meta.input_size
    for batch_size in batch_sizes:
        batch = torch.zeros(max(1, batch_size), 3, size, size)
        predictor.predict_with_gradcam_tensors(batch, embeddings=True)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)
    return time.perf_counter() - started


def decode_side(input_size: int) -> int:
    """The longest side a worker decodes a JPEG at (Pillow's draft mode picks the smallest DCT scale at
    least this large): twice what the model and the drift features resize to, so the final resize
    still averages over several source pixels and matches a full decode closely."""

    return 2 * max(input_size, FEATURE_SIZE)


def configure_torch_threads(default: int | None = None) -> int:
    """Size torch's intra-op pool to the cores this process really has (a prefork child shares them)."""
    threads = int(os.environ.get("TORCH_NUM_THREADS", "0") or 0) or default or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()
