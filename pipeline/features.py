"""The features stage: log-mel spectrograms of every track, extracted in parallel into HDF5 shards.

Pure compute (:func:`extract_log_mel`, :func:`log_mel_for_file`), one writer per output file
(:func:`write_feature_shard`, :func:`merge_feature_shards`) and the read side (:class:`FeatureStore`)
that training, embeddings and queries use. Every setting lives in :class:`MelConfig`, which is stored
in each file's attributes so features made with other settings are never read by mistake.

The log-mel equals ``librosa.power_to_db(librosa.feature.melspectrogram(y=...))`` to well within
1e-3 dB (about 1e-5 dB), at two thirds of the cost: the mel filterbank is built once per process and
applied to cache-sized blocks of the spectrum, skipping most of its zeros.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import librosa
import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

import pipeline
from pipeline.audio import load_audio
from pipeline.errors import MelsearchError
from pipeline.io import atomic_path, params_key

log = logging.getLogger(__name__)

STORAGE_DTYPES = ("float16", "float32")
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Choi et al. 2017, "Convolutional recurrent neural networks for music classification": 96 x 1366 inputs.
    "choi": {"sr": 12000, "n_fft": 512, "hop_length": 256, "n_mels": 96, "duration_s": 29.12},
}
# librosa.power_to_db's defaults, fixed here so a librosa release cannot change our features silently.
_DB_REF, _DB_AMIN, _DB_TOP = 1.0, 1e-10, 80.0
# Frames per FFT call: small enough that a block and its spectrum stay in a core's L2 cache.
_FFT_BLOCK = 64
# Mel bands per matrix product: fewer means fewer zeros multiplied but more calls (16 is fastest for 128).
_BANDS_PER_GROUP = 16
# Results a pool may hold beyond those being written, per worker: keeps workers busy, bounds memory.
_IN_FLIGHT_PER_WORKER = 2
# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@dataclass(frozen=True)
class MelConfig:
    """Every parameter of the log-mel; stored in the HDF5 attributes and in model checkpoints.

    ``sr`` in Hz; ``n_fft`` and ``hop_length`` in samples; ``fmin``/``fmax`` in Hz (``fmax=None``: sr / 2);
    ``duration_s``: clips are padded with zeros or cropped to this many seconds; ``dtype``: storage dtype.
    """

    sr: int = 22050
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    duration_s: float = 30.0
    fmin: float = 0.0
    fmax: float | None = None
    dtype: str = "float16"

    def __post_init__(self) -> None:
        # Normalise types so that 30 and 30.0 give one cache key, then check ranges.
        for name in ("sr", "n_fft", "hop_length", "n_mels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not float(value).is_integer() or value <= 0:
                raise MelsearchError(f"MelConfig.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "duration_s", float(self.duration_s))
        object.__setattr__(self, "fmin", float(self.fmin))
        if self.fmax is not None:
            object.__setattr__(self, "fmax", float(self.fmax))
        if self.duration_s <= 0:
            raise MelsearchError(f"MelConfig.duration_s must be > 0, got {self.duration_s}")
        top = self.sr / 2 if self.fmax is None else self.fmax
        if not 0 <= self.fmin < top <= self.sr / 2:
            raise MelsearchError(f"MelConfig needs 0 <= fmin < fmax <= sr/2, got fmin={self.fmin}, fmax={self.fmax}")
        if self.dtype not in STORAGE_DTYPES:
            raise MelsearchError(f"MelConfig.dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MelConfig:
        """A named preset (``"default"``, or ``"choi"``: sr 12000, n_fft 512, hop 256, 96 mels, 29.12 s)."""
        if name not in PRESETS:
            raise MelsearchError(f"unknown mel preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @property
    def n_samples(self) -> int:
        """Samples in a padded/cropped clip: ``round(duration_s * sr)``."""
        return int(round(self.duration_s * self.sr))

    @property
    def n_frames(self) -> int:
        """Frames of a padded/cropped clip (centred STFT): ``1 + n_samples // hop_length``."""
        return 1 + self.n_samples // self.hop_length

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MelConfig:
        """Inverse of :meth:`to_dict`; missing fields take their defaults, unknown ones are an error."""
        unknown = set(d) - {field.name for field in fields(cls)}
        if unknown:
            raise MelsearchError(f"unknown MelConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def key(self) -> str:
        """Short hash of every field: the features' cache key."""
        return params_key(self.to_dict())


@dataclass(frozen=True)
class _MelPlan:
    """What one configuration needs for every clip, built once per process."""

    window: np.ndarray  # (n_fft,) float64 periodic Hann, as librosa.stft uses
    # The Slaney filterbank (n_mels, 1 + n_fft // 2) float32 is 98% zeros: it is kept as groups of
    # consecutive bands, each with the bins where any of them is non-zero: (first band, first bin, weights).
    groups: tuple[tuple[int, int, np.ndarray], ...]


@functools.lru_cache(maxsize=8)
def _mel_plan(cfg: MelConfig) -> _MelPlan:
    filters = librosa.filters.mel(
        sr=cfg.sr, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, dtype=np.float32
    )
    groups = []
    for first in range(0, cfg.n_mels, _BANDS_PER_GROUP):
        weights = filters[first : first + _BANDS_PER_GROUP]
        bins = np.flatnonzero(weights.any(axis=0))
        lo, hi = (int(bins[0]), int(bins[-1]) + 1) if bins.size else (0, 0)
        groups.append((first, lo, np.ascontiguousarray(weights[:, lo:hi])))
    window = librosa.filters.get_window("hann", cfg.n_fft, fftbins=True)
    return _MelPlan(window=window, groups=tuple(groups))


def _mel_power(samples: np.ndarray, cfg: MelConfig, plan: _MelPlan) -> np.ndarray:
    """Mel power spectrogram ``filters @ |STFT|^2``: (n_mels, 1 + n_samples // hop_length) float32.

    The STFT frames like librosa.stft(center=True, pad_mode="constant"), and runs in float64 because
    librosa's window is float64 (numpy's FFT is no faster in float32). Going block by block keeps the
    spectrum in cache, and the grouped filterbank skips most of the zeros of the dense one.
    """
    padded = np.pad(samples, cfg.n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft)[:: cfg.hop_length]  # (n_frames, n_fft)
    mel = np.empty((cfg.n_mels, frames.shape[0]), dtype=np.float32)
    for start in range(0, frames.shape[0], _FFT_BLOCK):
        spectrum = np.fft.rfft(frames[start : start + _FFT_BLOCK] * plan.window, axis=-1)  # (block, n_bins)
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
        for first, lo, weights in plan.groups:
            block = mel[first : first + weights.shape[0], start : start + _FFT_BLOCK]
            np.matmul(weights, power[:, lo : lo + weights.shape[1]].T, out=block)
    return mel


def extract_log_mel(samples: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """Log-mel spectrogram of one clip.

    ``10 * log10(max(mel @ |STFT|^2, 1e-10))``, floored at 80 dB below its maximum: librosa's
    ``power_to_db(melspectrogram(y, sr, n_fft, hop_length, n_mels, fmin, fmax))`` (Slaney mel filters,
    periodic Hann window, centred frames with zero padding).

    Parameters
    ----------
    samples : (n_samples,) float32 mono audio at ``cfg.sr`` Hz (other float dtypes are cast to float32).
    cfg : the mel parameters; ``duration_s`` is not applied here (see :func:`log_mel_for_file`).

    Returns
    -------
    (n_mels, 1 + n_samples // hop_length) float32, dB relative to 1.0.
    """
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.size == 0:
        raise MelsearchError(f"extract_log_mel needs non-empty 1-D samples, got shape {samples.shape}")
    mel = _mel_power(samples.astype(np.float32, copy=False), cfg, _mel_plan(cfg))
    if not np.isfinite(mel).all():
        raise MelsearchError("samples contain NaN or infinity")
    return librosa.power_to_db(mel, ref=_DB_REF, amin=_DB_AMIN, top_db=_DB_TOP)


def log_mel_for_file(path: str | os.PathLike, cfg: MelConfig) -> tuple[np.ndarray, int]:
    """Decode ``path``, pad with zeros or crop to ``cfg.duration_s``, and extract its log-mel.

    Returns
    -------
    mel : (n_mels, cfg.n_frames) float32 dB.
    n_frames : the frames that hold audio (fewer than ``cfg.n_frames`` when the clip is short).

    Raises
    ------
    MelsearchError
        ``"<path>: <reason>"`` when the file cannot be decoded or holds non-finite samples.
    """
    samples, _ = load_audio(path, sr=cfg.sr, max_seconds=cfg.duration_s)
    n_true = min(samples.size, cfg.n_samples)
    try:
        mel = extract_log_mel(librosa.util.fix_length(samples, size=cfg.n_samples), cfg)
    except MelsearchError as exc:
        raise MelsearchError(f"{path}: {exc}") from exc
    return mel, 1 + n_true // cfg.hop_length


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


def _init_worker(cfg: MelConfig, parent_pid: int) -> None:
    """Pool initializer: build the mel plan once, leave Ctrl-C to the parent, exit if the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _keep_freed_memory()
    _mel_plan(cfg)
    # A SIGKILLed parent cannot stop its pool, and an idle worker would wait on its queue forever.
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _keep_freed_memory() -> None:
    """Let glibc reuse freed arrays rather than hand them back to the kernel after every clip.

    Each clip allocates and frees a few MB of arrays; by default glibc unmaps or trims them and the next
    clip page-faults them back in, which costs a fifth of the CPU time. A pool worker is ours to tune;
    it then keeps at most its high-water mark. A no-op where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's ceiling on 64-bit; larger arrays are still mapped
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


@contextlib.contextmanager
def _extraction(paths: list[str], cfg: MelConfig, workers: int) -> Iterator[Iterator[tuple[np.ndarray, int] | str]]:
    """Yield an iterator of :func:`_extract_track` over ``paths``, in order, computed by ``workers`` processes.

    The pool starts (forks) on entry, before the caller opens files or starts threads. At most
    ``_IN_FLIGHT_PER_WORKER * workers`` results wait in memory at any time.
    """
    if workers == 1:
        yield (_extract_track(path, cfg) for path in paths)
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(cfg, os.getpid()))
    try:
        todo = iter(paths)
        pending = deque(
            pool.submit(_extract_track, path, cfg) for path in itertools.islice(todo, _IN_FLIGHT_PER_WORKER * workers)
        )

        def in_order() -> Iterator[tuple[np.ndarray, int] | str]:
            while pending:
                result = pending.popleft().result()
                for path in itertools.islice(todo, 1):
                    pending.append(pool.submit(_extract_track, path, cfg))
                yield result

        yield in_order()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
            _extraction([path for _, path in tracks], cfg, workers) as results,
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


def _open_h5(path: str | os.PathLike) -> h5py.File:
    """Open a features file read-only, or raise MelsearchError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MelsearchError(f"{path}: no features file here (run the features stage first)")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise MelsearchError(f"{path}: unreadable features file ({exc})") from exc
    if not {"mel", "track_id", "n_frames"} <= set(h5) or "mel_config" not in h5.attrs:
        h5.close()
        raise MelsearchError(f"{path}: not a features file (needs mel, track_id, n_frames and mel_config)")
    return h5


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
        with _open_h5(shard) as h5:
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
        h5 = _open_h5(path)
        try:
            mel = h5["mel"]
            if mel.is_virtual:
                for source in mel.virtual_sources():
                    if source.file_name != "." and not (path.parent / source.file_name).is_file():
                        raise MelsearchError(f"{path}: its shard {source.file_name} is missing")
            store = cls(path, h5)
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
        if positions.size and not (0 <= positions.min() and positions.max() < len(self)):
            raise MelsearchError(f"{self.path}: positions out of range 0..{len(self) - 1}")
        mel = self._file()["mel"]
        out = np.empty((positions.size, self.config.n_mels, self.config.n_frames), dtype=np.float32)
        for row, position in enumerate(positions):
            mel.read_direct(out, source_sel=np.s_[position], dest_sel=np.s_[row])
        return out

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
