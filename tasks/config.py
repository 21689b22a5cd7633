"""Stage settings: defined once, by the library's frozen dataclasses; Luigi's config sections are built from them.

Each stage section of ``luigi.cfg`` (``[features]``, ``[train]``, ``[index]``) takes every field of its dataclass
(:class:`~pipeline.mel.MelConfig`, :class:`~pipeline.train_config.TrainConfig`, :class:`~pipeline.index.IndexConfig`)
plus a few run settings that shape no output (``processes``, ``device``) or choose what runs (``preset``,
``shard_size``, ``model``). ``[dataset]`` is written out here, having no dataclass. A field left unset takes the
dataclass's default (for ``[features]``, the preset's value). The same names are set with
``--set section.option=value`` or ``--section-option value`` on ``melsearch run``, and ``--section-option`` on
``luigi --module tasks ...``. :func:`configure` refuses an unknown option or a bad value in one line, before any
task runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import luigi
import luigi.configuration

from models import MODEL_NAMES, MODEL_PRESETS
from pipeline.errors import MelsearchError
from pipeline.index import IndexConfig
from pipeline.mel import PRESETS, MelConfig
from pipeline.sources import EXTRACT_MAX_RATIO, EXTRACT_MIN_FREE_GB, GTZAN_MD5, GTZAN_MIRRORS, GTZAN_SHA256
from pipeline.train_config import TrainConfig, parse_memory_gb

# Windows per track in library runs: 10 windows of 3 s over a 30 s input, one training crop (crop_s) each,
# spread over the whole song; a clip no longer than duration_s is read whole whatever the setting.
LIBRARY_SEGMENTS = 10
PROJECT_CFG = Path(__file__).resolve().parent.parent / "luigi.cfg"
# melsearch's own flags and the settings they stand for.
FLAG_SETTINGS = {"split": ("dataset", "split"), "preset": ("features", "preset"), "epochs": ("train", "epochs"),
                 "device": ("train", "device"), "model": ("train", "model")}


def _section(name: str, settings: type, extra: dict[str, luigi.Parameter], skip: Iterable[str] = ()) -> type:
    """A Luigi Config class named ``name`` with an optional string parameter per field of ``settings``."""
    params: dict[str, Any] = {
        field.name: luigi.OptionalParameter(default=None, description=f"{settings.__name__}.{field.name}")
        for field in dataclasses.fields(settings) if field.name not in skip
    }
    fields_of_settings = tuple(params)
    params.update(extra)
    params["settings_fields"] = fields_of_settings
    params["__doc__"] = f"[{name}]: the fields of {settings.__name__}, unset = its default."
    return type(name, (luigi.Config,), params)


class dataset(luigi.Config):  # noqa: N801 (Luigi names a Config's section after its class)
    split = luigi.ChoiceParameter(choices=["auto", "gtzan", "random", "hash"], default="auto")
    split_seed = luigi.IntParameter(default=0)
    gtzan_urls = luigi.ListParameter(default=list(GTZAN_MIRRORS))
    gtzan_sha256 = luigi.ListParameter(default=list(GTZAN_SHA256))
    gtzan_md5 = luigi.ListParameter(default=list(GTZAN_MD5))
    extract_max_ratio = luigi.FloatParameter(default=EXTRACT_MAX_RATIO, description="an --archive's files may total "
                                             "at most this many times its size")
    extract_min_free_gb = luigi.FloatParameter(default=EXTRACT_MIN_FREE_GB, description="and must leave this many "
                                               "GB free on the work directory's disk")


features = _section("features", MelConfig, {
    "preset": luigi.ChoiceParameter(choices=sorted(PRESETS), default="default"),
    "shard_size": luigi.IntParameter(default=256),
    "processes": luigi.IntParameter(default=0, significant=False, description="extraction processes; 0 = every core"),
})
train = _section("train", TrainConfig, {
    "model": luigi.Parameter(default="cifar10", description="cifar10, resnet_v2 or all"),
    "device": luigi.Parameter(default="auto", significant=False),
    "feature_memory_gb": luigi.Parameter(default="auto", significant=False,
                                         description="features up to this float32 size in GB load into memory, "
                                                     "larger ones stream; auto = half the memory available"),
}, skip=("model",))
index = _section("index", IndexConfig, {})
SECTIONS = {"dataset": dataset, "features": features, "train": train, "index": index}
SETTINGS_OF = {"features": MelConfig, "train": TrainConfig, "index": IndexConfig}


def _parse(settings: type, name: str, text: str) -> Any:
    """A setting's string (from luigi.cfg or a flag) as the type its dataclass field declares."""
    kind = typing.get_type_hints(settings)[name]
    args = typing.get_args(kind)
    if (typing.get_origin(kind) in (typing.Union, types.UnionType)) and type(None) in args:
        if text.strip().lower() in ("", "none", "null"):
            return None
        kind = next(arg for arg in args if arg is not type(None))
    if kind is bool:
        if text.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError("expected true or false")
        return text.strip().lower() in ("true", "1", "yes")
    if kind in (int, float, str):
        try:
            value = float(text) if kind is int else kind(text)
        except ValueError:
            raise ValueError(f"expected a{'n integer' if kind is int else ' number'}") from None
        if kind is int and not value.is_integer():
            raise ValueError("expected an integer")
        return int(value) if kind is int else value
    value = json.loads(text)  # Mapping fields, e.g. model_kwargs = {"dropout": 0.2}
    if typing.get_origin(kind) in (Mapping, dict) and not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _fields_set(section: str) -> dict[str, Any]:
    """The fields of ``section``'s dataclass given a value in the configuration, parsed."""
    cfg, settings = SECTIONS[section](), SETTINGS_OF[section]
    values = {}
    for name in cfg.settings_fields:
        text = getattr(cfg, name)
        if text is None:
            continue
        try:
            values[name] = _parse(settings, name, text)
        except (ValueError, TypeError) as exc:
            raise MelsearchError(f"{section}.{name} = {text!r}: {exc}") from None
    return values


