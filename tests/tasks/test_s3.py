"""An ``s3://`` work directory against a real S3-protocol server: moto_server on 127.0.0.1, started here."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from helpers import FAST, ROOT, melsearch

from pipeline.storage import S3Store

STAGES = ("dataset", "features", "train", "embeddings", "index")
# FAST's shards of 10 tracks: 3 FeatureShard tasks for the 24 clips
SHARDS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, f"{what} did not start"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def endpoint() -> str:
    """``http://127.0.0.1:PORT`` of a moto_server started for this module, stopped by its PID."""
    port = free_port()
    server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/", process, "moto_server")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


@pytest.fixture
def bucket(endpoint, monkeypatch, tmp_path) -> str:
    """A new, empty bucket; the AWS variables (dummy credentials, the endpoint) set for this test and its children."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                        "MELSEARCH_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"melsearch-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def objects(bucket: str, prefix: str = "") -> dict[str, dict]:
    """Every object in ``bucket`` under ``prefix``: key -> listing entry."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item for page in pages for item in page.get("Contents", [])}


def finished_folders(keys: list[str]) -> set[str]:
    """``<prefix>/<stage>/<folder>`` of every figures.json in ``keys``."""
    return {key.rsplit("/", 1)[0] for key in keys if key.endswith("/figures.json")}


def first_clip(audio: Path) -> Path:
    return sorted(audio.rglob("*.wav"))[0]


# -- the store on its own --------------------------------------------------------------------------------------


