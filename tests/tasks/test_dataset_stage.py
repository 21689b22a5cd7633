"""The dataset stage through the command line, as a user runs it."""

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import ArchiveServer, add_broken_files, make_genres_tar, make_zero_bomb
from helpers import AS_USER, ROOT, melsearch, snapshot, status

needs_a_user = pytest.mark.skipif(AS_USER is None, reason="root needs setpriv to be refused a chmod 000 entry")


def test_dataset_stage_on_real_clips_with_broken_files(real_audio_dir, copy_tree, tmp_path):
    audio = copy_tree(real_audio_dir)
    broken = add_broken_files(audio)
    workdir = tmp_path / "work"
    result = melsearch("run", "--stage", "dataset", "--audio-dir", str(audio), "--workdir", str(workdir))
    assert "manifest.parquet" in result.stdout
    report = status(workdir, "--audio-dir", str(audio))["dataset"]
    assert report["done"]
    entry = report["outputs"][0]
    assert entry["figures"]["ok"] == 30 and entry["figures"]["rejected"] == 3
    rows = {r["path"]: r for r in pq.read_table(entry["output"]).to_pylist()}
    for path in broken.values():
        assert rows[str(path)]["status"] == "rejected" and rows[str(path)]["reason"]
    real = [r for r in rows.values() if r["status"] == "ok"]
    assert all(r["label"] == r["track_id"].split(".")[0] and r["split"] in ("train", "valid", "test") for r in real)


def test_rerun_does_no_work_and_a_second_run_is_refused(synth_dir, tmp_path):
    workdir = tmp_path / "work"
    args = ("run", "--stage", "dataset", "--audio-dir", str(synth_dir), "--workdir", str(workdir))
    melsearch(*args)
    before = snapshot(workdir)
    melsearch(*args)
    assert snapshot(workdir) == before  # same bytes, same mtimes
    with open(workdir / ".lock", "a+") as held:  # as a running melsearch holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = melsearch(*args, "--rerun", "dataset", check=False)
    assert second.returncode == 1 and "another melsearch run" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert snapshot(workdir) == before


def test_bad_source_is_one_line_and_non_zero(tmp_path):
    (tmp_path / "empty").mkdir()
    result = melsearch("run", "--stage", "dataset", "--audio-dir", str(tmp_path / "empty"),
                       "--workdir", str(tmp_path / "w"), check=False)
    assert result.returncode != 0
    assert "no audio files found" in result.stderr and "Traceback" not in result.stderr
    assert json.loads(melsearch("status", "--json", "--workdir", str(tmp_path / "w"), "--audio-dir",
                                str(tmp_path / "empty")).stdout)["dataset"]["done"] is False


def test_gtzan_download_through_the_cli_then_archive_source(tmp_path):
    archive = make_genres_tar(tmp_path / "genres.tar.gz", genres=("blues", "jazz", "rock"), per_genre=2)
    server = ArchiveServer({"/genres.tar.gz": archive.read_bytes()})
    try:
        sha = hashlib.sha256(archive.read_bytes()).hexdigest()
        workdir = tmp_path / "work"
        dead = "http://127.0.0.1:9/genres.tar.gz"  # refused at once: the next mirror is tried
        melsearch("run", "--stage", "dataset", "--workdir", str(workdir), "--gtzan-url", dead,
                  "--gtzan-url", server.url + "/genres.tar.gz", "--gtzan-sha256", sha)
        wrong = melsearch("run", "--stage", "dataset", "--workdir", str(tmp_path / "w2"),
                          "--gtzan-url", server.url + "/genres.tar.gz", "--gtzan-sha256", "0" * 64, check=False)
    finally:
        server.close()
    assert (workdir / "downloads" / "genres.tar.gz").read_bytes() == archive.read_bytes()
    rows = pq.read_table(next(workdir.glob("dataset/*/manifest.parquet"))).to_pylist()
    assert sorted(r["track_id"] for r in rows) == [f"{g}.0000{i}" for g in ("blues", "jazz", "rock") for i in (0, 1)]
    assert all(r["status"] == "ok" and r["path"].endswith(".au") for r in rows)
    assert wrong.returncode == 1 and "checksum mismatch" in wrong.stderr
    assert not list((tmp_path / "w2").glob("dataset/*/audio")) and not list((tmp_path / "w2").glob("downloads/*.gz"))

    local = tmp_path / "local"
    melsearch("run", "--stage", "dataset", "--workdir", str(local), "--archive", str(archive))
    assert pq.read_table(next(local.glob("dataset/*/manifest.parquet"))).num_rows == 6


