"""DAFF-GAN's masks -> H&E renderer (models/pix2pixhd.py, render/pix2pixhd.py) and the criss-cross attention block
(models/blocks.py): attention against a plain loop, its row/column context, the generator, seeded and windowed
rendering, style interpolation, training through the core and the generic loop (with resume), the renderer and its
checkpoint errors. Tiny models and crops only."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from _tiny import discs as _discs
from _tiny import flat_style as _style
from _tiny import lively, stopped_then_resumed_equals_straight

from napari_nucsynth.models import get_model, load_checkpoint, model_kinds, save_checkpoint
from napari_nucsynth.models import pix2pixhd as P
from napari_nucsynth.models.blocks import CrissCrossAttention, RecurrentCrissCross

TILE = "TCGA-A7-A13F-01Z-00-DX1"
#: 2 global downsamplings (inputs multiples of 8), a few channels, the shipped segmenter as feature network
TINY = {"ngf": 4, "ngf_max": 16, "n_down": 2, "n_blocks": 2, "n_local_blocks": 1, "noise_nc": 2, "style_dim": 8,
        "nef": 4, "enc_layers": 3, "ndf": 8, "d_layers": 2, "num_d": 2, "features": "hovernet",
        "tile": 96, "halo": 16, "blend": 8}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return lively(P.build(dict(TINY)))


# ----------------------------------------------------------------------------------------------------------------
# criss-cross attention


def _naive_cca(m: CrissCrossAttention, x: torch.Tensor) -> torch.Tensor:
    """CCNet's definition, one position at a time: softmax over the column (without the position) and the row."""
    q, k, v = m.query(x), m.key(x), m.value(x)
    n, c, h, w = v.shape
    out = torch.zeros_like(v)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                pos = [(g, j) for g in range(h) if g != i] + [(i, g) for g in range(w)]
                e = torch.stack([(q[b, :, i, j] * k[b, :, a, bb]).sum() for a, bb in pos])
                a_ = torch.softmax(e, 0)
                out[b, :, i, j] = sum(a_[t] * v[b, :, a, bb] for t, (a, bb) in enumerate(pos))
    return x + m.gamma * out


def test_cca_matches_its_definition_and_starts_as_identity():
    torch.manual_seed(0)
    m = CrissCrossAttention(8, reduction=4)
    x = torch.randn(2, 8, 5, 7)
    assert torch.equal(m(x), x)  # gamma = 0: an untrained block changes nothing
    assert torch.equal(RecurrentCrissCross(8)(x), x)
    with torch.no_grad():
        m.gamma.fill_(0.7)
    assert torch.allclose(m(x), _naive_cca(m, x), atol=1e-5)
    with pytest.raises(ValueError, match="recurrence"):
        RecurrentCrissCross(8, recurrence=0)


def test_cca_sees_row_and_column_once_and_everything_twice():
    torch.manual_seed(1)
    one, two = RecurrentCrissCross(6, 2, recurrence=1), RecurrentCrissCross(6, 2, recurrence=2)
    two.load_state_dict(one.state_dict())
    with torch.no_grad():
        one.cca.gamma.fill_(1.0)
        two.cca.gamma.fill_(1.0)
    x = torch.randn(1, 6, 9, 11)
    y = x.clone()
    y[0, :, 7, 9] += 3.0  # change one position off row 2 and column 3

    def diff(m):
        with torch.no_grad():
            return (m(y) - m(x)).abs().sum(1)[0]

    d1, d2 = diff(one), diff(two)
    assert d1[2, 3] < 1e-6  # one pass: (2, 3) sees only its row and column
    assert d1[7, 3] > 1e-4 and d1[2, 9] > 1e-4  # ... which do see the change
    assert d2[2, 3] > 1e-4  # two passes: through (7, 3) or (2, 9), every position sees every other
    assert (d2 > 1e-6).all()


# ----------------------------------------------------------------------------------------------------------------
# the model


