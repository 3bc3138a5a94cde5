"""A small, seeded training loop: enough to produce the demo model, shaped to grow into full training.

Items are (PIL image, label) pairs; the eval transform is the one serving uses, with augmentation
applied before it during training only.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2 as T
from tqdm import tqdm

from . import metrics
from .inference import select_device
from .model import CheckpointMeta, build_model
from .preprocessing import TransformSpec, resize_for_model, to_tensor

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    input_size: int = 128
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    patience: int = 3
    target_sensitivity: float = 0.90
    device: str = "auto"
    class_names: tuple[str, ...] = ("benign", "malignant")
    positive_class: str = "malignant"
    # The classes whose probabilities sum to the malignancy probability; empty: the positive class alone.
    malignant_classes: tuple[str, ...] = ()
    # How an imbalanced set is evened out: "weights" (class-weighted loss) or "sampling" (each batch drawn
    # with every class equally likely, plain loss).
    class_balance: str = "weights"
    pretrained_weights: str | None = None
    download_pretrained: bool = False


@dataclass
class TrainResult:
    model: nn.Module
    meta: CheckpointMeta
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False


class _TransformedItems(Dataset):
    def __init__(self, items: Sequence[tuple[Image.Image, int]], transform: Callable[[Image.Image], torch.Tensor]):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.items[index]
        return self.transform(image), label


def augmentation(input_size: int) -> Callable[[Image.Image], Image.Image]:
    augment = T.Compose(
        [
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomRotation(20),
            T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
        ]
    )
    return lambda image: augment(resize_for_model(image, input_size))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@torch.inference_mode()
def predict_logits(model: nn.Module, items: Sequence[tuple[Image.Image, int]], spec: TransformSpec) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(_TransformedItems(items, lambda im: to_tensor(im, spec)), batch_size=64)
    outputs = []
    for batch, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch.to(device))
        outputs.append(logits.float().cpu().numpy())
    return np.concatenate(outputs).astype(np.float64)


def predict_probabilities(
    model: nn.Module,
    items: Sequence[tuple[Image.Image, int]],
    spec: TransformSpec,
    *,
    malignant: Sequence[int] = (1,),
    temperature: float = 1.0,
) -> np.ndarray:
    """The malignancy probability of each item: the sum of its malignant classes' probabilities."""
    return metrics.softmax(predict_logits(model, items, spec), temperature)[:, list(malignant)].sum(axis=1)


def malignant_indices(config: TrainConfig) -> list[int]:
    return [config.class_names.index(name) for name in (config.malignant_classes or (config.positive_class,))]


