"""The train stage: one training loop for every genre model, with checkpoints, resumption and evaluation.

:func:`train_model` reads the log-mel features and the manifest's labels and splits
(:class:`~pipeline.training_data.TrainingData`), trains on random fixed-length crops, augmented (gain,
SpecAugment masks, mixup), or, for a frozen pretrained backbone, on its outputs cached once per crop. It keeps the
epoch with the lowest validation loss when the validation split is large enough to say
(:data:`MIN_VALID_PER_LABEL`), else the last epoch, and evaluates a track by averaging the logits of all its
non-overlapping crops. The out_dir it fills::

    checkpoints/last.pt   model, optimiser, epoch, best weights and score, history (resume from here)
    checkpoints/best.pt   best weights, their epoch and validation figures
    model.pt              best weights as a plain state_dict
    config.json           what rebuilds the model and its input: name, kwargs, labels, normalisation, MelConfig,
                          and embedding_center: the train tracks' mean embedding that search vectors are centred on
    history.csv           one row per epoch; curves.png and confusion.png draw it and the test confusion
    metrics.json          test accuracy, macro-F1, per-genre precision/recall, confusion; written last

Every file is written atomically and checkpoints hold only tensors and plain values (``weights_only=True``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn
from tqdm import tqdm

from models import MODELS, build_model
from pipeline.errors import MelsearchError
from pipeline.evaluate import classification_metrics, plot_confusion, plot_curves, write_history
from pipeline.inference import load_checkpoint, resolve_device
from pipeline.io import atomic_path, write_json_atomic
from pipeline.runtime import keep_freed_memory
from pipeline.train_config import TrainConfig
from pipeline.training_data import TrainingData

__all__ = ["TrainConfig", "train_model", "train_step"]

log = logging.getLogger(__name__)

# TrainConfig fields a rerun may change and still resume the same run: how long to go on and how often to save.
RESUMABLE_CHANGES = ("epochs", "patience", "checkpoint_interval")
# The learning rate follows a cosine from lr down to this fraction of it over the configured epochs.
_LR_FLOOR = 0.05
_CHECKPOINT_FORMAT = 1
# Validation tracks per label needed to choose the best epoch by validation loss (else: the last epoch).
MIN_VALID_PER_LABEL = 2


def train_step(model: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, *, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch ``x`` (B, 1, n_mels, T) float (or (B, D) for a head on cached features),
    ``y`` (B,) int64 class indices or (B, n_classes) float class probabilities (mixup).

    Returns the batch's summed cross-entropy and count of correct predictions as detached 0-d tensors
    (left on the device: reading them every step would stall a GPU). ``autocast``: bf16 mixed precision.
    """
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    hard = y.argmax(dim=1) if y.ndim == 2 else y
    return loss.detach() * hard.numel(), (logits.argmax(dim=1) == hard).sum()


def _lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Cosine decay from ``cfg.lr`` at epoch 1 to ``_LR_FLOOR * cfg.lr`` at ``cfg.epochs``."""
    progress = (epoch - 1) / max(1, cfg.epochs - 1)
    return cfg.lr * (_LR_FLOOR + (1 - _LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MelsearchError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None


def _json_safe(obj: Any) -> Any:
    """NaN and infinity as null: strict JSON readers reject them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(value) for value in obj]
    return obj