def test_registered_modules_and_conditioning():
    assert "pix2pixhd" in model_kinds()
    model = get_model("pix2pixhd").build(dict(TINY))
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "generator", "discriminator", "ema"}
    gen = model.generator
    assert gen.multiple == 8
    # the attention sits in the global generator's bottleneck, at its width, recurrent twice by default
    assert isinstance(gen.global_net.cca, RecurrentCrissCross) and gen.global_net.cca.recurrence == 2
    assert gen.global_net.cca.cca.value.in_channels == TINY["ngf_max"]
    z = torch.randn(2, TINY["style_dim"])
    x = torch.rand(2, P.COND_NC + TINY["noise_nc"], 40, 48)
    y = gen(x, z)
    assert y.shape == (2, 3, 40, 48) and y.abs().max() <= 1
    with pytest.raises(ValueError, match="multiples of 8"):
        gen(torch.rand(1, 4, 36, 48), z[:1])
    with pytest.raises(ValueError, match="style"):
        gen(x)
    # pix2pixHD's conditioning: the label map and the instance edge map
    lab = np.zeros((12, 12), np.uint32)
    lab[2:6, 2:6], lab[2:6, 6:10] = 1, 2  # two touching nuclei
    c = P.conditioning(lab)
    assert c.shape == (2, 12, 12) and c.dtype == np.float32
    assert np.array_equal(c[0] > 0, lab > 0)
    assert c[1][3, 5] == 1 and c[1][3, 6] == 1  # both sides of the border between the nuclei
    assert c[1][1, 3] == 1 and c[1][2, 3] == 1  # both sides of a nucleus's edge against the background
    assert c[1][3, 3] == 0 and c[1][10, 10] == 0  # interiors are not edges
    t = get_model("pix2pixhd").targets(None, lab)
    assert set(t) == {"semantic", "boundary"} and t["semantic"].shape == (1, 12, 12)


def test_build_records_features_and_rejects_bad_config():
    cfg = dict(TINY)
    P.build(cfg)
    assert cfg["features_source"].startswith("hovernet:") and cfg["style_source"] == "code"
    with pytest.raises(ValueError, match="unknown pix2pixhd config"):
        P.build({**TINY, "width": 3})
    with pytest.raises(ValueError, match="'ngf' must be a positive"):
        P.build({**TINY, "ngf": 0})
    with pytest.raises(ValueError, match="'style_source' must be one of"):
        P.build({**TINY, "style_source": "vgg"})
    with pytest.raises(ValueError, match="'lambda_style' must be a number >= 0"):
        P.build({**TINY, "lambda_style": -1})


