"""Several workers on one run, as the README tells users: luigid on loopback, `melsearch worker` beside `melsearch run`.

Each process has its own cache (``MELSEARCH_CACHE``), as on two machines; the work directory is a local folder or a
bucket (moto_server on loopback, the fixtures of test_s3).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import h5py
import numpy as np
import pytest
import test_s3
from helpers import ROOT, melsearch
from test_s3 import free_port, objects

from pipeline.embeddings import read_embeddings
from pipeline.synth import write_synthetic_dataset

endpoint, bucket = test_s3.endpoint, test_s3.bucket  # its fixtures: moto_server on loopback, a bucket per test
# 96 clips of 8 s in shards of 8: the features stage of 12 shards the issue names
SHARDS = 12
SETTINGS = ["--set", "features.shard_size=8", "--set", "features.processes=1"]
# luigid drops a silent worker after 3 s (its running task failing), and a failed task is pending again after 1 s;
# a waiting worker asks again within 0.4 s. Production keeps luigi.cfg's minute-long delays.
FAST_SCHEDULER = """[scheduler]
worker_disconnect_delay = 3
retry_delay = 1
prune_on_get_work = true

[worker]
wait_interval = 0.2
wait_jitter = 0.2
"""


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """``melsearch synth DIR --per-class 16 --seconds 8``: 6 classes of 16 clips of 8 s."""
    out = tmp_path_factory.mktemp("clips")
    write_synthetic_dataset(out, n_per_class=16, seconds=8.0)
    return out


@pytest.fixture
def scheduler(tmp_path, monkeypatch) -> str:
    """A luigid on a free loopback port with FAST_SCHEDULER's delays (stopped by its pid file); its URL."""
    config = tmp_path / "luigi-test.cfg"
    config.write_text(FAST_SCHEDULER)
    monkeypatch.setenv("LUIGI_CONFIG_PATH", str(config))
    port, state = free_port(), tmp_path / "scheduler"
    melsearch("scheduler", "start", "--workdir", str(state), "--port", str(port))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        melsearch("scheduler", "stop", "--workdir", str(state), "--port", str(port))


