"""A work directory in S3-protocol object storage (``s3://BUCKET/PREFIX``), mirrored in a local cache.

Every stage reads and writes files in the mirror, ``$MELSEARCH_CACHE/<bucket>/<prefix>`` (default
``~/.cache/melsearch/...``), exactly as it would in a local work directory; :class:`S3Store` moves them:

- :meth:`S3Store.upload_folder` puts a finished stage folder in the bucket with one named file (the
  stage's ``figures.json``) last, so the bucket never holds a finished-looking half folder. Each object is
  one PUT: a reader never sees half an object.
- :meth:`S3Store.download` and :meth:`S3Store.download_folder` fetch objects into the mirror, skipping
  those whose cached copy has the object's ETag (recorded in ``<mirror>/.etags/``).

The endpoint is ``AWS_ENDPOINT_URL``, else ``endpoint_url`` in Luigi's ``[s3]`` config section (the one
``luigi.contrib.s3.S3Target`` reads), else AWS; credentials and region come from boto3's usual chain.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import MelsearchError

log = logging.getLogger(__name__)

SCHEME = "s3://"
ETAGS_DIR = ".etags"
# the S3 API deletes at most this many keys per request
_DELETE_BATCH = 1000


def is_remote(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir`` names a bucket (``s3://...``) rather than a local folder."""
    return isinstance(workdir, str) and workdir.startswith(SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> ``(BUCKET, PREFIX)`` (the prefix without slashes at either end)."""
    bucket, _, prefix = uri[len(SCHEME):].partition("/")
    if not uri.startswith(SCHEME) or not bucket:
        raise MelsearchError(f"{uri}: not an s3://BUCKET/PREFIX work directory")
    return bucket, prefix.strip("/")


def cache_dir() -> Path:
    """Where buckets are mirrored: ``$MELSEARCH_CACHE``, else ``~/.cache/melsearch``."""
    return Path(os.environ.get("MELSEARCH_CACHE") or Path.home() / ".cache" / "melsearch").expanduser()


def client_options() -> dict[str, Any]:
    """boto3 client options: the endpoint from ``AWS_ENDPOINT_URL`` (the ``melsearch`` command sets it from
    ``luigi.cfg``'s ``[s3] endpoint_url`` when only that is given, so this client and Luigi's agree)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return {"endpoint_url": endpoint} if endpoint else {}


def _in_group(member: Path, path: Path) -> bool:
    """Whether ``member`` is ``path`` or named after it beside it (``<path>.<more>``, or under such a folder)."""
    try:
        first = member.relative_to(path.parent).parts[0]
    except ValueError:
        return False
    return (first == path.name or first.startswith(f"{path.name}.")) and not first.endswith(".tmp")


@dataclass(frozen=True)
class RemoteObject:
    """One object in a listing: its ETag, size and last-modified time (seconds since the epoch)."""

    etag: str
    size: int
    modified: float


class S3Store:
    """One ``s3://BUCKET/PREFIX`` work directory and its local mirror ``local``.

    Every method takes paths in the mirror (``local / "train/cifar10-1a2b/model.pt"``) and maps them to
    keys (``PREFIX/train/cifar10-1a2b/model.pt``). The boto3 client is made per process, on first use
    (Luigi's workers are forked processes; a client must not cross a fork).
    """

    def __init__(self, uri: str, cache: str | os.PathLike | None = None) -> None:
        self.bucket, self.prefix = split_uri(uri)
        self.uri = f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")
        self.local = Path(cache or cache_dir()) / self.bucket / self.prefix
        self._client: Any = None
        self._client_pid = -1

    @property
    def client(self) -> Any:
        if self._client is None or self._client_pid != os.getpid():
            import boto3  # only a bucket work directory needs it

            self._client, self._client_pid = boto3.client("s3", **client_options()), os.getpid()
        return self._client

    # -- names --------------------------------------------------------------------------------------------

    def key(self, path: str | os.PathLike) -> str:
        """The object key of ``path`` in the mirror."""
        try:
            relative = Path(path).relative_to(self.local).as_posix()
        except ValueError:
            raise MelsearchError(f"{path}: not in the local mirror {self.local} of {self.uri}") from None
        relative = "" if relative == "." else relative
        return "/".join(part for part in (self.prefix, relative) if part)

    def uri_of(self, path: str | os.PathLike) -> str:
        """``s3://BUCKET/KEY`` of ``path`` in the mirror."""
        return f"{SCHEME}{self.bucket}/{self.key(path)}"

    def _path(self, key: str) -> Path:
        return self.local / key[len(self.prefix):].lstrip("/") if self.prefix else self.local / key

    # -- reading the bucket -------------------------------------------------------------------------------

    def check_bucket(self) -> None:
        """Raise MelsearchError, naming the bucket, when it does not exist or cannot be reached."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                raise MelsearchError(f"{SCHEME}{self.bucket}: no such bucket (create it first)") from None
            raise self._error(exc, "") from None
        except self._errors() as exc:
            raise self._error(exc, "") from None

    def exists(self, path: str | os.PathLike) -> bool:
        """Whether the object of ``path`` (a file in the mirror) is in the bucket."""
        return self._head(self.key(path)) is not None

    def listing(self, folder: str | os.PathLike) -> dict[Path, RemoteObject]:
        """Every object under ``folder`` in the bucket, by its path in the mirror."""
        prefix = self.key(folder)
        prefix = f"{prefix}/" if prefix else ""
        found: dict[Path, RemoteObject] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found[self._path(item["Key"])] = RemoteObject(item["ETag"], item["Size"],
                                                                  item["LastModified"].timestamp())
        except self._errors() as exc:
            raise self._error(exc, prefix) from None
        return found

    # -- downloads ----------------------------------------------------------------------------------------

    def download(self, path: str | os.PathLike, etag: str | None = None) -> bool:
        """Fetch ``path``'s object into the mirror unless the cached copy has its ETag; False when there is none.

        ``etag``: the object's, when a listing already said it (saves a request).
        """
        path = Path(path)
        if etag is None:
            head = self._head(self.key(path))
            if head is None:
                return False
            etag = head["ETag"]
        if self._cached_etag(path) == etag:
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        # a temporary name beside it, then one rename: a reader (or a kill) never meets half a download
        handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        try:
            self.client.download_file(self.bucket, self.key(path), tmp)
            os.replace(tmp, path)
        except self._errors() as exc:
            raise self._error(exc, self.key(path)) from None
        finally:
            Path(tmp).unlink(missing_ok=True)
        self._record_etag(path, etag)
        log.debug("downloaded %s", self.uri_of(path))
        return True

    def download_folder(self, folder: str | os.PathLike, *, exclude: tuple[str, ...] = ()) -> int:
        """Fetch every object under ``folder`` (but sub-folders named in ``exclude``); return how many there are."""
        folder = Path(folder)
        objects = {path: obj for path, obj in self.listing(folder).items()
                   if not set(path.relative_to(folder).parts[:-1]) & set(exclude)}
        for path, obj in objects.items():
            self.download(path, obj.etag)
        return len(objects)

    def download_group(self, path: str | os.PathLike) -> bool:
        """Fetch ``path`` and the objects named after it beside it (see :meth:`upload_group`); False if none."""
        path = Path(path)
        objects = {p: obj for p, obj in self.listing(path.parent).items() if _in_group(p, path)}
        for member, obj in objects.items():
            self.download(member, obj.etag)
        return path in objects

    # -- uploads ------------------------------------------------------------------------------------------

    def upload(self, path: str | os.PathLike) -> None:
        """Put ``path`` (a file in the mirror) in the bucket as one object."""
        path = Path(path)
        key = self.key(path)
        try:
            self.client.upload_file(str(path), self.bucket, key)
            etag = self.client.head_object(Bucket=self.bucket, Key=key)["ETag"]
        except self._errors() as exc:
            raise self._error(exc, key) from None
        self._record_etag(path, etag)
        log.debug("uploaded %s", self.uri_of(path))

    def upload_group(self, path: str | os.PathLike) -> None:
        """Put ``path`` in the bucket after the files named after it beside it (``<name>.*``, or under such a
        folder: the parts an HDF5 virtual dataset maps), so that ``path`` is there only once all of them are."""
        path = Path(path)
        members = sorted(p for p in path.parent.glob(f"{glob.escape(path.name)}.*/**/*") if p.is_file()) + \
            sorted(p for p in path.parent.glob(f"{glob.escape(path.name)}.*") if p.is_file())
        for member in [m for m in members if _in_group(m, path)] + [path]:
            self.upload(member)

    def upload_folder(self, folder: str | os.PathLike, *, last: str = "") -> int:
        """Put every file under ``folder`` in the bucket, the file named ``last`` (if any) after all others.

        Temporary and hidden files (a name starting with ``.``) stay local. A file whose object is already
        there (same ETag as recorded at its last transfer, file unchanged since) is not sent again.
        Returns the number of files sent.
        """
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        remote = self.listing(folder)
        final = [p for p in files if p == folder / last]
        sent = 0
        for path in [p for p in files if p != folder / last] + final:
            if path in remote and self._cached_etag(path) == remote[path].etag and path not in final:
                continue
            self.upload(path)
            sent += 1
        log.info("uploaded %d files of %s", sent, self.uri_of(folder))
        return sent

    # -- removal ------------------------------------------------------------------------------------------

    def delete(self, path: str | os.PathLike, *, first: str = "") -> None:
        """Remove ``path``'s object, or every object under the folder ``path``: the one named ``first`` first.

        ``first`` goes in a request of its own, so a kill mid-removal leaves no finished-looking folder.
        """
        path = Path(path)
        keys = [self.key(p) for p in self.listing(path)] or [self.key(path)]
        leading = [k for k in keys if first and k == self.key(path / first)]
        rest = [k for k in keys if k not in leading]
        try:
            for batch in [leading] + [rest[i:i + _DELETE_BATCH] for i in range(0, len(rest), _DELETE_BATCH)]:
                if batch:
                    self.client.delete_objects(Bucket=self.bucket,
                                               Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        except self._errors() as exc:
            raise self._error(exc, self.key(path)) from None
        log.info("removed %s from the bucket", self.uri_of(path))

    # -- helpers ------------------------------------------------------------------------------------------

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(exc, key) from None
        except self._errors() as exc:
            raise self._error(exc, key) from None

    @staticmethod
    def _errors() -> tuple[type[Exception], ...]:
        from botocore.exceptions import BotoCoreError, ClientError

        return BotoCoreError, ClientError

    def _error(self, exc: Exception, key: str) -> MelsearchError:
        return MelsearchError(f"{SCHEME}{self.bucket}/{key}: {exc}")

    def _etag_record(self, path: Path) -> Path:
        return self.local / ETAGS_DIR / f"{path.relative_to(self.local).as_posix()}.json"

    def _cached_etag(self, path: Path) -> str | None:
        """The ETag recorded at ``path``'s last transfer, if the file is still as it was then."""
        try:
            record = json.loads(self._etag_record(path).read_text())
            stat = path.stat()
        except (OSError, ValueError):
            return None
        return record.get("etag") if [stat.st_size, stat.st_mtime_ns] == record.get("file") else None

    def _record_etag(self, path: Path, etag: str) -> None:
        record = self._etag_record(path)
        record.parent.mkdir(parents=True, exist_ok=True)
        stat = path.stat()
        handle, tmp = tempfile.mkstemp(prefix=f".{record.name}.", suffix=".tmp", dir=record.parent)
        with os.fdopen(handle, "w") as out:
            json.dump({"etag": etag, "file": [stat.st_size, stat.st_mtime_ns]}, out)
        os.replace(tmp, record)


def open_store(uri: str) -> S3Store:
    """The :class:`S3Store` of ``uri`` in :func:`cache_dir`, its bucket checked (once per process and cache)."""
    return _open_store(uri, str(cache_dir()))


@functools.lru_cache(maxsize=8)
def _open_store(uri: str, cache: str) -> S3Store:
    store = S3Store(uri, cache)
    store.check_bucket()  # one line naming the bucket, rather than a traceback from the first task's check
    return store
