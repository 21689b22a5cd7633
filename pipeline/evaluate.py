"""Evaluation of a trained classifier: classification metrics, the training history file and its pictures.

Pictures are drawn on matplotlib ``Figure`` objects (no pyplot, so no global state and no display needed)
and every file is written atomically.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.errors import MelsearchError
from pipeline.io import atomic_path

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    Parameters
    ----------
    y_true, y_pred : (N,) int class indices into ``labels``.
    labels : class names.

    Returns
    -------
    ``{"n", "accuracy", "macro_f1", "per_class": {label: {"precision", "recall", "f1", "support"}},
    "confusion": (n_classes, n_classes) list of lists, row = true class, column = predicted}``.
    A class never predicted has precision 0, one never present recall 0 (as scikit-learn's zero_division=0);
    macro-F1 averages over the classes present in ``y_true`` or ``y_pred``. Accuracy is NaN when N is 0.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    hits = np.diag(confusion).astype(np.float64)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    seen = (predicted > 0) | (support > 0)
    return {
        "n": int(y_true.size),
        "accuracy": float(hits.sum() / y_true.size) if y_true.size else math.nan,
        "macro_f1": float(f1[seen].mean()) if seen.any() else math.nan,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion": confusion.tolist(),
    }


def write_history(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write one row per epoch with :data:`HISTORY_COLUMNS` as CSV (NaN for a missing validation split)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``history.csv`` with ``epoch`` as int and every other column as float."""
    path = Path(path)
    if not path.is_file():
        raise MelsearchError(f"{path}: no training history here (train the model first)")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and set(HISTORY_COLUMNS) - set(rows[0]):
        raise MelsearchError(f"{path}: not a training history (needs columns {', '.join(HISTORY_COLUMNS)})")
    return [{k: int(row[k]) if k == "epoch" else float(row[k]) for k in HISTORY_COLUMNS} for row in rows]


def _save(fig: Figure, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def plot_curves(history: Sequence[dict], out_png: str | os.PathLike, *, title: str = "") -> None:
    """Loss and accuracy per epoch, train and validation, side by side."""
    fig = Figure(figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "acc"), strict=True):
        for split, style in (("train", "-"), ("valid", "--")):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], style, marker=".", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel({"loss": "cross-entropy", "acc": "accuracy"}[metric])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save(fig, out_png)


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], out_png: str | os.PathLike,
                   *, title: str = "") -> None:
    """The confusion matrix (rows: true class, columns: predicted) as a heat map with the counts written in."""
    matrix = np.asarray(confusion)
    k = len(labels)
    fig = Figure(figsize=(1.0 + 0.6 * k, 0.8 + 0.55 * k))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    ax.set_title(title)
    _save(fig, out_png)


def plot_model_comparison(model_dirs: Sequence[str | os.PathLike], out_png: str | os.PathLike) -> None:
    """Validation loss and accuracy per epoch of several trained models (each folder's ``history.csv``).

    Each curve is named after its folder, whose name starts with the model name (``cifar10-<key>``).
    """
    if not model_dirs:
        raise MelsearchError(f"{out_png}: no model folders to compare")
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for model_dir in map(Path, model_dirs):
        history = read_history(model_dir / "history.csv")
        epochs = [row["epoch"] for row in history]
        for ax, metric in zip(axes, ("valid_loss", "valid_acc"), strict=True):
            ax.plot(epochs, [row[metric] for row in history], marker=".", label=model_dir.name)
    for ax, name in zip(axes, ("validation cross-entropy", "validation accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("training history comparison")
    _save(fig, out_png)
