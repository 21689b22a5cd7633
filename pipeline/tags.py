"""What a song is called and what it sounds like: its file's own tags (title, artist, album, track number, read
with mutagen), a tagging model's top tags (musicnn's 50 Million Song Dataset tags), and the one way every output
(the CLI, the page, playlists) names a song.

A file's tags are read from its header only (mutagen parses the tag frames, it decodes no audio): about 1.3 ms
per MP3 of /work/shared/emotify-audio, and the dataset stage keeps them in its probe cache, so a library rescanned
on every run reads the tags of its new and changed files only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.manifest import readable_name

log = logging.getLogger(__name__)

# The manifest's (and the search results') name columns, all nullable.
NAME_COLUMNS = ("title", "artist", "album", "track_number")
# A track's top tags: every tag whose mean probability over the track's patches reaches TAG_THRESHOLD, at least
# MIN_TAGS and at most MAX_TAGS of them, most probable first. The threshold is measured by bench/tags.py on the 120
# emotify clips: at 0.1 a clip shows 4.4 tags (13 % of clips fall back to the 3 most probable), its genre's own tag
# for 84 % of the rock, pop and electronic clips and another of those genres' tags for 49 %; 0.05 shows 7.5 tags
# and another genre's for 80 %; 0.15 leaves 58 % of clips under 3 and shows the own genre's tag for 70 %.
TAG_THRESHOLD = 0.1
MIN_TAGS = 3
MAX_TAGS = 8

# ID3 frames of the names, for files whose ID3 tags mutagen has no "easy" view of (WAV, AIFF).
_ID3_FRAMES = {"title": "TIT2", "artist": "TPE1", "album": "TALB", "tracknumber": "TRCK"}


@dataclass(frozen=True)
class FileTags:
    """A file's names: ``title`` (its tag, else the file name without extension) and, when tagged, ``artist``,
    ``album`` and ``track_number`` (None when absent)."""

    title: str
    artist: str | None = None
    album: str | None = None
    track_number: int | None = None

    def columns(self) -> dict:
        """The manifest columns of :data:`NAME_COLUMNS`."""
        return asdict(self)


def _first_text(tags: Mapping, key: str) -> str | None:
    """The first non-empty value of ``key`` in an (easy or ID3) tag mapping, stripped; None when there is none."""
    try:
        values = tags.get(key) if key in tags else tags.get(_ID3_FRAMES[key])
    except (KeyError, ValueError):  # EasyID3 raises for keys it has no mapping of
        return None
    if values is None:
        return None
    for value in getattr(values, "text", values):  # an ID3 frame holds its values in .text
        text = str(value).strip().replace("\0", "")
        if text:
            return text
    return None


def _track_number(text: str | None) -> int | None:
    """``"3"`` or ``"3/12"`` -> 3; None for anything else."""
    head = (text or "").split("/")[0].strip()
    return int(head) if head.isdigit() else None


def read_file_tags(path: str | os.PathLike) -> FileTags:
    """The title, artist, album and track number of an audio file's tags (ID3, Vorbis comments, MP4, ...).

    Never raises: a file without tags, or whose tags cannot be read, is named by its file name (logged at debug
    level), so reading tags never rejects a file that decodes.
    """
    fallback = FileTags(title=readable_name(Path(path).stem))
    try:
        import mutagen  # here: readers of the manifest need not import it

        audio = mutagen.File(path, easy=True)
    except Exception as exc:  # mutagen raises many kinds (its own, struct, EOF, Unicode) on damaged headers
        log.debug("%s: tags not read (%s); named by its file name", path, exc)
        return fallback
    tags = getattr(audio, "tags", None)
    if not tags:
        return fallback
    track = _first_text(tags, "tracknumber")
    return FileTags(title=_first_text(tags, "title") or fallback.title, artist=_first_text(tags, "artist"),
                    album=_first_text(tags, "album"), track_number=_track_number(track))


def display_name(info: Mapping) -> str:
    """How every output names a song: ``"artist - title"``, the title alone, or the track id when it has neither.

    ``info``: a dict with ``track_id`` and (possibly null or absent) ``title`` and ``artist``, as a search result or
    :meth:`pipeline.query.MusicSearch.track_info`.
    """
    title, artist = info.get("title"), info.get("artist")
    if title and artist:
        return f"{artist} - {title}"
    return title or info["track_id"]


def top_tags(probabilities: np.ndarray | None, names: Sequence[str]) -> list[str]:
    """A track's top tags: those of ``names`` whose probability reaches :data:`TAG_THRESHOLD`, at least
    :data:`MIN_TAGS` and at most :data:`MAX_TAGS`, most probable first; ``[]`` for a track or model without tags.

    ``probabilities``: (len(names),) float, the track's mean tag probabilities (sigmoid outputs, not summing to 1).
    """
    if probabilities is None or not len(names):
        return []
    return top_tags_of_many(np.asarray(probabilities, dtype=np.float32)[None], names)[0]


def top_tags_of_many(probabilities: np.ndarray, names: Sequence[str]) -> list[list[str]]:
    """:func:`top_tags` of each row of (N, len(names)) probabilities, in one sort (100k songs: well under a second)."""
    probabilities = np.asarray(probabilities, dtype=np.float32).reshape(len(probabilities), len(names))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :MAX_TAGS]
    counts = np.clip((probabilities >= TAG_THRESHOLD).sum(axis=1), MIN_TAGS, MAX_TAGS)
    return [[names[i] for i in row[:count]] for row, count in zip(order.tolist(), counts.tolist(), strict=True)]
