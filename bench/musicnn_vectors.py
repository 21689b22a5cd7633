"""Benchmark: which MSD_musicnn vector to search with, by leave-one-out genre precision on labelled real clips.

Every clip is decoded at 16 kHz (:func:`pipeline.audio.load_audio`), turned into musicnn's log-mel
(:func:`models.musicnn.musicnn_log_mel`) and cut into non-overlapping 3 s patches of 187 frames (the length the
network was trained on; a trailing part patch is dropped, as musicnn does). The pretrained network
(:func:`models.musicnn.load_pretrained_musicnn`) gives per patch the 200-d penultimate layer, the 753-d
``max_pool`` and ``mean_pool`` features and the 50 tag probabilities; a clip's vector is their mean over its
patches (``max_pool`` also its max). For comparison: the same features from *one* pass over the whole clip
(the network takes any length, though it never saw one longer than 3 s), and the log-mel's own mean (and
std) over time, which needs no network at all.

Each vector is scored three ways: raw (cosine of the L2-normalised vector, what an Annoy angular index does
with it as it is), centred (the collection's mean vector subtracted first) and z-scored (each dimension
also divided by its standard deviation over the collection). Centring and z-scoring are unsupervised and the
collection's statistics include the query (as they would in a built index).

Scores: genre precision@10 by :func:`pipeline.index.genre_precision_at_k` (every clip a query, itself
excluded, exact cosine search among all other clips), +- its standard error over queries, and precision at R
(R = other clips of the query's genre, the R-precision of a balanced collection: 2 in the GTZAN sample,
where precision@10 can reach at most 0.2). The last two columns compare each raw vector with the first row
query by query (the paired difference has a much smaller error than either figure). Chance and ceiling are
printed under each table. Features are cached in ``bench/out/`` (keyed by the folder's fingerprint). Prints
figures, asserts nothing.

    python bench/musicnn_vectors.py                       # /work/shared/sample-audio and emotify-audio
    python bench/musicnn_vectors.py --audio-dir ~/Music   # labels are the top-level sub-folders
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.musicnn import MUSICNN_MEL, MusicnnNet, load_pretrained_musicnn, musicnn_log_mel, musicnn_patches  # noqa: E402
from pipeline.audio import load_audio  # noqa: E402
from pipeline.dataset import folder_fingerprint, list_audio_files  # noqa: E402
from pipeline.index import exact_neighbours, genre_precision_at_k  # noqa: E402
from pipeline.vectors import l2_normalise  # noqa: E402

DEFAULT_DIRS = [ROOT.parent / "shared" / "sample-audio", ROOT.parent / "shared" / "emotify-audio"]
OUT = ROOT / "bench" / "out"
K = 10
# (row name, cache key): per-patch features averaged over the clip's 3 s patches, then the alternatives
VECTORS = [
    ("penultimate, mean of patches", "patch_mean/penultimate"),
    ("max_pool, mean of patches", "patch_mean/max_pool"),
    ("max_pool, max of patches", "patch_max/max_pool"),
    ("mean_pool, mean of patches", "patch_mean/mean_pool"),
    ("max_pool+mean_pool, mean of patches", "patch_mean/pooled"),
    ("taggram, mean of patches", "patch_mean/taggram"),
    ("tag logits, mean of patches", "patch_mean/logits"),
    ("penultimate, whole clip", "whole/penultimate"),
    ("max_pool, whole clip", "whole/max_pool"),
    ("mean_pool, whole clip", "whole/mean_pool"),
    ("taggram, whole clip", "whole/taggram"),
    ("baseline: log-mel mean", "logmel/mean"),
    ("baseline: log-mel mean+std", "logmel/mean_std"),
]
NORMS = ("raw", "centred", "z")


def clip_vectors(model: MusicnnNet, path: Path) -> dict[str, np.ndarray]:
    """Every candidate vector of one clip (cache key -> (D,) float32), from its 3 s patches and one whole pass."""
    y, _ = load_audio(path, sr=MUSICNN_MEL.sr)
    log_mel = musicnn_log_mel(y)  # (96, n_frames)
    with torch.no_grad():
        per_patch = model.features(torch.from_numpy(musicnn_patches(log_mel)))  # each (N, D)
        whole = model.features(torch.from_numpy(log_mel[None, None]))  # each (1, D)
    per_patch["pooled"] = torch.cat([per_patch["max_pool"], per_patch["mean_pool"]], dim=1)  # (N, 1506)
    out = {f"patch_mean/{k}": per_patch[k].mean(0) for k in ("penultimate", "max_pool", "mean_pool", "pooled",
                                                             "taggram", "logits")}  # fmt: skip
    out["patch_max/max_pool"] = per_patch["max_pool"].amax(0)
    out |= {f"whole/{k}": whole[k][0] for k in ("penultimate", "max_pool", "mean_pool", "taggram")}
    out = {k: v.numpy().astype(np.float32) for k, v in out.items()}
    out["logmel/mean"] = log_mel.mean(axis=1)
    out["logmel/mean_std"] = np.concatenate([log_mel.mean(axis=1), log_mel.std(axis=1)])
    out["n_patches"] = np.array(len(per_patch["taggram"]), dtype=np.float32)
    return out


def collection_vectors(model: MusicnnNet, folder: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """(labels, cache key -> (N, D) vectors) of the labelled clips under ``folder``, cached in bench/out."""
    cache = OUT / f"musicnn_vectors-{folder.name}-{folder_fingerprint(folder)}.npz"
    paths = [p for p in list_audio_files(folder) if p.parent != folder]  # the label is the top sub-folder
    labels = [p.relative_to(folder).parts[0] for p in paths]
    if cache.exists():
        with np.load(cache, allow_pickle=False) as npz:
            return labels, {k: npz[k] for k in npz.files}
    start = time.perf_counter()
    rows = [clip_vectors(model, p) for p in paths]
    took = time.perf_counter() - start
    vectors = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    n_patches = int(vectors["n_patches"].sum())
    print(f"{folder}: {len(paths)} clips, {n_patches} patches, {took:.0f} s ({1000 * took / n_patches:.0f} ms/patch)")
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **vectors)
    return labels, vectors


def normalised(vectors: np.ndarray, how: str) -> np.ndarray:
    """(N, D) -> (N, D) unit rows, after centring ('centred') or z-scoring ('z') over the collection."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if how in ("centred", "z"):
        vectors = vectors - vectors.mean(axis=0)
    if how == "z":
        vectors = vectors / np.maximum(vectors.std(axis=0), 1e-8)  # constant dimensions stay 0
    return l2_normalise(vectors.astype(np.float32))


