"""A library's features and vectors, cached per audio file: a rerun after adding N files decodes exactly N.

A library is a folder of music to index (labels optional) with a model trained elsewhere. Its stages keep
what they computed per file version (:func:`pipeline.dataset.file_identity`: resolved path, size, mtime, ctime):

- log-mels in ``<workdir>/cache/features-<mel key>/part-<hash>.h5``, each part written by the pool worker
  that extracted its files (``mel`` (rows, n_mels, n_frames), ``identity`` and ``n_frames`` per row, and the
  files that failed with their reasons in the ``failed`` attribute, so a bad file is not decoded again);
- vectors in ``<workdir>/cache/embeddings-<model folder>-<weights>.parquet`` (identity, predicted label, a
  tagging model's tag probabilities, vector).

A library's features folder holds ``tracks.parquet``: for each track of the manifest with features, its
identity and where its log-mel is (part file, row). The embeddings file is the usual one
(:mod:`pipeline.embeddings`), so the index and every reader are the same as for the labelled source. A file
that left the folder leaves the manifest, hence ``tracks.parquet``, the embeddings and the next index; its
cache entries stay (they cost disk only).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Container, Iterator, Sequence
from concurrent.futures import as_completed
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from pipeline.dataset import file_identity
from pipeline.embeddings import TAGS_COLUMN, read_embeddings, write_embedding_rows
from pipeline.errors import MelsearchError
from pipeline.feature_shards import write_mel_part
from pipeline.io import atomic_path
from pipeline.manifest import path_from_text, read_manifest
from pipeline.mel import MelConfig
from pipeline.parallel import shared_pool

if TYPE_CHECKING:
    from pipeline.classifier import GenreClassifier

log = logging.getLogger(__name__)

TRACKS_FILE = "tracks.parquet"
POOL_PRELOAD = ("pipeline.library", "pipeline.classifier")  # what the pool's workers run: imported once
PART_SIZE = 8  # files per cache part: as the features stage's parts, small enough to balance the pool
_TRACK_SCHEMA = pa.schema([("track_id", pa.string()), ("path", pa.string()), ("identity", pa.string()),
                           ("part", pa.string()), ("row", pa.int32()), ("n_frames", pa.int32())])


def cache_part_name(items: Sequence[tuple[str, str]]) -> str:
    """The cache part file of ``(identity, path)`` items: named by their identities, so its files name it anywhere."""
    return "part-" + hashlib.sha256("\0".join(identity for identity, _ in items).encode()).hexdigest()[:16] + ".h5"


def _write_cache_part(items: Sequence[tuple[str, str]], folder: str, cfg: MelConfig) -> str:
    """Worker side: the log-mels of ``(identity, path)`` items into a new part of the cache ``folder``.

    The features stage's part (:func:`pipeline.feature_shards.write_mel_part`) plus each row's ``identity`` and
    ``n_frames`` and the ``failed`` files, written under a temporary name and renamed, so a part is whole or
    absent. Returns the part's file name.
    """
    name = cache_part_name(items)
    tmp = Path(folder) / f".{name}.{os.getpid()}.tmp"
    with threadpool_limits(limits=1):
        outcomes = write_mel_part(items, str(tmp), cfg)
    written = [(identity, n) for (identity, _), n in zip(items, outcomes, strict=True) if not isinstance(n, str)]
    with h5py.File(tmp, "a") as h5:
        h5.create_dataset("identity", data=[identity for identity, _ in written], dtype=h5py.string_dtype("utf-8"))
        h5.create_dataset("n_frames", data=np.array([n for _, n in written], dtype=np.int32))
        h5.attrs["mel_config"] = json.dumps(cfg.to_dict(), sort_keys=True)
        h5.attrs["failed"] = json.dumps({identity: reason for (identity, _), reason in zip(items, outcomes, strict=True)
                                         if isinstance(reason, str)})
    os.replace(tmp, Path(folder) / name)
    return name


def scan_feature_cache(folder: str | os.PathLike,
                       names: Sequence[str] | None = None) -> dict[str, tuple[str, int, int] | str]:
    """What a cache folder knows: identity -> (part file name, row, frames holding audio), or the failure reason.

    ``names``: only these part files (default: every one).
    """
    known: dict[str, tuple[str, int, int] | str] = {}
    parts = sorted(Path(folder).glob("part-*.h5")) if names is None else [Path(folder) / name for name in names]
    for part in parts:
        try:
            with h5py.File(part, "r") as h5:
                identities, n_frames = h5["identity"].asstr()[...], h5["n_frames"][...]
                failed = json.loads(h5.attrs.get("failed", "{}"))
        except (OSError, KeyError, ValueError) as exc:
            # dropped: its files are decoded again into a new part (kept, it would be skipped on every run)
            log.warning("%s: unreadable cache part, removed; its files are decoded again (%s)", part, exc)
            part.unlink(missing_ok=True)
            continue
        known.update(failed)
        known.update({identity: (part.name, row, int(frames))
                      for row, (identity, frames) in enumerate(zip(identities, n_frames, strict=True))})
    return known


def _to_decode(tracks: Sequence[tuple[str, str]], known: dict) -> tuple[dict[str, str], list[dict],
                                                                       list[tuple[str, str]]]:
    """Each track's file identity, the tracks whose file cannot be read, and the ``(identity, path)`` pairs
    (sorted, each file once) that ``known`` (:func:`scan_feature_cache`) lacks."""
    identity_of, failed = {}, []
    for track_id, path in tracks:
        try:
            identity_of[track_id] = file_identity(path_from_text(path))
        except OSError as exc:
            failed.append({"track_id": track_id, "path": path, "reason": f"{path}: {exc.strerror or exc}"})
    todo = sorted({identity: path for track_id, path in tracks if (identity := identity_of.get(track_id))
                   and identity not in known}.items())
    return identity_of, failed, todo


def files_to_decode(tracks: Sequence[tuple[str, str]], cache_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """``(identity, path)`` of the ``(track_id, path)`` tracks' files the cache folder does not know, sorted."""
    return _to_decode(tracks, scan_feature_cache(cache_dir))[2]


