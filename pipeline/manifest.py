"""The manifest: one row per audio file found by the dataset stage (Parquet).

Columns: ``track_id`` (stable id: ``blues.00012`` for GTZAN, the relative path otherwise, as
:func:`readable_name` shows it), ``path`` (absolute, as :func:`path_to_text` keeps it), ``label`` ("" when the
file has no label folder), ``split`` (``train``/``valid``/``test``/``excluded``), ``duration_s`` (seconds),
``sample_rate`` (Hz), ``channels``, ``status`` (``ok`` or ``rejected``) and ``reason`` (why it was rejected: the
decoder's message, or why the entry could not be read; "" when ok). A rejected row may name a folder that could
not be listed, or a link to a folder listed already. The file's own tags (:func:`pipeline.tags.read_file_tags`)
give ``title`` (the file name without extension when untagged), ``artist``, ``album`` and ``track_number``, null
when absent (and in a rejected row); a manifest written before they existed reads as if all were null.
"""

from __future__ import annotations

import os
import urllib.parse
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
        ("title", pa.string()),
        ("artist", pa.string()),
        ("album", pa.string()),
        ("track_number", pa.int32()),
    ]
)
SPLITS = ("train", "valid", "test")
_URI = "file://"


def path_to_text(path: str | os.PathLike) -> str:
    """The form of a file's path that Parquet and JSON keep: the path itself, or, when its bytes are not valid
    UTF-8 (a Latin-1 ``caf\\xe9.wav``), its ``file://`` URI with those bytes percent-encoded.

    Lossless (:func:`path_from_text` gives back the path that opens the file); a path that is valid UTF-8, the
    usual case, reads as it is (an absolute one never starts with ``file:``).
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # the name's raw bytes came in as surrogate escapes
        return _URI + urllib.parse.quote(os.fsencode(text))
    return text


def path_from_text(text: str) -> str:
    """The path to open for a ``path`` column's value (:func:`path_to_text`'s inverse)."""
    if text.startswith(_URI):
        return os.fsdecode(urllib.parse.unquote_to_bytes(text[len(_URI):]))
    return text


def readable_name(name: str) -> str:
    """``name`` with each byte that is not valid UTF-8 read as cp1252 (Latin-1 where cp1252 has no character):
    what an old Latin-1 collection's ``caf\\xe9.wav`` meant, ``café.wav``; a UTF-8 name comes back as it is."""
    return "".join(_byte_char(ord(c) - 0xDC00) if 0xDC80 <= ord(c) <= 0xDCFF else c for c in name)


def _byte_char(byte: int) -> str:
    try:
        return bytes([byte]).decode("cp1252")
    except UnicodeDecodeError:
        return bytes([byte]).decode("latin-1")


def write_manifest(rows: list[dict], path: str | os.PathLike) -> None:
    """Write ``rows`` (dicts with the schema's columns), sorted by ``track_id``, atomically."""
    rows = sorted(rows, key=lambda row: row["track_id"])
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest(path: str | os.PathLike, *, status: str | None = None) -> list[dict]:
    """Rows of the manifest at ``path`` as dicts, in ``track_id`` order; ``status="ok"`` keeps usable tracks.

    Every row has every column of :data:`MANIFEST_SCHEMA`: those an older manifest lacks (the names) are None.
    """
    path = Path(path)
    if not path.is_file():
        raise MelsearchError(f"{path}: no manifest here (run the dataset stage first)")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:
        raise MelsearchError(f"{path}: unreadable manifest ({exc})") from exc
    missing = dict.fromkeys(name for name in MANIFEST_SCHEMA.names if name not in rows[0]) if rows else {}
    return [{**row, **missing} for row in rows if status is None or row["status"] == status]
