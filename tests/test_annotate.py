"""Tests of napari_nucsynth.annotate: masks fitted to the nuclei under clicked points of a real image."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny import synthetic_pair

from napari_nucsynth import annotate
from napari_nucsynth._sample_data import load_monuseg_crop
from napari_nucsynth.annotate import (
    FitResult,
    ImageMaps,
    MaskFitter,
    clear_cache,
    fit_masks,
    fit_methods,
    get_fit_method,
    image_maps,
)
from napari_nucsynth.masks import ShapePrior, sample_masks
from napari_nucsynth.metrics import aji
from napari_nucsynth.points import centroids


@pytest.fixture(scope="module")
def pair():
    img, lab = synthetic_pair(3, size=96)
    return img, lab, centroids(lab)


@pytest.fixture(scope="module")
def crop():
    """The sample crop's top-left 256 px (hovernet runs on it in about a second)."""
    img, lab = load_monuseg_crop()
    img, lab = img[:256, :256], lab[:256, :256]
    return img, lab, centroids(lab)


@pytest.fixture(scope="module")
def crop_hovernet_maps(crop):
    if not get_fit_method("hovernet").available():
        pytest.skip("the shipped hovernet model is absent")
    return image_maps(crop[0], method="hovernet", device="cpu")


def _anchor_ids(labels, pts):
    r, c = np.floor(pts + 0.5).astype(int).T
    return labels[r, c]


# ---- methods ----------------------------------------------------------------------------------------------------
def test_registry_lists_the_methods_and_auto_resolves():
    assert {"nuclick", "hovernet", "watershed"} <= set(fit_methods())
    auto = get_fit_method("auto")
    # the first available of nuclick (shipped), hovernet (shipped), watershed (no model)
    expected = next(m for m in ("nuclick", "hovernet", "watershed") if get_fit_method(m).available())
    assert auto.name == expected
    assert get_fit_method("nuclick").available() and auto.name == "nuclick"  # the shipped model is in the package
    assert get_fit_method("watershed").available()
    with pytest.raises(ValueError, match="unknown fitting method 'nope'.*watershed"):
        get_fit_method("nope")
    with pytest.raises(ValueError, match="method"):
        get_fit_method(3)


def test_a_new_method_is_one_registered_class(pair):
    img, lab, pts = pair

    @annotate.register_fit_method("_truth")
    class Truth:
        name, description, needs_checkpoint, params = "_truth", "the true foreground", False, {}

        def available(self, checkpoint=None):
            return True

        def prepare(self, image, **kw):
            return ImageMaps(lab > 0, np.zeros(lab.shape, np.float32), method="_truth")

    try:
        out = fit_masks(img, pts, method="_truth")
        assert aji(lab, out) > 0.95  # discs of one nucleus each: the true foreground split at the clicks
    finally:
        annotate._REGISTRY.pop("_truth")
        clear_cache()


# ---- the contract -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["watershed", "hovernet"])
def test_id_is_point_index_plus_one_and_every_point_gets_a_nucleus(method, pair, crop, request):
    if method == "hovernet":
        request.getfixturevalue("crop_hovernet_maps")
        img, lab, pts = crop
    else:
        img, lab, pts = pair
    out = fit_masks(img, pts, method=method, device="cpu", seed=0)
    assert out.dtype == np.uint32 and out.shape == lab.shape
    ids = np.unique(out[out > 0])
    assert set(ids.tolist()) == set(range(1, len(pts) + 1))
    # each true centroid lies in the nucleus fitted to it (it anchors there, or its fallback is centred there)
    assert np.mean(_anchor_ids(out, pts) == np.arange(1, len(pts) + 1)) > 0.9


def test_hovernet_follows_the_nuclei_better_than_the_prior(crop, crop_hovernet_maps):
    img, lab, pts = crop
    fitted = fit_masks(img, pts, method="hovernet", device="cpu", seed=0)
    prior = sample_masks(pts, lab.shape, seed=0)
    assert aji(lab, fitted) > 0.65 > aji(lab, prior) + 0.1


def test_points_outside_the_image_get_no_nucleus(pair):
    img, lab, pts = pair
    extra = np.array([[-40.0, 10.0], [10.0, 96.6], [500.0, 500.0]])
    res = fit_masks(img, np.concatenate([pts, extra]), method="watershed", seed=0, return_result=True)
    assert isinstance(res, FitResult)
    n = len(pts)
    assert res.inside.tolist() == [True] * n + [False] * 3 and res.n_outside == 3
    assert not np.isin(np.arange(n + 1, n + 4), res.labels).any()
    assert np.array_equal(res.labels, fit_masks(img, pts, method="watershed", seed=0))
    assert "3 points outside the image" in res.summary()


def test_empty_points_give_empty_labels(pair):
    img = pair[0]
    for empty in ([], np.zeros((0, 2)), np.zeros((0, 3))):
        out = fit_masks(img, empty, method="watershed")
        assert out.dtype == np.uint32 and out.shape == img.shape[:2] and not out.any()