def mel_config(model_preset: str = "", *, library: bool = False) -> MelConfig:
    """The log-mel settings of this run: the ``[features]`` preset with the fields set over it.

    ``model_preset``: a model's own input (``MODEL_PRESETS``, e.g. musicnn's), which only the clip length,
    the storage dtype and ``segments`` of the settings may change. ``library``: a run that indexes a library
    (``--library``), where songs are whole: ``segments`` defaults to ``LIBRARY_SEGMENTS`` there, not 1, for
    the model's training features as well, so that the model, its library and files queried later share one
    rule.
    """
    values = _fields_set("features")
    if library:
        values.setdefault("segments", LIBRARY_SEGMENTS)
    if model_preset:
        carried = ("duration_s", "dtype", "segments")
        return MelConfig.preset(model_preset, **{k: v for k, v in values.items() if k in carried})
    return MelConfig.preset(features().preset, **values)


def features_preset(model: str) -> str:
    """The features preset ``model`` needs (``""``: the configured one)."""
    return MODEL_PRESETS.get(model, "")


def train_config(model: str) -> TrainConfig:
    """The ``[train]`` settings of this run for one model."""
    return TrainConfig(model=model, **_fields_set("train"))


def index_config() -> IndexConfig:
    """The ``[index]`` settings of this run."""
    return IndexConfig(**_fields_set("index"))


def model_names(model: str | None = None) -> list[str]:
    """``all`` -> every registered model; otherwise the one name (default: ``[train] model``), checked."""
    model = model or train().model
    if model == "all":
        return list(MODEL_NAMES)
    if model not in MODEL_NAMES:
        raise MelsearchError(f"unknown model {model!r} (choose from {', '.join(MODEL_NAMES)} or all)")
    return [model]


