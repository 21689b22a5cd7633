"""What the training loop trains on: labelled log-mels, standardised, cropped, augmented, or a frozen backbone's
outputs computed once per crop.

:class:`TrainingData` holds every labelled track of the train/valid/test splits. Training draws random crops
(mel inputs) or random cached crops (a frozen pretrained backbone, whose outputs for every non-overlapping crop
are computed once, so only the head trains: seconds on a CPU). Evaluation averages a track's outputs over its
non-overlapping crops either way, as :mod:`pipeline.inference` does for a trained model.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

from pipeline.errors import MelsearchError
from pipeline.feature_store import FeatureStore
from pipeline.inference import _crop_plan, crop_frames, gather_crops, standardise, track_outputs
from pipeline.manifest import SPLITS, read_manifest
from pipeline.mel import MelConfig

log = logging.getLogger(__name__)

# Random gain of each training crop, uniform in +-GAIN_DB decibels (level differs between recordings).
GAIN_DB = 6.0
# SpecAugment-style masks: one band of up to n_mels // MASK_FRACTION mel bands and one of up to
# crop // MASK_FRACTION frames, set to the band mean (0 after standardisation).
MASK_FRACTION = 8


def _band_statistics(mels: np.ndarray, n_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (n_mels,) float32 in dB of each mel band over the frames that hold audio."""
    total = np.zeros(mels.shape[1])
    squares = np.zeros(mels.shape[1])
    for mel, n in zip(mels, n_true, strict=True):
        frames = mel[:, :n].astype(np.float64)
        total += frames.sum(axis=1)
        squares += (frames**2).sum(axis=1)
    count = int(n_true.sum())
    mean = total / count
    # a band that never changes (silent synthetic input) would divide by zero
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0)).clip(min=1e-3)
    return mean.astype(np.float32), std.astype(np.float32)


def _load_split_data(features_path: str | os.PathLike, manifest_path: str | os.PathLike) -> dict:
    """Labelled ``ok`` rows of the train/valid/test splits that have features, their log-mels and labels."""
    with FeatureStore.open(features_path) as store:
        rows = [
            row for row in read_manifest(manifest_path, status="ok") if row["label"] and row["split"] in SPLITS
        ]
        have = set(store.track_ids)
        missing = [row["track_id"] for row in rows if row["track_id"] not in have]
        if missing:
            log.warning("%d labelled tracks have no features (failed to decode?), e.g. %s", len(missing), missing[0])
        rows = [row for row in rows if row["track_id"] in have]
        positions = store.index_of([row["track_id"] for row in rows])
        mels = store.read(positions)  # (N, n_mels, n_frames) float32 dB
        n_true = np.maximum(1, store.n_frames[positions])
        mel_config = store.config
    labels = sorted({row["label"] for row in rows})
    split = np.array([row["split"] for row in rows])
    if not (split == "train").any():
        raise MelsearchError(f"{manifest_path}: no labelled train tracks with features in {features_path}")
    if len(labels) < 2:
        raise MelsearchError(f"{manifest_path}: training needs at least 2 labels, found {labels}")
    untrained = sorted(set(labels) - {row["label"] for row in rows if row["split"] == "train"})
    if untrained:
        log.warning("labels with no train tracks (always mispredicted): %s", ", ".join(untrained))
    return {
        "mels": mels,
        "n_true": n_true,
        "y": np.array([labels.index(row["label"]) for row in rows], dtype=np.int64),
        "split": split,
        "labels": labels,
        "mel_config": mel_config,
    }


def _place(mels: np.ndarray, device: torch.device) -> torch.Tensor:
    """The feature tensor on the GPU when it fits in half the free memory (crops then never leave it), else CPU."""
    data = torch.from_numpy(mels)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if data.nbytes < free // 2:
            return data.to(device)
        log.info("features (%.1f GB) stay in pinned CPU memory: too large for the GPU", data.nbytes / 1e9)
        return data.pin_memory()
    return data


