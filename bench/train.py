"""Benchmark: training throughput (samples per second) of each model, forward + backward + AdamW step.

Batches of the default input: the default features (128 mels) cropped to the default 3 s (129 frames),
plus Choi's full 96 x 1366 input with ``--choi``. Each step is :func:`pipeline.train.train_step`, the
training loop's own. On the CPU with every core; on CUDA (when torch sees one) in float32 and under bf16
autocast with channels-last tensors, as training runs there. Warm-up steps come before the clock starts;
CUDA timings synchronise the device. Prints figures, asserts nothing.

    python bench/train.py
    python bench/train.py --steps 20 --batch-size 32 --choi
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import MODEL_NAMES, build_model  # noqa: E402
from pipeline.inference import crop_frames  # noqa: E402
from pipeline.mel import MelConfig  # noqa: E402
from pipeline.train import TrainConfig, train_step  # noqa: E402


def samples_per_second(name: str, shape: tuple[int, int], *, device: torch.device, autocast: bool,
                       batch_size: int, steps: int, warmup: int) -> float:
    """Training samples per second of model ``name`` on (batch_size, 1, *shape) random batches."""
    torch.manual_seed(0)
    model = build_model(name, n_classes=10, n_mels=shape[0]).to(device)
    x = torch.randn(batch_size, 1, *shape, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        train_step(model, optimizer, x, y, autocast=autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=TrainConfig(model="cifar10").batch_size)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per figure")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--choi", action="store_true", help="also time Choi's 96 x 1366 input")
    args = parser.parse_args()

    default = MelConfig()
    shapes = {"default 3 s crop": (default.n_mels, crop_frames(default, TrainConfig(model="cifar10").crop_s))}
    if args.choi:
        choi = MelConfig.preset("choi")
        shapes["choi full clip"] = (choi.n_mels, choi.n_frames)
    runs = [(torch.device("cpu"), False)]
    if torch.cuda.is_available():
        runs += [(torch.device("cuda"), False), (torch.device("cuda"), True)]
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    print(f"torch {torch.__version__}, {platform.machine()} CPU with {torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    print(f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'model':<10} {'input':<26} {'device':<6} {'precision':<10} {'samples/s':>10}")
    for name in MODEL_NAMES:
        for label, shape in shapes.items():
            for device, autocast in runs:
                rate = samples_per_second(name, shape, device=device, autocast=autocast,
                                          batch_size=args.batch_size, steps=args.steps, warmup=args.warmup)
                precision = "bf16" if autocast else "fp32"
                print(f"{name:<10} {label + f' {shape[0]}x{shape[1]}':<26} {device.type:<6} {precision:<10} "
                      f"{rate:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
