"""The issue's library of real music: 16 emotify MP3s (4 per genre folder), 12 with their ID3 title, artist and
album, 4 stripped of every tag, indexed by ``run --library DIR --model musicnn`` as a user would, with the default
settings. Skipped without MELSEARCH_EMOTIFY_AUDIO (set by .ci/run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mutagen
import pytest
from fastapi.testclient import TestClient
from helpers import melsearch

from pipeline.query import MusicSearch
from pipeline.server import create_app
from pipeline.tags import MIN_TAGS

GENRES = ("classical", "electronic", "pop", "rock")


@pytest.fixture(scope="module")
def emotify_library(emotify_dir, tmp_path_factory) -> tuple[Path, Path, dict[str, tuple[str, str | None]]]:
    """(folder, work directory, track id -> (title, artist) its file says) of the indexed 16 clips."""
    root = tmp_path_factory.mktemp("emotify")
    folder, names = root / "music", {}
    for genre in GENRES:
        (folder / genre).mkdir(parents=True)
        for n, source in enumerate(sorted((emotify_dir / genre).glob("*.mp3"))[:4]):
            path = Path(shutil.copy(source, folder / genre / source.name))
            track_id = f"{genre}/{source.name}"
            if n == 3:  # the last of each genre: no tags at all
                mutagen.File(path).delete()
                names[track_id] = (path.stem, None)
            else:
                tags = mutagen.File(path, easy=True)
                names[track_id] = (tags["title"][0].strip(), tags["artist"][0].strip())  # "Sanctuary " shows trimmed
    melsearch("run", "--library", str(folder), "--model", "musicnn", "--workdir", str(root / "work"))
    return folder, root / "work", names


def test_query_of_a_file_names_its_results_and_tags_them(emotify_library):
    folder, workdir, names = emotify_library
    seed = "rock/" + sorted(p.name for p in (folder / "rock").iterdir())[0]
    results = json.loads(melsearch("query", str(folder / seed), "--top-k", "15", "--json", "--workdir",
                                   str(workdir)).stdout)
    assert sorted(r["track_id"] for r in results) == sorted(set(names) - {seed})
    assert all((r["title"], r["artist"]) == names[r["track_id"]] for r in results)
    assert sum(r["artist"] is not None for r in results) == 11
    assert all(len(r["tags"]) >= MIN_TAGS for r in results)

    # --tag: only songs carrying it, every one of them that the library holds (but the query itself)
    every = json.loads(melsearch("tracks", "--json", "--workdir", str(workdir)).stdout)
    tag = "rock" if any("rock" in s["tags"] for s in every if s["track_id"] != seed) else every[0]["tags"][0]
    carrying = {s["track_id"] for s in every if tag in s["tags"]} - {seed}
    tagged = json.loads(melsearch("query", str(folder / seed), "--tag", tag, "--top-k", "15", "--json",
                                  "--workdir", str(workdir)).stdout)
    assert tagged and {r["track_id"] for r in tagged} == carrying and all(tag in r["tags"] for r in tagged)


def test_the_api_finds_an_artists_songs(emotify_library):
    _, workdir, names = emotify_library
    artist = next(artist for _, artist in names.values() if artist)
    found = TestClient(create_app(MusicSearch.load(workdir))).get("/api/tracks", params={"q": artist}).json()
    theirs = {track for track, (_, who) in names.items() if who == artist}
    assert theirs and theirs <= {song["track_id"] for song in found}
    assert all(song["name"] == f"{artist} - {names[song['track_id']][0]}" for song in found
               if song["track_id"] in theirs)
