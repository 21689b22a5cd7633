"""The reference log-mel (librosa itself) and small synthetic signals, shared by the mel and shard tests."""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np

from pipeline.mel import MelConfig

SR = 22050
TOLERANCE_DB = 1e-3
SHORT = MelConfig(duration_s=3.0, dtype="float32")  # keeps the tests fast


def librosa_log_mel(samples: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """The reference: librosa's melspectrogram (power 2, centred) then power_to_db with its defaults, or for
    ``compression="log10"`` musicnn's ``log10(10000 * mel + 1)`` (musicnn/extractor.py)."""
    mel = librosa.feature.melspectrogram(
        y=samples,
        sr=cfg.sr,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        fmin=cfg.fmin,
        fmax=cfg.fmax,
    )
    return np.log10(10000 * mel + 1) if cfg.compression == "log10" else librosa.power_to_db(mel)


def librosa_log_mel_for_file(path: Path, cfg: MelConfig) -> np.ndarray:
    samples, _ = librosa.load(path, sr=cfg.sr, duration=cfg.duration_s)
    return librosa_log_mel(librosa.util.fix_length(samples, size=cfg.n_samples), cfg)


def sine(freq: float, seconds: float, sr: int = SR) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)
