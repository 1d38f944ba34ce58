"""AdaIN refine-synthesis: the network, AdaIN, seamless tiling, training through the one loop, resume, the renderer.

Tiny decoders, synthetic H&E-like tiles of 96 px and crops of 64 px: the whole file runs in seconds on one core.
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
    HALO,
    adain,
    adain_losses,
    feature_stats,
    mean_std,
    stylize,
)
from napari_nucsynth.render import adain as adain_render
from napari_nucsynth.render import get_renderer, render, renderers
from napari_nucsynth.train import train

TINY = ADAIN


def _batch(pairs) -> dict:
    x = torch.from_numpy(np.stack([p[0] for p in pairs]).transpose(0, 3, 1, 2).astype(np.float32) / 255)
    return {"content": x, "style": x.roll(1, 0)}


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return get_model("adain").build(dict(TINY))


@pytest.fixture(scope="module")
def pairs():
    return [_pair(s) for s in range(3)]


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    """Runs of the one training loop: 1 step, resumed to 2; 2 steps straight; resumed on to 40 steps."""
    d = tmp_path_factory.mktemp("adain")
    imgs, labs = [p[0] for p in pairs], [p[1] for p in pairs]
    kw = {"config": dict(TINY), "device": "cpu", "seed": 0, "batch_size": 2, "crop": 64, "lr": 3e-3,
          "val_fraction": 0.34, "eval_every": 1000}
    steps = []
    train("adain", imgs, labs, steps=1, out=d / "a1.pt", **kw)
    train("adain", imgs, labs, steps=2, out=d / "a2.pt", resume=d / "a1.pt", **kw)
    train("adain", imgs, labs, steps=2, out=d / "b2.pt", **kw)
    res = train("adain", imgs, labs, steps=40, out=d / "a40.pt", resume=d / "a2.pt",
                on_update=lambda u: steps.append(u), preview_every=20, **kw)
    return {"dir": d, "result": res, "updates": steps}


def _load(path):
    ck = load_checkpoint(path, kind="adain")
    model = get_model("adain").build({**ck["config"], "pretrained": None})
    model.load_state_dict(ck["state_dict"])
    return model.eval(), ck


# ----------------------------------------------------------------------------------------------------------------
# the network


def test_registered_and_shapes():
    assert "adain" in model_kinds() and "adain" in renderers()
    model = _tiny_model()
    assert model.decoder.channels == (8, 16, 32)
    assert model.vgg_source == "random:seed0"
    assert not any(p.requires_grad for p in model.encoder.parameters())
    out = model(torch.rand(2, 3, 64, 80), torch.rand(2, 3, 48, 56))
    assert out.shape == (2, 3, 64, 80)
    cfg = dict(TINY)
    get_model("adain").build(cfg)
    assert cfg["vgg"] == "random:seed0"  # build records the encoder's weights in the config it is given
    for shape in ((37, 53), (8, 8), (5, 130)):  # any size: padded to a multiple of 8 and cropped back
        img = (np.random.default_rng(0).random((*shape, 3)) * 255).astype(np.uint8)
        res = stylize(model, img, img)
        assert res.shape == (*shape, 3) and res.dtype == np.uint8
    with pytest.raises(ValueError, match="alpha"):
        stylize(model, img, img, alpha=1.5)
    with pytest.raises(ValueError, match="multiples of 8"):
        stylize(model, img, img, tile=100)
    with pytest.raises(ValueError, match="generator"):
        get_model("adain").predict(model, img, "cpu")
    with pytest.raises(ValueError, match="width"):
        get_model("adain").build({**TINY, "width": 0})


def test_adain_matches_the_style_statistics():
    g = torch.Generator().manual_seed(0)
    c = torch.rand(2, 5, 12, 9, generator=g) * 3
    s = torch.rand(2, 5, 7, 11, generator=g) * 0.5 + 2
    sm, ss = mean_std(s)
    t = adain(c, sm, ss)
    tm, ts = mean_std(t)
    assert torch.allclose(tm, sm, atol=1e-5) and torch.allclose(ts, ss, atol=1e-4)
    assert torch.equal(adain(c, sm, ss, alpha=0.0), c)
    half = adain(c, sm, ss, alpha=0.5)
    assert torch.allclose(half, 0.5 * t + 0.5 * c)
    # the model restyles every level (the skips too) to the style's statistics
    model = _tiny_model()
    x, y = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 48, 48) * 0.3
    feats = model.encoder(x)
    stats = [mean_std(f) for f in model.encoder(y)]
    for f, (m, sd), c in zip(model.stylised_features(feats, stats), stats, feats):
        fm, fs = mean_std(f)
        live = (mean_std(c)[1] > 0.05) & (sd > 0.05)  # channels a ReLU left all but dead sit at the eps floor
        assert live.float().mean() > 0.5
        assert torch.allclose(fm, m, atol=1e-4, rtol=1e-3)
        assert torch.allclose(fs[live], sd[live], rtol=1e-2)


def test_deterministic():
    a, b = _tiny_model(0), _tiny_model(0)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    img, _ = _pair(5)
    style, _ = _pair(6)
    assert np.array_equal(stylize(a, img, style), stylize(b, img, style))


def test_receptive_field_is_within_the_halo():
    """The support of the output's gradient (over positions of every phase of the pooling grid) fits in HALO."""
    model = _tiny_model()
    torch.manual_seed(1)
    for p in model.decoder.parameters():  # non-zero everywhere
        p.data.normal_(0, 0.2)
    x = torch.rand(1, 3, 160, 160, requires_grad=True)
    stats = [tuple(t.detach() for t in mean_std(f)) for f in model.encoder(torch.rand(1, 3, 64, 64))]
    radius = 0
    for r in range(76, 84):
        x.grad = None
        feats = model.encoder(x)
        c_stats = [tuple(t.detach() for t in mean_std(f)) for f in feats]  # fixed: the image's own statistics
        y = model.decoder(model.stylised_features(feats, stats, content_stats=c_stats))
        y[0, :, r, r].sum().backward()
        rr, cc = np.nonzero(x.grad[0].abs().sum(0).numpy() > 0)
        radius = max(radius, r - rr.min(), rr.max() - r, r - cc.min(), cc.max() - r)
    assert 37 <= radius < HALO  # at least relu4_1's own (37 px)


