"""Tests of the NuClick-style click-to-mask network (napari_nucsynth.models.nuclick) and the ``nuclick`` fitting
method of napari_nucsynth.annotate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny import assert_channels_last_inference, synthetic_pair

from napari_nucsynth import annotate
from napari_nucsynth.annotate import ImageMaps, MaskFitter, NuClickFitter, NuClickMaps, fit_masks, get_fit_method
from napari_nucsynth.models import get_model, load_checkpoint, save_checkpoint
from napari_nucsynth.models import nuclick as N
from napari_nucsynth.points import centroids

#: A tiny network: 4 base channels, 2 down-samplings, 32-px patches
TINY = {"width": 4, "depth": 2, "patch": 32}


def _model(seed: int = 0, config=TINY) -> N.NuClickNet:
    torch.manual_seed(seed)
    return N.NuClickNet(config).eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("nuclick") / "tiny.pt"
    m = _model(1)
    save_checkpoint(path, kind="nuclick", config=m.config, state_dict=m.state_dict(), step=0)
    return path


@pytest.fixture(scope="module")
def crop(load_tile):
    """A dense 128-px crop (about 90 nuclei)."""
    img, lab = load_tile("TCGA-HE-7130-01Z-00-DX1")
    return img, lab, centroids(lab)


def _oracle_maps(fg: np.ndarray, patch: int = 32, radius: float = 7.0) -> NuClickMaps:
    """NuClickMaps whose 'network' is exact: a pixel is the clicked nucleus's where the image's foreground channel
    says nucleus, it is nearer the own click than any exclusion click (the maps' peaks) and within ``radius``."""
    channels = np.where(fg, 1.0, -1.0)[None].astype(np.float32)

    def predict(x: np.ndarray) -> np.ndarray:
        n, _, s, _ = x.shape
        yy, xx = np.mgrid[:s, :s]
        out = np.zeros((n, s, s), np.float32)
        for k in range(n):
            inc, exc = x[k, 1], x[k, 2]
            cy, cx = np.unravel_index(np.argmax(inc), inc.shape)
            p = (x[k, 0] > 0) & (inc >= exc) & ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2)
            out[k] = p
        return out

    return NuClickMaps(channels, predict, patch=patch, sigma=2.0, threshold=0.5, snap=4)


# ---- the network -------------------------------------------------------------------------------------------------
def test_network_shapes_channels_and_size():
    m = N.NuClickNet()
    assert m(torch.zeros(2, 5, 64, 64)).shape == (2, 1, 64, 64)
    n_bytes = sum(p.numel() for p in m.parameters()) * 4
    assert n_bytes < 20e6  # the shipped checkpoint's budget
    h = N.NuClickNet({"context": "hovernet"})
    assert N.in_channels(h.config) == 8 and h(torch.zeros(1, 8, 64, 64)).shape == (1, 1, 64, 64)
    t = _model()
    assert t(torch.zeros(3, 5, 32, 32)).shape == (3, 1, 32, 32)
    assert "nuclick" in __import__("napari_nucsynth.models", fromlist=["model_kinds"]).model_kinds()


@pytest.mark.parametrize("bad, match", [({"nope": 1}, "unknown nuclick config"), ({"context": "vgg"}, "context"),
                                        ({"patch": 36, "depth": 2}, "multiple of"), ({"width": 0}, "width"),
                                        ({"sigma": 0}, "sigma")])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        N.NuClickNet(bad)


