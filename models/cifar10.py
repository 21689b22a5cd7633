"""The "cifar10" genre CNN: five conv blocks with elongated max-pooling over a log-mel "image".

Reference: the original project's Keras model, after K. Choi, G. Fazekas, M. Sandler, K. Cho,
"Convolutional recurrent neural networks for music classification" (ICASSP 2017), whose 96 x 1366 log-mel
input the pool shapes (2,4),(2,4),(2,4),(3,5),(4,4) reduce to 1 x 1. Each block is a 3x3 convolution, batch
norm, softplus (MXNet's "softrelu") and max-pooling; dropout 0.25 follows blocks 2 and 5, then a dense
layer of 512 units (the embedding), dropout 0.5 and the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

MIN_MELS = 32


@dataclass(frozen=True)
class Cifar10Config:
    """Channels and max-pool shapes (mel, time) of the five blocks, dense width and dropout rates."""

    channels: tuple[int, ...] = (32, 32, 64, 128, 256)
    pools: tuple[tuple[int, int], ...] = ((2, 4), (2, 4), (2, 4), (3, 5), (4, 4))
    dense: int = 512
    conv_dropout: float = 0.25
    dense_dropout: float = 0.5


class ConvBlock(nn.Module):
    """3x3 convolution (same padding), batch norm, softplus, max-pool of at most ``pool``, optional dropout."""

    def __init__(self, c_in: int, c_out: int, pool: tuple[int, int], dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.pool = pool
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, n_mels, n_frames = x.shape  # (B, c_in, n_mels, n_frames)
        # An input smaller than the design size has fewer mel bands or frames left than the pool covers:
        # pool what is there, so any input reaches the head (whose adaptive pooling takes the rest).
        kernel = (min(self.pool[0], n_mels), min(self.pool[1], n_frames))  # (kM, kT)
        x = F.max_pool2d(F.softplus(self.bn(self.conv(x))), kernel)  # (B, c_out, n_mels // kM, n_frames // kT)
        return self.dropout(x)


class Cifar10Net(nn.Module):
    """Log-mel (B, 1, n_mels, T) -> genre logits (B, n_classes); :meth:`embed` gives the 512-d dense layer.

    Parameters
    ----------
    n_classes : output classes.
    n_mels : mel bands of the input (>= 32); the time axis may have any length.
    channels, pools, dense, conv_dropout, dense_dropout : see :class:`Cifar10Config`.
    """

    def __init__(self, *, n_classes: int, n_mels: int, **kwargs) -> None:
        super().__init__()
        if n_mels < MIN_MELS:
            raise ValueError(f"cifar10 needs n_mels >= {MIN_MELS}, got {n_mels}")
        cfg = Cifar10Config(**{k: tuple(map(tuple, v)) if k == "pools" else v for k, v in kwargs.items()})
        if len(cfg.channels) != len(cfg.pools):
            raise ValueError(f"cifar10 needs one pool per block, got {len(cfg.channels)} channels, {len(cfg.pools)}")
        self.config = cfg
        self.n_mels = n_mels
        last = len(cfg.channels) - 1
        c_in = 1
        blocks = []
        for i, (c_out, pool) in enumerate(zip(cfg.channels, cfg.pools, strict=True)):
            dropout = cfg.conv_dropout if i in (1, last) else 0.0  # after blocks 2 and 5
            blocks.append(ConvBlock(c_in, c_out, tuple(pool), dropout))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.dense = nn.Linear(c_in, cfg.dense)
        self.dense_dropout = nn.Dropout(cfg.dense_dropout)
        self.head = nn.Linear(cfg.dense, n_classes)
        self.embedding_dim = cfg.dense

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer: (B, 1, n_mels, T) float -> (B, 512) softplus activations of the dense layer."""
        x = self.blocks(x)  # (B, 256, 1, 1) at 96 x 1366; larger inputs leave a larger map
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 256)
        return F.softplus(self.dense(x))  # (B, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_mels, T) float -> (B, n_classes) logits."""
        return self.head(self.dense_dropout(self.embed(x)))
