"""Issue 18 rows 7 and 16: a finished output damaged afterwards is noticed, reported and rebuilt by a plain run;
readers name the ``--rerun`` that repairs it; an interrupted ``--rerun`` resumes when run again."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from helpers import FAST, ROOT, melsearch, status

from pipeline.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def finished(synth_dir, tmp_path_factory) -> Path:
    """A work directory with the whole pipeline run once; tests damage copies of it."""
    workdir = tmp_path_factory.mktemp("finished") / "work"
    melsearch("run", "--audio-dir", str(synth_dir), "--workdir", str(workdir), *FAST)
    return workdir


@pytest.fixture
def work(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "work"))


def run(workdir: Path, synth_dir: Path, *args: str, check: bool = True):
    return melsearch("run", "--audio-dir", str(synth_dir), "--workdir", str(workdir), *FAST, *args, check=check)


def states(workdir: Path, synth_dir: Path) -> dict[str, list[str]]:
    report = status(workdir, "--audio-dir", str(synth_dir))
    return {stage: [entry["state"] for entry in report[stage]["outputs"]] for stage in report}


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_truncated_model_is_reported_then_repaired_by_a_plain_run(work, synth_dir):
    model = next(work.glob("train/*/model.pt"))
    truncate(model)
    assert states(work, synth_dir) == {"dataset": ["done"], "features": ["done"], "train": ["corrupt"],
                                       "embeddings": ["stale"], "index": ["stale"]}
    song = str(next(synth_dir.rglob("*.wav")))
    predict = melsearch("predict", song, "--workdir", str(work), check=False)
    assert predict.returncode == 1 and "Traceback" not in predict.stderr
    assert "model.pt" in predict.stderr and "melsearch run --rerun train" in predict.stderr
    assert len(predict.stderr.strip().splitlines()) == 1

    repaired = run(work, synth_dir)
    assert "train: " in repaired.stderr and "writing it again" in repaired.stderr
    assert all(state == ["done"] for state in states(work, synth_dir).values())
    assert melsearch("predict", song, "--workdir", str(work)).stdout.strip()


def test_truncated_index_names_its_rerun_and_a_plain_run_rebuilds_it(work, synth_dir):
    truncate(next(work.glob("index/*/index.ann")))
    query = melsearch("query", "--track", "buzz/buzz.00000.wav", "--workdir", str(work), check=False)
    assert query.returncode == 1 and "Traceback" not in query.stderr
    assert "index.ann" in query.stderr and "melsearch run --rerun index" in query.stderr
    assert states(work, synth_dir)["index"] == ["corrupt"]
    run(work, synth_dir)
    assert melsearch("query", "--track", "buzz/buzz.00000.wav", "--workdir", str(work), "--json").stdout


def test_damaged_embeddings_are_rebuilt_with_the_index(work, synth_dir):
    embeddings = next(work.glob("embeddings/*/embeddings.parquet"))
    truncate(embeddings)
    assert states(work, synth_dir)["embeddings"] == ["corrupt"] and states(work, synth_dir)["index"] == ["stale"]
    with pytest.raises(Exception, match=r"--rerun embeddings"):
        from pipeline.embeddings import read_embeddings

        read_embeddings(embeddings)
    index_meta = next(work.glob("index/*/meta.json"))
    before = index_meta.stat().st_mtime_ns
    run(work, synth_dir)
    assert all(state == ["done"] for state in states(work, synth_dir).values())
    assert index_meta.stat().st_mtime_ns != before  # what was built on it is rebuilt too


def test_a_garbage_shard_is_computed_again(work, synth_dir):
    shard = sorted(work.glob("features/*/shards/*.h5"))[1]
    shard.write_bytes(os.urandom(shard.stat().st_size))  # same size: only the digest tells
    assert states(work, synth_dir)["features"] == ["corrupt"]
    run(work, synth_dir)
    with h5py.File(next(work.glob("features/*/features.h5"))) as h5:
        assert len(h5["track_id"]) == 24 and float(abs(h5["mel"][...]).max()) > 0
    assert all(state == ["done"] for state in states(work, synth_dir).values())


def test_a_garbage_library_cache_part_is_decoded_again_under_rerun_train(synth_dir, tmp_path):
    library = tmp_path / "library"
    write_synthetic_dataset(library, n_per_class=2, seconds=4.0, n_classes=4, seed=9)
    workdir = tmp_path / "work"
    args = ("--library", str(library))
    run(workdir, synth_dir, *args)
    part = sorted(workdir.glob("cache/features-*/part-*.h5"))[0]
    part.write_bytes(os.urandom(part.stat().st_size))
    again = run(workdir, synth_dir, *args, "--rerun", "train", check=False)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    report = status(workdir, "--audio-dir", str(synth_dir), *args)
    library_features = next(e for e in report["features"]["outputs"] if e["output"].endswith("tracks.parquet"))
    assert library_features["figures"]["extracted"] > 0 and library_features["figures"]["tracks"] == 8
    assert report["index"]["outputs"][0]["figures"]["count"] == 8


def test_an_interrupted_rerun_train_resumes_when_run_again(work, synth_dir):
    """Row 16: ``--rerun train`` killed after its first checkpoint; the same command again resumes it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--audio-dir", str(synth_dir), "--workdir",
                                str(work), *FAST, "--rerun", "train"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:  # the record of the removed folders is written after removing them: the checkpoint after it is new
        while not ((work / ".reruns.json").is_file() and list(work.glob("train/*/checkpoints/last.pt"))):
            assert process.poll() is None, "the rerun ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not list(work.glob("train/*/metrics.json")), "killed too late to test anything"

    query = melsearch("query", "--track", "buzz/buzz.00000.wav", "--workdir", str(work), check=False)
    assert query.returncode == 1 and "being rebuilt by `melsearch run --rerun train`" in query.stderr

    resumed = run(work, synth_dir, "--rerun", "train")
    assert "resuming from" in resumed.stderr
    history = next(work.glob("train/*/history.csv")).read_text().splitlines()
    assert [int(line.split(",")[0]) for line in history[1:]] == list(range(1, 7))  # each epoch once
    assert not (work / ".reruns.json").exists()
    assert all(state == ["done"] for state in states(work, synth_dir).values())
    assert json.loads(melsearch("query", "--track", "buzz/buzz.00000.wav", "--workdir", str(work), "--json").stdout)