# ---- click maps --------------------------------------------------------------------------------------------------
def test_click_maps_inclusion_and_exclusion():
    h, w, s = 100, 120, 32
    ch = np.ones((3, h, w), np.float32)
    pts = np.array([[40.3, 50.6], [45.0, 60.0], [40.0, 80.0], [90.0, 5.0], [2.0, 3.0]])
    x = N.patch_inputs(ch, pts, [0, 3, 4], patch=s, sigma=2.0)
    assert x.shape == (3, 5, s, s) and x.dtype == np.float32
    inc, exc = x[0, 3], x[0, 4]
    corner = np.floor(pts[0] + 0.5).astype(int) - s // 2
    # inclusion: the own click, peak at its pixel, the Gaussian at its exact position
    assert np.unravel_index(inc.argmax(), inc.shape) == tuple(np.floor(pts[0] + 0.5).astype(int) - corner)
    assert inc.max() == pytest.approx(np.exp(-(0.3**2 + 0.4**2) / 8), abs=1e-5)
    # exclusion: the other click inside the window (point 1), never the own one; point 2 is 30 px right, outside
    other = tuple(pts[1].astype(int) - corner)
    assert exc[other] == pytest.approx(1.0) and np.unravel_index(exc.argmax(), exc.shape) == other
    assert exc[tuple(np.floor(pts[0] + 0.5).astype(int) - corner)] < 0.01
    moved = pts.copy()
    moved[2] = [41.0, 70.0]  # still outside the window, rows [24, 56) x columns [35, 67): nothing changes
    assert np.array_equal(N.patch_inputs(ch, moved, [0], patch=s, sigma=2.0)[0], x[0])
    moved[2] = [41.0, 66.0]  # inside now
    assert N.patch_inputs(ch, moved, [0], patch=s, sigma=2.0)[0, 4, 41 - corner[0], 66 - corner[1]] == 1.0
    # a click with no other click near: an empty exclusion map; the image is 0 outside the image
    assert not x[1, 4].any()
    c3 = np.floor(pts[3] + 0.5).astype(int) - s // 2
    assert (x[1, :3, h - c3[0] :, :] == 0).all() and (x[1, :3, :, : -c3[1]] == 0).all()
    assert (x[1, :3, : h - c3[0], -c3[1] :] == 1).all()
    assert (x[2, :3, : -(np.floor(pts[4][0] + 0.5).astype(int) - s // 2), :] == 0).all()


def test_window_members_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-10, 210, (300, 2))
    corners = N.click_windows(pts[:50], 32)
    w, j = N.window_members(pts, corners, 32)
    pix = np.floor(pts + 0.5).astype(int)
    brute = {(a, b) for a in range(50) for b in range(300)
             if (corners[a] <= pix[b]).all() and (pix[b] < corners[a] + 32).all()}
    assert set(zip(w.tolist(), j.tolist())) == brute and np.all(np.diff(w) >= 0)


# ---- training ----------------------------------------------------------------------------------------------------
def test_targets_click_nuclei_of_the_crop(crop):
    img, lab, _ = crop
    t = N.targets(img, lab)
    k = len(t["own"])
    assert k == N.CLICKS_PER_CROP and t["masks"].shape == (k,) + lab.shape and t["points"].shape[1] == 2
    for i in range(k):
        ids = np.unique(lab[t["masks"][i]])
        assert ids.size == 1 and ids[0] > 0  # one nucleus (or the part nearer its click when clicked twice)
        c = t["points"][t["own"][i]]
        cy, cx = np.argwhere(lab == ids[0]).mean(0)
        assert np.hypot(c[0] - cy, c[1] - cx) < 5 * N.JITTER
    assert len(np.unique(t["own"])) == k
    again = N.targets(img, lab)  # seeded by the crop: reproducible
    assert all(np.array_equal(t[key], again[key]) for key in t)
    empty = N.targets(img, np.zeros_like(lab))
    assert empty["own"].size == 0 and empty["masks"].shape == (0,) + lab.shape


def test_double_clicks_split_the_target():
    lab = np.zeros((64, 64), np.uint32)
    yy, xx = np.mgrid[:64, :64]
    lab[(yy - 32) ** 2 + (xx - 32) ** 2 <= 100] = 1
    img = np.full((64, 64, 3), 200, np.uint8)
    split = 0
    for s in range(60):  # different crops (the targets are seeded by the crop's content)
        img[0, 0, 0] = s
        t = N.targets(img, lab)
        if len(t["points"]) == 2:  # the nucleus was clicked twice: its target is the part nearer its own click
            split += 1
            m = t["masks"][0]
            assert 0 < m.sum() < (lab > 0).sum()
            own, other = t["points"][t["own"][0]], t["points"][1 - t["own"][0]]
            yy2, xx2 = np.nonzero(m)
            assert np.all((yy2 - own[0]) ** 2 + (xx2 - own[1]) ** 2 <= (yy2 - other[0]) ** 2 + (xx2 - other[1]) ** 2)
    assert split > 0


def test_cpu_inference_takes_the_channels_last_path_and_computes_the_same_probabilities():
    """Patches run through the network on channels-last input at inference on the CPU (about twice as fast in
    oneDNN); the output is the plain layout's, which training uses."""
    model = N.build({**N.default_config(), **TINY}).eval()
    x = torch.rand(5, N.in_channels(TINY), TINY["patch"], TINY["patch"])
    assert_channels_last_inference(model, x)


def test_tiny_training_through_train_and_the_cli(crop, tmp_path, crop_pair_dirs):
    from napari_nucsynth.cli import main
    from napari_nucsynth.train import train

    img, lab, _ = crop
    updates = []
    res = train("nuclick", [img, img[::-1].copy()], [lab, lab[::-1].copy()], steps=2, out=tmp_path / "n.pt",
                config=TINY, device="cpu", seed=0, batch_size=2, crop=64, val_fraction=0.5, eval_every=2,
                on_update=updates.append)
    ck = load_checkpoint(res.path, kind="nuclick")
    assert ck["step"] == 2 and ck["config"]["patch"] == 32
    steps = [u for u in updates if u.kind == "step"]
    assert all(np.isfinite(u.losses["loss"]) and u.losses["patches"] > 0 for u in steps)
    assert {"aji", "pq", "dice"} <= set(res.metrics)  # validate: the held-out pair's true centroids fitted
    model = get_model("nuclick").build(ck["config"])
    model.load_state_dict(ck["state_dict"])
    # the same through the command line
    out = tmp_path / "cli.pt"
    code = main(["train", "--model", "nuclick", "--images", str(crop_pair_dirs[0]), "--labels",
                 str(crop_pair_dirs[1]), "--steps", "1", "--out", str(out), "--batch-size", "1", "--crop", "64",
                 "--val-fraction", "0", "--device", "cpu", "--config", json.dumps(TINY)])
    assert code == 0 and load_checkpoint(out, kind="nuclick")["step"] == 1


def test_a_refinement_starts_as_the_identity_and_fine_tunes_a_model_without_one(crop, tmp_path, tiny_checkpoint):
    from napari_nucsynth.train import train

    base = _model(1)
    refined = N.NuClickNet({**TINY, "refine": 4}).eval()
    refined.load_state_dict(base.state_dict(), strict=False)
    x = torch.rand(3, N.in_channels(TINY), TINY["patch"], TINY["patch"])
    with torch.no_grad():
        assert torch.equal(base(x), refined(x))  # zero output at the start: the same logits
    assert any(k.startswith("refine.") for k in refined.state_dict())
    img, lab, _ = crop
    res = train("nuclick", [img], [lab], steps=2, out=tmp_path / "r.pt", init=tiny_checkpoint,
                config={"refine": 4}, device="cpu", seed=0, batch_size=1, crop=64, val_fraction=0, lr=1e-2)
    ck = load_checkpoint(res.path, kind="nuclick")
    assert ck["config"]["refine"] == 4 and ck["config"]["width"] == TINY["width"]
    # the refinement learned something (its output layer left zero), the rest started from the checkpoint
    assert ck["state_dict"]["refine.2.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="change the network"):  # any other change of shape is still refused
        train("nuclick", [img], [lab], steps=1, out=tmp_path / "w.pt", init=tiny_checkpoint, config={"width": 8},
              device="cpu", seed=0, batch_size=1, crop=64, val_fraction=0)
    with pytest.raises(ValueError, match="refine"):
        N.NuClickNet({"refine": -1})


def test_a_training_step_lowers_the_loss_on_a_fixed_batch(crop):
    img, lab, _ = crop
    torch.manual_seed(0)
    model = N.NuClickNet(TINY)
    batch = N.collate([(img[:64, :64], lab[:64, :64], N.targets(img[:64, :64], lab[:64, :64]))], "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(8):
        loss, logs = N.loss(model, batch)
        first = logs["loss"] if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert N.loss(model, batch)[1]["loss"] < first


# ---- fitting -----------------------------------------------------------------------------------------------------
def test_every_click_inside_gets_its_nucleus_with_the_right_id(crop, tiny_checkpoint):
    img, lab, pts = crop
    pts = np.concatenate([pts, [[-5.0, 10.0], [60.0, 500.0]]])  # two points outside the image
    res = fit_masks(img, pts, method="nuclick", checkpoint=tiny_checkpoint, device="cpu", seed=0,
                    return_result=True)
    out = res.labels
    assert out.dtype == np.uint32 and out.shape == lab.shape and res.method == "nuclick"
    n_in = len(pts) - 2
    assert res.inside.tolist() == [True] * n_in + [False, False]
    ids = set(np.unique(out).tolist()) - {0}
    assert ids == set(range(1, n_in + 1))  # one nucleus per inside click, id = index + 1; none for the outside ones
    fitter = MaskFitter(img, method="nuclick", checkpoint=tiny_checkpoint, device="cpu", seed=0)
    assert isinstance(fitter, NuClickFitter)
    fitter.reset(pts)
    anchors = fitter._anchor[: n_in]
    assert np.array_equal(out[anchors[:, 0], anchors[:, 1]], np.arange(1, n_in + 1))
    assert np.array_equal(fitter.labels, out)
    assert not fit_masks(img, np.zeros((0, 2)), method="nuclick", checkpoint=tiny_checkpoint, device="cpu").any()


def test_incremental_edits_equal_a_full_refit(crop):
    img, lab, pts = crop
    model = _model(2)
    maps = annotate.nuclick_maps(model, img, device="cpu")
    probe = MaskFitter(maps, seed=0)
    probe.reset(pts)
    # a threshold at the median of the outputs at the clicks: network nuclei and clicks on background both occur
    thr = float(np.median([p[12:20, 12:20].mean() for p in probe._prob if p is not None]))
    maps = NuClickMaps(maps.channels, maps.predict, patch=maps.patch, sigma=maps.sigma, threshold=thr, snap=2)
    fitter = MaskFitter(maps, seed=0)
    fitter.reset(pts[:20])
    rng = np.random.default_rng(0)
    for step in range(40):
        op = step % 4
        if op == 0:
            patch = fitter.add(pts[20 + step // 4] + rng.normal(0, 2, 2) if 20 + step // 4 < len(pts)
                               else rng.uniform(-10, 138, 2))
        elif op == 1:
            i = int(rng.integers(len(fitter.points)))
            patch = fitter.move(i, fitter.points[i] + rng.normal(0, 6, 2))
        elif op == 2:
            i = int(rng.integers(len(fitter.points)))
            patch = fitter.move(i, [-3.0, 50.0] if step == 6 else pts[int(rng.integers(len(pts)))])
        else:
            patch = fitter.remove(int(rng.integers(len(fitter.points))))
        full = MaskFitter(maps, seed=0)
        full.reset(fitter.points, fitter.classes)
        assert np.array_equal(fitter.labels, full.labels), f"step {step}"
        if patch is not None:
            assert np.array_equal(fitter.labels[patch.rows, patch.cols], patch.values)
    assert fitter.fallback.any() and (~fitter.fallback & fitter.inside).any()  # both kinds of nucleus exercised
    state, labels = fitter.snapshot(), fitter.labels.copy()
    fitter.add([64.0, 64.0])
    fitter.restore(state)  # no labels given: composed again from the kept probabilities
    assert np.array_equal(fitter.labels, labels)


def test_composition_splits_a_nucleus_clicked_twice_and_falls_back_on_background():
    yy, xx = np.mgrid[:64, :64]
    fg = (yy - 30) ** 2 + (xx - 30) ** 2 <= 36
    maps = _oracle_maps(fg)
    res = MaskFitter(maps, seed=0).reset(np.array([[30.0, 27.0], [30.0, 33.0], [55.0, 10.0]]))
    a, b = res == 1, res == 2
    assert a.any() and b.any() and not (a & b).any()
    assert (a | b).sum() == fg.sum()  # the nucleus whole, split between the clicks at their midline
    assert np.all(xx[a] <= 30) and np.all(xx[b] >= 30)
    fitter = MaskFitter(maps, seed=0)
    fitter.reset(np.array([[30.0, 27.0], [30.0, 33.0], [55.0, 10.0]]))
    result = fitter.result()
    assert result.fallback.tolist() == [False, False, True]  # the click on background: a prior nucleus
    c = fitter.labels == 3
    assert c[55, 10] and 3 < c.sum() < 400 and not (c & fg).any()
    assert "1 click on background" in fitter.summary()


def test_auto_keeps_todays_choice_unless_a_nuclick_checkpoint(tiny_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setattr(N, "default_checkpoint", lambda: tmp_path / "absent.pt")
    assert get_fit_method("auto").name in ("hovernet", "watershed")
    assert get_fit_method("auto", tiny_checkpoint).name == "nuclick"
    assert not get_fit_method("nuclick").available()
    monkeypatch.setattr(N, "default_checkpoint", lambda: tiny_checkpoint)
    assert get_fit_method("auto").name == "nuclick"


def test_clear_errors(crop, tiny_checkpoint, tmp_path, monkeypatch):
    img, lab, pts = crop
    monkeypatch.setattr(N, "default_checkpoint", lambda: tmp_path / "absent.pt")
    annotate.clear_cache()
    with pytest.raises(ValueError, match="the shipped nuclick model .* is missing.*nucsynth train --model nuclick"):
        fit_masks(img, pts, method="nuclick", device="cpu")
    with pytest.raises(ValueError, match="does not exist"):
        fit_masks(img, pts, method="nuclick", checkpoint=tmp_path / "nope.pt", device="cpu")
    other = tmp_path / "hv.pt"
    save_checkpoint(other, kind="hovernet", config={}, state_dict={}, step=0)
    with pytest.raises(ValueError, match="holds a 'hovernet' model, not a 'nuclick' one"):
        fit_masks(img, pts, method="nuclick", checkpoint=other, device="cpu")
    with pytest.raises(ValueError, match="unknown nuclick parameter"):
        fit_masks(img, pts, method="nuclick", checkpoint=tiny_checkpoint, device="cpu", sigma=3)
    with pytest.raises(ValueError, match="pass points="):
        N.predict(_model(), img, "cpu")
    with pytest.raises(ValueError, match="fits from NuClickMaps"):
        NuClickFitter(ImageMaps(lab > 0, np.zeros(lab.shape, np.float32)))
    with pytest.raises(ValueError, match="image"):
        fit_masks(np.zeros((10, 10, 5), np.uint8), pts, method="nuclick", checkpoint=tiny_checkpoint)
    ctx = tmp_path / "ctx.pt"
    m = N.NuClickNet({**TINY, "context": "hovernet", "hovernet_checkpoint": str(tmp_path / "no_hovernet.pt")})
    save_checkpoint(ctx, kind="nuclick", config=m.config, state_dict=m.state_dict(), step=0)
    with pytest.raises(ValueError, match="HoVer-Net checkpoint .* is missing"):
        fit_masks(img, pts, method="nuclick", checkpoint=ctx, device="cpu")


def test_grey_and_float_images_are_converted(tiny_checkpoint):
    img, lab = synthetic_pair(2, size=64)
    pts = centroids(lab)
    a = fit_masks(img, pts, method="nuclick", checkpoint=tiny_checkpoint, device="cpu")
    b = fit_masks(img.astype(np.float32) / 255.0, pts, method="nuclick", checkpoint=tiny_checkpoint, device="cpu")
    assert np.array_equal(a, b)
    assert fit_masks(img[..., 0], pts, method="nuclick", checkpoint=tiny_checkpoint, device="cpu").max() == len(pts)


def test_tta_averages_the_dihedral_transforms_of_each_patch(crop, tiny_checkpoint):
    img, lab, pts = crop
    model = _model(2)
    x = N.patch_inputs(N.image_channels(model, img, "cpu"), pts, np.arange(6), patch=32, sigma=2.0)
    p1 = N.predict_patches(model, x)
    with torch.inference_mode():  # by hand: each transform through the network and back, averaged
        xt = torch.from_numpy(x)
        manual = [torch.sigmoid(model(torch.rot90(xt, k, (-2, -1)))) for k in range(4)]
        manual = [torch.rot90(q, -k, (-2, -1)) for k, q in enumerate(manual)]
        xf = torch.flip(xt, (-1,))
        manual += [torch.flip(torch.rot90(torch.sigmoid(model(torch.rot90(xf, k, (-2, -1)))), -k, (-2, -1)), (-1,))
                   for k in range(4)]
    p8 = N.predict_patches(model, x, tta=8)
    assert np.allclose(p8, torch.stack(manual).mean(0)[:, 0].numpy(), atol=1e-5)  # the group, in any order
    assert not np.allclose(p1, p8, atol=1e-3)  # a random network is not equivariant: the average differs
    p2 = N.predict_patches(model, x, tta=2)
    with torch.inference_mode():
        flip = torch.flip(torch.sigmoid(model(torch.flip(xt, (-1,)))), (-1,))[:, 0].numpy()
    assert np.allclose(p2, (p1 + flip) / 2, atol=1e-5)
    for bad in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="tta must be an integer"):
            N.predict_patches(model, x, tta=bad)
    # as the method's parameter: the fit changes, the ids stay one per click; a bad value is refused by name
    a = fit_masks(img, pts, method="nuclick", checkpoint=tiny_checkpoint, device="cpu", seed=0)
    b = fit_masks(img, pts, method="nuclick", checkpoint=tiny_checkpoint, device="cpu", seed=0, tta=4)
    assert set(np.unique(b).tolist()) - {0} == set(range(1, len(pts) + 1)) and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="tta must lie in"):
        fit_masks(img, pts, method="nuclick", checkpoint=tiny_checkpoint, device="cpu", tta=9)


def test_a_checkpoints_own_tta_is_the_default(crop, tiny_checkpoint, tmp_path):
    from napari_nucsynth.models import load_checkpoint

    img, lab, pts = crop
    ck = load_checkpoint(tiny_checkpoint, kind="nuclick")
    with4 = tmp_path / "tta4.pt"
    save_checkpoint(with4, kind="nuclick", config={**ck["config"], "tta": 4}, state_dict=ck["state_dict"], step=0)
    kw = {"method": "nuclick", "device": "cpu", "seed": 0}
    assert np.array_equal(fit_masks(img, pts, checkpoint=with4, **kw),
                          fit_masks(img, pts, checkpoint=tiny_checkpoint, tta=4, **kw))
    assert np.array_equal(fit_masks(img, pts, checkpoint=with4, tta=1, **kw),  # a given tta wins
                          fit_masks(img, pts, checkpoint=tiny_checkpoint, **kw))
    bad = tmp_path / "tta9.pt"
    save_checkpoint(bad, kind="nuclick", config={**ck["config"], "tta": 9}, state_dict=ck["state_dict"], step=0)
    with pytest.raises(ValueError, match="'tta' must be at most 8"):
        fit_masks(img, pts, checkpoint=bad, **kw)
