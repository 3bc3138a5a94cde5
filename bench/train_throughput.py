"""Training throughput (images/s) of the project's training step: forward, backward and AdamW
update, with the same loss, optimiser and autocast choices as mlcore.train.

    .venv/bin/python bench/train_throughput.py --arch resnet18 --image-size 224 --batch-size 32

On CUDA it measures fp32 and bf16 autocast with channels_last side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlcore.inference import select_device
from mlcore.model import build_model


def measure(arch: str, size: int, batch: int, steps: int, device: torch.device, *, bf16: bool, channels_last: bool):
    torch.manual_seed(0)
    model = build_model(arch).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 2, (batch,), device=device)
    model.train()
    timings = []
    for step in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            timings.append(time.perf_counter() - started)
    return batch / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = select_device(args.device)
    threads = torch.get_num_threads()
    print(f"{args.arch} at {args.image_size} px, batch {args.batch_size}, {device}, torch threads {threads}")
    fp32 = measure(args.arch, args.image_size, args.batch_size, args.steps, device, bf16=False, channels_last=False)
    print(f"fp32: {fp32:.1f} images/s (median of {args.steps} steps)")
    if device.type == "cuda":
        fast = measure(args.arch, args.image_size, args.batch_size, args.steps, device, bf16=True, channels_last=True)
        print(f"bf16 autocast + channels_last: {fast:.1f} images/s ({fast / fp32:.2f}x fp32, same run)")


if __name__ == "__main__":
    main()
