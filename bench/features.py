"""Benchmark: the features stage's shard writer against the naive loop of the original project.

The naive loop is what the 2018 code did per file: ``librosa.load`` + ``melspectrogram`` + ``power_to_db``,
one file after another, each result saved as a loose ``.npy``. Ours is
:func:`pipeline.feature_shards.write_feature_shard` with every core. Both make the same spectrograms (the script
prints their largest difference).

Each method runs in a fresh Python process, so its peak memory is its own; imports and a one-clip warm-up
happen before the clock starts (the pool's start-up is timed); every clip is read once beforehand so both
find the files in the page cache. CPU time counts the process and its children (the pool's workers); a
child's peak RSS counts the pages it shares with its parent after fork (any helper process a library
forks at import shows there too). Run it at two sizes to see that memory does not grow with the number of
clips. Prints figures, asserts nothing.

    python bench/features.py --audio-dir /work/shared/sample-audio
    python bench/features.py --synthetic 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import librosa
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.audio import is_audio_path  # noqa: E402
from pipeline.feature_shards import write_feature_shard  # noqa: E402
from pipeline.mel import MelConfig  # noqa: E402
from pipeline.synth import SYNTH_CLASSES, write_synthetic_dataset  # noqa: E402

METHODS = ("naive", "ours")


def naive_log_mel(path: Path, cfg: MelConfig) -> np.ndarray:
    """The original per-file recipe: (n_mels, n_frames) dB in the storage dtype."""
    y, sr = librosa.load(path, sr=cfg.sr, duration=cfg.duration_s)
    y = librosa.util.fix_length(y, size=cfg.n_samples)
    mel = librosa.feature.melspectrogram(
        y=y, sr=sr, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax
    )
    return librosa.power_to_db(mel).astype(cfg.dtype)


def _rusage() -> tuple[float, float, float]:
    """(CPU seconds of this process and its reaped children, peak RSS MiB of this process, of its largest child)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return cpu, _peak_rss_mib(own), children.ru_maxrss / 1024  # Linux reports KiB


def _peak_rss_mib(own: resource.struct_rusage) -> float:
    # ru_maxrss of an exec'd process starts at its parent's RSS (the bench's, here); VmHWM is its own.
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return own.ru_maxrss / 1024
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def measure(method: str, clips: list[Path], cfg: MelConfig, out_dir: Path, workers: int | None) -> dict:
    """Run one method on ``clips`` in this process and return its figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    naive_log_mel(clips[0], cfg)  # warm-up: librosa's lazy imports and the decoder's first call
    cpu0, _, _ = _rusage()
    start = time.perf_counter()
    if method == "naive":
        for index, path in enumerate(clips):
            np.save(out_dir / f"{index:06d}.npy", naive_log_mel(path, cfg))
    else:
        tracks = [(f"{index:06d}", str(path)) for index, path in enumerate(clips)]
        write_feature_shard(tracks, out_dir / "shard.h5", cfg, workers=workers)
    wall = time.perf_counter() - start
    cpu1, peak_main, peak_child = _rusage()
    return {"wall_s": wall, "cpu_s": cpu1 - cpu0, "peak_main_mib": peak_main, "peak_child_mib": peak_child}


def _run_child(method: str, clip_list: Path, cfg: MelConfig, out_dir: Path, workers: int | None) -> dict:
    command = [sys.executable, __file__, "--measure", method, "--clip-list", str(clip_list), "--out", str(out_dir)]
    command += ["--mel-config", json.dumps(cfg.to_dict())]
    if workers is not None:
        command += ["--workers", str(workers)]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _largest_difference(out: Path, n_clips: int) -> float:
    """Largest |ours - naive| in dB over every stored value."""
    with h5py.File(out / "ours" / "shard.h5", "r") as h5:
        mel = h5["mel"]
        return max(
            float(np.abs(mel[i].astype(np.float32) - np.load(out / "naive" / f"{i:06d}.npy").astype(np.float32)).max())
            for i in range(n_clips)
        )


def _clips(args: argparse.Namespace, scratch: Path) -> tuple[list[Path], str]:
    if args.audio_dir is not None:
        clips = sorted(path for path in Path(args.audio_dir).rglob("*") if path.is_file() and is_audio_path(path))
        return clips, str(args.audio_dir)
    per_class = math.ceil(args.synthetic / len(SYNTH_CLASSES))
    started = time.perf_counter()
    clips = write_synthetic_dataset(scratch / "audio", n_per_class=per_class, seconds=30.0, sr=22050, seed=0)
    print(f"generated {len(clips)} synthetic 30 s clips in {time.perf_counter() - started:.0f} s", flush=True)
    return sorted(clips)[: args.synthetic], f"{args.synthetic} synthetic 30 s clips"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--audio-dir", type=Path, help="benchmark on the audio files under DIR")
    source.add_argument("--synthetic", type=int, metavar="N", help="benchmark on N generated 30 s clips")
    parser.add_argument("--preset", default="default", help="MelConfig preset (default, choi)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="storage dtype")
    parser.add_argument("--workers", type=int, help="processes for ours (default: every core)")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two methods this many times")
    # Internal: one measurement in a fresh process.
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--clip-list", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mel-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        clips = [Path(line) for line in args.clip_list.read_text().splitlines()]
        cfg = MelConfig.from_dict(json.loads(args.mel_config))
        print(json.dumps(measure(args.measure, clips, cfg, args.out, args.workers)))
        return
    if args.audio_dir is None and args.synthetic is None:
        parser.error("give --audio-dir DIR or --synthetic N")

    cfg = MelConfig.preset(args.preset, dtype=args.dtype)
    with tempfile.TemporaryDirectory(prefix="melsearch-bench-") as scratch:
        scratch = Path(scratch)
        clips, described = _clips(args, scratch)
        if not clips:
            parser.error(f"no audio files under {args.audio_dir}")
        for path in clips:  # into the page cache, so neither method pays for the first read
            path.read_bytes()
        clip_list = scratch / "clips.txt"
        clip_list.write_text("\n".join(map(str, clips)) + "\n")
        workers = args.workers or os.cpu_count()
        print(f"{len(clips)} clips ({described}); preset {args.preset}, {cfg.duration_s} s, {cfg.dtype}")
        print(f"ours: {workers} worker processes on {os.cpu_count()} CPUs ({os.uname().machine})")
        header = ("method", "clips/s", "wall s", "CPU s/clip", "peak RSS MiB", "largest child")
        print("{:<7} {:>8} {:>8} {:>11} {:>13} {:>14}".format(*header))
        ratios = []
        for _ in range(args.repeat):
            figures = {}
            for method in METHODS:
                figures[method] = row = _run_child(method, clip_list, cfg, scratch / method, args.workers)
                print(
                    f"{method:<7} {len(clips) / row['wall_s']:>8.1f} {row['wall_s']:>8.2f} "
                    f"{row['cpu_s'] / len(clips):>11.4f} {row['peak_main_mib']:>13.0f} {row['peak_child_mib']:>14.0f}",
                    flush=True,
                )
            ratios.append(figures["naive"]["wall_s"] / figures["ours"]["wall_s"])
            print(f"throughput ratio ours/naive: {ratios[-1]:.2f}x", flush=True)
        if args.repeat > 1:
            print(f"ratio over {args.repeat} runs: median {np.median(ratios):.2f}x, min {min(ratios):.2f}x")
        print(f"largest |ours - naive|: {_largest_difference(scratch, len(clips)):.2e} dB ({cfg.dtype} storage)")


if __name__ == "__main__":
    main()
