"""The query helper: songs that sound like a track of the index or like any audio file.

``MusicSearch.load(workdir_or_index).query(path_or_track_id, top_k=10)`` searches the memory-mapped
Annoy index (or, with ``exact=True``, every vector by brute force) together with a small side table of
songs added since the index was built (``index_audio``; Annoy cannot grow). The next index build of the
same model folds the side table in (see :mod:`pipeline.added`). From a shell::

    melsearch query song.mp3 --workdir data/work --top-k 5
    melsearch query --track "$(melsearch tracks --json | jq -r '.[0].track_id')" --json
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from pipeline.added import AddedSongs
from pipeline.audio import is_audio_path
from pipeline.dataset import file_identity
from pipeline.embeddings import TAGS_COLUMN
from pipeline.errors import MelsearchError
from pipeline.index import (
    INDEX_FILE,
    META_FILE,
    effective_search_k,
    exact_neighbours,
    load_annoy,
    read_ids,
    read_index_meta,
)
from pipeline.io import file_sha256
from pipeline.layout import WorkDir, damaged_outputs, rerun_hint
from pipeline.manifest import path_from_text, path_to_text, readable_name
from pipeline.storage import is_remote
from pipeline.tags import NAME_COLUMNS, read_file_tags, top_tags, top_tags_of_many

if TYPE_CHECKING:
    from pipeline.classifier import GenreClassifier

log = logging.getLogger(__name__)

# Angular distance under which a result with the query file's bytes counts as the query itself: float32 cosines
# put identical vectors up to ~6e-4 apart, and a file's features differ from the stored float16 ones by ~5e-4.
DUPLICATE_DISTANCE = 1e-3


class MusicSearch:
    """A built index (Annoy + id map + meta.json), its side table of added songs, and the model that built it.

    Use :meth:`load`. ``meta`` is the index's meta.json; ``index_dir`` its folder; ``model_dir`` the model
    folder query files are embedded with (loaded on the first file query unless given to :meth:`load`);
    ``tag_names`` the tags its model predicts (musicnn's 50; empty for a model without tags).

    Every answer names its songs as :meth:`track_info` does (``title``, ``artist``, ``album``, ``tags``, ...), and
    every ranked answer and :meth:`find_tracks` take ``tag``: only songs whose top tags hold it.
    """

    def __init__(self, index_dir: Path, meta: dict, model_dir: Path, *, device: str = "cpu") -> None:
        self.index_dir = index_dir
        self.meta = meta
        self.chosen_because = "given"  # how load() picked the folder, for the CLI to say
        self.model_dir = model_dir
        self.device = device
        # Annoy maps a truncated file as it is, and may then read past its end: the sizes figures.json recorded
        damaged = damaged_outputs(index_dir)
        if damaged:
            raise MelsearchError(f"{next(iter(damaged.values()))}{rerun_hint(index_dir)}")
        self._annoy = load_annoy(index_dir / INDEX_FILE, meta["dim"])
        self._items = read_ids(index_dir)
        if self._annoy.get_n_items() != len(self._items):
            raise MelsearchError(f"{index_dir}: {INDEX_FILE} holds {self._annoy.get_n_items()} items, "
                                 f"the id map {len(self._items)}{rerun_hint(index_dir)}")
        self._item_of = {row["track_id"]: row["item"] for row in self._items}
        self.tag_names: list[str] = list(meta.get("tags", []))
        self._top_tags: dict[str, list[str]] | None = None  # track id -> top tags, made on first use
        self._exact_vectors: np.ndarray | None = None
        self._classifier: GenreClassifier | None = None
        self._added = AddedSongs.of_index(index_dir, meta)
        self._added_rows, self._added_vectors = self._read_added()

    @classmethod
    def load(
        cls,
        workdir_or_index: str | os.PathLike,
        *,
        model_dir: str | os.PathLike | None = None,
        model: str | None = None,
        device: str = "cpu",
    ) -> MusicSearch:
        """Open an index folder (one holding meta.json), or the one of a work directory that the latest run built.

        Parameters
        ----------
        workdir_or_index : ``<workdir>/index/<model>-<key>/`` or a work directory, ``s3://BUCKET/PREFIX`` too
            (its index and the model folder that built it are then downloaded into the local mirror).
        model_dir : the model to embed query files with; default ``<workdir>/train/<model_key of the index>``.
            Given, it is loaded now and checked against the index.
        model : in a work directory, take the index of this model name (e.g. ``"resnet_v2"``), chosen by
            :meth:`pipeline.layout.WorkDir.find` (the latest run's, else the newest finished).

        Raises
        ------
        MelsearchError
            No index built yet; an index built by another model or dimension than ``model_dir``'s.
        """
        path = Path(workdir_or_index)
        if not is_remote(workdir_or_index) and (path / META_FILE).is_file():
            index_dir, why = path, "given"
        elif is_remote(workdir_or_index) or path.is_dir():
            if model is None and model_dir is not None:
                model = _model_name(Path(model_dir))
            index_dir, why = WorkDir(workdir_or_index).fetch_index(model)
        else:
            raise MelsearchError(f"{path}: no such index folder or work directory")
        meta = read_index_meta(index_dir)
        default_model = WorkDir(index_dir.resolve().parent.parent).model_folder(meta.get("model_key", ""))
        search = cls(index_dir, meta, Path(model_dir) if model_dir is not None else default_model, device=device)
        search.chosen_because = why
        if model_dir is not None:
            search.classifier  # noqa: B018 (load and check the model the caller named now, not at the first query)
        return search

    @property
    def classifier(self) -> GenreClassifier:
        """The model that embeds query files, loaded on first use and checked against the index."""
        if self._classifier is None:
            from pipeline.classifier import GenreClassifier  # torch: not needed for queries by track id

            if not (self.model_dir / "config.json").is_file():
                raise MelsearchError(f"{self.model_dir}: the model {self.meta['model_key']} that built index "
                                     f"{self.index_dir} is not here (pass --model-dir)")
            classifier = GenreClassifier.load(self.model_dir, device=self.device)
            self._check_model(classifier)
            self._classifier = classifier
        return self._classifier

    def _check_model(self, classifier: GenreClassifier) -> None:
        built_by, dim = self.meta["model_key"], self.meta["dim"]
        name = self.model_dir.resolve().name
        if classifier.embedding_dim != dim:
            raise MelsearchError(f"{self.index_dir}: index of {dim}-d vectors (model {built_by}), but model "
                                 f"{name} makes {classifier.embedding_dim}-d vectors")
        if name != built_by or classifier.feature_key != self.meta["feature_key"]:
            raise MelsearchError(f"{self.index_dir}: index built by model {built_by}, not by {self.model_dir}")

    def _read_added(self) -> tuple[list[dict], np.ndarray]:
        """Side-table songs that this index does not hold yet: rows, (n, D) float32 unit vectors."""
        rows, vectors = self._added.read(self.meta["dim"])
        keep = [i for i, row in enumerate(rows) if row["track_id"] not in self._item_of]
        return [rows[i] for i in keep], vectors[keep]

    def __len__(self) -> int:
        return len(self._items) + len(self._added_rows)

    def query(self, query: str | os.PathLike, *, top_k: int = 10, exact: bool = False,
              tag: str | None = None) -> list[dict]:
        """The ``top_k`` songs nearest to a track id of the index or to an audio file.

        A ``str`` that is a known track id is searched by its stored vector; anything else is read as an
        audio file (wav, au, mp3, flac, ogg, ...), decoded with the model's log-mel settings and embedded.
        The query track itself is never returned: not by id, not the item with the same file, not a copy
        of the file elsewhere (same bytes and distance below ``DUPLICATE_DISTANCE``). With ``tag``, only songs
        whose top tags hold it, still ``top_k`` of them when the index has that many (searched deeper as needed).

        Returns
        -------
        ``[{"rank": 1.., **track_info, "label", "distance": angular (= Euclidean on unit vectors)}]``, nearest
        first (ties by track id); :meth:`track_info` gives ``track_id``, ``path``, the names and ``tags``.

        Raises
        ------
        MelsearchError
            Unknown track id (and no such file), unreadable audio file, ``top_k < 1``, a tag the model does not
            predict.
        """
        if isinstance(query, str) and self._vector_of(query) is not None:
            return self.query_track(query, top_k=top_k, exact=exact, tag=tag)
        path = Path(query)
        if isinstance(query, str) and not path.exists() and not is_audio_path(path) and os.sep not in query:
            raise MelsearchError(f"{query}: unknown track id in index {self.index_dir} (and no such file)")
        return self.query_file(path, top_k=top_k, exact=exact, tag=tag)

    def query_track(self, track_id: str, *, top_k: int = 10, exact: bool = False,
                    tag: str | None = None) -> list[dict]:
        """:meth:`query` by a track id of the index or the side table (MelsearchError when unknown)."""
        vector = self._vector_of(track_id)
        if vector is None:
            raise MelsearchError(f"{track_id}: unknown track id in index {self.index_dir}")
        return self._search(vector, top_k, exact=exact, is_query=lambda row, _: row["track_id"] == track_id, tag=tag)

    def query_file(self, path: str | os.PathLike, *, top_k: int = 10, exact: bool = False,
                   tag: str | None = None) -> list[dict]:
        """:meth:`query` by an audio file (MelsearchError when missing or not decodable)."""
        path = Path(path)
        vector = self._embed_file(path)[0]
        same_file = os.path.realpath(path)
        digest = functools.cache(_sha256_or_none)

        def is_query(row: dict, distance: float) -> bool:
            path = path_from_text(row["path"])
            if os.path.realpath(path) == same_file:
                return True
            # a copy of the query's bytes elsewhere; a transcode or a near-identical song stays a result
            return distance < DUPLICATE_DISTANCE and digest(path) in (None, digest(same_file))

        return self._search(vector, top_k, exact=exact, is_query=is_query, tag=tag)

    def _vector_of(self, track_id: str) -> np.ndarray | None:
        if track_id in self._item_of:
            return np.asarray(self._annoy.get_item_vector(self._item_of[track_id]), dtype=np.float32)
        for row, vector in zip(self._added_rows, self._added_vectors, strict=True):
            if row["track_id"] == track_id:
                return vector
        return None

    def vectors(self, track_ids: Sequence[str]) -> np.ndarray:
        """(len(track_ids), D) float32 unit vectors of searchable songs, in ``track_ids``' order.

        Raises MelsearchError naming the first unknown id.
        """
        found = [self._vector_of(track) for track in track_ids]
        missing = [track for track, vector in zip(track_ids, found, strict=True) if vector is None]
        if missing:
            raise MelsearchError(f"{missing[0]}: unknown track id in index {self.index_dir}")
        return np.array(found, dtype=np.float32).reshape(len(track_ids), self.meta["dim"])

    def _embed_file(self, path: Path) -> tuple[np.ndarray, str, np.ndarray | None]:
        """(D,) float32 search vector of an audio file (as the embeddings stage makes them), its predicted genre and
        its (n_tags,) tag probabilities (None for a model without tags)."""
        if not path.is_file():
            raise MelsearchError(f"{path}: no such file")
        cached = self._cached_vector(path)
        if cached is not None:
            return cached
        vector, probabilities, tags = self.classifier.embed_predict_and_tag_file(path)
        return vector, self.classifier.labels_of(probabilities[None])[0], tags if self.classifier.tag_names else None

    def _cached_vector(self, path: Path) -> tuple[np.ndarray, str, np.ndarray | None] | None:
        """What :meth:`_embed_file` gives, as a library run stored it for this very file (same path, inode, size,
        mtime and ctime: :func:`pipeline.dataset.file_identity`) with this model's weights; None when none did.

        A song of the user's library is then answered without torch, the model or decoding it again (the
        stored vector was made from its float16 log-mels: cosine > 0.9999 to a fresh one).
        """
        weights = self.model_dir / "model.pt"
        if not weights.is_file():
            return None
        cache = WorkDir(self.model_dir.parent.parent).embedding_cache(self.model_dir.name, file_sha256(weights))
        if not cache.is_file():
            return None
        try:
            rows = pq.read_table(cache, filters=[("track_id", "=", file_identity(path))]).to_pylist()
        except Exception as exc:  # a cache: unreadable means the song is embedded afresh
            log.debug("%s: unreadable vector cache (%s)", cache, exc)
            return None
        if not rows or len(rows[0]["embedding"]) != self.meta["dim"]:
            return None
        tags = rows[0].get(TAGS_COLUMN)
        return (np.asarray(rows[0]["embedding"], dtype=np.float32), rows[0]["predicted_label"] or "",
                np.asarray(tags, dtype=np.float32) if tags is not None and self.tag_names else None)

    def _index_vectors(self) -> np.ndarray:
        """(N, D) float32: every indexed vector, read back from Annoy once (exact search only)."""
        if self._exact_vectors is None:
            self._exact_vectors = np.array(
                [self._annoy.get_item_vector(i) for i in range(len(self._items))], dtype=np.float32
            ).reshape(len(self._items), self.meta["dim"])
        return self._exact_vectors

    def _search(
        self, vector: np.ndarray, top_k: int, *, exact: bool, is_query: Callable[[dict, float], bool],
        tag: str | None = None,
    ) -> list[dict]:
        if top_k < 1:
            raise MelsearchError(f"top_k must be >= 1, got {top_k}")
        tagged = self._tag_filter(tag)

        def left_out(row: dict, distance: float) -> bool:
            return is_query(row, distance) or not tagged(row)
        n = len(self._items)
        want = top_k + 1  # room for the query itself
        while True:
            if exact:
                ids, dists = exact_neighbours(self._index_vectors(), vector[None], min(want, n))
                found = list(zip(ids[0].tolist(), dists[0].tolist(), strict=True))
            else:
                search_k = effective_search_k(self.meta["search_k"], self.meta["n_trees"], want)
                ids, dists = self._annoy.get_nns_by_vector(vector, min(want, n), search_k=search_k,
                                                           include_distances=True)
                found = list(zip(ids, dists, strict=True))
            hits = [(d, self._items[i]) for i, d in found if not left_out(self._items[i], d)]
            # copies of the query's audio, or songs without the tag, can fill the list: ask for more until top_k remain
            if len(hits) >= top_k or want >= n:
                break
            want *= 2
        if self._added_rows:
            added = exact_neighbours(self._added_vectors, vector[None], len(self._added_rows))
            for i, d in zip(added[0][0].tolist(), added[1][0].tolist(), strict=True):
                if not left_out(self._added_rows[i], d):
                    hits.append((d, self._added_rows[i]))
        hits.sort(key=lambda hit: (hit[0], hit[1]["track_id"]))
        return [{"rank": rank, **self._info(row), "label": row["label"], "distance": round(float(d), 6)}
                for rank, (d, row) in enumerate(hits[:top_k], start=1)]

    def _tags_of(self, row: dict) -> list[str]:
        """The song's top tags (:func:`pipeline.tags.top_tags`), worked out once per song (the index's all at once)."""
        if self._top_tags is None:
            tagged = [row for row in self._items if row.get(TAGS_COLUMN) is not None] if self.tag_names else []
            matrix = np.stack([row[TAGS_COLUMN] for row in tagged]) if tagged else np.zeros((0, len(self.tag_names)))
            self._top_tags = dict(zip([row["track_id"] for row in tagged], top_tags_of_many(matrix, self.tag_names),
                                      strict=True))
        tags = self._top_tags.get(row["track_id"])
        if tags is None:
            tags = self._top_tags[row["track_id"]] = top_tags(row.get(TAGS_COLUMN), self.tag_names)
        return tags

    def _info(self, row: dict) -> dict:
        """What every answer says of a song of the id table or the side table (:meth:`track_info`)."""
        return {"track_id": row["track_id"], "path": row["path"], **{name: row.get(name) for name in NAME_COLUMNS},
                "duration_s": row.get("duration_s"), "tags": self._tags_of(row)}

    def track_info(self, track_id: str) -> dict:
        """A searchable song's ``track_id``, ``path``, ``title``, ``artist``, ``album``, ``track_number``,
        ``duration_s`` (seconds) and ``tags`` (its top tags, most probable first; [] when the model has none).

        The names come from the file's tags (:func:`pipeline.tags.read_file_tags`): ``title`` falls back to the file
        name, the others are None when untagged (and all are None in an index built before names were kept).
        Raises MelsearchError for an unknown track id.
        """
        if track_id in self._item_of:
            return self._info(self._items[self._item_of[track_id]])
        for row in self._added_rows:
            if row["track_id"] == track_id:
                return self._info(row)
        raise MelsearchError(f"{track_id}: unknown track id in index {self.index_dir}")

    def _tag_filter(self, tag: str | None) -> Callable[[dict], bool]:
        """Whether a song's top tags hold ``tag`` (any case); every song when ``tag`` is None.

        Raises MelsearchError when the index's model predicts no tags, or not this one.
        """
        if tag is None:
            return lambda _row: True
        if not self.tag_names:
            raise MelsearchError(f"index {self.index_dir} has no tags: its model {self.meta['model_key']} predicts "
                                 "none (index with --model musicnn for tags)")
        wanted = next((name for name in self.tag_names if name.lower() == tag.strip().lower()), None)
        if wanted is None:
            raise MelsearchError(f"unknown tag {tag!r} (the model's tags: {', '.join(self.tag_names)})")
        return lambda row: wanted in self._tags_of(row)

    def index_audio(self, path: str | os.PathLike, *, label: str = "") -> str:
        """Add a song to the side table searched with the index; return its track id.

        The song keeps its file's names (:func:`pipeline.tags.read_file_tags`) and, with a tagging model, its tags.
        The id is ``added/<file name>`` (with 8 hex digits of its sha256 when that name is taken). A file
        already in the index or the side table (same path) is not added again: its id is returned. The side
        table (:class:`pipeline.added.AddedSongs`) takes songs from several processes at once and loses none.
        """
        path = Path(path)
        real = os.path.realpath(path)
        for row in [*self._items, *self._added_rows]:
            if os.path.realpath(path_from_text(row["path"])) == real:
                log.info("%s is already indexed as %s", path, row["track_id"])
                return row["track_id"]
        vector, predicted, tags = self._embed_file(path)
        row = {"track_id": f"added/{readable_name(path.name)}", "path": path_to_text(real), "label": label,
               "split": "added", "predicted_label": predicted, TAGS_COLUMN: tags, **read_file_tags(path).columns()}
        metadata = {key: self.meta[key] for key in ("model", "model_key", "feature_key")}
        track_id = self._added.add(row, vector, metadata=metadata, taken=set(self._item_of))
        self._added_rows, self._added_vectors = self._read_added()  # with what other processes added meanwhile
        return track_id

    def tracks(self) -> list[dict]:
        """Every searchable song, indexed ones first: ``[{**track_info, "label"}]`` (:meth:`track_info`)."""
        return [{**self._info(row), "label": row["label"]} for row in [*self._items, *self._added_rows]]

    def find_tracks(self, text: str = "", *, limit: int | None = None, tag: str | None = None) -> list[dict]:
        """The songs of :meth:`tracks` whose id, file name, title, artist or album holds ``text`` (any case), at
        most ``limit``; with ``tag``, only those whose top tags hold it.

        Those with a field that starts with it come first, then the others, each in the index's order.
        """
        text = text.strip().lower()
        tagged = self._tag_filter(tag)
        first, then = [], []
        for row in self.tracks():
            fields = [row["track_id"], Path(row["path"]).name, row["title"], row["artist"], row["album"]]
            fields = [field.lower() for field in fields if field]
            if any(text in field for field in fields) and tagged(row):
                (first if any(field.startswith(text) for field in fields) else then).append(row)
        return (first + then)[:limit]

    def recommend(
        self,
        history: Sequence[str],
        *,
        top_k: int = 10,
        rule: str = "merge",
        window: int | None = None,
        exact: bool = False,
        tag: str | None = None,
    ) -> list[dict]:
        """Songs to play next after a listening history: neighbours of its last songs, never one of the history.

        Two rules, over the last ``window`` distinct songs of ``history`` (oldest first, the newest last; default
        ``HISTORY_WINDOW``, the original's 10):

        ``"merge"`` (the default)
            The original project's recommender: the ``PER_SONG`` (5) nearest neighbours of each song, merged,
            ranked by their best distance to any history song, each song once. More per song when
            ``top_k`` needs it (``ceil(top_k / songs)``, doubled while shared neighbours leave fewer than
            ``top_k``). The default because it keeps a mixed history's
            several tastes: three blues songs and two metal songs get blues and metal neighbours, where
            a centroid lands between the two and returns songs like neither.
        ``"centroid"``
            The neighbours of the L2-normalised mean of the history's vectors (one search): best for a
            history of one taste, where it favours songs close to all of it over songs close to one.

        With ``tag``, only songs whose top tags hold it.

        Returns
        -------
        :meth:`query`'s list (``rank``, the song's :meth:`track_info`, ``label``, ``distance``), ``distance`` to the
        nearest history song (merge) or to the centroid.

        Raises
        ------
        MelsearchError
            Empty history, an unknown track id in it, an unknown rule, ``top_k < 1`` or ``window < 1``.
        """
        if rule not in RECOMMEND_RULES:
            raise MelsearchError(f"unknown recommend rule {rule!r} (one of {', '.join(RECOMMEND_RULES)})")
        window = HISTORY_WINDOW if window is None else window
        if top_k < 1 or window < 1:
            raise MelsearchError(f"top_k and window must be >= 1, got {top_k} and {window}")
        # the newest listen of a song counts: keep each song's last position, then the last `window` songs
        latest = list(dict.fromkeys(reversed([str(track) for track in history])))[::-1]
        if not latest:
            raise MelsearchError("empty listening history: give at least one track id")
        unknown = [track for track in latest if self._vector_of(track) is None]
        if unknown:
            raise MelsearchError(f"{', '.join(unknown[:5])}: unknown track id(s) in index {self.index_dir}")
        listened = set(latest)
        seeds = latest[-window:]

        def in_history(row: dict, _distance: float) -> bool:
            return row["track_id"] in listened

        if rule == "centroid":
            mean = np.mean([self._vector_of(track) for track in seeds], axis=0, dtype=np.float32)
            norm = float(np.linalg.norm(mean))
            if norm < 1e-6:  # opposite songs cancel out: no direction to search in
                raise MelsearchError(f"the history's songs cancel out (mean vector ~0): use rule 'merge' for {seeds}")
            return self._search(mean / norm, top_k, exact=exact, is_query=in_history, tag=tag)
        per_song = max(PER_SONG, -(-top_k // len(seeds)))
        while True:
            best: dict[str, dict] = {}
            for track in seeds:
                for hit in self._search(self._vector_of(track), per_song, exact=exact, is_query=in_history, tag=tag):
                    if hit["track_id"] not in best or hit["distance"] < best[hit["track_id"]]["distance"]:
                        best[hit["track_id"]] = hit
            # songs near several seeds come once: widen until top_k remain (or the index is exhausted)
            if len(best) >= top_k or per_song >= len(self):
                break
            per_song *= 2
        merged = sorted(best.values(), key=lambda hit: (hit["distance"], hit["track_id"]))[:top_k]
        return [{**hit, "rank": rank} for rank, hit in enumerate(merged, start=1)]


# recommend(): the original project's rule looks at the last 10 songs listened to and 5 neighbours of each
HISTORY_WINDOW = 10
PER_SONG = 5
RECOMMEND_RULES = ("merge", "centroid")


def _sha256_or_none(path: str) -> str | None:
    """The file's sha256, or None when it cannot be read (moved since indexing: its distance decides alone)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def _model_name(model_dir: Path) -> str | None:
    """The model name in a model folder's config.json (None when unreadable: loading it will say why)."""
    try:
        return json.loads((model_dir / "config.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
