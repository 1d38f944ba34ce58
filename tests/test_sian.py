"""SIAN: modules, the SIAN normalisation, seeded rendering, tiling without seams, style interpolation, training hooks
through the generic loop (with resume), the renderer and its checkpoint errors. Tiny models and crops only."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from _tiny import SIAN
from _tiny import discs as _discs
from _tiny import flat_style as _style
from _tiny import lively

from napari_nucsynth.models import (
    get_model,
    load_checkpoint,
    model_kinds,
    save_checkpoint,
)
from napari_nucsynth.models import sian as S

TILE = "TCGA-A7-A13F-01Z-00-DX1"
TINY = SIAN


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return lively(S.build(dict(TINY)))


# ----------------------------------------------------------------------------------------------------------------
# modules


def test_registered_and_module_shapes():
    assert "sian" in model_kinds()
    spec = get_model("sian")
    model = spec.build(dict(TINY))
    mu, logvar = model.encoder(torch.rand(2, 3, 40, 56) * 2 - 1)
    assert mu.shape == logvar.shape == (2, 8)
    cond = torch.rand(2, S.COND_NC, 32, 48)
    fake = model.generator(cond, mu)
    assert fake.shape == (2, 3, 32, 48) and fake.abs().max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        model.generator(torch.rand(1, S.COND_NC, 30, 48), mu[:1])
    preds = model.discriminator(torch.rand(2, S.COND_NC + 3, 64, 64))
    assert len(preds) == TINY["num_d"] and all(len(p) == TINY["d_layers"] + 1 for p in preds)
    assert all(p[-1].shape[:2] == (2, 1) for p in preds)
    assert preds[1][0].shape[-1] < preds[0][0].shape[-1]  # the second scale sees a downsampled input
    # one state dict holds the three networks
    keys = model.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "generator", "discriminator", "ema"}
    # the descriptor maps SIAN conditions on
    lab = _discs()
    t = spec.targets(None, lab)
    assert set(t) == {"semantic", "direction", "distance"}
    assert t["semantic"].shape == (1, 64, 64) and t["direction"].shape == (2, 64, 64) and t["distance"].shape == (1, 64, 64)
    assert np.array_equal(t["semantic"][0] > 0, lab > 0)
    assert np.array_equal(t["direction"].sum(0), t["semantic"][0])  # one bin per nucleus pixel
    assert t["distance"].max() <= 1 and not t["distance"][0][lab == 0].any()


def test_build_records_feature_network_and_rejects_bad_config():
    cfg = dict(TINY)
    S.build(cfg)
    assert cfg["features_source"].startswith("hovernet:hovernet_monuseg.pt#")
    with pytest.raises(ValueError, match="ngf"):
        S.build({**TINY, "ngf": 0})
    with pytest.raises(ValueError, match="unknown SIAN config"):
        S.build({**TINY, "width": 3})
    with pytest.raises(ValueError, match="unknown feature network"):
        S.build({**TINY, "features": "resnet9000"})


def test_sian_norm_responds_to_descriptors_and_style():
    torch.manual_seed(1)
    cond_mod, norm = S.SIANCondition(8, 8), S.SIANNorm(6, 8, 8)
    lively(cond_mod), lively(norm)
    lab = _discs((40, 40), seed=2)
    cond = torch.from_numpy(S.conditioning(lab))[None]
    x, style = torch.randn(1, 6, 40, 40), torch.randn(1, 8)

    def out(c, s):
        with torch.no_grad():
            return norm(x, cond_mod(c, s), s)

    ref = out(cond, style)
    for ch, name in enumerate(["semantic", "direction 0", "direction 1", "distance"]):
        c = cond.clone()
        c[0, ch, 10:20, 10:20] = 1 - c[0, ch, 10:20, 10:20] if ch < 3 else 0.5
        diff = (out(c, style) - ref).abs().sum(1)[0]
        assert diff.max() > 1e-3, f"the normalisation ignores the {name} map"
        # ... and the change is local: three 3x3 convolutions away at most
        far = torch.ones_like(diff, dtype=torch.bool)
        far[7:23, 7:23] = False
        assert diff[far].max() < 1e-6, f"a change of the {name} map reaches too far"
    assert (out(cond, style + 1) - ref).abs().max() > 1e-3  # the style vector modulates everywhere
    bg = torch.from_numpy(lab == 0)
    assert (out(cond, style + 1) - ref).abs().sum(1)[0][bg].min() > 0  # background too


# ----------------------------------------------------------------------------------------------------------------
# inference


def test_render_is_seeded_and_deterministic(tiny):
    lab, style = _discs(), _style()
    a = S.render(tiny, lab, style, seed=3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, S.render(tiny, lab, style, seed=3))
    assert not np.array_equal(a, S.render(tiny, lab, style, seed=4))  # the noise comes from the seed
    s1 = S.render(tiny, lab, style, seed=5, sample_style=True)
    assert np.array_equal(s1, S.render(tiny, lab, style, seed=5, sample_style=True))
    assert not np.array_equal(s1, S.render(tiny, lab, style, seed=5))  # a sampled style is not the mean
    # any size (padded to a multiple of 4 inside), grey and float references converted
    odd = S.render(tiny, lab[:37, :53], style[..., 0], seed=0)
    assert odd.shape == (37, 53, 3)
    assert S.render(tiny, lab, style.astype(np.float32) / 255, seed=0).shape == (64, 64, 3)
    assert not tiny.training  # the mode is restored
    with pytest.raises(ValueError, match="empty"):
        S.render(tiny, np.zeros((0, 5), np.uint32), style)
    with pytest.raises(ValueError, match="style"):
        S.render(tiny, lab, np.zeros((8, 8, 2), np.uint8))


def test_style_interpolation_endpoints(tiny):
    lab, sa, sb = _discs(), _style(1), _style(2, (70, 30))
    ra, rb = S.render(tiny, lab, sa, seed=7), S.render(tiny, lab, sb, seed=7)
    assert not np.array_equal(ra, rb)
    assert np.array_equal(S.interpolate_styles(tiny, lab, sa, sb, 0.0, seed=7), ra)
    assert np.array_equal(S.interpolate_styles(tiny, lab, sa, sb, 1.0, seed=7), rb)
    seq = S.interpolate_styles(tiny, lab, sa, sb, [0.0, 0.5, 1.0], seed=7)
    assert len(seq) == 3 and np.array_equal(seq[0], ra) and np.array_equal(seq[2], rb)
    mid = seq[1].astype(float)
    assert not np.array_equal(seq[1], ra) and not np.array_equal(seq[1], rb)
    assert np.abs(mid - (ra.astype(float) + rb) / 2).mean() < np.abs(ra.astype(float) - rb).mean()
    with pytest.raises(ValueError, match="finite"):
        S.interpolate_styles(tiny, lab, sa, sb, float("nan"))


def test_tiled_render_has_no_seams(tiny):
    """An image larger than the tile is rendered in overlapping windows; it equals the one-piece render."""
    lab, style = _discs((300, 260), seed=3, n=150), _style()
    z = S.style_vector(tiny, style)
    calls = []
    tiled = S._render_float(tiny, lab, z, 11, tile=128, progress=lambda i, n, msg: calls.append(n))
    whole = S._render_float(tiny, lab, z, 11, tile=512)
    assert calls and calls[0] >= 9  # several windows per axis
    assert tiled.shape == whole.shape == (300, 260, 3)
    assert whole.std() > 0.02  # the image has structure to compare
    assert np.abs(tiled - whole).max() < 1e-4
    # the seams would be at the window edges: no jump there beyond the image's own variation
    assert S.halo(tiny.config) >= S.receptive_radius(tiny.config)
    with pytest.raises(ValueError, match="tile must be"):
        S._render_float(tiny, lab, z, 0, tile=64)
    with pytest.raises(InterruptedError):
        S._render_float(tiny, lab, z, 0, tile=128, should_stop=lambda: True)


# ----------------------------------------------------------------------------------------------------------------
# training


def _batch(lab, img, n=2):
    spec = get_model("sian")
    t = spec.targets(img, lab)
    batch = {k: torch.from_numpy(np.stack([v] * n)) for k, v in t.items()}
    batch["image"] = torch.from_numpy(np.stack([img] * n).transpose(0, 3, 1, 2).astype(np.float32) / 255)
    return batch


def test_losses_move_in_the_right_direction(load_tile):
    img, lab = load_tile(TILE)
    batch = _batch(lab[:64, :64], img[:64, :64])
    torch.manual_seed(0)
    model = S.build(dict(TINY)).train()
    opts = S.optimizers(model, 1e-3)
    assert opts["g"].param_groups[0]["lr"] == 5e-4 and opts["d"].param_groups[0]["lr"] == 2e-3  # TTUR
    assert opts["g"].param_groups[0]["betas"] == (0.0, 0.9)

    def d_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return S.discriminator_loss(model, batch)[1]["d_loss"]

    def g_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return S.generator_loss(model, batch)[1]

    d0 = d_loss()
    for _ in range(3):  # the discriminator alone learns to tell these fakes from the real crop
        torch.manual_seed(123)
        loss, _ = S.discriminator_loss(model, batch)
        opts["d"].zero_grad()
        loss.backward()
        opts["d"].step()
    assert d_loss() < d0
    g0 = g_loss()
    for _ in range(3):  # the generator alone gets closer to the real crop (features) and fools D more
        torch.manual_seed(123)
        loss, logs = S.generator_loss(model, batch)
        opts["g"].zero_grad()
        loss.backward()
        opts["g"].step()
    g1 = g_loss()
    assert g1["loss"] < g0["loss"] and g1["g_perc"] < g0["g_perc"]
    assert set(logs) == {"loss", "g_gan", "g_fm", "g_perc", "g_kld"}
    logs = S.train_step(model, batch, opts, 0)
    assert {"d_loss", "d_real", "d_fake", "loss"} <= set(logs) and all(np.isfinite(v) for v in logs.values())


def test_train_checkpoint_resume_and_hooks(load_tile, tmp_path):
    from napari_nucsynth.train import train

    img, lab = load_tile(TILE)
    imgs, labs = [img[:128, :128], img[128:256, :128]], [lab[:128, :128], lab[128:256, :128]]
    kw = {"batch_size": 1, "crop": 64, "val_fraction": 0, "lr": 2e-4}
    events = []
    res = train("sian", imgs, labs, steps=3, out=tmp_path / "a.pt", config=dict(TINY), seed=1,
                on_update=events.append, should_stop=lambda: sum(e.kind == "step" for e in events) >= 2, **kw)
    assert res.step == 2 and res.stopped
    ck = load_checkpoint(res.path, kind="sian")
    assert set(ck["optimizer"]) == {"g", "d"} and "rng" in ck
    assert ck["config"]["features_source"].startswith("hovernet:") and ck["config"]["ngf"] == 4
    steps = [e.losses for e in events if e.kind == "step"]
    assert {"loss", "d_loss", "g_perc"} <= set(steps[0])
    res2 = train("sian", imgs, labs, steps=3, out=tmp_path / "b.pt", resume=res.path, **kw)
    full = train("sian", imgs, labs, steps=3, out=tmp_path / "c.pt", config=dict(TINY), seed=1, **kw)
    a, b = load_checkpoint(full.path)["state_dict"], load_checkpoint(res2.path)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # validation and preview hooks (held-out pairs)
    events.clear()
    res3 = train("sian", imgs, labs, steps=1, out=tmp_path / "d.pt", config=dict(TINY), batch_size=1, crop=64,
                 val_fraction=0.5, eval_every=1, preview_every=1, on_update=events.append)
    assert {"l1", "perceptual"} <= set(res3.metrics) and 0 <= res3.metrics["l1"] <= 1
    prev = [e.image for e in events if e.kind == "preview"]
    assert prev and prev[0].dtype == np.uint8 and prev[0].shape == (128, 128, 3)
    with pytest.raises(ValueError, match="is a generator .*, not a segmenter"):
        get_model("sian").predict(None, img, "cpu")


# ----------------------------------------------------------------------------------------------------------------
# the renderer


def test_renderer_with_checkpoint(tmp_path, tiny):
    from napari_nucsynth.render import get_renderer, render, renderers

    assert "sian" in renderers()
    r = get_renderer("sian")
    assert r.needs_checkpoint and "SIAN" in r.description
    p = save_checkpoint(tmp_path / "s.pt", kind="sian", config=tiny.config, state_dict=tiny.state_dict(), step=0)
    lab, style = _discs(), _style()
    out = render(lab, style, method="sian", checkpoint=p, seed=2, device="cpu")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out, S.render(tiny, lab, style, seed=2))
    assert np.array_equal(out, render(lab, style, method="sian", checkpoint=str(p), seed=2, device="cpu",
                                      style_labels=np.zeros(style.shape[:2], np.uint32)))
    with pytest.raises(ValueError, match="style_labels"):
        render(lab, style, method="sian", checkpoint=p, style_labels=np.zeros((3, 3), np.uint32))
    # a shipped checkpoint keeps only the moving average (no discriminator, no live generator): same renders
    from napari_nucsynth.models.gan import shipped_state_dict

    shipped = shipped_state_dict(tiny)
    assert shipped and all(k.startswith("ema.") for k in shipped)
    p2 = save_checkpoint(tmp_path / "g.pt", kind="sian", config=tiny.config, state_dict=shipped, step=0)
    assert np.array_equal(render(lab, style, method="sian", checkpoint=p2, seed=2, device="cpu"), out)
    broken = {k: v for k, v in shipped.items() if not k.startswith("ema.generator.conv_img")}
    p3 = save_checkpoint(tmp_path / "b.pt", kind="sian", config=tiny.config, state_dict=broken, step=0)
    with pytest.raises(ValueError, match="does not match"):
        render(lab, style, method="sian", checkpoint=p3, seed=2, device="cpu")
    # a checkpoint of another kind is refused by name
    p3 = save_checkpoint(tmp_path / "h.pt", kind="hovernet", config={}, state_dict={}, step=0)
    with pytest.raises(ValueError, match="not a 'sian'"):
        render(lab, style, method="sian", checkpoint=p3)


def test_ema_renders_and_follows_the_live_generator(load_tile):
    """The GAN core's moving average: at step 0 it copies the live weights, later it lags them; rendering uses it."""
    img, lab = load_tile(TILE)
    batch = _batch(lab[:64, :64], img[:64, :64])
    torch.manual_seed(0)
    model = S.build(dict(TINY)).train()
    live0 = model.generator.conv_img.weight.detach().clone()
    assert torch.equal(model.ema["generator"].conv_img.weight, live0)
    opts = S.optimizers(model, 1e-3)
    for step in range(3):
        S.train_step(model, batch, opts, step)
    live, avg = model.generator.conv_img.weight.detach(), model.ema["generator"].conv_img.weight
    assert not torch.equal(live, live0) and not torch.equal(avg, live0) and not torch.equal(avg, live)
    assert not avg.requires_grad and not model.ema.training
    # the renderer reads the EMA copy: changing the live generator changes nothing
    before = S.render(model, lab[:64, :64], img[:64, :64], seed=0)
    with torch.no_grad():
        model.generator.conv_img.weight.add_(1.0)
    assert np.array_equal(S.render(model, lab[:64, :64], img[:64, :64], seed=0), before)


