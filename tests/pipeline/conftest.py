"""Fixtures of the library tests."""

from __future__ import annotations

import pytest
import soundfile as sf
from mel_reference import SR, sine

from pipeline.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """Six labelled synthetic clips of 3 s, then a 1 s tone (shorter than SHORT.duration_s), as (track_id, path)."""
    root = tmp_path_factory.mktemp("audio")
    paths = write_synthetic_dataset(root, n_per_class=2, seconds=3.0, sr=SR, n_classes=3, seed=0)
    sf.write(root / "short.wav", sine(440.0, 1.0), SR)
    return [(path.stem, str(path)) for path in paths] + [("short", str(root / "short.wav"))]
