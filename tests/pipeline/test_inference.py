"""How inference sizes its forward passes on the CPU, and that the size never changes a result."""

from __future__ import annotations

import numpy as np
import torch

from models import build_model
from models.musicnn import load_pretrained_musicnn
from pipeline.inference import GPU_CROPS_PER_PASS, crops_per_pass, largest_activation_bytes, track_outputs

CPU = torch.device("cpu")


def test_the_largest_activation_is_measured_on_one_crop():
    model = load_pretrained_musicnn().eval()
    # the first timbral block's conv: 204 filters over 96 - 38 + 1 = 59 bands and 187 frames, float32
    assert largest_activation_bytes(model.embed, model, (1, 96, 187)) == 204 * 59 * 187 * 4


def test_crops_per_pass_keep_a_pass_near_8_mb_on_the_cpu():
    musicnn = load_pretrained_musicnn().eval()
    cifar = build_model("cifar10", n_classes=10, n_mels=128).eval()
    assert crops_per_pass(musicnn.embed, musicnn, (1, 96, 187), CPU) == 1  # 8.6 MB a patch
    assert crops_per_pass(cifar.embed, cifar, (1, 128, 128), CPU) == 4  # 2 MB a crop
    assert crops_per_pass(cifar.embed, cifar, (1, 128, 8), CPU) == GPU_CROPS_PER_PASS  # tiny crops: capped
    assert crops_per_pass(cifar.embed, cifar, (1, 128, 128), torch.device("meta")) == GPU_CROPS_PER_PASS


def test_track_outputs_do_not_depend_on_crops_per_pass():
    torch.manual_seed(0)
    model = build_model("cifar10", n_classes=4, n_mels=32).eval()
    data = torch.randn(5, 32, 100)
    n_true = np.array([100, 40, 7, 64, 100])
    outputs = [track_outputs(model.embed, data, n_true, crop=16, batch_size=size, device=CPU)
               for size in (1, 3, 64)]
    assert outputs[0].shape == (5, model.embedding_dim)
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-5, atol=1e-6)
