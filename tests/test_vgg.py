"""The offline VGG-19 encoder: the seeded random fallback, a given weights file, the search order, bad files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from napari_nucsynth.models.vgg import (
    LAYERS,
    VGG_FILE,
    VGGEncoder,
    find_vgg19_weights,
    load_vgg19,
)

FOUR = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")


@pytest.fixture
def no_cached_weights(tmp_path, monkeypatch):
    """A machine without ImageNet weights: empty hub cache and model folder, no $NUCSYNTH_VGG19."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.delenv("NUCSYNTH_VGG19", raising=False)
    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path / "models"))
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    yield hub / "checkpoints"
    torch.hub.set_dir(old)


@pytest.fixture(scope="module")
def random_encoder():
    return load_vgg19("random", layers=FOUR)


def _features(encoder) -> nn.Sequential:
    return nn.Sequential(*[m for sl in encoder.slices for m in sl])


def _torchvision_file(path, encoder, shift: float = 0.0) -> None:
    """Save ``encoder``'s weights (plus ``shift``) as torchvision's VGG-19 state dict (``features.N.*`` keys)."""
    state = {f"features.{k}": v.detach().clone() + shift for k, v in _features(encoder).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # the classifier is ignored
    torch.save(state, path)


def test_random_fallback_is_documented_seeded_and_frozen(random_encoder, no_cached_weights):
    enc = random_encoder
    assert enc.source == "random:seed0"
    assert enc.layers == FOUR
    again = load_vgg19("auto", layers=FOUR)  # no weights anywhere: the same fallback, never a download
    assert again.source == "random:seed0"
    for a, b in zip(enc.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # always eval
    x = torch.rand(1, 3, 40, 48, requires_grad=True)
    feats = enc(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 40, 48), (128, 20, 24), (256, 10, 12), (512, 5, 6)]
    assert all((f >= 0).all() for f in feats)  # ReLU outputs, not overwritten in place
    feats[-1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients reach the input (perceptual losses)


def test_weights_file_round_trip_and_search_order(random_encoder, no_cached_weights, tmp_path, monkeypatch):
    f = tmp_path / "my_vgg.pth"
    _torchvision_file(f, random_encoder, shift=0.5)  # weights unlike the fallback's
    enc = load_vgg19(f, layers=FOUR)
    assert enc.source == "imagenet:my_vgg.pth"
    for a, b in zip(enc.parameters(), random_encoder.parameters()):
        assert torch.equal(a, b + 0.5)
    # $NUCSYNTH_VGG19 is found by "auto"
    monkeypatch.setenv("NUCSYNTH_VGG19", str(f))
    assert find_vgg19_weights("auto") == f
    monkeypatch.delenv("NUCSYNTH_VGG19")
    # torchvision's own cache file is found by "auto"
    cached = no_cached_weights / VGG_FILE
    _torchvision_file(cached, random_encoder)
    assert find_vgg19_weights() == cached
    assert load_vgg19("auto", layers=("relu1_1",)).source == f"imagenet:{VGG_FILE}"


def test_bad_files_and_layers(random_encoder, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_vgg19(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read VGG-19 weights"):
        load_vgg19(junk)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, wrong)  # most layers missing
    with pytest.raises(ValueError, match="not a torchvision VGG-19 state dict"):
        load_vgg19(wrong)
    features = _features(random_encoder)
    with pytest.raises(ValueError, match="unknown VGG layer"):
        VGGEncoder(features, layers=("relu9_9",))
    with pytest.raises(ValueError, match="network order"):
        VGGEncoder(features, layers=("relu2_1", "relu1_1"))
    assert set(FOUR) <= set(LAYERS)


def test_load_vgg19_unknown_layer_is_a_value_error():
    with pytest.raises(ValueError, match="unknown VGG layer"):
        load_vgg19("random", layers=("relu9_9",))