@dataclass
class TrainingData:
    """Every labelled track's inputs, labels and splits.

    ``data`` (N, n_mels, T) float32 log-mels, standardised per band with train statistics unless the model reads
    raw ones (on the GPU when it fits); ``n_true`` (N,) frames holding audio; ``y`` (N,) int64 label indices;
    ``subsets`` split name -> row indices; ``mean``/``std`` (n_mels,) the standardisation (0 and 1: none);
    ``crop`` frames per crop. After :meth:`cache_backbone`, ``cache`` (n_crops, D) holds the backbone's output
    for every non-overlapping crop, ``crop_track`` (n_crops,) the track of each.
    """

    data: torch.Tensor
    n_true: np.ndarray
    y: np.ndarray
    subsets: dict[str, np.ndarray]
    labels: list[str]
    mel_config: MelConfig
    mean: np.ndarray
    std: np.ndarray
    crop: int
    eval_batch: int
    cache: torch.Tensor | None = None
    crop_track: np.ndarray | None = None

    @classmethod
    def load(cls, features_path: str | os.PathLike, manifest_path: str | os.PathLike, *, crop_s: float,
             batch_size: int, standardised: bool, dev: torch.device) -> TrainingData:
        d = _load_split_data(features_path, manifest_path)
        subsets = {name: np.flatnonzero(d["split"] == name) for name in SPLITS}
        train_idx = subsets["train"]
        if standardised:  # with train-split statistics only
            mean, std = _band_statistics(d["mels"][train_idx], d["n_true"][train_idx])
        else:
            mean, std = np.zeros(d["mels"].shape[1], np.float32), np.ones(d["mels"].shape[1], np.float32)
        crop = crop_frames(d["mel_config"], crop_s)
        log.info("%s tracks, %d labels, crops of %d frames, on %s", {name: len(idx) for name, idx in subsets.items()},
                 len(d["labels"]), crop, dev)
        return cls(data=_place(standardise(d["mels"], mean, std), dev), n_true=d["n_true"], y=d["y"],
                   subsets=subsets, labels=d["labels"], mel_config=d["mel_config"], mean=mean, std=std, crop=crop,
                   eval_batch=batch_size * 4)

    @torch.no_grad()
    def cache_backbone(self, model: nn.Module, dev: torch.device) -> None:
        """Compute ``model.embed`` of every non-overlapping crop once; training then feeds ``model.head`` only."""
        model.eval()
        tracks, starts = _crop_plan(self.n_true, self.crop, self.data.shape[2])
        outputs = []
        for begin in range(0, tracks.size, self.eval_batch):
            chunk = slice(begin, begin + self.eval_batch)
            x = gather_crops(self.data, tracks[chunk], starts[chunk], self.crop, dev)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                outputs.append(model.embed(x).float())
        self.cache, self.crop_track = torch.cat(outputs), tracks
        log.info("backbone outputs of %d crops cached (%d-d)", tracks.size, self.cache.shape[1])

    def draw_epoch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One epoch's samples in random order: (tracks, starts), about one per crop of the train audio.

        Mel inputs: random start frames; cached inputs: ``starts`` are rows of the cache.
        """
        train_idx = self.subsets["train"]
        if self.cache is not None:
            rows = rng.permutation(np.flatnonzero(np.isin(self.crop_track, train_idx)))
            return self.crop_track[rows], rows
        tracks = rng.permutation(np.repeat(train_idx, np.maximum(1, self.n_true[train_idx] // self.crop)))
        room = np.maximum(self.n_true[tracks], self.crop) - self.crop + 1
        return tracks, np.minimum(rng.integers(0, room), self.data.shape[2] - self.crop)

    def batch(self, tracks: np.ndarray, starts: np.ndarray, dev: torch.device, rng: np.random.Generator, *,
              augment: bool, mixup: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of one training batch: (b, 1, n_mels, crop) crops or (b, D) cached rows, and (b,)
        int64 labels, or (b, n_classes) label probabilities under mixup.

        ``augment``: a random gain of +-6 dB (dB features only) and one band and one time mask per crop;
        ``mixup``: Beta(mixup, mixup) mixing of the batch with itself shuffled (0: none).
        """
        target = torch.as_tensor(self.y[tracks], device=dev)
        if self.cache is not None:
            x = self.cache[torch.as_tensor(starts, device=self.cache.device)].to(dev)
        else:
            x = gather_crops(self.data, tracks, starts, self.crop, dev)
            if augment:
                x = self._augment(x, rng)
        if mixup > 0 and len(tracks) > 1:
            lam = float(rng.beta(mixup, mixup))
            order = torch.as_tensor(rng.permutation(len(tracks)), device=dev)
            x = lam * x + (1 - lam) * x[order]
            onehot = F.one_hot(target, len(self.labels)).float()
            target = lam * onehot + (1 - lam) * onehot[order]
        return x, target

    def _augment(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        b, _, n_mels, frames = x.shape
        if self.mel_config.compression == "db":  # a gain is an offset in dB, scaled by the band's std
            gain = torch.as_tensor(rng.uniform(-GAIN_DB, GAIN_DB, size=(b, 1, 1, 1)), dtype=x.dtype, device=x.device)
            x = x + gain / torch.as_tensor(self.std, device=x.device)[None, None, :, None]
        keep = torch.ones_like(x)
        for axis, size in ((2, n_mels), (3, frames)):
            width = rng.integers(0, size // MASK_FRACTION + 1, size=b)
            first = rng.integers(0, size - width + 1)
            where = torch.arange(size, device=x.device)
            masked = (where[None] >= torch.as_tensor(first, device=x.device)[:, None]) & (
                where[None] < torch.as_tensor(first + width, device=x.device)[:, None])  # (b, size)
            keep = keep * ~(masked[:, None, :, None] if axis == 2 else masked[:, None, None, :])
        return x * keep

    def track_means(self, model: nn.Module, idx: np.ndarray, dev: torch.device, *, embed: bool = False) -> torch.Tensor:
        """Crop-averaged logits (or ``embed`` outputs) of the tracks ``idx``: (len(idx), D) on ``dev``."""
        model.eval()
        if self.cache is None:
            fn = model.embed if embed else model
            rows = self.data[torch.as_tensor(idx, device=self.data.device)]
            return track_outputs(fn, rows, self.n_true[idx], crop=self.crop, batch_size=self.eval_batch, device=dev)
        position = np.full(len(self.n_true), -1)
        position[idx] = np.arange(len(idx))
        rows = np.flatnonzero(position[self.crop_track] >= 0)
        with torch.no_grad():
            z = self.cache[torch.as_tensor(rows, device=self.cache.device)].to(dev)
            out = z if embed else model.head(z).float()
        owner = torch.as_tensor(position[self.crop_track[rows]], device=dev)
        sums = torch.zeros(len(idx), out.shape[1], device=dev).index_add_(0, owner, out)
        counts = torch.bincount(owner, minlength=len(idx)).clamp(min=1).float()
        return sums / counts[:, None]

    def evaluate(self, model: nn.Module, name: str, dev: torch.device) -> tuple[float, float, np.ndarray]:
        """Track-level mean cross-entropy and accuracy of the crop-averaged logits on split ``name``, and the
        predictions (N,); NaN figures for an empty split."""
        idx = self.subsets[name]
        if len(idx) == 0:
            return math.nan, math.nan, np.zeros(0, dtype=np.int64)
        logits = self.track_means(model, idx, dev)
        loss = F.cross_entropy(logits, torch.as_tensor(self.y[idx], device=dev)).item()
        predicted = logits.argmax(dim=1).cpu().numpy()
        return loss, float((predicted == self.y[idx]).mean()), predicted