def train_classifier(
    train_items: Sequence[tuple[Image.Image, int]],
    val_items: Sequence[tuple[Image.Image, int]],
    config: TrainConfig,
    *,
    progress: bool = True,
    on_improve: Callable[[nn.Module, CheckpointMeta], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train with AdamW and a one-cycle schedule and keep the weights with the best validation AUC.
    Then fit a temperature on validation (calibration) and set the operating threshold on the
    calibrated validation probabilities for the target sensitivity.

    on_improve(model, meta) is called whenever validation AUC improves, so a caller can write the
    best checkpoint so far to disk; Ctrl-C then stops training and keeps the best epoch.
    """
    started = time.perf_counter()
    generator = seed_everything(config.seed)
    device = select_device(config.device)
    spec = TransformSpec(config.input_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_loader, model = _loader_and_model(train_items, config, spec, generator, device)
    malignant = malignant_indices(config)
    step = _Stepper(model, train_items, config, device, total_steps=max(1, config.epochs * len(train_loader)))
    val_labels = np.asarray([label for _, label in val_items])
    best_auc, best_state, stale_epochs, interrupted = -1.0, None, 0, False
    history: list[dict[str, float]] = []
    try:
        for epoch in range(1, config.epochs + 1):
            bar = tqdm(train_loader, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
            loss = step.epoch(bar, history)
            scores = predict_probabilities(model, val_items, spec, malignant=malignant)
            val_auc = metrics.roc_auc(np.isin(val_labels, malignant), scores)
            history.append({"epoch": epoch, "loss": loss, "val_auc": val_auc})
            summary = f"epoch {epoch}/{config.epochs}  loss {loss:.3f}  val AUC {val_auc:.3f}"
            if progress:
                tqdm.write(summary)
            elif log is not None:
                log(summary)
            if val_auc > best_auc:
                best_auc, best_state, stale_epochs = val_auc, copy.deepcopy(model.state_dict()), 0
                if on_improve is not None:
                    extra = {"validation": {"auc": val_auc, "epoch": epoch}}
                    on_improve(model, _meta(config, device, history, 0.5, 1.0, extra))
            else:
                stale_epochs += 1
                if stale_epochs >= config.patience:
                    break
    except KeyboardInterrupt:
        if best_state is None:
            raise
        interrupted = True
        logger.warning("training interrupted; keeping the best epoch so far")
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    threshold, temperature, validation = _calibrate(model, val_items, spec, config, malignant)
    meta = _meta(config, device, history, threshold, temperature, {"validation": validation})
    meta.training["interrupted"] = interrupted
    return TrainResult(
        model=model.cpu(), meta=meta, history=history, seconds=time.perf_counter() - started, interrupted=interrupted
    )


def _loader_and_model(
    train_items: Sequence[tuple[Image.Image, int]], config: TrainConfig, spec: TransformSpec,
    generator: torch.Generator, device: torch.device,
) -> tuple[DataLoader, nn.Module]:  # fmt: skip
    """The shuffled, augmented training batches (seeded by `generator`) and the model to train, on `device`."""
    augment = augmentation(config.input_size)
    if config.class_balance not in ("weights", "sampling"):
        raise ValueError(f"class_balance must be 'weights' or 'sampling', not {config.class_balance!r}")
    sampler = None
    if config.class_balance == "sampling":
        labels = np.asarray([label for _, label in train_items])
        per_item = 1.0 / np.bincount(labels, minlength=len(config.class_names))[labels]
        sampler = WeightedRandomSampler(per_item.tolist(), num_samples=len(labels), generator=generator)
    train_loader = DataLoader(
        _TransformedItems(train_items, lambda im: to_tensor(augment(im), spec)),
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=len(train_items) > config.batch_size,
    )
    model = build_model(
        config.arch,
        num_classes=len(config.class_names),
        pretrained_weights=config.pretrained_weights,
        download_pretrained=config.download_pretrained,
    ).to(device)
    return train_loader, model


class _Stepper:
    """The optimisation of one training: class-weighted cross-entropy (an imbalanced set does not collapse
    onto the majority class), AdamW and a one-cycle schedule, bf16 autocast on CUDA."""

    def __init__(
        self, model: nn.Module, train_items: Sequence[tuple[Image.Image, int]], config: TrainConfig,
        device: torch.device, *, total_steps: int,
    ) -> None:  # fmt: skip
        self.model = model
        self.device = device
        labels = np.asarray([label for _, label in train_items])
        counts = np.bincount(labels, minlength=len(config.class_names)).astype(np.float64)
        weights = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32, device=device)
        self.criterion = nn.CrossEntropyLoss(weight=weights if config.class_balance == "weights" else None)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=config.lr, total_steps=total_steps)

    def epoch(self, bar: tqdm, history: list[dict[str, float]]) -> float:
        """One pass over the training batches (the progress bar); returns the mean training loss."""
        model, device = self.model, self.device
        model.train()
        running, seen = 0.0, 0
        for images, targets in bar:
            images, targets = images.to(device), targets.to(device)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = self.criterion(model(images), targets)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            running += float(loss.detach()) * len(targets)
            seen += len(targets)
            bar.set_postfix(loss=f"{running / seen:.3f}", val_auc=f"{history[-1]['val_auc']:.3f}" if history else "–")
        return running / max(seen, 1)


def _meta(
    config: TrainConfig, device: torch.device, history: list[dict[str, float]], threshold: float, temperature: float,
    extra: dict[str, Any],
) -> CheckpointMeta:  # fmt: skip
    return CheckpointMeta(
        arch=config.arch,
        input_size=config.input_size,
        class_names=config.class_names,
        positive_class=config.positive_class,
        malignant_classes=config.malignant_classes,
        threshold=threshold,
        temperature=temperature,
        metrics=extra,
        training={"config": asdict(config), "history": history, "device": str(device)},
    )


def _calibrate(
    model: nn.Module, val_items: Sequence[tuple[Image.Image, int]], spec: TransformSpec, config: TrainConfig,
    malignant: Sequence[int],
) -> tuple[float, float, dict[str, Any]]:  # fmt: skip
    """(threshold, temperature, validation metrics): a temperature fitted on validation, and the operating
    threshold on the calibrated validation probabilities for the target sensitivity."""
    val_labels = np.asarray([label for _, label in val_items])
    val_logits = predict_logits(model, val_items, spec)
    positives = np.isin(val_labels, malignant)
    temperature = metrics.fit_temperature(val_logits, val_labels)
    calibrated = metrics.softmax(val_logits, temperature)[:, list(malignant)].sum(axis=1)
    threshold = metrics.threshold_for_sensitivity(positives, calibrated, config.target_sensitivity)
    validation = metrics.summarise(positives, calibrated, threshold)
    validation["ece_before_calibration"] = metrics.expected_calibration_error(
        positives, metrics.softmax(val_logits)[:, list(malignant)].sum(axis=1)
    )
    validation["ece"] = metrics.expected_calibration_error(positives, calibrated)
    return threshold, temperature, validation
