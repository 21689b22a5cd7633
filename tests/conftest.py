"""Shared fixtures: synthetic labelled audio, the real GTZAN sample clips, broken files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.synth import write_synthetic_dataset

REAL_AUDIO = os.environ.get("MELSEARCH_REAL_AUDIO", "")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """4 classes x 6 clips of 4 s at 22050 Hz, GTZAN's layout (``<class>/<class>.NNNNN.wav``)."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, n_per_class=6, seconds=4.0, n_classes=4, seed=1)
    return out


@pytest.fixture(scope="session")
def real_audio_dir() -> Path:
    """The real GTZAN clips named by MELSEARCH_REAL_AUDIO (set by .ci/run); skips when absent."""
    if not REAL_AUDIO or not Path(REAL_AUDIO).is_dir():
        pytest.skip("MELSEARCH_REAL_AUDIO is not set to a folder of real clips")
    return Path(REAL_AUDIO)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def add_broken_files(folder: Path) -> dict[str, Path]:
    """Put a zero-byte .wav, a text file named .mp3 and a truncated .au into ``folder``'s first label folders."""
    labels = sorted(p for p in folder.iterdir() if p.is_dir())
    empty = labels[0] / "empty.wav"
    empty.write_bytes(b"")
    text = labels[1] / "notes.mp3"
    text.write_text("this is not audio\n" * 50)
    truncated = labels[-1] / "cut.au"
    sf.write(truncated, np.zeros(22050, dtype=np.float32), 22050, format="AU", subtype="PCM_16")
    truncated.write_bytes(truncated.read_bytes()[:20000])
    return {"empty": empty, "text": text, "truncated": truncated}


@pytest.fixture
def copy_tree(tmp_path):
    """Copy a folder under tmp_path (tests may add broken files to the copy)."""

    def _copy(src: Path, name: str = "audio") -> Path:
        return Path(shutil.copytree(src, tmp_path / name))

    return _copy
