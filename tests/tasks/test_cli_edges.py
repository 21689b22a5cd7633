"""Command-line edges a user hits (issue 18, rows 9-12 and 17): each does the right thing or says so in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, melsearch
from test_pipeline_e2e import free_port

SETPRIV = shutil.which("setpriv")
# root ignores file modes: drop the capabilities that let it, so a read-only folder is one
AS_USER = [SETPRIV, "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("melsearch: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("songs")
    melsearch("synth", str(folder), "--per-class", "2", "--seconds", "1", "--classes", "2")
    return folder


def test_relative_workdir_with_a_colon_works(songs, tmp_path):
    result = melsearch("run", "--stage", "dataset", "--audio-dir", str(songs), "--workdir", "rel:dir", cwd=tmp_path)
    assert "dataset     done" in result.stdout
    assert len(list((tmp_path / "rel:dir" / "dataset").glob("*/manifest.parquet"))) == 1
    report = melsearch("status", "--audio-dir", str(songs), "--workdir", "rel:dir", cwd=tmp_path).stdout
    assert report.startswith("dataset     done")


def test_workdir_that_is_a_file_is_one_line(songs, tmp_path):
    (tmp_path / "afile").write_text("a file")
    line = one_line_error(melsearch("run", "--stage", "dataset", "--audio-dir", str(songs), "--workdir",
                                    str(tmp_path / "afile"), check=False))
    assert line == f"melsearch: {tmp_path / 'afile'}: the work directory is a file, not a folder (--workdir)"


@pytest.mark.skipif(SETPRIV is None, reason="needs setpriv to drop root's capabilities")
def test_workdir_in_a_read_only_folder_is_one_line(songs, tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    command = [*AS_USER, sys.executable, "-m", "pipeline", "run", "--stage", "dataset", "--audio-dir", str(songs),
               "--workdir", str(tmp_path / "ro" / "work")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"})
    assert one_line_error(result).startswith(f"melsearch: {tmp_path / 'ro' / 'work'}: cannot write the work directory")


def test_zero_workers_is_one_line(songs, tmp_path):
    line = one_line_error(melsearch("run", "--audio-dir", str(songs), "--workdir", str(tmp_path), "--workers", "0",
                                    check=False))
    assert line == "melsearch: --workers 0: at least one worker runs the tasks"
    assert not (tmp_path / "dataset").exists()


def test_scheduler_stop_with_a_stale_pid_file_leaves_that_process_alone(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "scheduler").mkdir()
        pid_file = tmp_path / "scheduler" / "luigid.pid"
        pid_file.write_text(f"{bystander.pid}\n")
        assert melsearch("scheduler", "stop", "--workdir", str(tmp_path)).stdout.strip() == "luigid not running"
        assert bystander.poll() is None, "stop signalled a process that is not our luigid"
        assert not pid_file.exists(), "the stale pid file stays"
        # start after a crash: the stale file does not make it claim a luigid is running
        pid_file.write_text(f"{bystander.pid}\n")
        port = free_port()
        started = melsearch("scheduler", "start", "--workdir", str(tmp_path), "--port", str(port)).stdout
        try:
            assert started.startswith("luigid running") and str(bystander.pid) not in started
            assert "answering" in melsearch("scheduler", "status", "--workdir", str(tmp_path), "--port",
                                            str(port)).stdout
        finally:
            assert melsearch("scheduler", "stop", "--workdir", str(tmp_path), "--port", str(port)).stdout.startswith(
                "luigid stopped")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_help_names_every_model_and_the_command_users_type():
    from models import MODEL_NAMES

    run_help = melsearch("run", "--help").stdout
    assert all(name in run_help for name in MODEL_NAMES) and "musicnn" in run_help
    for option in ("--split", "--epochs", "--device", "--quiet"):
        text = run_help.split(option, 1)[1].split("\n  -", 1)[0]
        assert len(text.split()) > 3, f"{option} has no help text"
    assert melsearch("query", "--help").stdout.startswith("usage: melsearch query")
    assert melsearch("tracks", "--help").stdout.startswith("usage: melsearch tracks")