def test_plain_luigi_command_reads_luigi_cfg_and_exits_non_zero_on_failure(synth_dir, tmp_path):
    """`luigi --module tasks ...` from the project folder: [retcode] makes a failed task exit non-zero,
    and every key of luigi.cfg is one Luigi 3.8 reads (no UnconsumedParameterWarning)."""
    luigi = [sys.executable, "-c", "import sys, luigi.cmdline; sys.exit(luigi.cmdline.luigi_run())"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "empty").mkdir()
    failed = subprocess.run([*luigi, "--module", "tasks", "Dataset", "--workdir", str(tmp_path / "w"), "--audio-dir",
                             str(tmp_path / "empty"), "--local-scheduler"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 30, failed.stderr[-2000:]  # [retcode] task_failed
    ok = subprocess.run([*luigi, "--module", "tasks", "Dataset", "--workdir", str(tmp_path / "w"), "--audio-dir",
                         str(synth_dir), "--dataset-split", "random", "--local-scheduler"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "UnconsumedParameterWarning" not in failed.stderr + ok.stderr
    rows = pq.read_table(next((tmp_path / "w").glob("dataset/*/manifest.parquet"))).to_pylist()
    assert {r["split"] for r in rows} == {"train", "valid", "test"} and len(rows) == 24


def test_an_archive_bomb_is_one_line_and_leaves_the_work_directory_small(tmp_path):
    bomb = make_zero_bomb(tmp_path / "bomb.tar.gz", 200_000_000)
    workdir = tmp_path / "work"
    refused = melsearch("run", "--stage", "dataset", "--archive", str(bomb), "--workdir", str(workdir), check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    lines = [line for line in refused.stderr.splitlines() if "refusing" in line]
    assert len(lines) == 1 and re.fullmatch(rf"ERROR luigi-interface: {re.escape(str(bomb))}: refusing to extract: "
                                            r"it expands past [\d.]+ [kM]B \(4x the archive's [\d.]+ [kM]B; "
                                            r"\[dataset\] extract_max_ratio\)", lines[0]), lines
    assert sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file()) < 1_000_000
    # the other limit, set on the command line
    archive = make_genres_tar(tmp_path / "genres.tar.gz")
    full = melsearch("run", "--stage", "dataset", "--archive", str(archive), "--workdir", str(workdir),
                     "--dataset-extract-min-free-gb", "1000000", check=False)
    assert full.returncode == 1 and "[dataset] extract_min_free_gb" in full.stderr and "Traceback" not in full.stderr
    assert not list(workdir.glob("dataset/*/*audio*"))


def dataset_as_user(audio, workdir) -> tuple[dict[str, dict], str]:
    """``run --stage dataset`` then ``status`` as a user whom chmod 000 stops: the manifest's rows by track id and
    the run's stderr (both commands exit 0 with no traceback, and status finds the stage done)."""
    source = ["--audio-dir", str(audio), "--workdir", str(workdir)]
    run = melsearch("run", "--stage", "dataset", *source, prefix=AS_USER)
    report = melsearch("status", "--json", *source, prefix=AS_USER)
    assert "Traceback" not in run.stderr + report.stderr, run.stderr + report.stderr
    dataset = json.loads(report.stdout)["dataset"]
    assert dataset["done"]
    return {row["track_id"]: row for row in pq.read_table(dataset["outputs"][0]["output"]).to_pylist()}, run.stderr


@needs_a_user
def test_an_unreadable_file_is_a_rejected_row_until_it_may_be_read(synth_dir, copy_tree, tmp_path):
    """Issue 18 row 2: a chmod 000 file is a rejected row with its reason, warned about once; the stage goes on."""
    audio = copy_tree(synth_dir)
    locked = audio / "drone" / "drone.00001.wav"
    locked.chmod(0)
    rows, stderr = dataset_as_user(audio, tmp_path / "work")
    assert (rows["drone/drone.00001.wav"]["status"], rows["drone/drone.00001.wav"]["reason"]) == (
        "rejected", "cannot be read (Permission denied)")
    assert sum(row["status"] == "ok" for row in rows.values()) == 23
    assert stderr.count(f"rejected {locked}: ") == 1
    locked.chmod(0o644)  # the next run sees the change, and reads it
    rows, _ = dataset_as_user(audio, tmp_path / "work")
    assert sum(row["status"] == "ok" for row in rows.values()) == 24


@needs_a_user
def test_an_unreadable_folder_is_one_rejected_row_until_it_may_be_listed(synth_dir, copy_tree, tmp_path):
    """Issue 18 row 3: a folder that cannot be listed is one rejected row naming it, warned about once."""
    audio = copy_tree(synth_dir)
    hidden = audio / "drone" / "b-sides"
    hidden.mkdir()
    for path in sorted((audio / "drone").glob("*.wav"))[:2]:
        path.rename(hidden / path.name)
    hidden.chmod(0)
    rows, stderr = dataset_as_user(audio, tmp_path / "work")
    assert (rows["drone/b-sides"]["status"], rows["drone/b-sides"]["reason"]) == (
        "rejected", "folder cannot be listed (Permission denied)")
    assert len(rows) == 23 and sum(row["status"] == "ok" for row in rows.values()) == 22
    assert stderr.count(f"rejected {hidden}: ") == 1
    hidden.chmod(0o755)
    rows, _ = dataset_as_user(audio, tmp_path / "work")
    assert len(rows) == 24 and rows["drone/b-sides/drone.00000.wav"]["status"] == "ok"
    audio.chmod(0)  # the top folder itself: nothing to run on, said in one line
    refused = melsearch("run", "--stage", "dataset", "--audio-dir", str(audio), "--workdir", str(tmp_path / "work"),
                        prefix=AS_USER, check=False)
    assert (refused.returncode, refused.stderr) == (1, f"melsearch: {audio}: cannot list this folder, permission "
                                                       "denied (--audio-dir)\n")
