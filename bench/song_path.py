"""Benchmark: song paths (:func:`pipeline.playlist.song_path`) on an indexed, labelled library.

For random pairs of songs (A, B) of different genres (the label folders), an N-song path from A to B is scored by
its largest step over the direct A-B distance (below 1: no step jumps further than going straight to B), the
fraction of its steps that end nearer to B, and the fraction of its inner songs of A's or B's genre; for several
``step_weight`` values, and against N - 2 random songs ordered from far from B to near it. Prints figures,
asserts nothing.

    melsearch run --library /work/shared/emotify-audio --model musicnn --workdir /tmp/emotify
    python bench/song_path.py --workdir /tmp/emotify
"""

from __future__ import annotations

import argparse
import itertools
import random

import numpy as np

from pipeline.playlist import song_path
from pipeline.query import MusicSearch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a work directory with a library index of labelled songs")
    parser.add_argument("--pairs", type=int, default=60, help="random (A, B) pairs (default: 60)")
    parser.add_argument("--n", type=int, default=8, help="songs per path (default: 8)")
    args = parser.parse_args()
    search = MusicSearch.load(args.workdir)
    rows = search.tracks()
    ids = [row["track_id"] for row in rows]
    genre = {row["track_id"]: row["label"] or row["track_id"].split("/")[0] for row in rows}
    vectors = dict(zip(ids, search.vectors(ids), strict=True))
    rng = random.Random(0)
    pairs = rng.sample([pair for pair in itertools.combinations(ids, 2) if genre[pair[0]] != genre[pair[1]]],
                       args.pairs)

    def score(path: list[str]) -> tuple[float, float, float]:
        points = np.array([vectors[track] for track in path])
        steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
        to_end = np.linalg.norm(points - points[-1], axis=1)
        ends = (genre[path[0]], genre[path[-1]])
        return (steps.max() / to_end[0], float(np.mean(np.diff(to_end) < 0)),
                float(np.mean([genre[track] in ends for track in path[1:-1]])))

    def report(name: str, paths: list[list[str]]) -> None:
        ratio, nearer, own = np.array([score(path) for path in paths]).T
        print(f"{name:<34} largest step / A-B {ratio.mean():.3f} (max {ratio.max():.3f})  steps nearer to B "
              f"{nearer.mean():.3f}  inner songs of A's or B's genre {own.mean():.3f}")

    print(f"{len(ids)} songs, {args.pairs} pairs of different genres, paths of {args.n}")
    for weight in (0.0, 0.5, 1.0):
        report(f"song_path step_weight={weight}",
               [[e["track_id"] for e in song_path(search, a, b, args.n, step_weight=weight)] for a, b in pairs])
    baseline = []
    for a, b in pairs:
        inner = rng.sample([track for track in ids if track not in (a, b)], args.n - 2)
        baseline.append([a, *sorted(inner, key=lambda t: -np.linalg.norm(vectors[t] - vectors[b])), b])
    report("random songs, far to near B", baseline)


if __name__ == "__main__":
    main()
