"""The side table of songs added to an index after it was built (``MusicSearch.index_audio``): its one owner.

The table is ``<workdir>/index/added-<model folder>.parquet`` (:meth:`pipeline.layout.WorkDir.added_table`), an
embeddings file (:mod:`pipeline.embeddings`) whose schema names the model. The query helper searches it beside
the Annoy index; the index stage folds it into the next build and hashes its bytes into the index's key, so the
songs survive ``--rerun index``.

Several processes may add songs at once (scripts, a server): :meth:`AddedSongs.add` re-reads, appends and
rewrites the table while holding an exclusive ``flock`` on ``<table>.lock`` beside it, so no song reported as
added is lost. Readers need no lock: the table is replaced by a rename, so they see it whole, before or after.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.embeddings import embeddings_metadata, read_embeddings, write_embedding_rows
from pipeline.errors import MelsearchError
from pipeline.io import file_sha256
from pipeline.layout import added_table_path
from pipeline.manifest import path_from_text, readable_name

log = logging.getLogger(__name__)


class AddedSongs:
    """The side table at ``path`` (one per model folder)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @classmethod
    def of_index(cls, index_dir: str | os.PathLike, meta: dict) -> AddedSongs:
        """The table of the index folder ``<workdir>/index/<name>`` whose meta.json is ``meta``."""
        return cls(added_table_path(index_dir, meta["model_key"]))

    def read(self, dim: int) -> tuple[list[dict], np.ndarray]:
        """Every added song: rows (``ROW_COLUMNS``), (n, dim) float32 unit vectors; none when there is no table.

        Raises MelsearchError when the table holds vectors of another dimension than ``dim``.
        """
        if not self.path.is_file():
            return [], np.zeros((0, dim), dtype=np.float32)
        if int(embeddings_metadata(self.path)["dim"]) != dim:
            raise MelsearchError(f"{self.path}: added songs are not {dim}-d like the index they were added to")
        return read_embeddings(self.path)

    def digest(self) -> str | None:
        """The table's sha256 (None when there is none): part of the next index's key."""
        return file_sha256(self.path) if self.path.is_file() else None

    def fold_into(self, rows: list[dict], vectors: np.ndarray, meta: dict) -> tuple[list[dict], np.ndarray]:
        """``rows``/``vectors`` (an index's, of the model in ``meta``) plus the added songs they do not hold yet.

        A table of another model (or dimension) is left out with a warning.
        """
        if not self.path.is_file():
            return rows, vectors
        table_meta = embeddings_metadata(self.path)
        if table_meta.get("model_key") != meta.get("model_key") or int(table_meta["dim"]) != int(meta["dim"]):
            log.warning("%s: added songs of another model (%s), not indexed", self.path, table_meta.get("model_key"))
            return rows, vectors
        extra_rows, extra_vectors = read_embeddings(self.path)
        known = {row["track_id"] for row in rows}
        fresh = [i for i, row in enumerate(extra_rows) if row["track_id"] not in known]
        log.info("%s: indexing %d added song(s)", self.path, len(fresh))
        return rows + [extra_rows[i] for i in fresh], np.concatenate([vectors, extra_vectors[fresh]])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the table's lock file exclusively (blocking: another writer holds it for one rewrite only)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def add(self, row: dict, vector: np.ndarray, *, metadata: dict[str, str],
            taken: set[str] = frozenset()) -> str:
        """Append the song ``row`` (its ``path`` resolved, ``track_id`` as wished) with its (D,) vector; its id.

        Under the lock, against the table as it is now: a song whose path is already there keeps its id; a wished
        ``added/<name>`` that is taken (in the table or in ``taken``, the index's ids) becomes
        ``added/<stem>-<8 hex of its sha256><suffix>``, and that one taken too means the same bytes are there.
        ``metadata``: the table's schema metadata (model, model_key, feature_key).
        """
        vector = np.asarray(vector, np.float32).reshape(1, -1)
        with self._locked():
            rows, vectors = self.read(vector.shape[1])
            for existing in rows:
                if existing["path"] == row["path"]:
                    return existing["track_id"]
            ids = {existing["track_id"] for existing in rows} | set(taken)
            track_id = row["track_id"]
            if track_id in ids:
                path = Path(path_from_text(row["path"]))
                track_id = f"added/{readable_name(path.stem)}-{file_sha256(path)[:8]}{path.suffix}"
                if track_id in ids:
                    return track_id  # the same name and bytes, from another folder
            write_embedding_rows([*rows, {**row, "track_id": track_id}],
                                 np.concatenate([vectors, vector]),
                                 self.path, metadata=metadata)
        log.info("added %s as %s to %s", row["path"], track_id, self.path)
        return track_id
