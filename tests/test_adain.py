"""AdaIN refine-synthesis on the GAN core: the identity at step 0, AdaIN, seamless tiling, training through the one
loop (exact resume, previews, validation), the encoder's provenance, shipped checkpoints, the renderer.

Tiny decoders and discriminators over the shipped segmenter's encoder, synthetic H&E-like tiles of 96 px and crops
of 64 px: the whole file runs in well under a minute on one core.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from _tiny import ADAIN
from _tiny import synthetic_pair as _pair

from napari_nucsynth.models import (
    get_model,
    load_checkpoint,
    model_kinds,
    save_checkpoint,
)
from napari_nucsynth.models.adain import (
    adain,
    adain_losses,
    feature_stats,
    mean_std,
    stylize,
)
from napari_nucsynth.models.gan import shipped_state_dict
from napari_nucsynth.presynthesis import ClassicRenderer
from napari_nucsynth.render import adain as adain_render
from napari_nucsynth.render import get_renderer, render, renderers
from napari_nucsynth.train import train

TINY = ADAIN


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return get_model("adain").build(dict(TINY))


def _lively(model, seed: int = 1, scale: float = 0.1):
    """Random non-zero decoder weights (the trained decoder starts at zero output), live and EMA alike."""
    torch.manual_seed(seed)
    for p in list(model.decoder.parameters()):
        p.data.normal_(0, scale)
    model.ema["decoder"].load_state_dict(model.decoder.state_dict())
    return model


@pytest.fixture(scope="module")
def pairs():
    return [_pair(s) for s in range(3)]


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    """Runs of the one training loop: 1 step, resumed to 2; 2 steps straight; resumed on to 12 steps."""
    d = tmp_path_factory.mktemp("adain")
    imgs, labs = [p[0] for p in pairs], [p[1] for p in pairs]
    kw = {"config": dict(TINY), "device": "cpu", "seed": 0, "batch_size": 2, "crop": 64, "lr": 2e-3,
          "val_fraction": 0.34, "eval_every": 12}
    steps = []
    train("adain", imgs, labs, steps=1, out=d / "a1.pt", **kw)
    train("adain", imgs, labs, steps=2, out=d / "a2.pt", resume=d / "a1.pt", **kw)
    train("adain", imgs, labs, steps=2, out=d / "b2.pt", **kw)
    res = train("adain", imgs, labs, steps=12, out=d / "a12.pt", resume=d / "a2.pt",
                on_update=lambda u: steps.append(u), preview_every=6, **kw)
    return {"dir": d, "result": res, "updates": steps}


def _load(path):
    ck = load_checkpoint(path, kind="adain")
    model = get_model("adain").build({**ck["config"], "pretrained": None})
    model.load_shipped(ck["state_dict"])
    return model.eval(), ck


# ----------------------------------------------------------------------------------------------------------------
# the network


def test_registered_shapes_and_the_feature_network():
    assert "adain" in model_kinds() and "adain" in renderers()
    model = _tiny_model()
    assert model.features_source.startswith("hovernet:hovernet_monuseg.pt#")
    assert model.feature_net.strides == (2, 4, 8, 16) and model.multiple == 16 and model.halo == 192
    assert not any(p.requires_grad for p in model.feature_net.parameters())
    assert model.decoder.widths == (8, 8, 16, 32)
    out = model(torch.rand(2, 3, 64, 80), torch.rand(2, 3, 48, 56))
    assert out.shape == (2, 3, 64, 80)
    cfg = dict(TINY)
    get_model("adain").build(cfg)
    assert cfg["features_source"] == model.features_source  # recorded in the config the checkpoint saves
    for shape in ((37, 53), (8, 8), (5, 130)):  # any size: padded to a multiple of 16 and cropped back
        img = (np.random.default_rng(0).random((*shape, 3)) * 255).astype(np.uint8)
        res = stylize(model, img, img)
        assert res.shape == (*shape, 3) and res.dtype == np.uint8
    with pytest.raises(ValueError, match="alpha"):
        stylize(model, img, img, alpha=1.5)
    with pytest.raises(ValueError, match="multiples of 16"):
        stylize(model, img, img, tile=500)
    with pytest.raises(ValueError, match="generator"):
        get_model("adain").predict(model, img, "cpu")
    with pytest.raises(ValueError, match="width"):
        get_model("adain").build({**TINY, "width": 0})
    with pytest.raises(ValueError, match="unknown adain config"):
        get_model("adain").build({**TINY, "vgg": "x"})


def test_an_untrained_model_is_the_identity_on_the_classic_render(pairs):
    """Gong et al.'s refinement starts from the pre-synthesis: at step 0 the model renders exactly the classic
    image, whatever the reference and alpha."""
    model = _tiny_model()
    (style, style_lab), (_, lab) = pairs[0], pairs[1]
    classic = ClassicRenderer()(lab, style, style_labels=style_lab, seed=4)
    for alpha in (1.0, 0.3):
        assert np.array_equal(stylize(model, classic, style, alpha=alpha), classic)
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(model(x, torch.rand(1, 3, 64, 64)), x)


def test_adain_matches_the_style_statistics():
    g = torch.Generator().manual_seed(0)
    c = torch.rand(2, 5, 12, 9, generator=g) * 3
    s = torch.rand(2, 5, 7, 11, generator=g) * 0.5 + 2
    sm, ss = mean_std(s)
    t = adain(c, sm, ss)
    tm, ts = mean_std(t)
    assert torch.allclose(tm, sm, atol=1e-5) and torch.allclose(ts, ss, atol=1e-4)
    assert torch.equal(adain(c, sm, ss, alpha=0.0), c)
    assert torch.allclose(adain(c, sm, ss, alpha=0.5), 0.5 * t + 0.5 * c)
    # the model moves every level to the reference's statistics
    model = _tiny_model()
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 48, 48) * 0.3
    feats = model.encoder(x)
    stats = [mean_std(f) for f in model.encoder(y)]
    for f, (m, sd), c in zip(model.stylised_features(feats, stats), stats, feats):
        fm, fs = mean_std(f)
        live = (mean_std(c)[1] > 0.05) & (sd > 0.05)  # channels a ReLU left all but dead sit at the eps floor
        assert torch.allclose(fm, m, atol=1e-4, rtol=1e-3)
        assert torch.allclose(fs[live], sd[live], rtol=1e-2)


def test_deterministic():
    a, b = _lively(_tiny_model(0)), _lively(_tiny_model(0))
    img, _ = _pair(5)
    style, _ = _pair(6)
    out = stylize(a, img, style)
    assert np.array_equal(out, stylize(b, img, style)) and not np.array_equal(out, img)


def test_receptive_field_is_within_the_halo():
    """The support of the output's gradient (encoder and decoder, at several phases of the stride-16 grid) fits
    in the halo the tiling keeps."""
    model = _lively(_tiny_model())
    x = torch.rand(1, 3, 448, 448, requires_grad=True)
    stats = [tuple(t.detach() for t in mean_std(f)) for f in model.encoder(torch.rand(1, 3, 64, 64))]
    radius = 0
    for r in (216, 221, 229):
        x.grad = None
        feats = model.encoder(x)
        c_stats = [tuple(t.detach() for t in mean_std(f)) for f in feats]  # fixed: the image's own statistics
        y = model.decoder(model.stylised_features(feats, stats, content_stats=c_stats), x)
        y[0, :, r, r].sum().backward()
        rr, cc = np.nonzero(x.grad[0].abs().sum(0).numpy() > 0)
        radius = max(radius, r - rr.min(), rr.max() - r, r - cc.min(), cc.max() - r)
    assert 100 <= radius < model.halo  # at least the ResNet's layer3 (about 105 px)


def test_tiled_equals_one_piece():
    model = _lively(_tiny_model(), scale=0.05)
    content = (np.random.default_rng(0).random((420, 470, 3)) * 255).astype(np.uint8)
    style, _ = _pair(1)
    one = stylize(model, content, style)
    calls = []
    tiled = stylize(model, content, style, tile=400, progress=lambda d, t, w: calls.append((d, t)))
    assert np.abs(one.astype(int) - tiled).max() <= 1  # the same image up to rounding: no seams
    assert not np.array_equal(one, content)
    assert calls[-1][0] == calls[-1][1] and len(calls) > 2
    one_s, tiled_s = feature_stats(model, content), feature_stats(model, content, tile=400)
    for (m1, s1), (m2, s2) in zip(one_s, tiled_s):
        assert torch.allclose(m1, m2, rtol=1e-4, atol=1e-5) and torch.allclose(s1, s2, rtol=1e-4, atol=1e-5)
    with pytest.raises(InterruptedError):
        stylize(model, content, style, tile=400, should_stop=lambda: True)


def test_strength_scales_the_residual_and_defaults_to_the_checkpoint():
    """strength 0 is the content itself, 1 the full refinement, and between them the residual scales linearly; the
    model's config sets the default."""
    model = _lively(_tiny_model(), scale=0.05)
    content = (np.random.default_rng(2).random((96, 96, 3)) * 255).astype(np.uint8)
    style, _ = _pair(1)
    full, half, none = (stylize(model, content, style, strength=s) for s in (1.0, 0.5, 0.0))
    assert np.array_equal(none, content)
    assert np.array_equal(stylize(model, content, style), full)  # no config key: 1
    r_full, r_half = full.astype(float) - content, half.astype(float) - content
    moved = (np.abs(r_full) > 8) & (full > 0) & (full < 255)  # away from the clamp and rounding
    assert moved.sum() > 100
    assert np.abs(r_half[moved] - r_full[moved] / 2).max() <= 1.0
    model.config["strength"] = 0.5
    assert np.array_equal(stylize(model, content, style), half)
    for bad in (-0.1, 1.5, "strong"):
        with pytest.raises(ValueError, match="strength"):
            stylize(model, content, style, strength=bad)


