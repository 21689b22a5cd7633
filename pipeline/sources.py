"""Getting the music in: GTZAN download from mirrors (resumable, checksummed) and safe archive extraction."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from pipeline.errors import MelsearchError
from pipeline.io import atomic_path

log = logging.getLogger(__name__)

GTZAN_MIRRORS = (
    "http://opihi.cs.uvic.ca/sound/genres.tar.gz",
    "https://web.archive.org/web/20220328223413/http://opihi.cs.uvic.ca/sound/genres.tar.gz",
    "https://huggingface.co/datasets/marsyas/gtzan/resolve/main/data/genres.tar.gz",
)
# Published digests of genres.tar.gz (torchaudio, mirdata). A mirror may serve another packing of the
# same clips: add its digest here (or pass --gtzan-sha256) once its contents are checked.
GTZAN_SHA256 = ("24347e0223d2ba798e0a558c4c172d9d4a19c00bb7963fe055d183dadb4ef2c6",)
GTZAN_MD5 = ("5b3d6dddb579ab49814ab86dba69e7c7",)

_CHUNK = 1 << 20


def download_with_resume(url: str, dest: str | os.PathLike, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest``, resuming a previous partial download with an HTTP Range request.

    Bytes accumulate in ``dest + ".part"``; it is renamed to ``dest`` only when the transfer is complete
    (length as announced by the server). A server that ignores Range gets a fresh download.

    Raises
    ------
    MelsearchError
        ``"<url>: <reason>"`` on HTTP errors, connection failures and short transfers.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "melsearch", **({"Range": f"bytes={have}-"} if have else {})}
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our partial file is already complete
            os.replace(part, dest)
            return dest
        raise MelsearchError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise MelsearchError(f"{url}: {getattr(exc, 'reason', exc)}") from exc
    with response:
        resumed = response.status == 206
        if have and not resumed:
            log.info("%s ignored the Range request; downloading from the start", url)
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        received = have
        with open(part, "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=None
        ) as bar:
            try:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
            except OSError as exc:
                raise MelsearchError(f"{url}: connection lost after {received} bytes ({exc}); run again to resume") \
                    from exc
    if total is not None and received < total:
        raise MelsearchError(f"{url}: transfer stopped at {received} of {total} bytes; run again to resume")
    os.replace(part, dest)
    return dest


def verify_checksum(path: str | os.PathLike, *, sha256: Sequence[str] = (), md5: Sequence[str] = ()) -> str:
    """Return the file's sha256 if it matches one of the accepted digests, else raise MelsearchError."""
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            for digest in digests.values():
                digest.update(block)
    got_sha, got_md5 = digests["sha256"].hexdigest(), digests["md5"].hexdigest()
    if got_sha in {s.lower() for s in sha256} or got_md5 in {m.lower() for m in md5}:
        return got_sha
    raise MelsearchError(f"{path}: checksum mismatch (sha256 {got_sha} is not one of the accepted digests)")


def fetch_gtzan(
    dest: str | os.PathLike,
    *,
    urls: Sequence[str] = GTZAN_MIRRORS,
    sha256: Sequence[str] = GTZAN_SHA256,
    md5: Sequence[str] = GTZAN_MD5,
) -> Path:
    """Get a verified ``genres.tar.gz`` at ``dest``, trying ``urls`` in order.

    A mirror that fails (network, HTTP error, wrong checksum) is logged and the next one is tried; a
    download with a wrong checksum is deleted so that nothing unverified is ever extracted.
    """
    dest = Path(dest)
    if dest.exists():
        verify_checksum(dest, sha256=sha256, md5=md5)
        return dest
    failures = []
    for url in urls:
        try:
            download_with_resume(url, dest)
            verify_checksum(dest, sha256=sha256, md5=md5)
            return dest
        except MelsearchError as exc:
            if dest.exists():
                dest.unlink()  # a complete download with a wrong digest: never keep or extract it
            log.warning("mirror failed: %s", exc)
            failures.append(str(exc))
    raise MelsearchError(
        "every GTZAN mirror failed (" + "; ".join(failures) + "). "
        "If you have the data, pass it instead: --archive genres.tar.gz or --audio-dir DIR "
        "(to index a --library without labelled music: --model musicnn)"
    )


def _unsafe_reason(
    name: str, *, is_symlink: bool = False, is_hardlink: bool = False, link_target: str = "", is_special: bool = False
) -> str:
    """Why an archive member may not be extracted ("" when it is safe)."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in pure.parts:
        return "path with '..'"
    if is_special:
        return "device, fifo or other special file"
    if is_symlink or is_hardlink:
        target = PurePosixPath(link_target.replace("\\", "/"))
        # a symlink's target is relative to its folder, a hard link's to the archive's root
        resolved = os.path.normpath(str((pure.parent if is_symlink else PurePosixPath()) / target))
        if target.is_absolute() or resolved == ".." or resolved.startswith("../"):
            return f"link pointing outside the archive ({link_target})"
    return ""


# default size budget of an extraction: what audio archives never reach (audio barely compresses), and the free
# disk it must leave; [dataset] extract_max_ratio and extract_min_free_gb set them
EXTRACT_MAX_RATIO = 4.0
EXTRACT_MIN_FREE_GB = 1.0


def _size(n: float) -> str:
    """Bytes as the user reads them: ``"3 MB"``, ``"1.2 GB"``, ``"600 B"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


