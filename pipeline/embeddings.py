"""The embeddings stage: one search vector per track from a trained model, in Parquet.

The vector is :meth:`GenreClassifier.embed_and_predict`'s: the track's crop-averaged penultimate layer minus
the model's train-track mean, scaled to unit L2 norm, the same vector ``GenreClassifier.encode`` gives.

Columns ``track_id``, ``path``, ``label``, ``split``, ``predicted_label`` (strings), the song's names and
length (``INFO_FIELDS``: ``title``, ``artist``, ``album``, ``track_number``, ``duration_s``, from the manifest),
``tag_probabilities`` (``list<float32>``: a tagging model's mean tag probabilities, null for other models) and
``embedding`` (``fixed_size_list<float32>[D]``); the schema metadata names the model, its key (the model folder's
name), the feature key, so the index and the query helper can refuse vectors of another model, and, for a tagging
model, ``tags`` (a JSON list of the tag names, in the order of the probabilities). A file written before the
names and tags existed reads with them all null. The same
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
# Nullable columns after ROW_COLUMNS: the song's names and length, and its tag probabilities (TAGS_COLUMN).
TAGS_COLUMN = "tag_probabilities"
INFO_FIELDS = (("title", pa.string()), ("artist", pa.string()), ("album", pa.string()), ("track_number", pa.int32()),
               ("duration_s", pa.float64()), (TAGS_COLUMN, pa.list_(pa.float32())))
INFO_COLUMNS = tuple(name for name, _ in INFO_FIELDS)
# Schema metadata keys (Parquet stores bytes); read back by embeddings_metadata() without the prefix.
_META_PREFIX = "melsearch."


def embeddings_schema(dim: int, metadata: dict[str, str]) -> pa.Schema:
    """The Parquet schema of an embeddings file with ``dim``-dimensional vectors and ``metadata`` (str -> str)."""
    fields = [(name, pa.string()) for name in ROW_COLUMNS] + list(INFO_FIELDS)
    fields.append(("embedding", pa.list_(pa.float32(), dim)))
    return pa.schema(fields, metadata={f"{_META_PREFIX}{k}": str(v) for k, v in metadata.items()})


def _record_batch(rows: Sequence[dict], vectors: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    columns = [pa.array([str(row.get(name) or "") for row in rows], pa.string()) for name in ROW_COLUMNS]
    columns += [pa.array([row.get(name) for row in rows], kind) for name, kind in INFO_FIELDS]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    columns.append(pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def write_embedding_rows(
    rows: Sequence[dict], vectors: np.ndarray, out_path: str | os.PathLike, *, metadata: dict[str, str]
) -> None:
    """Write a small embeddings table at once (the query helper's side table), atomically.

    Parameters
    ----------
    rows : dicts with the keys of ``ROW_COLUMNS`` (missing ones are written as "") and of ``INFO_COLUMNS``
        (missing ones are null; ``tag_probabilities`` a (n_tags,) float array).
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
    rows : one dict per track with the keys of ``ROW_COLUMNS`` and ``INFO_COLUMNS`` (None where the file has
        none), in file order; ``tag_probabilities`` a list of floats.
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
    missing = dict.fromkeys(name for name in INFO_COLUMNS if name not in table.column_names)
    rows = [{**row, **missing} for row in table.drop_columns(["embedding"]).to_pylist()]
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
    """Record batches of ``batch_size`` tracks: rows of the manifest plus predicted label, tag probabilities
    (a tagging model's) and unit vector."""
    with tqdm(total=len(rows), desc="embeddings", unit="track", disable=None) as bar:
        for start in range(0, len(rows), batch_size):
            batch, where = rows[start : start + batch_size], positions[start : start + batch_size]
            mels, n_frames = store.read(where), store.n_frames[where]  # (b, n_mels, frames) dB, (b,)
            vectors, probabilities, tags = classifier.embed_predict_and_tag(mels, n_frames=n_frames,
                                                                            names=[r["track_id"] for r in batch])
            batch = [{**row, "predicted_label": label, TAGS_COLUMN: tag if classifier.tag_names else None}
                     for row, label, tag in zip(batch, classifier.labels_of(probabilities), tags, strict=True)]
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
