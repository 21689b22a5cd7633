"""What using a trained model needs: the device, crops of log-mels (:class:`Crops`), band standardisation,
crop-averaged outputs and safe checkpoint loading. Training (:mod:`pipeline.train`) and inference
(:mod:`pipeline.classifier`) share it, so a model is evaluated exactly as it is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import MelsearchError
from pipeline.mel import MelConfig


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise MelsearchError(f"unknown device {device!r} (use auto, cpu or cuda)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MelsearchError(f"device {device!r} asked for, but this torch sees no CUDA GPU")
    if resolved.type not in ("cpu", "cuda"):
        raise MelsearchError(f"unsupported device {device!r} (use auto, cpu or cuda)")
    return resolved


def crop_frames(mel_config: MelConfig, crop_s: float) -> int:
    """Frames in a crop of ``crop_s`` seconds, ``round(crop_s * sr / hop_length)``, at most the clip's frames."""
    return max(1, min(round(crop_s * mel_config.sr / mel_config.hop_length), mel_config.n_frames))


def standardise(mels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(mels - mean) / std`` per mel band: (N, n_mels, T) dB, (n_mels,), (n_mels,) -> (N, n_mels, T) float32."""
    return ((mels - mean[:, None]) / std[:, None]).astype(np.float32, copy=False)


def _crop_plan(n_true: np.ndarray, crop: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Every non-overlapping crop of each track's audio: (n_crops,) track indices and start frames.

    A track shorter than one crop still gets one crop at frame 0 (its padding fills the rest).
    """
    counts = np.maximum(1, np.asarray(n_true) // crop)
    tracks = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    starts = (np.arange(tracks.size) - first[tracks]) * crop
    return tracks, np.minimum(starts, total - crop)


def to_device(crops: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(b, n_mels, crop) crops as the (b, 1, n_mels, crop) model input on ``device`` (channels-last on CUDA)."""
    x = crops.unsqueeze(1).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


class Crops:
    """Standardised log-mel crops of ``n_tracks`` tracks of ``n_frames`` frames, read by (track, start frame).

    Every forward pass reads its input through this: :class:`TensorCrops` from a tensor in memory,
    :class:`pipeline.training_data.StoreCrops` from the features file, batch by batch.
    """

    n_tracks: int
    n_frames: int

    def gather(self, tracks: np.ndarray, starts: np.ndarray, crop: int, device: torch.device) -> torch.Tensor:
        """Crops ``[track, :, start : start + crop]``: (len(tracks), 1, n_mels, crop) float32 on ``device``."""
        raise NotImplementedError

    def batches(self, plan: Sequence[tuple[np.ndarray, np.ndarray]], crop: int,
                device: torch.device) -> Iterator[torch.Tensor]:
        """:meth:`gather` of each ``(tracks, starts)`` of ``plan``, in order."""
        for tracks, starts in plan:
            yield self.gather(tracks, starts, crop, device)

    def take(self, idx: np.ndarray) -> Crops:
        """The tracks ``idx`` (track ``i`` of the result is track ``idx[i]`` here), without copying log-mels."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the crops are read from (nothing for a tensor)."""


class TensorCrops(Crops):
    """Crops of ``data`` (N, n_mels, T) float32 standardised log-mels, on the CPU or a GPU; ``rows``: the rows
    that are tracks 0, 1, ... (all, in order, when None)."""

    def __init__(self, data: torch.Tensor, rows: np.ndarray | None = None) -> None:
        self.data, self.rows = data, rows
        self.n_tracks = len(data) if rows is None else len(rows)
        self.n_frames = data.shape[2]

    def gather(self, tracks: np.ndarray, starts: np.ndarray, crop: int, device: torch.device) -> torch.Tensor:
        data = self.data
        rows = tracks if self.rows is None else self.rows[tracks]
        index = torch.as_tensor(rows, device=data.device)[:, None, None]
        frames = torch.as_tensor(starts, device=data.device)[:, None] + torch.arange(crop, device=data.device)
        bands = torch.arange(data.shape[1], device=data.device)[None, :, None]
        return to_device(data[index, bands, frames[:, None, :]], device)  # (b, n_mels, crop) on data.device

    def take(self, idx: np.ndarray) -> TensorCrops:
        return TensorCrops(self.data, np.asarray(idx) if self.rows is None else self.rows[idx])


def crop_batches(n_true: np.ndarray, crop: int, n_frames: int,
                 batch_size: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Every non-overlapping crop (:func:`_crop_plan`), in batches: (n_crops,) tracks, [(tracks, starts), ...]."""
    tracks, starts = _crop_plan(n_true, crop, n_frames)
    return tracks, [(tracks[begin : begin + batch_size], starts[begin : begin + batch_size])
                    for begin in range(0, tracks.size, batch_size)]


GPU_CROPS_PER_PASS = 64
# On the CPU a pass is sized so that its largest activation is about this: measured on a 2-core x86_64 machine,
# cifar10 and resnet_v2 (2 MB per 128x128 crop) run 368 and 147 crops/s at 4 crops against 179 and 82 at 64;
# musicnn (8.6 MB per 3 s patch) 43 patches/s at 1 against 16 at 64 (pipeline/runtime.py says why).
_CPU_PASS_BYTES = 8 << 20


@torch.no_grad()
def largest_activation_bytes(fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module,
                             crop_shape: tuple[int, ...]) -> int:
    """Bytes of the largest output of any of ``model``'s modules when ``fn`` runs on one zero crop of ``crop_shape``
    ((1, n_mels, frames): a trial pass, run once per model and crop).

    Only module outputs are seen: a model that makes its largest map with ``torch.nn.functional`` inside a
    module's ``forward`` hides it, and gets passes too large (tried on musicnn's front end: the run got slower)."""
    largest = 0

    def record(_module: torch.nn.Module, _inputs: tuple, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * output.element_size())

    hooks = [module.register_forward_hook(record) for module in model.modules()]
    try:
        fn(torch.zeros((1, *crop_shape), device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return largest


def crops_per_pass(fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, crop_shape: tuple[int, ...],
                   device: torch.device) -> int:
    """Crops per forward pass of inference: ``GPU_CROPS_PER_PASS`` on a GPU; on the CPU as many as keep the
    pass's largest activation near 8 MB (at least 1), so it stays in the caches and in glibc's heap."""
    if device.type != "cpu":
        return GPU_CROPS_PER_PASS
    per_crop = max(1, largest_activation_bytes(fn, model, crop_shape))
    return int(np.clip(_CPU_PASS_BYTES // per_crop, 1, GPU_CROPS_PER_PASS))


@torch.no_grad()
def track_outputs(fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor | Crops, n_true: np.ndarray, *,
                  crop: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Mean of ``fn`` over every non-overlapping crop of each track.

    Parameters
    ----------
    fn : (b, 1, n_mels, crop) -> (b, D), e.g. a model's ``forward`` (logits) or ``embed``; call it in eval mode.
    data : (N, n_mels, T) float32 standardised log-mels, on the CPU or on ``device``, or :class:`Crops` of them.
    n_true : (N,) frames that hold audio per track; crops cover only those.
    crop, batch_size : crop length in frames, crops per forward pass.

    Returns
    -------
    (N, D) float32 on ``device``. On CUDA the forward passes run under bf16 autocast.
    """
    crops = data if isinstance(data, Crops) else TensorCrops(data)
    tracks, plan = crop_batches(n_true, crop, crops.n_frames, batch_size)
    sums = None
    for (batch_tracks, _), x in zip(plan, crops.batches(plan, crop, device), strict=True):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = fn(x).float()  # (b, D)
        if sums is None:
            sums = torch.zeros(len(n_true), out.shape[1], device=device)
        sums.index_add_(0, torch.as_tensor(batch_tracks, device=device), out)
    counts = torch.as_tensor(np.bincount(tracks, minlength=len(n_true)), device=device, dtype=torch.float32)
    return sums / counts[:, None]


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                    required: tuple[str, ...] = ()) -> dict:
    """``torch.load(path, weights_only=True)`` as a dict holding ``required`` keys, or a one-line MelsearchError."""
    path = Path(path)
    if not path.is_file():
        raise MelsearchError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, pickle of arbitrary objects, wrong file type: all mean "corrupt"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MelsearchError(f"{path}: corrupt or unsafe checkpoint ({reason})") from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise MelsearchError(f"{path}: not a melsearch checkpoint (missing {', '.join(missing)})")
    return state
