"""The issue's library of real music, in beets and in playlists: 16 emotify MP3s (4 per genre), 12 with their ID3
tags and 4 stripped of them, imported with ``beet import -A`` and indexed by ``beet melsearch`` (musicnn; the
library pipeline of ``run --library DIR --model musicnn``); ``beet similar "title:X"`` lists at least 5 items and
not X; ``melsearch playlist`` on that index writes a seed's mix and a song path, titled from the tags. Skipped
without MELSEARCH_EMOTIFY_AUDIO (set by .ci/run) or beets.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mutagen
import pytest
from helpers import melsearch
from test_beets_plugin import beet, beets_env, lines

GENRES = ("classical", "electronic", "pop", "rock")


@pytest.fixture(scope="module")
def library(emotify_dir, tmp_path_factory) -> dict:
    """The 16 songs imported into a fresh beets library and indexed: beets' environment, the work directory,
    and each file's (title, artist), None for the untagged ones."""
    pytest.importorskip("beets")
    root = tmp_path_factory.mktemp("emotify-beets")
    names = {}
    (root / "music").mkdir()
    for genre in GENRES:
        for n, source in enumerate(sorted((emotify_dir / genre).glob("*.mp3"))[:4]):
            path = Path(shutil.copy(source, root / "music" / source.name))
            if n == 3:
                mutagen.File(path).delete()
                names[path] = None
            else:
                tags = mutagen.File(path, easy=True)
                names[path] = (tags["title"][0].strip(), tags["artist"][0].strip())
    env = beets_env(root)
    lines(beet(env, "import", "-A", "-q", str(root / "music")))
    assert lines(beet(env, "melsearch"))[-1].startswith("melsearch: 16 items indexed")
    return {"env": env, "work": root / "work", "names": names, "root": root}


def test_beet_similar_lists_at_least_5_items_and_not_the_seed(library):
    seed, (title, _) = next((path, names) for path, names in library["names"].items() if names)
    items = lines(beet(library["env"], "ls"))
    similar = lines(beet(library["env"], "similar", f"title:{title}"))
    assert len(similar) >= 5 and set(similar) <= set(items)  # beets' own format (the untagged items' alike)
    assert not [line for line in similar if line.endswith(f" - {title}")]
    paths = lines(beet(library["env"], "similar", "-p", f"title:{title}"))
    assert len(paths) == len(set(paths)) == len(similar) and str(seed) not in paths
    assert all(Path(path) in library["names"] for path in paths)


def test_playlists_of_the_library_are_titled_from_the_tags(library):
    tagged = [path for path, names in library["names"].items() if names]
    out = library["root"] / "mix.m3u"
    melsearch("playlist", "--workdir", str(library["work"]), "--seed", str(tagged[0]), "--n", "8", "--out", str(out))
    text = out.read_text(encoding="utf-8").splitlines()
    assert text[0] == "#EXTM3U" and len(text) == 17
    paths = [Path(line) for line in text[2::2]]
    assert len(set(paths)) == 8 and all(path.is_file() for path in paths)
    assert os.path.realpath(paths[0]) == str(tagged[0])  # the seed first (through beets' link to it)
    for extinf, path in zip(text[1::2], paths, strict=True):
        names = library["names"][Path(os.path.realpath(path))]
        title = f"{names[1]} - {names[0]}" if names else path.stem
        assert extinf.startswith("#EXTINF:") and extinf.split(",", 1)[1] == " ".join(title.split())
    start, end = tagged[0], tagged[-1]
    path = melsearch("playlist", "--workdir", str(library["work"]), "--from", str(start), "--to", str(end), "--n",
                     "6").stdout.splitlines()
    songs = [os.path.realpath(line) for line in path[2::2]]
    assert len(songs) == len(set(songs)) == 6 and songs[0] == str(start) and songs[-1] == str(end)