def test_upload_folder_puts_figures_last_and_downloads_are_keyed_by_etag(bucket, tmp_path):
    store = S3Store(f"s3://{bucket}/w", tmp_path / "one")
    folder = store.local / "train" / "m-1"
    for name in ("figures.json", "model.pt", "checkpoints/last.pt", ".model.pt.x.tmp/model.pt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    sent, upload = [], store.client.upload_file
    store.client.upload_file = lambda path, *args: (sent.append(Path(path).name), upload(path, *args))[1]
    assert store.upload_folder(folder, last="figures.json") == 3
    assert sent[-1] == "figures.json" and sorted(sent) == ["figures.json", "last.pt", "model.pt"]
    assert store.upload_folder(folder, last="figures.json") == 1  # unchanged files are not sent again
    assert sorted(objects(bucket)) == ["w/train/m-1/checkpoints/last.pt", "w/train/m-1/figures.json",
                                       "w/train/m-1/model.pt"]

    reader = S3Store(f"s3://{bucket}/w", tmp_path / "two")
    fetched, download = [], reader.client.download_file
    reader.client.download_file = lambda b, key, path: (fetched.append(key), download(b, key, path))[1]
    target = reader.local / "train" / "m-1"
    assert reader.download_folder(target, exclude=("checkpoints",)) == 2
    assert (target / "model.pt").read_text() == "model.pt" and not (target / "checkpoints").exists()
    assert reader.download_folder(target, exclude=("checkpoints",)) == 2 and len(fetched) == 2  # cached: no GET
    (folder / "model.pt").write_text("retrained")
    store.upload_folder(folder, last="figures.json")
    reader.download_folder(target)
    assert (target / "model.pt").read_text() == "retrained" and len(fetched) == 4  # new ETag, and last.pt
    assert not reader.download(reader.local / "train" / "m-1" / "missing.json")

    store.delete(folder, first="figures.json")
    assert objects(bucket) == {}


# -- the pipeline ------------------------------------------------------------------------------------------------


def test_whole_pipeline_into_a_bucket_then_query_and_status_from_another_cache(bucket, synth_dir, tmp_path,
                                                                               monkeypatch):
    workdir = f"s3://{bucket}/w"
    melsearch("run", "--workdir", workdir, "--audio-dir", str(synth_dir), *FAST)
    keys = objects(bucket)
    assert {key.split("/")[1] for key in finished_folders(list(keys))} == set(STAGES)
    assert "w/latest-run.json" in keys
    assert not [key for key in keys if "/." in key or key.endswith(".tmp")], "temporary files uploaded"

    def versions(found: dict[str, dict]) -> dict[str, tuple]:
        return {key: (item["ETag"], item["LastModified"]) for key, item in found.items()}

    melsearch("run", "--workdir", workdir, "--audio-dir", str(synth_dir), *FAST)  # every stage done: no upload
    assert versions(objects(bucket)) == versions(keys)
    melsearch("run", "--workdir", workdir, "--audio-dir", str(synth_dir), *FAST, "--rerun", "index")
    after = objects(bucket)
    changed = {key for key, version in versions(after).items() if version != versions(keys)[key]}
    assert set(after) == set(keys) and changed and all(key.startswith("w/index/") for key in changed), changed

    missing = melsearch("status", "--workdir", f"s3://{bucket}-none/w", check=False)
    assert missing.returncode == 1 and missing.stderr.strip() == f"melsearch: s3://{bucket}-none: no such bucket " \
        "(create it first)"

    monkeypatch.setenv("MELSEARCH_CACHE", str(tmp_path / "elsewhere"))  # a machine that ran nothing
    report = json.loads(melsearch("status", "--json", "--workdir", workdir, "--audio-dir", str(synth_dir),
                                  *FAST).stdout)
    assert all(report[stage]["done"] for stage in STAGES), report
    assert report["index"]["outputs"][0]["output"].startswith(f"{workdir}/index/cifar10-")
    assert report["train"]["outputs"][0]["figures"]["epochs_run"] == 6
    clip = first_clip(synth_dir)
    result = melsearch("query", "--workdir", workdir, str(clip), "--top-k", "3", "--json")
    results = json.loads(result.stdout)
    assert len(results) == 3 and results[0]["label"] == clip.parent.name, results  # the clip itself left out
    assert "latest-run.json" in result.stderr
    assert not list((tmp_path / "elsewhere").rglob("checkpoints")), "a reader downloaded the checkpoints"
    predicted = melsearch("predict", "--workdir", workdir, str(clip), "--json")
    assert json.loads(predicted.stdout)[0]["label"] == clip.parent.name


def test_two_workers_on_two_caches_finish_one_dag_under_luigid(bucket, synth_dir, tmp_path):
    """Worker a runs up to the features, worker b the whole DAG: b trains on what a left in the bucket."""
    port = free_port()
    scheduler = tmp_path / "scheduler"
    melsearch("scheduler", "start", "--workdir", str(scheduler), "--port", str(port))
    workdir = f"s3://{bucket}/two"
    # as the README says for several machines: a worker whose next task waits on another's stays (and asks often)
    config = tmp_path / "workers.cfg"
    config.write_text("[worker]\nkeep_alive = true\nwait_interval = 0.2\nwait_jitter = 0.2\n")
    command = [sys.executable, "-m", "pipeline", "run", "-v", "--workdir", workdir, "--audio-dir", str(synth_dir),
               *FAST, "--scheduler-url", f"http://127.0.0.1:{port}"]
    workers: dict[str, subprocess.Popen] = {}
    deadline = time.monotonic() + 300
    try:
        for name, stage in (("a", "features"), ("b", "index")):  # no shared file system: a cache each
            env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "LUIGI_CONFIG_PATH": str(config),
                   "MELSEARCH_CACHE": str(tmp_path / f"cache-{name}")}
            with open(tmp_path / f"{name}.log", "w") as log:
                workers[name] = subprocess.Popen([*command, "--stage", stage], env=env, stdout=log, stderr=log)
            while name == "a" and not finished_folders(list(objects(bucket, "two/dataset/"))):
                assert workers["a"].poll() is None and time.monotonic() < deadline, "worker a made no dataset"
                time.sleep(0.1)
        for name, worker in workers.items():
            assert worker.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data=%7B%7D", timeout=10) as response:
            tasks = json.loads(response.read())["response"]
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
        melsearch("scheduler", "stop", "--workdir", str(scheduler), "--port", str(port))
    assert all(task["status"] == "DONE" for task in tasks.values()), {k: v["status"] for k, v in tasks.items()}
    ran = {name: re.findall(r" done +(\w+)\(", (tmp_path / f"{name}.log").read_text()) for name in workers}
    assert "Dataset" in ran["a"] and {"Train", "Embeddings", "Index"} <= set(ran["b"]), ran
    stages = [family for families in ran.values() for family in families if family != "Pipeline"]
    assert len(stages) == len(set(stages) - {"FeatureShard"}) + stages.count("FeatureShard"), ran  # each once
    assert stages.count("FeatureShard") == SHARDS, ran
    keys = list(objects(bucket, "two/"))
    assert {key.split("/")[1] for key in finished_folders(keys)} == set(STAGES)
    assert len([key for key in keys if re.search(r"/shards/shard-\d+\.h5$", key)]) == SHARDS
    assert list((tmp_path / "cache-b").rglob("manifest.parquet")), "worker b did not read a's dataset"


