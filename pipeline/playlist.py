"""Playlists from an index: a seed song and the songs most like it, a listening history's continuation, and a
song path from one song to another, written as extended M3U that media players read.

``seed_playlist``, ``history_playlist`` and ``song_path`` return entries: :meth:`MusicSearch.track_info`'s dicts
(``track_id``, None for a seed file that is not in the index; ``path`` as the id table keeps it,
:func:`pipeline.manifest.path_to_text`; ``title``, ``artist``, ``album``, ``track_number``, ``duration_s`` in
seconds, None when unknown; ``tags``) with ``distance`` (angular, to the seed, the nearest history song, or the
path's previous song; 0 for the first entry). ``write_m3u`` writes them.
Every entry's file exists when it is chosen, and no song comes twice, nor twice the same audio under two names
(vectors closer than :data:`pipeline.query.DUPLICATE_DISTANCE`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import MelsearchError
from pipeline.io import atomic_path
from pipeline.manifest import path_from_text, path_to_text
from pipeline.query import DUPLICATE_DISTANCE, MusicSearch
from pipeline.tags import display_name, read_file_tags

log = logging.getLogger(__name__)

# song_path: weight of the distance from the previous song against the distance from the step's target point.
# Under 1 the target leads (the path keeps moving towards B); above 0 a song beside the last one wins a near tie.
STEP_WEIGHT = 0.5


def seed_playlist(search: MusicSearch, seed: str | os.PathLike, n: int, *, exact: bool = False) -> list[dict]:
    """The seed (a track id, or an audio file, in the index or not) and the ``n - 1`` songs most like it, nearest
    first: ``n`` entries, fewer only when the index has fewer distinct songs.

    Raises MelsearchError for an unknown id, an unreadable file, ``n < 1``.
    """
    _check_n(n, 1)
    first = _seed_entry(search, seed)

    def pick(top_k: int) -> list[dict]:
        hits = search.query(seed if first["track_id"] is None else first["track_id"], top_k=top_k, exact=exact)
        # a copy of the seed's audio under another name is the seed again
        return [hit for hit in hits if hit["distance"] >= DUPLICATE_DISTANCE]

    return [first, *_distinct(search, pick, n - 1, taken=[first["track_id"]] if first["track_id"] else [])]


def history_playlist(search: MusicSearch, history: Sequence[str], n: int, *, rule: str = "merge",
                     exact: bool = False) -> list[dict]:
    """``n`` songs to play after a listening history (track ids, oldest first), none of the history.

    The songs are :meth:`MusicSearch.recommend`'s, its ``"merge"`` rule by default (the nearest neighbours of each
    of the last 10 songs, ranked by their distance to the nearest history song): a history of several tastes
    (blues, then metal) gets a playlist of both, where the songs nearest the history's mean vector would sound
    like neither. ``rule="centroid"`` takes the songs nearest that mean instead (one taste, a tighter list).
    Audio that duplicates a history song is left out too.
    """
    _check_n(n, 1)

    def pick(top_k: int) -> list[dict]:
        return search.recommend(history, top_k=top_k, rule=rule, exact=exact)

    return _distinct(search, pick, n, taken=[str(track) for track in history])


def song_path(search: MusicSearch, start: str | os.PathLike, end: str | os.PathLike, n: int, *,
              step_weight: float = STEP_WEIGHT) -> list[dict]:
    """``n`` distinct songs from ``start`` to ``end`` (each a track id or an indexed song's file), each step close
    to the last and moving towards ``end``.

    With ``a`` and ``b`` the two songs' unit vectors, step ``i`` (of ``n - 1``) aims at the point ``t = i/(n-1)``
    of the great-circle arc from ``a`` to ``b`` (spherical interpolation: the vectors live on the unit sphere, and
    a straight line's midpoint would sit inside it, nearer to nothing). It takes the unused song minimising
    ``|v - target| + step_weight * |v - previous|``, among the songs nearer to ``b`` than the previous one that
    leave enough songs nearer still for the steps left (so that a path nearing B at every step is never cut off
    by an early jump to B's neighbours), or among all unused songs when there are none. Exact search over every
    vector: O(n x songs).

    Raises
    ------
    MelsearchError
        ``n < 2``, an unknown song, ``start`` and ``end`` the same song, fewer than ``n`` distinct songs.
    """
    _check_n(n, 2, "a song path (its two ends at least)")
    rows = search.tracks()
    ids = [row["track_id"] for row in rows]
    position = {track: i for i, track in enumerate(ids)}
    first, last = (position[_indexed_id(search, song, rows)] for song in (start, end))
    if first == last:
        raise MelsearchError(f"{start} and {end} are the same song: a path needs two")
    for i in (first, last):
        _check_file(rows[i])
    vectors = search.vectors(ids)
    a, b = vectors[first], vectors[last]
    if np.linalg.norm(a - b) < DUPLICATE_DISTANCE:
        raise MelsearchError(f"{start} and {end} are the same audio: a path needs two songs")
    usable = np.ones(len(ids), dtype=bool)
    order: list[int] = []

    def take(i: int) -> None:
        order.append(i)
        # this song, and its audio under any other name, is used
        usable[np.linalg.norm(vectors - vectors[i], axis=1) < DUPLICATE_DISTANCE] = False

    take(first)
    to_end = np.linalg.norm(vectors - b, axis=1)
    usable[to_end < DUPLICATE_DISTANCE] = False  # B comes last, once
    for step in range(1, n - 1):
        previous = order[-1]
        cost = (np.linalg.norm(vectors - _slerp(a, b, step / (n - 1)), axis=1)
                + step_weight * np.linalg.norm(vectors - vectors[previous], axis=1))
        while True:
            # nearer to B than the previous song, with enough usable songs nearer still for the steps left
            by_end = np.argsort(to_end, kind="stable")
            nearer = np.empty(len(ids), dtype=np.int64)
            nearer[by_end] = np.cumsum(usable[by_end]) - usable[by_end]
            candidates = usable & (to_end < to_end[previous]) & (nearer >= n - 2 - step)
            if not candidates.any():
                candidates = usable
            if not candidates.any():
                raise MelsearchError(f"the index has only {len(order) + 1} distinct songs for a path of {n} from "
                                     f"{ids[first]} to {ids[last]}")
            best = int(np.argmin(np.where(candidates, cost, np.inf)))
            if _file_there(rows[best], "path"):
                break
            usable[best] = False
        take(best)
    order.append(last)
    return [_entry(search, rows[i], float(np.linalg.norm(vectors[i] - vectors[j])) if k else 0.0)
            for k, (i, j) in enumerate(zip(order, [first, *order[:-1]], strict=True))]


def track_entries(search: MusicSearch, track_ids: Sequence[str]) -> list[dict]:
    """The entries of ``track_ids`` in their order, each song once; a song whose file is gone is left out (logged).

    Raises MelsearchError naming the first unknown id.
    """
    by_id = {row["track_id"]: row for row in search.tracks()}
    unknown = [track for track in track_ids if track not in by_id]
    if unknown:
        raise MelsearchError(f"{unknown[0]}: unknown track id in index {search.index_dir}")
    entries = []
    for track in dict.fromkeys(track_ids):
        if _file_there(by_id[track]):
            entries.append(_entry(search, by_id[track]))
    return entries


def _slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """The point a fraction ``t`` along the great-circle arc between unit vectors ``a`` and ``b`` (unit length)."""
    omega = float(np.arccos(np.clip(np.dot(a, b), -1.0, 1.0)))
    if omega < 1e-6:
        return a
    if np.pi - omega < 1e-6:  # opposite songs: every arc between them is as short; follow the straight line
        point = (1 - t) * a + t * b
        norm = float(np.linalg.norm(point))
        return point / norm if norm > 1e-6 else a
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def _check_n(n: int, least: int, what: str = "a playlist") -> None:
    if n < least:
        raise MelsearchError(f"{what} of {n} songs: give --n {least} or more")


def _file_there(row: dict, what: str = "playlist") -> bool:
    """Whether the song's file is still there (a warning when not: it is left out of the ``what``)."""
    if Path(path_from_text(row["path"])).is_file():
        return True
    log.warning("%s: its file %s is gone; left out of the %s", row["track_id"], row["path"], what)
    return False


def _check_file(row: dict) -> None:
    if not Path(path_from_text(row["path"])).is_file():
        raise MelsearchError(f"{row['track_id']}: its file {row['path']} is gone (run the library again)")


def _indexed_row(path: Path, rows: Sequence[dict]) -> dict | None:
    """The row of ``rows`` whose file is ``path`` (the same file, through links too), or None."""
    real = os.path.realpath(path)
    return next((row for row in rows if os.path.realpath(path_from_text(row["path"])) == real), None)


def _indexed_id(search: MusicSearch, song: str | os.PathLike, rows: Sequence[dict]) -> str:
    """The track id of ``song``: a track id, or the file of an indexed song."""
    if isinstance(song, str) and any(row["track_id"] == song for row in rows):
        return song
    path = Path(song)
    if not path.is_file():
        raise MelsearchError(f"{song}: unknown track id in index {search.index_dir} (and no such file)")
    row = _indexed_row(path, rows)
    if row is None:
        raise MelsearchError(f"{song}: not a song of index {search.index_dir} (run the library again to add it)")
    return row["track_id"]


def _seed_entry(search: MusicSearch, seed: str | os.PathLike) -> dict:
    """The seed's entry: its id-table row's when it is a track id or an indexed file, else the file's own."""
    rows = search.tracks()
    row = next((row for row in rows if row["track_id"] == seed), None) if isinstance(seed, str) else None
    if row is None:
        path = Path(seed)
        if not path.is_file():
            raise MelsearchError(f"{seed}: unknown track id in index {search.index_dir} (and no such file)")
        row = _indexed_row(path, rows)
    if row is not None:
        _check_file(row)
        return _entry(search, row)
    return _entry(search, {"track_id": None, "path": path_to_text(os.path.abspath(path))})


def _distinct(search: MusicSearch, pick: Callable[[int], list[dict]], n: int, *, taken: Sequence[str]) -> list[dict]:
    """Up to ``n`` entries of ``pick(top_k)``'s ranked hits (asked for more until ``n`` remain or the index is
    exhausted), leaving out hits whose file is gone and any whose vector duplicates a ``taken`` track's or an
    earlier hit's."""
    top_k = n
    while True:
        hits = pick(top_k)
        kept, kept_vectors = [], list(search.vectors(taken))
        vectors = search.vectors([hit["track_id"] for hit in hits])
        for hit, vector in zip(hits, vectors, strict=True):
            if len(kept) == n:
                break
            if any(np.linalg.norm(vector - other) < DUPLICATE_DISTANCE for other in kept_vectors):
                continue
            if not _file_there(hit):
                continue
            kept.append(_entry(search, hit, hit["distance"]))
            kept_vectors.append(vector)
        if len(kept) == n or top_k >= len(search):
            if len(kept) < n:
                log.warning("the index has %d distinct songs for this playlist of %d", len(kept) + len(taken), n)
            return kept
        top_k = min(2 * top_k + len(taken), len(search))


def _entry(search: MusicSearch, row: dict, distance: float = 0.0) -> dict:
    """A playlist entry: :meth:`MusicSearch.track_info` of an id-table row, or the names and length a seed file
    outside the index (``{"track_id": None, "path"}``) has in its own header; with ``distance``."""
    if row["track_id"] is not None:
        info = search.track_info(row["track_id"])
    else:
        path = path_from_text(row["path"])
        info = {"track_id": None, "path": row["path"], **read_file_tags(path).columns(),
                "duration_s": _duration(path), "tags": []}
    return {**info, "distance": round(float(distance), 6)}


def _duration(path: str) -> float | None:
    """The file's length in seconds from its header, None when soundfile cannot read it."""
    import soundfile as sf

    try:
        return float(sf.info(os.fsencode(path)).duration)
    except (sf.LibsndfileError, RuntimeError, OSError):
        return None


def format_m3u(entries: Sequence[dict], *, relative_to: str | os.PathLike | None = None) -> str:
    """Extended M3U text (UTF-8 M3U8): ``#EXTM3U``, then ``#EXTINF:<seconds>,<artist> - <title>`` and the file of
    each entry.

    Paths are absolute, or relative to the folder ``relative_to`` (the playlist's). A path whose bytes are not
    UTF-8 (a Latin-1 name) is written as its absolute ``file://`` URI with those bytes percent-encoded, which
    VLC, mpv and most players open, since M3U8 text cannot hold the raw bytes. Seconds are rounded, -1 unknown.
    """
    lines = ["#EXTM3U"]
    for entry in entries:
        seconds = -1 if entry["duration_s"] is None else round(entry["duration_s"])
        lines.append(f"#EXTINF:{seconds},{' '.join(display_name(entry).split())}")
        lines.append(_m3u_path(entry["path"], relative_to))
    return "\n".join(lines) + "\n"


def _m3u_path(text: str, relative_to: str | os.PathLike | None) -> str:
    path = os.path.abspath(path_from_text(text))
    written = path_to_text(path)
    if relative_to is None or written != path:  # a file:// URI stays absolute
        return written
    return os.path.relpath(path, os.path.abspath(relative_to))


def write_m3u(entries: Sequence[dict], out: str | os.PathLike, *, relative: bool = False) -> Path:
    """Write ``entries`` to the playlist file ``out`` atomically (:func:`format_m3u`; paths relative to its folder
    when ``relative``). MelsearchError, one line, when its folder is missing or cannot be written."""
    out = Path(out)
    if not out.parent.is_dir():
        raise MelsearchError(f"{out}: no such folder {out.parent} for the playlist")
    text = format_m3u(entries, relative_to=out.parent if relative else None)
    try:
        with atomic_path(out) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MelsearchError(f"{out}: cannot write the playlist ({exc.strerror or exc})") from exc
    return out