def test_click_on_background_gets_a_small_prior_nucleus(pair):
    img, lab, pts = pair
    maps = image_maps(img, method="watershed")
    # the background pixel furthest from any foreground
    from scipy import ndimage as ndi

    far = np.unravel_index(np.argmax(ndi.distance_transform_edt(~maps.foreground)), lab.shape)
    clicks = np.concatenate([pts, [far]])
    res = fit_masks(img, clicks, method="watershed", seed=0, return_result=True)
    assert res.fallback.tolist() == [False] * len(pts) + [True] and res.n_fallback == 1
    mine = res.labels == len(clicks)
    assert mine[far] and 10 <= mine.sum() <= 400
    assert not (mine & maps.foreground).any()  # drawn on background only
    assert "1 click on background got a nucleus from the shape prior" in res.summary()
    # seeded: the same click and seed give the same nucleus; another seed another one
    again = fit_masks(img, clicks, method="watershed", seed=0)
    other = fit_masks(img, clicks, method="watershed", seed=1)
    assert np.array_equal(again, res.labels) and not np.array_equal(other == len(clicks), mine)


def test_two_clicks_on_one_nucleus_split_it(pair):
    img, lab, pts = pair
    one = fit_masks(img, pts[:1], method="watershed")
    nucleus = one == 1
    rows, cols = np.nonzero(nucleus)
    # two clicks 2/3 of the way from the centre to either end of the nucleus's longer extent
    axis = 0 if np.ptp(rows) >= np.ptp(cols) else 1
    coord = (rows, cols)[axis]
    lo, hi = pts[0, axis] + (np.array([coord.min(), coord.max()]) - pts[0, axis]) * 0.6
    a, b = pts[0].copy(), pts[0].copy()
    a[axis], b[axis] = lo, hi
    two = fit_masks(img, [a, b], method="watershed")
    assert (two == 1).sum() > 0 and (two == 2).sum() > 0
    # together about the one nucleus
    both = two > 0
    assert (both & nucleus).sum() / (both | nucleus).sum() > 0.8


def test_two_points_on_one_pixel_the_earlier_keeps_it(pair):
    img, _, pts = pair
    out = fit_masks(img, [pts[0], pts[0] + 0.1], method="watershed")
    assert (out == 1).sum() > 0 and (out == 2).sum() == 0


