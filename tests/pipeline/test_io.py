"""atomic_path: each writer's temporary path is its own; only dead writers' leftovers are removed."""

from __future__ import annotations

import subprocess
import sys

from pipeline.io import _HOST, atomic_path


def test_atomic_path_removes_only_dead_writers_leftovers(tmp_path):
    final = tmp_path / "table.parquet"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leftovers = {
            "dead": tmp_path / f".table.parquet.{_HOST}-{dead.stdout.strip()}.abc.tmp",
            "alive": tmp_path / f".table.parquet.{_HOST}-{alive.pid}.abc.tmp",
            "other host": tmp_path / ".table.parquet.0000ffff-1.abc.tmp",
        }
        for path in leftovers.values():
            (path / "table.parquet").parent.mkdir()
            (path / "table.parquet").write_text("half")
        with atomic_path(final) as tmp:
            assert tmp.parent.name.startswith(f".table.parquet.{_HOST}-")
            tmp.write_text("whole")
        assert final.read_text() == "whole"
        assert not leftovers["dead"].exists()
        assert leftovers["alive"].exists() and leftovers["other host"].exists()  # may be writing still
        assert {p.name for p in tmp_path.iterdir()} == {final.name, leftovers["alive"].name,
                                                        leftovers["other host"].name}
    finally:
        alive.kill()
        alive.wait()