def settings_from_flags(flags: dict[str, Any], sets: Iterable[str] = (), extra: Iterable[str] = ()) -> dict:
    """``{(section, option): value}`` from melsearch's flags, ``--set S.O=V`` items and ``--S-O V`` arguments.

    ``flags``: melsearch's own flags (``FLAG_SETTINGS`` names, ``gtzan_url``, ``gtzan_sha256``), None when not
    given. ``extra``: the arguments argparse did not know, e.g. ``["--features-n-fft", "1024"]``.
    """
    overrides: dict[tuple[str, str], str] = {FLAG_SETTINGS[name]: str(value) for name, value in flags.items()
                                              if name in FLAG_SETTINGS and value is not None}
    if flags.get("gtzan_url"):
        overrides[("dataset", "gtzan_urls")] = json.dumps(flags["gtzan_url"])
    if flags.get("gtzan_sha256"):
        overrides[("dataset", "gtzan_sha256")] = json.dumps(flags["gtzan_sha256"])
        overrides[("dataset", "gtzan_md5")] = "[]"
    for item in sets:
        name, sep, value = item.partition("=")
        section, dot, option = name.partition(".")
        if not (sep and dot and section and option):
            raise MelsearchError(f"--set {item!r}: expected SECTION.OPTION=VALUE, e.g. features.n_mels=96")
        overrides[(section, option.replace("-", "_"))] = value
    extra = list(extra)
    while extra:
        arg = extra.pop(0)
        name, sep, value = arg.partition("=")
        section, dash, option = name[2:].partition("-")
        if not (name.startswith("--") and section in SECTIONS and dash and option):
            raise MelsearchError(f"unrecognised argument {arg!r} (stage settings are --SECTION-OPTION VALUE, "
                                 f"e.g. --features-n-mels 96, sections: {', '.join(SECTIONS)})")
        if not sep:
            if not extra:
                raise MelsearchError(f"{arg} needs a value")
            value = extra.pop(0)
        overrides[(section, option.replace("-", "_"))] = value
    return overrides


def export_s3_endpoint() -> None:
    """``[s3] endpoint_url`` of luigi.cfg into ``AWS_ENDPOINT_URL`` when that is unset, for the library's client.

    Luigi's S3Target reads the section itself; :mod:`pipeline.storage` knows nothing of Luigi and reads the
    environment, so both reach the same endpoint however the user set it.
    """
    _read_project_cfg()
    endpoint = luigi.configuration.get_config().get("s3", "endpoint_url", None)
    if endpoint and not os.environ.get("AWS_ENDPOINT_URL"):
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def _read_project_cfg() -> None:
    if not Path("luigi.cfg").exists() and PROJECT_CFG.exists():
        luigi.configuration.add_config_path(str(PROJECT_CFG))


def configure(overrides: dict[tuple[str, str], str] | None = None, *, models: Iterable[str] = ()) -> None:
    """Read luigi.cfg (the working directory's, else the project's), apply ``overrides``, and check every setting.

    Raises
    ------
    MelsearchError
        One line, for an option no stage section has (from luigi.cfg or an override) or a value its
        dataclass refuses; nothing has run yet.
    """
    _read_project_cfg()
    export_s3_endpoint()
    config = luigi.configuration.get_config()
    for (section, option), value in (overrides or {}).items():
        if section not in SECTIONS:
            raise MelsearchError(f"unknown settings section {section!r} in {section}.{option} "
                                 f"(sections: {', '.join(SECTIONS)})")
        if not config.has_section(section):
            config.add_section(section)
        config.set(section, option, str(value))
    for section, cls in SECTIONS.items():
        known = set(cls.get_param_names(include_significant=True))
        unknown = sorted({option.replace("-", "_") for option in config.options(section)} - known
                         if config.has_section(section) else set())
        if unknown:
            raise MelsearchError(f"unknown setting {section}.{unknown[0]} (known: {', '.join(sorted(known))})")
        try:
            cls()
        except (ValueError, TypeError, luigi.parameter.ParameterException) as exc:
            reason = str(exc.__cause__ or exc).strip().splitlines()[0]
            raise MelsearchError(f"[{section}]: {reason}") from None
    mel_config()
    index_config()
    for model in models or model_names():
        train_config(model)
    parse_memory_gb(train().feature_memory_gb)
