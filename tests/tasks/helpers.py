"""Running the CLI in a subprocess, as a user would, and snapshotting outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Root reads a chmod 000 file anyway: the prefix that drops the capabilities letting it, so such a file is unreadable
# (None where setpriv is missing; no prefix for another user, whom chmod 000 stops already)
AS_USER: list[str] | None = ([] if os.geteuid() != 0 else None if shutil.which("setpriv") is None else
                             ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                              "--bounding-set=-dac_override,-dac_read_search"])
# Small, fast settings for generated 4-s clips; a user runs the luigi.cfg defaults.
FAST = ["--set", "features.duration_s=4", "--set", "features.n_mels=64", "--set", "features.shard_size=10",
        "--set", "train.crop_s=1.5", "--set", "train.batch_size=16", "--epochs", "6"]


def melsearch(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 600,
              prefix: Sequence[str] = (), **popen) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGS`` with the project importable from any working directory, run by ``prefix``
    (as :data:`AS_USER` gives) when one is given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    result = subprocess.run([*prefix, sys.executable, "-m", "pipeline", *args], cwd=cwd or ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"melsearch {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def status(workdir: Path, *args: str) -> dict:
    """``status --json`` with the FAST settings, then ``args`` (which may override them)."""
    return json.loads(melsearch("status", "--json", "--workdir", str(workdir), *FAST, *args).stdout)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (scheduler state and locks aside): relative path -> (bytes, mtime_ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "scheduler" not in p.parts and p.name != ".lock"
    }
