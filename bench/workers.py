"""Benchmark: the features stage shared by 1 or 2 worker processes through luigid, as several machines share it.

One process is ``melsearch run --stage features --scheduler-url URL --workers 1``; with 2, a ``melsearch worker`` is
started first and takes shards too. Every process extracts with ``features.processes=1`` (one core each), so 2
processes stand for 2 one-core machines. Each run starts from a copy of a finished dataset stage in a fresh work
directory (nothing reused); the wall time is the run's, from its start to its exit (the worker is already waiting).
The figures alternate 1, 2, 1, 2, ... and print the medians and the load average (the machine may be shared).
Prints figures, asserts nothing.

    python bench/workers.py                              # 96 synthetic 8 s clips, shards of 8, 3 pairs
    python bench/workers.py --per-class 40 --pairs 2     # 240 clips
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


def melsearch(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=ENV, stdout=subprocess.DEVNULL, **popen)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(base: Path, audio: Path, workdir: Path, url: str, processes: int, settings: list[str]) -> dict:
    """The features stage of ``audio`` in ``workdir`` (its dataset stage copied from ``base``) by ``processes``."""
    shutil.copytree(base, workdir)
    worker = None
    if processes == 2:
        worker = melsearch("worker", "--workdir", str(workdir), "--scheduler-url", url, "--set",
                           "features.processes=1", stderr=subprocess.DEVNULL)
        time.sleep(2)  # it is polling before the run starts, as a machine that joined earlier
    try:
        started = time.monotonic()
        code = melsearch("run", "-q", "--stage", "features", "--workdir", str(workdir), "--audio-dir", str(audio),
                         "--scheduler-url", url, "--workers", "1", *settings).wait()
        wall = time.monotonic() - started
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    if code != 0:
        raise SystemExit(f"the run in {workdir} exited {code}")
    figures = json.loads(next(workdir.glob("features/*/figures.json")).read_text())
    makers = {shard["worker"] for shard in figures["shards"]}
    return {"processes": processes, "wall_s": round(wall, 2), "shards": len(figures["shards"]),
            "made_by": len(makers), "load": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=16, help="synthetic clips per class (6 classes)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each clip")
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3, help="runs of 1 then 2 processes")
    args = parser.parse_args()
    settings = ["--set", f"features.shard_size={args.shard_size}", "--set", "features.processes=1"]
    with tempfile.TemporaryDirectory(prefix="melsearch-bench-workers-") as tmp:
        tmp = Path(tmp)
        audio, base = tmp / "audio", tmp / "base"
        subprocess.run([sys.executable, "-m", "pipeline", "synth", str(audio), "--per-class", str(args.per_class),
                        "--seconds", str(args.seconds)], env=ENV, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-m", "pipeline", "run", "-q", "--stage", "dataset", "--workdir", str(base),
                        "--audio-dir", str(audio)], env=ENV, check=True, stdout=subprocess.DEVNULL)
        port = free_port()
        subprocess.run([sys.executable, "-m", "pipeline", "scheduler", "start", "--workdir", str(tmp / "luigid"),
                        "--port", str(port)], env=ENV, check=True, stdout=subprocess.DEVNULL)
        results = []
        try:
            for pair in range(args.pairs):
                for processes in (1, 2):
                    result = one_run(base, audio, tmp / f"work-{pair}-{processes}", f"http://127.0.0.1:{port}",
                                     processes, settings)
                    print(json.dumps(result), flush=True)
                    results.append(result)
        finally:
            subprocess.run([sys.executable, "-m", "pipeline", "scheduler", "stop", "--workdir", str(tmp / "luigid"),
                            "--port", str(port)], env=ENV, stdout=subprocess.DEVNULL)
    medians = {n: statistics.median(r["wall_s"] for r in results if r["processes"] == n) for n in (1, 2)}
    print(f"{6 * args.per_class} clips of {args.seconds:g} s, shards of {args.shard_size}: features stage wall "
          f"{medians[1]:.1f} s with 1 process, {medians[2]:.1f} s with 2 ({medians[1] / medians[2]:.2f}x); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
