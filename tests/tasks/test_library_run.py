"""``run --library``: a model trained on a labelled folder indexes an unlabelled one, and reruns cost only new files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from luigi.cmdline_parser import CmdlineParser

from pipeline.embeddings import read_embeddings
from pipeline.io import file_sha256
from pipeline.layout import WorkDir
from pipeline.synth import write_synthetic_dataset
from tasks.config import configure, settings_from_flags
from tasks.library import LibraryFeatures
from tasks.pipeline import Pipeline, stage_tasks
from tasks.search import Index
from tests.tasks.helpers import FAST, melsearch, status


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Twelve unlabelled 6 s clips in one folder (symlinks, spaces, non-ASCII), a broken file, and 2 kept aside."""
    root = tmp_path_factory.mktemp("library")
    write_synthetic_dataset(root / "source", n_per_class=3, seconds=6.0, n_classes=4, seed=3)
    folder = root / "ma musique"
    folder.mkdir()
    clips = sorted((root / "source").rglob("*.wav"))
    for path in clips[:-2]:
        (folder / f"morceau é {path.name}").symlink_to(path)
    (folder / "broken.flac").write_bytes(b"fLaC" + bytes(100))
    return folder, clips[-2:]


def _library_status(workdir, synth_dir, folder):
    return status(workdir, "--audio-dir", str(synth_dir), "--library", str(folder))


def test_library_run_index_query_and_rerun(tmp_path, synth_dir, library):
    folder, kept = library
    workdir = tmp_path / "work"
    melsearch("run", "--workdir", str(workdir), "--audio-dir", str(synth_dir), "--library", str(folder), *FAST)
    first = _library_status(workdir, synth_dir, folder)
    library_features = next(e for e in first["features"]["outputs"] if e["output"].endswith("tracks.parquet"))
    assert library_features["figures"]["extracted"] == 10 and library_features["figures"]["reused"] == 0
    # broken.flac: rejected by the library's dataset stage, with its reason; the run goes on
    rejected = [f for e in first["dataset"]["outputs"] for f in e["figures"]["rejected_files"]]
    assert [f["track_id"] for f in rejected] == ["broken.flac"]
    assert first["index"]["outputs"][0]["figures"]["count"] == 10
    model_config = json.loads((workdir / first["train"]["outputs"][0]["output"] / "config.json").read_text())
    assert model_config["mel_config"]["segments"] == 10  # whole songs, for the model and its queries alike

    # a long song's vector is not its intro's: the model reads windows spread over all of it
    from pipeline.classifier import GenreClassifier

    classifier = GenreClassifier.load(workdir / first["train"]["outputs"][0]["output"])
    clips = [sf.read(path, dtype="float32")[0] for path in sorted(synth_dir.rglob("*.wav"))[::6]]
    song = np.concatenate([np.tile(clip, 8) for clip in clips])  # minutes of one class after another
    sf.write(tmp_path / "long.wav", song, 22050)
    sf.write(tmp_path / "intro.wav", song[: 4 * 22050], 22050)
    whole, intro = classifier.encode(tmp_path / "long.wav"), classifier.encode(tmp_path / "intro.wav")
    assert float(whole @ intro) < 0.99

    query = sorted(folder.glob("morceau*"))[0]
    out = melsearch("query", "--workdir", str(workdir), str(query), "--top-k", "5", "--json").stdout
    results = json.loads(out)
    assert len(results) == 5 and query.name not in {r["track_id"] for r in results}
    assert all(r["path"].startswith(str(folder)) for r in results)  # the library's index, not the source's

    for path in kept:
        shutil.copy(path, folder / f"nouveau {path.name}")
    removed = sorted(folder.glob("morceau*"))[-1]
    removed.unlink()
    melsearch("run", "--workdir", str(workdir), "--audio-dir", str(synth_dir), "--library", str(folder), *FAST)
    second = _library_status(workdir, synth_dir, folder)
    figures = next(e for e in second["features"]["outputs"] if e["output"].endswith("tracks.parquet"))["figures"]
    assert (figures["extracted"], figures["reused"], figures["tracks"]) == (2, 9, 11)
    assert second["embeddings"]["outputs"][0]["figures"]["computed"] == 2
    assert second["index"]["outputs"][0]["figures"]["count"] == 11
    ids = json.loads(melsearch("query", "--workdir", str(workdir), "--track", f"nouveau {kept[0].name}", "--top-k",
                               "10", "--json").stdout)
    assert removed.name not in {r["track_id"] for r in ids} and len(ids) == 10


