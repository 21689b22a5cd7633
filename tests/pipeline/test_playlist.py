"""Playlists on the tiny index: a seed and its neighbours, a history's continuation, a song path from A to B; the
extended M3U they are written as (existing files, absolute or relative paths, non-UTF-8 names); one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_query import new_song, own_index, workdir  # noqa: F401 (fixtures: the tiny index, a clip not in it)

from pipeline.index import read_ids
from pipeline.manifest import path_from_text, path_to_text
from pipeline.playlist import format_m3u, history_playlist, seed_playlist, song_path
from pipeline.query import MusicSearch
from pipeline.server import create_app
from tasks.cli import main


@pytest.fixture(scope="module")
def search(workdir) -> MusicSearch:  # noqa: F811 (the imported fixture)
    return MusicSearch.load(workdir / "index" / "cifar10-tiny")


def read_m3u(path: Path) -> list[tuple[str, str]]:
    """(EXTINF line, path line) pairs of an extended M3U, checked to start with #EXTM3U."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#EXTM3U"
    assert all(line.startswith("#EXTINF:") for line in lines[1::2])
    return list(zip(lines[1::2], lines[2::2], strict=True))


def test_seed_playlist_cli_writes_the_seed_and_distinct_neighbours(workdir, search, tmp_path, capsys):  # noqa: F811
    seed = "buzz/buzz.00000.wav"
    out = tmp_path / "mix.m3u"
    assert main(["playlist", "--seed", seed, "--n", "8", "--out", str(out), "--workdir", str(workdir)]) == 0
    entries = read_m3u(out)
    paths = [path for _, path in entries]
    assert len(paths) == 8 and len(set(paths)) == 8
    assert all(os.path.isabs(path) and Path(path).is_file() for path in paths)
    by_path = {row["path"]: row["track_id"] for row in read_ids(workdir / "index" / "cifar10-tiny")}
    expected = [seed] + [hit["track_id"] for hit in search.query_track(seed, top_k=7)]
    assert [by_path[path] for path in paths] == expected
    assert entries[0][0] == "#EXTINF:2,buzz.00000"  # 2 s clips; no tags: the file's name is the title
    assert "wrote 8 songs" in capsys.readouterr().err


def test_seed_file_not_in_the_index_comes_first_named_by_its_tags(search, new_song, tmp_path):  # noqa: F811
    from mutagen.flac import FLAC

    song = Path(shutil.copy(new_song["flac"], tmp_path / "track01.flac"))
    tags = FLAC(song)
    tags["title"], tags["artist"] = "Low Hum", "The Drones"
    tags.save()
    entries = seed_playlist(search, song, 4)
    assert entries[0]["track_id"] is None and path_from_text(entries[0]["path"]) == str(song)
    assert [e["track_id"] for e in entries[1:]] == [hit["track_id"] for hit in search.query(song, top_k=3)]
    assert format_m3u(entries).splitlines()[1:3] == ["#EXTINF:2,The Drones - Low Hum", str(song)]


def test_the_same_audio_under_another_name_comes_once(own_index, workdir, tmp_path):  # noqa: F811
    search = MusicSearch.load(own_index, model_dir=workdir / "train" / "cifar10-tiny")
    seed = "drone/drone.00001.wav"
    neighbour = search.query_track(seed, top_k=1)[0]["track_id"]
    copy = shutil.copy(path_from_text(_path_of(search, seed)), tmp_path / "copy-of-drone.wav")
    copy_id = search.index_audio(copy)
    copy2 = shutil.copy(path_from_text(_path_of(search, neighbour)), tmp_path / "copy-of-neighbour.wav")
    copy2_id = search.index_audio(copy2)
    assert search.query_track(seed, top_k=1)[0]["track_id"] == copy_id  # the copy is the nearest song...
    ids = [e["track_id"] for e in seed_playlist(search, seed, 6)]
    assert copy_id not in ids and len(ids) == 6  # ...but the seed's audio comes once
    assert (neighbour in ids) != (copy2_id in ids)  # and so does the neighbour's
    history = [e["track_id"] for e in history_playlist(search, [seed], 5)]
    assert copy_id not in history and len(history) == 5
    path = [e["track_id"] for e in song_path(search, seed, "buzz/buzz.00000.wav", 6)]
    assert copy_id not in path and len(set(path)) == 6


def _path_of(search: MusicSearch, track: str) -> str:
    return next(row["path"] for row in search.tracks() if row["track_id"] == track)


def test_history_playlist_leaves_the_history_out(search):
    history = ["buzz/buzz.00000.wav", "drone/drone.00002.wav", "buzz/buzz.00000.wav"]
    entries = history_playlist(search, history, 6)
    ids = [e["track_id"] for e in entries]
    assert len(ids) == 6 and len(set(ids)) == 6 and not set(ids) & set(history)
    assert ids == [hit["track_id"] for hit in search.recommend(history, top_k=6)]
    assert len(history_playlist(search, history, 6, rule="centroid")) == 6


