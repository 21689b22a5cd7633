"""The features stage through the command line: values against librosa, track ids, cache keys."""

import h5py
import librosa
import numpy as np
from helpers import melsearch

from pipeline.audio import load_audio
from pipeline.manifest import read_manifest


def test_features_on_real_clips_match_librosa_and_new_settings_make_new_outputs(real_audio_dir, tmp_path):
    workdir = tmp_path / "work"
    args = ("run", "--stage", "features", "--audio-dir", str(real_audio_dir), "--workdir", str(workdir),
            "--set", "features.dtype=float32")
    melsearch(*args)
    (folder,) = workdir.glob("features/*")
    manifest = {r["track_id"]: r for r in read_manifest(next(workdir.glob("dataset/*/manifest.parquet")))}
    with h5py.File(folder / "features.h5", "r") as h5:
        ids = list(h5["track_id"].asstr()[...])
        assert sorted(ids) == sorted(manifest) and len(ids) == 30
        for row in (0, 13, 29):
            y, _ = load_audio(manifest[ids[row]]["path"], sr=22050, max_seconds=30.0)
            y = np.pad(y, (0, max(0, 661500 - len(y))))[:661500]
            reference = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=22050, n_fft=2048,
                                                                           hop_length=512, n_mels=128))
            np.testing.assert_allclose(h5["mel"][row], reference, atol=1e-3, rtol=0)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}

    melsearch(*args, "--set", "features.n_mels=96")
    folders = sorted(workdir.glob("features/*"))
    assert len(folders) == 2
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # the old output is untouched
    (new,) = [f for f in folders if f != folder]
    with h5py.File(new / "features.h5", "r") as h5:
        assert h5["mel"].shape == (30, 96, 1292)