# ----------------------------------------------------------------------------------------------------------------
# training


def test_training_moves_away_from_the_identity_and_records_everything(trained, pairs):
    d = trained["dir"]
    ck = load_checkpoint(d / "a12.pt", kind="adain")
    assert ck["step"] == 12 and ck["config"]["width"] == TINY["width"]
    assert ck["config"]["features_source"].startswith("hovernet:")
    assert any(k.startswith("feature_net.") for k in ck["state_dict"])  # the encoder travels with the model
    assert set(ck["optimizer"]) == {"g", "d"}
    assert {"perc", "perc_classic", "l1", "l1_classic"} <= set(ck["metrics"])
    ups = trained["updates"]
    assert {"loss", "g_gan", "g_fm", "g_perc", "g_style", "d_loss"} <= set(next(u for u in ups if u.kind == "step").losses)
    previews = [u.image for u in ups if u.kind == "preview"]
    assert previews and previews[0].dtype == np.uint8 and previews[0].shape[1] > 2 * previews[0].shape[0]
    # the EMA decoder left zero: renders now differ from the classic image
    model, _ = _load(d / "a12.pt")
    (style, style_lab), (_, lab) = pairs[0], pairs[1]
    classic = ClassicRenderer()(lab, style, style_labels=style_lab, seed=4)
    assert not np.array_equal(stylize(model, classic, style), classic)
    # the joint loop's non-adversarial losses still run on the new model
    x = torch.rand(2, 3, 64, 64)
    total, logs, out = adain_losses(model, x, x.roll(1, 0))
    assert out.shape == x.shape and {"loss", "content", "style"} <= set(logs) and torch.isfinite(total)


