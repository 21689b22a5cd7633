"""Small file-system helpers shared by every stage: atomic writes and parameter keys."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import DiskFullError

# torch.save to a full disk says "basic_ios::clear" or "unexpected pos", np.save "N requested and M written", with
# no errno: a write that failed on a file system left with less than this is taken for a full disk
_FULL_BELOW = 16 * 2**20

def is_disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` means a full disk: errno ENOSPC or EDQUOT, or an OSError or RuntimeError on ``path``'s
    file system when that has under 16 MB free (a writer that gives no errno)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    if "No space left on device" in str(exc):
        return True
    try:
        return path is not None and shutil.disk_usage(path).free < _FULL_BELOW
    except OSError:
        return False


def params_key(params: Any, length: int = 10) -> str:
    """Short, stable hash of JSON-serialisable parameters (dict key order does not matter).

    Output folders carry it, so a changed parameter makes new outputs instead of reusing stale ones.
    """
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


# A temporary path of a writer on another machine (a shared work directory) is taken for a leftover after this long.
STALE_TMP_S = 24 * 3600
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _writer_alive(host: str, pid: str, mtime: float) -> bool:
    """Whether the writer a temporary name names (``host``, ``pid``) may still be writing it."""
    if host != _HOST or not pid.isdigit():
        return time.time() - mtime < STALE_TMP_S
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_leftovers(final: Path) -> None:
    """Remove the temporary paths of ``final`` that writers which died (killed runs) left beside it.

    Names are ``.<final name>.<host>-<pid>.<random>.tmp``: several processes may write ``final`` at once (songs
    added to one side table), so a path whose writer still runs, or may run on another machine, stays.
    """
    prefix = f".{final.name}."
    for stale in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        writer = stale.name[len(prefix):].split(".")[0]
        host, _, pid = writer.partition("-")
        try:
            alive = _writer_alive(host, pid, stale.lstat().st_mtime)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
        if not alive:
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    A crash or an exception leaves ``final`` untouched (absent or as it was) and removes the
    temporary path, so readers never see a half-written file or folder. Each writer gets a path of its
    own, and only dead writers' leftovers are cleaned up, so concurrent writers never disturb each other
    (the last rename wins).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an output folder gets the usual permissions
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        if is_dir and final.exists():
            shutil.rmtree(final)
        os.replace(target, final)
    except (OSError, RuntimeError) as exc:
        if is_disk_full(exc, tmp):
            raise DiskFullError(f"no space left on device writing {final}; free some space and run again") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