def test_without_library_the_dag_is_unchanged(synth_dir, library):
    configure(settings_from_flags({}, FAST[1:-2:2]))
    plain = Pipeline(workdir="w", audio_dir=str(synth_dir))
    with_library = Pipeline(workdir="w", audio_dir=str(synth_dir), library=str(library[0]))
    plain_tasks, library_tasks = stage_tasks(plain), stage_tasks(with_library)
    assert not any(isinstance(task, LibraryFeatures) for task in plain_tasks["features"])
    assert len(library_tasks["dataset"]) == 2 and len(library_tasks["features"]) == 2
    assert plain_tasks["index"][0].key != library_tasks["index"][0].key
    # the plain Luigi form reaches the same tasks: --library is a parameter of the wrapper
    argv = ["Pipeline", "--workdir", "w", "--audio-dir", str(synth_dir), "--library", str(library[0])]
    with CmdlineParser.global_instance(argv) as parser:  # how `luigi --module tasks Pipeline ...` parses
        parsed = parser.get_task_obj()
    assert isinstance(parsed, Pipeline) and parsed.library == str(library[0])
    assert isinstance(stage_tasks(parsed)["index"][0], Index)


def test_a_long_song_gets_spread_crops(tmp_path):
    """The 10-minute song's vector is not its first 30 s's: encode reads windows over all of it."""
    from pipeline.mel import MelConfig, log_mel_for_file

    sr = 8000
    t = np.arange(60 * sr) / sr
    minute = [np.sin(2 * np.pi * (200 + 300 * i) * t) for i in range(10)]
    sf.write(tmp_path / "long.wav", (0.3 * np.concatenate(minute)).astype(np.float32), sr, subtype="PCM_16")
    sf.write(tmp_path / "intro.wav", (0.3 * minute[0][: 30 * sr]).astype(np.float32), sr, subtype="PCM_16")
    cfg = MelConfig(sr=sr, n_fft=512, hop_length=256, n_mels=48, duration_s=30.0, segments=10)
    whole, intro = log_mel_for_file(tmp_path / "long.wav", cfg)[0], log_mel_for_file(tmp_path / "intro.wav", cfg)[0]
    assert np.abs(whole - intro).mean() > 10  # dB: the later minutes are in it


def test_musicnn_indexes_a_library_alone(tmp_path, library):
    """``--library`` alone with musicnn: no labelled source, no training, and new files still cost only themselves."""
    folder = tmp_path / "bibliothèque"
    shutil.copytree(library[0], folder, symlinks=True)
    for path in folder.glob("nouveau*"):  # the module's other test may have added these
        path.unlink()
    workdir, settings = tmp_path / "work", ["--library", str(folder), "--model", "musicnn", "--set",
                                            "features.duration_s=4"]
    melsearch("run", "--workdir", str(workdir), *settings)  # offline: a GTZAN download would fail the run
    first = json.loads(melsearch("status", "--json", "--workdir", str(workdir), *settings).stdout)
    recorded = json.loads(melsearch("status", "--json", "--workdir", str(workdir)).stdout)  # no flags: the last run
    assert all(recorded[stage]["done"] for stage in recorded)
    assert recorded["features"]["outputs"][0]["output"] == first["features"]["outputs"][0]["output"]
    assert [e["output"] for e in first["dataset"]["outputs"]] == [first["dataset"]["outputs"][0]["output"]]
    model = first["train"]["outputs"][0]
    assert model["figures"] == {"model": "musicnn", "trained": False, "labels": [], "embedding_dim": 200}
    n_files = len(list(folder.glob("morceau*")))
    assert first["index"]["outputs"][0]["figures"]["count"] == n_files

    query = sorted(folder.glob("morceau*"))[0]
    results = json.loads(melsearch("query", "--workdir", str(workdir), str(query), "--top-k", "5", "--json").stdout)
    assert len(results) == 5 and query.name not in {r["track_id"] for r in results}
    vector = melsearch("encode", "--workdir", str(workdir), str(query)).stdout.split()
    assert len(vector) == 200 and abs(sum(float(v) ** 2 for v in vector) - 1) < 1e-3
    refused = melsearch("predict", "--workdir", str(workdir), str(query), check=False)
    assert refused.returncode != 0 and "cannot predict" in refused.stderr.strip().splitlines()[-1]

    weights = workdir / model["output"] / "model.pt"
    before = weights.stat().st_mtime_ns
    for path in library[1]:
        shutil.copy(path, folder / f"ajout {path.name}")
    melsearch("run", "--workdir", str(workdir), *settings)
    second = json.loads(melsearch("status", "--json", "--workdir", str(workdir), *settings).stdout)
    figures = next(e for e in second["features"]["outputs"])["figures"]
    assert (figures["extracted"], figures["reused"]) == (2, n_files)
    assert second["embeddings"]["outputs"][0]["figures"]["computed"] == 2
    assert second["index"]["outputs"][0]["figures"]["count"] == n_files + 2
    assert second["train"]["outputs"][0]["output"] == model["output"] and weights.stat().st_mtime_ns == before
    record = json.loads((workdir / "latest-run.json").read_text())
    assert set(record["dataset"]) == {"library"} and set(record["features"]) == {"library"}

    # the vectors are cached for these weights: a model retrained into the same folder does not reuse them
    cached = WorkDir(workdir).embedding_cache(weights.parent.name, file_sha256(weights))
    assert sorted((workdir / "cache").glob("embeddings-*.parquet")) == [cached]
    assert len(read_embeddings(cached)[0]) == n_files + 2