def test_stain_code_style_is_the_reference_statistics(tiny, load_tile):
    """The default style path: the style vector is a function of the reference's 12-number stain code (nuclei
    from its labels when given, else detected), so a reference with the same statistics gives the same style and
    another stain another one; the style labels reach it through the renderer."""
    from napari_nucsynth.models.points2image import style_code

    assert tiny.config["style_source"] == "code" and isinstance(tiny.encoder, P.StyleCodeMLP)
    img, lab = load_tile(TILE)
    img, lab = img[:96, :96], lab[:96, :96]
    z = P.style_vector(tiny, img, nuclei=lab)
    # the same pixels in another order (nuclei moved with them): the same statistics, the same style
    perm = np.random.default_rng(0).permutation(96 * 96)
    z_perm = P.style_vector(tiny, img.reshape(-1, 3)[perm].reshape(96, 96, 3),
                            nuclei=lab.reshape(-1)[perm].reshape(96, 96))
    assert np.allclose(z, z_perm, atol=1e-5)
    paler = (255 - (255 - img.astype(np.int16)) // 2).astype(np.uint8)  # half the optical density
    assert not np.allclose(style_code(paler, lab), style_code(img, lab))
    assert np.abs(P.style_vector(tiny, paler, nuclei=lab) - z).max() > 1e-3
    # deterministic: the seed and sampling do not move it; nuclei=None detects them
    assert np.array_equal(P.style_vector(tiny, img, 5, sample=True, nuclei=lab), z)
    z_det = P.style_vector(tiny, img)
    mu, logvar = P.encode_style(tiny, img)
    assert np.array_equal(z_det, mu) and not logvar.any()
    with_labels = P.render(tiny, lab[:48, :48], img, seed=3, style_labels=lab)
    detected = P.render(tiny, lab[:48, :48], img, seed=3)
    assert np.array_equal(with_labels, P.render(tiny, lab[:48, :48], img, seed=3, style_labels=lab))
    # Otsu's nuclei are not the annotated ones, so the two codes, and the renders, differ: the labels are used
    assert np.abs(z_det - z).max() > 1e-4 and not np.array_equal(with_labels, detected)


def test_style_and_attention_change_the_image(tiny):
    gen = tiny.inference("generator")
    x = torch.rand(1, P.COND_NC + TINY["noise_nc"], 32, 32)
    z = torch.randn(1, TINY["style_dim"])
    with torch.no_grad():
        ref = gen(x, z)
        assert (gen(x, z + 1) - ref).abs().max() > 1e-3  # the style modulates the normalisations
        cca = gen.global_net.cca.cca
        g0 = cca.gamma.clone()
        cca.gamma.zero_()
        assert (gen(x, z) - ref).abs().max() > 1e-4  # the attention is on the path
        cca.gamma.copy_(g0)


# ----------------------------------------------------------------------------------------------------------------
# inference


def test_render_is_seeded_any_size_and_restores_mode(tiny):
    lab, style = _discs(), _style()
    a = P.render(tiny, lab, style, seed=3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, P.render(tiny, lab, style, seed=3))
    assert not np.array_equal(a, P.render(tiny, lab, style, seed=4))  # the noise comes from the seed
    assert not np.array_equal(a, P.render(tiny, lab, _style(5), seed=3))  # ... the colours from the style
    s1 = P.render(tiny, lab, style, seed=5, sample_style=True)
    assert np.array_equal(s1, P.render(tiny, lab, style, seed=5, sample_style=True))
    odd = P.render(tiny, lab[:37, :53], style[..., 0], seed=0)  # padded inside; grey reference converted
    assert odd.shape == (37, 53, 3)
    assert not tiny.training
    with pytest.raises(ValueError, match="empty"):
        P.render(tiny, np.zeros((0, 5), np.uint32), style)
    with pytest.raises(ValueError, match="style"):
        P.render(tiny, lab, np.zeros((8, 8, 2), np.uint8))


def test_windowed_render_blends_without_seams(tiny):
    lab, style = _discs((200, 184), seed=3, n=80), _style()
    z = P.style_vector(tiny, style)
    calls = []
    tiled = P._render_float(tiny, lab, z, 11, tile=96, progress=lambda i, n, msg: calls.append(n))
    whole = P._render_float(tiny, lab, z, 11, tile=256)
    assert calls and calls[0] >= 9 and tiled.shape == whole.shape == (200, 184, 3)
    assert whole.std() > 0.02
    # criss-cross attention gives each window global context: windows agree approximately, not exactly
    assert np.abs(tiled - whole).mean() < 0.25 * np.abs(whole - whole.mean((0, 1))).mean()
    # no seam: the steps between neighbouring columns are no larger at window borders than elsewhere
    steps = np.abs(np.diff(tiled, axis=1)).mean((0, 2))
    assert steps.max() < 4 * np.median(steps)
    with pytest.raises(ValueError, match="tile must be"):
        P._render_float(tiny, lab, z, 0, tile=40)
    with pytest.raises(InterruptedError):
        P._render_float(tiny, lab, z, 0, tile=96, should_stop=lambda: True)


def test_style_interpolation_endpoints(tiny):
    lab, sa, sb = _discs(), _style(1), _style(2, (70, 30))
    ra, rb = P.render(tiny, lab, sa, seed=7), P.render(tiny, lab, sb, seed=7)
    seq = P.interpolate_styles(tiny, lab, sa, sb, [0.0, 0.5, 1.0], seed=7)
    assert np.array_equal(seq[0], ra) and np.array_equal(seq[2], rb)
    assert not np.array_equal(seq[1], ra) and not np.array_equal(seq[1], rb)
    with pytest.raises(ValueError, match="finite"):
        P.interpolate_styles(tiny, lab, sa, sb, float("nan"))


# ----------------------------------------------------------------------------------------------------------------
# training


def _batch(lab, img, n=2):
    t = get_model("pix2pixhd").targets(img, lab)
    batch = {k: torch.from_numpy(np.stack([v] * n)) for k, v in t.items()}
    batch["image"] = torch.from_numpy(np.stack([img] * n).transpose(0, 3, 1, 2).astype(np.float32) / 255)
    return batch


@pytest.mark.parametrize("source", P.STYLE_SOURCES)
def test_losses_move_in_the_right_direction(load_tile, source):
    from napari_nucsynth.models import gan

    img, lab = load_tile(TILE)
    batch = _batch(lab[:64, :64], img[:64, :64])
    torch.manual_seed(0)
    model = P.build({**TINY, "style_source": source}).train()
    opts = get_model("pix2pixhd").optimizers(model, 1e-3)
    assert opts["g"].param_groups[0]["lr"] == 5e-4 and opts["d"].param_groups[0]["lr"] == 2e-3

    def d_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return gan.discriminator_loss(model, batch)[1]["d_loss"]

    def g_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return gan.generator_loss(model, batch)[1]

    d0 = d_loss()
    for _ in range(3):
        torch.manual_seed(123)
        loss, _ = gan.discriminator_loss(model, batch)
        opts["d"].zero_grad()
        loss.backward()
        opts["d"].step()
    assert d_loss() < d0
    g0 = g_loss()
    for _ in range(3):
        torch.manual_seed(123)
        loss, logs = gan.generator_loss(model, batch)
        opts["g"].zero_grad()
        loss.backward()
        opts["g"].step()
    g1 = g_loss()
    assert g1["loss"] < g0["loss"] and g1["g_perc"] < g0["g_perc"]
    # the stain-code model is taught the colours it is told; the encoder model has its KL term
    assert set(logs) == {"loss", "g_gan", "g_fm", "g_perc", "g_style" if source == "code" else "g_kld"}
    if source == "code":
        assert g1["g_style"] < g0["g_style"]
    # every trained part gets gradients: the attention's gamma too
    assert model.generator.global_net.cca.cca.gamma.grad is not None
    logs = get_model("pix2pixhd").train_step(model, batch, opts, 0)
    assert {"d_loss", "loss"} <= set(logs) and all(np.isfinite(v) for v in logs.values())


def test_train_checkpoint_resume_and_hooks(load_tile, tmp_path):
    from napari_nucsynth.train import train

    img, lab = load_tile(TILE)
    imgs, labs = [img[:128, :128], img[128:256, :128]], [lab[:128, :128], lab[128:256, :128]]
    res = stopped_then_resumed_equals_straight("pix2pixhd", imgs, labs, tmp_path, TINY, batch_size=1, crop=64,
                                               val_fraction=0, lr=2e-4)
    ck = load_checkpoint(res.path, kind="pix2pixhd")
    assert set(ck["optimizer"]) == {"g", "d"} and ck["config"]["ngf"] == 4
    events = []
    res3 = train("pix2pixhd", imgs, labs, steps=1, out=tmp_path / "d.pt", config=dict(TINY), batch_size=1,
                 crop=64, val_fraction=0.5, eval_every=1, preview_every=1, on_update=events.append)
    assert {"l1", "perceptual"} <= set(res3.metrics) and 0 <= res3.metrics["l1"] <= 1
    prev = [e.image for e in events if e.kind == "preview"]
    assert prev and prev[0].dtype == np.uint8 and prev[0].shape == (128, 128, 3)
    with pytest.raises(ValueError, match="is a generator"):
        get_model("pix2pixhd").predict(None, img, "cpu")


# ----------------------------------------------------------------------------------------------------------------
# the renderer


def test_renderer_with_checkpoint_and_interpolation(tmp_path, tiny):
    from napari_nucsynth.models.gan import shipped_state_dict
    from napari_nucsynth.render import get_renderer, interpolatable_methods, interpolate, render, renderers

    assert "pix2pixhd" in renderers() and "pix2pixhd" in interpolatable_methods()
    r = get_renderer("pix2pixhd")
    assert r.needs_checkpoint and "criss-cross" in r.description
    p = save_checkpoint(tmp_path / "p.pt", kind="pix2pixhd", config=tiny.config, state_dict=tiny.state_dict(),
                        step=0)
    lab, style, other = _discs(), _style(), _style(9)
    out = render(lab, style, method="pix2pixhd", checkpoint=p, seed=2, device="cpu")
    assert out.dtype == np.uint8 and np.array_equal(out, P.render(tiny, lab, style, seed=2))
    with pytest.raises(ValueError, match="style_labels"):
        render(lab, style, method="pix2pixhd", checkpoint=p, style_labels=np.zeros((3, 3), np.uint32))
    assert np.array_equal(interpolate(lab, style, other, 0.0, method="pix2pixhd", checkpoint=p, seed=2,
                                      device="cpu"), out)
    # a shipped checkpoint keeps only the moving average: same renders
    p2 = save_checkpoint(tmp_path / "s.pt", kind="pix2pixhd", config=tiny.config,
                         state_dict=shipped_state_dict(tiny), step=0)
    assert np.array_equal(render(lab, style, method="pix2pixhd", checkpoint=p2, seed=2, device="cpu"), out)
    broken = {k: v for k, v in shipped_state_dict(tiny).items() if not k.startswith("ema.generator.out")}
    p3 = save_checkpoint(tmp_path / "b.pt", kind="pix2pixhd", config=tiny.config, state_dict=broken, step=0)
    with pytest.raises(ValueError, match="does not match"):
        render(lab, style, method="pix2pixhd", checkpoint=p3, device="cpu")
    p4 = save_checkpoint(tmp_path / "h.pt", kind="sian", config={}, state_dict={}, step=0)
    with pytest.raises(ValueError, match="not a 'pix2pixhd'"):
        render(lab, style, method="pix2pixhd", checkpoint=p4)


def test_the_shipped_model_renders_follows_the_style_and_interpolates():
    """The shipped pix2pixhd model (trained on the CPU, docs/daff.md) renders without a checkpoint argument, any
    size, reproducibly; its style is the stain code, so a paler reference gives a paler render; the style slider's
    interpolation runs on it; only what renders ships."""
    from napari_nucsynth._sample_data import load_monuseg_crop
    from napari_nucsynth.render import interpolate, render
    from napari_nucsynth.render import pix2pixhd as p2p_render

    if not p2p_render.default_checkpoint().is_file():
        pytest.skip("no pix2pixhd model ships with this version")
    img, lab = load_monuseg_crop()
    crop = lab[:96, :120]
    out = render(crop, img, method="pix2pixhd", style_labels=lab, seed=1, device="cpu")
    assert out.shape == (96, 120, 3)
    assert np.array_equal(out, render(crop, img, method="pix2pixhd", style_labels=lab, seed=1, device="cpu"))
    pale = (255 - (255 - img.astype(np.int16)) // 3).astype(np.uint8)  # a third of the optical density
    pale_out = render(crop, pale, method="pix2pixhd", style_labels=lab, seed=1, device="cpu")
    assert pale_out.astype(float).mean() > out.astype(float).mean() + 20
    mid = interpolate(crop, img, pale, 0.5, method="pix2pixhd", seed=1, device="cpu")
    assert mid.shape == out.shape and not np.array_equal(mid, out)
    ck = load_checkpoint(p2p_render.default_checkpoint(), kind="pix2pixhd")
    assert ck["config"]["style_source"] == "code" and ck["step"] > 0
    assert all(k.startswith("ema.") for k in ck["state_dict"])
