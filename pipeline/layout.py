"""The work directory's layout: the one place that names every stage folder and file in it.

::

    <workdir>/
      downloads/genres.tar.gz                  GTZAN, verified
      dataset/<key>/                           manifest.parquet, audio/ (an extracted archive), figures.json
      features/<key>/                          shards/shard-NNNNN.h5, features.h5, figures.json
      train/<model>-<key>/                     model.pt, config.json, checkpoints/, history.csv, metrics.json,
                                               curves.png, confusion.png, figures.json
      train/comparison-<key>.png               several models' validation curves side by side
      embeddings/<model>-<key>/                embeddings.parquet, figures.json
      index/<model>-<key>/                     index.ann, ids.parquet, meta.json, embedding_map.png, figures.json
      index/added-<model folder>.parquet       songs added with MusicSearch.index_audio; part of the next index's key
      index/added-<model folder>.parquet.lock  held by whoever adds a song (pipeline.added)
      cache/probes.parquet                     the dataset stage's probe of each file, by path, size and mtime
      cache/features-<mel key>/part-*.h5       log-mels of a library's files, by file (pipeline.library)
      cache/embeddings-<model folder>-<weights>.parquet  a library's vectors by file for one model's weights
      latest-run.json                          the folders the last ``melsearch run`` used, per stage and model
      .reruns.json                             folders a ``--rerun`` removed and no run has rebuilt yet
      scheduler/                               luigid.pid, logs/, state.pickle
      .lock                                    held by a local-scheduler run

Each ``<key>`` is a short hash of the settings and upstream keys that shaped the folder. A stage writes its
headline figures to ``figures.json`` last: that file marks the folder finished. Readers (``predict``,
``query``, ``serve``) take the folder the settings name when they know them, else the one ``latest-run.json``
names, else the newest finished one, and say which.

A work directory may also be ``s3://BUCKET/PREFIX`` (see :mod:`pipeline.storage`): every path here is then
in its local mirror, stages upload their folders when finished (``figures.json`` last), and the readers'
folders are downloaded from the bucket when chosen.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from pipeline.errors import MelsearchError
from pipeline.io import write_json_atomic
from pipeline.storage import S3Store, is_remote, open_store

log = logging.getLogger(__name__)

STAGES = ("dataset", "features", "train", "embeddings", "index")
PER_MODEL_STAGES = ("train", "embeddings", "index")
FIGURES_FILE = "figures.json"
RUN_RECORD = "latest-run.json"
RERUN_RECORD = ".reruns.json"
# The file each stage's readers want from its folder (train and index are read as whole folders).
ARTIFACTS = {"dataset": "manifest.parquet", "features": "features.h5", "train": "", "embeddings": "embeddings.parquet",
             "index": ""}
# The file a stage's library writer puts last in its folder: a folder built without Luigi counts once it is there.
WRITTEN_LAST = {**ARTIFACTS, "train": "metrics.json", "index": "meta.json"}
# What readers of a folder in a bucket do not download: a model's checkpoints serve only to resume training.
NOT_READ = {"train": ("checkpoints",)}
# What a stage's figures.json does not vouch for: checkpoints change after it, an extracted archive is the source.
UNRECORDED = {**NOT_READ, "dataset": ("audio",)}
# figures.json's key for the files the stage wrote: {path relative to the folder: [bytes, sample digest]}.
WRITTEN = "written"
SAMPLE_BYTES = 64 << 10


class WorkDir:
    """Paths in one work directory (nothing is created until a stage writes).

    ``root`` is a local folder, or ``s3://BUCKET/PREFIX``: then ``root`` is its local mirror and ``store``
    the :class:`pipeline.storage.S3Store` that moves files between the two (None for a local folder).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.store: S3Store | None = open_store(str(root)) if is_remote(root) else None
        # absolute: pyarrow takes a relative path with a colon (``rel:dir``) for a URI
        self.root = self.store.local if self.store is not None else Path(root).absolute()

    def check_writable(self) -> None:
        """Create the work directory (local, or a bucket's mirror); one-line MelsearchError if it cannot be written."""
        if self.root.exists() and not self.root.is_dir():
            raise MelsearchError(f"{self.root}: the work directory is a file, not a folder (--workdir)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise MelsearchError(f"{self.root}: cannot write the work directory here ({exc.strerror or exc}; "
                                 "--workdir)") from exc

    def location(self, path: str | os.PathLike) -> str:
        """How to name ``path`` to a user: its ``s3://`` address in a bucket work directory, else the path."""
        return self.store.uri_of(path) if self.store is not None else str(path)

    def stage_dir(self, stage: str, key: str, model: str | None = None) -> Path:
        """``<root>/<stage>/<key>``, or ``<root>/<stage>/<model>-<key>`` for the per-model stages."""
        if stage not in STAGES:
            raise MelsearchError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        return self.root / stage / (f"{model}-{key}" if stage in PER_MODEL_STAGES else key)

    @staticmethod
    def artifact(stage: str, folder: str | os.PathLike) -> Path:
        """What readers of ``stage`` open in its ``folder``: a file (manifest, features, embeddings) or the folder."""
        name = ARTIFACTS[stage]
        return Path(folder) / name if name else Path(folder)

    @staticmethod
    def figures_path(folder: str | os.PathLike) -> Path:
        return Path(folder) / FIGURES_FILE

    @property
    def gtzan_archive(self) -> Path:
        return self.root / "downloads" / "genres.tar.gz"

    def comparison_plot(self, key: str) -> Path:
        return self.root / "train" / f"comparison-{key}.png"

    def model_folder(self, name: str) -> Path:
        """``train/<name>``: the model folder named ``<model>-<key>``, as an index's meta.json names it."""
        return self.root / "train" / name

    def added_table(self, model_folder: str) -> Path:
        """The side table of songs added to indexes of the model in ``train/<model_folder>``."""
        return self.root / "index" / f"added-{model_folder}.parquet"

    @property
    def probe_cache(self) -> Path:
        """What the dataset stage learnt of each audio file, kept so a rerun probes only new or changed files."""
        return self.root / "cache" / "probes.parquet"

    def feature_cache(self, mel_key: str) -> Path:
        """The folder of per-file log-mels for one :class:`pipeline.mel.MelConfig` key (library runs)."""
        return self.root / "cache" / f"features-{mel_key}"

    def embedding_cache(self, model_folder: str, weights: str) -> Path:
        """The per-file vectors of the model in ``train/<model_folder>`` whose ``model.pt`` hashes to ``weights``.

        The weights are part of the name: ``--rerun train`` retrains into the same folder, and the new model's
        vectors must not be taken from the old one's (library runs).
        """
        return self.root / "cache" / f"embeddings-{model_folder}-{weights[:10]}.parquet"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def scheduler_dir(self) -> Path:
        return self.root / "scheduler"

    @property
    def run_record(self) -> Path:
        return self.root / RUN_RECORD

    def record_run(self, folders: dict[str, dict[str, str]]) -> None:
        """Write ``latest-run.json``: ``{stage: {model, "library" or "": folder relative to root}}`` of a finished run.

        Left untouched when it already says so, so a no-op rerun changes no file.
        """
        if self.read_run_record() != folders:
            write_json_atomic(self.run_record, folders)
            if self.store is not None:
                self.store.upload(self.run_record)

    @property
    def rerun_record(self) -> Path:
        return self.root / RERUN_RECORD

    def reruns(self) -> dict[str, str]:
        """Outputs a ``--rerun`` removed and no run has rebuilt yet: ``{folder relative to root: rerun stage}``."""
        try:
            record = json.loads(self.rerun_record.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def record_reruns(self, pending: dict[str, str]) -> None:
        """Write :meth:`reruns` (no file when nothing is pending)."""
        if pending:
            write_json_atomic(self.rerun_record, pending)
        else:
            self.rerun_record.unlink(missing_ok=True)

    def read_run_record(self) -> dict[str, dict[str, str]]:
        """``latest-run.json``'s folders, or ``{}`` when there is none (or it is unreadable)."""
        if self.store is not None and not self.store.download(self.run_record):
            return {}
        try:
            record = json.loads(self.run_record.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def find(self, stage: str, model: str | None = None) -> Path:
        """The finished ``stage`` folder to read (for ``model`` when given); see :meth:`choose`."""
        return self.choose(stage, model)[0]

    def choose(self, stage: str, model: str | None = None) -> tuple[Path, str]:
        """The finished ``stage`` folder to read and why: the latest run's, else the newest finished one.

        In a bucket work directory the choice is made from the bucket, and the folder is downloaded into the
        mirror (but for the sub-folders in ``NOT_READ``). Raises MelsearchError when no finished folder exists.
        """
        folder, why = self._choose(stage, model)
        if self.store is not None:
            self.store.download_folder(folder, exclude=NOT_READ.get(stage, ()))
        return folder, why

    def fetch_index(self, model: str | None = None) -> tuple[Path, str]:
        """:meth:`choose` the index; from a bucket, also download what its readers open beside it.

        That is the model folder that built it (``train/<model_key>``) and its side table of added songs.
        """
        index_dir, why = self.choose("index", model)
        if self.store is not None:
            model_key = json.loads((index_dir / WRITTEN_LAST["index"]).read_text()).get("model_key", "")
            if model_key:
                self.store.download_folder(self.model_folder(model_key), exclude=NOT_READ["train"])
                self.store.download(self.added_table(model_key))
        return index_dir, why

    def _choose(self, stage: str, model: str | None) -> tuple[Path, str]:
        recorded = self._recorded(stage, model)
        if recorded is not None:
            return recorded, f"named by {RUN_RECORD}, the latest run's"
        marker = WRITTEN_LAST[stage]
        pattern = f"{model}-*/{marker}" if model else f"*/{marker}"
        if self.store is None:
            found = sorted((self.root / stage).glob(pattern), key=lambda p: p.stat().st_mtime_ns)
        else:
            listing = self.store.listing(self.root / stage)
            found = sorted((path for path in listing if fnmatch(path.relative_to(self.root / stage).as_posix(),
                                                                 pattern) and path.parent.parent.name == stage),
                           key=lambda path: listing[path].modified)
        if not found:
            what = f"{model} " if model else ""
            rebuilding = sorted(rerun for folder, rerun in self.reruns().items()
                                if fnmatch(folder, f"{stage}/{model}-*" if model else f"{stage}/*"))
            if rebuilding:
                raise MelsearchError(f"{self.location(self.root / stage)}: the {what}{stage} is being rebuilt by "
                                     f"`melsearch run --rerun {rebuilding[0]}`, not finished yet (run it again to "
                                     "finish it)")
            raise MelsearchError(f"{self.location(self.root / stage)}: no finished {what}{stage} here "
                                 "(run the pipeline first)")
        return found[-1].parent, f"the newest finished; no {RUN_RECORD} names one"

    def _recorded(self, stage: str, model: str | None) -> Path | None:
        by_model = self.read_run_record().get(stage, {})
        names = [by_model[model]] if model in by_model else [] if model else list(by_model.values())[:1]
        exists = Path.is_file if self.store is None else self.store.exists
        folders = [self.root / name for name in names if exists(self.root / name / WRITTEN_LAST[stage])]
        return folders[0] if folders else None


def added_table_path(index_dir: str | os.PathLike, model_folder: str) -> Path:
    """The side table of the index at ``<workdir>/index/<name>`` (see :meth:`WorkDir.added_table`)."""
    return WorkDir(Path(index_dir).parent.parent).added_table(model_folder)


def _sample_digest(path: Path) -> str:
    """sha256 of a file's size, first and last ``SAMPLE_BYTES`` (the whole file when it is small).

    Cheap for any size (a GTZAN-sized 330 MB features file: 0.12 ms, against 280 ms for its full sha256, warm page
    cache), and it catches a truncated or overwritten file; a change inside a large file's middle goes unnoticed.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(handle.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            handle.seek(size - SAMPLE_BYTES)
        digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


@functools.lru_cache(maxsize=1 << 16)
def _known_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """:func:`_sample_digest` once per file version: Luigi asks ``complete()`` of each task several times a run."""
    return _sample_digest(Path(path))


def _recorded_files(folder: Path, extra: Sequence[Path]) -> Iterator[Path]:
    """The files a stage's figures.json vouches for: its folder's, but for temporary and ``UNRECORDED`` ones."""
    skip = UNRECORDED.get(folder.parent.name, ())
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if path.is_file() and relative != (FIGURES_FILE,) and relative[0] not in skip \
                and not any(part.startswith(".") for part in relative):
            yield path
    yield from extra


def write_figures(folder: str | os.PathLike, figures: dict[str, Any], *, extra: Sequence[Path] = ()) -> None:
    """Record a stage's headline figures in its folder (atomically); this marks the folder finished.

    Beside them (key ``WRITTEN``) the size and :func:`_sample_digest` of every file in the folder (and of the files
    ``extra`` outside it that the outputs point to), which :func:`damaged_outputs` checks.
    """
    folder = Path(folder)
    written = {os.path.relpath(path, folder): [path.stat().st_size, _sample_digest(path)]
               for path in _recorded_files(folder, extra)}
    write_json_atomic(WorkDir.figures_path(folder), {**figures, WRITTEN: written})


def _raw_figures(folder: str | os.PathLike) -> dict[str, Any]:
    try:
        figures = json.loads(WorkDir.figures_path(folder).read_text())
    except (OSError, ValueError):
        return {}
    return figures if isinstance(figures, dict) else {}


def read_figures(folder: str | os.PathLike) -> dict[str, Any]:
    """The figures a finished stage recorded, or ``{}`` when it has none."""
    return {key: value for key, value in _raw_figures(folder).items() if key != WRITTEN}


def damaged_outputs(folder: str | os.PathLike) -> dict[Path, str]:
    """The files a finished stage wrote that are not as it wrote them: path -> why (missing, size, content).

    Empty for a whole folder, an unfinished one, and one finished before figures.json recorded its files.
    Costs a ``stat`` per file, and once per file version in a process two 64 KiB reads.
    """
    folder = Path(folder)
    damaged = {}
    for name, (size, digest) in _raw_figures(folder).get(WRITTEN, {}).items():
        path = Path(os.path.normpath(folder / name))
        try:
            stat = path.stat()
        except OSError as exc:
            damaged[path] = f"{path}: {exc.strerror or 'unreadable'}"
            continue
        if stat.st_size != size:
            damaged[path] = f"{path}: {stat.st_size} bytes, {size} when the stage wrote it"
        else:
            try:
                same = _known_digest(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino) == digest
            except OSError as exc:
                damaged[path] = f"{path}: {exc.strerror or 'unreadable'}"
                continue
            if not same:
                damaged[path] = f"{path}: changed since the stage wrote it"
    return damaged


def rerun_hint(path: str | os.PathLike) -> str:
    """``; `melsearch run --rerun STAGE` writes it again`` for a stage folder or a file in one, else "".

    What readers that find a stage output corrupt add to their one-line error.
    """
    parts = Path(path).parts
    for depth in range(len(parts) - 2, -1, -1):
        if parts[depth] in STAGES:
            return f"; `melsearch run --rerun {parts[depth]}` writes it again"
    return ""