def test_a_song_replaced_with_its_mtime_set_back_is_encoded_again(tmp_path):
    """Issue 18 row 14: other bytes of the same size under the old mtime are a new version of the file, so its
    vector is computed again (it was the old song's), and only its."""
    write_synthetic_dataset(tmp_path / "source", n_per_class=2, seconds=4.0, n_classes=3, seed=5)
    clips = sorted((tmp_path / "source").rglob("*.wav"))
    folder, workdir = tmp_path / "songs", tmp_path / "work"
    folder.mkdir()
    for clip in clips[:4]:
        shutil.copy(clip, folder / clip.name)
    settings = ["--workdir", str(workdir), "--library", str(folder), "--model", "musicnn", "--set",
                "features.duration_s=4"]
    melsearch("run", *settings)
    song = folder / clips[0].name
    before = song.stat()
    shutil.copyfile(clips[-1], song)  # another class's clip: every synthetic clip has the same size
    os.utime(song, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (song.stat().st_size, song.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    melsearch("run", *settings)
    report = json.loads(melsearch("status", "--json", *settings).stdout)
    features = report["features"]["outputs"][0]["figures"]
    assert (features["extracted"], features["reused"]) == (1, 3)
    embeddings = report["embeddings"]["outputs"][0]
    assert embeddings["figures"]["computed"] == 1
    rows, vectors = read_embeddings(workdir / embeddings["output"])
    indexed = vectors[[row["track_id"] for row in rows].index(song.name)]
    fresh = np.array(melsearch("encode", "--workdir", str(workdir), str(song)).stdout.split(), dtype=np.float32)
    assert float(indexed @ fresh) > 0.99  # cosine: both unit length


QUERY_SCRIPT = """
import json, sys
from pipeline.query import MusicSearch
search = MusicSearch.load(sys.argv[1])
by_file = search.query_file(sys.argv[2], top_k=3)
print(json.dumps({"torch": "torch" in sys.modules, "by_file": [r["track_id"] for r in by_file],
                  "by_track": [r["track_id"] for r in search.query_track(sys.argv[3], top_k=3)]}))
"""


def test_a_library_song_is_queried_by_its_stored_vector_without_torch(tmp_path):
    """``query FILE`` of a file the library run embedded (same identity) answers from the stored vector: as the
    query by its track id, without importing torch; once the file changes, it is embedded afresh."""
    write_synthetic_dataset(tmp_path / "source", n_per_class=2, seconds=4.0, n_classes=3, seed=6)
    clips = sorted((tmp_path / "source").rglob("*.wav"))
    folder, workdir = tmp_path / "songs", tmp_path / "work"
    folder.mkdir()
    for clip in clips[:5]:
        shutil.copy(clip, folder / clip.name)
    melsearch("run", "--workdir", str(workdir), "--library", str(folder), "--model", "musicnn", "--set",
              "features.duration_s=4")
    song = folder / clips[0].name

    def query() -> dict:
        run = subprocess.run([sys.executable, "-c", QUERY_SCRIPT, str(workdir), str(song), song.name],
                             capture_output=True, text=True, check=True)
        return json.loads(run.stdout)

    stored = query()
    assert not stored["torch"] and stored["by_file"] == stored["by_track"] and song.name not in stored["by_file"]
    shutil.copyfile(clips[-1], song)  # another class's clip: a new version of the file
    assert query()["torch"]
