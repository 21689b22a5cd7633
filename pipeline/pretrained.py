"""A model folder that needs no training: a pretrained backbone (musicnn) alone, for a library without labels.

:func:`write_pretrained_model` fills the folder the train stage would (``model.pt``, ``config.json``,
``metrics.json`` last), so :class:`pipeline.classifier.GenreClassifier`, the embeddings stage, ``encode`` and
``query`` read it as any other; it has no labels, so ``predict`` refuses it and every predicted label is empty.

Its search vectors are not centred (``embedding_center`` is zero): a model trained here centres on its train
tracks' mean embedding, and there are none. For musicnn's penultimate layer that costs nothing, measured by
``bench/musicnn_vectors.py`` (genre precision@10 of raw against collection-centred vectors): emotify-120
0.647 raw against 0.645 centred, GTZAN-30 0.193 against 0.200 (both within one standard error).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import PRETRAINED_MODELS, build_model
from pipeline.errors import MelsearchError
from pipeline.inference import crop_frames
from pipeline.io import atomic_path, write_json_atomic
from pipeline.mel import MelConfig

log = logging.getLogger(__name__)


def write_pretrained_model(out_dir: str | os.PathLike, model: str, mel_config: MelConfig, *, crop_s: float,
                           model_kwargs: Mapping[str, Any] | None = None) -> dict:
    """Write the model folder of pretrained ``model`` with no genre head into ``out_dir``.

    Parameters
    ----------
    model : a name of :data:`models.PRETRAINED_MODELS`.
    mel_config : the log-mel settings of its input (the model's preset; ``segments`` as the run's library).
    crop_s : seconds per crop that a track's vector is averaged over, as ``[train] crop_s``.
    model_kwargs : overrides of the model's config (e.g. ``{"vector": "taggram"}``).

    Returns
    -------
    The contents of ``metrics.json``: ``model``, ``trained`` (False), ``labels`` ([]) and ``embedding_dim``.
    """
    if model not in PRETRAINED_MODELS:
        raise MelsearchError(f"model {model} has no pretrained weights: it must be trained on labelled music "
                             f"(pretrained: {', '.join(PRETRAINED_MODELS)})")
    out_dir = Path(out_dir)
    model_kwargs = dict(model_kwargs or {})
    network = build_model(model, n_classes=0, n_mels=mel_config.n_mels, **model_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, tmp)
    crop = crop_frames(mel_config, crop_s)
    dim = int(network.embedding_dim)
    write_json_atomic(out_dir / "config.json", {
        "model": model,
        "model_kwargs": model_kwargs,
        "n_classes": 0,
        "labels": [],
        "embedding_dim": dim,
        "input_shape": [1, mel_config.n_mels, crop],
        "crop_frames": crop,
        "norm_mean": np.zeros(mel_config.n_mels).tolist(),  # the backbone standardises its own input
        "norm_std": np.ones(mel_config.n_mels).tolist(),
        "embedding_center": np.zeros(dim).tolist(),
        "mel_config": mel_config.to_dict(),
        "feature_key": mel_config.key(),
        "trained": False,
    })
    metrics = {"model": model, "trained": False, "labels": [], "embedding_dim": dim}
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info("%s: pretrained %s without a genre head (%d-d vectors)", out_dir, model, dim)
    return metrics
