"""Synthetic labelled audio for tests and the demo: classes a CNN can tell apart.

Each class is a "genre" with its own pitch range, timbre (harmonic roll-off), tempo of note
onsets and noise level; clips within a class vary by seeded random pitches, phases and gains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class SynthClass:
    """One synthetic genre: base pitch in Hz, harmonics, roll-off per harmonic, beats per minute, noise gain."""

    name: str
    base_hz: float
    n_harmonics: int
    rolloff: float
    bpm: float
    noise: float


SYNTH_CLASSES = (
    SynthClass("drone", 110.0, 8, 0.9, 30.0, 0.0),
    SynthClass("chime", 1760.0, 2, 0.3, 120.0, 0.0),
    SynthClass("buzz", 220.0, 20, 0.97, 200.0, 0.02),
    SynthClass("whistle", 880.0, 1, 0.5, 60.0, 0.0),
    SynthClass("static", 440.0, 3, 0.5, 90.0, 0.3),
    SynthClass("bass", 55.0, 4, 0.6, 140.0, 0.01),
)


def synth_clip(cls: SynthClass, *, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of class ``cls``: (seconds * sr,) float32 in [-1, 1].

    Notes start at the class tempo; each note is a harmonic tone whose pitch is the class base
    times a random factor in [0.8, 1.25], under an exponential decay envelope.
    """
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    beat = 60.0 / cls.bpm
    out = np.zeros(n, dtype=np.float64)
    onset = rng.uniform(0, beat)
    while onset < seconds:
        start = int(onset * sr)
        length = min(n - start, int(beat * sr))
        tt = t[:length]
        f0 = cls.base_hz * rng.uniform(0.8, 1.25)
        note = sum(
            cls.rolloff ** (h - 1) * np.sin(2 * np.pi * h * f0 * tt + rng.uniform(0, 2 * np.pi))
            for h in range(1, cls.n_harmonics + 1)
            if h * f0 < sr / 2
        )
        out[start : start + length] += note * np.exp(-tt / (0.4 * beat))
        onset += beat
    out += cls.noise * rng.standard_normal(n)
    out *= rng.uniform(0.5, 0.9) / max(np.abs(out).max(), 1e-9)
    return out.astype(np.float32)


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    n_per_class: int = 10,
    seconds: float = 5.0,
    sr: int = 22050,
    n_classes: int = len(SYNTH_CLASSES),
    seed: int = 0,
    fmt: str = "wav",
) -> list[Path]:
    """Write ``out_dir/<class>/<class>.NNNNN.<fmt>`` clips (GTZAN's layout) and return their paths.

    The same arguments always write the same samples (seeded per class and clip).
    """
    if not 1 <= n_classes <= len(SYNTH_CLASSES):
        raise ValueError(f"n_classes must be in 1..{len(SYNTH_CLASSES)}, got {n_classes}")
    paths = []
    for class_index, cls in enumerate(SYNTH_CLASSES[:n_classes]):
        folder = Path(out_dir) / cls.name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, class_index, i])
            path = folder / f"{cls.name}.{i:05d}.{fmt}"
            sf.write(path, synth_clip(cls, seconds=seconds, sr=sr, rng=rng), sr)
            paths.append(path)
    return paths
