"""Network definitions, one per file, the name -> class registry, and the pretrained networks' loaders.

The names and presets import nothing heavy; the classes (``MODELS``, ``PRETRAINED``, :func:`build_model`) load
torch on first use, so reading settings or running the feature stages does not pay torch's start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.errors import MelsearchError

# name -> "module:class" of each genre model
_CLASSES = {"cifar10": "models.cifar10:Cifar10Net", "resnet_v2": "models.resnet_v2:ResNetV2",
            "musicnn": "models.musicnn_genre:MusicnnGenre"}
MODEL_NAMES = tuple(_CLASSES)
# Trained from scratch on any log-mel; the others sit on a pretrained backbone with its own input.
SCRATCH_MODELS = ("cifar10", "resnet_v2")
# The features preset a model's input needs ("" = the configured [features] preset).
MODEL_PRESETS = {"musicnn": "musicnn"}
# Networks with published weights, not trained by the pipeline: name -> "module:loader" (eval-mode module)
_PRETRAINED = {"musicnn": "models.musicnn:load_pretrained_musicnn"}
# Genre models whose backbone alone makes search vectors, so a library can be indexed with no labelled music.
PRETRAINED_MODELS = tuple(_PRETRAINED)


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def __getattr__(name: str) -> Any:
    """``MODELS`` (name -> nn.Module class) and ``PRETRAINED`` (name -> loader), imported on first use."""
    if name == "MODELS":
        return {key: _load(target) for key, target in _CLASSES.items()}
    if name == "PRETRAINED":
        return {key: _load(target) for key, target in _PRETRAINED.items()}
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def build_model(name: str, *, n_classes: int, n_mels: int, **kwargs: Any) -> Any:
    """A fresh, randomly initialised model ``name`` (an ``nn.Module``) for (B, 1, n_mels, T) inputs and
    ``n_classes`` outputs.

    ``kwargs`` override fields of the model's config dataclass (e.g. ``channels`` or ``dropout``).

    Raises
    ------
    MelsearchError
        For an unknown name, an unknown keyword or an input too small for the model.
    """
    if name not in _CLASSES:
        raise MelsearchError(f"unknown model {name!r} (choose from {', '.join(MODEL_NAMES)})")
    try:
        return _load(_CLASSES[name])(n_classes=n_classes, n_mels=n_mels, **kwargs)
    except (TypeError, ValueError) as exc:
        raise MelsearchError(f"model {name}: {exc}") from exc
