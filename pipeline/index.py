"""The index stage: an Annoy index (angular metric) over the embeddings, its id map, metadata and figures.

``build_annoy_index`` writes one folder, atomically::

    index.ann           Annoy forest, memory-mapped by readers (item i = row i of ids.parquet)
    ids.parquet         item, track_id, label, path, split, predicted_label, and the songs' names, lengths and
                        tag probabilities (the embeddings file's INFO_COLUMNS)
    meta.json           dim, metric, n_trees, search_k, seed, count, model, model_key, feature_key, tags (a
                        tagging model's tag names, else []), embeddings_key, figures (recall@10 vs exact search,
                        genre precision@10)
    embedding_map.png   the embeddings projected on their first two principal axes, coloured by genre

Vectors are unit-norm, so Annoy's angular distance ``sqrt(2 - 2 cos)`` equals their Euclidean distance
and the exact search here is a matrix product. Songs added later with ``MusicSearch.index_audio`` live
in a side table beside the index folders (:mod:`pipeline.added`); the index stage passes it
as ``added`` and hashes it into the index's key, so the next run builds a new index that folds them in and they
survive ``--rerun index``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import annoy
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.added import AddedSongs
from pipeline.embeddings import INFO_FIELDS, ROW_COLUMNS, TAGS_COLUMN, embeddings_metadata, read_embeddings
from pipeline.errors import MelsearchError
from pipeline.io import atomic_path, params_key
from pipeline.layout import rerun_hint

log = logging.getLogger(__name__)

METRIC = "angular"
INDEX_FILE, IDS_FILE, META_FILE, MAP_FILE = "index.ann", "ids.parquet", "meta.json", "embedding_map.png"
# An index whose meta.json holds search_k -1 (built before the sizing rule below recorded the value it chose)
# inspects this many nodes per tree per neighbour asked for. Annoy's own default (1) gives recall@10 of
# 0.88-0.97 on diffuse 1000 x 256 clusters; 10 gives >= 0.99 up to ~100k items but 0.95 at 1M.
AUTO_SEARCH_K_PER_TREE = 10
# n_trees / search_k of -1: chosen from the number of items by :func:`auto_index_params`.
AUTO = -1
# Sizing rule (bench/query.py, clustered 512-d vectors, recall@10 vs exact search): 50 trees with
# search_k 5000 give 0.993 at 100k items but 0.950 at 1M, so the nodes to inspect must grow with the set;
# 20 * k * cbrt(N) (9.2k at 100k, 20k at 1M) keeps recall >= 0.996 and p50 at a few milliseconds. Above
# 100k items 25 trees' recall at that search_k is within 0.002 of 50 trees' for less build time (100k: 10 s
# against 16 s) and an 11% smaller file at 512-d (the trees' share is larger at 200-d, where leaves hold fewer
# items), so large sets get 25; small ones keep 50, which costs nothing there and keeps GTZAN-sized indexes as before.
AUTO_TREES_SMALL, AUTO_TREES_LARGE, AUTO_TREES_LARGE_FROM = 50, 25, 100_001
AUTO_SEARCH_K_PER_NEIGHBOUR_CBRT = 20
# Below this many items a one-thread build takes milliseconds and is byte-identical across runs; Annoy's
# threaded build is not (trees land in thread order), so n_jobs=-1 uses every core only above it.
PARALLEL_BUILD_MIN_ITEMS = 100_000
FIGURE_QUERIES = 500
# Exact search works on blocks of queries whose similarity matrix stays under this many float32 values.
_EXACT_BLOCK_VALUES = 1 << 24
# Points drawn on the embedding map (a seeded sample above it keeps the PNG readable and quick).
_MAP_POINTS = 20_000


@dataclass(frozen=True)
class IndexConfig:
    """Annoy settings; ``key()`` is part of the index folder's name.

    ``n_trees``: trees in the forest (more: better recall, bigger file, slower build); ``search_k``: nodes
    inspected per query (more: better recall, slower query); -1 for either: chosen from the number of items
    (:func:`auto_index_params`); ``seed``: Annoy's seed and the figures' sample.
    """

    n_trees: int = AUTO
    search_k: int = AUTO
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_trees == 0 or self.n_trees < AUTO:
            raise MelsearchError(f"IndexConfig.n_trees must be -1 or >= 1, got {self.n_trees}")
        if self.search_k == 0 or self.search_k < -1:
            raise MelsearchError(f"IndexConfig.search_k must be -1 or > 0, got {self.search_k}")

    def key(self) -> str:
        """Short hash of every field."""
        return params_key(asdict(self))


def effective_search_k(search_k: int, n_trees: int, k: int) -> int:
    """Nodes Annoy inspects to find ``k`` neighbours: ``search_k``, or for -1 ``n_trees * k * 10``.

    New indexes record the ``search_k`` that :func:`auto_index_params` chose, so -1 comes only from a
    meta.json written before the sizing rule.
    """
    return search_k if search_k > 0 else n_trees * k * AUTO_SEARCH_K_PER_TREE


def auto_index_params(count: int, *, n_trees: int = AUTO, search_k: int = AUTO, k: int = 10) -> tuple[int, int]:
    """``(n_trees, search_k)`` for an index of ``count`` items: explicit values kept, -1 chosen from ``count``.

    Parameters
    ----------
    count : items in the index.
    n_trees : -1: 50 trees up to 100k items, 25 above (see ``AUTO_TREES_*``); else kept.
    search_k : -1: ``max(n_trees * k * 10, 20 * k * floor(cbrt(count)))``, i.e. the old per-tree default up to
        ~16k items (k=10), growing as the cube root beyond it, for recall@k >= 0.99 up to 1M items; else kept.
    k : neighbours the search_k is sized for (the figures' and the query helper's 10).

    Returns
    -------
    n_trees, search_k : both >= 1.
    """
    if n_trees == AUTO:
        n_trees = AUTO_TREES_LARGE if count >= AUTO_TREES_LARGE_FROM else AUTO_TREES_SMALL
    if search_k == AUTO:
        # integer cube root by a float estimate corrected both ways, so the rule is exact for every count
        root = round(max(count, 0) ** (1 / 3))
        root += (root + 1) ** 3 <= count
        root -= root**3 > count
        search_k = max(n_trees * k * AUTO_SEARCH_K_PER_TREE, AUTO_SEARCH_K_PER_NEIGHBOUR_CBRT * k * root)
    return n_trees, search_k


def angular_distance(similarity: np.ndarray) -> np.ndarray:
    """Annoy's angular distance ``sqrt(2 - 2 cos)`` from cosine similarities (any shape), float32."""
    return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(similarity, dtype=np.float32), 0.0))


