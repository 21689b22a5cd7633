"""The train stage's settings, :class:`TrainConfig`: plain values, importable without torch."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models import MODEL_NAMES
from pipeline.errors import MelsearchError
from pipeline.io import params_key


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; ``key()`` names the output folder.

    ``crop_s``: length in seconds of the training crops and of the evaluation windows; ``patience``: epochs
    without a lower validation loss before stopping; ``checkpoint_interval``: epochs between ``last.pt``
    writes; ``augment``: random gain and SpecAugment masks on training crops; ``mixup``: the Beta(a, a) parameter
    of mixup (0: off); ``finetune``: train a pretrained backbone too (else only its head, on cached outputs);
    ``model_kwargs``: overrides of the model's config dataclass (e.g. ``{"dropout": 0.1}``).
    """

    model: str
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    crop_s: float = 3.0
    patience: int = 8
    seed: int = 0
    checkpoint_interval: int = 1
    augment: bool = True
    mixup: float = 0.2
    finetune: bool = False
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise MelsearchError(f"unknown model {self.model!r} (choose from {', '.join(MODEL_NAMES)})")
        for name in ("epochs", "batch_size", "patience", "checkpoint_interval"):
            if int(getattr(self, name)) < 1:
                raise MelsearchError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "crop_s"):
            if not float(getattr(self, name)) > 0:
                raise MelsearchError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise MelsearchError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.mixup < 0:
            raise MelsearchError(f"TrainConfig.mixup must be >= 0, got {self.mixup!r}")
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable."""
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Short hash of every field."""
        return params_key(self.to_dict())


def parse_memory_gb(memory_gb: float | str) -> float | None:
    """The feature memory setting (``[train] feature_memory_gb``) as GB, or None for ``"auto"``.

    Raises MelsearchError unless it is ``"auto"`` or a number >= 0 (0: always stream).
    """
    if memory_gb == "auto":
        return None
    try:
        gb = float(memory_gb)
    except (TypeError, ValueError):
        gb = math.nan
    if not gb >= 0:  # NaN too
        raise MelsearchError(f"train.feature_memory_gb must be 'auto' or a number of GB >= 0, got {memory_gb!r}")
    return gb
