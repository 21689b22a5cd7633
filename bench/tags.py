"""Benchmark: do musicnn's top tags say what a song is? Its genre tag among a clip's top tags, per genre folder,
and how many tags each threshold keeps.

The folder is indexed as a user would (``melsearch run --library DIR --model musicnn`` into ``--workdir``, default
``bench/out/tags-work``): each clip's tag probabilities are the mean over its 3 s windows of musicnn's 50 sigmoid
outputs, the same forward pass as its search vector. The index's id table holds them; the top-level folder is
the clip's genre. Printed:

- per genre, the fraction of its clips whose top-3 tags include the genre's own MSD tag (``rock``, ``pop``,
  ``electronic``, ...; a genre with no MSD tag of its name, as ``classical``, says so), and its most frequent
  top-3 tags;
- per threshold, what :func:`pipeline.tags.top_tags`' rule (the tags over the threshold, at least 3, at most 8)
  gives: tags per clip, the clips with fewer than 3 over it, the fraction of clips showing their own genre's tag
  and the fraction showing another genre's tag (of the genres present), the trade the threshold makes.

    python bench/tags.py                                  # /work/shared/emotify-audio
    python bench/tags.py --audio-dir ~/Music --workdir /tmp/tags-work

Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.index import read_ids  # noqa: E402
from pipeline.query import MusicSearch  # noqa: E402
from pipeline.tags import MAX_TAGS, MIN_TAGS, TAG_THRESHOLD  # noqa: E402

DEFAULT_DIR = ROOT.parent / "shared" / "emotify-audio"
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3)


def shown(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """(N, T) tag probabilities -> (N, T) bool: the tags :func:`pipeline.tags.top_tags`' rule shows at ``threshold``."""
    order = np.argsort(-probabilities, axis=1, kind="stable")
    counts = np.clip((probabilities >= threshold).sum(axis=1), MIN_TAGS, MAX_TAGS)
    keep = np.zeros_like(probabilities, dtype=bool)
    for i, (row, count) in enumerate(zip(order, counts, strict=True)):
        keep[i, row[:count]] = True
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-dir", type=Path, default=DEFAULT_DIR, help="genre folders of audio")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "tags-work")
    args = parser.parse_args()

    subprocess.run([sys.executable, "-m", "pipeline", "run", "--library", str(args.audio_dir), "--model", "musicnn",
                    "--workdir", str(args.workdir), "-q"], cwd=ROOT, check=True)
    search = MusicSearch.load(args.workdir)
    rows = read_ids(search.index_dir)
    names = search.tag_names
    probabilities = np.array([row["tag_probabilities"] for row in rows], dtype=np.float32)  # (N, 50)
    labels = np.array([row["label"] for row in rows])
    genres = sorted(set(labels))
    index_of = {name.lower(): i for i, name in enumerate(names)}
    print(f"{len(rows)} clips of {args.audio_dir}, {len(names)} musicnn tags\n")

    top3 = np.argsort(-probabilities, axis=1, kind="stable")[:, :3]
    print("genre        clips  own tag in top 3   most frequent top-3 tags")
    for genre in genres:
        mine = labels == genre
        common = Counter(names[i] for row in top3[mine] for i in row).most_common(5)
        listed = ", ".join(f"{tag} {n}" for tag, n in common)
        if genre.lower() in index_of:
            rate = (top3[mine] == index_of[genre.lower()]).any(axis=1).mean()
            figure = f"{rate:.2f} ({int(round(rate * mine.sum()))}/{mine.sum()})"
        else:
            figure = "no such tag"
        print(f"{genre:<12} {mine.sum():>5}  {figure:<17}  {listed}")

    tagged = [g for g in genres if g.lower() in index_of]
    columns = np.array([index_of[g.lower()] for g in tagged])
    own = np.array([index_of.get(label.lower(), -1) for label in labels])
    print(f"\nthreshold  tags/clip  clips <{MIN_TAGS} over it  own genre's tag shown  another genre's tag shown"
          f"   (genres with a tag: {', '.join(tagged)}; rule: over the threshold, {MIN_TAGS} to {MAX_TAGS})")
    for threshold in THRESHOLDS:
        keep = shown(probabilities, threshold)
        with_own = own >= 0
        own_shown = keep[np.flatnonzero(with_own), own[with_own]].mean()
        other = np.array([keep[i, [c for c in columns if c != own[i]]].any() for i in range(len(rows))]).mean()
        few = ((probabilities >= threshold).sum(axis=1) < MIN_TAGS).mean()
        mark = "  <- TAG_THRESHOLD" if threshold == TAG_THRESHOLD else ""
        print(f"{threshold:>9.2f}  {keep.sum(axis=1).mean():>9.2f}  {few:>19.2f}  {own_shown:>20.2f}  {other:>24.2f}"
              f"{mark}")


if __name__ == "__main__":
    main()
