"""The "resnet_v2" genre CNN: pre-activation residual blocks in three stages, global average pooling.

Reference: K. He, X. Zhang, S. Ren, J. Sun, "Identity Mappings in Deep Residual Networks" (ECCV 2016):
each block is BN-ReLU-conv3x3-BN-ReLU-conv3x3 added to its input (a 1x1 projection where the shape
changes). A 3x3 stem and a 2x2 max-pool shrink the log-mel first (a spectrogram is larger than CIFAR's
32x32); stages of 32, 64 and 128 channels follow, the last two starting with stride 2; a final BN-ReLU and
global average pooling give the embedding, a linear layer the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

MIN_MELS = 32


@dataclass(frozen=True)
class ResNetV2Config:
    """Channels per stage, residual blocks per stage, dropout before the output layer."""

    channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_stage: int = 2
    dropout: float = 0.25


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus the input (projected by a strided 1x1 conv when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # the projection sees the pre-activated input, as in the paper's full pre-activation unit
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)  # (B, c_out, ceil(M / stride), ceil(T / stride))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNetV2(nn.Module):
    """Log-mel (B, 1, n_mels, T) -> genre logits (B, n_classes); :meth:`embed` gives the 128-d pooled vector.

    Parameters
    ----------
    n_classes : output classes.
    n_mels : mel bands of the input (>= 32); the time axis may have any length.
    channels, blocks_per_stage, dropout : see :class:`ResNetV2Config`.
    """

    def __init__(self, *, n_classes: int, n_mels: int, **kwargs) -> None:
        super().__init__()
        if n_mels < MIN_MELS:
            raise ValueError(f"resnet_v2 needs n_mels >= {MIN_MELS}, got {n_mels}")
        cfg = ResNetV2Config(**{k: tuple(v) if k == "channels" else v for k, v in kwargs.items()})
        self.config = cfg
        self.n_mels = n_mels
        self.stem = nn.Conv2d(1, cfg.channels[0], kernel_size=3, padding=1, bias=False)
        blocks = []
        c_in = cfg.channels[0]
        for stage, c_out in enumerate(cfg.channels):
            for i in range(cfg.blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(c_in, c_out, stride))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(c_in, n_classes)
        self.embedding_dim = c_in

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer: (B, 1, n_mels, T) float -> (B, 128) global average of the last stage."""
        x = F.max_pool2d(self.stem(x), 2, ceil_mode=True)  # (B, 32, ceil(n_mels / 2), ceil(T / 2))
        x = F.relu(self.bn(self.blocks(x)))  # (B, 128, ~n_mels / 8, ~T / 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_mels, T) float -> (B, n_classes) logits."""
        return self.head(self.dropout(self.embed(x)))
