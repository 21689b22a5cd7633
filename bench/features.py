"""Benchmark: the features stage as a user runs it, against the naive loop of the original project.

Headline: ``melsearch run --stage features`` in a fresh process (cold: start-up, Luigi, the pool, the merge
all timed) against the original's per-file loop in a fresh process (``librosa.load`` + ``melspectrogram`` +
``power_to_db`` + ``np.save``, one file after another, librosa's default threads), run in turn A B A B on
about 1000 real clips: the shared 30 GTZAN clips copied under new names, each with its own tiny gain change,
so no run can reuse another's work. The dataset stage (which checks every file) runs once beforehand and
each stage run starts from a copy of its output. Wall, CPU (user + sys of every process the run started,
reaped here as their subreaper) and peak memory (PSS sampled at 10 Hz, summed over those processes) are
printed per run, then medians and the median of the paired ratios; the load average says how busy the
machine was.

Second figures: the bare per-clip cost in one thread (decode, our log-mel, librosa's log-mel) that the
stage's CPU per clip is compared with, and the same A/B on the 120 one-minute 44.1 kHz stereo MP3s of
``../shared/emotify-audio``. Prints figures, asserts nothing. Linux only (prctl, /proc).

    python bench/features.py                          # 990 clips, 3 pairs, then the MP3s
    python bench/features.py --clips 300 --pairs 2    # memory against the number of clips
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.audio import is_audio_path  # noqa: E402

SHARED = ROOT.parent / "shared"
PR_SET_CHILD_SUBREAPER = 36


def naive_loop(clips: list[Path], out_dir: Path) -> None:
    """The original project's recipe, file by file, with librosa's defaults (22050 Hz, 30 s, 128 mels)."""
    import librosa

    for index, path in enumerate(clips):
        y, sr = librosa.load(path, sr=22050, duration=30.0)
        y = librosa.util.fix_length(y, size=22050 * 30)
        mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=2048, hop_length=512, n_mels=128)
        np.save(out_dir / f"{index:06d}.npy", librosa.power_to_db(mel))


def bare_costs(clips: list[Path]) -> dict:
    """CPU ms per clip of decoding, of our log-mel and of librosa's, in one process set up as a pool worker."""
    import librosa
    from threadpoolctl import threadpool_limits

    from pipeline.audio import load_audio
    from pipeline.mel import MelConfig, extract_log_mel
    from pipeline.runtime import keep_freed_memory

    cfg = MelConfig()
    threadpool_limits(limits=1)
    keep_freed_memory()
    decode = ours = theirs = 0.0
    warm_up = np.zeros(cfg.n_samples, np.float32)  # the filterbank, librosa's lazy imports: once per process
    extract_log_mel(warm_up, cfg)
    librosa.power_to_db(librosa.feature.melspectrogram(y=librosa.util.fix_length(warm_up, size=cfg.n_samples)))
    for path in clips:
        started = time.process_time()
        samples, _ = load_audio(path, sr=cfg.sr, max_seconds=cfg.duration_s)
        samples = librosa.util.fix_length(samples, size=cfg.n_samples)
        decoded = time.process_time()
        extract_log_mel(samples, cfg)
        extracted = time.process_time()
        librosa.power_to_db(librosa.feature.melspectrogram(y=samples, sr=cfg.sr))
        decode, ours = decode + decoded - started, ours + extracted - decoded
        theirs += time.process_time() - extracted
    return {name: 1e3 * value / len(clips) for name, value in
            (("decode_ms", decode), ("log_mel_ms", ours), ("librosa_log_mel_ms", theirs))}


def make_clips(sources: list[Path], n_clips: int, out_dir: Path) -> list[Path]:
    """``n_clips`` copies of ``sources`` in GTZAN's layout, copy k of a clip scaled by 1 - 1e-3 (k + 1)."""
    audio = [sf.read(path, dtype="float32") for path in sources]
    clips = []
    for index in range(n_clips):
        source = sources[index % len(sources)]
        samples, sr = audio[index % len(sources)]
        label = source.parent.name
        path = out_dir / label / f"{label}.{index:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, samples * (1 - 1e-3 * (index // len(sources) + 1)), sr, subtype="PCM_16")
        clips.append(path)
    return clips


def _memory(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between their users, so the sum is honest), else RSS."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _descendants_memory(root: int) -> int:
    """Summed PSS in bytes of ``root``'s descendants (orphans come back to us: we are their subreaper)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command name
    ours, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in ours:
                ours.add(child)
                frontier.append(child)
    total = 0
    for pid in ours - {root}:
        try:
            total += _memory(pid)
        except OSError:  # it ended meanwhile
            pass
    return total


def measure(command: list[str]) -> dict:
    """Run ``command``; wall s, CPU s of it and everything it started, peak summed memory (PSS) MiB."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, _descendants_memory(os.getpid()))
        time.sleep(0.1)
    wall = time.perf_counter() - started
    stderr = process.stderr.read()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # reap the orphans (a forkserver, its workers) so their CPU counts
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}:\n{stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak / 2**20}


def melsearch_command(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "melsearch"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "pipeline", *args]