def extract_to_cache(files: Sequence[tuple[str, str]], cache_dir: str | os.PathLike, cfg: MelConfig, *,
                     workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Decode ``(identity, path)`` files into new cache parts of ``PART_SIZE`` files; return the parts' names.

    The parts are written by this process's shared pool (``workers`` processes, default one per core; 1: here).
    ``progress(done, total)`` counts parts.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    parts = [files[start : start + PART_SIZE] for start in range(0, len(files), PART_SIZE)]
    workers = min(len(parts), (os.cpu_count() or 1) if workers is None else workers)
    names = []
    if workers <= 1:
        for done, part in enumerate(parts, start=1):
            names.append(_write_cache_part(part, str(cache_dir), cfg))
            if progress is not None:
                progress(done, len(parts))
    else:
        pool = shared_pool(workers, preload=POOL_PRELOAD)
        futures = [pool.submit(_write_cache_part, part, str(cache_dir), cfg) for part in parts]
        for done, future in enumerate(as_completed(futures), start=1):
            names.append(future.result())
            if progress is not None:
                progress(done, len(parts))
    return names


def write_library_features(
    tracks: Sequence[tuple[str, str]],
    out_path: str | os.PathLike,
    cfg: MelConfig,
    cache_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Log-mels of ``(track_id, path)`` tracks, decoding only the files the cache does not know; ``tracks.parquet``.

    New files are extracted ``PART_SIZE`` at a time into new cache parts by this process's shared pool
    (:func:`pipeline.parallel.shared_pool`; ``workers=1`` extracts here). A file that fails to decode is
    recorded (here and in the cache) and left out, never fatal.

    Returns
    -------
    ``{"tracks", "extracted", "reused", "failed", "failed_tracks": [{"track_id", "path", "reason"}]}``:
    ``extracted`` files decoded now (failed ones included), ``reused`` found in the cache (failures included).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    known = scan_feature_cache(cache_dir)
    identity_of, failed, todo = _to_decode(tracks, known)
    names = extract_to_cache(todo, cache_dir, cfg, workers=workers, progress=progress)
    known.update(scan_feature_cache(cache_dir, names))  # the parts just written: the others were read above
    rows = []
    for track_id, path in tracks:
        entry = known.get(identity_of.get(track_id, ""))
        if isinstance(entry, tuple):
            rows.append({"track_id": track_id, "path": path, "identity": identity_of[track_id], "part": entry[0],
                         "row": entry[1], "n_frames": entry[2]})
        elif track_id in identity_of:
            failed.append({"track_id": track_id, "path": path, "reason": entry or "not in the feature cache"})
    for record in failed:
        log.warning("skipping %s: %s", record["track_id"], record["reason"])
    # relative: the work directory may move, or be a bucket mirrored at another path on each machine
    metadata = {"mel_config": json.dumps(cfg.to_dict(), sort_keys=True),
                "cache": os.path.relpath(os.path.abspath(cache_dir), os.path.abspath(Path(out_path).parent))}
    with atomic_path(out_path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=_TRACK_SCHEMA.with_metadata(metadata)), tmp)
    decoded = {identity for identity, _ in todo}
    extracted = sum(1 for track_id, _ in tracks if identity_of.get(track_id) in decoded)
    log.info("%s: %d tracks, %d extracted, %d from the cache, %d failed", out_path, len(rows), extracted,
             len(identity_of) - extracted, len(failed))
    return {"tracks": len(rows), "extracted": extracted, "reused": len(identity_of) - extracted,
            "failed": len(failed), "failed_tracks": failed}


def read_library_tracks(path: str | os.PathLike) -> tuple[list[dict], MelConfig, Path]:
    """``tracks.parquet``'s rows, the :class:`MelConfig` of their log-mels and the cache folder holding them."""
    path = Path(path)
    if not path.is_file():
        raise MelsearchError(f"{path}: no library features here (run the features stage first)")
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    if b"mel_config" not in meta or b"cache" not in meta:
        raise MelsearchError(f"{path}: not a library tracks file (no mel_config or cache in its metadata)")
    cache = path.parent / meta[b"cache"].decode()  # relative to the tracks file (an absolute path stays one)
    return table.to_pylist(), MelConfig.from_dict(json.loads(meta[b"mel_config"])), cache


def read_cached_mels(rows: Sequence[dict], cache_dir: Path, cfg: MelConfig) -> np.ndarray:
    """Log-mels of ``tracks.parquet`` rows: (len(rows), n_mels, n_frames) float32, each part file opened once."""
    out = np.empty((len(rows), cfg.n_mels, cfg.n_frames), dtype=np.float32)
    by_part: dict[str, list[int]] = {}
    for position, row in enumerate(rows):
        by_part.setdefault(row["part"], []).append(position)
    for part, positions in by_part.items():
        try:
            with h5py.File(cache_dir / part, "r") as h5:
                for position in positions:
                    h5["mel"].read_direct(out, source_sel=np.s_[rows[position]["row"]], dest_sel=np.s_[position])
        except OSError as exc:
            # the next run finds the part its features stage recorded gone, and decodes those files again
            (cache_dir / part).unlink(missing_ok=True)
            raise MelsearchError(f"{cache_dir / part}: unreadable feature cache part ({exc}), removed; run again "
                                 "to decode its files") from exc
    return out


EMBED_PART = 4  # songs per job of the pool: ~1.6 CPU-s with musicnn, so the last jobs leave no core idle for long


def _embed_cached(model: tuple[str, int, int], rows: Sequence[dict], cache_dir: str,
                  cfg: MelConfig) -> tuple[np.ndarray, ...]:
    """Worker side: :meth:`GenreClassifier.embed_predict_and_tag` of ``tracks.parquet`` rows' cached log-mels.

    ``model``: the model folder and its weights' mtime (ns) and size, so retrained weights are loaded anew.
    """
    mels = read_cached_mels(rows, Path(cache_dir), cfg)
    return _worker_classifier(*model).embed_predict_and_tag(
        mels, n_frames=np.array([row["n_frames"] for row in rows]), names=[row["track_id"] for row in rows])


@functools.lru_cache(maxsize=2)
def _worker_classifier(model_dir: str, _mtime_ns: int, _size: int) -> GenreClassifier:
    """The model of ``model_dir``, loaded once per pool worker, on one thread (the pool has a worker per core)."""
    import torch

    from pipeline.classifier import GenreClassifier

    torch.set_num_threads(1)
    return GenreClassifier.load(model_dir, device="cpu")


def _embedded_parts(classifier: GenreClassifier, rows: Sequence[dict], cache_dir: Path, cfg: MelConfig, *,
                    workers: int | None) -> Iterator[tuple[Sequence[dict], tuple[np.ndarray, ...]]]:
    """``(rows, (vectors, probabilities, tag probabilities))`` of ``EMBED_PART`` rows at a time, as they finish.

    On the CPU each pool worker runs the model on one thread: a process per core keeps every core busy at
    any load, where one process's threads, when another program holds a core, wait on each other (measured
    in :mod:`pipeline.runtime`). On a GPU, or with one worker, the model runs here, 64 songs at a time.
    """
    parts = [rows[start : start + EMBED_PART] for start in range(0, len(rows), EMBED_PART)]
    workers = min(len(parts), (os.cpu_count() or 1) if workers is None else workers)
    if classifier.device.type != "cpu" or workers <= 1:
        for start in range(0, len(rows), 64):
            batch = rows[start : start + 64]
            yield batch, classifier.embed_predict_and_tag(read_cached_mels(batch, cache_dir, cfg),
                                                          n_frames=np.array([row["n_frames"] for row in batch]),
                                                          names=[row["track_id"] for row in batch])
        return
    weights = (classifier.model_dir / "model.pt").stat()
    model = (str(classifier.model_dir), weights.st_mtime_ns, weights.st_size)
    pool = shared_pool(workers, preload=POOL_PRELOAD)
    futures = {pool.submit(_embed_cached, model, part, str(cache_dir), cfg): part
               for part in parts}
    for future in as_completed(futures):
        yield futures[future], future.result()


def _vector_files(paths: Sequence[Path], classifier: GenreClassifier) -> dict[str, tuple[str, np.ndarray, list | None]]:
    """``identity -> (predicted label, vector, tag probabilities)`` of vector files (the cache, batches; later
    files win). For a tagging model an entry without tag probabilities (cached before they were kept) is left out,
    to be computed again."""
    entries = {}
    for path in paths:
        if path.is_file():
            rows, vectors = read_embeddings(path)
            entries.update({row["track_id"]: (row["predicted_label"], vector, row[TAGS_COLUMN])
                            for row, vector in zip(rows, vectors, strict=True)
                            if row[TAGS_COLUMN] is not None or not classifier.tag_names})
    return entries


def _cached_identities(path: Path, classifier: GenreClassifier) -> set[str]:
    """The file identities :func:`_vector_files` would take from ``path``, read from two columns, not the vectors."""
    if not path.is_file():
        return set()
    names = pq.read_schema(path).names
    if not classifier.tag_names:
        return set(pq.read_table(path, columns=["track_id"]).column("track_id").to_pylist())
    if TAGS_COLUMN not in names:  # cached before tags were kept: every vector is computed again
        return set()
    table = pq.read_table(path, columns=["track_id", TAGS_COLUMN])
    tagged = table.column(TAGS_COLUMN).is_valid().to_pylist()
    return {identity for identity, ok in zip(table.column("track_id").to_pylist(), tagged, strict=True) if ok}


def _library_rows(classifier: GenreClassifier, manifest_path: str | os.PathLike,
                  tracks_path: str | os.PathLike) -> tuple[list[dict], dict[str, dict], MelConfig, Path]:
    """The manifest's ``ok`` rows with features, ``tracks.parquet``'s rows by track id, its MelConfig and cache."""
    tracks, cfg, cache_dir = read_library_tracks(tracks_path)
    classifier.check_features(cfg, tracks_path)
    by_id = {row["track_id"]: row for row in tracks}
    rows = [row for row in read_manifest(manifest_path, status="ok") if row["track_id"] in by_id]
    if not rows:
        raise MelsearchError(f"{tracks_path}: none of the ok tracks of {manifest_path} has features")
    return rows, by_id, cfg, cache_dir


def _missing(rows: Sequence[dict], by_id: dict[str, dict], known: Container[str]) -> list[dict]:
    """``tracks.parquet`` rows of ``rows`` whose file identity ``known`` lacks, one per identity, in cache order."""
    todo = list({by_id[row["track_id"]]["identity"]: by_id[row["track_id"]] for row in rows
                 if by_id[row["track_id"]]["identity"] not in known}.values())
    return sorted(todo, key=lambda row: (row["part"], row["row"]))  # each part file read once per batch


def _compute_vectors(classifier: GenreClassifier, todo: Sequence[dict], cache_dir: Path, cfg: MelConfig,
                     into: dict, *, workers: int | None, progress: Callable[[int, int], None] | None) -> None:
    """The vectors of ``todo`` rows, added to ``into`` by file identity (:func:`_embedded_parts`)."""
    done = 0
    for batch, (vectors, probabilities, tags) in _embedded_parts(classifier, todo, cache_dir, cfg, workers=workers):
        for row, vector, label, tag in zip(batch, vectors, classifier.labels_of(probabilities), tags, strict=True):
            into[row["identity"]] = (label, vector, tag if classifier.tag_names else None)
        done += len(batch)
        if progress is not None:
            progress(done, len(todo))


def _write_vector_file(entries: dict, path: Path, classifier: GenreClassifier) -> None:
    """``identity -> (label, vector, tags)`` entries as an embeddings file keyed by identity (the cache's format)."""
    keys = sorted(entries)
    write_embedding_rows([{"track_id": key, "predicted_label": entries[key][0], TAGS_COLUMN: entries[key][2]}
                          for key in keys],
                         np.stack([entries[key][1] for key in keys]), path, metadata=classifier.embeddings_metadata())


def vectors_to_compute(manifest_path: str | os.PathLike, tracks_path: str | os.PathLike,
                       model_dir: str | os.PathLike, cache_path: str | os.PathLike) -> list[dict]:
    """``tracks.parquet``'s rows (``identity``, ``part``, ``row``, ``n_frames``, ``track_id``) of the library's
    files whose vectors the cache ``cache_path`` lacks for this model, one per file, in cache order: the work to
    share out among :func:`write_vector_batch` calls, on any machine."""
    from pipeline.classifier import GenreClassifier  # torch

    classifier = GenreClassifier.load(Path(model_dir).resolve(), device="cpu")
    rows, by_id, _, _ = _library_rows(classifier, manifest_path, tracks_path)
    return _missing(rows, by_id, _cached_identities(Path(cache_path), classifier))


def write_vector_batch(rows: Sequence[dict], cache_dir: str | os.PathLike, cfg: MelConfig,
                       model_dir: str | os.PathLike, out_path: str | os.PathLike, *, device: str = "cpu",
                       workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> int:
    """The vectors of ``rows`` (from :func:`vectors_to_compute`), their log-mels read from the feature cache
    ``cache_dir``, written to ``out_path`` in the vector cache's format (keyed by file identity), atomically.
    Computed as :func:`write_library_embeddings` computes them. Returns the number of vectors."""
    from pipeline.classifier import GenreClassifier  # torch

    classifier = GenreClassifier.load(Path(model_dir).resolve(), device=device)
    entries: dict = {}
    _compute_vectors(classifier, rows, Path(cache_dir), cfg, entries, workers=workers, progress=progress)
    _write_vector_file(entries, Path(out_path), classifier)
    return len(entries)


def write_library_embeddings(
    manifest_path: str | os.PathLike,
    tracks_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    cache_path: str | os.PathLike,
    *,
    computed: Sequence[str | os.PathLike] = (),
    device: str = "cpu",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The embeddings file of a library, computing only the vectors ``cache_path`` lacks for this model.

    Each vector is :meth:`GenreClassifier.embed_and_predict`'s, as in :func:`pipeline.embeddings.write_embeddings`;
    rows are the manifest's ``ok`` tracks with features. ``computed``: vector files that
    :func:`write_vector_batch` wrote for this run (possibly on other machines), taken as they are. The cache (a
    Parquet embeddings file whose ``track_id`` column holds file identities) is rewritten with the new vectors
    added; for a tagging model an entry without tag probabilities (cached before they were kept) is computed
    again. What neither holds is computed here: on the CPU by this process's shared pool
    (:func:`_embedded_parts`; ``workers`` processes, default one per core; ``workers=1`` computes in this
    process). ``progress(done, total)`` counts the vectors computed here.

    Returns
    -------
    ``{"tracks", "dim", "computed", "reused"}``: ``computed`` counts this run's new vectors, here or in batches.
    """
    from pipeline.classifier import GenreClassifier  # torch

    model_dir, cache_path = Path(model_dir).resolve(), Path(cache_path)
    classifier = GenreClassifier.load(model_dir, device=device)
    rows, by_id, cfg, cache_dir = _library_rows(classifier, manifest_path, tracks_path)
    cached = _vector_files([cache_path], classifier)
    before = set(cached)
    cached.update(_vector_files([Path(path) for path in computed], classifier))
    _compute_vectors(classifier, _missing(rows, by_id, cached), cache_dir, cfg, cached, workers=workers,
                     progress=progress)
    if set(cached) != before:
        _write_vector_file(cached, cache_path, classifier)
    metadata = classifier.embeddings_metadata()
    out_rows = [{**row, "predicted_label": entry[0], TAGS_COLUMN: entry[2]}
                for row in rows for entry in [cached[by_id[row["track_id"]]["identity"]]]]
    vectors = np.stack([cached[by_id[row["track_id"]]["identity"]][1] for row in rows])
    write_embedding_rows(out_rows, vectors, out_path, metadata=metadata)
    new = len({by_id[row["track_id"]]["identity"] for row in rows} - before)
    log.info("embedded %d library tracks with %s: %d computed, %d reused", len(rows), model_dir.name, new,
             len(rows) - new)
    return {"tracks": len(rows), "dim": int(vectors.shape[1]), "computed": new, "reused": len(rows) - new}
