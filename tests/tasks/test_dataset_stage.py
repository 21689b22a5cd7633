"""The dataset stage through the command line, as a user runs it."""

import fcntl
import json

import pyarrow.parquet as pq
from conftest import add_broken_files
from helpers import melsearch, snapshot, status


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