def _save_atomic(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def train_model(features_path: str | os.PathLike, manifest_path: str | os.PathLike, out_dir: str | os.PathLike,
                cfg: TrainConfig, *, device: str = "auto", feature_memory_gb: float | str = "auto",
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Train ``cfg.model`` on the features' train split and fill ``out_dir`` (see the module docstring).

    Parameters
    ----------
    features_path : HDF5 log-mels from the features stage (read with :class:`pipeline.feature_store.FeatureStore`).
    manifest_path : the dataset manifest; rows with ``status == "ok"``, a label and split train/valid/test are
        used (train: fitting and normalisation; valid: best epoch and early stopping; test: the metrics).
    out_dir : the model folder; a ``checkpoints/last.pt`` there is resumed (the epoch count goes on) when it
        comes from the same run (same data, labels and settings but for :data:`RESUMABLE_CHANGES`).
    cfg : the training settings.
    device : ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``; CUDA trains with bf16 autocast and
        channels-last tensors; the CPU uses every core this process may run on.
    feature_memory_gb : features whose float32 size is at most this many GB (1e9 bytes) load into memory (on
        the GPU when they fit), larger ones are read from ``features_path`` batch by batch, a few batches ahead;
        ``"auto"``: half the memory available; 0: always streamed. Either way the results are the same, bit for
        bit (see :mod:`pipeline.training_data`).
    progress : called as ``progress(epoch, cfg.epochs)`` after each epoch.

    Returns
    -------
    The contents of ``metrics.json``.

    Raises
    ------
    MelsearchError
        Naming the file, for missing/unreadable inputs, no train tracks, or a corrupt or foreign checkpoint.
    """
    out_dir = Path(out_dir)
    dev = _set_up_device(device)
    torch.manual_seed(cfg.seed)
    model_class = MODELS[cfg.model]
    # a streamed features file stays open until the model folder is written
    with TrainingData.load(features_path, manifest_path, crop_s=cfg.crop_s, batch_size=cfg.batch_size,
                           standardised=getattr(model_class, "standardise_input", True), dev=dev,
                           memory_gb=feature_memory_gb) as data:
        model = build_model(cfg.model, n_classes=len(data.labels), n_mels=data.mel_config.n_mels, **_model_kwargs(cfg))
        model = model.to(dev, memory_format=torch.channels_last) if dev.type == "cuda" else model.to(dev)
        if getattr(model, "frozen_backbone", False):
            data.cache_backbone(model, dev)
        select_by_valid = _selects_by_validation(data)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        run = {
            "train": {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES},
            "feature_key": data.mel_config.key(),
            "labels": data.labels,
            "tracks": {name: int(len(idx)) for name, idx in data.subsets.items()},
        }
        checkpoints = _Checkpoints(out_dir / "checkpoints", run)
        state, best_weights = checkpoints.resume(model, optimizer, dev)

        while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
            epoch = state["epoch"] + 1
            row = _train_epoch(model, optimizer, data, cfg, epoch, dev)
            state["history"].append(row)
            state["epoch"] = epoch
            # with too small a validation split the last epoch is the best one and training runs to cfg.epochs
            if not select_by_valid or row["valid_loss"] < state["best_loss"]:
                state.update(best_epoch=epoch, bad_epochs=0,
                             best_loss=row["valid_loss"] if select_by_valid else math.inf)
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                checkpoints.save_best(best_weights, epoch, row)
            else:
                state["bad_epochs"] += 1
            if epoch % cfg.checkpoint_interval == 0 or state["bad_epochs"] >= cfg.patience or epoch == cfg.epochs:
                checkpoints.save_last(state, model, optimizer, best_weights)
            log.info("%s epoch %d/%d: train loss %.4f acc %.3f, valid loss %.4f acc %.3f, lr %.2e, %.1f s", cfg.model,
                     epoch, cfg.epochs, row["train_loss"], row["train_acc"], row["valid_loss"], row["valid_acc"],
                     row["lr"], row["seconds"])
            if progress is not None:
                progress(epoch, cfg.epochs)

        _load_weights(model, best_weights, checkpoints.last)
        return _write_model_folder(out_dir, model, best_weights, data, cfg, state, dev)


def _set_up_device(device: str) -> torch.device:
    """The torch device, with every allowed CPU core and freed memory kept for CPU training (see
    :mod:`pipeline.runtime`), and cuDNN autotuning on CUDA."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    else:
        torch.backends.cudnn.benchmark = True  # every batch has the same shape
    return dev


def _model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The model's keyword arguments: ``model_kwargs``, plus ``finetune`` for a pretrained backbone."""
    kwargs = dict(cfg.model_kwargs)
    if cfg.finetune:
        if not hasattr(MODELS[cfg.model], "standardise_input"):
            raise MelsearchError(f"train.finetune applies to pretrained models (musicnn), not {cfg.model}")
        kwargs["finetune"] = True
    return kwargs


def _selects_by_validation(data: TrainingData) -> bool:
    """Whether the validation split is large enough to pick the best epoch and stop early.

    A handful of validation tracks gives a loss so noisy that its minimum is often epoch 1 (measured: a 4-track
    split kept epoch 1 and tested at chance); then the last epoch, at the end of the cosine decay, is kept.
    """
    n_valid, needed = data.subsets["valid"].size, MIN_VALID_PER_LABEL * len(data.labels)
    if n_valid < needed:
        log.info("%d validation tracks (< %d): keeping the last epoch, no early stopping", n_valid, needed)
    return n_valid >= needed


class _Checkpoints:
    """``last.pt`` (everything to resume) and ``best.pt`` (the best weights) of one run, written atomically."""

    def __init__(self, folder: Path, run: dict) -> None:
        self.last, self.best, self.run = folder / "last.pt", folder / "best.pt", run

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer,
               dev: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
        """The loop state and best weights: fresh, or from ``last.pt`` of the same run (loaded into both)."""
        state = {"epoch": 0, "best_epoch": 0, "best_loss": math.inf, "bad_epochs": 0, "history": []}
        best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not self.last.exists():
            return state, best_weights
        ckpt = load_checkpoint(self.last, device=dev, required=(*state, "run", "model", "optimizer", "best_model"))
        if ckpt["run"] != self.run:
            changed = sorted(k for k in self.run if ckpt["run"].get(k) != self.run[k])
            raise MelsearchError(f"{self.last}: checkpoint of another run (differs in {', '.join(changed)}); "
                                 "remove it or train into another folder")
        _load_weights(model, ckpt["model"], self.last)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise MelsearchError(f"{self.last}: optimiser state does not fit the model ({exc})") from None
        log.info("resuming from %s at epoch %d", self.last, ckpt["epoch"])
        return {key: ckpt[key] for key in state}, ckpt["best_model"]

    def save_best(self, weights: dict[str, torch.Tensor], epoch: int, row: dict) -> None:
        _save_atomic({"model": weights, "epoch": epoch, "valid_loss": row["valid_loss"],
                      "valid_acc": row["valid_acc"], "run": self.run}, self.best)

    def save_last(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                  best_weights: dict[str, torch.Tensor]) -> None:
        _save_atomic({**state, "format": _CHECKPOINT_FORMAT, "run": self.run, "model": model.state_dict(),
                      "optimizer": optimizer.state_dict(), "best_model": best_weights}, self.last)


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: TrainingData, cfg: TrainConfig,
                 epoch: int, dev: torch.device) -> dict:
    """One epoch of random (augmented) crops, then the validation figures: the epoch's ``history.csv`` row."""
    started = time.perf_counter()
    lr = _lr_at(cfg, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Seeded per epoch (crops, order, augmentation, dropout), so a resumed run draws what an uninterrupted one would.
    rng = np.random.default_rng([cfg.seed, epoch])
    torch.manual_seed(cfg.seed * 1_000_003 + epoch)
    tracks, starts = data.draw_epoch(rng)
    forward = model.head if data.cache is not None else model  # a frozen backbone's outputs are cached
    model.train()
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev, dtype=torch.int64)
    # a last batch of one would break batch norm on the 1x1 maps at the end of the network
    n_batches = max(1, len(tracks) // cfg.batch_size + (len(tracks) % cfg.batch_size > 1))
    chunks = [slice(b * cfg.batch_size, (b + 1) * cfg.batch_size) for b in range(n_batches)]
    plan = [(tracks[chunk], starts[chunk]) for chunk in chunks]
    batches = data.batches(plan, dev, rng, augment=cfg.augment, mixup=cfg.mixup)
    for x, target in tqdm(batches, total=n_batches, desc=f"{cfg.model} epoch {epoch}/{cfg.epochs}", unit="batch",
                          leave=False, disable=None):
        batch_loss, batch_correct = train_step(forward, optimizer, x, target, autocast=dev.type == "cuda")
        loss_sum += batch_loss
        correct += batch_correct
    seen = len(tracks[: n_batches * cfg.batch_size])
    valid_loss, valid_acc, _ = data.evaluate(model, "valid", dev)
    return {"epoch": epoch, "train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
            "valid_loss": valid_loss, "valid_acc": valid_acc, "lr": lr,
            "seconds": round(time.perf_counter() - started, 3)}


def _write_model_folder(out_dir: Path, model: nn.Module, best_weights: dict[str, torch.Tensor], data: TrainingData,
                        cfg: TrainConfig, state: dict, dev: torch.device) -> dict:
    """Evaluate the best weights, then write model.pt, config.json, history, plots and metrics.json (last)."""
    labels, mel_config = data.labels, data.mel_config
    valid_loss, valid_acc, _ = data.evaluate(model, "valid", dev)
    test_loss, _, test_pred = data.evaluate(model, "test", dev)
    test = classification_metrics(data.y[data.subsets["test"]], test_pred, labels)
    # The embedding layers end in softplus/ReLU, so every vector is positive and, uncentred, all point nearly the
    # same way; search vectors subtract this mean of the train tracks' crop-averaged embeddings (D,).
    center = data.track_means(model, data.subsets["train"], dev, embed=True).mean(dim=0)
    _save_atomic({k: v.detach().cpu().contiguous() for k, v in best_weights.items()}, out_dir / "model.pt")
    write_json_atomic(out_dir / "config.json", {
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "n_classes": len(labels),
        "labels": labels,
        "embedding_dim": model.embedding_dim,
        "input_shape": [1, mel_config.n_mels, data.crop],
        "crop_frames": data.crop,
        "norm_mean": data.mean.tolist(),
        "norm_std": data.std.tolist(),
        "embedding_center": center.cpu().tolist(),
        "mel_config": mel_config.to_dict(),
        "feature_key": mel_config.key(),
        "train_config": cfg.to_dict(),
    })
    write_history(state["history"], out_dir / "history.csv")
    title = f"{cfg.model} ({out_dir.name})"
    plot_curves(state["history"], out_dir / "curves.png", title=title)
    plot_confusion(test["confusion"], labels, out_dir / "confusion.png", title=f"{title}: test split")
    metrics = _json_safe({
        "model": cfg.model,
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "stopped_early": state["bad_epochs"] >= cfg.patience,
        "tracks": {name: int(len(idx)) for name, idx in data.subsets.items()},
        "labels": labels,
        "valid_loss": valid_loss,
        "valid_accuracy": valid_acc,
        "test_loss": test_loss,
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test": test,
    })
    write_json_atomic(out_dir / "metrics.json", metrics)
    log.info("%s: best epoch %d, test accuracy %.3f, macro-F1 %.3f", cfg.model, state["best_epoch"],
             test["accuracy"], test["macro_f1"])
    return metrics