def test_the_shipped_model_renders_and_interpolates_out_of_the_box():
    """The shipped sian model (trained on the CPU, docs/generators.md) renders without a checkpoint argument, any
    size, reproducibly; the style slider's interpolation runs on it."""
    from napari_nucsynth._sample_data import load_monuseg_crop
    from napari_nucsynth.render import interpolate, render
    from napari_nucsynth.render import sian as sian_render

    if not sian_render.default_checkpoint().is_file():
        pytest.skip("no sian model ships with this version")
    img, lab = load_monuseg_crop()
    lab = lab[:100, :120]
    out = render(lab, img, method="sian", seed=1, device="cpu")
    assert out.shape == (100, 120, 3) and np.array_equal(out, render(lab, img, method="sian", seed=1, device="cpu"))
    other = np.ascontiguousarray(img[::-1, ::-1, :3] // 2 + 100)
    mid = interpolate(lab, img, other, 0.5, method="sian", seed=1, device="cpu")
    assert mid.shape == out.shape and not np.array_equal(mid, out)
    ck = load_checkpoint(sian_render.default_checkpoint(), kind="sian")
    assert ck["config"]["features_source"].startswith("hovernet:") and ck["step"] > 0
    assert all(k.startswith("ema.") for k in ck["state_dict"])  # only what renders ships
