"""Luigi tasks, one per stage, plus the whole-pipeline wrapper (``luigi --module tasks Pipeline ...``)."""

from tasks.dataset import Dataset, DownloadGTZAN
from tasks.features import Features, FeatureShard
from tasks.pipeline import Pipeline
from tasks.search import Embeddings, Index
from tasks.train import CompareModels, Pretrained, Train

__all__ = ["Dataset", "DownloadGTZAN", "Features", "FeatureShard", "Train", "Pretrained", "CompareModels", "Embeddings",
           "Index", "Pipeline"]
