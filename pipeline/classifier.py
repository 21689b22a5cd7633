"""Use a trained model: genre probabilities and search vectors of log-mels or audio files.

``GenreClassifier.load(model_dir)`` rebuilds the network from ``config.json`` and ``model.pt`` (loaded with
``weights_only=True``); files are decoded with exactly the :class:`MelConfig` the model was trained on, and
a track's output is the mean over its non-overlapping crops, as in training's evaluation. A track's search
vector (:meth:`GenreClassifier.embed_and_predict`) is its mean penultimate layer minus the train tracks' mean,
scaled to unit length: the one definition behind ``encode``, the embeddings Parquet and query files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models import build_model
from pipeline.errors import MelsearchError
from pipeline.inference import crops_per_pass, load_checkpoint, resolve_device, standardise, track_outputs
from pipeline.layout import rerun_hint
from pipeline.mel import MelConfig, log_mel_for_file
from pipeline.runtime import keep_freed_memory
from pipeline.vectors import l2_normalise

log = logging.getLogger(__name__)

_CONFIG_KEYS = ("model", "model_kwargs", "labels", "crop_frames", "norm_mean", "norm_std", "mel_config",
                "feature_key")


class GenreClassifier:
    """A trained genre model with its input settings.

    Attributes
    ----------
    labels : class names, in the order of the probability columns.
    mel_config : the log-mel parameters the model was trained on.
    feature_key : ``mel_config.key()``: features with another key must not be fed to this model.
    embedding_dim : D, the length of :meth:`encode`'s vectors.
    embedding_center : (D,) float32, the mean train-track embedding that search vectors are centred on.
    model_name : ``"cifar10"`` or ``"resnet_v2"``.
    crop_frames : frames per crop the outputs are averaged over.
    tag_names : the names of a tagging model's tags (musicnn's 50 MSD tags), in the order of
        :meth:`embed_predict_and_tag`'s tag probabilities; empty for a model without tags.
    """

    def __init__(self, model: torch.nn.Module, config: dict, model_dir: Path, device: torch.device) -> None:
        self.model = model.eval()
        self.model_dir = model_dir
        self.device = device
        self.labels: list[str] = list(config["labels"])
        self.mel_config = MelConfig.from_dict(config["mel_config"])
        self.feature_key: str = config["feature_key"]
        self.model_name: str = config["model"]
        self.embedding_dim: int = int(model.embedding_dim)
        self.crop_frames = int(config["crop_frames"])
        self._crops_per_pass: dict[int, int] = {}  # crop frames -> crops per forward pass
        self.tag_names: tuple[str, ...] = tuple(getattr(model, "tag_names", ()))
        self._mean = np.asarray(config["norm_mean"], dtype=np.float32)
        self._std = np.asarray(config["norm_std"], dtype=np.float32)
        center = config.get("embedding_center")
        if center is None:
            log.warning("%s predates embedding centring: its search vectors are uncentred (train it again for "
                        "better neighbours)", model_dir / "config.json")
            center = np.zeros(self.embedding_dim)
        self.embedding_center = np.asarray(center, dtype=np.float32)
        if self.embedding_center.shape != (self.embedding_dim,):
            raise MelsearchError(f"{model_dir / 'config.json'}: embedding_center has shape "
                                 f"{self.embedding_center.shape}, the model's embeddings ({self.embedding_dim},)")

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, device: str = "cpu") -> GenreClassifier:
        """Rebuild the model saved in ``model_dir`` (``config.json`` + ``model.pt``) on ``device``.

        Raises
        ------
        MelsearchError
            One line naming the file when the folder, ``config.json`` or ``model.pt`` is missing, unreadable,
            corrupt, or the weights do not fit the configured model.
        """
        model_dir = Path(model_dir)
        config_path, weights_path = model_dir / "config.json", model_dir / "model.pt"
        if not config_path.is_file():
            raise MelsearchError(f"{model_dir}: not a trained model folder (no config.json; train first)")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MelsearchError(f"{config_path}: unreadable model config ({exc})") from None
        missing = [key for key in _CONFIG_KEYS if not isinstance(config, dict) or key not in config]
        if missing:
            raise MelsearchError(f"{config_path}: not a model config (missing {', '.join(missing)})")
        dev = resolve_device(device)
        keep_freed_memory()
        mel_config = MelConfig.from_dict(config["mel_config"])
        model = build_model(config["model"], n_classes=len(config["labels"]), n_mels=mel_config.n_mels,
                            **config["model_kwargs"])
        try:
            state = load_checkpoint(weights_path, device="cpu")
        except MelsearchError as exc:
            raise MelsearchError(f"{exc}{rerun_hint(weights_path)}") from None
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MelsearchError(f"{weights_path}: weights do not fit the {config['model']} model ({reason})"
                                 f"{rerun_hint(weights_path)}") from None
        model = model.to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return cls(model, config, model_dir, dev)

    def _embedding_and_logits(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass: (b, 1, n_mels, crop) -> (b, D + n_classes + n_tags), the penultimate layer, the
        logits, then a tagging model's tag probabilities.

        Every model computes ``forward(x) = head(dropout(embed(x)))``; in eval mode dropout is the identity,
        so ``head(embed(x))`` is the logits without a second pass through the network. A tagging model's
        ``embed_and_tag`` gives its tag probabilities from the same pass as its embedding.
        """
        if self.tag_names:
            embedding, tags = self.model.embed_and_tag(x)
            return torch.cat([embedding, self.model.head(embedding), tags], dim=1)
        embedding = self.model.embed(x)
        return torch.cat([embedding, self.model.head(embedding)], dim=1)

    def embed_and_predict(self, mels: np.ndarray, *, n_frames: np.ndarray | None = None,
                          names: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Search vectors and class probabilities of log-mels: :meth:`embed_predict_and_tag` without the tags."""
        return self.embed_predict_and_tag(mels, n_frames=n_frames, names=names)[:2]

    def embed_predict_and_tag(self, mels: np.ndarray, *, n_frames: np.ndarray | None = None,
                              names: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Search vectors, class probabilities and tag probabilities of log-mels, from one forward pass over
        their crops.

        The search vector is ``l2_normalise(e - center)``: ``e`` the penultimate layer averaged over the
        track's non-overlapping crops, ``center`` the mean ``e`` of the train-split tracks (``config.json``'s
        ``embedding_center``; zeros for model folders written before it existed). Centring matters because
        the layer is softplus/ReLU, all positive: uncentred, every track points nearly the same way and
        angular distances are rounding noise. The probabilities are the softmax of the crop-averaged logits.

        Parameters
        ----------
        mels : (N, n_mels, frames) float dB, as in a features file.
        n_frames : (N,) frames holding audio per track (a features file's ``n_frames``); crops then skip the
            zero padding after it. Default: every frame.
        names : N track names, only to name tracks whose vector is zero in the warning.

        Returns
        -------
        vectors : (N, D) float32, unit L2 norm (zero rows for a track exactly at the center).
        probabilities : (N, n_classes) float32, rows sum to 1, columns in the order of ``labels``.
        tag_probabilities : (N, n_tags) float32, the crop-averaged sigmoid of a tagging model's tag logits, each
            in [0, 1], columns in the order of ``tag_names`` (N, 0 for a model without tags).

        Raises
        ------
        MelsearchError
            When ``mels`` is not (N, n_mels, frames) with this model's ``n_mels``.
        """
        mels = np.asarray(mels, dtype=np.float32)
        if mels.ndim != 3 or mels.shape[1] != self.mel_config.n_mels:
            raise MelsearchError(f"expected log-mels of shape (N, {self.mel_config.n_mels}, frames), got {mels.shape}")
        total = mels.shape[2]
        n_true = np.full(len(mels), total) if n_frames is None else np.clip(np.asarray(n_frames), 1, total)
        data = torch.from_numpy(standardise(mels, self._mean, self._std))
        crop = min(self.crop_frames, total)
        if crop not in self._crops_per_pass:
            self._crops_per_pass[crop] = crops_per_pass(self._embedding_and_logits, self.model,
                                                        (1, self.mel_config.n_mels, crop), self.device)
        per_pass = self._crops_per_pass[crop]
        means = track_outputs(self._embedding_and_logits, data, n_true, crop=crop, batch_size=per_pass,
                              device=self.device).cpu()  # (N, D + n_classes + n_tags)
        n_classes = len(self.labels)
        embedding = means[:, : self.embedding_dim].numpy()
        logits = means[:, self.embedding_dim : self.embedding_dim + n_classes]
        vectors = l2_normalise(embedding - self.embedding_center, names=names)
        return vectors, torch.softmax(logits, dim=1).numpy(), means[:, self.embedding_dim + n_classes :].numpy()

    def embed_predict_and_tag_file(self, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`embed_predict_and_tag` of one audio file, decoded with the model's log-mel settings.

        Returns the (D,) float32 unit search vector, the (n_classes,) float32 probabilities and the (n_tags,)
        float32 tag probabilities.
        Raises MelsearchError naming the file when it is missing or not decodable.
        """
        mel, n_true = log_mel_for_file(path, self.mel_config)  # (n_mels, n_frames) dB, frames holding audio
        vectors, probabilities, tags = self.embed_predict_and_tag(mel[None], n_frames=np.array([n_true]),
                                                                  names=[str(path)])
        return vectors[0], probabilities[0], tags[0]

    def check_features(self, mel_config: MelConfig, source: str | os.PathLike) -> None:
        """Refuse log-mels of ``source`` made with another :class:`MelConfig` than the model's input."""
        if mel_config.key() != self.feature_key:
            raise MelsearchError(f"{source}: features key {mel_config.key()} differ from the {self.feature_key} "
                                 f"that model {self.model_dir} was trained on")

    def embeddings_metadata(self) -> dict[str, str]:
        """What an embeddings file records of the model that made it: ``model``, ``model_key``, ``feature_key``,
        and for a tagging model ``tags`` (its tag names as a JSON list)."""
        tags = {"tags": json.dumps(list(self.tag_names))} if self.tag_names else {}
        return {"model": self.model_name, "model_key": self.model_dir.resolve().name, "feature_key": self.feature_key,
                **tags}

    def labels_of(self, probabilities: np.ndarray) -> list[str]:
        """The most probable label of each row of (N, n_classes) probabilities; ``""`` each for a model without
        labels (a pretrained backbone alone, :mod:`pipeline.pretrained`)."""
        probabilities = np.asarray(probabilities).reshape(len(probabilities), -1)
        if not self.labels:
            return [""] * len(probabilities)
        return [self.labels[i] for i in probabilities.argmax(axis=1)]

    def predict(self, path: str | os.PathLike) -> dict:
        """Genre of an audio file: ``{"path", "label", "probabilities": {label: p}}`` (p: float, sum 1).

        Raises MelsearchError for a model without labels (a pretrained backbone that no labelled music trained).
        """
        if not self.labels:
            raise MelsearchError(f"{self.model_dir}: {self.model_name} without a genre head (no labelled music "
                                 "trained it): it encodes and searches, it cannot predict")
        probabilities = self.embed_predict_and_tag_file(path)[1]
        return {
            "path": str(path),
            "label": self.labels_of(probabilities[None])[0],
            "probabilities": {label: float(p) for label, p in zip(self.labels, probabilities, strict=True)},
        }

    def encode(self, path: str | os.PathLike) -> np.ndarray:
        """Search vector of an audio file: (D,) float32 unit vector, as :meth:`embed_and_predict` defines it.

        The same vector the embeddings stage stores for the file (up to its float16 features) and the query
        helper searches with.
        """
        return self.embed_predict_and_tag_file(path)[0]
