"""Log-mel spectrograms: the settings (:class:`MelConfig`), the maths, and one audio file's log-mel.

Every setting lives in :class:`MelConfig`, which is stored in each features file's attributes and in model
checkpoints, so features made with other settings are never read by mistake.

The log-mel equals ``librosa.power_to_db(librosa.feature.melspectrogram(y=...))`` to well within
1e-3 dB (about 1e-4 dB on real music), at about half of librosa's CPU time: the window and the mel
filterbank are built once per process, the STFT runs in float32 on cache-sized blocks of frames, and the
filterbank is applied band group by band group, skipping most of its zeros. The filterbank, window and dB
scale are librosa's formulas written out in numpy (and tested equal), so that a pool worker needs no
librosa, scipy or numba: importing them took a worker 2.6 s.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from pipeline.audio import load_audio, load_audio_spread
from pipeline.errors import MelsearchError
from pipeline.io import params_key

STORAGE_DTYPES = ("float16", "float32")
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Choi et al. 2017, "Convolutional recurrent neural networks for music classification": 96 x 1366 inputs.
    "choi": {"sr": 12000, "n_fft": 512, "hop_length": 256, "n_mels": 96, "duration_s": 29.12},
    # Pons & Serra 2019, MSD_musicnn's input (models/musicnn.py): 16 kHz, 96 bands, log10(1 + 10000 * power).
    "musicnn": {"sr": 16000, "n_fft": 512, "hop_length": 256, "n_mels": 96, "compression": "log10"},
}
# How mel power becomes the stored values: decibels (librosa.power_to_db), or musicnn's log10(1 + 10000 * power).
COMPRESSIONS = ("db", "log10")
_LOG10_GAIN = 10000.0
# librosa.power_to_db's defaults, fixed here so a librosa release cannot change our features silently.
_DB_REF, _DB_AMIN, _DB_TOP = 1.0, 1e-10, 80.0
# Slaney's mel scale as librosa writes it: 200/3 Hz per mel up to 1 kHz, then log(6.4)/27 per mel.
_MEL_F_SP, _MEL_MIN_LOG_HZ, _MEL_LOGSTEP = 200.0 / 3, 1000.0, float(np.log(6.4) / 27.0)
# Samples per FFT call (frames x n_fft): 192 KiB of float32 frames, so that a block, its complex spectrum
# and its power stay in cache; measured fastest for n_fft 2048 (24 frames) and 512 (96 frames).
_FFT_BLOCK_SAMPLES = 49152
# Mel bands per matrix product: fewer means fewer zeros multiplied but more calls (16 is fastest for 128).
_BANDS_PER_GROUP = 16


@dataclass(frozen=True)
class MelConfig:
    """Every parameter of the log-mel; stored in the HDF5 attributes and in model checkpoints.

    ``sr`` in Hz; ``n_fft`` and ``hop_length`` in samples; ``fmin``/``fmax`` in Hz (``fmax=None``: sr / 2);
    ``duration_s``: clips are padded with zeros or cropped to this many seconds; ``dtype``: storage dtype;
    ``compression``: ``"db"`` (``power_to_db``, dB re 1.0, floored 80 dB below the clip's maximum) or ``"log10"``
    (``log10(1 + 10000 * power)``, what the pretrained musicnn expects); ``segments``: how a track longer than
    ``duration_s`` is covered, 1 = its first ``duration_s`` seconds, k > 1 = k windows of ``duration_s / k``
    seconds spread evenly over the whole track and concatenated (a shorter track is read whole either way).
    """

    sr: int = 22050
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    duration_s: float = 30.0
    fmin: float = 0.0
    fmax: float | None = None
    dtype: str = "float16"
    compression: str = "db"
    segments: int = 1

    def __post_init__(self) -> None:
        # Normalise types so that 30 and 30.0 give one cache key, then check ranges.
        for name in ("sr", "n_fft", "hop_length", "n_mels", "segments"):
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
        if self.compression not in COMPRESSIONS:
            raise MelsearchError(f"MelConfig.compression must be one of {COMPRESSIONS}, got {self.compression!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MelConfig:
        """A named preset: ``"default"``, ``"choi"`` (sr 12000, n_fft 512, hop 256, 96 mels, 29.12 s) or ``"musicnn"``
        (sr 16000, n_fft 512, hop 256, 96 mels, log10 compression), with ``overrides`` of any field."""
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
        """Short hash of every field: the features' cache key.

        ``segments`` counts only when it is not 1, so settings made before it existed keep their key (and
        their features folders and models).
        """
        fields_set = self.to_dict()
        if fields_set["segments"] == 1:
            del fields_set["segments"]
        return params_key(fields_set)


@dataclass(frozen=True)
class _MelPlan:
    """What one configuration needs for every clip, built once per process."""

    window: np.ndarray  # (n_fft,) float32 periodic Hann, as librosa.stft uses (there in float64)
    block: int  # frames per FFT call
    # The Slaney filterbank (n_mels, 1 + n_fft // 2) float32 is 98% zeros: it is kept as groups of
    # consecutive bands, each with the bins where any of them is non-zero: (first band, first bin, weights).
    groups: tuple[tuple[int, int, np.ndarray], ...]


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    hz = np.asanyarray(hz, dtype=np.float64)
    mels = hz / _MEL_F_SP
    log_part = hz >= _MEL_MIN_LOG_HZ
    mels = np.where(log_part, _MEL_MIN_LOG_HZ / _MEL_F_SP + np.log(np.maximum(hz, 1e-300) / _MEL_MIN_LOG_HZ)
                    / _MEL_LOGSTEP, mels)
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    freqs = _MEL_F_SP * mels
    min_log_mel = _MEL_MIN_LOG_HZ / _MEL_F_SP
    return np.where(mels >= min_log_mel, _MEL_MIN_LOG_HZ * np.exp(_MEL_LOGSTEP * (mels - min_log_mel)), freqs)


def slaney_mel_filters(cfg: MelConfig) -> np.ndarray:
    """The mel filterbank of ``cfg``: (n_mels, 1 + n_fft // 2) float32, ``librosa.filters.mel``'s defaults.

    Triangles between consecutive centres equally spaced on Slaney's mel scale from ``fmin`` to ``fmax``,
    each scaled by ``2 / (upper edge - lower edge)`` in Hz (Slaney's equal-area normalisation).
    """
    fmax = cfg.sr / 2 if cfg.fmax is None else cfg.fmax
    fft_hz = np.fft.rfftfreq(cfg.n_fft, d=1.0 / cfg.sr)  # (n_bins,)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(fmax), cfg.n_mels + 2))  # (n_mels + 2,)
    widths, ramps = np.diff(edges_hz), np.subtract.outer(edges_hz, fft_hz)
    weights = np.zeros((cfg.n_mels, fft_hz.size), dtype=np.float32)
    for band in range(cfg.n_mels):  # the same operations, in the same order, as librosa: the same float32 bits
        lower, upper = -ramps[band] / widths[band], ramps[band + 2] / widths[band + 1]
        weights[band] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (edges_hz[2 : cfg.n_mels + 2] - edges_hz[: cfg.n_mels]))[:, np.newaxis]
    return weights


def _power_to_db(power: np.ndarray) -> np.ndarray:
    """``librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=80.0)``, in the input's dtype."""
    db = 10.0 * np.log10(np.maximum(_DB_AMIN, power))
    db -= 10.0 * np.log10(max(_DB_AMIN, _DB_REF))
    return np.maximum(db, db.max() - _DB_TOP)


@functools.lru_cache(maxsize=8)
def mel_plan(cfg: MelConfig) -> _MelPlan:
    """The window and grouped filterbank of ``cfg``, built once per process (a pool worker builds it at start)."""
    filters = slaney_mel_filters(cfg)
    groups = []
    for first in range(0, cfg.n_mels, _BANDS_PER_GROUP):
        weights = filters[first : first + _BANDS_PER_GROUP]
        bins = np.flatnonzero(weights.any(axis=0))
        lo, hi = (int(bins[0]), int(bins[-1]) + 1) if bins.size else (0, 0)
        groups.append((first, lo, np.ascontiguousarray(weights[:, lo:hi])))
    # periodic Hann, scipy.signal.get_window("hann", n_fft, fftbins=True)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)).astype(np.float32)
    block = max(8, _FFT_BLOCK_SAMPLES // cfg.n_fft)
    return _MelPlan(window=window, block=block, groups=tuple(groups))


def _mel_power(samples: np.ndarray, cfg: MelConfig, plan: _MelPlan, *, n_samples: int | None = None) -> np.ndarray:
    """Mel power spectrogram ``filters @ |STFT|^2``: (n_mels, 1 + n_samples // hop_length) float32.

    ``samples`` is (any,) float32, cut or padded with zeros to ``n_samples`` (default: its length) in the
    same buffer as the STFT's centring, so the clip is copied once.

    The STFT frames like librosa.stft(center=True, pad_mode="constant")
    but stays in float32 (numpy >= 2 has a float32 FFT, twice as fast as librosa's float64 one); the
    rounding this adds is about 1e-4 dB where it matters, in bands within 80 dB of the peak. Going block
    by block keeps the spectrum in cache, and the grouped filterbank skips most of the dense one's zeros.
    """
    n_samples = samples.size if n_samples is None else n_samples
    half, kept = cfg.n_fft // 2, min(samples.size, n_samples)
    padded = np.zeros(n_samples + 2 * half, dtype=np.float32)
    padded[half : half + kept] = samples[:kept]
    frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.n_fft)[:: cfg.hop_length]  # (n_frames, n_fft)
    mel = np.empty((cfg.n_mels, frames.shape[0]), dtype=np.float32)
    for start in range(0, frames.shape[0], plan.block):
        spectrum = np.fft.rfft(frames[start : start + plan.block] * plan.window, axis=-1)  # (block, n_bins) complex64
        power = spectrum.real**2 + spectrum.imag**2  # float32
        for first, lo, weights in plan.groups:
            block = mel[first : first + weights.shape[0], start : start + plan.block]
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
    (n_mels, 1 + n_samples // hop_length) float32: dB relative to 1.0, or ``log10(1 + 10000 * power)`` when
    ``cfg.compression == "log10"``.
    """
    samples = np.asarray(samples)
    if samples.ndim != 1 or samples.size == 0:
        raise MelsearchError(f"extract_log_mel needs non-empty 1-D samples, got shape {samples.shape}")
    return _log_mel(samples, cfg, samples.size)


def _log_mel(samples: np.ndarray, cfg: MelConfig, n_samples: int) -> np.ndarray:
    mel = _mel_power(samples, cfg, mel_plan(cfg), n_samples=n_samples)  # the cast to float32 happens here
    if not np.isfinite(mel).all():
        raise MelsearchError("samples contain NaN or infinity")
    if cfg.compression == "log10":
        return np.log10(np.float32(_LOG10_GAIN) * mel + np.float32(1.0))
    return _power_to_db(mel)


def log_mel_for_file(path: str | os.PathLike, cfg: MelConfig) -> tuple[np.ndarray, int]:
    """Decode ``path``, pad with zeros or crop to ``cfg.duration_s``, and extract its log-mel.

    With ``cfg.segments > 1`` a track longer than ``duration_s`` is represented by that many windows spread
    over all of it (:func:`pipeline.audio.load_audio_spread`, one window in memory at a time), concatenated;
    the features stage, the embeddings, ``encode``, ``predict`` and queries by file all come through here.

    Returns
    -------
    mel : (n_mels, cfg.n_frames) float32 dB.
    n_frames : the frames that hold audio (fewer than ``cfg.n_frames`` when the clip is short).

    Raises
    ------
    MelsearchError
        ``"<path>: <reason>"`` when the file cannot be decoded or holds non-finite samples.
    """
    if cfg.segments == 1:
        samples, _ = load_audio(path, sr=cfg.sr, max_seconds=cfg.duration_s)
    else:
        samples, _ = load_audio_spread(path, sr=cfg.sr, total_s=cfg.duration_s, segments=cfg.segments)
    n_true = min(samples.size, cfg.n_samples)
    try:
        mel = _log_mel(samples, cfg, cfg.n_samples)
    except MelsearchError as exc:
        raise MelsearchError(f"{path}: {exc}") from exc
    return mel, 1 + n_true // cfg.hop_length

