"""Query helper: by track id and by audio file (also mp3/flac not in the index), never the query itself,
Annoy against exact search, the side table of added songs, one-line errors and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from trained_models import TINY_MELS, tiny_paths, tiny_workdir  # the embeddings tests' tiny model, built once

from pipeline.dataset import build_manifest
from pipeline.embeddings import write_embedding_rows, write_embeddings
from pipeline.errors import MelsearchError
from pipeline.feature_shards import write_feature_shard
from pipeline.index import build_annoy_index, read_ids
from pipeline.layout import added_table_path
from pipeline.manifest import read_manifest
from pipeline.query import MusicSearch
from pipeline.synth import SYNTH_CLASSES, synth_clip
from pipeline.vectors import l2_normalise
from tasks.cli import format_table, main


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """The tiny work directory with embeddings and an index (index/cifar10-tiny)."""
    root = tiny_workdir(tmp_path_factory)
    manifest, features, model_dir = tiny_paths(root)
    embeddings = root / "embeddings" / "cifar10-tiny" / "embeddings.parquet"
    if not (root / "index" / "cifar10-tiny" / "meta.json").is_file():
        write_embeddings(manifest, features, model_dir, embeddings)
        build_annoy_index(embeddings, root / "index" / "cifar10-tiny", n_trees=10)
    return root


@pytest.fixture
def own_index(workdir, tmp_path) -> Path:
    """A copy of the index in tmp_path (its side table lands there), used with an explicit model_dir."""
    return Path(shutil.copytree(workdir / "index" / "cifar10-tiny", tmp_path / "index" / "cifar10-tiny"))


@pytest.fixture(scope="session")
def new_song(tmp_path_factory) -> dict[str, Path]:
    """A 'drone' clip that is not in the index, as flac and mp3 (different seed from the indexed clips)."""
    out = tmp_path_factory.mktemp("new")
    samples = synth_clip(SYNTH_CLASSES[0], seconds=2.0, sr=16000, rng=np.random.default_rng(99))
    sf.write(out / "song.flac", samples, 16000)
    sf.write(out / "song.mp3", samples, 16000, format="MP3", subtype="MPEG_LAYER_III")
    return {"flac": out / "song.flac", "mp3": out / "song.mp3"}


def test_query_by_own_audio_never_returns_itself_and_annoy_agrees_with_exact(workdir):
    search = MusicSearch.load(workdir)
    items = read_ids(workdir / "index" / "cifar10-tiny")
    found = 0
    for row in items:
        results = search.query(Path(row["path"]), top_k=10)
        assert len(results) == 10 and [r["rank"] for r in results] == list(range(1, 11))
        assert row["track_id"] not in {r["track_id"] for r in results}
        distances = [r["distance"] for r in results]
        assert distances == sorted(distances) and distances[0] > 0
        approx = search.query(row["track_id"], top_k=10)
        exact = search.query(row["track_id"], top_k=10, exact=True)
        assert row["track_id"] not in {r["track_id"] for r in approx + exact}
        found += len({r["track_id"] for r in approx} & {r["track_id"] for r in exact})
    assert found / (10 * len(items)) >= 0.98


def test_query_by_track_id(workdir):
    search = MusicSearch.load(workdir / "index" / "cifar10-tiny")
    items = {row["track_id"]: row for row in read_ids(workdir / "index" / "cifar10-tiny")}
    track = "drone/drone.00002.wav"
    results = search.query(track, top_k=5)
    assert len(results) == 5 and track not in [r["track_id"] for r in results]
    for r in results:
        assert set(r) == {"rank", "track_id", "label", "distance", "path", "title", "artist", "album", "track_number",
                          "duration_s", "tags"}
        assert r["title"] == Path(r["path"]).stem and r["artist"] is None and r["tags"] == []  # untagged; cifar10
        assert (r["label"], r["path"]) == (items[r["track_id"]]["label"], items[r["track_id"]]["path"])
    assert [r["track_id"] for r in results] == [r["track_id"] for r in search.query(track, top_k=5, exact=True)]
    # its own audio file gives (nearly) the same neighbours as its stored vector
    by_file = search.query(Path(items[track]["path"]), top_k=5)
    assert len({r["track_id"] for r in by_file} & {r["track_id"] for r in results}) >= 4
    # more than the index holds: everything but the query
    assert len(search.query(track, top_k=1000)) == len(items) - 1


def test_a_copy_of_an_indexed_file_is_not_its_own_neighbour(workdir, tmp_path):
    search = MusicSearch.load(workdir)
    original = next(r for r in read_ids(workdir / "index" / "cifar10-tiny") if r["track_id"] == "chime/chime.00001.wav")
    copy = Path(shutil.copy(original["path"], tmp_path / "copy.wav"))
    assert "chime/chime.00001.wav" not in [r["track_id"] for r in search.query(copy, top_k=10)]
    link = tmp_path / "link.wav"
    link.symlink_to(original["path"])
    assert "chime/chime.00001.wav" not in [r["track_id"] for r in search.query(str(link), top_k=10)]


@pytest.mark.parametrize("fmt", ["flac", "mp3"])
def test_query_by_a_file_not_in_the_index(workdir, new_song, fmt):
    results = MusicSearch.load(workdir).query(new_song[fmt], top_k=5)
    assert len(results) == 5
    # the model separates the synthetic genres: a new drone clip sounds like the indexed drones
    assert [r["label"] for r in results].count("drone") >= 3


def test_mp3_and_flac_of_one_song_embed_alike(workdir, new_song):
    search = MusicSearch.load(workdir)
    flac = search._embed_file(new_song["flac"])[0]
    mp3 = search._embed_file(new_song["mp3"])[0]
    assert np.linalg.norm(flac - mp3) < 0.1 * np.median(
        [r["distance"] for r in search.query(new_song["flac"], top_k=10)])


def test_index_audio_then_query_finds_the_added_song(workdir, own_index, new_song):
    model_dir = workdir / "train" / "cifar10-tiny"
    search = MusicSearch.load(own_index, model_dir=model_dir)
    before = len(search)
    track_id = search.index_audio(new_song["flac"], label="drone")
    assert track_id == "added/song.flac" and len(search) == before + 1
    assert added_table_path(own_index, "cifar10-tiny") == own_index.parent / "added-cifar10-tiny.parquet"
    assert added_table_path(own_index, "cifar10-tiny").is_file()
    assert search.index_audio(new_song["flac"]) == track_id  # same file: not added twice
    hits = search.query(new_song["mp3"], top_k=3)
    assert hits[0]["track_id"] == track_id and hits[0]["label"] == "drone"
    assert track_id not in [r["track_id"] for r in search.query(new_song["flac"], top_k=10)]  # itself

    # another file of the same name gets a distinct id; both persist for a freshly loaded search
    other = own_index.parent / "elsewhere" / "song.flac"
    other.parent.mkdir()
    sf.write(other, synth_clip(SYNTH_CLASSES[1], seconds=2.0, sr=16000, rng=np.random.default_rng(5)), 16000)
    second = search.index_audio(other)
    assert second.startswith("added/song-") and second.endswith(".flac") and second != track_id
    fresh = MusicSearch.load(own_index, model_dir=model_dir)
    assert len(fresh) == before + 2
    assert fresh.query(track_id, top_k=3)[0]["track_id"] != track_id
    assert second in [r["track_id"] for r in fresh.query(track_id, top_k=1000)]

    # the next build folds the side table into Annoy; the search then has no separate side rows
    build_annoy_index(workdir / "embeddings" / "cifar10-tiny" / "embeddings.parquet", own_index, n_trees=10,
                      added=added_table_path(own_index, "cifar10-tiny"))
    rebuilt = MusicSearch.load(own_index, model_dir=model_dir)
    assert len(rebuilt) == before + 2 and rebuilt._added_rows == []
    assert rebuilt.query(new_song["mp3"], top_k=1)[0]["track_id"] == track_id


def test_load_finds_the_index_of_a_workdir_by_model(workdir):
    assert MusicSearch.load(workdir, model="cifar10").index_dir == workdir / "index" / "cifar10-tiny"
    with pytest.raises(MelsearchError, match="no finished resnet_v2 index"):
        MusicSearch.load(workdir, model="resnet_v2")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_errors_are_one_line(workdir, own_index, tmp_path):
    with pytest.raises(MelsearchError, match="index") as no_index:
        MusicSearch.load(tmp_path / "empty-work")
    (tmp_path / "empty-work").mkdir()
    with pytest.raises(MelsearchError, match="no finished index") as empty:
        MusicSearch.load(tmp_path / "empty-work")
    search = MusicSearch.load(workdir)
    with pytest.raises(MelsearchError, match="unknown track id") as unknown:
        search.query("jazz.00099")
    with pytest.raises(MelsearchError, match="unknown track id"):
        search.query_track(str(read_ids(workdir / "index" / "cifar10-tiny")[0]["path"]))
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio\n" * 40)
    with pytest.raises(MelsearchError, match="not decodable") as unreadable:
        search.query(text)
    with pytest.raises(MelsearchError, match="no such file") as missing:
        search.query(str(tmp_path / "gone.wav"))
    for exc in (no_index, empty, unknown, unreadable, missing):
        one_line(exc)


def test_an_index_of_another_model_or_dimension_is_refused(workdir, tmp_path, rng):
    model_dir = workdir / "train" / "cifar10-tiny"
    # an index of 8-d vectors, said to be built by this very model
    rows = [{"track_id": f"t{i}", "path": f"/t{i}.wav", "label": "x"} for i in range(20)]
    meta = {"model": "cifar10", "model_key": "cifar10-tiny", "feature_key": "f"}
    write_embedding_rows(rows, l2_normalise(rng.standard_normal((20, 8))), tmp_path / "e8.parquet", metadata=meta)
    build_annoy_index(tmp_path / "e8.parquet", tmp_path / "index" / "eight", n_trees=2)
    with pytest.raises(MelsearchError, match="8-d vectors") as dim:
        MusicSearch.load(tmp_path / "index" / "eight", model_dir=model_dir)
    # the right dimension, but built by another model
    other = shutil.copytree(workdir / "index" / "cifar10-tiny", tmp_path / "index" / "other")
    meta_path = other / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "model_key": "cifar10-elsewhere"}))
    with pytest.raises(MelsearchError, match="built by model cifar10-elsewhere") as model:
        MusicSearch.load(other, model_dir=model_dir)
    # no model given: the default train/<model_key> is missing, said at the first file query
    lazy = MusicSearch.load(other)
    assert lazy.query("buzz/buzz.00000.wav", top_k=2)
    with pytest.raises(MelsearchError, match="cifar10-elsewhere.*not here") as absent:
        lazy.query(Path(read_ids(other)[0]["path"]))
    for exc in (dim, model, absent):
        one_line(exc)


def test_main_prints_a_table_or_json(workdir, new_song, capsys):
    assert main(["query", str(new_song["flac"]), "--workdir", str(workdir), "--top-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "song", "label", "distance", "tags", "track_id"] and len(lines) == 5
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3", "4"]

    index_dir = workdir / "index" / "cifar10-tiny"
    assert main(["query", "--track", "buzz/buzz.00003.wav", "--index-dir", str(index_dir), "--json", "--exact"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 10 and "buzz/buzz.00003.wav" not in [r["track_id"] for r in results]
    assert results == MusicSearch.load(index_dir).query("buzz/buzz.00003.wav", exact=True)
    # untagged files of a model without tags: the song is its file name, "-" its tags, the id last
    assert format_table(results).splitlines()[1].split()[1:] == [Path(results[0]["path"]).stem, results[0]["label"],
                                                                  f"{results[0]['distance']:.4f}", "-",
                                                                  results[0]["track_id"]]


@pytest.mark.parametrize("args, message", [
    (["--track", "nope.00000"], "unknown track id"),
    (["{tmp}/gone.flac"], "no such file"),
    (["{tmp}/notes.wav"], "not decodable"),
    (["--track", "x", "--workdir", "{tmp}"], "no finished index"),
])
def test_main_errors_exit_1_with_one_line(workdir, tmp_path, capsys, args, message):
    (tmp_path / "notes.wav").write_text("not audio " * 100)
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--workdir" not in argv:
        argv += ["--workdir", str(workdir)]
    assert main(["query", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err
    assert captured.err.startswith("melsearch: ")


def test_a_usage_error_is_one_line_too(workdir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["query", "--track", "buzz/buzz.00000.wav", "--top-k", "0", "--workdir", str(workdir)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == "melsearch: argument --top-k: must be at least 1, got 0 (see melsearch query --help)\n"


def test_python_dash_m_pipeline_is_the_melsearch_command(workdir):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "pipeline", "query", "--track", "whistle/whistle.00001.wav",
                           "--workdir", str(workdir), "--json", "--top-k", "2"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["rank"] for r in json.loads(done.stdout)] == [1, 2]


def test_real_clips_never_return_themselves_and_an_mp3_transcode_works(workdir, real_audio_dir, tmp_path):
    # the real GTZAN clips indexed with the tiny model's settings (first 2 s of each), embedded by that model
    manifest, features = tmp_path / "manifest.parquet", tmp_path / "features.h5"
    build_manifest(real_audio_dir, manifest, workers=1)
    rows = read_manifest(manifest, status="ok")
    write_feature_shard([(r["track_id"], r["path"]) for r in rows], features, TINY_MELS, workers=1)
    model_dir = workdir / "train" / "cifar10-tiny"
    write_embeddings(manifest, features, model_dir, tmp_path / "embeddings" / "e.parquet")
    figures = build_annoy_index(tmp_path / "embeddings" / "e.parquet", tmp_path / "index" / "real")
    assert figures["count"] == len(rows) >= 20 and figures["recall_at_10"] >= 0.98
    search = MusicSearch.load(tmp_path / "index" / "real", model_dir=model_dir)
    for row in rows:
        results = search.query(Path(row["path"]), top_k=10)
        assert len(results) == 10 and row["track_id"] not in [r["track_id"] for r in results]
    samples, sr = sf.read(rows[0]["path"], frames=5 * 22050)
    sf.write(tmp_path / "clip.mp3", samples, sr, format="MP3", subtype="MPEG_LAYER_III")
    results = search.query(tmp_path / "clip.mp3", top_k=5)
    assert len(results) == 5 and all(r["label"] for r in results)


ADDER = """
import json, sys, time
from pathlib import Path
from pipeline.query import MusicSearch