def test_resume_continues_exactly(trained):
    a = load_checkpoint(trained["dir"] / "a2.pt")["state_dict"]  # 1 step, then resumed for one more
    b = load_checkpoint(trained["dir"] / "b2.pt")["state_dict"]  # 2 steps straight
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_encoder_provenance_survives_loading():
    """A bare build (weights to come from a checkpoint) learns what its encoder is from the state dict."""
    model = _tiny_model()
    bare = get_model("adain").build({**TINY, "pretrained": None})
    assert bare.features_source == "unloaded"
    bare.load_state_dict(model.state_dict())
    assert bare.features_source == model.features_source
    assert torch.equal(bare.encoder.stages[0][0].weight, model.encoder.stages[0][0].weight)


# ----------------------------------------------------------------------------------------------------------------
# the renderer


def test_render_through_the_registry(trained, pairs, tmp_path):
    ckpt = trained["dir"] / "a12.pt"
    lab = pairs[1][1]
    style, style_labels = pairs[0]
    out = render(lab, style, method="adain", checkpoint=ckpt, seed=3, style_labels=style_labels, device="cpu")
    assert out.shape == (*lab.shape, 3) and out.dtype == np.uint8
    again = render(lab, style, method="adain", checkpoint=ckpt, seed=3, style_labels=style_labels, device="cpu")
    assert np.array_equal(out, again)
    other = render(lab, style, method="adain", checkpoint=ckpt, seed=4, style_labels=style_labels, device="cpu")
    assert not np.array_equal(out, other)
    info = adain_render.last_info
    assert info["features"].startswith("hovernet:") and info["checkpoint"] == str(ckpt) and info["step"] == 12
    assert info["alpha"] == 1.0 and info["config"]["width"] == TINY["width"]
    assert adain_render.model_info(ckpt)["features"] == info["features"]
    r = get_renderer("adain")
    assert r.needs_checkpoint and r.description and r.default_checkpoint.name == "adain_monuseg.pt"
    steps = []
    low = r(lab, style, style_labels=style_labels, seed=3, checkpoint=ckpt, device="cpu", alpha=0.0,
            progress=lambda d, t, w: steps.append((d, t)))
    assert r.last_info["alpha"] == 0.0 and low.shape == out.shape
    assert steps[-1] == (3, 3)
    with pytest.raises(ValueError, match="alpha"):
        r(lab, style, checkpoint=ckpt, alpha=-0.1)
    assert info["strength"] == 1.0  # the checkpoint's default (none recorded: 1)
    none = r(lab, style, style_labels=style_labels, seed=3, checkpoint=ckpt, device="cpu", strength=0.0)
    assert np.array_equal(none, ClassicRenderer()(lab, style, style_labels=style_labels, seed=3))
    with pytest.raises(ValueError, match="strength"):
        r(lab, style, checkpoint=ckpt, strength=2)
    with pytest.raises(InterruptedError):
        r(lab, style, style_labels=style_labels, checkpoint=ckpt, device="cpu", should_stop=lambda: True)
    # a shipped checkpoint keeps the encoder and the EMA decoder only, and renders the same
    model, ck = _load(ckpt)
    kept = shipped_state_dict(model)
    assert not any(k.startswith(("discriminator.", "decoder.")) for k in kept)
    small = save_checkpoint(tmp_path / "ship.pt", kind="adain", config=ck["config"], state_dict=kept, step=12)
    assert np.array_equal(render(lab, style, method="adain", checkpoint=small, seed=3, style_labels=style_labels,
                                 device="cpu"), out)