def test_song_path_goes_from_a_to_b_each_step_nearer_to_b(search):
    start, end = "buzz/buzz.00000.wav", "loose1.flac"
    ids = [e["track_id"] for e in song_path(search, start, end, 6)]
    assert ids[0] == start and ids[-1] == end and len(set(ids)) == 6
    vectors = search.vectors(ids)
    to_end = np.linalg.norm(vectors - vectors[-1], axis=1)
    assert all(np.diff(to_end) < 0), to_end  # each song nearer to B than the one before
    # each step is a small one: no longer than the direct jump from A to B
    steps = np.linalg.norm(np.diff(vectors, axis=0), axis=1)
    assert steps.max() <= to_end[0] + 1e-6
    # a file of the index names its song too
    by_file = song_path(search, path_from_text(_path_of(search, start)), end, 6)
    assert [e["track_id"] for e in by_file] == ids


def test_song_path_cli_json_and_relative_paths(workdir, tmp_path, capsys):  # noqa: F811
    out_dir = tmp_path / "lists"
    out_dir.mkdir()
    out = out_dir / "path.m3u"
    args = ["playlist", "--from", "buzz/buzz.00000.wav", "--to", "loose1.flac", "--n", "6", "--workdir",
            str(workdir)]
    assert main([*args, "--out", str(out), "--relative", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    written = [path for _, path in read_m3u(out)]
    assert all(not os.path.isabs(path) for path in written)
    assert [os.path.realpath(out_dir / path) for path in written] == [os.path.realpath(e["path"]) for e in entries]
    assert entries[0]["track_id"] == "buzz/buzz.00000.wav" and entries[-1]["track_id"] == "loose1.flac"
    assert main(args) == 0  # no --out: the playlist on stdout
    assert capsys.readouterr().out.splitlines()[0] == "#EXTM3U"


def test_a_name_that_is_not_utf8_is_written_as_its_file_uri(tmp_path):
    latin = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.wav")
    entry = {"track_id": "caf\xe9.wav", "path": path_to_text(latin), "title": "Café", "artist": "Zaz",
             "album": "", "duration_s": 181.6, "distance": 0.0}
    for relative_to in (None, tmp_path):
        text = format_m3u([entry], relative_to=relative_to)
        text.encode("utf-8")  # M3U8: valid UTF-8
        assert text.splitlines()[1:] == ["#EXTINF:182,Zaz - Café", f"file://{tmp_path}/caf%E9.wav"]
        assert path_from_text(text.splitlines()[2]) == latin  # the URI gives the file's bytes back


def test_the_page_saves_the_songs_shown_as_a_playlist(search, tmp_path):
    client = TestClient(create_app(search))
    tracks = ["drone/drone.00002.wav", *[hit["track_id"] for hit in search.query_track("drone/drone.00002.wav")]]
    response = client.get("/api/playlist.m3u", params={"track": tracks})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("audio/x-mpegurl")
    assert response.headers["content-disposition"] == 'attachment; filename="melsearch.m3u"'
    (tmp_path / "saved.m3u").write_bytes(response.content)
    paths = {row["track_id"]: row["path"] for row in search.tracks()}
    assert [path for _, path in read_m3u(tmp_path / "saved.m3u")] == [paths[track] for track in tracks]
    for params, status, message in (({}, 400, "give the songs"), ({"track": ["nope.00001"]}, 404, "unknown"),
                                    ({"track": tracks * 10}, 400, "at most 101")):
        response = client.get("/api/playlist.m3u", params=params)
        assert response.status_code == status and message in response.json()["error"]
    assert 'id="save-playlist"' in client.get("/").text


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "buzz/buzz.00000.wav", "--to", "loose1.flac", "--n", "1"], "give --n 2 or more"),
    (["--from", "buzz/buzz.00000.wav", "--n", "4"], "needs both ends"),
    (["--from", "buzz/buzz.00000.wav", "--to", "loose1.flac", "--n", "40"], "only 34 distinct songs"),
    (["--from", "buzz/buzz.00000.wav", "--to", "buzz/buzz.00000.wav"], "the same song"),
    (["--seed", "nope.00001"], "nope.00001: unknown track id"),
    (["--history", "buzz/buzz.00000.wav,nope.00001"], "nope.00001"),
    (["--seed", "buzz/buzz.00000.wav", "--out", "{tmp}/missing/mix.m3u"], "no such folder"),
])
def test_playlist_errors_are_one_line(workdir, tmp_path, capsys, args, message):  # noqa: F811
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    assert main(["playlist", *args, "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("melsearch: ") and message in err
    assert not (tmp_path / "missing").exists()


def test_an_unwritable_folder_is_one_line(workdir, tmp_path):  # noqa: F811
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root reads and writes anything without setpriv to drop that")
    # as root, drop the capabilities that let root write anywhere, so chmod 555 stops the command
    prefix = [] if os.geteuid() != 0 else ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                                          "--bounding-set=-dac_override,-dac_read_search"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    result = subprocess.run([*prefix, sys.executable, "-m", "pipeline", "playlist", "--seed", "buzz/buzz.00000.wav",
                             "--n", "3", "--out", str(locked / "mix.m3u"), "--workdir", str(workdir)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"melsearch: {locked / 'mix.m3u'}: cannot write the playlist (Permission denied)")
    assert not list(locked.iterdir())