# ---- inputs -----------------------------------------------------------------------------------------------------
def test_image_forms_follow_the_conversion_rule(pair):
    img, _, pts = pair
    ref = fit_masks(img, pts, method="watershed", seed=0)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], 2)
    assert np.array_equal(fit_masks(rgba, pts, method="watershed", seed=0), ref)
    assert np.array_equal(fit_masks(img.astype(np.uint16) * 257, pts, method="watershed", seed=0), ref)
    assert np.array_equal(fit_masks(img / 255.0, pts, method="watershed", seed=0), ref)
    grey = fit_masks(img.mean(2).astype(np.uint8), pts, method="watershed", seed=0)
    assert grey.shape == img.shape[:2] and grey.dtype == np.uint32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image": np.zeros((20, 20, 3), np.int32)}, "image must be uint8"),
        ({"image": np.zeros((20, 20, 2), np.uint8)}, "image must be an RGB image"),
        ({"image": np.zeros((2, 20, 20, 3), np.uint8)}, "image must be an RGB image"),
        ({"image": np.full((20, 20, 3), 2.0)}, "image is a float image"),
        ({"image": np.zeros((0, 20, 3), np.uint8)}, "image is empty"),
        ({"points": np.zeros((3, 3))}, "points must be an .N, 2. array"),
        ({"points": [[1.0, np.nan]]}, "points holds NaN"),
        ({"classes": [0, 1]}, "classes must hold one class per point"),
        ({"classes": [-1]}, "classes must be non-negative"),
        ({"method": "nope"}, "unknown fitting method"),
        ({"sigma": -1.0}, "sigma must lie in"),
        ({"bogus": 1}, "unknown watershed parameter"),
        ({"seed": -3}, "seed must be a non-negative integer"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(kwargs, match):
    args = {"image": np.full((20, 20, 3), 200, np.uint8), "points": [[5.0, 5.0]], "method": "watershed"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fit_masks(args.pop("image"), args.pop("points"), **args)


def test_missing_checkpoint_is_a_value_error(pair):
    with pytest.raises(ValueError, match="does not exist"):
        fit_masks(pair[0], pair[2], method="hovernet", checkpoint="/nonexistent/model.pt")


def test_should_stop_cancels_the_image_pass(pair):
    clear_cache()
    with pytest.raises(InterruptedError):
        fit_masks(pair[0], pair[2], method="watershed", should_stop=lambda: True)


# ---- the one-time pass is cached --------------------------------------------------------------------------------
def test_the_image_pass_is_cached_by_content(pair, monkeypatch):
    clear_cache()
    img = pair[0]
    calls = []
    real = annotate.WatershedFit.prepare

    def counting(self, image, **kw):
        calls.append(1)
        return real(self, image, **kw)

    monkeypatch.setattr(annotate.WatershedFit, "prepare", counting)
    seen = []
    a = MaskFitter(img, method="watershed")
    b = MaskFitter(img.copy(), method="watershed", progress=lambda d, t, w: seen.append(w))  # same content
    assert a.maps is b.maps and len(calls) == 1 and seen == ["cached"]
    MaskFitter(img, method="watershed", threshold_scale=1.2)  # other parameters: another pass
    c = img.copy()
    c[0, 0] ^= 1
    MaskFitter(c, method="watershed")  # another image
    assert len(calls) == 3
    clear_cache()
    MaskFitter(img, method="watershed")
    assert len(calls) == 4


# ---- incremental == batch ---------------------------------------------------------------------------------------
def _edit_and_compare(fitter, image, pts, method, rng, n_edits=40):
    fitter.reset(pts[: len(pts) // 2])
    for k in range(len(pts) // 2, len(pts)):
        before = fitter.labels.copy()
        patch = fitter.add(pts[k] + rng.normal(0, 2, 2))
        _check_patch(before, fitter.labels, patch)
    for _ in range(n_edits):
        i = int(rng.integers(len(fitter.points)))
        before = fitter.labels.copy()
        r = rng.random()
        if r < 0.5:
            patch = fitter.move(i, fitter.points[i] + rng.normal(0, 6, 2))
        elif r < 0.6:
            patch = fitter.move(i, rng.uniform(0, image.shape[0], 2))  # anywhere, background included
        elif r < 0.7:
            patch = fitter.add(rng.uniform(-10, image.shape[0] + 10, 2))  # may fall outside or on background
        else:
            patch = fitter.remove(i)
        _check_patch(before, fitter.labels, patch)
        batch = fit_masks(image, fitter.points, method=method, device="cpu", seed=5)
        assert np.array_equal(fitter.labels, batch)


def _check_patch(before, after, patch):
    """Everything that changed lies in the patch, and the patch holds the new values."""
    changed = before != after
    if patch is None:
        assert not changed.any()
        return
    outside = changed.copy()
    outside[patch.rows, patch.cols] = False
    assert not outside.any()
    assert np.array_equal(after[patch.rows, patch.cols], patch.values)


def test_incremental_equals_batch_watershed(pair):
    img, _, pts = pair
    _edit_and_compare(MaskFitter(img, method="watershed", seed=5), img, pts, "watershed", np.random.default_rng(0))


def test_incremental_equals_batch_hovernet(crop, crop_hovernet_maps):
    img, _, pts = crop
    fitter = MaskFitter(img, method="hovernet", device="cpu", seed=5)
    assert MaskFitter(img.copy(), method="hovernet", device="cpu").maps is fitter.maps  # the cached pass
    _edit_and_compare(fitter, img, pts, "hovernet", np.random.default_rng(1), n_edits=60)


def test_sampler_interface_and_undo(pair):
    img, _, pts = pair
    f = MaskFitter(img, method="watershed", seed=2)
    f.reset(pts)
    snap, labels = f.snapshot(), f.labels.copy()
    f.set_points([0, 1], pts[:2] + 3)
    f.add_points(pts[:2] + [[0, 30], [30, 0]], classes=[1, 2])
    assert f.classes[-2:].tolist() == [1, 2]
    out = f.remove_points([0, 3])
    assert out is f.labels and len(f.points) == len(pts)
    assert np.array_equal(f.labels, fit_masks(img, f.points, classes=f.classes, method="watershed", seed=2))
    f.restore(snap)
    assert np.array_equal(f.labels, labels) and np.array_equal(f.points, pts)
    f.set_points([0], pts[:1] + 5)
    f.restore(snap, labels=labels)
    assert np.array_equal(f.labels, labels)
    with pytest.raises(ValueError, match="indices must lie in"):
        f.move(len(pts), [1.0, 1.0])
    with pytest.raises(ValueError, match="labels must have the image's shape"):
        f.restore(snap, labels=np.zeros((3, 3)))


# ---- ShapePrior.from_image --------------------------------------------------------------------------------------
def test_shape_prior_from_image():
    img, lab = load_monuseg_crop()
    prior = ShapePrior.from_image(img, segmenter="watershed", seed=0)
    assert "watershed" in prior.source
    m = sample_masks(centroids(lab), lab.shape, prior=prior, seed=0)
    assert m.max() > 0
    # a function as the segmenter: the true labels give the prior fitted on them
    fitted = ShapePrior.from_image(img, segmenter=lambda im: lab, calibrate=False)
    assert fitted.pooled.intercept == pytest.approx(ShapePrior.fit(lab, calibrate=False).pooled.intercept)
    with pytest.raises(ValueError, match="found 0 nuclei"):
        ShapePrior.from_image(np.full((64, 64, 3), 240, np.uint8), segmenter="watershed")
    with pytest.raises(ValueError, match="image must be uint8"):
        ShapePrior.from_image(np.zeros((64, 64, 3), np.int64), segmenter="watershed")


def test_masks_reexports_the_fitting_api():
    from napari_nucsynth import masks

    assert masks.fit_masks is fit_masks and masks.MaskFitter is MaskFitter
    with pytest.raises(AttributeError):
        masks.no_such_name  # noqa: B018
