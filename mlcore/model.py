"""Build ResNet classifiers and save/load self-describing checkpoints.

A checkpoint is a plain dict of tensors and primitive values, loaded with
``torch.load(weights_only=True)`` so that a checkpoint file can never execute code.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn
from torchvision import models as tv_models
from torchvision.models.resnet import BasicBlock

CHECKPOINT_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CLASS_NAMES = ("benign", "malignant")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or describes a model we cannot build."""


class TinyResNet(nn.Module):
    """A ResNet with the torchvision layout (conv1, bn1, layer1..4, fc) but narrow and shallow.

    It exists so tests can train and explain a real residual network in seconds on a CPU; code
    that walks ``layer4`` (Grad-CAM) or replaces ``fc`` treats it like any torchvision ResNet.
    """

    def __init__(self, num_classes: int = 2, widths: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        in_planes = widths[0]
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            downsample = None
            if stride != 1 or in_planes != width:
                downsample = nn.Sequential(
                    nn.Conv2d(in_planes, width, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(width),
                )
            setattr(self, f"layer{index}", nn.Sequential(BasicBlock(in_planes, width, stride, downsample)))
            in_planes = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """Per class c: z_c - logsumexp(z_others), the log-odds of c (z_c - z_other for two classes).
    What explanations attribute: see mlcore.explain."""
    classes = logits.shape[1]
    others = logits.unsqueeze(1).expand(-1, classes, -1)
    eye = torch.eye(classes, dtype=torch.bool, device=logits.device)
    return logits - torch.logsumexp(others.masked_fill(eye.unsqueeze(0), float("-inf")), dim=2)


def resnet_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ResNet body up to layer4's output (torchvision ResNets and TinyResNet share the layout)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def resnet_head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return model.fc(torch.flatten(model.avgpool(features), 1))


_TORCHVISION_ARCHITECTURES = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
}
ARCHITECTURES = (*_TORCHVISION_ARCHITECTURES, "resnet_tiny")


def build_model(
    arch: str,
    *,
    num_classes: int = 2,
    pretrained_weights: str | Path | None = None,
    download_pretrained: bool = False,
) -> nn.Module:
    """Build an untrained ResNet with a new head, or one initialised from ImageNet weights read from
    a local state-dict file. download_pretrained lets torchvision fetch the weights instead (it needs
    the internet; nothing in this project does it by default)."""
    if arch == "resnet_tiny":
        if pretrained_weights is not None or download_pretrained:
            raise CheckpointError("resnet_tiny has no ImageNet weights")
        return TinyResNet(num_classes=num_classes)
    try:
        factory = _TORCHVISION_ARCHITECTURES[arch]
    except KeyError:
        raise CheckpointError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}") from None
    if download_pretrained:
        if pretrained_weights is not None:
            raise CheckpointError("give either a weights file or download_pretrained, not both")
        model = factory(weights="DEFAULT")
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    model = factory(weights=None)
    if pretrained_weights is not None:
        try:
            state = torch.load(Path(pretrained_weights), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{pretrained_weights} is not a {arch} ImageNet state dict: {exc}") from exc
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


@dataclass
class CheckpointMeta:
    arch: str
    input_size: int
    class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    threshold: float = 0.5
    # Temperature scaling: served probabilities are softmax(logits / temperature).
    temperature: float = 1.0
    positive_class: str = "malignant"
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    # The diagnoses whose probabilities add up to the malignancy probability the threshold applies to
    # (e.g. mel, bcc and akiec for HAM10000's seven). Empty (a checkpoint from before multi-class models):
    # the positive class alone.
    malignant_classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        # Metrics and training notes hold plain JSON types only, exactly as a checkpoint stores them.
        self.metrics = json.loads(json.dumps(self.metrics, default=_plain))
        self.training = json.loads(json.dumps(self.training, default=_plain))
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if self.positive_class not in self.class_names:
            raise CheckpointError(f"positive class {self.positive_class!r} is not among {self.class_names}")
        self.malignant_classes = tuple(dict.fromkeys(self.malignant_classes)) or (self.positive_class,)
        unknown = [name for name in self.malignant_classes if name not in self.class_names]
        if unknown:
            raise CheckpointError(f"malignant classes {unknown} are not among {self.class_names}")
        if len(self.malignant_classes) >= len(self.class_names):
            raise CheckpointError("at least one class must be benign: not every class can be malignant")
        if not 0.0 <= self.threshold <= 1.0:
            raise CheckpointError(f"threshold must lie between 0 and 1, not {self.threshold}")
        if not self.temperature > 0:
            raise CheckpointError(f"temperature must be positive, not {self.temperature}")
        if self.input_size < 16:
            raise CheckpointError(f"input size {self.input_size} is too small")

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    @property
    def malignant_indices(self) -> list[int]:
        return [self.class_names.index(name) for name in self.malignant_classes]

    @property
    def binary(self) -> bool:
        """Two classes, one of them malignant: the label is read from the threshold, as before multi-class."""
        return len(self.class_names) == 2

    def malignant_probability(self, probabilities):
        """The malignancy probability of each row of class probabilities (N x classes, numpy or torch): the
        sum over the malignant classes."""
        return probabilities[:, self.malignant_indices].sum(1)

    def label_for(self, probabilities: Sequence[float]) -> str:
        """The label of one row of class probabilities: for a binary model, the positive class at or above
        the operating threshold and the other below it; for several classes, the most probable diagnosis
        (the threshold then applies to the malignancy probability, not to the label)."""
        if self.binary:
            positive = self.positive_index
            return self.class_names[positive if probabilities[positive] >= self.threshold else 1 - positive]
        return self.class_names[max(range(len(probabilities)), key=probabilities.__getitem__)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["malignant_classes"] = list(self.malignant_classes)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data


def save_checkpoint(model: nn.Module, meta: CheckpointMeta, destination: str | Path | BinaryIO) -> None:
    # A JSON round trip keeps the metadata to plain types, which weights_only loading accepts
    # (numpy scalars or torch's version string class would make the checkpoint unloadable).
    plain_meta = json.loads(json.dumps(meta.to_dict(), default=_plain))
    payload = {
        "format": CHECKPOINT_FORMAT,
        "meta": plain_meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(payload, destination)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def checkpoint_bytes(model: nn.Module, meta: CheckpointMeta) -> bytes:
    buffer = io.BytesIO()
    save_checkpoint(model, meta, buffer)
    return buffer.getvalue()


def load_checkpoint(source: str | Path | BinaryIO | bytes) -> tuple[nn.Module, CheckpointMeta]:
    """Load a checkpoint into an eval-mode model on the CPU."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many types for a corrupt or hostile file
        raise CheckpointError(f"not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError("not a checkpoint written by mlcore (missing or unknown 'format')")
    try:
        meta = CheckpointMeta(**payload["meta"])
        model = build_model(meta.arch, num_classes=len(meta.class_names))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not match its declared architecture: {exc}") from exc
    model.eval()
    return model, meta


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