def test_tiled_equals_one_piece():
    model = _tiny_model()
    torch.manual_seed(2)
    for p in model.decoder.parameters():
        p.data.normal_(0, 0.1)
    content = (np.random.default_rng(0).random((200, 250, 3)) * 255).astype(np.uint8)
    style, _ = _pair(1)
    one = stylize(model, content, style)
    calls = []
    tiled = stylize(model, content, style, tile=192, halo=HALO, progress=lambda d, t, w: calls.append((d, t)))
    assert np.abs(one.astype(int) - tiled).max() <= 1  # the same image up to rounding: no seams
    assert calls[-1][0] == calls[-1][1] and len(calls) > 2
    # the whole style statistics, tiled or not
    one_s = feature_stats(model, content)
    tiled_s = feature_stats(model, content, tile=192)
    for (m1, s1), (m2, s2) in zip(one_s, tiled_s):
        assert torch.allclose(m1, m2, rtol=1e-4, atol=1e-5) and torch.allclose(s1, s2, rtol=1e-4, atol=1e-5)
    with pytest.raises(InterruptedError):
        stylize(model, content, style, tile=192, should_stop=lambda: True)


# ----------------------------------------------------------------------------------------------------------------
# training


def test_training_lowers_the_loss_and_records_the_encoder(trained, pairs):
    d = trained["dir"]
    batch = _batch(pairs)
    with torch.no_grad():
        first = adain_losses(_load(d / "a1.pt")[0], batch["content"], batch["style"])[1]["loss"]
        last = adain_losses(_load(d / "a40.pt")[0], batch["content"], batch["style"])[1]["loss"]
    assert last < 0.8 * first
    ck = load_checkpoint(d / "a40.pt", kind="adain")
    assert ck["step"] == 40 and ck["config"]["vgg"] == "random:seed0" and ck["config"]["width"] == TINY["width"]
    assert any(k.startswith("encoder.") for k in ck["state_dict"])  # the encoder's weights travel with the model
    assert {"val_loss", "val_content", "val_style"} <= set(ck["metrics"])
    ups = trained["updates"]
    assert {"loss", "content", "style"} <= set(next(u for u in ups if u.kind == "step").losses)
    previews = [u for u in ups if u.kind == "preview"]
    assert previews and previews[0].image.dtype == np.uint8 and previews[0].image.shape[2] == 3