def test_sigkill_mid_training_leaves_no_finished_looking_folder_and_the_rerun_completes(bucket, synth_dir,
                                                                                         tmp_path):
    workdir = f"s3://{bucket}/k"
    mirror = tmp_path / "cache" / bucket / "k"
    args = ["run", "--workdir", workdir, "--audio-dir", str(synth_dir), *FAST]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not list(mirror.glob("train/*/checkpoints/last.pt")):  # an epoch done: mid-stage
            assert process.poll() is None, "the run ended before training"
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    keys = list(objects(bucket))
    assert {key.split("/")[1] for key in finished_folders(keys)} == {"dataset", "features"}
    assert not [key for key in keys if key.split("/")[1] in ("train", "embeddings", "index")], keys
    melsearch(*args)
    keys = list(objects(bucket))
    assert {key.split("/")[1] for key in finished_folders(keys)} == set(STAGES)
    history = next(mirror.glob("train/*/history.csv")).read_text().splitlines()
    assert [int(line.split(",")[0]) for line in history[1:]] == list(range(1, 7))  # resumed from the checkpoint


def test_a_library_run_in_a_bucket_reuses_another_machines_caches(bucket, synth_dir, tmp_path, monkeypatch):
    """Machine b adds a song to a library machine a indexed: b decodes and embeds that one song only."""
    library = tmp_path / "library"
    library.mkdir()
    clips = sorted(synth_dir.rglob("*.wav"))[::4]
    for clip in clips[:-1]:
        (library / clip.name).symlink_to(clip)
    workdir = f"s3://{bucket}/w"
    settings = ["--library", str(library), "--model", "musicnn", "--set", "features.duration_s=4"]
    melsearch("run", "--workdir", workdir, *settings)
    keys = objects(bucket)
    assert any("/cache/features-" in key for key in keys) and any("/cache/embeddings-" in key for key in keys)

    monkeypatch.setenv("MELSEARCH_CACHE", str(tmp_path / "machine-b"))
    (library / clips[-1].name).symlink_to(clips[-1])
    melsearch("run", "--workdir", workdir, *settings)
    report = json.loads(melsearch("status", "--json", "--workdir", workdir, *settings).stdout)
    features = report["features"]["outputs"][0]["figures"]
    assert (features["extracted"], features["reused"]) == (1, len(clips) - 1)
    assert report["embeddings"]["outputs"][0]["figures"]["computed"] == 1
    assert [batch["files"] for batch in report["embeddings"]["outputs"][0]["figures"]["batches"]] == [1]
    assert not [key for key in objects(bucket) if ".batches/" in key]  # folded into the vector cache, then removed
    assert report["index"]["outputs"][0]["figures"]["count"] == len(clips)

    monkeypatch.setenv("MELSEARCH_CACHE", str(tmp_path / "machine-c"))
    results = json.loads(melsearch("query", "--workdir", workdir, str(library / clips[0].name), "--top-k", "3",
                                   "--json").stdout)
    assert len(results) == 3 and clips[0].name not in {r["track_id"] for r in results}
