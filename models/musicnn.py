"""MSD_musicnn: the pretrained music auto-tagger of Pons & Serra, ported from TensorFlow 1 to PyTorch.

Reference: J. Pons, X. Serra, "musicnn: pre-trained convolutional neural networks for music audio tagging"
(ISMIR 2019 late-breaking demo), and the ``musicnn`` 0.1.0 package (ISC licence, Music Technology Group,
Universitat Pompeu Fabra; ``musicnn/models.py::build_musicnn``), whose ``MSD_musicnn`` checkpoint
``models/convert_musicnn.py`` turned into ``models/weights/msd_musicnn.npz``.

The network reads a 3 s log-mel patch (96 bands x 187 frames at 16 kHz, hop 256; see :data:`MUSICNN_MEL`):

- front-end, musically motivated: "timbral" filters spanning 7 frames and 40 % / 70 % of the mel axis
  (204 each) and "temporal" filters spanning one band and 128 / 64 / 32 frames (51 each), each max-pooled
  over the whole mel axis, so 561 features per frame;
- mid-end: three 1-d convolutions of 64 filters over 7 frames, the last two residual, densely connected
  (front-end and mid-end outputs concatenated: 561 + 3 x 64 = 753 features per frame);
- back-end: max and mean over time (the ``max_pool`` / ``mean_pool`` features, 753 each), a dense layer of 200
  units (the penultimate layer, the embedding) and 50 tag logits (sigmoid gives the MSD taggram).

Every convolution and dense layer is followed by ReLU *then* batch norm, as in the original. TensorFlow's
padding is reproduced exactly: the timbral and mid-end convolutions pad 3 frames each side, the temporal
ones pad "same", which for an even kernel k puts (k - 1) // 2 frames before and k // 2 after. Batch norm uses
TF's epsilon 1e-3 and moving-average decay 0.99 (PyTorch momentum 0.01).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

log = logging.getLogger(__name__)

MIN_MELS = 32
WEIGHTS = Path(__file__).parent / "weights" / "msd_musicnn.npz"
TAGS = Path(__file__).parent / "weights" / "msd_musicnn.json"
BN_EPS = 1e-3  # tf.compat.v1.layers.batch_normalization's default epsilon
BN_MOMENTUM = 0.01  # TF's moving-average decay 0.99, in PyTorch's convention (1 - decay)


@dataclass(frozen=True)
class MusicnnMel:
    """The log-mel the pretrained weights expect (``musicnn/configuration.py`` and ``extractor.batch_data``).

    ``librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=256, n_mels=96)`` (Hann window,
    centred frames with reflect padding, power 2, Slaney mel scale and area normalisation: librosa 0.7's
    defaults), then ``log10(10000 * mel + 1)``. Patches are ``n_frames`` = 187 frames (3 s:
    ``librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1``), without overlap.
    """

    sr: int = 16000
    n_fft: int = 512
    hop_length: int = 256
    n_mels: int = 96
    n_frames: int = 187
    log_gain: float = 10000.0


MUSICNN_MEL = MusicnnMel()


@dataclass(frozen=True)
class MusicnnConfig:
    """Filter counts and shapes of ``build_musicnn(num_filt_frontend=1.6, num_filt_midend=64, units=200)``.

    ``timbral_mels`` are fractions of the mel axis (TF: ``int(0.4 * 96)`` = 38 and ``int(0.7 * 96)`` = 67 bands).
    """

    timbral_filters: int = 204  # int(1.6 * 128)
    timbral_frames: int = 7
    timbral_mels: tuple[float, ...] = (0.4, 0.7)
    temporal_filters: int = 51  # int(1.6 * 32)
    temporal_frames: tuple[int, ...] = (128, 64, 32)
    midend_filters: int = 64
    midend_frames: int = 7
    midend_layers: int = 3
    dense: int = 200
    dropout: float = 0.5


def batch_norm(n: int, dims: int) -> nn.Module:
    """A batch norm with TensorFlow 1's epsilon and momentum over ``n`` channels of a ``dims``-d map."""
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
    return cls(n, eps=BN_EPS, momentum=BN_MOMENTUM)


def pad_same(kernel: int) -> tuple[int, int]:
    """TF "same" padding (before, after) of a stride-1 kernel: (k - 1) // 2 and k // 2 (asymmetric if k is even)."""
    return (kernel - 1) // 2, kernel // 2


class FrontEndBlock(nn.Module):
    """Conv (mel x frames) on the padded log-mel, ReLU, batch norm, max over the remaining mel bands."""

    def __init__(self, c_out: int, kernel: tuple[int, int], time_pad: tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, c_out, kernel_size=kernel)
        self.bn = batch_norm(c_out, 2)
        self.time_pad = time_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 1, M, T + pad); zeros after the input batch norm, where TF pads too
        x = F.pad(x, self.time_pad)
        x = self.bn(F.relu(self.conv(x)))  # (B, c_out, M - kM + 1, T)
        return x.amax(dim=2)  # (B, c_out, T)


