"""Tests of the mask sampler, the shape prior, the incremental sampler and the instance descriptors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ks_2samp
from skimage.measure import label as cc_label
from skimage.measure import regionprops_table

from napari_nucsynth.masks import (
    MaskSampler,
    ShapePrior,
    descriptors,
    direction_map,
    distance_map,
    draw_shapes,
    hv_maps,
    rasterize,
    sample_masks,
    semantic_map,
)

TILE = "TCGA-18-5592-01Z-00-DX1"  # a whole tile's labels (480 nuclei)


def _real(load_tile, stem=TILE):
    _, lab = load_tile(stem)
    p = regionprops_table(lab.astype(np.int64), properties=("label", "area", "eccentricity", "centroid"))
    return lab, p, np.c_[p["centroid-0"], p["centroid-1"]]


def test_one_nucleus_per_point_on_a_real_tile(load_tile):
    lab, _, pts = _real(load_tile)
    m = sample_masks(pts, lab.shape, seed=0)
    assert m.dtype == np.uint32 and m.shape == lab.shape
    ids = np.unique(m[m > 0])
    assert ids.min() >= 1 and ids.max() <= len(pts)
    assert len(ids) / len(pts) >= 0.995
    # id = point index + 1: each point's own pixel carries its id
    r, c = np.floor(pts + 0.5).astype(int).T
    assert np.mean(m[r, c] == np.arange(1, len(pts) + 1)) > 0.99
    # neighbours touch as in real tissue: some 4-adjacent pixels hold two different ids
    a, b = m[:, :-1], m[:, 1:]
    assert np.sum((a > 0) & (b > 0) & (a != b)) > 50
    # nearly every nucleus is one connected piece
    pieces = [cc_label(m == i).max() for i in ids[:200]]
    assert np.mean(np.array(pieces) == 1) > 0.97


def test_seed_reproducible(load_tile):
    lab, _, pts = _real(load_tile)
    a = sample_masks(pts, lab.shape, seed=3)
    assert np.array_equal(a, sample_masks(pts, lab.shape, seed=3))
    assert not np.array_equal(a, sample_masks(pts, lab.shape, seed=4))
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    assert np.array_equal(sample_masks(pts, lab.shape, seed=g1), sample_masks(pts, lab.shape, seed=g2))


def test_prior_fitted_on_a_tile_reproduces_its_statistics(load_tile):
    lab, real, pts = _real(load_tile)
    prior = ShapePrior.fit(lab, seed=0)
    m = sample_masks(pts, lab.shape, prior=prior, seed=1)
    syn = regionprops_table(m.astype(np.int64), properties=("area", "eccentricity", "solidity"))
    assert ks_2samp(syn["area"], real["area"]).statistic < 0.12
    assert ks_2samp(syn["eccentricity"], real["eccentricity"]).statistic < 0.12
    # contours are irregular, not perfect ellipses
    assert np.median(syn["solidity"]) < 0.975


def test_area_draws_follow_the_fitted_residuals_skew_and_old_priors_draw_normal_ones(load_tile, tmp_path):
    import dataclasses

    lab, real, pts = _real(load_tile)
    ks = {}
    for seed in range(3):  # the fitted residuals' own shape against a normal of the same spread
        prior = ShapePrior.fit(lab, seed=seed)
        q = np.asarray(prior.pooled.resid_quantiles)
        assert q.shape == (101,) and np.all(np.diff(q) >= 0)
        assert abs(np.median(q[1:-1])) < 0.5 and q[50] > 0  # real log areas: a long tail of small nuclei (skewed)
        normal = dataclasses.replace(prior.pooled, resid_quantiles=None)
        for name, pr in (("fitted", prior), ("normal", ShapePrior(pooled=normal))):
            syn = regionprops_table(sample_masks(pts, lab.shape, prior=pr, seed=seed).astype(np.int64),
                                    properties=("area",))["area"]
            ks.setdefault(name, []).append(ks_2samp(syn, real["area"]).statistic)
    assert np.mean(ks["fitted"]) < np.mean(ks["normal"]) - 0.01, ks
    # a prior saved without them (the shipped default, files written before) loads and draws normal residuals
    d = ShapePrior.default().to_dict()
    assert d["pooled"]["resid_quantiles"] is None
    del d["pooled"]["resid_quantiles"]
    old = ShapePrior.from_dict(d)
    assert np.array_equal(sample_masks(pts, lab.shape, prior=old, seed=1), sample_masks(pts, lab.shape, seed=1))


def test_area_shrinks_with_density():
    rng = np.random.default_rng(0)
    sparse = rng.uniform(0, 1000, (150, 2))
    dense = rng.uniform(0, 1000, (1500, 2))
    prior = ShapePrior.default()
    a_sparse = np.bincount(sample_masks(sparse, (1000, 1000), prior=prior, seed=0).ravel())[1:]
    a_dense = np.bincount(sample_masks(dense, (1000, 1000), prior=prior, seed=0).ravel())[1:]
    assert np.median(a_sparse[a_sparse > 0]) > 1.5 * np.median(a_dense[a_dense > 0])


def test_contour_is_irregular():
    """The same point drawn with the contour harmonics switched off gives a different (elliptic) mask."""
    shapes = draw_shapes([[50.0, 50.0]], seed=1)
    irregular = rasterize(shapes, (100, 100))
    shapes.amp[:] = 0
    ellipse = rasterize(shapes, (100, 100))
    assert (irregular != ellipse).sum() > 0


def test_classes_select_their_prior(load_tile):
    _, lab = load_tile(TILE)
    cls_map = np.zeros(lab.shape, dtype=np.int64)
    # class 1: the largest half of the nuclei
    area = np.bincount(lab.ravel())
    big = np.flatnonzero(area > np.median(area[1:][area[1:] > 0]))
    cls_map[np.isin(lab, big[big > 0])] = 1
    prior = ShapePrior.fit(lab, cls_map, seed=0)
    assert set(prior.per_class) == {0, 1}
    pts = np.random.default_rng(0).uniform(0, 1000, (300, 2))
    classes = np.r_[np.zeros(150, int), np.ones(150, int)]
    m = sample_masks(pts, lab.shape, classes=classes, prior=prior, seed=0)
    a = np.bincount(m.ravel(), minlength=301)[1:]
    assert np.median(a[150:]) > 1.5 * np.median(a[:150])


def test_prior_round_trip(tmp_path):
    prior = ShapePrior.default()
    prior.save(tmp_path / "p.json")
    again = ShapePrior.load(tmp_path / "p.json")
    assert again.to_dict() == prior.to_dict()
    pts = np.random.default_rng(0).uniform(0, 200, (40, 2))
    assert np.array_equal(sample_masks(pts, (200, 200), prior=again, seed=1), sample_masks(pts, (200, 200), prior=prior, seed=1))


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint16), np.eye(5, dtype=np.uint8)])
def test_prior_refuses_maps_without_enough_nuclei(bad):
    with pytest.raises(ValueError, match="nuclei"):
        ShapePrior.fit(bad)


def test_prior_refuses_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        ShapePrior.fit(np.zeros((3, 10, 10), np.uint16))


def test_load_refuses_garbage(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="shape prior"):
        ShapePrior.load(tmp_path / "x.json")


# ---- incremental sampler ---------------------------------------------------------------------------------------
def test_incremental_edits_match_a_full_rasterisation():
    rng = np.random.default_rng(0)
    s = MaskSampler((300, 300), seed=0)
    s.reset(rng.uniform(0, 300, (120, 2)))
    for step in range(60):
        before = s.labels.copy()
        i = int(rng.integers(len(s.points)))
        s.set_points([i], s.points[i] + rng.normal(0, 6, 2))
        changed_ids = set(np.unique(before[before != s.labels]).tolist()) | set(
            np.unique(s.labels[before != s.labels]).tolist()
        )
        # moving point i changes nucleus i+1 and at most the neighbours whose border it shares
        assert i + 1 in changed_ids or not (before != s.labels).any()
        assert len(changed_ids - {0}) <= 12
        if step % 10 == 0:
            s.add_points(rng.uniform(0, 300, (2, 2)))
        if step % 15 == 0:
            s.remove_points([int(rng.integers(len(s.points)))])
    assert np.array_equal(s.labels, rasterize(s.shapes, (300, 300)))
    assert s.labels.max() <= len(s.points)


def test_remove_shifts_ids_down():
    pts = np.array([[20.0, 20.0], [60.0, 60.0], [100.0, 100.0]])
    s = MaskSampler((128, 128), seed=1)
    s.reset(pts)
    third = s.labels == 3
    s.remove_points([1])
    assert len(s.points) == 2
    assert set(np.unique(s.labels)) == {0, 1, 2}
    assert np.array_equal(s.labels == 2, third)


def test_sampler_rejects_bad_indices():
    s = MaskSampler((64, 64), seed=0)
    s.reset([[10.0, 10.0]])
    with pytest.raises(ValueError, match="indices"):
        s.set_points([5], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        s.add_points([[np.nan, 3.0]])


# ---- bad input -------------------------------------------------------------------------------------------------
def test_empty_points_give_an_empty_map():
    m = sample_masks(np.zeros((0, 2)), (32, 48), seed=0)
    assert m.shape == (32, 48) and m.dtype == np.uint32 and not m.any()
    assert not sample_masks([], (5, 5)).any()


def test_points_outside_are_clipped_or_absent():
    pts = np.array([[-2.0, 30.0], [30.0, 30.0], [5000.0, 5000.0]])
    m = sample_masks(pts, (64, 64), seed=0)
    ids = set(np.unique(m).tolist())
    assert 2 in ids and 3 not in ids  # the far point has no pixels; the one just outside may show its edge


def test_duplicate_points_first_keeps_the_centre():
    pts = np.array([[30.0, 30.0], [30.0, 30.0], [10.0, 10.0]])
    m = sample_masks(pts, (64, 64), seed=0)
    assert m[30, 30] == 1 and m[10, 10] == 3


finite = st.floats(-50, 150, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(finite, finite), max_size=30),
    st.tuples(st.integers(1, 120), st.integers(1, 120)),
    st.integers(0, 2**31 - 1),
)
def test_any_finite_points_any_shape(points, shape, seed):
    m = sample_masks(np.array(points, dtype=float).reshape(-1, 2), shape, seed=seed)
    assert m.shape == shape and m.dtype == np.uint32
    assert m.max(initial=0) <= len(points)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=10), st.integers(0, 9))
def test_non_finite_points_are_refused(points, where):
    arr = np.array(points, dtype=float)
    arr[where % len(arr), where % 2] = [np.nan, np.inf, -np.inf][where % 3]
    with pytest.raises(ValueError, match="NaN or infinite"):
        sample_masks(arr, (50, 50))


@pytest.mark.parametrize("shape", [(10,), (10, 10, 3), (0, 10), (-5, 5), (10.5, 4), "ab"])
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="shape"):
        sample_masks([[1.0, 1.0]], shape)


@pytest.mark.parametrize("points", [np.zeros((3, 3)), np.zeros(4), [[1, 2, 3]]])
def test_bad_point_arrays_are_refused(points):
    with pytest.raises(ValueError, match="points"):
        sample_masks(points, (10, 10))


def test_bad_classes_and_seed_are_refused():
    with pytest.raises(ValueError, match="classes"):
        sample_masks([[1.0, 1.0]], (10, 10), classes=[0, 1])
    with pytest.raises(ValueError, match="classes"):
        sample_masks([[1.0, 1.0]], (10, 10), classes=[-1])
    with pytest.raises(ValueError, match="seed"):
        sample_masks([[1.0, 1.0]], (10, 10), seed=-3)


# ---- descriptors -----------------------------------------------------------------------------------------------
def _two_touching():
    lab = np.zeros((20, 30), np.uint32)
    lab[5:15, 3:13] = 7
    lab[5:15, 13:25] = 9
    return lab


def test_hv_maps_follow_hovernet():
    lab = _two_touching()
    hv = hv_maps(lab)
    assert hv.shape == (2, 20, 30) and hv.dtype == np.float32
    assert np.all(hv[:, lab == 0] == 0)
    assert hv.min() == -1 and hv.max() == 1
    # horizontal map: increases left to right inside each nucleus, jumps at the shared border
    row = hv[0, 10]
    assert np.all(np.diff(row[3:13]) > 0) and np.all(np.diff(row[13:25]) > 0)
    assert row[12] > 0 > row[13]
    # vertical map: negative above the centre, positive below
    assert hv[1, 5, 8] == -1 and hv[1, 14, 8] == 1


def test_distance_map_is_one_on_the_axis_and_small_at_the_border():
    lab = _two_touching()
    d = distance_map(lab)
    assert np.all(d[lab == 0] == 0)
    for i in (7, 9):
        assert np.isclose(d[lab == i].max(), 1.0)
    assert d[10, 12] < 0.3 and d[10, 13] < 0.3  # the border between the two nuclei


def test_direction_map_two_bins():
    lab = _two_touching()
    dm = direction_map(lab)
    assert dm.shape == (2, 20, 30) and dm.dtype == np.uint8
    assert np.array_equal(dm.sum(0), (lab > 0).astype(np.uint8))
    assert dm[0, 14, 8] == 1 and dm[1, 5, 8] == 1  # below the centre: bin 0; above: bin 1
    with pytest.raises(ValueError):
        direction_map(lab, 0)


def test_semantic_map_and_descriptors_on_a_real_tile(load_tile):
    _, lab = load_tile(TILE)
    d = descriptors(lab)
    assert set(d) == {"semantic", "hv", "distance", "direction"}
    assert np.array_equal(d["semantic"] > 0, lab > 0)
    assert np.array_equal(semantic_map(lab, np.full(lab.shape, 2)), np.where(lab > 0, 3, 0).astype(np.uint8))
    assert np.all(np.abs(d["hv"]) <= 1) and np.all(d["distance"] <= 1)
    assert np.array_equal(d["direction"].sum(0), (lab > 0).astype(np.uint8))


def test_descriptors_of_an_empty_map():
    d = descriptors(np.zeros((8, 8), np.uint32))
    assert not any(v.any() for v in d.values())
