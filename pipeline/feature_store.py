"""The read side of the features stage: :class:`FeatureStore` over a shard or the merged ``features.h5``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import MelsearchError
from pipeline.layout import rerun_hint
from pipeline.mel import MelConfig


def open_features_h5(path: str | os.PathLike) -> h5py.File:
    """Open a features file read-only, or raise MelsearchError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MelsearchError(f"{path}: no features file here (run the features stage first)")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise MelsearchError(f"{path}: unreadable features file ({exc}){rerun_hint(path)}") from exc
    if not {"mel", "track_id", "n_frames"} <= set(h5) or "mel_config" not in h5.attrs:
        h5.close()
        raise MelsearchError(f"{path}: not a features file (needs mel, track_id, n_frames and mel_config)")
    return h5


class FeatureStore:
    """Read side of a features file (a shard or a merged file): ids, true lengths and log-mels by position.

    Attributes
    ----------
    config : the :class:`MelConfig` the features were made with.
    track_ids : the tracks, in row order.
    n_frames : (N,) int32 frames holding audio per track.

    The HDF5 handle is reopened in a forked or unpickled copy (e.g. a DataLoader worker), since an
    h5py handle must not cross processes.
    """

    def __init__(self, path: str | os.PathLike, h5: h5py.File) -> None:
        self.path = Path(path)
        self.config = MelConfig.from_dict(json.loads(h5.attrs["mel_config"]))
        self.track_ids: list[str] = list(h5["track_id"].asstr()[...])
        self.n_frames: np.ndarray = h5["n_frames"][...].astype(np.int32)
        self._positions = {track_id: position for position, track_id in enumerate(self.track_ids)}
        self._h5: h5py.File | None = h5
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str | os.PathLike, *, expect: MelConfig | None = None) -> FeatureStore:
        """Open ``path`` read-only; with ``expect``, refuse features made with another configuration.

        Raises
        ------
        MelsearchError
            Naming the file when it is missing, unreadable, not a features file, refers to a shard that
            is gone (a virtual dataset would silently read zeros), or its config differs from ``expect``.
        """
        path = Path(path)
        h5 = open_features_h5(path)
        try:
            mel = h5["mel"]
            if mel.is_virtual:
                for source in mel.virtual_sources():
                    if source.file_name != "." and not (path.parent / source.file_name).is_file():
                        raise MelsearchError(f"{path}: its shard {source.file_name} is missing{rerun_hint(path)}")
            store = cls(path, h5)
        except OSError as exc:
            h5.close()
            raise MelsearchError(f"{path}: unreadable features file ({exc}){rerun_hint(path)}") from exc
        except BaseException:
            h5.close()
            raise
        if expect is not None and store.config != expect:
            store.close()
            raise MelsearchError(f"{path}: features made with {store.config}, expected {expect}")
        return store

    def __len__(self) -> int:
        return len(self.track_ids)

    def index_of(self, track_ids: Sequence[str]) -> np.ndarray:
        """Row positions (int64) of ``track_ids``; MelsearchError naming the ids not in this file."""
        missing = [track_id for track_id in track_ids if track_id not in self._positions]
        if missing:
            raise MelsearchError(f"{self.path}: no features for track(s) {', '.join(missing[:5])}")
        return np.array([self._positions[track_id] for track_id in track_ids], dtype=np.int64)

    def read(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Log-mels at ``positions``: (len(positions), n_mels, n_frames) float32 dB, in the given order."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        return self.read_crops(positions, np.zeros(positions.size, dtype=np.int64), self.config.n_frames)

    def read_crops(self, positions: Sequence[int] | np.ndarray, starts: Sequence[int] | np.ndarray,
                   length: int) -> np.ndarray:
        """Frames ``start : start + length`` of the log-mels at ``positions``: (len(positions), n_mels, length)
        float32 dB, in the given order.

        Each window is one HDF5 read in the stored dtype (of only its part of the track's chunk), converted to
        float32 by numpy: float16 to float32 is exact, and faster than HDF5's own conversion.
        """
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if positions.size and not (0 <= positions.min() and positions.max() < len(self)):
            raise MelsearchError(f"{self.path}: positions out of range 0..{len(self) - 1}")
        last = self.config.n_frames - length
        if starts.size != positions.size or (starts.size and not (0 <= starts.min() and starts.max() <= last)):
            raise MelsearchError(f"{self.path}: one start per position, in 0..{last} for crops of {length} frames")
        mel = self._file()["mel"]
        out = np.empty((positions.size, self.config.n_mels, length), dtype=mel.dtype)
        try:
            for row, (position, start) in enumerate(zip(positions, starts, strict=True)):
                mel.read_direct(out, source_sel=np.s_[position, :, start : start + length], dest_sel=np.s_[row])
        except OSError as exc:  # a damaged file or shard: HDF5 cannot read the chunk
            raise MelsearchError(f"{self.path}: unreadable log-mels ({exc}){rerun_hint(self.path)}") from exc
        return out.astype(np.float32, copy=False)

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._h5

    def close(self) -> None:
        """Close the HDF5 file (reads after this reopen it)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_h5": None}

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def feature_figures(path: str | os.PathLike) -> dict:
    """Headline figures of a merged features file: ``tracks``, ``shards``, ``failed`` and ``failed_tracks``.

    ``failed_tracks`` are the shards' records of tracks left out (``{"track_id", "path", "reason"}``).
    """
    path = Path(path)
    with open_features_h5(path) as h5:
        tracks, shards = len(h5["track_id"]), json.loads(h5.attrs.get("shards", "[]"))
    failed = []
    for shard in shards:
        with open_features_h5(path.parent / shard) as h5:
            failed.extend(json.loads(h5.attrs.get("failed", "[]")))
    return {"tracks": tracks, "shards": len(shards), "failed": len(failed), "failed_tracks": failed}
