"""DAFF-GAN's points -> masks model (models/daff.py) and ``masks.sample_masks(method="daff")``: the input maps of a
layout, the instance step (watershed seeded at the points), seeded sampling, training through the core and the
generic loop (with resume), the validation and preview hooks, checkpoints and the errors of a missing model. Tiny
models and crops only."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from _tiny import lively, stopped_then_resumed_equals_straight
from scipy import ndimage as ndi

from napari_nucsynth.masks import distance_map, sample_masks
from napari_nucsynth.models import daff as D
from napari_nucsynth.models import get_model, load_checkpoint, model_kinds, save_checkpoint
from napari_nucsynth.points import centroids

TILE = "TCGA-A7-A13F-01Z-00-DX1"
#: inputs multiples of 8, a few channels, a one-scale discriminator
TINY = {"ngf": 4, "ngf_max": 16, "n_down": 2, "n_blocks": 2, "n_local_blocks": 1, "ndf": 8, "d_layers": 2,
        "num_d": 1, "pad": 8, "tile": 96, "halo": 16, "blend": 8}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return lively(D.build(dict(TINY)))


def _points(n=25, size=64, seed=0):
    return np.random.default_rng(seed).uniform(2, size - 2, (n, 2))


# ----------------------------------------------------------------------------------------------------------------
# input maps and targets


def test_point_maps():
    pts = np.array([[5.2, 5.0], [5.4, 4.8], [20.0, 30.0], [-3.0, 4.0], [10.0, 25.0]])
    m = D.point_maps(pts, (32, 40), classes=[0, 1, 2, 0, 7], n_classes=3, sigma=2.0, radius=6.0)
    assert m["heat"].shape == m["near"].shape == m["cell"].shape == (32, 40) and m["classes"].shape == (3, 32, 40)
    assert m["heat"][5, 5] == 1 and m["near"][20, 30] == 0 and m["heat"].max() <= 1
    assert m["heat"][5, 8] == pytest.approx(math.exp(-9 / 8), rel=1e-5)
    assert m["near"][5, 8] == pytest.approx(3 / 12) and m["near"][31, 0] == 1  # clipped at 2 radius
    # the earlier of two points on one pixel keeps it; a point outside the canvas is left out
    assert m["cell"][5, 5] == 0 and not (m["cell"] == 1).any() and not (m["cell"] == 3).any()
    # cells: the nearest point within the radius (Voronoi border between the points at (20, 30) and (10, 25))
    assert m["cell"][19, 30] == 2 and m["cell"][11, 25] == 4 and m["cell"][5, 11] == 0 and m["cell"][5, 12] == -1
    # classes painted on the cells, one-hot; class 7 is beyond n_classes: no channel
    assert m["classes"][0][5, 5] == 1 and m["classes"][2][20, 30] == 1
    assert m["classes"][:, 10, 25].sum() == 0 and np.array_equal(m["classes"].sum(0) > 0, np.isin(m["cell"], [0, 2]))
    e = D.point_maps(np.zeros((0, 2)), (8, 8))
    assert not e["heat"].any() and (e["cell"] == -1).all() and (e["near"] == 1).all()
    with pytest.raises(ValueError, match="classes"):
        D.point_maps(pts, (32, 40), classes=[0, 1])


def test_targets_from_labels(load_tile):
    _, lab = load_tile(TILE)
    lab = lab[:64, :64]
    t = get_model("daff").targets(None, lab)
    assert set(t) == {"heat", "near", "cell", "fg", "dist"}
    assert all(v.shape == (1, 64, 64) for v in t.values()) and t["cell"].dtype == np.int64
    assert np.array_equal(t["fg"][0] > 0, lab > 0) and np.array_equal(t["dist"][0], distance_map(lab))
    rc = np.floor(centroids(lab) + 0.5).astype(int)
    assert (t["heat"][0][rc[:, 0], rc[:, 1]] == 1).all()  # the points are the labels' centroids


# ----------------------------------------------------------------------------------------------------------------
# sampling


def test_instances_are_a_watershed_seeded_at_the_points(monkeypatch):
    """Given the network's maps, every point gets the one nucleus its marker floods: two touching discs in one
    foreground blob are split where the distance map has its valley; foreground beyond ``max_radius`` of every
    point is dropped."""
    true = np.zeros((48, 48), np.uint32)
    yy, xx = np.mgrid[:48, :48]
    true[(yy - 20) ** 2 + (xx - 16) ** 2 <= 49] = 1
    true[((yy - 20) ** 2 + (xx - 28) ** 2 <= 49) & (true == 0)] = 2
    fg = true > 0
    fg[19:22, 35:] = True  # a strip of foreground running away from the second disc
    fg[17:20, 13:16] = False  # speckle: a small hole inside the first
    pad = 8

    def fake_maps(model, points, shape, **kw):
        cpts = points + pad
        marks = np.zeros((48 + 2 * pad, 48 + 2 * pad), bool)
        rc = np.floor(cpts + 0.5).astype(int)
        marks[rc[:, 0], rc[:, 1]] = True
        return {"prob": np.pad(fg * 0.9, pad).astype(np.float32), "dist": np.pad(distance_map(true), pad),
                "near": ndi.distance_transform_edt(~marks), "points": cpts, "pad": pad}

    monkeypatch.setattr(D, "predict_maps", fake_maps)
    model = D.build({**TINY, "max_radius": 10.0})
    pts = np.array([[20.0, 28.0], [20.0, 16.0], [20.2, 16.1], [2.0, 2.0]])
    out = D.sample(model, pts, (48, 48), seed=0)
    assert out.dtype == np.uint32 and out.shape == (48, 48)
    iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
    assert iou(out == 1, true == 2) > 0.9 and iou(out == 2, true == 1) > 0.9  # id = point index + 1
    assert ((out == 1) & (true == 1)).sum() <= 3 and ((out == 2) & (true == 2)).sum() <= 3  # split at the valley
    assert (out[17:20, 13:16] == 2).all()  # the hole is filled
    assert not (out == 3).any()  # shares its pixel with point 1, which keeps it
    assert (out == 4).sum() == 1  # a point on background keeps its own pixel: every point has a nucleus
    assert (out[19:22, 35:38] == 1).all() and not out[19:22, 39:].any()  # the strip, cut at max_radius


def test_a_nucleus_cut_by_the_image_edge_keeps_one_piece():
    """Cropping the canvas to the image can cut a nucleus that left the image and came back: the piece with its
    point stays (even when smaller), a nucleus whose point is outside keeps its largest piece."""
    lab = np.zeros((10, 12), np.int64)
    lab[0:2, 0:6] = 1  # point 0 at (1, 1): this piece stays
    lab[5:9, 0:5] = 1  # a larger piece of nucleus 1 elsewhere goes
    lab[0:3, 9:12] = 2  # point 1 outside the image: its larger piece stays
    lab[8:10, 10:12] = 2
    lab[4, 8] = 3  # whole
    out = D._one_piece(lab, np.array([[1, 1], [-3, 20], [4, 8]]))
    assert np.array_equal(out == 1, np.pad(np.ones((2, 6), bool), ((0, 8), (0, 6))))
    assert (out == 2).sum() == 9 and out[0, 10] == 2 and out[4, 8] == 3
    assert np.array_equal(D._one_piece(out, np.array([[1, 1], [-3, 20], [4, 8]])), out)


def test_sample_is_seeded_and_one_connected_nucleus_per_point(tiny):
    pts = np.concatenate([_points(), [[30.0, -3.0], [-40.0, 10.0]]])  # one just outside, one far outside
    a = D.sample(tiny, pts, (64, 72), seed=1)
    assert a.dtype == np.uint32 and a.shape == (64, 72)
    assert np.array_equal(a, D.sample(tiny, pts, (64, 72), seed=1))
    assert not np.array_equal(a, D.sample(tiny, pts, (64, 72), seed=2))  # latents and noise come from the seed
    assert a.max() <= len(pts) and not (a == len(pts)).any()
    for i, (r, c) in enumerate(np.floor(pts[:25] + 0.5).astype(int)):
        assert a[r, c] == i + 1  # each point's pixel belongs to its nucleus ...
        assert ndi.label(a == i + 1)[1] == 1  # ... which is one connected region
    assert not tiny.training
    assert not D.sample(tiny, np.zeros((0, 2)), (10, 12), seed=0).any()
    with pytest.raises(ValueError, match="classes"):
        D.sample(tiny, pts, (64, 72), classes=[1, 2])
    # windows (with a progress report and cancel) give the same kind of output
    calls = []
    big = D.sample(tiny, _points(120, 160, seed=3), (160, 150), seed=0, progress=lambda i, n, m: calls.append(n))
    assert calls[0] > 1 and big.max() > 0
    with pytest.raises(InterruptedError):
        D.sample(tiny, _points(), (64, 64), seed=0, tile=96, should_stop=lambda: True)


def test_typed_model_uses_the_classes():
    torch.manual_seed(0)
    typed = lively(D.build({**TINY, "n_classes": 2}))
    pts = _points()
    a = D.predict_maps(typed, pts, (64, 64), classes=np.zeros(len(pts), int), seed=0)["prob"]
    b = D.predict_maps(typed, pts, (64, 64), classes=np.ones(len(pts), int), seed=0)["prob"]
    assert np.abs(a - b).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# training


def _batch(lab, n=2):
    t = get_model("daff").targets(None, lab)
    batch = {k: torch.from_numpy(np.stack([v] * n)) for k, v in t.items()}
    batch["image"] = torch.zeros(n, 3, *lab.shape)
    return batch


def test_losses_move_in_the_right_direction(load_tile):
    from napari_nucsynth.models import gan

    _, lab = load_tile(TILE)
    batch = _batch(lab[:64, :64])
    torch.manual_seed(0)
    model = D.build(dict(TINY)).train()
    opts = get_model("daff").optimizers(model, 1e-3)

    def losses():
        torch.manual_seed(123)
        with torch.no_grad():
            return gan.discriminator_loss(model, batch)[1]["d_loss"], gan.generator_loss(model, batch)[1]

    d0, _ = losses()
    for _ in range(3):
        torch.manual_seed(123)
        loss, _ = gan.discriminator_loss(model, batch)
        opts["d"].zero_grad()
        loss.backward()
        opts["d"].step()
    d1, g0 = losses()
    assert d1 < d0
    for _ in range(3):
        torch.manual_seed(123)
        loss, logs = gan.generator_loss(model, batch)
        opts["g"].zero_grad()
        loss.backward()
        opts["g"].step()
    _, g1 = losses()
    assert g1["g_l1"] < g0["g_l1"] and g1["loss"] < g0["loss"]
    assert set(logs) == {"loss", "g_gan", "g_fm", "g_l1"}  # no perceptual loss: the outputs are not images
    logs = get_model("daff").train_step(model, batch, opts, 0)
    assert {"d_loss", "loss"} <= set(logs) and all(np.isfinite(v) for v in logs.values())


def test_train_checkpoint_resume_validation_and_preview(load_tile, tmp_path):
    from napari_nucsynth.train import train

    img, lab = load_tile(TILE)
    imgs, labs = [img[:128, :128], img[128:256, :128]], [lab[:128, :128], lab[128:256, :128]]
    stopped_then_resumed_equals_straight("daff", imgs, labs, tmp_path, TINY, batch_size=2, crop=64, val_fraction=0,
                                         lr=2e-4)
    events = []
    res3 = train("daff", imgs, labs, steps=1, out=tmp_path / "d.pt", config=dict(TINY), batch_size=1, crop=64,
                 val_fraction=0.5, eval_every=1, preview_every=1, on_update=events.append)
    m = res3.metrics
    assert {"area_ks", "dice", "aji", "with_nucleus"} <= set(m)
    assert 0 <= m["area_ks"] <= 1 and 0 <= m["dice"] <= 1 and m["with_nucleus"] == 1.0
    prev = [e.image for e in events if e.kind == "preview"]
    assert prev and prev[0].dtype == np.uint8 and prev[0].shape == (128, 260, 3)  # real | sampled
    with pytest.raises(ValueError, match="does not segment"):
        get_model("daff").predict(None, img, "cpu")


def test_build_rejects_bad_config():
    assert "daff" in model_kinds()
    with pytest.raises(ValueError, match="unknown daff config"):
        D.build({"style_dim": 3})
    with pytest.raises(ValueError, match="lambda_perc"):
        D.build({"lambda_perc": 1.0})
    with pytest.raises(ValueError, match="radius"):
        D.build({"radius": 0})
    with pytest.raises(ValueError, match="threshold"):
        D.build({"threshold": 1.5})


# ----------------------------------------------------------------------------------------------------------------
# masks.sample_masks(method="daff")


def test_sample_masks_method_daff(tmp_path, tiny, monkeypatch):
    from napari_nucsynth.models.gan import shipped_state_dict

    pts = _points()
    p = save_checkpoint(tmp_path / "d.pt", kind="daff", config=tiny.config, state_dict=tiny.state_dict(), step=0)
    out = sample_masks(pts, (64, 64), method="daff", checkpoint=p, seed=4, device="cpu")
    assert np.array_equal(out, D.sample(tiny, pts, (64, 64), seed=4))
    p2 = save_checkpoint(tmp_path / "s.pt", kind="daff", config=tiny.config, state_dict=shipped_state_dict(tiny),
                         step=0)
    assert np.array_equal(sample_masks(pts, (64, 64), method="daff", checkpoint=p2, seed=4, device="cpu"), out)
    # typed input to an untyped model: checked, then sampled alike
    cls = np.arange(len(pts)) % 3
    assert np.array_equal(sample_masks(pts, (64, 64), classes=cls, method="daff", checkpoint=p, seed=4), out)
    # the default stays the shape prior
    assert np.array_equal(sample_masks(pts, (64, 64), seed=4), sample_masks(pts, (64, 64), method="prior", seed=4))
    with pytest.raises(ValueError, match="method must be"):
        sample_masks(pts, (64, 64), method="gan")
    with pytest.raises(ValueError, match="prior="):
        sample_masks(pts, (64, 64), method="daff", prior=object(), checkpoint=p)
    with pytest.raises(ValueError, match="checkpoint= is for method='daff'"):
        sample_masks(pts, (64, 64), checkpoint=p)
    with pytest.raises(ValueError, match="not a 'daff'"):
        sample_masks(pts, (64, 64), method="daff",
                     checkpoint=save_checkpoint(tmp_path / "h.pt", kind="sian", config={}, state_dict={}, step=0))
    # no shipped model: the message says how to train one; bad input is reported before that
    monkeypatch.setattr(D, "default_checkpoint", lambda: tmp_path / "none.pt")
    with pytest.raises(ValueError, match="train_daff.py"):
        sample_masks(pts, (64, 64), method="daff")
    with pytest.raises(ValueError, match="points"):
        sample_masks(np.zeros((3, 3)), (64, 64), method="daff")


def test_prior_method_does_not_import_torch():
    code = ("import sys; from napari_nucsynth.masks import sample_masks; "
            "sample_masks([[5.0, 5.0]], (16, 16), method='prior', seed=0); "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False, capture_output=True).returncode == 0
