"""Points2Image (unpaired, OASIS-style): the style code (numpy and differentiable), the unpaired training samples, the
segmentation discriminator's losses, the point loss, seeded and tiled rendering, training through the generic loop
with labels=None (resume repeats the run), the renderer and its checkpoint errors, and ``nucsynth train --model
points2image`` without --labels. Tiny models and 64-px crops only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny import discs as _discs
from _tiny import lively

from napari_nucsynth.models import get_model, load_checkpoint, model_kinds, save_checkpoint
from napari_nucsynth.models import points2image as P

TILE = "TCGA-A7-A13F-01Z-00-DX1"
#: 2 upsamplings (multiples of 4), a 3-level discriminator (crops of multiples of 8), a few channels
TINY = {"ngf": 4, "ngf_max": 16, "n_up": 2, "hidden": 0.5, "z_dim": 2, "noise_down": 1, "style_dim": 8,
        "ndf": 4, "d_levels": 3, "tile": 128, "blend": 8}


def _he(lab: np.ndarray, nucleus=(80, 50, 140), background=(235, 190, 215), seed=0) -> np.ndarray:
    """An H&E-like image of ``lab``: purple nuclei on pink, with noise."""
    rng = np.random.default_rng(seed)
    img = np.where((lab > 0)[..., None], np.array(nucleus), np.array(background)).astype(np.float64)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: tiny convolutions gain nothing from two, and on a busy machine the second thread's
    waiting makes them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return lively(P.build(dict(TINY)), sync_ema=True)


def _batch(images: list[np.ndarray]) -> dict:
    from napari_nucsynth.train import _default_collate

    return _default_collate([(im, None, P.targets(im, None)) for im in images], "cpu")


# ----------------------------------------------------------------------------------------------------------------
# modules and data


def test_registered_unpaired_and_module_shapes():
    assert "points2image" in model_kinds()
    spec = get_model("points2image")
    assert spec.unpaired and not get_model("sian").unpaired and not get_model("hovernet").unpaired
    assert spec.train_step is P.train_step and spec.preview is not None
    model = spec.build(dict(TINY))
    fake = model.generator(torch.rand(2, P.COND_NC, 32, 48), torch.rand(2, P.STYLE_NC))
    assert fake.shape == (2, 3, 32, 48) and fake.abs().max() <= 1
    with pytest.raises(ValueError, match="multiples of 4"):
        model.generator(torch.rand(1, P.COND_NC, 30, 48), torch.rand(1, P.STYLE_NC))
    # OASIS's discriminator: 1 + 2 classes ("fake", background, nucleus) at every pixel
    out = model.discriminator(torch.rand(2, 3, 64, 40) * 2 - 1)
    assert out.shape == (2, 1 + P.N_CLASSES, 64, 40)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.discriminator(torch.rand(1, 3, 60, 64))
    assert {k.split(".")[0] for k in model.state_dict()} == {"generator", "discriminator", "ema"}
    with pytest.raises(ValueError, match="unknown points2image config"):
        P.build({"width": 3})
    with pytest.raises(ValueError, match="noise_down"):
        P.build({**TINY, "noise_down": 3})
    with pytest.raises(ValueError, match="is a generator"):
        spec.predict(None, np.zeros((8, 8, 3), np.uint8), "cpu")


def test_style_code_is_label_free_and_matches_its_differentiable_twin(load_tile):
    img = load_tile(TILE)[0][:200, :240]
    from napari_nucsynth.presynthesis import detect_nuclei

    nuc = detect_nuclei(img)
    code = P.style_code(img)
    assert code.shape == (P.STYLE_NC,) and code.dtype == np.float32 and np.all(np.isfinite(code))
    assert np.array_equal(code, P.style_code(img, nuc))  # Otsu nuclei by default
    assert code[0] > code[3]  # more haematoxylin inside the nuclei than outside
    x = torch.from_numpy(img.transpose(2, 0, 1)[None].astype(np.float32) / 255)
    twin = P.style_code_torch(x, torch.from_numpy((nuc > 0)[None, None].astype(np.float32)))[0].numpy()
    assert np.allclose(twin, code, atol=1e-4)
    # it follows the stain: darker, bluer nuclei -> more H inside; pinker background -> more E outside
    lab = _discs((96, 96))
    a = P.style_code(_he(lab), lab)
    b = P.style_code(_he(lab, nucleus=(40, 20, 110)), lab)
    c = P.style_code(_he(lab, background=(240, 150, 200)), lab)
    assert b[0] > a[0] and abs(b[3] - a[3]) < 0.05
    assert c[4] > a[4] and abs(c[0] - a[0]) < 0.05
    # no nuclei at all: a quantile stands in (finite), and a mask of another shape is refused
    flat = np.full((32, 32, 3), 200, np.uint8)
    assert np.all(np.isfinite(P.style_code(flat)))
    with pytest.raises(ValueError, match="shape"):
        P.style_code(img, np.zeros((3, 3), np.uint32))


def test_unpaired_samples_are_seeded_per_crop_and_ignore_labels(load_tile):
    img = load_tile(TILE)[0]
    a, b = img[:64, :64], img[64:128, :64]
    ta, tb = P.targets(a, None), P.targets(b, None)
    assert set(ta) == {"cond", "points", "real_sem", "style"}
    assert ta["cond"].shape == (3, 64, 64) and ta["points"].shape == ta["real_sem"].shape == (1, 64, 64)
    assert ta["style"].shape == (P.STYLE_NC,)
    # the same crop draws the same masks (a resumed run repeats them), another crop other masks
    again = P.targets(a.copy(), np.ones((64, 64), np.uint32))  # labels are not used: the kind is unpaired
    assert all(np.array_equal(ta[k], again[k]) for k in ta)
    assert not np.array_equal(ta["cond"], tb["cond"])
    sem, edge, dist = ta["cond"]
    assert sem.any() and set(np.unique(sem)) <= {0, 1}
    assert not edge[sem == 0].any() and not dist[sem == 0].any() and dist.max() <= 1
    assert edge[sem == 1].any() and (edge[sem == 1] == 0).any()  # edges are a part of the nuclei, not all
    # one centroid mark per sampled nucleus, inside it
    pts = ta["points"][0]
    assert pts.sum() >= 1 and np.all(sem[pts > 0] == 1)
    # the real crop's pseudo-labels: Otsu nuclei of the crop itself, not the sampled masks
    from napari_nucsynth.presynthesis import detect_nuclei

    assert np.array_equal(ta["real_sem"][0] > 0, detect_nuclei(a) > 0)
    # sample_layout: seeded
    assert np.array_equal(P.sample_layout((48, 40), 3), P.sample_layout((48, 40), 3))
    assert not np.array_equal(P.sample_layout((48, 40), 3), P.sample_layout((48, 40), 4))


def test_class_balanced_cross_entropy():
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :2, :2] = 1  # a rare class: 4 of 100 pixels
    logits = torch.zeros(1, 3, 10, 10)
    logits[:, 0] = 5.0  # right on the common class, wrong on the rare one
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")[0]
    per_class = (ce[target[0] == 0].mean() + ce[target[0] == 1].mean()) / 2
    assert torch.isclose(P.class_balanced_ce(logits, target), per_class)  # each present class weighs the same
    assert P.class_balanced_ce(logits, target) > P.class_balanced_ce(logits, target, balance=False)


def test_point_loss_wants_haematoxylin_at_the_centroids():
    lab = _discs((64, 64), n=8)
    code = torch.from_numpy(P.style_code(_he(lab), lab))[None]
    pts = torch.from_numpy(P.centroid_map(lab))[None, None]
    heat = P.heatmap(pts, 2.0)
    assert heat.max() == 1 and heat[pts > 0].min() == 1 and heat[0, 0][lab == 0].mean() < 0.05
    sem = torch.from_numpy((lab > 0)[None, None].astype(np.float32))

    def loss(img):
        x = torch.from_numpy(img.transpose(2, 0, 1)[None].astype(np.float32) / 255).requires_grad_(True)
        out = P.point_loss(x, heat, sem, code)
        out.backward()
        return float(out.detach()), float(x.grad.abs().sum())

    good, grad = loss(_he(lab))
    swapped = loss(_he(lab, nucleus=(235, 190, 215), background=(80, 50, 140)))[0]  # nuclei pale, background dark
    blank = loss(_he(lab, nucleus=(235, 190, 215)))[0]  # no nuclei drawn
    assert good < blank < swapped and grad > 0


def test_losses_move_in_the_right_direction(load_tile):
    img = load_tile(TILE)[0]
    batch = _batch([img[:64, :64], img[64:128, 64:128]])
    torch.manual_seed(0)
    model = P.build(dict(TINY)).train()
    opts = get_model("points2image").optimizers(model, 1e-3)
    assert opts["g"].param_groups[0]["lr"] == 5e-4 and opts["d"].param_groups[0]["lr"] == 2e-3  # the core's TTUR

    def logs(fn):
        torch.manual_seed(123)
        with torch.no_grad():
            return fn(model, batch)[1]

    d0 = logs(P.discriminator_loss)
    for _ in range(4):  # D alone learns the pseudo-labels of the real crops and to call the fakes fake
        torch.manual_seed(123)
        loss, _ = P.discriminator_loss(model, batch)
        opts["d"].zero_grad()
        loss.backward()
        opts["d"].step()
    assert logs(P.discriminator_loss)["d_loss"] < d0["d_loss"]
    g0 = logs(P.generator_loss)
    for _ in range(4):  # G alone: the point and style terms fall
        torch.manual_seed(123)
        loss, _ = P.generator_loss(model, batch)
        opts["g"].zero_grad()
        loss.backward()
        opts["g"].step()
    g1 = logs(P.generator_loss)
    assert g1["loss"] < g0["loss"] and g1["g_point"] < g0["g_point"]
    assert set(g1) == {"loss", "g_adv", "g_point", "g_style"}
    model.config["lambda_labelmix"] = 10.0  # OASIS's LabelMix, off by default on the CPU
    out = P.train_step(model, batch, opts, 0)
    assert {"d_loss", "d_real", "d_fake", "d_labelmix", "loss", "g_adv"} <= set(out)
    assert all(np.isfinite(v) for v in out.values())


# ----------------------------------------------------------------------------------------------------------------
# rendering


def test_render_is_seeded_and_follows_the_style(tiny):
    lab = _discs()
    style = _he(_discs((48, 40), seed=5))
    a = P.render(tiny, lab, style, seed=3)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, P.render(tiny, lab, style, seed=3))
    assert not np.array_equal(a, P.render(tiny, lab, style, seed=4))  # the noise: another texture
    assert not np.array_equal(a, P.render(tiny, _discs(seed=1), style, seed=3))  # the masks
    assert not np.array_equal(a, P.render(tiny, lab, _he(_discs((48, 40), seed=5), nucleus=(30, 10, 90)), seed=3))
    # odd sizes are padded and cropped back; the reference's own nuclei may replace Otsu's
    assert P.render(tiny, _discs((37, 50)), style, seed=0).shape == (37, 50, 3)
    sl = _discs((48, 40), seed=5)
    assert np.array_equal(P.render(tiny, lab, style, seed=3, style_labels=sl),
                          P._to_uint8(P._render_float(tiny, lab, P.style_code(style, sl), 3)))
    # the noise is drawn at 1/2^noise_down resolution, a z_dim-channel map
    assert tiny.inference("generator").noise_shape(64, 64) == (2, 32, 32)


def test_tiled_render_equals_the_one_piece_render(tiny):
    lab = _discs((150, 134), seed=2, n=40)
    code = P.style_code(_he(_discs((40, 40))))
    whole = P._render_float(tiny, lab, code, 7, tile=1024)
    tile = 2 * P.halo(tiny.config) + 8 + 4
    calls = []
    tiled = P._render_float(tiny, lab, code, 7, tile=tile, progress=lambda i, n, m: calls.append((i, n)))
    assert len(calls) > 1 and np.abs(tiled - whole).max() < 1e-5
    with pytest.raises(ValueError, match="tile must be"):
        P._render_float(tiny, lab, code, 7, tile=tile - 4)
    with pytest.raises(InterruptedError):
        P._render_float(tiny, lab, code, 7, tile=tile, should_stop=lambda: True)


def test_bilinear_upsampling_takes_the_same_weights_and_tiles_seamlessly(tiny):
    """``upsample: "bilinear"`` (against the shipped model's cross-hatched texture) has no parameters of its own: a
    nearest model's weights load into it, its renders differ, and a tiled render still equals the one-piece one."""
    bil = P.build({**tiny.config, "upsample": "bilinear"})
    bil.load_state_dict(tiny.state_dict())
    bil.eval()
    lab = _discs((150, 134), seed=2, n=40)
    code = P.style_code(_he(_discs((40, 40))))
    whole = P._render_float(bil, lab, code, 7, tile=1024)
    assert not np.allclose(whole, P._render_float(tiny, lab, code, 7, tile=1024))
    tiled = P._render_float(bil, lab, code, 7, tile=2 * P.halo(bil.config) + 8 + 4)
    assert np.abs(tiled - whole).max() < 1e-5
    with pytest.raises(ValueError, match="upsample"):
        P.build({**tiny.config, "upsample": "bicubic"})


# ----------------------------------------------------------------------------------------------------------------
# training through the generic loop, unpaired


def test_matched_layouts_have_as_many_nuclei_as_the_crops_own_otsu_nuclei(load_tile, tmp_path, monkeypatch):
    from scipy import ndimage as ndi

    from napari_nucsynth.presynthesis import detect_nuclei

    img = load_tile(TILE)[0]
    H, W = img.shape[:2]
    crops = [img[r : r + 64, c : c + 64] for r in np.linspace(0, H - 64, 3).astype(int)
             for c in np.linspace(0, W - 64, 3).astype(int)]
    counts = []
    for crop in crops:
        n_otsu = int(ndi.label(detect_nuclei(crop) > 0)[1])
        t = P.targets(crop, None, config={"layout": "matched"})
        counts.append((n_otsu, int(t["points"].sum())))
        assert np.array_equal(t["real_sem"], P.targets(crop, None)["real_sem"])  # the same pseudo-labels
        # seeded by the crop: the same crop, the same masks
        assert np.array_equal(t["cond"], P.targets(crop.copy(), None, config={"layout": "matched"})["cond"])
    # one centroid mark per nucleus (two can round to one pixel, a jammed hard core can place fewer)
    assert all(m <= n and m >= 0.8 * n for n, m in counts), counts
    assert len({n for n, _ in counts}) > 1  # the counts follow the crops, not one process
    # an empty crop (no stain): an empty layout, which the default process never draws
    blank = np.full((64, 64, 3), 235, np.uint8)
    assert P.targets(blank, None, config={"layout": "matched"})["cond"].sum() == 0
    assert P.targets(blank, None)["cond"][0].any()
    # the default and an old checkpoint's config (no "layout") draw as before
    assert all(np.array_equal(P.targets(crops[0], None)[k], P.targets(crops[0], None, config={})[k])
               for k in ("cond", "points"))
    with pytest.raises(ValueError, match="layout"):
        P.targets(crops[0], None, config={"layout": "dense"})
    # the training loop hands the run's config to targets
    seen = []
    real = P.sample_layout
    monkeypatch.setattr(P, "sample_layout", lambda shape, seed=None, n=None: seen.append(n) or real(shape, seed, n=n))
    from napari_nucsynth.train import train

    for layout in ("matched", "process"):
        seen.clear()
        train("points2image", [img[:128, :128]], None, steps=1, out=tmp_path / "m.pt",
              config={**TINY, "layout": layout}, batch_size=1, crop=64, val_fraction=0, device="cpu")
        assert seen and all((n is not None) == (layout == "matched") for n in seen)


def test_train_unpaired_checkpoint_resume_and_hooks(load_tile, tmp_path):
    from napari_nucsynth.train import train

    img = load_tile(TILE)[0]
    imgs = [img[:128, :128], img[128:256, :128]]
    kw = {"batch_size": 1, "crop": 64, "val_fraction": 0, "lr": 2e-4, "device": "cpu"}
    events = []
    res = train("points2image", imgs, None, steps=3, out=tmp_path / "a.pt", config=dict(TINY), seed=1,
                on_update=events.append, should_stop=lambda: sum(e.kind == "step" for e in events) >= 2, **kw)
    assert res.step == 2 and res.stopped
    ck = load_checkpoint(res.path, kind="points2image")
    assert set(ck["optimizer"]) == {"g", "d"} and "rng" in ck and ck["train_data"]["unpaired"] is True
    assert {"loss", "g_adv", "g_point", "g_style", "d_loss"} <= set(next(e.losses for e in events if e.kind == "step"))
    res2 = train("points2image", imgs, None, steps=3, out=tmp_path / "b.pt", resume=res.path, **kw)
    full = train("points2image", imgs, None, steps=3, out=tmp_path / "c.pt", config=dict(TINY), seed=1, **kw)
    a, b = load_checkpoint(full.path)["state_dict"], load_checkpoint(res2.path)["state_dict"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    # label-free validation and previews on a held-out image
    events.clear()
    res3 = train("points2image", imgs, None, steps=1, out=tmp_path / "d.pt", config=dict(TINY), batch_size=1,
                 crop=64, val_fraction=0.5, eval_every=1, preview_every=1, on_update=events.append, device="cpu")
    assert {"mask_dice", "style_l1"} <= set(res3.metrics) and 0 <= res3.metrics["mask_dice"] <= 1
    prev = [e.image for e in events if e.kind == "preview"]
    assert prev and prev[0].dtype == np.uint8 and prev[0].shape == (128, 128, 3)


def test_train_refuses_the_wrong_pairing(load_tile, tmp_path):
    from napari_nucsynth.train import load_pairs, train

    img, lab = load_tile(TILE)
    with pytest.raises(ValueError, match="trains unpaired"):
        train("points2image", [img[:64, :64]], [lab[:64, :64]], steps=1, out=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="trains unpaired"):
        train("points2image", [img[:64, :64]], None, steps=1, out=tmp_path / "x.pt", val_images=[img[:64, :64]],
              val_labels=[lab[:64, :64]])
    with pytest.raises(ValueError, match="pairs of images and instance labels.*points2image"):
        train("hovernet", [img[:64, :64]], None, steps=1, out=tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    # images alone: a folder (every image file) or arrays; the labels are all-zero placeholders
    import imageio.v3 as iio

    (tmp_path / "im").mkdir()
    iio.imwrite(tmp_path / "im" / "b.png", img[:40, :50])
    iio.imwrite(tmp_path / "im" / "a.png", img[:30, :20])
    (tmp_path / "im" / "notes.txt").write_text("not an image")
    imgs, labs, names = load_pairs(tmp_path / "im", None)
    assert names == ["a", "b"] and imgs[1].shape == (40, 50, 3)
    assert labs[1].shape == (40, 50) and labs[1].dtype == np.uint32 and not labs[1].any()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image file"):
        load_pairs(tmp_path / "empty", None)
    with pytest.raises(ValueError, match="does not exist"):
        load_pairs(tmp_path / "not-there", None)


def test_cli_trains_without_labels(load_tile, tmp_path, capsys):
    import imageio.v3 as iio

    from napari_nucsynth.cli import main

    img = load_tile(TILE)[0]
    (tmp_path / "im").mkdir()
    for i in range(2):
        iio.imwrite(tmp_path / "im" / f"t{i}.png", img[i * 96 : i * 96 + 96, :96])
    out = tmp_path / "p2i.pt"
    base = ["train", "--images", str(tmp_path / "im"), "--steps", "2", "--out", str(out), "--batch-size", "1",
            "--crop", "64", "--val-fraction", "0", "--device", "cpu"]
    assert main([*base, "--model", "points2image", "--config", json.dumps(TINY)]) == 0
    assert load_checkpoint(out, kind="points2image")["step"] == 2
    capsys.readouterr()
    assert main([*base, "--model", "hovernet"]) == 2
    err = capsys.readouterr().err
    assert "--labels is required for --model hovernet" in err and "points2image" in err
    assert main([*base, "--model", "points2image", "--labels", str(tmp_path / "im")]) == 2
    assert "leave --labels out" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# the renderer


def test_renderer_with_checkpoint(tmp_path, tiny):
    from napari_nucsynth.models.gan import shipped_state_dict
    from napari_nucsynth.render import get_renderer, render, renderers

    assert "points2image" in renderers()
    r = get_renderer("points2image")
    assert r.needs_checkpoint and r.default_checkpoint.name == "points2image_monuseg.pt"
    p = save_checkpoint(tmp_path / "p.pt", kind="points2image", config=tiny.config, state_dict=tiny.state_dict(),
                        step=0)
    lab, style = _discs(), _he(_discs((48, 40), seed=5))
    out = render(lab, style, method="points2image", checkpoint=p, seed=2, device="cpu")
    assert np.array_equal(out, P.render(tiny, lab, style, seed=2))
    sl = _discs((48, 40), seed=5)
    assert np.array_equal(render(lab, style, method="points2image", checkpoint=p, seed=2, device="cpu",
                                 style_labels=sl), P.render(tiny, lab, style, seed=2, style_labels=sl))
    with pytest.raises(ValueError, match="style_labels"):
        render(lab, style, method="points2image", checkpoint=p, style_labels=np.zeros((3, 3), np.uint32))
    # a shipped checkpoint keeps only the moving average: same renders
    p2 = save_checkpoint(tmp_path / "g.pt", kind="points2image", config=tiny.config,
                         state_dict=shipped_state_dict(tiny), step=0)
    assert np.array_equal(render(lab, style, method="points2image", checkpoint=p2, seed=2, device="cpu"), out)
    p3 = save_checkpoint(tmp_path / "h.pt", kind="sian", config={}, state_dict={}, step=0)
    with pytest.raises(ValueError, match="not a 'points2image'"):
        render(lab, style, method="points2image", checkpoint=p3)


def test_style_interpolation(tmp_path, tiny):
    """The style slider: the render at t between the two references' style codes; t = 0 and 1 are the renders in
    each reference; the same noise at every t."""
    from napari_nucsynth.render import interpolatable_methods, interpolate, render

    assert "points2image" in interpolatable_methods()
    p = save_checkpoint(tmp_path / "p.pt", kind="points2image", config=tiny.config, state_dict=tiny.state_dict(),
                        step=0)
    lab = _discs()
    sa, sb = _he(_discs((48, 40), seed=5)), _he(_discs((40, 40), seed=6), nucleus=(30, 10, 90),
                                                background=(240, 150, 200))
    kw = {"method": "points2image", "checkpoint": p, "seed": 4, "device": "cpu"}
    ends = [render(lab, s, **kw) for s in (sa, sb)]
    got = [interpolate(lab, sa, sb, t, **kw) for t in (0.0, 0.5, 1.0)]
    assert np.array_equal(got[0], ends[0]) and np.array_equal(got[2], ends[1])
    assert not np.array_equal(got[1], ends[0]) and not np.array_equal(got[1], ends[1])


def test_the_shipped_model_renders_nuclei_where_the_masks_are_in_the_references_stain(load_tile):
    """The shipped points2image (trained unpaired on the CPU, docs/points2image.md) loads without a checkpoint
    argument, holds only the generator's moving average, renders reproducibly per seed, puts haematoxylin where
    the masks are, and takes its colours from the reference."""
    from napari_nucsynth.render import get_renderer, render
    from napari_nucsynth.stain import od_distance, rgb_to_hed

    path = get_renderer("points2image").default_checkpoint
    if not path.is_file():
        pytest.skip("no points2image model ships with this version")
    ck = load_checkpoint(path, kind="points2image")
    assert all(k.startswith("ema.") for k in ck["state_dict"]) and ck["train_data"]["unpaired"] in (True, "True")
    img, lab = load_tile(TILE)
    lab = lab[:128, :128]
    pale = np.full((96, 96, 3), (235, 200, 225), np.uint8)
    pale[30:60, 30:60] = (150, 110, 190)  # a pale pink tile with one lilac nucleus
    out = render(lab, img, method="points2image", seed=1, device="cpu")
    assert out.shape == lab.shape + (3,) and out.dtype == np.uint8
    assert np.array_equal(out, render(lab, img, method="points2image", seed=1, device="cpu"))
    assert not np.array_equal(out, render(lab, img, method="points2image", seed=2, device="cpu"))
    h = rgb_to_hed(out)[..., 0]
    assert h[lab > 0].mean() > h[lab == 0].mean() + 0.04  # the nuclei are where the masks are (0.08 apart)
    other = render(lab, pale, method="points2image", seed=1, device="cpu")
    assert od_distance(other, pale) < od_distance(out, pale)  # another reference, other colours