def exact_neighbours(
    vectors: np.ndarray, queries: np.ndarray, k: int, *, exclude: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force nearest neighbours by angular distance.

    Parameters
    ----------
    vectors : (N, D) float32, unit norm: the searched set.
    queries : (Q, D) float32, unit norm.
    k : neighbours per query (at most N, or N - 1 with ``exclude``).
    exclude : (Q,) row of ``vectors`` each query must not return (its own row, for leave-one-out), or None.

    Returns
    -------
    ids : (Q, k) int64 rows of ``vectors``, nearest first (ties by row order).
    distances : (Q, k) float32 angular distances.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    k = min(k, len(vectors) - (exclude is not None))
    ids = np.empty((len(queries), k), dtype=np.int64)
    sims = np.empty((len(queries), k), dtype=np.float32)
    block = max(1, _EXACT_BLOCK_VALUES // max(len(vectors), 1))
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ vectors.T  # (q, N)
        if exclude is not None:
            scores[np.arange(len(scores)), np.asarray(exclude[start : start + block])] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
            np.arange(scores.shape[1]), (len(scores), 1)
        )
        top_scores = np.take_along_axis(scores, top, axis=1)
        # sort by similarity, then row id, so equal distances come out in a stable order
        order = np.lexsort((top, -top_scores), axis=1)
        ids[start : start + block] = np.take_along_axis(top, order, axis=1)
        sims[start : start + block] = np.take_along_axis(top_scores, order, axis=1)
    return ids, angular_distance(sims)


def build_annoy(
    vectors: np.ndarray, path: str | os.PathLike, *, n_trees: int, seed: int = 0, n_jobs: int = -1
) -> annoy.AnnoyIndex:
    """Build an angular Annoy forest of ``vectors`` (N, D) float32 straight into the file ``path``.

    Annoy's on-disk build keeps memory at the size of the file's pages in use, not the whole forest.
    ``n_jobs=-1``: every core from ``PARALLEL_BUILD_MIN_ITEMS`` items on, one thread below (reproducible).
    Returns the built index, memory-mapped from ``path``; item ``i`` is ``vectors[i]``.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if n_jobs == -1 and len(vectors) < PARALLEL_BUILD_MIN_ITEMS:
        n_jobs = 1
    index = annoy.AnnoyIndex(vectors.shape[1], METRIC)
    index.set_seed(seed)
    index.on_disk_build(str(path))
    for item, vector in enumerate(vectors):
        index.add_item(item, vector)
    index.build(n_trees, n_jobs=n_jobs)
    return index


def load_annoy(path: str | os.PathLike, dim: int) -> annoy.AnnoyIndex:
    """Memory-map the Annoy file ``path`` of ``dim``-dimensional angular vectors."""
    index = annoy.AnnoyIndex(dim, METRIC)
    try:
        index.load(str(path))
    except OSError as exc:
        raise MelsearchError(f"{path}: unreadable Annoy index ({exc}){rerun_hint(path)}") from exc
    return index


def recall_at_k(
    index: annoy.AnnoyIndex, vectors: np.ndarray, *, k: int = 10, search_k: int, queries: np.ndarray
) -> float:
    """Mean fraction of the exact top-``k`` that Annoy finds, for leave-one-out queries by item.

    ``vectors`` (N, D) are the indexed vectors (item i = row i); ``queries`` are item ids.
    """
    exact, _ = exact_neighbours(vectors, vectors[queries], k, exclude=queries)
    found = 0
    for item, truth in zip(queries.tolist(), exact, strict=True):
        approx = [j for j in index.get_nns_by_item(item, k + 1, search_k=search_k) if j != item][:k]
        found += len(set(approx) & set(truth.tolist()))
    return found / exact.size if exact.size else 1.0


def genre_precision_at_k(
    vectors: np.ndarray, labels: Sequence[str], *, k: int = 10, max_queries: int = 1000, seed: int = 0
) -> dict:
    """Leave-one-out genre precision@k over labelled tracks (exact search among labelled tracks).

    Returns ``{"genre_precision_at_10": float, "precision_queries": int, "genre_precision_by_genre": {...}}``
    (the key carries ``k``); empty when fewer than two tracks are labelled.
    """
    labels = np.asarray(labels, dtype=object)
    labelled = np.flatnonzero(labels != "")
    if len(labelled) < 2:
        return {}
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(len(labelled), size=min(max_queries, len(labelled)), replace=False))
    subset = vectors[labelled]
    ids, _ = exact_neighbours(subset, subset[queries], k, exclude=queries)
    sub_labels = labels[labelled]
    hits = (sub_labels[ids] == sub_labels[queries][:, None]).mean(axis=1)
    by_genre = {
        genre: round(float(hits[sub_labels[queries] == genre].mean()), 4) for genre in sorted(set(sub_labels[queries]))
    }
    return {
        f"genre_precision_at_{k}": round(float(hits.mean()), 4),
        "precision_queries": len(queries),
        "genre_precision_by_genre": by_genre,
    }


def plot_embedding_map(vectors: np.ndarray, labels: Sequence[str], out_path: str | os.PathLike, *, title: str) -> None:
    """Scatter ``vectors`` (N, D) on their first two principal axes, one colour per label ("" in grey), as PNG.

    The axes come from the eigenvectors of the (D, D) covariance, so any N costs one pass over the data;
    each axis' sign is fixed (largest loading positive) so reruns draw the same picture.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    vectors = np.asarray(vectors, dtype=np.float64)
    centred = vectors - vectors.mean(axis=0)
    eigvals, eigvecs = np.linalg.eigh(centred.T @ centred)
    axes = eigvecs[:, ::-1][:, :2]
    axes *= np.sign(axes[np.abs(axes).argmax(axis=0), [0, 1]])
    explained = eigvals[::-1][:2] / max(eigvals.sum(), 1e-30)
    labels = np.asarray(labels, dtype=object)
    if len(vectors) > _MAP_POINTS:
        keep = np.sort(np.random.default_rng(0).choice(len(vectors), _MAP_POINTS, replace=False))
        centred, labels = centred[keep], labels[keep]
    points = centred @ axes

    fig = Figure(figsize=(8, 6.5), dpi=100)
    ax = fig.add_subplot()
    genres = sorted(set(labels) - {""})
    palette = colormaps["tab10" if len(genres) <= 10 else "tab20"]
    if (labels == "").any():
        mask = labels == ""
        ax.scatter(points[mask, 0], points[mask, 1], s=10, c="0.7", label="(unlabelled)", linewidths=0)
    for i, genre in enumerate(genres):
        mask = labels == genre
        ax.scatter(points[mask, 0], points[mask, 1], s=12, color=palette(i % palette.N), label=genre, linewidths=0)
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small", markerscale=1.5, frameon=False)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


def read_index_meta(index_dir: str | os.PathLike) -> dict:
    """``meta.json`` of an index folder; MelsearchError when there is none."""
    path = Path(index_dir) / META_FILE
    if not path.is_file():
        raise MelsearchError(f"{index_dir}: no index built here (no {META_FILE}; run the index stage first)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MelsearchError(f"{path}: unreadable index metadata ({exc}){rerun_hint(path)}") from exc


def read_ids(index_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``ids.parquet`` (item, track_id, label, path, split, predicted_label and the ``INFO_FIELDS``, None
    in an index built before they existed), in item order; ``tag_probabilities`` a (n_tags,) float32 array."""
    path = Path(index_dir) / IDS_FILE
    try:
        table = pq.read_table(path)
        missing = dict.fromkeys(name for name, _ in INFO_FIELDS if name not in table.column_names)
        rows = [{**row, **missing} for row in table.drop_columns([TAGS_COLUMN] if not missing else []).to_pylist()]
    except Exception as exc:
        raise MelsearchError(f"{path}: unreadable id map ({exc}){rerun_hint(path)}") from exc
    if not missing:
        # one (N, n_tags) array, not N lists of Python floats: 50 tags of 100k songs would take ~200 MB as lists
        tags = table.column(TAGS_COLUMN).combine_chunks()
        if tags.null_count == 0 and len(rows):
            flat = tags.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            values = list(flat.reshape(len(rows), -1))
        else:
            values = [None if value is None else np.asarray(value, np.float32) for value in tags.to_pylist()]
        for row, value in zip(rows, values, strict=True):
            row[TAGS_COLUMN] = value
    return rows


def build_annoy_index(
    embeddings_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    n_trees: int = AUTO,
    search_k: int = AUTO,
    seed: int = 0,
    n_jobs: int = -1,
    added: str | os.PathLike | None = None,
) -> dict:
    """Build ``out_dir`` (index.ann, ids.parquet, meta.json, embedding_map.png) from an embeddings file.

    Parameters
    ----------
    embeddings_path : Parquet written by :func:`pipeline.embeddings.write_embeddings`.
    out_dir : the index folder; written to a temporary folder and renamed, so it is complete or absent.
    n_trees : Annoy trees (more: better recall, bigger file); -1: chosen from the number of items.
    search_k : nodes inspected per query; -1: chosen from the number of items (and trees), for k=10.
        The values used (:func:`auto_index_params`) are what meta.json records, so queries use them too.
    seed : Annoy's random seed and the figures' query sample.
    n_jobs : build threads; -1: all cores for large sets, one (reproducible bytes) below 100k items.
    added : a side table of songs added since (:meth:`MusicSearch.index_audio`) to fold in, when it exists;
        the caller makes it part of the index's identity (``tasks.search.Index`` hashes its bytes into the key).

    Returns
    -------
    figures : ``count``, ``added`` (side-table songs folded in), ``n_trees`` and ``search_k`` (as chosen),
        ``recall_at_10``, ``recall_queries``,
        ``genre_precision_at_10``, ``precision_queries``, ``genre_precision_by_genre``; also in meta.json.
    """
    IndexConfig(n_trees=n_trees, search_k=search_k, seed=seed)  # refuses values it does not take
    out_dir = Path(out_dir)
    meta = embeddings_metadata(embeddings_path)
    rows, vectors = read_embeddings(embeddings_path)
    if not rows:
        raise MelsearchError(f"{embeddings_path}: no tracks to index")
    n_embedded = len(rows)
    if added is not None:
        rows, vectors = AddedSongs(added).fold_into(rows, vectors, meta)
    duplicates = len(rows) - len({row["track_id"] for row in rows})
    if duplicates:
        raise MelsearchError(f"{embeddings_path}: {duplicates} duplicate track id(s)")
    n_trees, search_k = auto_index_params(len(rows), n_trees=n_trees, search_k=search_k, k=10)

    started = time.perf_counter()
    with atomic_path(out_dir, is_dir=True) as tmp:
        index = build_annoy(vectors, tmp / INDEX_FILE, n_trees=n_trees, seed=seed, n_jobs=n_jobs)
        log.info("built %d trees over %d x %d in %.2f s (search_k %d)", n_trees, *vectors.shape,
                 time.perf_counter() - started, search_k)
        rng = np.random.default_rng(seed)
        queries = np.sort(rng.choice(len(rows), size=min(FIGURE_QUERIES, len(rows)), replace=False))
        figures = {
            "count": len(rows),
            "added": len(rows) - n_embedded,
            "n_trees": n_trees,
            "search_k": search_k,
            "recall_at_10": round(recall_at_k(index, vectors, k=10, search_k=search_k, queries=queries), 4),
            "recall_queries": len(queries),
            **genre_precision_at_k(vectors, [row["label"] for row in rows], k=10, seed=seed),
        }
        index.unload()
        ids = pa.Table.from_pylist(
            [{"item": i, **row} for i, row in enumerate(rows)],
            schema=pa.schema([("item", pa.int64())] + [(name, pa.string()) for name in ROW_COLUMNS]
                             + list(INFO_FIELDS)),
        )
        pq.write_table(ids, tmp / IDS_FILE)
        model = meta.get("model", "")
        plot_embedding_map(vectors, [row["label"] for row in rows], tmp / MAP_FILE,
                           title=f"{len(rows)} tracks, model {meta.get('model_key', model)}")
        index_meta = {
            "dim": vectors.shape[1],
            "metric": METRIC,
            "n_trees": n_trees,
            "search_k": search_k,
            "seed": seed,
            "count": len(rows),
            "model": model,
            "model_key": meta.get("model_key", ""),
            "feature_key": meta.get("feature_key", ""),
            "tags": json.loads(meta.get("tags", "[]")),
            "embeddings_key": Path(embeddings_path).resolve().parent.name,
            "figures": figures,
        }
        (tmp / META_FILE).write_text(json.dumps(index_meta, indent=2, sort_keys=True) + "\n")
    log.info("index %s: %s", out_dir, figures)
    return figures
