"""The embeddings stage: one search vector per track from a trained model, in Parquet.

The vector is :meth:`GenreClassifier.embed_and_predict`'s: the track's crop-averaged penultimate layer minus
the model's train-track mean, scaled to unit L2 norm, the same vector ``GenreClassifier.encode`` gives.

Columns ``track_id``, ``path``, ``label``, ``split``, ``predicted_label`` (strings) and ``embedding``
(``fixed_size_list<float32>[D]``); the schema metadata names the model, its key (the model folder's name)
and the feature key, so the index and the query helper can refuse vectors of another model. The same
layout serves the query helper's side table of songs added after the index was built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.errors import MelsearchError
from pipeline.io import atomic_path
from pipeline.layout import rerun_hint
from pipeline.manifest import read_manifest

if TYPE_CHECKING:
    from pipeline.classifier import GenreClassifier
    from pipeline.feature_store import FeatureStore

log = logging.getLogger(__name__)

ROW_COLUMNS = ("track_id", "path", "label", "split", "predicted_label")
# Schema metadata keys (Parquet stores bytes); read back by embeddings_metadata() without the prefix.
_META_PREFIX = "melsearch."


def embeddings_schema(dim: int, metadata: dict[str, str]) -> pa.Schema:
    """The Parquet schema of an embeddings file with ``dim``-dimensional vectors and ``metadata`` (str -> str)."""
    fields = [(name, pa.string()) for name in ROW_COLUMNS]
    fields.append(("embedding", pa.list_(pa.float32(), dim)))
    return pa.schema(fields, metadata={f"{_META_PREFIX}{k}": str(v) for k, v in metadata.items()})


def _record_batch(rows: Sequence[dict], vectors: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    columns = [pa.array([str(row.get(name) or "") for row in rows], pa.string()) for name in ROW_COLUMNS]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    columns.append(pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def write_embedding_rows(
    rows: Sequence[dict], vectors: np.ndarray, out_path: str | os.PathLike, *, metadata: dict[str, str]
) -> None:
    """Write a small embeddings table at once (the query helper's side table), atomically.

    Parameters
    ----------
    rows : dicts with the keys of ``ROW_COLUMNS`` (missing ones are written as "").
    vectors : (len(rows), D) float32, already normalised.
    metadata : schema metadata, e.g. ``{"model": ..., "model_key": ..., "feature_key": ...}``.
    """
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(rows), -1)
    schema = embeddings_schema(vectors.shape[1], metadata)
    with atomic_path(out_path) as tmp:
        pq.write_table(pa.Table.from_batches([_record_batch(rows, vectors, schema)], schema=schema), tmp)


def _open_parquet(path: str | os.PathLike) -> pq.ParquetFile:
    path = Path(path)
    if not path.is_file():
        raise MelsearchError(f"{path}: no embeddings here (run the embeddings stage first)")
    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:
        raise MelsearchError(f"{path}: unreadable embeddings file ({exc}){rerun_hint(path)}") from exc
    column = handle.schema_arrow.field("embedding") if "embedding" in handle.schema_arrow.names else None
    if column is None or not pa.types.is_fixed_size_list(column.type):
        raise MelsearchError(f"{path}: not an embeddings file (no fixed-size 'embedding' column)")
    return handle


def embeddings_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The schema metadata of an embeddings file (``model``, ``model_key``, ``feature_key``, ...) and its ``dim``."""
    schema = _open_parquet(path).schema_arrow
    meta = {
        key.decode()[len(_META_PREFIX) :]: value.decode()
        for key, value in (schema.metadata or {}).items()
        if key.decode().startswith(_META_PREFIX)
    }
    meta["dim"] = str(schema.field("embedding").type.list_size)
    return meta


def read_embeddings(path: str | os.PathLike) -> tuple[list[dict], np.ndarray]:
    """Rows and vectors of an embeddings file.

    Returns
    -------
    rows : one dict per track with the keys of ``ROW_COLUMNS``, in file order.
    vectors : (N, D) float32, unit L2 norm (zero rows for tracks the model mapped to zero).
    """
    handle = _open_parquet(path)
    dim = handle.schema_arrow.field("embedding").type.list_size
    try:
        table = handle.read()
    except (OSError, pa.ArrowException) as exc:
        raise MelsearchError(f"{path}: unreadable embeddings file ({exc}){rerun_hint(path)}") from exc
    # flatten() honours slice offsets, unlike .values
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.ascontiguousarray(flat, dtype=np.float32).reshape(table.num_rows, dim)
    rows = table.select(list(ROW_COLUMNS)).to_pylist()
    return rows, vectors


def _embedded_batches(
    classifier: GenreClassifier,
    store: FeatureStore,
    rows: Sequence[dict],
    positions: np.ndarray,
    schema: pa.Schema,
    *,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``batch_size`` tracks: rows of the manifest plus predicted label and unit vector."""
    with tqdm(total=len(rows), desc="embeddings", unit="track", disable=None) as bar:
        for start in range(0, len(rows), batch_size):
            batch, where = rows[start : start + batch_size], positions[start : start + batch_size]
            mels, n_frames = store.read(where), store.n_frames[where]  # (b, n_mels, frames) dB, (b,)
            vectors, probabilities = classifier.embed_and_predict(mels, n_frames=n_frames,
                                                                  names=[r["track_id"] for r in batch])
            batch = [{**row, "predicted_label": label}
                     for row, label in zip(batch, classifier.labels_of(probabilities), strict=True)]
            yield _record_batch(batch, vectors, schema)
            bar.update(len(batch))
            if progress is not None:
                progress(bar.n, len(rows))


def _write_row_groups(
    writer: pq.ParquetWriter, batches: Iterable[pa.RecordBatch], schema: pa.Schema, row_group_size: int
) -> None:
    """Write ``batches`` as row groups of exactly ``row_group_size`` rows (the last one shorter)."""
    pending: list[pa.RecordBatch] = []
    buffered = 0
    for batch in batches:
        pending.append(batch)
        buffered += batch.num_rows
        if buffered >= row_group_size:
            table = pa.Table.from_batches(pending, schema=schema)
            full = buffered - buffered % row_group_size
            writer.write_table(table.slice(0, full), row_group_size=row_group_size)
            pending, buffered = table.slice(full).to_batches(), buffered - full
    if buffered:
        writer.write_table(pa.Table.from_batches(pending, schema=schema), row_group_size=row_group_size)


def write_embeddings(
    manifest_path: str | os.PathLike,
    features_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    row_group_size: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Embed every ``ok`` track of the manifest that has features (all splits, unlabelled too) into Parquet.

    A track's vector is the model's penultimate layer averaged over its crops (crops cover only the frames
    holding audio), minus the model's train-track mean, scaled to unit L2 norm; ``predicted_label`` is the
    model's most probable genre, from the same forward pass (:meth:`GenreClassifier.embed_and_predict`).
    Tracks are read ``batch_size`` at a time and written in row groups of ``row_group_size``, so memory
    stays bounded by those, not by the number of tracks; the file appears only when complete.

    Parameters
    ----------
    manifest_path, features_path : the dataset stage's manifest and the features stage's HDF5.
    model_dir : a trained model folder (``<workdir>/train/<model>-<key>``); its name is the model key.
    out_path : the Parquet file to write.
    device : torch device for the forward passes ("cpu", "cuda", "auto").
    progress : called as ``progress(done, total)`` tracks after each batch.

    Returns
    -------
    ``{"tracks": N, "dim": D}``

    Raises
    ------
    MelsearchError
        When the model was trained on features of another configuration than the store's, or no
        ``ok`` track of the manifest has features.
    """
    from pipeline.classifier import GenreClassifier  # torch: only the writer needs it, not readers of the file
    from pipeline.feature_store import FeatureStore  # librosa

    model_dir = Path(model_dir).resolve()  # its name is the model key, even when given as '.'
    classifier = GenreClassifier.load(model_dir, device=device)
    rows = read_manifest(manifest_path, status="ok")
    with FeatureStore.open(features_path) as store:
        classifier.check_features(store.config, features_path)
        known = set(store.track_ids)
        missing = [row["track_id"] for row in rows if row["track_id"] not in known]
        if missing:
            log.warning("%d ok track(s) have no features and get no embedding: %s", len(missing), missing[:10])
        rows = [row for row in rows if row["track_id"] in known]
        if not rows:
            raise MelsearchError(f"{features_path}: none of the ok tracks of {manifest_path} has features")
        positions = store.index_of([row["track_id"] for row in rows])
        schema = embeddings_schema(classifier.embedding_dim, classifier.embeddings_metadata())
        batches = _embedded_batches(classifier, store, rows, positions, schema, batch_size=batch_size,
                                    progress=progress)
        with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            _write_row_groups(writer, batches, schema, row_group_size)
    log.info("embedded %d tracks (%d-d) with %s into %s", len(rows), classifier.embedding_dim, model_dir.name, out_path)
    return {"tracks": len(rows), "dim": classifier.embedding_dim}