def test_resume_continues_exactly(trained):
    a, _ = _load(trained["dir"] / "a2.pt")  # 1 step, then resumed for one more
    b, _ = _load(trained["dir"] / "b2.pt")  # 2 steps straight
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_encoder_provenance_survives_loading(tmp_path):
    """A model built on a weights file says so after its state dict is loaded into a bare build."""
    enc = _tiny_model().encoder
    f = tmp_path / "vgg.pth"
    feats = torch.nn.Sequential(*[m for sl in enc.slices for m in sl])
    torch.save({f"features.{k}": v + 0.1 for k, v in feats.state_dict().items()}, f)
    cfg = {**TINY, "pretrained": str(f)}
    model = get_model("adain").build(cfg)
    assert cfg["vgg"] == "imagenet:vgg.pth" == model.vgg_source
    bare = get_model("adain").build({**TINY, "pretrained": None})
    assert bare.vgg_source == "random:seed0"
    bare.load_state_dict(model.state_dict())
    assert bare.vgg_source == "imagenet:vgg.pth"
    assert torch.equal(bare.encoder.slices[0][0].weight, model.encoder.slices[0][0].weight)


def test_skip_connections_keep_a_sharp_edge_in_place(trained):
    """A vertical edge off the 8-px pooling grid stays where it is after restyling (within a pixel), both ways
    round: the full-resolution skip carries it (a decoder from relu4_1 alone could only place it on a coarse
    grid)."""
    model, _ = _load(trained["dir"] / "a40.pt")
    style, _ = _pair(7, 64)
    for edge, light_left in ((37, True), (43, False)):  # first column of the right-hand side
        content = np.empty((64, 80, 3), np.uint8)
        light, dark = (230, 190, 215), (100, 60, 150)
        content[:, :edge], content[:, edge:] = (light, dark) if light_left else (dark, light)
        out = stylize(model, content, style).astype(np.float64).mean(2)[8:-8]
        grad = np.abs(np.diff(out, axis=1)).mean(0)  # grad[j]: between columns j and j + 1
        win = np.arange(edge - 9, edge + 8)
        centre = float((grad[win] * win).sum() / grad[win].sum()) + 0.5  # where the step is, in column borders
        assert abs(centre - edge) <= 1.0, (edge, centre, np.round(grad[win], 1))
        assert abs(out[:, : edge - 6].mean() - out[:, edge + 6 :].mean()) > 50  # still a strong edge


# ----------------------------------------------------------------------------------------------------------------
# the renderer


def test_render_through_the_registry(trained, pairs):
    ckpt = trained["dir"] / "a40.pt"
    lab = pairs[1][1]
    style, style_labels = pairs[0]
    out = render(lab, style, method="adain", checkpoint=ckpt, seed=3, style_labels=style_labels, device="cpu")
    assert out.shape == (*lab.shape, 3) and out.dtype == np.uint8
    again = render(lab, style, method="adain", checkpoint=ckpt, seed=3, style_labels=style_labels, device="cpu")
    assert np.array_equal(out, again)
    other = render(lab, style, method="adain", checkpoint=ckpt, seed=4, style_labels=style_labels, device="cpu")
    assert not np.array_equal(out, other)
    info = adain_render.last_info
    assert info["vgg"] == "random:seed0" and info["checkpoint"] == str(ckpt) and info["step"] == 40
    assert info["alpha"] == 1.0 and info["config"]["width"] == TINY["width"]
    assert adain_render.model_info(ckpt)["vgg"] == "random:seed0"
    r = get_renderer("adain")
    assert r.needs_checkpoint and r.description and r.default_checkpoint.name == "adain_monuseg.pt"
    steps = []
    half = r(lab, style, style_labels=style_labels, seed=3, checkpoint=ckpt, device="cpu", alpha=0.0,
             progress=lambda d, t, w: steps.append((d, t)))
    assert r.last_info["alpha"] == 0.0 and not np.array_equal(half, out)
    assert steps[-1] == (3, 3)
    with pytest.raises(ValueError, match="alpha"):
        r(lab, style, checkpoint=ckpt, alpha=-0.1)
    with pytest.raises(InterruptedError):
        r(lab, style, style_labels=style_labels, checkpoint=ckpt, device="cpu", should_stop=lambda: True)


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