class MidEndBlock(nn.Module):
    """1-d conv over 7 frames (3 zero frames each side), ReLU, batch norm; adds its input when ``residual``."""

    def __init__(self, c_in: int, c_out: int, frames: int, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size=frames, padding=frames // 2)
        self.bn = batch_norm(c_out, 1)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(F.relu(self.conv(x)))  # (B, c_out, T)
        return out + x if self.residual else out


class MusicnnNet(nn.Module):
    """Log-mel (B, 1, 96, T) -> 50 MSD tag logits (B, 50); :meth:`embed` gives the 200-d penultimate layer.

    Build it with :func:`load_pretrained_musicnn` for the published weights; a bare ``MusicnnNet()`` is
    randomly initialised. Any T >= 1 works (the weights were trained on T = 187, 3 s patches).

    Parameters
    ----------
    n_classes : output tags (50 for the pretrained weights).
    n_mels : mel bands of the input (96 for the pretrained weights; >= 32).
    timbral_filters, ..., dropout : see :class:`MusicnnConfig`.
    """

    def __init__(self, *, n_classes: int = 50, n_mels: int = MUSICNN_MEL.n_mels, **kwargs) -> None:
        super().__init__()
        if n_mels < MIN_MELS:
            raise ValueError(f"musicnn needs n_mels >= {MIN_MELS}, got {n_mels}")
        tuples = ("timbral_mels", "temporal_frames")
        cfg = MusicnnConfig(**{k: tuple(v) if k in tuples else v for k, v in kwargs.items()})
        self.config = cfg
        self.n_mels = n_mels
        self.bn_input = batch_norm(1, 2)
        half = cfg.timbral_frames // 2
        self.timbral = nn.ModuleList(
            FrontEndBlock(cfg.timbral_filters, (int(ratio * n_mels), cfg.timbral_frames), (half, half))
            for ratio in cfg.timbral_mels
        )
        self.temporal = nn.ModuleList(
            FrontEndBlock(cfg.temporal_filters, (1, frames), pad_same(frames)) for frames in cfg.temporal_frames
        )
        n_front = cfg.timbral_filters * len(cfg.timbral_mels) + cfg.temporal_filters * len(cfg.temporal_frames)
        self.midend = nn.ModuleList(
            MidEndBlock(n_front if i == 0 else cfg.midend_filters, cfg.midend_filters, cfg.midend_frames, i > 0)
            for i in range(cfg.midend_layers)
        )
        self.n_features = n_front + cfg.midend_filters * cfg.midend_layers  # 753: the max_pool / mean_pool size
        self.bn_pool = batch_norm(2 * self.n_features, 1)
        self.dense = nn.Linear(2 * self.n_features, cfg.dense)
        self.bn_dense = batch_norm(cfg.dense, 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.dense, n_classes)
        self.embedding_dim = cfg.dense

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every representation ``musicnn.extractor`` offers, for one (B, 1, n_mels, T) float log-mel batch.

        Returns
        -------
        dict of float tensors: ``timbral`` (B, 408, T) and ``temporal`` (B, 153, T) front-end maps, ``cnn1``,
        ``cnn2``, ``cnn3`` (B, 64, T) mid-end maps, ``max_pool`` and ``mean_pool`` (B, 753) the temporal
        pooling of all of them (front-end first), ``penultimate`` (B, 200), ``logits`` (B, n_classes) and
        ``taggram`` (B, n_classes) = sigmoid(logits), tag probabilities in [0, 1].
        """
        B, C, M, T = x.shape  # noqa: N806 (B, 1, n_mels, T)
        if C != 1 or M != self.n_mels:
            raise ValueError(f"musicnn needs (B, 1, {self.n_mels}, T) log-mel, got {tuple(x.shape)}")
        x = self.bn_input(x)  # (B, 1, M, T)
        timbral = torch.cat([block(x) for block in self.timbral], dim=1)  # (B, 408, T)
        temporal = torch.cat([block(x) for block in self.temporal], dim=1)  # (B, 153, T)
        maps = [torch.cat([timbral, temporal], dim=1)]  # [(B, 561, T)]
        for block in self.midend:
            maps.append(block(maps[-1]))  # cnn1, cnn2, cnn3: (B, 64, T) each
        midend = torch.cat(maps, dim=1)  # (B, 753, T)
        max_pool, mean_pool = midend.amax(dim=2), midend.mean(dim=2)  # (B, 753) each
        # TF flattens the (B, 753, 2) stack of [max, mean], so the two interleave feature by feature
        pooled = torch.stack([max_pool, mean_pool], dim=2).flatten(1)  # (B, 1506)
        penultimate = self.bn_dense(F.relu(self.dense(self.dropout(self.bn_pool(pooled)))))  # (B, 200)
        logits = self.head(self.dropout(penultimate))  # (B, n_classes)
        return {
            "timbral": timbral, "temporal": temporal, "cnn1": maps[1], "cnn2": maps[2], "cnn3": maps[3],
            "max_pool": max_pool, "mean_pool": mean_pool, "penultimate": penultimate,
            "logits": logits, "taggram": torch.sigmoid(logits),
        }  # fmt: skip

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer: (B, 1, n_mels, T) float -> (B, 200), the batch-normed ReLU of the dense layer."""
        return self.features(x)["penultimate"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, n_mels, T) float log-mel -> (B, n_classes) tag logits (sigmoid: the taggram)."""
        return self.features(x)["logits"]


def musicnn_log_mel(y: np.ndarray, *, sr: int = MUSICNN_MEL.sr) -> np.ndarray:
    """musicnn's input: a mono 16 kHz waveform (n_samples,) float -> (96, n_frames) float32 log-mel.

    ``log10(10000 * mel + 1)`` of librosa's power mel spectrogram with musicnn's settings (:class:`MusicnnMel`),
    n_frames = 1 + n_samples // 256. Two choices differ from running ``musicnn.extractor`` today, both to match
    what the network was trained on: frames are centred with *reflect* padding (librosa's default until 0.10,
    ``musicnn`` needed >= 0.7), and the log is taken in float32 (the extractor casts the mel power to float16
    first, which loses precision and overflows to inf above 6.55, in loud low bands).

    Raises
    ------
    ValueError
        When ``sr`` is not 16000 (resample first) or ``y`` is not 1-d.
    """
    if sr != MUSICNN_MEL.sr:
        raise ValueError(f"musicnn needs {MUSICNN_MEL.sr} Hz audio, got {sr} Hz")
    if y.ndim != 1:
        raise ValueError(f"musicnn needs a mono (n_samples,) waveform, got shape {y.shape}")
    import librosa  # here, so that importing the model does not pull in librosa's start-up time

    mel = librosa.feature.melspectrogram(
        y=np.asarray(y, dtype=np.float32), sr=sr, n_fft=MUSICNN_MEL.n_fft, hop_length=MUSICNN_MEL.hop_length,
        n_mels=MUSICNN_MEL.n_mels, pad_mode="reflect",
    )  # (96, n_frames) power, Hann window, Slaney mel scale and normalisation
    return np.log10(MUSICNN_MEL.log_gain * mel + 1.0).astype(np.float32)


def musicnn_patches(log_mel: np.ndarray, *, n_frames: int = MUSICNN_MEL.n_frames, hop: int | None = None) -> np.ndarray:
    """Cut a (n_mels, T) log-mel into (N, 1, n_mels, n_frames) patches, ``hop`` frames apart (default: none overlap).

    As ``musicnn.extractor.batch_data``: patches start at 0, hop, 2 hop, ... and the frames after the last whole
    patch are dropped; a clip shorter than one patch gives a single patch of all its frames.
    """
    hop = hop or n_frames
    n_mels, total = log_mel.shape
    if total <= n_frames:
        return log_mel[None, None].astype(np.float32)  # (1, 1, n_mels, total)
    starts = range(0, total - n_frames + 1, hop)
    return np.stack([log_mel[None, :, s : s + n_frames] for s in starts]).astype(np.float32)  # (N, 1, M, n_frames)


def load_musicnn_tags(path: Path = TAGS) -> tuple[str, ...]:
    """The 50 MSD tag names, in the order of the logits (``musicnn.configuration.MSD_LABELS``)."""
    return tuple(json.loads(Path(path).read_text())["tags"])


def load_pretrained_musicnn(path: Path = WEIGHTS, *, device: str | torch.device = "cpu") -> MusicnnNet:
    """The MSD_musicnn network with its published weights, in eval mode.

    Parameters
    ----------
    path : the npz written by ``models/convert_musicnn.py`` (one array per state_dict entry, no pickle).
    device : where to put the module.

    Raises
    ------
    FileNotFoundError
        When the npz is missing.
    RuntimeError
        When its arrays do not match the module's state_dict (missing, unexpected or mis-shaped entries).
    """
    model = MusicnnNet()
    with np.load(path, allow_pickle=False) as npz:
        state = {name: torch.from_numpy(npz[name]) for name in npz.files}
    model.load_state_dict(state, strict=True)
    log.debug("loaded MSD_musicnn weights from %s", path)
    return model.to(device).eval()
