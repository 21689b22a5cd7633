"""Stage settings, read by Luigi from the sections of ``luigi.cfg`` named after each stage.

These are Luigi ``Config`` classes (lower-case, like Luigi's own ``[core]`` and ``[worker]``): every task of
a run reads the same values, and each task's output path carries a hash of the values that shaped it.
``luigi --module tasks Pipeline --train-epochs 5`` overrides one on the command line.
"""

from pathlib import Path

import luigi
import luigi.configuration

from pipeline.sources import GTZAN_MD5, GTZAN_MIRRORS, GTZAN_SHA256

PROJECT_CFG = Path(__file__).resolve().parent.parent / "luigi.cfg"


def configure(overrides: dict[tuple[str, str], str]) -> None:
    """Read luigi.cfg (the working directory's, else the project's) and set ``{(section, option): value}``."""
    if not Path("luigi.cfg").exists() and PROJECT_CFG.exists():
        luigi.configuration.add_config_path(str(PROJECT_CFG))
    config = luigi.configuration.get_config()
    for (section, option), value in overrides.items():
        if not config.has_section(section):
            config.add_section(section)
        config.set(section, option, value)


class dataset(luigi.Config):  # noqa: N801 (Luigi names a Config's section after its class)
    split = luigi.ChoiceParameter(choices=["auto", "gtzan", "random", "hash"], default="auto")
    split_seed = luigi.IntParameter(default=0)
    gtzan_urls = luigi.ListParameter(default=list(GTZAN_MIRRORS))
    gtzan_sha256 = luigi.ListParameter(default=list(GTZAN_SHA256))
    gtzan_md5 = luigi.ListParameter(default=list(GTZAN_MD5))


class features(luigi.Config):  # noqa: N801
    preset = luigi.ChoiceParameter(choices=["default", "choi"], default="default")
    n_mels = luigi.IntParameter(default=0, description="0 keeps the preset's value")
    duration_s = luigi.FloatParameter(default=0.0, description="0 keeps the preset's value")
    dtype = luigi.ChoiceParameter(choices=["float16", "float32"], default="float16")
    shard_size = luigi.IntParameter(default=256)
    processes = luigi.IntParameter(default=0, description="extraction processes per shard task; 0 = every core")


class train(luigi.Config):  # noqa: N801
    model = luigi.Parameter(default="cifar10", description="cifar10, resnet_v2 or all")
    epochs = luigi.IntParameter(default=30)
    batch_size = luigi.IntParameter(default=32)
    lr = luigi.FloatParameter(default=1e-3)
    weight_decay = luigi.FloatParameter(default=1e-4)
    crop_s = luigi.FloatParameter(default=3.0)
    patience = luigi.IntParameter(default=8)
    seed = luigi.IntParameter(default=0)
    checkpoint_interval = luigi.IntParameter(default=1)
    device = luigi.Parameter(default="auto")


class index(luigi.Config):  # noqa: N801
    n_trees = luigi.IntParameter(default=50)
    search_k = luigi.IntParameter(default=-1)
