"""Start, stop and check a ``luigid`` central scheduler on 127.0.0.1, its state under the work directory."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.errors import MelsearchError
from pipeline.layout import WorkDir

log = logging.getLogger(__name__)


def _paths(workdir: str | os.PathLike) -> dict[str, Path]:
    base = WorkDir(workdir).scheduler_dir
    return {"dir": base, "pid": base / "luigid.pid", "log": base / "logs", "state": base / "state.pickle"}


def _command_line(pid: int) -> list[str]:
    """The arguments process ``pid`` was started with ([] when it is gone or cannot be read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pid(workdir: str | os.PathLike) -> int | None:
    """The pid in the pid file when it is this work directory's luigid, else None (a stale file is removed).

    After a crash or a reboot the file may name a process that is not ours: its command line must be luigid's
    with our pid file, so that ``stop`` never signals an unrelated process.
    """
    pid_file = _paths(workdir)["pid"]
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    command = _command_line(pid)
    ours = any(Path(arg).name == "luigid" or arg.endswith("luigid") for arg in command[:3]) \
        and str(pid_file) in command
    if not ours:
        log.warning("%s: stale pid file (pid %d is not this work directory's luigid); removed", pid_file, pid)
        pid_file.unlink(missing_ok=True)
        return None
    return pid


def _responds(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data={{}}", timeout=1):
            return True
    except OSError:
        return False


def start_scheduler(workdir: str | os.PathLike, *, port: int = 8082, timeout_s: float = 30.0) -> str:
    """Start ``luigid`` in the background on 127.0.0.1:``port``; pid file, logs and state in ``<workdir>/scheduler``."""
    paths = _paths(workdir)
    if (pid := _pid(workdir)) is not None:
        return f"luigid already running (pid {pid}) at http://127.0.0.1:{port}"
    paths["log"].mkdir(parents=True, exist_ok=True)
    luigid = Path(sys.executable).with_name("luigid")
    command = [str(luigid) if luigid.exists() else "luigid", "--address", "127.0.0.1", "--port", str(port),
               "--pidfile", str(paths["pid"]), "--logdir", str(paths["log"]), "--state-path", str(paths["state"])]
    with open(paths["log"] / "luigid.out", "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    paths["pid"].write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout_s
    while not _responds(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise MelsearchError(f"luigid did not start on 127.0.0.1:{port}; see {paths['log'] / 'luigid.out'}")
        time.sleep(0.2)
    return f"luigid running (pid {process.pid}) at http://127.0.0.1:{port}"


def stop_scheduler(workdir: str | os.PathLike, *, port: int = 8082) -> str:
    """Stop the ``luigid`` started by :func:`start_scheduler`, by the pid in its pid file."""
    pid = _pid(workdir)
    if pid is None:
        return "luigid not running"
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    _paths(workdir)["pid"].unlink(missing_ok=True)
    return f"luigid stopped (pid {pid})"


def scheduler_status(workdir: str | os.PathLike, *, port: int = 8082) -> str:
    """One line: running (pid, address) or not."""
    pid = _pid(workdir)
    if pid is None:
        return "luigid not running"
    state = "answering" if _responds(port) else "not answering"
    return f"luigid running (pid {pid}) at http://127.0.0.1:{port}, {state}"
