"""Tests for the model registry, the two networks trained from scratch (shapes over input sizes, embeddings,
checkpoints, learning) and the genre model over the frozen pretrained musicnn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from models import MODEL_NAMES, MODEL_PRESETS, MODELS, SCRATCH_MODELS, build_model
from models.cifar10 import Cifar10Net
from models.musicnn import load_pretrained_musicnn
from models.musicnn_genre import VECTORS, MusicnnGenre
from models.resnet_v2 import ResNetV2
from pipeline.errors import MelsearchError

# (n_mels, frames): Choi's 96 x 1366, the default 128-mel features' 3 s crop, the smallest allowed, odd sizes
SHAPES = [(96, 1366), (128, 129), (32, 32), (40, 100), (64, 47), (33, 517)]
EMBEDDING_DIMS = {"cifar10": 512, "resnet_v2": 128}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry() -> None:
    assert MODEL_NAMES == ("cifar10", "resnet_v2", "musicnn")
    assert MODELS == {"cifar10": Cifar10Net, "resnet_v2": ResNetV2, "musicnn": MusicnnGenre}
    assert SCRATCH_MODELS == ("cifar10", "resnet_v2") and MODEL_PRESETS == {"musicnn": "musicnn"}


@pytest.mark.parametrize("name", SCRATCH_MODELS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_output_and_embedding_shapes(name: str, shape: tuple[int, int]) -> None:
    model = build_model(name, n_classes=7, n_mels=shape[0]).eval()
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        logits, embedding = model(x), model.embed(x)
    assert logits.shape == (2, 7)
    assert embedding.shape == (2, EMBEDDING_DIMS[name]) and model.embedding_dim == EMBEDDING_DIMS[name]
    assert torch.isfinite(logits).all() and torch.isfinite(embedding).all()
    # the embedding is the penultimate layer: the logits are the head applied to it (no dropout in eval)
    torch.testing.assert_close(model.head(embedding), logits)
    # and it depends on the input (not a constant vector)
    assert not torch.allclose(embedding[0], embedding[1])


def test_cifar10_pools_reduce_choi_input_to_one_by_one() -> None:
    model = build_model("cifar10", n_classes=10, n_mels=96).eval()
    sizes = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[2:])))
             for block in model.blocks]
    with torch.no_grad():
        model(torch.randn(1, 1, 96, 1366))
    for hook in hooks:
        hook.remove()
    # 96 / (2*2*2*3*4) and 1366 / (4*4*4*5*4), floored at each block
    assert sizes == [(48, 341), (24, 85), (12, 21), (4, 4), (1, 1)]
    channels = [block.conv.out_channels for block in model.blocks]
    assert channels == [32, 32, 64, 128, 256]
    dropouts = [not isinstance(block.dropout, torch.nn.Identity) for block in model.blocks]
    assert dropouts == [False, True, False, False, True]


def test_cifar10_activation_is_softplus() -> None:
    block = build_model("cifar10", n_classes=2, n_mels=32).blocks[0].eval()
    x = torch.randn(1, 1, 4, 8)
    expected = F.max_pool2d(F.softplus(block.bn(block.conv(x))), (2, 4))
    torch.testing.assert_close(block(x), expected)


def test_resnet_v2_stages() -> None:
    model = build_model("resnet_v2", n_classes=3, n_mels=64)
    widths = [block.conv2.out_channels for block in model.blocks]
    assert widths == [32, 32, 64, 64, 128, 128]
    strides = [block.conv1.stride[0] for block in model.blocks]
    assert strides == [1, 1, 2, 1, 2, 1]


def test_model_kwargs_override_the_config() -> None:
    model = build_model("resnet_v2", n_classes=3, n_mels=32, channels=(8, 16, 24), blocks_per_stage=1)
    assert model.embedding_dim == 24 and len(model.blocks) == 3
    model = build_model("cifar10", n_classes=3, n_mels=32, dense=64, pools=[[2, 2]] * 5)
    assert model.embedding_dim == 64 and model.blocks[0].pool == (2, 2)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("vgg", {}, "unknown model 'vgg'"),
        ("cifar10", {"n_mels": 16}, "n_mels >= 32"),
        ("resnet_v2", {"n_mels": 31}, "n_mels >= 32"),
        ("resnet_v2", {"width": 3}, "width"),
    ],
)
def test_bad_arguments_raise_melsearch_error(name: str, kwargs: dict, message: str) -> None:
    kwargs = {"n_mels": 64, **kwargs}
    with pytest.raises(MelsearchError, match=message):
        build_model(name, n_classes=4, **kwargs)


@pytest.mark.parametrize("name", SCRATCH_MODELS)
def test_state_dict_round_trip(name: str, tmp_path) -> None:
    model = build_model(name, n_classes=5, n_mels=40)
    # move batch-norm statistics off their initial values so the round trip covers buffers too
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 40, 64))
    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(99)
    fresh = build_model(name, n_classes=5, n_mels=40).eval()
    x = torch.randn(3, 1, 40, 64)
    assert not torch.allclose(fresh(x), model(x))
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh.embed(x), model.embed(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", SCRATCH_MODELS)
def test_learns_a_fixed_batch(name: str) -> None:
    model = build_model(name, n_classes=3, n_mels=32)
    x, y = torch.randn(12, 1, 32, 40), torch.arange(12) % 3
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("vector", sorted(VECTORS))
def test_musicnn_genre_embeds_with_the_frozen_pretrained_backbone(vector: str) -> None:
    model = build_model("musicnn", n_classes=4, n_mels=96, vector=vector).eval()
    reference = load_pretrained_musicnn().eval()
    x = torch.randn(3, 1, 96, 187) + 1.0
    with torch.no_grad():
        embedding, logits = model.embed(x), model(x)
        features = reference.features(x)
        expected = torch.cat([features["max_pool"], features["mean_pool"]], 1) if vector == "pooled" else \
            features[vector]
    assert embedding.shape == (3, VECTORS[vector]) == (3, model.embedding_dim) and logits.shape == (3, 4)
    torch.testing.assert_close(embedding, expected, rtol=0, atol=0)  # the published weights, untouched
    torch.testing.assert_close(model.head(embedding), logits)
    assert model.frozen_backbone and not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert not model.backbone.training  # frozen: its batch norms keep the MSD statistics


def test_musicnn_genre_finetune_and_bad_arguments() -> None:
    model = build_model("musicnn", n_classes=2, n_mels=96, finetune=True)
    assert not model.frozen_backbone and all(p.requires_grad for p in model.parameters())
    with pytest.raises(MelsearchError, match="reads 96 mel bands"):
        build_model("musicnn", n_classes=2, n_mels=128)
    with pytest.raises(MelsearchError, match="unknown musicnn vector"):
        build_model("musicnn", n_classes=2, n_mels=96, vector="nope")


def test_the_musicnn_features_preset_is_the_input_the_weights_expect() -> None:
    """models/musicnn.py states the pretrained input; pipeline/mel.py's preset computes it: they must agree."""
    from models.musicnn import MUSICNN_MEL
    from pipeline.mel import MelConfig

    preset = MelConfig.preset("musicnn")
    assert (preset.sr, preset.n_fft, preset.hop_length, preset.n_mels) == (
        MUSICNN_MEL.sr, MUSICNN_MEL.n_fft, MUSICNN_MEL.hop_length, MUSICNN_MEL.n_mels)
    assert preset.compression == "log10" and MUSICNN_MEL.log_gain == 10000.0
