"""The whole DAG on generated audio: under a real luigid, reruns, failures and SIGKILL at any stage."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import pyarrow.parquet as pq
import pytest
from helpers import FAST, ROOT, melsearch, snapshot, status

STAGE_DIRS = ("dataset", "features", "train", "embeddings", "index")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def files_of(snap: dict, stage: str) -> dict:
    return {k: v for k, v in snap.items() if k.split(os.sep)[0] == stage}


@pytest.fixture(scope="module")
def first_run(synth_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A work directory with the whole pipeline run once (local scheduler), and what that run printed."""
    workdir = tmp_path_factory.mktemp("built")
    return workdir, melsearch("run", "--audio-dir", str(synth_dir), "--workdir", str(workdir), *FAST)


@pytest.fixture(scope="module")
def built(first_run) -> Path:
    return first_run[0]


def test_a_run_says_what_it_is_doing_on_stderr(first_run):
    """Not a terminal: no bars, but a line as each stage starts and ends, with progress inside; results on stdout."""
    lines = first_run[1].stderr.splitlines()
    for stage in ("dataset", "features", "train cifar10", "embeddings cifar10", "index cifar10"):
        assert f"melsearch: {stage} started" in lines, first_run[1].stderr
        assert any(line.startswith(f"melsearch: {stage} done in ") for line in lines), first_run[1].stderr
    assert "melsearch: cifar10 epoch 6/6: train loss" in first_run[1].stderr
    assert any(line.startswith("melsearch: features shard 0: ") and " tracks (" in line for line in lines)
    assert "\r" not in first_run[1].stderr and "it/s" not in first_run[1].stderr  # no tqdm bar off a terminal
    assert first_run[1].stdout.splitlines()[0].startswith("dataset     done")


def test_whole_pipeline_outputs(built, synth_dir):
    report = status(built, "--audio-dir", str(synth_dir))
    assert all(report[stage]["done"] for stage in report), report
    # accuracy on a well-sized synthetic set is asserted in tests/pipeline/test_train.py
    assert report["train"]["outputs"][0]["figures"]["epochs_run"] == 6
    embeddings = pq.read_table(report["embeddings"]["outputs"][0]["output"])
    assert embeddings.num_rows == 24
    index = report["index"]["outputs"][0]["figures"]
    assert index["count"] == 24 and index["recall_at_10"] >= 0.98


def test_status_without_source_flags_reports_the_latest_run(built, tmp_path):
    """The FAST settings and the source are not repeated: the run's own folders are found from latest-run.json."""
    result = melsearch("status", "--workdir", str(built), "--json")
    report = json.loads(result.stdout)
    assert all(report[stage]["done"] for stage in STAGE_DIRS), report
    assert report["index"]["outputs"][0]["figures"]["count"] == 24
    assert "latest-run.json" in result.stderr
    # a work directory with no recorded run: the settings given (GTZAN by default) name what is missing
    report = json.loads(melsearch("status", "--workdir", str(tmp_path), "--json").stdout)
    assert not any(report[stage]["done"] for stage in STAGE_DIRS)


def test_tracks_lists_the_ids_query_takes(built, synth_dir):
    listed = melsearch("tracks", "--workdir", str(built)).stdout.splitlines()
    assert listed[0].split() == ["song", "label", "tags", "track_id"] and len(listed) == 1 + 24
    track_id = listed[1].split()[-1]  # the last column: the id query takes
    rows = json.loads(melsearch("tracks", "--workdir", str(built), "--json").stdout)
    first = next(row for row in rows if row["track_id"] == track_id)
    assert first["path"] == str(synth_dir / track_id) and track_id.startswith(f"{first['label']}/")  # relative ids
    answer = json.loads(melsearch("query", "--workdir", str(built), "--track", track_id, "--json", "--top-k",
                                  "3").stdout)
    assert len(answer) == 3 and track_id not in [row["track_id"] for row in answer]
    label = first["label"]
    found = json.loads(melsearch("tracks", label.upper(), "--workdir", str(built), "--json", "--limit", "2").stdout)
    assert [row["track_id"] for row in found] == [f"{label}/{label}.00000.wav", f"{label}/{label}.00001.wav"]


def test_rerun_index_then_train_recompute_only_downstream(built, synth_dir):
    args = ("run", "--audio-dir", str(synth_dir), "--workdir", str(built), *FAST)
    before = snapshot(built)
    started = time.monotonic()
    melsearch(*args)
    noop_s = time.monotonic() - started
    assert snapshot(built) == before, "a no-op rerun changed files"
    print(f"no-op rerun of the finished pipeline: {noop_s:.1f} s")

    melsearch(*args, "--rerun", "index")
    after = snapshot(built)
    for stage in ("dataset", "features", "train", "embeddings"):
        assert files_of(after, stage) == files_of(before, stage), stage
    index_files = files_of(after, "index")
    assert index_files and all(v[1] != before.get(k, (None, None))[1] for k, v in index_files.items())

    melsearch(*args, "--rerun", "train")
    again = snapshot(built)
    for stage in ("dataset", "features"):
        assert files_of(again, stage) == files_of(before, stage), stage
    for stage in ("train", "embeddings", "index"):
        changed = files_of(again, stage)
        assert changed and all(v[1] != after.get(k, (None, None))[1] for k, v in changed.items()), stage


