"""The manifest: one row per audio file found by the dataset stage (Parquet).

Columns: ``track_id`` (stable id: ``blues.00012`` for GTZAN, the relative path otherwise),
``path`` (absolute), ``label`` ("" when the file has no label folder), ``split``
(``train``/``valid``/``test``/``excluded``), ``duration_s`` (seconds), ``sample_rate`` (Hz),
``channels``, ``status`` (``ok`` or ``rejected``) and ``reason`` (the decoder's message, "" when ok).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import MelsearchError
from pipeline.io import atomic_path

MANIFEST_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("path", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),
        ("channels", pa.int16()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)
SPLITS = ("train", "valid", "test")


def write_manifest(rows: list[dict], path: str | os.PathLike) -> None:
    """Write ``rows`` (dicts with the schema's columns), sorted by ``track_id``, atomically."""
    rows = sorted(rows, key=lambda row: row["track_id"])
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest(path: str | os.PathLike, *, status: str | None = None) -> list[dict]:
    """Rows of the manifest at ``path`` as dicts, in ``track_id`` order; ``status="ok"`` keeps usable tracks."""
    path = Path(path)
    if not path.is_file():
        raise MelsearchError(f"{path}: no manifest here (run the dataset stage first)")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        raise MelsearchError(f"{path}: unreadable manifest ({exc})") from exc
    return [row for row in rows if status is None or row["status"] == status]
