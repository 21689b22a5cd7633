"""What the training loop trains on: labelled log-mels, standardised, cropped, augmented, or a frozen backbone's
outputs computed once per crop.

:class:`TrainingData` holds every labelled track of the train/valid/test splits. Training draws random crops
(mel inputs) or random cached crops (a frozen pretrained backbone, whose outputs for every non-overlapping crop
are computed once, so only the head trains: seconds on a CPU). Evaluation averages a track's outputs over its
non-overlapping crops either way, as :mod:`pipeline.inference` does for a trained model.

The log-mels are read in one of two ways, with the same results bit for bit (same crops, same order, same
augmentation, same weights): loaded into memory (a :class:`~pipeline.inference.TensorCrops`, on the GPU when it
fits) when their float32 size is at most ``memory_gb`` (:func:`feature_memory_limit`), else streamed
(:class:`StoreCrops`: each batch's crop windows read from the features file by a background thread a few
batches ahead, so memory does not grow with the number of tracks).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

from pipeline.errors import MelsearchError
from pipeline.feature_store import FeatureStore
from pipeline.inference import Crops, TensorCrops, crop_batches, crop_frames, standardise, to_device, track_outputs
from pipeline.manifest import SPLITS, read_manifest
from pipeline.mel import MelConfig
from pipeline.train_config import parse_memory_gb

log = logging.getLogger(__name__)

# Random gain of each training crop, uniform in +-GAIN_DB decibels (level differs between recordings).
GAIN_DB = 6.0
# SpecAugment-style masks: one band of up to n_mels // MASK_FRACTION mel bands and one of up to
# crop // MASK_FRACTION frames, set to the band mean (0 after standardisation).
MASK_FRACTION = 8
# memory_gb "auto": features load into memory when their float32 size is at most this fraction of the memory
# available (GTZAN's 0.66 GB on an 8 GB machine; 100k songs, 66 GB, stream).
AUTO_MEMORY_FRACTION = 0.5
# Batches the reader thread of streamed features holds ready (one more may be being read).
PREFETCH_BATCHES = 4
# Tracks per read when a pass reads whole tracks (band statistics, loading into memory).
_READ_BLOCK = 64

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def _band_statistics(mels: Iterable[np.ndarray], n_true: np.ndarray, n_mels: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (n_mels,) float32 in dB of each mel band over the frames that hold audio, in one pass over
    ``mels``, one (n_mels, T) log-mel per track in the order of ``n_true``."""
    total = np.zeros(n_mels)
    squares = np.zeros(n_mels)
    for mel, n in zip(mels, n_true, strict=True):
        frames = mel[:, :n].astype(np.float64)
        total += frames.sum(axis=1)
        squares += (frames**2).sum(axis=1)
    count = int(n_true.sum())
    mean = total / count
    # a band that never changes (silent synthetic input) would divide by zero
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0)).clip(min=1e-3)
    return mean.astype(np.float32), std.astype(np.float32)


