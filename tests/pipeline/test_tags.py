"""Names and tags: a file's own tags (mutagen) in the manifest, the display name, a model's top tags.

Files are synthetic clips whose tags these tests write with mutagen, as a tagger (beets, Picard) would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from conftest import write_tags
from mutagen.id3 import TIT2, TPE1, TRCK
from mutagen.wave import WAVE

from pipeline.dataset import build_manifest
from pipeline.manifest import MANIFEST_SCHEMA, read_manifest
from pipeline.tags import MAX_TAGS, MIN_TAGS, TAG_THRESHOLD, FileTags, display_name, read_file_tags, top_tags


def tone(path: Path, seconds: float = 1.0, sr: int = 22050, **kwargs) -> Path:
    """A quiet 440 Hz tone written by soundfile (its format from the suffix)."""
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.2 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32), sr, **kwargs)
    return path


def test_flac_tags_are_read(tmp_path):
    path = write_tags(tone(tmp_path / "a.flac"), title="Blue in Green", artist="Miles Davis", album="Kind of Blue",
                      tracknumber="3/5")
    assert read_file_tags(path) == FileTags("Blue in Green", "Miles Davis", "Kind of Blue", 3)


def test_id3_in_a_wav_is_read(tmp_path):
    """WAV has no "easy" view in mutagen: its ID3 frames are read by name."""
    path = tone(tmp_path / "b.wav")
    wave = WAVE(path)
    wave.add_tags()
    wave.tags.add(TIT2(encoding=3, text=["Ce\u0301line"]))
    wave.tags.add(TPE1(encoding=3, text=["  ", "Second Artist"]))  # the first non-empty value counts
    wave.tags.add(TRCK(encoding=3, text=["B-side"]))  # not a number: no track number
    wave.save()
    assert read_file_tags(path) == FileTags("Ce\u0301line", "Second Artist", None, None)


@pytest.mark.parametrize("content", [None, b"", b"ID3\x04\x00\x00\x00\x00\x00\x7f" + b"\xff" * 64, b"not audio" * 50])
def test_untagged_or_damaged_files_are_named_by_their_file_name(tmp_path, content, caplog):
    path = tmp_path / "02 My Song.mp3"
    if content is None:
        tone(tmp_path / "02 My Song.flac")
        path = tmp_path / "02 My Song.flac"
    else:
        path.write_bytes(content)
    with caplog.at_level("DEBUG", logger="pipeline.tags"):
        assert read_file_tags(path) == FileTags("02 My Song")
    assert read_file_tags(tmp_path / "missing.ogg") == FileTags("missing")


def test_manifest_has_the_names_and_a_rejected_file_has_none(tmp_path):
    root = tmp_path / "music"
    (root / "jazz").mkdir(parents=True)
    write_tags(tone(root / "jazz" / "one.flac"), title="So What", artist="Miles Davis", album="Kind of Blue",
               tracknumber="1")
    tone(root / "jazz" / "two.flac")
    (root / "jazz" / "broken.flac").write_bytes(b"fLaC not really")
    cache = tmp_path / "probes.parquet"
    build_manifest(root, tmp_path / "manifest.parquet", probe_cache=cache)
    rows = {row["track_id"]: row for row in read_manifest(tmp_path / "manifest.parquet")}
    assert {k: rows["jazz/one.flac"][k] for k in ("title", "artist", "album", "track_number")} == {
        "title": "So What", "artist": "Miles Davis", "album": "Kind of Blue", "track_number": 1}
    assert (rows["jazz/two.flac"]["title"], rows["jazz/two.flac"]["artist"]) == ("two", None)
    assert rows["jazz/broken.flac"]["status"] == "rejected" and rows["jazz/broken.flac"]["title"] is None

    # retagging changes the file's identity: its names are read again, the other's come from the probe cache
    write_tags(root / "jazz" / "two.flac", title="Freddie Freeloader", artist="Miles Davis")
    build_manifest(root, tmp_path / "manifest.parquet", probe_cache=cache)
    rows = {row["track_id"]: row for row in read_manifest(tmp_path / "manifest.parquet")}
    assert rows["jazz/two.flac"]["title"] == "Freddie Freeloader" and rows["jazz/one.flac"]["title"] == "So What"


def test_a_manifest_and_probe_cache_from_before_names_still_read(tmp_path):
    root = tmp_path / "music"
    root.mkdir()
    write_tags(tone(root / "one.flac"), title="So What", artist="Miles Davis")
    old = pa.schema([field for field in MANIFEST_SCHEMA if field.name not in ("title", "artist", "album",
                                                                             "track_number")])
    build_manifest(root, tmp_path / "manifest.parquet", probe_cache=tmp_path / "probes.parquet")
    table = pq.read_table(tmp_path / "manifest.parquet")
    pq.write_table(table.select(old.names), tmp_path / "old.parquet")
    assert [(row["track_id"], row["title"], row["artist"]) for row in read_manifest(tmp_path / "old.parquet")] == [
        ("one.flac", None, None)]
    probes = pq.read_table(tmp_path / "probes.parquet")
    pq.write_table(probes.drop_columns(["title", "artist", "album", "track_number"]), tmp_path / "probes.parquet")
    build_manifest(root, tmp_path / "manifest.parquet", probe_cache=tmp_path / "probes.parquet")
    assert read_manifest(tmp_path / "manifest.parquet")[0]["artist"] == "Miles Davis"  # probed again, once
    assert "artist" in pq.read_schema(tmp_path / "probes.parquet").names


def test_display_name():
    assert display_name({"track_id": "a/b.mp3", "title": "So What", "artist": "Miles Davis"}) == "Miles Davis - So What"
    assert display_name({"track_id": "a/b.mp3", "title": "b", "artist": None}) == "b"
    assert display_name({"track_id": "a/b.mp3", "title": None, "artist": "Miles Davis"}) == "a/b.mp3"
    assert display_name({"track_id": "a/b.mp3"}) == "a/b.mp3"


def test_top_tags_keep_those_over_the_threshold_at_least_three():
    names = [f"t{i}" for i in range(12)]
    low = np.full(12, TAG_THRESHOLD / 10, dtype=np.float32)
    low[[4, 7, 1]] = [0.05, 0.03, 0.04]
    assert top_tags(low, names) == ["t4", "t1", "t7"]  # none over the threshold: the MIN_TAGS most probable
    high = np.linspace(0.9, 0.2, 12).astype(np.float32)
    assert top_tags(high, names) == names[:MAX_TAGS]  # capped, most probable first
    some = np.zeros(12, dtype=np.float32)
    some[[9, 2, 5, 0]] = [0.5, 0.4, TAG_THRESHOLD, 0.3]
    assert top_tags(some, names) == ["t9", "t2", "t0", "t5"]
    assert MIN_TAGS == 3 and top_tags(None, names) == [] and top_tags(high, []) == []
