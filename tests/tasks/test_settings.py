"""Stage settings: every dataclass field settable in three spellings, bad ones refused before anything runs."""

from __future__ import annotations

import json

import h5py
import pytest
from helpers import melsearch

from pipeline.errors import MelsearchError
from pipeline.index import IndexConfig
from pipeline.mel import MelConfig
from pipeline.train import TrainConfig
from tasks import config


def _settings(overrides: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[MelConfig, TrainConfig, IndexConfig]:
    """Configure a fresh copy of Luigi's configuration (the process-wide one is left as it was)."""
    import luigi.configuration

    parser = luigi.configuration.LuigiConfigParser()
    parser.read([str(config.PROJECT_CFG)])
    monkeypatch.setattr(luigi.configuration, "get_config", lambda: parser)
    config.configure(overrides)
    return config.mel_config(), config.train_config("cifar10"), config.index_config()


def test_every_field_of_every_dataclass_is_a_luigi_parameter() -> None:
    for section, settings in config.SETTINGS_OF.items():
        names = set(config.SECTIONS[section].get_param_names(include_significant=True))
        fields = {f for f in settings.__dataclass_fields__ if not (section == "train" and f == "model")}
        assert fields <= names, (section, fields - names)


def test_values_are_parsed_by_the_field_types(monkeypatch: pytest.MonkeyPatch) -> None:
    mel, train, index = _settings({("features", "n_fft"): "1024", ("features", "fmax"): "8000",
                                   ("train", "model_kwargs"): '{"dropout": 0.1}', ("train", "lr"): "3e-4",
                                   ("index", "n_trees"): "80"}, monkeypatch)
    assert (mel.n_fft, mel.fmax, mel.n_mels) == (1024, 8000.0, 128)
    assert train.model_kwargs == {"dropout": 0.1} and train.lr == 3e-4
    assert train.epochs == TrainConfig("cifar10").epochs  # unset: the dataclass default
    assert index == IndexConfig(n_trees=80)


def test_a_preset_is_the_base_that_set_fields_override(monkeypatch: pytest.MonkeyPatch) -> None:
    mel, _, _ = _settings({("features", "preset"): "choi", ("features", "n_mels"): "64"}, monkeypatch)
    assert mel == MelConfig.preset("choi", n_mels=64)


@pytest.mark.parametrize(("overrides", "message"), [
    ({("features", "no_such_option"): "3"}, "unknown setting features.no_such_option"),
    ({("features", "n_fft"): "abc"}, "features.n_fft = 'abc': expected an integer"),
    ({("train", "epochs"): "0"}, "TrainConfig.epochs must be >= 1"),
    ({("train", "model_kwargs"): "[1]"}, "expected a JSON object"),
    ({("index", "search_k"): "0"}, "IndexConfig.search_k must be -1 or > 0"),
    ({("train", "feature_memory_gb"): "lots"},
     "train.feature_memory_gb must be 'auto' or a number of GB >= 0, got 'lots'"),
    ({("dataset", "split"): "nope"}, r"\[dataset\]: nope is not a valid choice"),
    ({("nosection", "x"): "1"}, "unknown settings section 'nosection'"),
])
def test_bad_settings_are_one_line_errors(overrides: dict, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MelsearchError, match=message) as caught:
        _settings(overrides, monkeypatch)
    assert "\n" not in str(caught.value)


def test_flags_sets_and_section_options_all_map_to_settings() -> None:
    overrides = config.settings_from_flags({"epochs": 5, "preset": None, "gtzan_sha256": ["ab"]},
                                           ["features.n-mels=96"], ["--features-n-fft", "1024", "--index-n-trees=7"])
    assert overrides == {("train", "epochs"): "5", ("features", "n_mels"): "96", ("features", "n_fft"): "1024",
                         ("index", "n_trees"): "7", ("dataset", "gtzan_sha256"): '["ab"]',
                         ("dataset", "gtzan_md5"): "[]"}
    with pytest.raises(MelsearchError, match="unrecognised argument '--bogus'"):
        config.settings_from_flags({}, [], ["--bogus", "1"])
    with pytest.raises(MelsearchError, match="--features-n-fft needs a value"):
        config.settings_from_flags({}, [], ["--features-n-fft"])


def test_cli_unknown_option_fails_before_any_stage_and_a_new_value_makes_a_new_folder(synth_dir, tmp_path) -> None:
    workdir = tmp_path / "work"
    base = ("run", "--stage", "features", "--audio-dir", str(synth_dir), "--workdir", str(workdir),
            "--set", "features.duration_s=4")
    bad = melsearch(*base, "--set", "features.no_such_option=3", check=False)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "unknown setting features.no_such_option" in bad.stderr and not workdir.exists()

    melsearch(*base)
    melsearch(*base, "--features-n-fft", "1024")
    folders = sorted(workdir.glob("features/*/features.h5"))
    assert len(folders) == 2
    n_ffts = set()
    for path in folders:
        with h5py.File(path, "r") as h5:
            n_ffts.add(json.loads(h5.attrs["mel_config"])["n_fft"])
    assert n_ffts == {2048, 1024}
    figures = json.loads((folders[0].parent / "figures.json").read_text())
    assert figures["tracks"] == 24 and figures["failed"] == 0