def available_memory() -> int:
    """Bytes of memory this process could still take: MemAvailable, or less under a cgroup (container) limit."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError):
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, free)


def feature_memory_limit(memory_gb: float | str) -> float:
    """Bytes of float32 log-mels that may load into memory: ``memory_gb`` GB (1e9 bytes), or ``"auto"``:
    :data:`AUTO_MEMORY_FRACTION` of :func:`available_memory`. 0 streams every features file."""
    gb = parse_memory_gb(memory_gb)
    return AUTO_MEMORY_FRACTION * available_memory() if gb is None else gb * 1e9


def _labelled_rows(store: FeatureStore, manifest_path: str | os.PathLike) -> dict:
    """Labelled ``ok`` rows of the train/valid/test splits that have features: their positions, lengths, labels."""
    rows = [row for row in read_manifest(manifest_path, status="ok") if row["label"] and row["split"] in SPLITS]
    have = set(store.track_ids)
    missing = [row["track_id"] for row in rows if row["track_id"] not in have]
    if missing:
        log.warning("%d labelled tracks have no features (failed to decode?), e.g. %s", len(missing), missing[0])
    rows = [row for row in rows if row["track_id"] in have]
    positions = store.index_of([row["track_id"] for row in rows])
    labels = sorted({row["label"] for row in rows})
    split = np.array([row["split"] for row in rows])
    if not (split == "train").any():
        raise MelsearchError(f"{manifest_path}: no labelled train tracks with features in {store.path}")
    if len(labels) < 2:
        raise MelsearchError(f"{manifest_path}: training needs at least 2 labels, found {labels}")
    untrained = sorted(set(labels) - {row["label"] for row in rows if row["split"] == "train"})
    if untrained:
        log.warning("labels with no train tracks (always mispredicted): %s", ", ".join(untrained))
    return {
        "positions": positions,
        "n_true": np.maximum(1, store.n_frames[positions]),
        "y": np.array([labels.index(row["label"]) for row in rows], dtype=np.int64),
        "split": split,
        "labels": labels,
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
class _Failure:
    """What the reader thread raised, for the consumer to raise."""

    exc: BaseException


def prefetch(read: Callable[[_Item], _Result], items: Iterable[_Item], *, depth: int,
             source: str) -> Iterator[_Result]:
    """``read(item)`` of each of ``items``, in order, computed by one background thread at most ``depth`` results
    ahead of the consumer (``depth`` wait in a queue, one more may be being read).

    ``read`` must be deterministic (it runs on another thread: random draws stay with the consumer). When it
    raises, the consumer gets a MelsearchError naming ``source`` (or ``read``'s own MelsearchError). Closing the
    iterator early stops and joins the thread.
    """
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                results.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(read(item)):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))

    thread = threading.Thread(target=work, name=f"prefetch {source}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                value = results.get(timeout=1.0)
            except queue.Empty:
                if not thread.is_alive() and results.empty():  # a dead thread puts nothing more
                    raise MelsearchError(f"{source}: the feature reader thread ended without a result") from None
                continue
            if value is done:
                return
            if isinstance(value, _Failure):
                if isinstance(value.exc, MelsearchError):
                    raise value.exc
                raise MelsearchError(f"{source}: reading log-mels failed ({type(value.exc).__name__}: "
                                     f"{value.exc})") from value.exc
            yield value
    finally:
        stop.set()
        thread.join()


class StoreCrops(Crops):
    """Standardised crops read from a features file batch by batch: ``(mel[position, :, start:start + crop] -
    mean) / std`` per band, in float32, the same bits as cropping the standardised array.

    ``positions`` (N,) the file rows that are tracks 0, 1, ...; ``mean``/``std`` (n_mels,) float32.
    :meth:`batches` reads ahead on one background thread (:func:`prefetch`, ``depth`` batches); the store is
    read by one thread at a time (h5py serialises its calls anyway).
    """

    def __init__(self, store: FeatureStore, positions: np.ndarray, mean: np.ndarray, std: np.ndarray, *,
                 depth: int = PREFETCH_BATCHES) -> None:
        self.store, self.positions, self.mean, self.std, self.depth = store, positions, mean, std, depth
        self.n_tracks, self.n_frames = len(positions), store.config.n_frames

    def read(self, tracks: np.ndarray, starts: np.ndarray, crop: int) -> torch.Tensor:
        """(len(tracks), n_mels, crop) float32 standardised crops on the CPU."""
        raw = self.store.read_crops(self.positions[tracks], starts, crop)
        return torch.from_numpy(standardise(raw, self.mean, self.std))

    def gather(self, tracks: np.ndarray, starts: np.ndarray, crop: int, device: torch.device) -> torch.Tensor:
        return to_device(self.read(tracks, starts, crop), device)

    def batches(self, plan: Sequence[tuple[np.ndarray, np.ndarray]], crop: int,
                device: torch.device) -> Iterator[torch.Tensor]:
        for x in prefetch(lambda batch: self.read(*batch, crop), plan, depth=self.depth, source=str(self.store.path)):
            yield to_device(x, device)

    def take(self, idx: np.ndarray) -> StoreCrops:
        return StoreCrops(self.store, self.positions[idx], self.mean, self.std, depth=self.depth)

    def close(self) -> None:
        self.store.close()


def _read_tracks(store: FeatureStore, positions: np.ndarray) -> Iterator[np.ndarray]:
    """The (n_mels, n_frames) float32 log-mel at each of ``positions`` in turn, read :data:`_READ_BLOCK` at a time."""
    for begin in range(0, positions.size, _READ_BLOCK):
        yield from store.read(positions[begin : begin + _READ_BLOCK])


@dataclass
class TrainingData:
    """Every labelled track's inputs, labels and splits.

    ``crops`` the tracks' log-mels, standardised per band with train statistics unless the model reads raw ones:
    in memory (N, n_mels, T) float32, on the GPU when it fits, or streamed from the features file;
    ``n_true`` (N,) frames holding audio; ``y`` (N,) int64 label indices; ``subsets`` split name -> row indices;
    ``mean``/``std`` (n_mels,) the standardisation (0 and 1: none); ``crop`` frames per crop. After
    :meth:`cache_backbone`, ``cache`` (n_crops, D) holds the backbone's output for every non-overlapping crop,
    ``crop_track`` (n_crops,) the track of each: that cache stays in memory either way (D floats per crop: 200
    for musicnn, 0.8 KB per 3 s) and grows with the tracks.
    """

    crops: Crops
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
             batch_size: int, standardised: bool, dev: torch.device, memory_gb: float | str = "auto") -> TrainingData:
        """The labelled tracks of ``manifest_path`` with features in ``features_path``; their log-mels in memory
        when their float32 size is at most :func:`feature_memory_limit` of ``memory_gb``, else streamed.

        The band statistics are one pass over the train tracks in row order either way, so they match exactly.
        Close the result (or use it as a context manager) to close a streamed features file.
        """
        limit = feature_memory_limit(memory_gb)
        store = FeatureStore.open(features_path)
        try:
            d = _labelled_rows(store, manifest_path)
            mel_config, positions = store.config, d["positions"]
            nbytes = positions.size * mel_config.n_mels * mel_config.n_frames * 4
            mels = store.read(positions) if nbytes <= limit else None  # (N, n_mels, n_frames) float32 dB
            subsets = {name: np.flatnonzero(d["split"] == name) for name in SPLITS}
            train_idx = subsets["train"]
            if standardised:  # with train-split statistics only
                train_mels = ((mels[i] for i in train_idx) if mels is not None
                              else _read_tracks(store, positions[train_idx]))
                mean, std = _band_statistics(train_mels, d["n_true"][train_idx], mel_config.n_mels)
            else:
                mean, std = np.zeros(mel_config.n_mels, np.float32), np.ones(mel_config.n_mels, np.float32)
        except BaseException:
            store.close()
            raise
        if mels is None:
            crops: Crops = StoreCrops(store, positions, mean, std)
            where = f"streamed from {store.path}"
        else:
            store.close()
            for begin in range(0, len(mels), _READ_BLOCK):  # in place: no second copy of the features
                mels[begin : begin + _READ_BLOCK] = standardise(mels[begin : begin + _READ_BLOCK], mean, std)
            crops, where = TensorCrops(_place(mels, dev)), "in memory"
        crop = crop_frames(mel_config, crop_s)
        log.info("%s tracks, %d labels, crops of %d frames, on %s; features (%.2f GB as float32) %s",
                 {name: len(idx) for name, idx in subsets.items()}, len(d["labels"]), crop, dev, nbytes / 1e9, where)
        return cls(crops=crops, n_true=d["n_true"], y=d["y"], subsets=subsets, labels=d["labels"],
                   mel_config=mel_config, mean=mean, std=std, crop=crop, eval_batch=batch_size * 4)

    def close(self) -> None:
        self.crops.close()

    def __enter__(self) -> TrainingData:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @torch.no_grad()
    def cache_backbone(self, model: nn.Module, dev: torch.device) -> None:
        """Compute ``model.embed`` of every non-overlapping crop once; training then feeds ``model.head`` only."""
        model.eval()
        tracks, plan = crop_batches(self.n_true, self.crop, self.crops.n_frames, self.eval_batch)
        outputs = []
        for x in self.crops.batches(plan, self.crop, dev):
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
        return tracks, np.minimum(rng.integers(0, room), self.crops.n_frames - self.crop)

    def batch(self, tracks: np.ndarray, starts: np.ndarray, dev: torch.device, rng: np.random.Generator, *,
              augment: bool, mixup: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of one training batch: (b, 1, n_mels, crop) crops or (b, D) cached rows, and (b,)
        int64 labels, or (b, n_classes) label probabilities under mixup.

        ``augment``: a random gain of +-6 dB (dB features only) and one band and one time mask per crop;
        ``mixup``: Beta(mixup, mixup) mixing of the batch with itself shuffled (0: none).
        """
        return next(self.batches([(tracks, starts)], dev, rng, augment=augment, mixup=mixup))

    def batches(self, plan: Sequence[tuple[np.ndarray, np.ndarray]], dev: torch.device, rng: np.random.Generator, *,
                augment: bool, mixup: float) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`batch` of each ``(tracks, starts)`` of ``plan`` in turn; streamed crops are read ahead, the
        random draws (augmentation, mixup) are made here, in order, as in memory."""
        if self.cache is not None:
            inputs: Iterable[torch.Tensor] = (self.cache[torch.as_tensor(starts, device=self.cache.device)].to(dev)
                                              for _, starts in plan)
        else:
            inputs = self.crops.batches(plan, self.crop, dev)
        for (tracks, _), x in zip(plan, inputs, strict=True):
            target = torch.as_tensor(self.y[tracks], device=dev)
            if augment and self.cache is None:
                x = self._augment(x, rng)
            if mixup > 0 and len(tracks) > 1:
                lam = float(rng.beta(mixup, mixup))
                order = torch.as_tensor(rng.permutation(len(tracks)), device=dev)
                x = lam * x + (1 - lam) * x[order]
                onehot = F.one_hot(target, len(self.labels)).float()
                target = lam * onehot + (1 - lam) * onehot[order]
            yield x, target

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
            return track_outputs(fn, self.crops.take(idx), self.n_true[idx], crop=self.crop,
                                 batch_size=self.eval_batch, device=dev)
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
