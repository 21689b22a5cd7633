"""How fast a library is indexed, as users run it, against the bare forward pass that bounds it; and a cold query.

Each round runs ``python -m pipeline run --library DIR --model musicnn`` from a fresh work directory (the
library: the first ``--songs`` files of a labelled folder, flattened into links) and samples the run's process
tree every 0.1 s from ``/proc``: user and system CPU seconds, minor page faults and the peak of the summed RSS
(a process's figures are its last sample, so up to 0.1 s of each process is missed). Then two cold
``query FILE`` runs: a song of the library, and one that is not in it. Genre precision@10 of the index uses the
folder's labels (leave-one-out, exact cosine). ``--code DIR`` runs another checkout (e.g. a ``git worktree`` of
an older commit) in the same way, alternating rounds, so both are measured on the same machine at the same time.
The bound: the pretrained backbone alone on random 3 s patches, one patch per pass, the better of one process on
torch's threads and a single-threaded process per core at once (as the library's pool runs it), patches/s and
GFLOP/s (2 x multiply-adds counted over its convolutions and dense layers).
Prints a table, asserts nothing::

    python bench/library_speed.py --library ../shared/emotify-audio --songs 40 --rounds 2 --code /work/base
    python bench/library_speed.py --library ../shared/emotify-audio --songs 120 --patches 10 5 3 1 --no-query
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.dataset import list_audio_files  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_stat(pid: int) -> tuple[int, float, float, int, int] | None:
    """(parent pid, user s, system s, minor faults, RSS bytes) of a live process, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command name, field n of proc(5) is at n - 3: ppid 4, minflt 10, utime 14, stime 15, rss 24
    return int(fields[1]), int(fields[11]) / _TICK, int(fields[12]) / _TICK, int(fields[7]), int(fields[21]) * _PAGE


def run_measured(cmd: list[str], env: dict[str, str], cwd: Path) -> dict:
    """Run ``cmd``; its wall time and its process tree's CPU, minor faults and peak summed RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last: dict[int, tuple[float, float, int]] = {}
    peak = 0
    while process.poll() is None:
        stats = {pid: stat for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                 if (stat := _proc_stat(pid)) is not None}
        tree, grew = {process.pid}, True
        while grew:
            more = {pid for pid, stat in stats.items() if stat[0] in tree} - tree
            tree |= more
            grew = bool(more)
        peak = max(peak, sum(stats[pid][4] for pid in tree if pid in stats))
        last.update({pid: stats[pid][1:4] for pid in tree if pid in stats})
        time.sleep(0.1)
    wall = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall_s": wall, "user_s": sum(v[0] for v in last.values()), "sys_s": sum(v[1] for v in last.values()),
            "minflt": sum(v[2] for v in last.values()), "peak_rss_mb": peak / 2**20, "stdout": out}


def flatten(labelled: Path, out: Path, songs: int) -> dict[str, str]:
    """Links ``out/<label>-<name>`` to the first ``songs`` files of ``labelled`` taken genre by genre in turn."""
    out.mkdir(parents=True)
    by_genre: dict[str, list[Path]] = {}
    for path in list_audio_files(labelled):
        by_genre.setdefault(path.relative_to(labelled).parts[0], []).append(path)
    labels, turn = {}, 0
    while len(labels) < songs and any(by_genre.values()):
        genre = sorted(by_genre)[turn % len(by_genre)]
        turn += 1
        if by_genre[genre]:
            path = by_genre[genre].pop(0)
            (out / f"{genre}-{path.name}").symlink_to(path.resolve())
            labels[f"{genre}-{path.name}"] = genre
    return labels


def precision_at_10(workdir: Path, labels: dict[str, str]) -> float:
    from pipeline.embeddings import read_embeddings
    from pipeline.index import genre_precision_at_k

    path = next(workdir.glob("embeddings/*/embeddings.parquet"))
    rows, vectors = read_embeddings(path)
    known = [labels[row["track_id"]] for row in rows]
    return genre_precision_at_k(vectors, known, k=10)["genre_precision_at_10"]


def _forward_rate(threads: int, seconds: float) -> float:
    """Patches/s of the bare pretrained backbone on ``threads`` threads, one random 3 s patch per pass."""
    from pipeline.runtime import keep_freed_memory, quiet_openmp

    quiet_openmp()  # as the CLI: before torch loads
    keep_freed_memory()
    import torch

    from models.musicnn import load_pretrained_musicnn

    if threads:
        torch.set_num_threads(threads)
    net, x = load_pretrained_musicnn().eval(), torch.randn(1, 1, 96, 187)
    with torch.inference_mode():
        net.embed(x)
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            net.embed(x)
            done += 1
    return done / (time.perf_counter() - started)


def _macs_per_patch() -> int:
    """Multiply-adds of one 3 s patch through the backbone's convolutions and dense layers."""
    import torch

    from models.musicnn import load_pretrained_musicnn

    net, macs = load_pretrained_musicnn().eval(), 0

    def count(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d):
            macs += output.numel() * module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
        elif isinstance(module, torch.nn.Linear):
            macs += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in net.modules()]
    with torch.inference_mode():
        net.embed(torch.randn(1, 1, 96, 187))
    for hook in hooks:
        hook.remove()
    return macs