workdir, go, clips = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
search = MusicSearch.load(workdir)
search.classifier  # loaded before the start, so the three processes add at the same moments
while not go.exists():
    time.sleep(0.01)
print(json.dumps([search.index_audio(clip) for clip in clips]))
"""


def test_three_processes_adding_songs_at_once_lose_none(workdir, tmp_path):
    """Issue 18 row 6: three scripts add 10 songs each to one finished work directory at the same time."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    work = tmp_path / "work"
    shutil.copytree(workdir / "index" / "cifar10-tiny", work / "index" / "cifar10-tiny")
    shutil.copytree(workdir / "train" / "cifar10-tiny", work / "train" / "cifar10-tiny")
    clips = {}
    for writer in range(3):  # the same file names in each folder: the side table must tell them apart
        for i in range(10):
            path = tmp_path / f"from{writer}" / f"song{i}.wav"
            path.parent.mkdir(exist_ok=True)
            sf.write(path, synth_clip(SYNTH_CLASSES[i % 4], seconds=2.0, sr=16000,
                                      rng=np.random.default_rng(100 * writer + i)), 16000)
            clips.setdefault(writer, []).append(str(path))
    go = tmp_path / "go"
    adders = [subprocess.Popen([sys.executable, "-c", ADDER, str(work), str(go), *clips[writer]], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for writer in range(3)]
    go.touch()
    outcomes = [adder.communicate(timeout=300) for adder in adders]
    assert [adder.returncode for adder in adders] == [0, 0, 0], [err[-2000:] for _, err in outcomes]
    added = [track for out, _ in outcomes for track in json.loads(out)]
    assert len(set(added)) == 30

    search = MusicSearch.load(work)
    assert {row["track_id"] for row in search.tracks()} >= set(added)
    for track in added:
        assert search.query(track, top_k=3)
    assert not list((work / "index").glob(".*.tmp"))
    done = subprocess.run([sys.executable, "-m", "pipeline", "query", "--track", added[-1], "--workdir", str(work),
                           "--json", "--top-k", "2"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len(json.loads(done.stdout)) == 2, done.stderr


def test_a_tag_filter_on_an_index_without_tags_is_one_line(workdir):
    search = MusicSearch.load(workdir / "index" / "cifar10-tiny")
    assert search.tag_names == [] and all(song["tags"] == [] for song in search.tracks())
    for ask in (lambda: search.query("drone/drone.00002.wav", tag="rock"), lambda: search.find_tracks(tag="rock"),
                lambda: search.recommend(["drone/drone.00002.wav"], tag="rock")):
        with pytest.raises(MelsearchError, match="has no tags: its model cifar10-tiny predicts none") as exc:
            ask()
        one_line(exc)