def precision(vectors: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """Leave-one-out genre precision@k over all clips: (the pipeline's figure, (N,) the same per query)."""
    mean = genre_precision_at_k(vectors, labels.tolist(), k=k, max_queries=len(labels))[f"genre_precision_at_{k}"]
    queries = np.arange(len(labels))
    ids, _ = exact_neighbours(vectors, vectors, k, exclude=queries)
    return mean, (labels[ids] == labels[:, None]).mean(axis=1)


def se(values: np.ndarray) -> float:
    """Standard error of the mean of (N,) per-query values."""
    return float(values.std(ddof=1) / np.sqrt(len(values)))


def table(folder: Path, labels: list[str], vectors: dict[str, np.ndarray]) -> None:
    """Print precision@10 and precision@R for every vector and normalisation."""
    labels_arr = np.asarray(labels, dtype=object)
    counts = Counter(labels)
    r = min(counts.values()) - 1
    n = len(labels)
    head = [f"P@{K} {how}" for how in NORMS] + [f"P@{r} {how}" for how in NORMS] + [f"dP@{K}", f"dP@{r}"]
    print(f"\n{folder} - {n} clips, {len(counts)} genres ({', '.join(f'{g} {c}' for g, c in sorted(counts.items()))})")
    print(f"{'vector':38s} {'dim':>5s} " + " ".join(f"{h:>13s}" for h in head))
    first: dict[int, np.ndarray] = {}
    for name, key in VECTORS:
        cells = []
        for k in (K, r):
            for how in NORMS:
                mean, hits = precision(normalised(vectors[key], how), labels_arr, k)
                cells.append(f"{mean:.3f}+-{se(hits):.3f}")
        for k in (K, r):  # paired difference of the raw figure to the first row's, query by query
            hits = precision(normalised(vectors[key], "raw"), labels_arr, k)[1]
            first.setdefault(k, hits)
            cells.append(f"{(hits - first[k]).mean():+.3f}+-{se(hits - first[k]):.3f}")
        print(f"{name:38s} {vectors[key].shape[1]:5d} " + " ".join(f"{c:>13s}" for c in cells))
    chance = sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))
    ceiling = np.mean([min(K, counts[g] - 1) / K for g in labels])
    print(f"chance (random neighbours): {chance:.3f}; ceiling of P@{K}: {ceiling:.3f}, of P@{r}: 1.000; "
          f"dP: raw figure minus the first row's, paired by query (+- its standard error)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio-dir", type=Path, action="append", help="labelled folder (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_pretrained_musicnn()
    for folder in args.audio_dir or DEFAULT_DIRS:
        folder = folder.expanduser()
        labels, vectors = collection_vectors(model, folder)
        table(folder, labels, vectors)


if __name__ == "__main__":
    main()