def test_missing_or_wrong_checkpoint(tmp_path, monkeypatch, pairs):
    lab, (style, _) = pairs[1][1], pairs[0]
    monkeypatch.setattr(adain_render, "default_checkpoint", lambda: tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="nucsynth train --model adain --images DIR --labels DIR --steps N"):
        render(lab, style, method="adain")
    with pytest.raises(ValueError, match="does not exist"):
        render(lab, style, method="adain", checkpoint=tmp_path / "nope.pt")
    other = save_checkpoint(tmp_path / "h.pt", kind="hovernet", config={}, state_dict={}, step=0)
    with pytest.raises(ValueError, match="not a 'adain' one"):
        render(lab, style, method="adain", checkpoint=other)


def test_listing_renderers_does_not_import_torch():
    code = ("import sys; from napari_nucsynth.render import renderers; assert 'adain' in renderers(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_shipped_model_renders_out_of_the_box():
    """The shipped adain model (trained on the CPU, docs/generators.md) loads without a checkpoint argument, says
    what it is, and refines the classic render (close to it, not equal)."""
    from napari_nucsynth._sample_data import load_monuseg_crop

    path = adain_render.default_checkpoint()
    if not path.is_file():
        pytest.skip("no adain model ships with this version")
    img, lab = load_monuseg_crop()
    lab, img = lab[:128, :128], img[:, :, :3]
    out = render(lab, img, method="adain", seed=0, device="cpu")
    classic = render(lab, img, method="classic", seed=0)
    info = adain_render.model_info()
    assert info["features"].startswith("hovernet:") and info["step"] > 0
    assert out.shape == classic.shape and not np.array_equal(out, classic)
    assert np.abs(out.astype(int) - classic).mean() < 20  # a refinement, not another image


def test_content_loss_holds_the_pre_synthesis_against_the_adain_target():
    """Gong et al.'s content loss (``content_weight``): the output's features against the AdaIN targets. At step 0
    the output is the content, so the loss is the distance from the content's features to themselves restyled:
    near zero with the content as its own reference, clearly positive with another reference; it reaches the
    decoder through the output; with ``content_weight=0`` no term is logged."""
    torch.manual_seed(0)
    model = get_model("adain").build({**TINY, "content_weight": 1.0})
    content = torch.rand(2, 3, 64, 64)
    other = torch.rand(2, 3, 64, 64) * 0.5
    losses = {}
    for name, style in (("self", content), ("other", other)):
        _, extra = model.generate({"image": style, "content": content}, None, None)
        losses[name] = extra["g_content"]
    assert losses["self"].item() < 1e-3 < losses["other"].item()
    losses["other"].backward()
    assert model.decoder.out[1].weight.grad.abs().sum() > 0
    bare = get_model("adain").build(dict(TINY))
    _, extra = bare.generate({"image": other, "content": content}, None, None)
    assert "g_content" not in extra
