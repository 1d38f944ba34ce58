"""The GAN core (models/gan.py) and the histology feature networks (models/features.py)."""

from __future__ import annotations

import pytest
import torch
from _tiny import SIAN

from napari_nucsynth.models import features as Fe
from napari_nucsynth.models import gan
from napari_nucsynth.models import sian as S

# ----------------------------------------------------------------------------------------------------------------
# feature networks


def test_hovernet_features_are_the_shipped_segmenters_encoder_frozen():
    net = Fe.load_features("hovernet")
    assert net.source == Fe.feature_source("hovernet") and net.source.startswith("hovernet:hovernet_monuseg.pt#")
    assert Fe.load_features("auto").source == net.source
    assert net.layers == ("stem", "layer1", "layer2", "layer3") and net.strides == (2, 4, 8, 16)
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training  # BatchNorm keeps its trained statistics
    x = torch.rand(1, 3, 64, 96, requires_grad=True)
    feats = net(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // s, 96 // s) for c, s in zip(net.channels, net.strides)]
    feats[-1].sum().backward()
    assert x.grad.abs().sum() > 0  # gradients reach the image (perceptual losses)
    # the weights are the shipped model's
    from napari_nucsynth.models import load_checkpoint

    sd = load_checkpoint(Fe.shipped_hovernet())["state_dict"]
    assert torch.equal(net.stages[0][0].weight, sd["stem.0.weight"])


def test_building_a_feature_network_draws_no_random_numbers():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    Fe.load_features("hovernet")
    Fe.load_features("vgg19-random")
    assert torch.equal(torch.rand(3), a)


def test_feature_network_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("NUCSYNTH_VGG19", raising=False)
    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="needs ImageNet VGG-19 weights"):
        Fe.load_features("vgg19")
    with pytest.raises(ValueError, match="needs ImageNet VGG-19 weights"):
        Fe.feature_source("vgg19")
    assert Fe.load_features("vgg19-random").source == Fe.feature_source("vgg19-random") == "random:seed0"
    with pytest.raises(ValueError, match="unknown feature network"):
        Fe.load_features("inception")
    with pytest.raises(ValueError, match="does not exist"):
        Fe.load_features(f"hovernet:{tmp_path / 'none.pt'}")


# ----------------------------------------------------------------------------------------------------------------
# the core


def test_discriminator_and_losses():
    d = gan.MultiscaleDiscriminator(4, ndf=8, n_layers=3, num_d=2)
    preds = d(torch.rand(2, 4, 64, 64))
    assert len(preds) == 2 and all(len(p) == 4 for p in preds)
    assert preds[1][-1].shape[-1] < preds[0][-1].shape[-1]
    names = [n for n, _ in d.named_parameters()]
    assert any("parametrizations.weight.original" in n for n in names)  # spectral norm in the middle layers
    ones = [[torch.zeros(1), torch.ones(2, 1, 3, 3)]]
    assert float(gan.d_hinge(ones, [[torch.zeros(1), -torch.ones(2, 1, 3, 3)]])) == 0.0  # both past the margin
    assert float(gan.g_hinge([[torch.full((1, 1, 2, 2), 0.5)]])) == -0.5
    same = [[torch.ones(1, 2, 4, 4), torch.zeros(1, 1, 2, 2)]]
    assert float(gan.feature_matching(same, same)) == 0.0


def test_ema_warm_up_and_shipped_weights():
    model = S.build(dict(SIAN))
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.ema["generator"].parameters()]
    model.update_ema(0)  # decay min(0.999, 1/10): the average moves 90 % of the way at the first step
    for b, a, live in zip(before, model.ema["generator"].parameters(), model.generator.parameters()):
        assert torch.allclose(a, b + 0.9 * (live - b), atol=1e-6)
    kept = gan.shipped_state_dict(model)
    assert kept and all(k.startswith("ema.") for k in kept)
    fresh = S.build(dict(SIAN))
    fresh.load_shipped(kept)
    for a, b in zip(fresh.generator.parameters(), model.ema["generator"].parameters()):
        assert torch.equal(a, b)  # a shipped model's live modules take the average
    with pytest.raises(ValueError, match="do not fit"):
        fresh.load_shipped({"nonsense": torch.zeros(1)})


def test_optimizers_are_two_time_scale_and_amp_follows_the_hardware(monkeypatch):
    model = S.build(dict(SIAN))
    opts = S.optimizers(model, 1e-3)
    assert opts["g"].param_groups[0]["lr"] == 5e-4 and opts["d"].param_groups[0]["lr"] == 2e-3
    assert opts["g"].param_groups[0]["betas"] == (0.0, 0.9)
    assert gan.amp_dtype({"amp": "none"}, "cpu") is None
    assert gan.amp_dtype({"amp": "bf16"}, "cpu") is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert gan.amp_dtype({"amp": "auto"}, "cpu") is None  # emulated bfloat16 would be slower
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert gan.amp_dtype({"amp": "auto"}, "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="amp"):
        gan.amp_dtype({"amp": "fp8"}, "cpu")
