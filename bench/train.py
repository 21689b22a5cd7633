"""Benchmark: training throughput (samples per second) of each model, forward + backward + AdamW step; with
``--rss``, the peak memory of training with features in memory and streamed, at 1k and 20k tracks.

Throughput: batches of the default input: the default features (128 mels) cropped to the default 3 s (129
frames), plus Choi's full 96 x 1366 input with ``--choi``. Each step is :func:`pipeline.train.train_step`, the
training loop's own. On the CPU with every core; on CUDA (when torch sees one) in float32 and under bf16
autocast with channels-last tensors, as training runs there. Warm-up steps come before the clock starts;
CUDA timings synchronise the device.

Peak RSS (``--rss``): synthetic features files (random dB values, float16 as the features stage stores them,
one chunk per track) and manifests (10 labels, 80/10/10 train/valid/test) of each size, then one epoch of
:func:`pipeline.train.train_model` in a fresh child process per figure, with ``feature_memory_gb`` large (in
memory) and 0 (streamed); the child's peak RSS is ``ru_maxrss`` of ``os.wait4`` on it. The clips are the
default features at 3 s (128 x 130 frames, one 3 s crop each: 20k crops an epoch) rather than 30 s, so that an
epoch of 20k tracks takes minutes on 2 CPU cores, and the in-memory figure at 20k (1.3 GB of float32) still
fits; the model is a narrow cifar10 (``RSS_MODEL``): the network adds the same memory to every figure, the
features are what is measured. The files go to a temporary folder unless ``--workdir`` keeps them.

Prints figures, asserts nothing.

    python bench/train.py
    python bench/train.py --steps 20 --batch-size 32 --choi
    python bench/train.py --rss --sizes 1000 20000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import MODEL_NAMES, build_model  # noqa: E402
from pipeline.inference import crop_frames  # noqa: E402
from pipeline.manifest import write_manifest  # noqa: E402
from pipeline.mel import MelConfig  # noqa: E402
from pipeline.train import TrainConfig, train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The --rss runs: the default features of 3 s clips, one epoch of a narrow cifar10 on 3 s crops.
RSS_MEL = MelConfig(duration_s=3.0)
RSS_MODEL = {"channels": (16, 16, 32, 32, 32), "dense": 32}
RSS_LABELS = 10
_CHILD = """
import sys
from pipeline.train import TrainConfig, train_model
cfg = TrainConfig(model="cifar10", epochs=1, crop_s=3.0, model_kwargs={model_kwargs})
train_model(sys.argv[1], sys.argv[2], sys.argv[3], cfg, device="cpu", feature_memory_gb=float(sys.argv[4]))
"""


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


def write_synthetic_features(folder: Path, n_tracks: int, *, seed: int = 0) -> tuple[Path, Path]:
    """A features file of ``n_tracks`` random log-mels (``RSS_MEL``, uniform in -80..0 dB) and its manifest."""
    features, manifest = folder / f"features-{n_tracks}.h5", folder / f"manifest-{n_tracks}.parquet"
    track_ids = [f"t{i:06d}" for i in range(n_tracks)]
    if not features.is_file():
        rng = np.random.default_rng(seed)
        shape = (RSS_MEL.n_mels, RSS_MEL.n_frames)
        with h5py.File(features, "w") as h5:
            mel = h5.create_dataset("mel", (n_tracks, *shape), dtype=RSS_MEL.dtype, chunks=(1, *shape))
            for begin in range(0, n_tracks, 1000):
                block = min(1000, n_tracks - begin)
                mel[begin : begin + block] = rng.uniform(-80.0, 0.0, (block, *shape)).astype(RSS_MEL.dtype)
            h5.create_dataset("track_id", data=track_ids, dtype=h5py.string_dtype("utf-8"))
            h5.create_dataset("n_frames", data=np.full(n_tracks, RSS_MEL.n_frames, dtype=np.int32))
            h5.attrs["mel_config"] = json.dumps(RSS_MEL.to_dict(), sort_keys=True)
    splits = ("train",) * 8 + ("valid", "test")
    write_manifest([{"track_id": track_id, "path": f"{track_id}.wav", "label": f"genre{i % RSS_LABELS}",
                     "split": splits[(i // RSS_LABELS) % 10], "duration_s": RSS_MEL.duration_s,
                     "sample_rate": RSS_MEL.sr, "channels": 1, "status": "ok", "reason": ""}
                    for i, track_id in enumerate(track_ids)], manifest)
    return features, manifest


def peak_rss_of_training(features: Path, manifest: Path, out: Path, memory_gb: float) -> dict:
    """One epoch of training in a child process: its peak RSS (MB), epoch seconds and total seconds."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(model_kwargs=RSS_MODEL), str(features),
                              str(manifest), str(out), str(memory_gb)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)}, text=True)
    errors = child.stderr.read()  # until it exits, then wait4 reads its resource usage
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode, seconds = os.waitstatus_to_exitcode(status), time.perf_counter() - started
    if child.returncode != 0:
        sys.exit(f"training child failed ({child.returncode}):\n{errors}")
    with open(out / "history.csv") as handle:
        epoch = float(next(csv.DictReader(handle))["seconds"])
    return {"rss_mb": usage.ru_maxrss / 1024, "epoch_s": epoch, "total_s": seconds}  # ru_maxrss: KB on Linux


def rss_table(sizes: list[int], workdir: Path) -> None:
    """Print peak training RSS in memory and streamed for each size (see the module docstring)."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    print(f"{platform.machine()} CPU, {os.cpu_count()} cores, {ram:.0f} GiB RAM; "
          f"clips {RSS_MEL.n_mels} x {RSS_MEL.n_frames} {RSS_MEL.dtype}, 3 s crops, cifar10 {RSS_MODEL}, 1 epoch")
    print(f"{'tracks':>7} {'float32 GB':>10} {'features':<10} {'peak RSS MB':>11} {'epoch s':>8} {'total s':>8}")
    streamed = {}
    for n_tracks in sizes:
        features, manifest = write_synthetic_features(workdir, n_tracks)
        nbytes = n_tracks * RSS_MEL.n_mels * RSS_MEL.n_frames * 4
        for label, memory_gb in (("in memory", 1e6), ("streamed", 0.0)):
            out = workdir / f"model-{n_tracks}-{label.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)  # a kept workdir: train afresh, not resume
            figures = peak_rss_of_training(features, manifest, out, memory_gb)
            if label == "streamed":
                streamed[n_tracks] = figures["rss_mb"]
            print(f"{n_tracks:>7} {nbytes / 1e9:>10.2f} {label:<10} {figures['rss_mb']:>11.0f} "
                  f"{figures['epoch_s']:>8.1f} {figures['total_s']:>8.1f}", flush=True)
    if len(streamed) > 1:
        small, large = min(streamed), max(streamed)
        print(f"streamed peak RSS at {large} tracks / at {small}: {streamed[large] / streamed[small]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=TrainConfig(model="cifar10").batch_size)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per figure")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--choi", action="store_true", help="also time Choi's 96 x 1366 input")
    parser.add_argument("--rss", action="store_true", help="peak RSS of training in memory and streamed instead")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000], help="tracks per --rss features file")
    parser.add_argument("--workdir", type=Path, help="where --rss writes its files (kept); default: a temporary one")
    args = parser.parse_args()
    if args.rss:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
            rss_table(args.sizes, args.workdir)
        else:
            with tempfile.TemporaryDirectory(prefix="melsearch-bench-") as tmp:
                rss_table(args.sizes, Path(tmp))
        return

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
