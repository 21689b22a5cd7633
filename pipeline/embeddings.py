"""The embeddings stage: one L2-normalised vector per track from a trained model, in Parquet.

Columns ``track_id``, ``path``, ``label``, ``split``, ``predicted_label`` (strings) and ``embedding``
(``fixed_size_list<float32>[D]``); the schema metadata names the model, its key (the model folder's name)
and the feature key, so the index and the query helper can refuse vectors of another model. The same
layout serves the query helper's side table of songs added after the index was built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import MelsearchError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

ROW_COLUMNS = ("track_id", "path", "label", "split", "predicted_label")
# Schema metadata keys (Parquet stores bytes); read back by embeddings_metadata() without the prefix.
_META_PREFIX = "melsearch."
# Norms below this are treated as zero vectors (a model can output all-zero ReLU features for silence).
_MIN_NORM = 1e-12


def embeddings_schema(dim: int, metadata: dict[str, str]) -> pa.Schema:
    """The Parquet schema of an embeddings file with ``dim``-dimensional vectors and ``metadata`` (str -> str)."""
    fields = [(name, pa.string()) for name in ROW_COLUMNS]
    fields.append(("embedding", pa.list_(pa.float32(), dim)))
    return pa.schema(fields, metadata={f"{_META_PREFIX}{k}": str(v) for k, v in metadata.items()})


def l2_normalise(vectors: np.ndarray, *, names: Sequence[str] = ()) -> np.ndarray:
    """Rows of ``vectors`` (N, D) scaled to unit L2 norm, float32; all-zero rows stay zero (logged by name)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    zero = norms[:, 0] < _MIN_NORM
    if zero.any():
        which = [names[i] for i in np.flatnonzero(zero)] if names else np.flatnonzero(zero).tolist()
        log.warning("zero embedding (left as zeros, never a close neighbour): %s", which)
    return vectors / np.where(zero[:, None], 1.0, norms)


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
        raise MelsearchError(f"{path}: unreadable embeddings file ({exc})") from exc
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
    table = handle.read()
    # flatten() honours slice offsets, unlike .values
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.ascontiguousarray(flat, dtype=np.float32).reshape(table.num_rows, dim)
    rows = table.select(list(ROW_COLUMNS)).to_pylist()
    return rows, vectors
