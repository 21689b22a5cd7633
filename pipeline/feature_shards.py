"""The features stage's writers: log-mels of a slice of the manifest into an HDF5 shard, and the shards merged.

:func:`write_feature_shard` extracts in a process pool (:func:`pipeline.parallel.ordered_process_map`) and
streams rows into the file; :func:`merge_feature_shards` joins shards into one virtual ``features.h5`` that
:class:`pipeline.feature_store.FeatureStore` reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import h5py
import librosa
import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

import pipeline
from pipeline.errors import MelsearchError
from pipeline.feature_store import open_features_h5
from pipeline.io import atomic_path
from pipeline.mel import MelConfig, log_mel_for_file, mel_plan
from pipeline.parallel import ordered_process_map

log = logging.getLogger(__name__)


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


def _extract_track(path: str, cfg: MelConfig) -> tuple[np.ndarray, int] | str:
    """One track for the writer: (mel in the storage dtype, true frames), or the reason it failed."""
    try:
        mel, n_true = log_mel_for_file(path, cfg)
    except MelsearchError as exc:
        return str(exc)
    # Casting here halves what travels back from a pool worker when storing float16.
    return mel.astype(cfg.dtype, copy=False), n_true




def write_feature_shard(
    tracks: Sequence[tuple[str, str]],
    out_path: str | os.PathLike,
    cfg: MelConfig,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Extract the log-mel of each ``(track_id, audio_path)`` into one HDF5 file, in a process pool.

    The file holds ``mel`` (N, n_mels, n_frames) in ``cfg.dtype`` (dB, one track per chunk), ``track_id``
    (N,) utf-8 and ``n_frames`` (N,) int32 (frames holding audio), in the order of ``tracks`` minus the
    tracks that failed to decode; attributes ``mel_config`` and ``versions`` (JSON). Results stream into
    the file, so memory does not grow with the number of tracks (but for the ids); the file appears only
    when complete.

    Parameters
    ----------
    tracks : (track_id, audio path) pairs; ids must be unique.
    out_path : the HDF5 file to write (atomically: temporary path, then rename).
    cfg : the mel parameters.
    workers : extraction processes; None uses every core, 1 extracts in this process.
    progress : called as ``progress(done, total)`` after each track (failed ones included).

    Returns
    -------
    ``{"written": number of rows, "failed": [{"track_id", "path", "reason"}, ...]}``.
    """
    tracks = [(str(track_id), str(path)) for track_id, path in tracks]
    out_path = Path(out_path)
    _check_unique([track_id for track_id, _ in tracks], out_path)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise MelsearchError(f"workers must be >= 1, got {workers}")
    workers = max(1, min(workers, len(tracks)))
    shape = (cfg.n_mels, cfg.n_frames)
    written: list[str] = []  # ids and lengths are small: written once at the end
    n_frames: list[int] = []
    failed: list[dict] = []
    try:
        with (
            ordered_process_map(_extract_track, [path for _, path in tracks], cfg, workers=workers,
                                initializer=mel_plan, initargs=(cfg,)) as results,
            atomic_path(out_path) as tmp,
            h5py.File(tmp, "w") as h5,
        ):
            mel = h5.create_dataset(
                "mel", (len(tracks), *shape), maxshape=(None, *shape), dtype=cfg.dtype, chunks=(1, *shape)
            )
            with tqdm(total=len(tracks), desc=f"features {out_path.name}", unit="track", disable=None) as bar:
                for done, ((track_id, path), result) in enumerate(zip(tracks, results, strict=True), start=1):
                    if isinstance(result, str):
                        log.warning("skipping %s: %s", track_id, result)
                        failed.append({"track_id": track_id, "path": path, "reason": result})
                    else:
                        # A row is exactly one uncompressed chunk: hand HDF5 its bytes, at half the cost of mel[i] = x.
                        mel.id.write_direct_chunk((len(written), 0, 0), np.ascontiguousarray(result[0], mel.dtype))
                        written.append(track_id)
                        n_frames.append(result[1])
                    bar.update()
                    if progress is not None:
                        progress(done, len(tracks))
            mel.resize(len(written), axis=0)
            h5.create_dataset("track_id", data=written, dtype=h5py.string_dtype("utf-8"))
            h5.create_dataset("n_frames", data=np.array(n_frames, dtype=np.int32))
            h5.attrs["mel_config"] = json.dumps(cfg.to_dict(), sort_keys=True)
            h5.attrs["versions"] = json.dumps(_library_versions(), sort_keys=True)
            h5.attrs["failed"] = json.dumps(failed)  # the stage's record of tracks left out, with reasons
    except BrokenProcessPool as exc:  # killed by the OOM killer, say
        raise MelsearchError(f"{out_path}: a feature worker process died ({exc})") from exc
    log.info("%s: %d tracks written, %d failed", out_path, len(written), len(failed))
    return {"written": len(written), "failed": failed}


def _check_unique(track_ids: Sequence[str], path: Path) -> None:
    duplicates = sorted(track_id for track_id, count in Counter(track_ids).items() if count > 1)
    if duplicates:
        raise MelsearchError(f"{path}: duplicate track ids: {', '.join(duplicates[:5])}")



def merge_feature_shards(shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike) -> dict:
    """Join shards into one logical features file that training reads.

    ``mel`` is an HDF5 virtual dataset (N, n_mels, n_frames) mapping each shard's rows in the order of
    ``shard_paths``, by paths relative to ``out_path``'s folder (so the folder can be moved); ``track_id``
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
    sources, track_ids, n_frames = [], [], []
    for shard in map(Path, shard_paths):
        with open_features_h5(shard) as h5:
            shard_cfg = MelConfig.from_dict(json.loads(h5.attrs["mel_config"]))
            if cfg is None:
                cfg, versions, first = shard_cfg, h5.attrs.get("versions", "{}"), shard
            elif shard_cfg != cfg:
                raise MelsearchError(f"{shard}: mel_config {shard_cfg} differs from {first}'s {cfg}")
            relative = os.path.relpath(shard.resolve(), out_path.parent)
            sources.append((relative, h5["mel"].shape))
            track_ids.extend(h5["track_id"].asstr()[...])
            n_frames.append(h5["n_frames"][...])
    if cfg is None:
        raise MelsearchError(f"{out_path}: no shards to merge")
    _check_unique(track_ids, out_path)
    layout = h5py.VirtualLayout(shape=(len(track_ids), cfg.n_mels, cfg.n_frames), dtype=cfg.dtype)
    offset = 0
    for relative, shape in sources:
        if shape[0]:
            layout[offset : offset + shape[0]] = h5py.VirtualSource(relative, "mel", shape=shape)
            offset += shape[0]
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_virtual_dataset("mel", layout)
        h5.create_dataset("track_id", data=track_ids, dtype=h5py.string_dtype("utf-8"))
        h5.create_dataset("n_frames", data=np.concatenate(n_frames).astype(np.int32))
        h5.attrs["mel_config"] = json.dumps(cfg.to_dict(), sort_keys=True)
        h5.attrs["versions"] = versions
        h5.attrs["shards"] = json.dumps([relative for relative, _ in sources])
    log.info("%s: %d tracks from %d shards", out_path, len(track_ids), len(sources))
    return {"tracks": len(track_ids)}

