"""A library's songs by name and by musicnn's tags, as a user sees them: ``run --library DIR --model musicnn``, then
``query``, ``recommend``, ``tracks`` and the API show "artist - title", list each song's top tags and filter by one.

The library is synthetic clips, four of six tagged with mutagen (as a tagger would), two left untagged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_tags
from fastapi.testclient import TestClient
from helpers import melsearch

from pipeline.query import MusicSearch
from pipeline.server import create_app
from pipeline.synth import write_synthetic_dataset
from pipeline.tags import MIN_TAGS, display_name

NAMES = {  # file stem -> its tags; the other clips are untagged
    "chime.00000": {"title": "Bells at Dawn", "artist": "The Chimes", "album": "Morning", "tracknumber": "1"},
    "chime.00001": {"title": "Noon Bells", "artist": "The Chimes", "album": "Morning", "tracknumber": "2"},
    "drone.00000": {"title": "Low Hum", "artist": "Drone Choir", "album": "Deep", "tracknumber": "1"},
    "drone.00001": {"title": "Lower Hum", "artist": "Drone Choir", "album": "Deeper"},
}
SETTINGS = ["--model", "musicnn", "--set", "features.duration_s=4"]


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> tuple[Path, Path]:
    """(library folder, work directory) of six 4-s FLAC clips indexed by musicnn, four of them tagged."""
    root = tmp_path_factory.mktemp("names")
    folder = root / "music"
    for path in write_synthetic_dataset(folder, n_per_class=3, seconds=4.0, n_classes=2, seed=3, fmt="flac"):
        if path.stem in NAMES:
            write_tags(path, **NAMES[path.stem])
    melsearch("run", "--library", str(folder), "--workdir", str(root / "work"), *SETTINGS)
    return folder, root / "work"


def run_json(workdir: Path, *args: str) -> list[dict]:
    return json.loads(melsearch(*args, "--workdir", str(workdir), "--json").stdout)


def test_query_results_carry_names_and_at_least_three_tags(library):
    folder, workdir = library
    results = run_json(workdir, "query", str(folder / "chime" / "chime.00000.flac"), "--top-k", "5")
    assert len(results) == 5 and "chime/chime.00000.flac" not in [r["track_id"] for r in results]
    tag_names = MusicSearch.load(workdir).tag_names
    assert len(tag_names) == 50 and "rock" in tag_names
    for r in results:
        names = NAMES.get(Path(r["track_id"]).stem)
        expected = (names["title"], names["artist"], names["album"]) if names else (Path(r["path"]).stem, None, None)
        assert (r["title"], r["artist"], r["album"]) == expected, r
        assert len(r["tags"]) >= MIN_TAGS and set(r["tags"]) <= set(tag_names), r
    table = melsearch("query", str(folder / "chime" / "chime.00000.flac"), "--top-k", "5", "--workdir",
                      str(workdir)).stdout
    assert "The Chimes - Noon Bells" in table and "Drone Choir - Low Hum" in table
    assert ", ".join(results[0]["tags"]) in table.splitlines()[1]


def test_tag_filter_keeps_only_songs_carrying_the_tag(library):
    folder, workdir = library
    every = run_json(workdir, "tracks")
    counts: dict[str, int] = {}
    for song in every:
        for tag in song["tags"]:
            counts[tag] = counts.get(tag, 0) + 1
    # a tag some songs carry and others not, so the filter has something to drop
    tag = max((t for t, n in counts.items() if 2 <= n < len(every)), key=lambda t: (counts[t], t), default=None)
    if tag is None:
        pytest.skip(f"musicnn gave these clips no tag that splits them: {counts}")
    carrying = {song["track_id"] for song in every if tag in song["tags"]}
    assert {s["track_id"] for s in run_json(workdir, "tracks", "--tag", tag.upper())} == carrying  # any case

    seed = sorted(carrying)[0]
    filtered = run_json(workdir, "query", "--track", seed, "--tag", tag, "--top-k", "10")
    # every other song with the tag comes back, though Annoy's first candidates hold songs without it
    assert {r["track_id"] for r in filtered} == carrying - {seed}
    assert all(tag in r["tags"] for r in filtered)
    recommended = run_json(workdir, "recommend", "--history", seed, "--tag", tag)
    assert {r["track_id"] for r in recommended} == carrying - {seed}

    client = TestClient(create_app(MusicSearch.load(workdir)))
    api = client.get("/api/query", params={"track": seed, "tag": tag, "k": 10}).json()
    assert {r["track_id"] for r in api} == carrying - {seed}

    unknown = melsearch("query", "--track", seed, "--tag", "polka", "--workdir", str(workdir), check=False)
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1 and "unknown tag 'polka'" in unknown.stderr


def test_tracks_and_the_api_find_songs_by_title_artist_and_album(library):
    _, workdir = library
    by_artist = run_json(workdir, "tracks", "drone choir")
    assert [(s["title"], s["artist"]) for s in by_artist] == [("Low Hum", "Drone Choir"), ("Lower Hum", "Drone Choir")]
    assert [s["track_id"] for s in run_json(workdir, "tracks", "DEEPER")] == ["drone/drone.00001.flac"]  # album
    assert [s["track_id"] for s in run_json(workdir, "tracks", "noon")] == ["chime/chime.00001.flac"]  # title
    table = melsearch("tracks", "chimes", "--workdir", str(workdir)).stdout.splitlines()
    assert table[0].split() == ["song", "label", "tags", "track_id"]
    assert [line.split("  ")[0] for line in table[1:]] == ["The Chimes - Bells at Dawn", "The Chimes - Noon Bells"]

    client = TestClient(create_app(MusicSearch.load(workdir)))
    found = client.get("/api/tracks", params={"q": "the chimes"}).json()
    assert [(s["name"], s["album"]) for s in found] == [("The Chimes - Bells at Dawn", "Morning"),
                                                        ("The Chimes - Noon Bells", "Morning")]
    assert all(len(s["tags"]) >= MIN_TAGS and "path" not in s for s in found)


def test_track_info_and_the_vector_cache_keep_names_and_tags_across_runs(library, tmp_path):
    folder, workdir = library
    search = MusicSearch.load(workdir)
    info = search.track_info("drone/drone.00000.flac")
    assert {k: info[k] for k in ("title", "artist", "album", "track_number")} == {
        "title": "Low Hum", "artist": "Drone Choir", "album": "Deep", "track_number": 1}
    assert info["duration_s"] == pytest.approx(4.0, abs=0.01) and len(info["tags"]) >= MIN_TAGS
    assert display_name(search.track_info("drone/drone.00002.flac")) == "drone.00002"  # untagged

    # a song added: only it is embedded, and every song keeps its tags through the cache
    added = write_tags(Path(folder / "drone" / "drone.00002.flac").rename(folder / "drone" / "new.flac"),
                       title="New Hum", artist="Drone Choir")
    out = melsearch("run", "--library", str(folder), "--workdir", str(workdir), *SETTINGS).stdout
    assert "computed=1, reused=5" in out, out
    search = MusicSearch.load(workdir)
    assert display_name(search.track_info("drone/new.flac")) == "Drone Choir - New Hum"
    assert all(len(song["tags"]) >= MIN_TAGS for song in search.tracks())
    caches = list((workdir / "cache").glob("embeddings-*.parquet"))
    assert len(caches) == 1 and None not in pq.read_table(caches[0]).column("tag_probabilities").to_pylist()
    added.rename(folder / "drone" / "drone.00002.flac")


def test_a_song_added_to_the_index_keeps_its_names_and_tags(library, tmp_path):
    _, workdir = library
    song = write_tags(Path(write_synthetic_dataset(tmp_path, n_per_class=1, seconds=4.0, n_classes=1, seed=9,
                                                   fmt="flac")[0]), title="Late Bells", artist="The Chimes")
    search = MusicSearch.load(workdir)
    info = search.track_info(search.index_audio(song))
    assert (info["title"], info["artist"], info["album"]) == ("Late Bells", "The Chimes", None)
    assert len(info["tags"]) >= MIN_TAGS and set(info["tags"]) <= set(search.tag_names)
    again = MusicSearch.load(workdir)  # from the side table, as another process reads it
    assert again.track_info(info["track_id"])["tags"] == info["tags"]
    assert info["track_id"] in {s["track_id"] for s in again.find_tracks("late bells", tag=info["tags"][0])}
