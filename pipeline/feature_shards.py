"""The features stage's writers: log-mels of a slice of the manifest into an HDF5 shard, and the shards merged.

:func:`write_feature_shard` cuts its tracks into parts that the workers of this process's pool
(:func:`pipeline.parallel.shared_pool`) extract and write themselves; the shard file maps them as one HDF5
virtual dataset. :func:`merge_feature_shards` joins shards into one virtual ``features.h5`` that
:class:`pipeline.feature_store.FeatureStore` reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import h5py
import librosa
import numpy as np
import soundfile as sf
import soxr
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import pipeline
from pipeline.errors import MelsearchError
from pipeline.feature_store import open_features_h5
from pipeline.io import atomic_path
from pipeline.manifest import path_from_text
from pipeline.mel import MelConfig, log_mel_for_file
from pipeline.parallel import shared_pool

log = logging.getLogger(__name__)

# Tracks per part file. Parts are handed to whichever worker is free, so the last part of a shard keeps one
# worker busy while the others wait: 8 tracks (about 0.1 s of one core) keeps that wait short, the files few.
PART_SIZE = 8
PARTS_SUFFIX = ".parts"  # <shard>.h5.parts/part-NNNNN.h5 beside the shard file


def shard_tracks(rows: Sequence[dict], shard_size: int) -> list[list[tuple[str, str]]]:
    """Cut the manifest's ``ok`` rows, sorted by ``track_id``, into shards of ``shard_size`` (track_id, path).

    The same manifest always gives the same shards, so a rerun finds the shards it finished before.
    """
    if shard_size < 1:
        raise MelsearchError(f"shard_size must be >= 1, got {shard_size}")
    tracks = sorted((row["track_id"], row["path"]) for row in rows if row.get("status", "ok") == "ok")
    return [tracks[start : start + shard_size] for start in range(0, len(tracks), shard_size)]


def _library_versions() -> dict[str, str]:
    return {
        "librosa": librosa.__version__,
        "numpy": np.__version__,
        "soundfile": sf.__version__,
        "soxr": soxr.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "melsearch": pipeline.__version__,
    }


def write_mel_part(tracks: Sequence[tuple[str, str]], path: str, cfg: MelConfig) -> list[int | str]:
    """Worker side: the log-mels of ``tracks`` streamed into the part file ``path``, in order (also the
    library's per-file cache parts, :mod:`pipeline.library`).

    The part holds ``mel`` (rows, n_mels, n_frames) in ``cfg.dtype``, one row per decoded track, one track
    per chunk. Returns, per track, its frames holding audio or the reason it failed: a few bytes to send
    back, where the spectrograms themselves would be 330 KB each. Paths are as the manifest keeps them
    (:func:`pipeline.manifest.path_to_text`).
    """
    outcomes: list[int | str] = []
    shape = (cfg.n_mels, cfg.n_frames)
    with h5py.File(path, "w") as h5:
        mel = h5.create_dataset("mel", (len(tracks), *shape), maxshape=(None, *shape), dtype=cfg.dtype,
                                chunks=(1, *shape))
        rows = 0
        for _, audio_path in tracks:
            try:
                spectrogram, n_true = log_mel_for_file(path_from_text(audio_path), cfg)
            except MelsearchError as exc:
                outcomes.append(str(exc))
                continue
            # A row is exactly one uncompressed chunk: hand HDF5 its bytes, at half the cost of mel[i] = x.
            mel.id.write_direct_chunk((rows, 0, 0), np.ascontiguousarray(spectrogram, dtype=cfg.dtype))
            rows += 1
            outcomes.append(n_true)
        mel.resize(rows, axis=0)
    return outcomes


def _write_parts_in_process(parts: list[list[tuple[str, str]]], folder: Path, cfg: MelConfig,
                            done: Callable[[int], None]) -> list[list[int | str]]:
    outcomes = []
    with threadpool_limits(limits=1):  # as in a pool worker: the small matrix products gain nothing from threads
        for index, part in enumerate(parts):
            outcomes.append(write_mel_part(part, str(folder / _part_name(index)), cfg))
            done(len(part))
    return outcomes


def _write_parts_in_pool(parts: list[list[tuple[str, str]]], folder: Path, cfg: MelConfig, workers: int,
                         done: Callable[[int], None]) -> list[list[int | str]]:
    pool = shared_pool(workers, preload=("pipeline.feature_shards",))
    futures = {pool.submit(write_mel_part, part, str(folder / _part_name(index)), cfg): len(part)
               for index, part in enumerate(parts)}
    try:
        for future in as_completed(futures):
            future.result()
            done(futures[future])
    except BaseException:
        # Let running parts finish before their folder is removed; queued ones never start.
        for future in futures:
            future.cancel()
        wait(futures)
        raise
    return [future.result() for future in futures]


def _part_name(index: int) -> str:
    return f"part-{index:05d}.h5"


def write_feature_shard(
    tracks: Sequence[tuple[str, str]],
    out_path: str | os.PathLike,
    cfg: MelConfig,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    part_size: int = PART_SIZE,
) -> dict:
    """Extract the log-mel of each ``(track_id, audio_path)`` into one HDF5 file, in this process's pool.

    The file holds ``mel`` (N, n_mels, n_frames) in ``cfg.dtype`` (dB), ``track_id`` (N,) utf-8 and
    ``n_frames`` (N,) int32 (frames holding audio), in the order of ``tracks`` minus the tracks that
    failed to decode; attributes ``mel_config``, ``versions`` and ``failed`` (JSON). ``mel`` is a virtual
    dataset over part files of ``part_size`` tracks in ``<out_path>.parts/``, each written by the worker
    that extracted it (one track per chunk), so no spectrogram travels between processes and memory does
    not grow with the number of tracks. The parts' bytes do not depend on ``workers``. The folder and the
    file appear only when complete; move them together.

    Parameters
    ----------
    tracks : (track_id, audio path) pairs; ids must be unique.
    out_path : the HDF5 file to write (atomically: temporary path, then rename).
    cfg : the mel parameters.
    workers : extraction processes (:func:`pipeline.parallel.shared_pool`); None uses every core, 1 extracts
        in this process.
    progress : called as ``progress(done, total)`` each time a part is written (failed tracks included).
    part_size : tracks per part file.

    Returns
    -------
    ``{"written": number of rows, "failed": [{"track_id", "path", "reason"}, ...]}``.
    """
    tracks = [(str(track_id), str(path)) for track_id, path in tracks]
    out_path = Path(out_path)
    _check_unique([track_id for track_id, _ in tracks], out_path)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1 or part_size < 1:
        raise MelsearchError(f"{out_path}: workers and part_size must be >= 1, got {workers} and {part_size}")
    parts = [tracks[start : start + part_size] for start in range(0, len(tracks), part_size)]
    parts_dir = out_path.with_name(out_path.name + PARTS_SUFFIX)
    with tqdm(total=len(tracks), desc=f"features {out_path.name}", unit="track", disable=None) as bar:
        finished = 0

        def done(n_tracks: int) -> None:
            nonlocal finished
            finished += n_tracks
            bar.update(n_tracks)
            if progress is not None:
                progress(finished, len(tracks))

        try:
            with atomic_path(parts_dir, is_dir=True) as folder:
                if min(workers, len(parts)) <= 1:
                    outcomes = _write_parts_in_process(parts, folder, cfg, done)
                else:
                    outcomes = _write_parts_in_pool(parts, folder, cfg, workers, done)
        except BrokenProcessPool as exc:  # killed by the OOM killer, say
            raise MelsearchError(f"{out_path}: a feature worker process died ({exc})") from exc
    written, n_frames, failed, sources = [], [], [], []
    for index, (part, part_outcomes) in enumerate(zip(parts, outcomes, strict=True)):
        rows = 0
        for (track_id, path), outcome in zip(part, part_outcomes, strict=True):
            if isinstance(outcome, str):
                log.warning("skipping %s: %s", track_id, outcome)
                failed.append({"track_id": track_id, "path": path, "reason": outcome})
            else:
                written.append(track_id)
                n_frames.append(outcome)
                rows += 1
        sources.append((f"{parts_dir.name}/{_part_name(index)}", rows))
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as h5:
        _create_mel(h5, sources, cfg)
        h5.create_dataset("track_id", data=written, dtype=h5py.string_dtype("utf-8"))
        h5.create_dataset("n_frames", data=np.array(n_frames, dtype=np.int32))
        h5.attrs["mel_config"] = json.dumps(cfg.to_dict(), sort_keys=True)
        h5.attrs["versions"] = json.dumps(_library_versions(), sort_keys=True)
        h5.attrs["failed"] = json.dumps(failed)  # the stage's record of tracks left out, with reasons
    log.info("%s: %d tracks written, %d failed", out_path, len(written), len(failed))
    return {"written": len(written), "failed": failed}


def _create_mel(h5: h5py.File, sources: Sequence[tuple[str, int]], cfg: MelConfig) -> None:
    """``mel`` in ``h5``: a virtual dataset over ``(relative path, rows)`` sources, in order (empty ones left out)."""
    shape = (cfg.n_mels, cfg.n_frames)
    total = sum(rows for _, rows in sources)
    if total == 0:  # HDF5 has no empty virtual dataset
        h5.create_dataset("mel", (0, *shape), maxshape=(None, *shape), dtype=cfg.dtype, chunks=(1, *shape))
        return
    layout = h5py.VirtualLayout(shape=(total, *shape), dtype=cfg.dtype)
    offset = 0
    for relative, rows in sources:
        if rows:
            layout[offset : offset + rows] = h5py.VirtualSource(relative, "mel", shape=(rows, *shape))
            offset += rows
    # h5py's create_virtual_dataset records the creation time in the object header: built here without it,
    # so that the same inputs give the same bytes.
    dcpl = layout._get_dcpl(h5.filename)
    dcpl.set_obj_track_times(False)
    dtype = h5py.h5t.py_create(np.dtype(cfg.dtype), logical=1)
    h5py.h5d.create(h5.id, b"mel", dtype, h5py.h5s.create_simple(layout.shape), dcpl=dcpl)


def _check_unique(track_ids: Sequence[str], path: Path) -> None:
    duplicates = sorted(track_id for track_id, count in Counter(track_ids).items() if count > 1)
    if duplicates:
        raise MelsearchError(f"{path}: duplicate track ids: {', '.join(duplicates[:5])}")



def merge_feature_shards(shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> dict:
    """Join shards into one logical features file that training reads.

    ``mel`` is an HDF5 virtual dataset (N, n_mels, n_frames) mapping each shard's rows in the order of
    ``shard_paths`` (straight to a shard's part files, when its ``mel`` is itself virtual), by paths
    relative to ``out_path``'s folder (so the folder can be moved); ``track_id``
    and ``n_frames`` are copied. Attributes: the shards' common ``mel_config``, the first shard's
    ``versions`` and ``shards`` (JSON list of the relative paths). Written atomically.

    Raises
    ------
    MelsearchError
        When a shard is missing or unreadable, the shards' ``mel_config`` differ, or a track id repeats.

    Returns
    -------
    ``{"tracks": N}``.
    """
    out_path = Path(out_path).resolve()
    cfg = versions = first = None
    sources, shard_names, track_ids, n_frames = [], [], [], []
    for shard in map(Path, shard_paths):
        with open_features_h5(shard) as h5:
            shard_cfg = MelConfig.from_dict(json.loads(h5.attrs["mel_config"]))
            if cfg is None:
                cfg, versions, first = shard_cfg, h5.attrs.get("versions", "{}"), shard
            elif shard_cfg != cfg:
                raise MelsearchError(f"{shard}: mel_config {shard_cfg} differs from {first}'s {cfg}")
            shard_names.append(os.path.relpath(shard.resolve(), out_path.parent))
            sources.extend(_mel_sources(shard, h5["mel"], out_path.parent))
            track_ids.extend(h5["track_id"].asstr()[...])
            n_frames.append(h5["n_frames"][...])
    if cfg is None:
        raise MelsearchError(f"{out_path}: no shards to merge")
    _check_unique(track_ids, out_path)
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as h5:
        _create_mel(h5, sources, cfg)
        h5.create_dataset("track_id", data=track_ids, dtype=h5py.string_dtype("utf-8"))
        h5.create_dataset("n_frames", data=np.concatenate(n_frames).astype(np.int32))
        h5.attrs["mel_config"] = json.dumps(cfg.to_dict(), sort_keys=True)
        h5.attrs["versions"] = versions
        h5.attrs["shards"] = json.dumps(shard_names)
    log.info("%s: %d tracks from %d shards", out_path, len(track_ids), len(shard_names))
    return {"tracks": len(track_ids)}



def _mel_sources(shard: Path, mel: h5py.Dataset, folder: Path) -> list[tuple[str, int]]:
    """The files holding ``shard``'s rows, in row order: ``(path relative to folder, rows)``."""
    if not mel.is_virtual:
        return [(os.path.relpath(shard.resolve(), folder), mel.shape[0])]
    mapped = []
    for source in mel.virtual_sources():
        (first, *_), (last, *_) = source.vspace.get_select_bounds()
        # Our shards map whole part files onto consecutive rows; anything else is not ours to flatten.
        if source.file_name == "." or source.src_space.get_select_type() != h5py.h5s.SEL_ALL:
            raise MelsearchError(f"{shard}: mel maps {source.file_name} in a way this merge does not know")
        mapped.append((first, os.path.relpath(shard.resolve().parent / source.file_name, folder), last - first + 1))
    return [(relative, rows) for _, relative, rows in sorted(mapped)]
