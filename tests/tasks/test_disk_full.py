"""A full disk during features, training or embedding: one line naming the stage and the path, no half-written output,
and the same command completes once space is freed. The work directory lies on a small tmpfs (CI runs as root;
the test is skipped where mounting is not allowed)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import FAST, melsearch, status


@pytest.fixture
def small_disk(tmp_path) -> Path:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all of ``disk``'s free space but ``leave`` bytes."""
    filler = disk / "filler"
    free = subprocess.run(["df", "--output=avail", "-B1", str(disk)], capture_output=True, text=True, check=True)
    with filler.open("wb") as out:
        out.truncate(0)
        for _ in range(max(0, int(free.stdout.split()[-1]) - leave) // 4096):
            out.write(bytes(4096))
    return filler


def test_a_full_disk_is_one_line_and_a_rerun_completes(synth_dir, small_disk):
    workdir = small_disk / "work"
    run = ("run", "--audio-dir", str(synth_dir), "--workdir", str(workdir), *FAST, "--epochs", "1")
    melsearch(*run, "--stage", "dataset")
    for stage in ("features", "train", "embeddings"):
        filler = fill(small_disk, leave=64 * 1024)
        failed = melsearch(*run, "--stage", stage, check=False)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        # one line per task that hit it (each features shard is one)
        lines = [line for line in failed.stderr.splitlines() if "no space left" in line]
        assert lines and all(re.search(rf"{stage}: no space left on device writing (under )?{workdir}/{stage}/\S+; "
                                       r"free some space and run again$", line) for line in lines), failed.stderr
        assert not list((workdir / stage).rglob("*.tmp"))  # nothing half-written is left
        assert not status(workdir, "--audio-dir", str(synth_dir), "--epochs", "1")[stage]["done"]
        filler.unlink()
        melsearch(*run, "--stage", stage)
        assert status(workdir, "--audio-dir", str(synth_dir), "--epochs", "1")[stage]["done"]
