"""Network definitions, one per file, the name -> class registry, and the pretrained networks' loaders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from models.cifar10 import Cifar10Net
from models.musicnn import load_pretrained_musicnn
from models.musicnn_genre import MusicnnGenre
from models.resnet_v2 import ResNetV2
from pipeline.errors import MelsearchError

MODELS: dict[str, type[nn.Module]] = {"cifar10": Cifar10Net, "resnet_v2": ResNetV2, "musicnn": MusicnnGenre}
MODEL_NAMES = tuple(MODELS)
# Trained from scratch on any log-mel; the others sit on a pretrained backbone with its own input.
SCRATCH_MODELS = ("cifar10", "resnet_v2")
# The features preset a model's input needs ("" = the configured [features] preset).
MODEL_PRESETS = {"musicnn": "musicnn"}
# Networks with published weights, not trained by the pipeline: name -> loader of the module in eval mode
PRETRAINED: dict[str, Callable[..., nn.Module]] = {"musicnn": load_pretrained_musicnn}


def build_model(name: str, *, n_classes: int, n_mels: int, **kwargs: Any) -> nn.Module:
    """A fresh, randomly initialised model ``name`` for (B, 1, n_mels, T) inputs and ``n_classes`` outputs.

    ``kwargs`` override fields of the model's config dataclass (e.g. ``channels`` or ``dropout``).

    Raises
    ------
    MelsearchError
        For an unknown name, an unknown keyword or an input too small for the model.
    """
    if name not in MODELS:
        raise MelsearchError(f"unknown model {name!r} (choose from {', '.join(MODEL_NAMES)})")
    try:
        return MODELS[name](n_classes=n_classes, n_mels=n_mels, **kwargs)
    except (TypeError, ValueError) as exc:
        raise MelsearchError(f"model {name}: {exc}") from exc
