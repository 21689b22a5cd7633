"""Benchmark: genre and search quality on music the model never saw. Train on one labelled folder, test on another.

For each model (cifar10, resnet_v2, musicnn) the library's own path as the pipeline runs it: the dataset stage's
manifest and split of the training folder (:func:`pipeline.dataset.build_manifest`), its features
(:func:`pipeline.feature_shards.write_feature_shard`, the model's preset), :func:`pipeline.train.train_model`,
then :class:`pipeline.classifier.GenreClassifier` on every clip of the test folder. Against it, the model-free
baseline: each clip's per-band mean and std of the default log-mel over time, standardised with the training
folder's statistics; a logistic regression (scikit-learn) for accuracy, cosine kNN for search.

Figures per model: accuracy and macro-F1 on the test clips whose label the training folder has (the others
cannot be predicted; their count is printed), leave-one-out genre precision@10 of the test folder's vectors
among themselves (:func:`pipeline.index.genre_precision_at_k`, all test clips, every label), and seconds
(features, training and embedding). Prints tables, asserts nothing.

    python bench/quality.py                                    # sample-audio <-> emotify-audio, both ways
    python bench/quality.py --train A --test B --epochs 30     # one way, your own folders
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # tables, not progress bars

from models import MODEL_NAMES, MODEL_PRESETS  # noqa: E402
from pipeline.classifier import GenreClassifier  # noqa: E402
from pipeline.dataset import build_manifest  # noqa: E402
from pipeline.evaluate import classification_metrics  # noqa: E402
from pipeline.feature_shards import write_feature_shard  # noqa: E402
from pipeline.feature_store import FeatureStore  # noqa: E402
from pipeline.index import genre_precision_at_k  # noqa: E402
from pipeline.io import params_key  # noqa: E402
from pipeline.manifest import read_manifest  # noqa: E402
from pipeline.mel import MelConfig  # noqa: E402
from pipeline.train import TrainConfig, train_model  # noqa: E402
from pipeline.vectors import l2_normalise  # noqa: E402

SHARED = ROOT.parent / "shared"
PAIRS = [(SHARED / "sample-audio", SHARED / "emotify-audio"), (SHARED / "emotify-audio", SHARED / "sample-audio")]


def prepared(folder: Path, work: Path, cfg: MelConfig) -> tuple[Path, Path]:
    """The folder's manifest and features (cached in ``work`` by folder and settings): (manifest, features)."""
    base = work / f"{folder.name}-{params_key([str(folder.resolve()), cfg.to_dict()])}"
    manifest, features = base / "manifest.parquet", base / "features.h5"
    if not features.is_file():
        build_manifest(folder, manifest)
        tracks = [(r["track_id"], r["path"]) for r in read_manifest(manifest, status="ok")]
        write_feature_shard(tracks, features, cfg, workers=os.cpu_count())
    return manifest, features


def labelled_mels(manifest: Path, features: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Log-mels (N, n_mels, T) float32, frames holding audio (N,) and labels of the labelled ok tracks."""
    rows = [r for r in read_manifest(manifest, status="ok") if r["label"]]
    with FeatureStore.open(features) as store:
        positions = store.index_of([r["track_id"] for r in rows])
        return store.read(positions), store.n_frames[positions], [r["label"] for r in rows]


def scores(vectors: np.ndarray, predicted: list[str], truth: list[str], train_labels: list[str]) -> dict:
    """Accuracy/macro-F1 over the test clips with a known label, and precision@10 over all of them."""
    known = [i for i, label in enumerate(truth) if label in train_labels]
    metrics = classification_metrics(np.array([train_labels.index(truth[i]) for i in known]),
                                     np.array([train_labels.index(predicted[i]) for i in known]), train_labels)
    precision = genre_precision_at_k(vectors, truth, k=10)["genre_precision_at_10"]
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "precision": precision,
            "scored": len(known)}


def baseline(train: tuple, test: tuple) -> dict:
    """Per-band mean and std over the frames holding audio, standardised by the training folder."""
    from sklearn.linear_model import LogisticRegression

    def stats(mels: np.ndarray, n_true: np.ndarray) -> np.ndarray:
        return np.stack([np.concatenate([m[:, :n].mean(axis=1), m[:, :n].std(axis=1)])
                         for m, n in zip(mels, n_true, strict=True)])  # (N, 2 n_mels)

    x_train, x_test = stats(*train[:2]), stats(*test[:2])
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    classes = sorted(set(train[2]))
    model = LogisticRegression(max_iter=2000, C=0.5).fit(x_train, train[2])
    return scores(l2_normalise(x_test), list(model.predict(x_test)), test[2], classes)


def evaluate_model(name: str, train_dir: Path, test_dir: Path, work: Path, epochs: int) -> dict:
    cfg = MelConfig.preset(MODEL_PRESETS.get(name, "default"), dtype="float32")
    train_manifest, train_features = prepared(train_dir, work, cfg)
    test_manifest, test_features = prepared(test_dir, work, cfg)
    out = work / f"{name}-{params_key([str(train_features), epochs])}"
    if not (out / "metrics.json").is_file():
        train_model(train_features, train_manifest, out, TrainConfig(model=name, epochs=epochs), device="auto")
    classifier = GenreClassifier.load(out)
    mels, n_true, truth = labelled_mels(test_manifest, test_features)
    vectors, probabilities = classifier.embed_and_predict(mels, n_frames=n_true)
    predicted = [classifier.labels[i] for i in probabilities.argmax(axis=1)]
    return scores(vectors, predicted, truth, classifier.labels)


def compare(train_dir: Path, test_dir: Path, work: Path, models: list[str], epochs: int) -> None:
    print(f"\ntrain on {train_dir} -> test on {test_dir} ({epochs} epochs)")
    print(f"{'model':<10} {'accuracy':>9} {'macro-F1':>9} {'prec@10':>8} {'scored':>7} {'seconds':>8}")
    rows = []
    started = time.perf_counter()
    cfg = MelConfig(dtype="float32")
    train = labelled_mels(*prepared(train_dir, work, cfg))
    test = labelled_mels(*prepared(test_dir, work, cfg))
    rows.append(("baseline", baseline(train, test), time.perf_counter() - started))
    for name in models:
        started = time.perf_counter()
        rows.append((name, evaluate_model(name, train_dir, test_dir, work, epochs), time.perf_counter() - started))
    for name, s, seconds in rows:
        print(f"{name:<10} {s['accuracy']:>9.3f} {s['macro_f1']:>9.3f} {s['precision']:>8.3f} {s['scored']:>7} "
              f"{seconds:>8.1f}")
    labels = sorted(set(test[2]))
    print(f"(test clips: {len(test[2])}, labels {', '.join(labels)}; 'scored': those whose label the training folder "
          f"has; prec@10 chance about {max(test[2].count(x) for x in labels) / len(test[2]):.2f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, help="labelled folder to train on (default: both shared pairs)")
    parser.add_argument("--test", type=Path, help="labelled folder to test on")
    parser.add_argument("--models", default=",".join(MODEL_NAMES))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    pairs = [(args.train, args.test)] if args.train else PAIRS
    for train_dir, test_dir in pairs:
        compare(train_dir, test_dir, args.workdir, args.models.split(","), args.epochs)


if __name__ == "__main__":
    main()