class _Budget:
    """The bytes an extraction may write: ``max_ratio`` x the archive's size, and what leaves ``min_free_gb`` free."""

    def __init__(self, archive: Path, folder: Path, max_ratio: float, min_free_gb: float) -> None:
        if not (max_ratio > 0 and min_free_gb >= 0):
            raise MelsearchError(f"extract_max_ratio must be > 0 and extract_min_free_gb >= 0, "
                                 f"got {max_ratio!r} and {min_free_gb!r} ([dataset] settings)")
        size, free = archive.stat().st_size, shutil.disk_usage(folder).free
        by_ratio, by_disk = max_ratio * size, free - min_free_gb * 1e9
        self.limit = min(by_ratio, by_disk)
        self.why = (f"it expands past {_size(by_ratio)} ({max_ratio:g}x the archive's {_size(size)}; "
                    f"[dataset] extract_max_ratio)" if by_ratio <= by_disk else
                    f"it would leave less than {min_free_gb:g} GB free on the disk of {folder.parent} "
                    f"({_size(free)} free; [dataset] extract_min_free_gb)")
        self.archive = archive

    def check(self, total: int) -> None:
        """Raise MelsearchError when ``total`` bytes of files are over the budget."""
        if total > self.limit:
            raise MelsearchError(f"{self.archive}: refusing to extract: {self.why}")


@contextlib.contextmanager
def _reading(archive: Path) -> Iterator[None]:
    """A damaged archive (bad header, truncated or corrupt compressed data) as one MelsearchError."""
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise MelsearchError(f"{archive}: damaged archive ({exc})") from exc
    except OSError as exc:
        if exc.errno is not None:  # a file-system error of ours (a full disk), not of the archive's data
            raise
        raise MelsearchError(f"{archive}: damaged archive ({exc})") from exc


def _write_member(source: IO[bytes], root: Path, name: str, written: int, budget: _Budget) -> int:
    """Copy one member's bytes to ``root/name``, counted against ``budget`` before each block is written.

    Returns the extraction's byte total so far. The count does not trust the sizes the archive declares.
    """
    path = root.joinpath(*PurePosixPath(name.replace("\\", "/")).parts)
    real_root = os.path.realpath(root)
    # links inside the archive may chain so that a later member's folder lies elsewhere: write only under root
    if os.path.commonpath([real_root, os.path.realpath(path.parent)]) != real_root:
        raise MelsearchError(f"{budget.archive}: refusing member {name!r}: its folder is a link outside the archive")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()  # a later member of the same name replaces it, as tar does; never written through a link
    with source, open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), "wb") as out:
        for block in iter(lambda: source.read(_CHUNK), b""):
            written += len(block)
            budget.check(written)
            out.write(block)
    return written


def _extract_zip(archive: Path, root: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            reason = _unsafe_reason(info.filename)
            if reason:
                raise MelsearchError(f"{archive}: refusing member {info.filename!r}: {reason}")
        budget.check(sum(info.file_size for info in infos if not info.is_dir()))
        written = 0
        for info in infos:
            if info.is_dir():
                root.joinpath(*PurePosixPath(info.filename).parts).mkdir(parents=True, exist_ok=True)
            else:
                written = _write_member(zf.open(info), root, info.filename, written, budget)


def _extract_tar(archive: Path, root: Path, budget: _Budget) -> None:
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise MelsearchError(f"{archive}: not a readable tar or zip archive ({exc})") from exc
    # the "data" filter repeats the link checks inside tarfile where this Python has it (3.10.12+)
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tf:
        members, declared = [], 0
        for m in tf:  # headers one by one: one that declares too much stops the scan before its data is read
            reason = _unsafe_reason(
                m.name, is_symlink=m.issym(), is_hardlink=m.islnk(), link_target=m.linkname,
                is_special=m.isdev() or m.isfifo() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()),
            )
            if reason:
                raise MelsearchError(f"{archive}: refusing member {m.name!r}: {reason}")
            declared += m.size if m.isfile() else 0
            budget.check(declared)
            members.append(m)
        written = 0
        for m in members:
            if m.isfile():
                written = _write_member(tf.extractfile(m), root, m.name, written, budget)
            elif m.isdir():
                root.joinpath(*PurePosixPath(m.name).parts).mkdir(parents=True, exist_ok=True)
            else:  # a link: no data of its own
                tf.extract(m, root, **kwargs)


def extract_archive(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_ratio: float = EXTRACT_MAX_RATIO,
    min_free_gb: float = EXTRACT_MIN_FREE_GB,
) -> Path:
    """Extract a .tar.gz/.tgz/.tar/.zip ``archive`` into folder ``dest``, safely and atomically.

    Every member is checked before anything is written: absolute paths, ``..`` components, links that
    point outside the archive and device/fifo members make the whole archive refused. So does a size over
    the budget: the files may total at most ``max_ratio`` times the archive's size, and must leave
    ``min_free_gb`` GB (1e9 bytes) free on ``dest``'s disk. The members' declared sizes are checked first,
    then the bytes are counted again as they are written. Extraction goes to a temporary folder renamed to
    ``dest`` when complete; a refused archive leaves nothing behind.

    Raises
    ------
    MelsearchError
        ``"<archive>: refusing ..."`` or ``"<archive>: damaged archive (...)"``, one line.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise MelsearchError(f"{archive}: no such archive")
    with atomic_path(dest, is_dir=True) as tmp, _reading(archive):
        budget = _Budget(archive, tmp, max_ratio, min_free_gb)
        (_extract_zip if zipfile.is_zipfile(archive) else _extract_tar)(archive, tmp, budget)
    return dest


def audio_root(folder: str | os.PathLike) -> Path:
    """The folder whose sub-folders are the labels: descend through lone wrapper folders (``genres/``)."""
    folder = Path(folder)
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) == 1 and entries[0].is_dir():
            folder = entries[0]
        else:
            return folder