def start(tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    """``melsearch ARGS`` in the background, with a cache of its own; its output in ``<name>.out`` / ``.err``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "MELSEARCH_CACHE": str(tmp_path / name)}
    with open(tmp_path / f"{name}.out", "w") as out, open(tmp_path / f"{name}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, stdout=out, stderr=err)


def wait_for_line(tmp_path: Path, name: str, process: subprocess.Popen, pattern: str, count: int = 1,
                  timeout: float = 120) -> None:
    """Until ``<name>.err`` holds ``count`` lines matching ``pattern``."""
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, (tmp_path / f"{name}.err").read_text())) < count:
        assert process.poll() is None, (tmp_path / f"{name}.err").read_text()[-3000:]
        assert time.monotonic() < deadline, f"{name}: no {pattern!r} in {timeout} s"
        time.sleep(0.005)


def finish(process: subprocess.Popen, tmp_path: Path, name: str, timeout: float = 120) -> str:
    """Wait for ``process``; assert it exited 0 and return its stdout."""
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    return (tmp_path / f"{name}.out").read_text()


def features_figures(workdir: str) -> dict:
    """The features figures of the run's latest record, as ``status --json`` shows them (in a bucket: from a cache
    neither process used)."""
    report = json.loads(melsearch("status", "--json", "--workdir", workdir).stdout)
    return report["features"]["outputs"][0]["figures"]


def test_a_worker_started_first_makes_shards_of_a_run_started_after(clips, scheduler, tmp_path):
    workdir = str(tmp_path / "work")
    worker = start(tmp_path, "worker", "worker", "--workdir", workdir, "--scheduler-url", scheduler)
    try:
        run = start(tmp_path, "run", "run", "--stage", "features", "--workdir", workdir, "--audio-dir", str(clips),
                    "--scheduler-url", scheduler, "--workers", "1", *SETTINGS)
        finish(run, tmp_path, "run")
    finally:
        worker.send_signal(signal.SIGTERM)  # stops once its running task is done: it has none now
    said = finish(worker, tmp_path, "worker", timeout=30)
    shards = features_figures(workdir)["shards"]
    assert [shard["shard"] for shard in shards] == list(range(SHARDS))
    assert sum(shard["tracks"] for shard in shards) == 96 and all(shard["seconds"] > 0 for shard in shards)
    makers = {shard["worker"] for shard in shards}
    assert len(makers) >= 2 and f"{os.uname().nodename}:{worker.pid}" in makers, makers
    by_worker = sorted(f"done: features shard {s['shard']}" for s in shards if s["worker"].endswith(f":{worker.pid}"))
    assert sorted(re.findall(r"done: features shard \d+", said)) == by_worker, said
    assert f"{len(by_worker)} tasks ran here" in said


def _kill_mid_shard_then_complete(workdir: str, clips: Path, scheduler: str, tmp_path: Path,
                                  shard_file: Callable[[int], bool]) -> tuple[list[dict], int, int]:
    """A worker killed (SIGKILL) as it starts its second shard; the run goes on. Returns the shards' records,
    the shard it was killed on and its pid, after checking that shard was not there when it died."""
    worker = start(tmp_path, "worker", "worker", "--workdir", workdir, "--scheduler-url", scheduler)
    run = None
    try:
        run = start(tmp_path, "run", "run", "--stage", "features", "--workdir", workdir, "--audio-dir", str(clips),
                    "--scheduler-url", scheduler, "--workers", "1", *SETTINGS)
        wait_for_line(tmp_path, "worker", worker, r"features shard \d+ started", count=2)
        worker.kill()
        worker.wait()
        killed = int(re.findall(r"features shard (\d+) started", (tmp_path / "worker.err").read_text())[-1])
        assert not shard_file(killed), "the shard was finished before the kill: not mid-shard"
        finish(run, tmp_path, "run", timeout=180)
    finally:
        for process in (worker, run):
            if process is not None and process.poll() is None:
                process.kill()
    return features_figures(workdir)["shards"], killed, worker.pid


def _check_records(shards: list[dict], killed: int, worker_pid: int) -> None:
    assert [shard["shard"] for shard in shards] == list(range(SHARDS))
    makers = {shard["worker"] for shard in shards}
    assert len(makers) == 2 and f"{os.uname().nodename}:{worker_pid}" in makers, makers  # both made shards
    assert not shards[killed]["worker"].endswith(f":{worker_pid}"), shards[killed]  # the run made it again


def test_a_worker_killed_mid_shard_leaves_nothing_half_written_and_the_run_completes(clips, scheduler, tmp_path):
    workdir = tmp_path / "work"
    shards, killed, pid = _kill_mid_shard_then_complete(
        str(workdir), clips, scheduler, tmp_path,
        lambda shard: any(workdir.glob(f"features/*/shards/shard-{shard:05d}.h5")))
    _check_records(shards, killed, pid)
    folder = next(workdir.glob("features/*/shards"))
    assert not [p for p in folder.parent.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    for path in sorted(folder.glob("shard-*.h5")):
        with h5py.File(path, "r") as h5:
            assert h5["mel"].shape[0] == 8 and h5["mel"][-1].any(), path  # every row readable, through its parts


def test_a_worker_killed_mid_shard_in_a_bucket_work_directory(clips, scheduler, bucket, tmp_path):
    workdir = f"s3://{bucket}/w"

    def in_bucket(shard: int) -> bool:
        return any(re.search(rf"/shards/shard-{shard:05d}\.(h5|json)$", key) for key in objects(bucket))

    shards, killed, pid = _kill_mid_shard_then_complete(workdir, clips, scheduler, tmp_path, in_bucket)
    _check_records(shards, killed, pid)
    keys = list(objects(bucket, "w/features/"))
    assert len([key for key in keys if re.search(r"/shards/shard-\d+\.h5$", key)]) == SHARDS
    assert len([key for key in keys if re.search(r"/shards/shard-\d+\.json$", key)]) == SHARDS
    assert not [key for key in keys if "/." in key or key.endswith(".tmp")], keys


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_worker_decodes_parts_and_embeds_batches_of_a_library_run_started_elsewhere(clips, scheduler, tmp_path,
                                                                                     where, request):
    """96 songs: two LibraryPart tasks of 64 and 32 files, then two VectorBatch tasks as large, for whichever
    process asks first; in a bucket each process reads the other's through it (their caches are their own)."""
    workdir = str(tmp_path / "work") if where == "local" else f"s3://{request.getfixturevalue('bucket')}/w"
    worker = start(tmp_path, "worker", "worker", "--workdir", workdir, "--scheduler-url", scheduler)
    try:
        run = start(tmp_path, "run", "run", "--stage", "embeddings", "--workdir", workdir, "--library", str(clips),
                    "--model", "musicnn", "--scheduler-url", scheduler, "--set", "features.processes=1",
                    "--set", "features.duration_s=4")
        finish(run, tmp_path, "run")
    finally:
        worker.send_signal(signal.SIGTERM)
    said = finish(worker, tmp_path, "worker", timeout=30)
    figures = features_figures(workdir)
    assert (figures["tracks"], figures["extracted"], figures["reused"]) == (96, 96, 0)
    assert sorted(part["files"] for part in figures["parts"]) == [32, 64]
    assert {part["worker"].split(":")[1] for part in figures["parts"]} <= {str(run.pid), str(worker.pid)}
    by_worker = [part for part in figures["parts"] if part["worker"].endswith(f":{worker.pid}")]
    assert sorted(re.findall(r"done: features \(library, (\d+) files\)", said)) == \
        sorted(str(part["files"]) for part in by_worker), said

    report = json.loads(melsearch("status", "--json", "--workdir", workdir).stdout)["embeddings"]["outputs"][0]
    assert (report["figures"]["tracks"], report["figures"]["computed"], report["figures"]["reused"]) == (96, 96, 0)
    batches = report["figures"]["batches"]
    assert sorted(batch["files"] for batch in batches) == [32, 64] and all(batch["seconds"] > 0 for batch in batches)
    assert {batch["worker"].split(":")[1] for batch in batches} <= {str(run.pid), str(worker.pid)}
    by_worker = [batch for batch in batches if batch["worker"].endswith(f":{worker.pid}")]
    assert sorted(re.findall(r"done: embeddings musicnn \(library, (\d+) files\)", said)) == \
        sorted(str(batch["files"]) for batch in by_worker), said
    # folded into the vector cache, then removed
    output = Path(report["output"])
    if where == "local":
        assert not list((tmp_path / "work" / "cache").glob("*.batches/*.parquet"))
    else:
        name = request.getfixturevalue("bucket")
        assert not [key for key in objects(name) if ".batches/" in key]
        output = tmp_path / "embeddings.parquet"
        boto3.client("s3").download_file(name, report["output"].split(f"{name}/", 1)[1], str(output))
    _, vectors = read_embeddings(output)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # every song has its vector


def test_a_worker_without_luigid_says_so_in_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = melsearch("worker", "--workdir", str(tmp_path / "work"), "--scheduler-url", url, check=False, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith(f"melsearch: {url}: no luigid answers here")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