def forward_bound(seconds: float = 8.0) -> dict:
    """The bare backbone's patches/s and GFLOP/s on this machine: the better of one process on torch's threads
    and one single-threaded process per core at once (as the library's pool runs it), each for ``seconds``."""
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        one_process = pool.submit(_forward_rate, 0, seconds).result()
        per_core = sum(pool.map(_forward_rate, [1] * cores, [seconds] * cores))
    rate, macs = max(one_process, per_core), _macs_per_patch()
    return {"patches_per_s": rate, "one_process_patches_per_s": one_process, "per_core_patches_per_s": per_core,
            "gmac_per_patch": macs / 1e9, "gflop_per_s": 2 * macs * rate / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, required=True, help="a folder of audio, labels as sub-folders")
    parser.add_argument("--songs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--patches", type=int, nargs="*", default=[],
                        help="3 s patches per song to compare: [features] segments = N, duration_s = 3 N")
    parser.add_argument("--code", type=Path, nargs="*", default=[], help="other checkouts to run the same way")
    parser.add_argument("--no-query", action="store_true", help="skip the cold queries")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="melsearch-speed-"))
    labels = flatten(args.library.resolve(), base / "library", args.songs)
    outside = next((p for p in list_audio_files(args.library) if f"{p.parent.name}-{p.name}" not in labels), None)
    if outside is None and not args.no_query:
        sys.exit("--songs takes every file: leave some out for the query of a new song, or --no-query")
    inside = base / "library" / sorted(labels)[0]
    checkouts = [ROOT, *[code.resolve() for code in args.code]]
    results = []
    for round_ in range(args.rounds):
        for code in checkouts:
            for patches in args.patches or [None]:
                env = {**os.environ, "PYTHONPATH": str(code)}
                workdir = base / f"work-{len(results)}"
                extra = ["--set", f"features.segments={patches}", "--set", f"features.duration_s={3 * patches}"] \
                    if patches else []
                cmd = [sys.executable, "-m", "pipeline", "run", "--library", str(base / "library"), "--model",
                       "musicnn", "--workdir", str(workdir), *extra]
                figures = run_measured(cmd, env, code)
                figures.pop("stdout")
                row = {"code": code.name, "round": round_ + 1, "patches": patches or 10, **figures,
                       "songs_per_s": len(labels) / figures["wall_s"], "p_at_10": precision_at_10(workdir, labels)}
                if not args.no_query:
                    for name, song in (("query_indexed_s", inside), ("query_new_s", outside)):
                        query = [sys.executable, "-m", "pipeline", "query", "--workdir", str(workdir), str(song)]
                        row[name] = run_measured(query, env, code)["wall_s"]
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
                results.append(row)
    bound = forward_bound()
    print(f"bare forward: {bound['patches_per_s']:.1f} patches/s, {bound['gmac_per_patch']:.2f} GMAC/patch, "
          f"{bound['gflop_per_s']:.0f} GFLOP/s (one process on torch's threads "
          f"{bound['one_process_patches_per_s']:.1f}/s, a single-threaded process per core "
          f"{bound['per_core_patches_per_s']:.1f}/s)")
    print(f"\n{'code':<10} {'patch':>5} {'wall s':>7} {'songs/s':>8} {'user s':>7} {'sys s':>6} {'faults/song':>11} "
          f"{'RSS MB':>7} {'P@10':>6} {'q lib s':>7} {'q new s':>7} {'of bound':>8}")
    for row in results:
        print(f"{row['code']:<10} {row['patches']:>5} {row['wall_s']:7.1f} {row['songs_per_s']:8.2f} "
              f"{row['user_s']:7.1f} {row['sys_s']:6.1f} {row['minflt'] / len(labels):11.0f} "
              f"{row['peak_rss_mb']:7.0f} {row['p_at_10']:6.3f} {row.get('query_indexed_s', 0):7.2f} "
              f"{row.get('query_new_s', 0):7.2f} {row['songs_per_s'] * row['patches'] / bound['patches_per_s']:8.0%}")
    print("\n'of bound': songs/s x patches per song over the bare forward's patches/s (decoding, start-up and the "
          "other stages come on top; a library's default is 10 patches, 3 s windows spread over the song)")


if __name__ == "__main__":
    main()
