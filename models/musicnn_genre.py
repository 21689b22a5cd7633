"""The "musicnn" genre model: the pretrained MSD_musicnn backbone, frozen, and a small head trained on the labels.

Reference: J. Pons, X. Serra, "musicnn: pre-trained convolutional neural networks for music audio tagging"
(2019); frozen pretrained embeddings plus a linear model are how the field gets good genre vectors from little
data (musicnn max_pool + a linear model: 77 % on the artist-filtered GTZAN split). The backbone
(:class:`models.musicnn.MusicnnNet` with its published weights) reads 3 s patches of musicnn's log-mel
(the ``musicnn`` features preset: 16 kHz, 96 bands, ``log10(1 + 10000 * power)``), unstandardised: its own
input batch norm does that. ``embed`` is the backbone representation named by ``vector`` (the search
vector and the head's input); ``head`` is dropout and one linear layer.

The training loop sees ``frozen_backbone`` and trains only the head, on the backbone's outputs computed once
per crop; ``finetune=True`` trains everything end to end instead (a job for a GPU). With ``n_classes=0`` there is
no head at all: the backbone alone, which indexes a library when no labelled music is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.musicnn import MUSICNN_MEL, load_musicnn_tags, load_pretrained_musicnn

# The backbone outputs a head can sit on, and their sizes (models.musicnn.MusicnnNet.features).
VECTORS = {"penultimate": 200, "max_pool": 753, "mean_pool": 753, "pooled": 1506, "taggram": 50}


@dataclass(frozen=True)
class MusicnnGenreConfig:
    """``vector``: the backbone output used as embedding (see :data:`VECTORS`); ``dropout`` before the head;
    ``finetune``: train the backbone too (set by ``[train] finetune``).

    The penultimate layer is the default by measurement (``bench/musicnn_vectors.py``, leave-one-out genre
    precision of each vector averaged over 3 s patches): GTZAN-30 P@2 0.75 against 0.58 for max_pool and 0.60
    for mean_pool; emotify-120 P@10 0.647 against 0.588 and 0.576 (the taggram ties at 0.648 with a quarter of
    the dimensions' information).
    """

    vector: str = "penultimate"
    dropout: float = 0.25
    finetune: bool = False


class _NoLabels(nn.Module):
    """The head of a backbone used without labels: (B, D) -> (B, 0) logits."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, :0]


class MusicnnGenre(nn.Module):
    """Log-mel (B, 1, 96, T) in musicnn's scale -> (B, n_classes) genre logits over a pretrained backbone."""

    standardise_input = False  # the backbone's first layer is its own batch norm, fitted on MSD

    def __init__(self, *, n_classes: int, n_mels: int = MUSICNN_MEL.n_mels, **kwargs) -> None:
        super().__init__()
        cfg = MusicnnGenreConfig(**kwargs)
        if cfg.vector not in VECTORS:
            raise ValueError(f"unknown musicnn vector {cfg.vector!r} (choose from {', '.join(VECTORS)})")
        if n_mels != MUSICNN_MEL.n_mels:
            raise ValueError(f"the pretrained musicnn reads {MUSICNN_MEL.n_mels} mel bands, got {n_mels} "
                             "(use the musicnn features preset)")
        self.config = cfg
        self.backbone = load_pretrained_musicnn()
        self.backbone.requires_grad_(cfg.finetune)
        self.frozen_backbone = not cfg.finetune
        self.embedding_dim = VECTORS[cfg.vector]
        self.tag_names = load_musicnn_tags()  # the backbone's taggram columns, whatever ``vector`` is
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.embedding_dim, n_classes)) if n_classes \
            else _NoLabels()

    def train(self, mode: bool = True) -> MusicnnGenre:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()  # a frozen backbone keeps its MSD batch-norm statistics and no dropout
        return self

    def embed_and_tag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 96, T) -> :meth:`embed`'s (B, embedding_dim) and the (B, 50) MSD tag probabilities (the
        backbone's taggram, in the order of ``tag_names``), from one pass through the backbone."""
        features = self.backbone.features(x)
        if self.config.vector == "pooled":
            embedding = torch.cat([features["max_pool"], features["mean_pool"]], dim=1)  # (B, 1506)
        else:
            embedding = features[self.config.vector]
        return embedding, features["taggram"]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 96, T) -> (B, embedding_dim): the backbone's ``vector`` output (ReLU/batch-normed, or tags)."""
        return self.embed_and_tag(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 96, T) -> (B, n_classes) genre logits."""
        return self.head(self.embed(x))