def ab_runs(name: str, audio_dir: Path, clips: list[Path], scratch: Path, pairs: int) -> dict:
    """``pairs`` x (naive loop, features stage), each in a fresh process; prints each run and the medians."""
    template = scratch / f"{name}-dataset"
    dataset = measure(melsearch_command("run", "--stage", "dataset", "--audio-dir", str(audio_dir),
                                        "--workdir", str(template)))
    print(f"{name}: {len(clips)} clips; dataset stage (once, not in the figures): {dataset['wall_s']:.1f} s wall, "
          f"{dataset['cpu_s']:.1f} CPU s", flush=True)
    clip_list = scratch / f"{name}-clips.txt"
    clip_list.write_text("\n".join(map(str, clips)) + "\n")
    runs: dict[str, list[dict]] = {"naive": [], "stage": []}
    for pair in range(pairs):
        for method in ("naive", "stage"):
            out = scratch / f"{name}-{method}"
            if method == "naive":
                out.mkdir()
                command = [sys.executable, __file__, "--naive", str(clip_list), str(out)]
            else:
                shutil.copytree(template, out)
                command = melsearch_command("run", "--stage", "features", "--audio-dir", str(audio_dir),
                                            "--workdir", str(out))
            row = measure(command)
            runs[method].append(row)
            shutil.rmtree(out)
            print(f"  pair {pair + 1} {method:<5} {row['wall_s']:7.2f} s wall {row['cpu_s']:7.2f} CPU s "
                  f"{1e3 * row['cpu_s'] / len(clips):6.1f} CPU ms/clip {row['peak_rss_mib']:6.0f} MiB peak PSS "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    medians = {method: {key: statistics.median(row[key] for row in rows) for key in rows[0]}
               for method, rows in runs.items()}
    ratios = [naive["wall_s"] / stage["wall_s"] for naive, stage in zip(runs["naive"], runs["stage"], strict=True)]
    for method, row in medians.items():
        print(f"  median {method:<5} {row['wall_s']:7.2f} s wall ({len(clips) / row['wall_s']:5.1f} clips/s) "
              f"{row['cpu_s']:7.2f} CPU s ({1e3 * row['cpu_s'] / len(clips):.1f} ms/clip) "
              f"{row['peak_rss_mib']:6.0f} MiB peak PSS")
    print(f"  stage vs naive wall: median of paired ratios {statistics.median(ratios):.2f}x "
          f"(runs: {', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    return {"medians": medians, "ratio": statistics.median(ratios)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio-dir", type=Path, default=SHARED / "sample-audio", help="the clips to copy")
    parser.add_argument("--clips", type=int, default=990, help="how many copies to benchmark on")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs of runs")
    parser.add_argument("--mp3-dir", type=lambda text: Path(text) if text else None, default=SHARED / "emotify-audio",
                        help="MP3s to run the same A/B on ('' to skip)")
    parser.add_argument("--naive", nargs=2, metavar=("CLIP_LIST", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--bare", metavar="CLIP_LIST", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.naive:
        naive_loop([Path(line) for line in Path(args.naive[0]).read_text().split()], Path(args.naive[1]))
        return
    if args.bare:
        print(json.dumps(bare_costs([Path(line) for line in Path(args.bare).read_text().split()])))
        return

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit("prctl(PR_SET_CHILD_SUBREAPER) failed: run on Linux")
    sources = sorted(p for p in args.audio_dir.rglob("*") if p.is_file() and is_audio_path(p))
    if not sources:
        parser.error(f"no audio files under {args.audio_dir}")
    print(f"{os.cpu_count()} CPUs ({os.uname().machine}); load average at start {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="melsearch-bench-") as scratch:
        scratch = Path(scratch)
        clips = make_clips(sources, args.clips, scratch / "audio")
        bare_list = scratch / "bare.txt"
        bare_list.write_text("\n".join(map(str, clips[: min(len(clips), 120)])) + "\n")
        bare = json.loads(subprocess.run([sys.executable, __file__, "--bare", str(bare_list)], check=True,
                                         stdout=subprocess.PIPE, text=True).stdout)
        print(f"bare, one thread, per clip: decode {bare['decode_ms']:.1f} ms + log-mel {bare['log_mel_ms']:.1f} ms "
              f"(librosa's log-mel {bare['librosa_log_mel_ms']:.1f} ms)", flush=True)
        result = ab_runs("clips", scratch / "audio", clips, scratch, args.pairs)
        stage_ms = 1e3 * result["medians"]["stage"]["cpu_s"] / len(clips)
        print(f"  stage CPU per clip / (decode + bare log-mel): "
              f"{stage_ms / (bare['decode_ms'] + bare['log_mel_ms']):.2f}x; "
              f"/ (decode + librosa's log-mel): {stage_ms / (bare['decode_ms'] + bare['librosa_log_mel_ms']):.2f}x",
              flush=True)
        if args.mp3_dir is not None and args.mp3_dir.is_dir():
            mp3s = sorted(p for p in args.mp3_dir.rglob("*.mp3"))
            ab_runs("mp3", args.mp3_dir, mp3s, scratch, args.pairs)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