def test_failing_task_exits_non_zero(built, synth_dir, tmp_path):
    workdir = tmp_path / "broken"
    melsearch("run", "--stage", "features", "--audio-dir", str(synth_dir), "--workdir", str(workdir), *FAST)
    merged = next(workdir.glob("features/*/features.h5"))
    merged.write_bytes(b"not hdf5")  # a damaged upstream output...
    figures = merged.parent / "figures.json"  # ...of a folder finished before figures.json recorded its files
    figures.write_text(json.dumps({k: v for k, v in json.loads(figures.read_text()).items() if k != "written"}))
    result = melsearch("run", "--stage", "train", "--audio-dir", str(synth_dir), "--workdir", str(workdir),
                       *FAST, check=False)
    assert result.returncode != 0
    assert "features.h5" in result.stderr and "Traceback" not in result.stderr
    assert "melsearch run --rerun features" in result.stderr


def _run_until(marker: str, workdir: Path, synth_dir: Path, timeout: float = 300) -> None:
    """Start a full run, SIGKILL its whole process group as soon as a path matching ``marker`` exists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "pipeline", "run", "--audio-dir", str(synth_dir), "--workdir", str(workdir),
               *FAST, "--set", "features.shard_size=4", "--set", "features.processes=1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not list(workdir.glob(marker)):
            assert process.poll() is None, "the run ended before reaching the kill point"
            assert time.monotonic() < deadline, f"{marker} never appeared"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_sigkill_during_features_then_rerun(synth_dir, tmp_path):
    workdir = tmp_path / "killed"
    _run_until("features/*/shards/shard-00001.h5", workdir, synth_dir)
    shards = sorted(workdir.glob("features/*/shards/*.h5"))
    assert not list(workdir.glob("features/*/features.h5")), "killed too late to test anything"
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    melsearch("run", "--stage", "features", "--audio-dir", str(synth_dir), "--workdir", str(workdir), *FAST,
              "--set", "features.shard_size=4", "--set", "features.processes=1")
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items()), "finished shards were recomputed"
    with h5py.File(next(workdir.glob("features/*/features.h5"))) as h5:
        ids = list(h5["track_id"].asstr()[...])
        assert len(ids) == len(set(ids)) == 24 and h5["mel"][...].shape[0] == 24
    assert not [p for p in workdir.rglob("*") if p.name.endswith(".tmp") or "luigi-tmp" in p.name]


def test_sigkill_during_training_then_resume(synth_dir, tmp_path):
    workdir = tmp_path / "killed"
    _run_until("train/*/checkpoints/last.pt", workdir, synth_dir)
    assert not list(workdir.glob("train/*/metrics.json"))
    melsearch("run", "--audio-dir", str(synth_dir), "--workdir", str(workdir), *FAST,
              "--set", "features.shard_size=4", "--set", "features.processes=1")
    history = next(workdir.glob("train/*/history.csv")).read_text().splitlines()
    epochs = [int(line.split(",")[0]) for line in history[1:]]
    assert epochs == list(range(1, 7)), history  # each epoch once: resumed, not restarted or repeated
    report = status(workdir, "--audio-dir", str(synth_dir), "--set", "features.shard_size=4")
    assert all(report[stage]["done"] for stage in report)


def test_full_pipeline_under_luigid_with_two_workers(synth_dir, tmp_path):
    workdir, port = tmp_path / "central", free_port()
    melsearch("scheduler", "start", "--workdir", str(workdir), "--port", str(port))
    pid = int((workdir / "scheduler" / "luigid.pid").read_text())
    try:
        melsearch("run", "--audio-dir", str(synth_dir), "--workdir", str(workdir), *FAST, "--workers", "2",
                  "--scheduler-url", f"http://127.0.0.1:{port}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data=%7B%7D", timeout=10) as response:
            tasks = json.loads(response.read())["response"]
        families = {task["name"] for task in tasks.values()}
        assert {"Dataset", "FeatureShard", "Features", "Train", "Embeddings", "Index", "Pipeline"} <= families
        assert all(task["status"] == "DONE" for task in tasks.values()), {k: v["status"] for k, v in tasks.items()}
    finally:
        melsearch("scheduler", "stop", "--workdir", str(workdir), "--port", str(port))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
