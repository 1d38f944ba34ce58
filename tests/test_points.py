"""Tests of napari_nucsynth.points: centroids, point processes and their fit, point-set augmentations."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial import cKDTree
from skimage.measure import regionprops

from napari_nucsynth import points as P
from napari_nucsynth.points import (
    PROCESSES,
    CoverRegion,
    PointLibrary,
    PointProcessParams,
    PointSet,
    centroids,
    default_point_process,
    fit_point_process,
    nearest_neighbour_distances,
    random_points,
    ripley_k,
    window_counts,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _min_pair_distance(pts: np.ndarray) -> float:
    return float(nearest_neighbour_distances(pts).min())


def _inside(pts: np.ndarray, shape) -> bool:
    return bool(np.all((pts >= -0.5) & (pts <= np.asarray(shape) - 0.5)))


def _dot_labels(shape, pts_int) -> np.ndarray:
    """A label map with one single-pixel nucleus (id i+1) at each integer point."""
    lab = np.zeros(shape, dtype=np.uint32)
    for i, (r, c) in enumerate(pts_int):
        lab[r, c] = i + 1
    return lab


# ----------------------------------------------------------------------------------------------------------------
# centroids
# ----------------------------------------------------------------------------------------------------------------
def test_centroids_match_regionprops_on_real_tile(monuseg_tiles, load_tile):
    _, labels = load_tile(monuseg_tiles[0])
    pts, ids = centroids(labels, return_ids=True)
    props = regionprops(labels.astype(np.int64))
    assert ids.tolist() == [p.label for p in props]
    np.testing.assert_allclose(pts, np.array([p.centroid for p in props]), atol=1e-9)
    assert pts.dtype == np.float64 and pts.shape == (len(props), 2)


def test_centroids_noncontiguous_sparse_and_empty():
    lab = np.zeros((6, 7), dtype=np.uint32)
    lab[0:2, 0:2] = 3  # centre (0.5, 0.5)
    lab[4, 1:6] = 70_000  # centre (4, 3)
    lab[5, 6] = 2**31  # huge id: the np.unique path
    pts, ids = centroids(lab, return_ids=True)
    assert ids.tolist() == [3, 70_000, 2**31]
    np.testing.assert_array_equal(pts, [[0.5, 0.5], [4.0, 3.0], [5.0, 6.0]])
    empty, no_ids = centroids(np.zeros((4, 4), np.uint16), return_ids=True)
    assert empty.shape == (0, 2) and no_ids.shape == (0,)
    np.testing.assert_allclose(centroids(lab.astype(bool)), [[2.7, 2.3]])  # a bool mask is one nucleus (10 px)


def test_centroids_fast_on_2000_ids():
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 2001, size=(1000, 1000)).astype(np.uint32)
    centroids(lab)
    t0 = time.perf_counter()
    pts = centroids(lab)
    assert time.perf_counter() - t0 < 0.25
    assert pts.shape == (2000, 2)


@pytest.mark.parametrize("bad", [np.zeros((3, 3, 3), int), np.zeros(5, int), np.full((3, 3), 1.5), np.full((2, 2), -1)])
def test_centroids_refuses_bad_maps(bad):
    with pytest.raises(ValueError, match="labels"):
        centroids(bad)


# ----------------------------------------------------------------------------------------------------------------
# summary statistics
# ----------------------------------------------------------------------------------------------------------------
def test_window_counts_and_nn_distances_exact():
    pts = np.array([[0, 0], [0, 3], [10, 10], [19.4, 19.4]], dtype=float)
    np.testing.assert_allclose(nearest_neighbour_distances(pts), [3, 3, math.hypot(7, 10), math.hypot(9.4, 9.4)])
    assert nearest_neighbour_distances(pts[:1]).shape == (0,)
    wc = window_counts(pts, (20, 20), size=10, stride=10)
    assert wc.tolist() == [2, 0, 0, 2]  # (10,10) and (19.4,19.4) fall in the last window
    assert window_counts(pts, (20, 20), size=8, stride=5).size == 16  # starts 0, 5, 10, 12
    with pytest.raises(ValueError, match="size"):
        window_counts(pts, (20, 20), size=30)


def test_ripley_k_poisson_is_pi_r2():
    rng = np.random.default_rng(1)
    pts = rng.uniform(-0.5, 399.5, size=(2000, 2))
    r = np.array([10.0, 20.0, 40.0])
    np.testing.assert_allclose(ripley_k(pts, (400, 400), r) / (np.pi * r**2), 1.0, atol=0.08)
    with pytest.raises(ValueError, match="at least 2"):
        ripley_k(pts[:1], (400, 400), r)


# ----------------------------------------------------------------------------------------------------------------
# random point processes
# ----------------------------------------------------------------------------------------------------------------
CLUSTERED = PointProcessParams(intensity=1e-3, min_distance=8.0, cluster_sigma=20.0, parent_intensity=5e-5)


@pytest.mark.parametrize("process", PROCESSES)
def test_fixed_count_inside_and_reproducible(process):
    pts = random_points((300, 500), process=process, params=CLUSTERED, n=120, seed=3)
    assert pts.shape == (120, 2) and pts.dtype == np.float64
    assert _inside(pts, (300, 500))
    np.testing.assert_array_equal(pts, random_points((300, 500), process=process, params=CLUSTERED, n=120, seed=3))
    assert not np.array_equal(pts, random_points((300, 500), process=process, params=CLUSTERED, n=120, seed=4))
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    np.testing.assert_array_equal(
        random_points((300, 500), process=process, params=CLUSTERED, seed=g1),
        random_points((300, 500), process=process, params=CLUSTERED, seed=g2),
    )


@pytest.mark.parametrize("process", PROCESSES)
def test_count_follows_intensity(process):
    params = PointProcessParams(intensity=2e-3, min_distance=5.0, cluster_sigma=15.0, parent_intensity=2e-4)
    counts = [len(random_points((200, 200), process=process, params=params, seed=s)) for s in range(40)]
    # Poisson(80): the mean of 40 draws is within 80 +- 3 * sqrt(80 / 40)
    assert abs(np.mean(counts) - 80) < 3 * math.sqrt(2)
    assert np.var(counts) > 30  # drawn, not fixed


@pytest.mark.parametrize("process", ["hardcore", "cluster"])
def test_hard_core_holds(process):
    params = PointProcessParams(intensity=1.5e-3, min_distance=14.0, cluster_sigma=40.0, parent_intensity=1e-4)
    for s in range(3):
        pts = random_points((500, 500), process=process, params=params, seed=s)
        assert abs(len(pts) - 375) < 5 * math.sqrt(375)
        assert _min_pair_distance(pts) >= 14.0


def test_saturated_clusters_spill_over():
    """Clusters of 50 points in sigma = 15 cannot hold them 14 px apart: the rest spill over, the core holds."""
    params = PointProcessParams(intensity=1.5e-3, min_distance=14.0, cluster_sigma=15.0, parent_intensity=3e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pts = random_points((500, 500), process="cluster", params=params, n=380, seed=0)
    assert len(pts) == 380 and _min_pair_distance(pts) >= 14.0


def test_poisson_ignores_hard_core_and_is_uniform():
    params = PointProcessParams(intensity=2e-3, min_distance=14.0)
    pts = random_points((500, 500), process="poisson", params=params, n=2000, seed=0)
    assert _min_pair_distance(pts) < 3.0
    np.testing.assert_allclose(pts.mean(axis=0), [249.5, 249.5], atol=10)
    assert pts.min() >= -0.5 and pts.max() <= 499.5


def test_cluster_process_is_clustered():
    """The variance of window counts of the Thomas process is far above Poisson's (variance = mean)."""
    var = {}
    for process in ("poisson", "hardcore", "cluster"):
        v = [
            np.var(window_counts(random_points((512, 512), process=process, params=CLUSTERED, n=260, seed=s),
                                 (512, 512), 64, 64))
            for s in range(6)
        ]
        var[process] = float(np.mean(v))
    mean = 260 * 64 * 64 / 512**2  # about 4.06 per window
    assert var["poisson"] == pytest.approx(mean, rel=0.35)
    assert var["cluster"] > 3 * var["poisson"]
    assert var["hardcore"] < var["poisson"]  # inhibition makes counts more regular


def test_parent_count_quantile_is_poisson():
    from scipy.stats import poisson

    u = np.random.default_rng(0).random(40)
    for mean in (0.3, 4.2, 57.0, 3000.0, 2.5e6):
        np.testing.assert_array_equal([P._poisson_ppf(x, mean) for x in u], poisson.ppf(u, mean))


def test_impossible_density_is_refused_and_jamming_warns_fast():
    params = PointProcessParams(intensity=1e-2, min_distance=20.0)
    with pytest.raises(ValueError, match="min_distance"):
        random_points((100, 100), process="hardcore", params=params, n=40)  # 40 discs of d=20 cover 1.26
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="placed only"):
        pts = random_points((100, 100), process="hardcore", params=params, n=25, seed=0)  # covers 0.79 > jamming
    assert time.perf_counter() - t0 < 60  # a guard against a hang, not a speed test
    assert 10 <= len(pts) < 25 and _min_pair_distance(pts) >= 20


def test_default_params_come_from_the_packaged_fit():
    data = json.loads((Path(P.__file__).parent / "data" / "default_point_process.json").read_text())
    d = default_point_process()
    assert d == PointProcessParams.from_dict(data)
    assert "MoNuSeg" in d.source and "bench_layouts.py --write-default" in d.source
    # MoNuSeg: about 580 nuclei per 1000 x 1000 tile, touching nuclei 10-20 px apart
    assert 4e-4 < d.intensity < 8e-4 and 8 < d.min_distance < 25 and d.clustered
    pts = random_points((1000, 1000), seed=0)
    assert abs(len(pts) - d.intensity * 1e6) < 5 * math.sqrt(d.intensity * 1e6)
    assert _min_pair_distance(pts) >= d.min_distance


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shape": (10,)}, "shape"),
        ({"shape": (10, 10, 3)}, "shape"),
        ({"shape": (0, 10)}, "shape"),
        ({"shape": (10, 10), "process": "matern"}, "process"),
        ({"shape": (10, 10), "n": -1}, "n must"),
        ({"shape": (10, 10), "n": 2.5}, "n must"),
        ({"shape": (10, 10), "params": {"intensity": 1}}, "params"),
        ({"shape": (10, 10), "seed": -3}, "seed"),
        ({"shape": (10, 10), "seed": 1.5}, "seed"),
    ],
)
def test_random_points_bad_input(kwargs, match):
    shape = kwargs.pop("shape")
    with pytest.raises(ValueError, match=match):
        random_points(shape, **kwargs)


def test_zero_points_and_zero_intensity():
    assert random_points((50, 50), n=0, seed=0).shape == (0, 2)
    assert random_points((50, 50), params=PointProcessParams(intensity=0.0), seed=0).shape == (0, 2)


# ----------------------------------------------------------------------------------------------------------------
# parameters and fit
# ----------------------------------------------------------------------------------------------------------------
def test_params_roundtrip_and_validation(tmp_path):
    p = PointProcessParams(1e-3, 10, 30, 1e-4, "test")
    assert PointProcessParams.from_dict(p.to_dict()) == p
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()
    p.save(tmp_path / "p.json")
    assert PointProcessParams.load(tmp_path / "p.json") == p
    assert p.mean_cluster_size == pytest.approx(10.0)
    with pytest.raises(ValueError, match="unknown"):
        PointProcessParams.from_dict({**p.to_dict(), "radius": 3})
    for field, bad in [("intensity", -1.0), ("min_distance", float("nan")), ("cluster_sigma", 0.0),
                       ("parent_intensity", float("inf")), ("intensity", "many")]:
        with pytest.raises(ValueError, match=field):
            PointProcessParams(**{**p.to_dict(), field: bad})
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.intensity = 2.0  # frozen


def test_fit_on_real_tile(monuseg_tiles, load_tile):
    _, labels = load_tile(monuseg_tiles[0])
    pts = centroids(labels)
    fit = fit_point_process(labels)
    assert fit.intensity == pytest.approx(len(pts) / labels.size)
    assert fit.min_distance == pytest.approx(np.quantile(nearest_neighbour_distances(pts), 0.05))
    assert fit_point_process(pts, labels.shape) == fit  # points + shape give the same fit
    assert fit_point_process(labels, seed=0) == fit  # deterministic


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_recovers_known_thomas_parameters(seed):
    lam = 8e-4
    true = PointProcessParams(lam, min_distance=12.0, cluster_sigma=30.0, parent_intensity=lam / 10)
    pts = random_points((1000, 1000), params=true, seed=seed)
    fit = fit_point_process(pts, (1000, 1000))
    assert fit.intensity == pytest.approx(len(pts) / 1e6)
    assert 12.0 <= fit.min_distance <= 15.0  # the 5 % quantile sits just above the true hard core
    assert fit.clustered
    assert 30 / 1.6 < fit.cluster_sigma < 30 * 1.6
    assert 10 / 2.5 < fit.mean_cluster_size < 10 * 2.5


def _relative_k_excess(p: PointProcessParams, r: float) -> float:
    """(K(r) - pi r^2) / (pi r^2) of the fitted Thomas process: how clustered it is at scale r."""
    return (1 - math.exp(-r * r / (4 * p.cluster_sigma**2))) / p.parent_intensity / (math.pi * r * r)


def test_fit_finds_no_clustering_in_poisson_and_hardcore():
    shape = (1000, 1000)
    base = PointProcessParams(8e-4, min_distance=15.0)
    true = PointProcessParams(8e-4, min_distance=12.0, cluster_sigma=30.0, parent_intensity=8e-5)
    assert _relative_k_excess(true, 100.0) == pytest.approx(0.374, abs=0.001)
    for s in range(2):
        clustered = fit_point_process(random_points(shape, params=true, seed=s), shape)
        assert _relative_k_excess(clustered, 100.0) > 0.15
        for process in ("poisson", "hardcore"):
            fit = fit_point_process(random_points(shape, process=process, params=base, seed=s), shape)
            assert _relative_k_excess(fit, 100.0) < 0.05, process  # at most a chance fluctuation
    hard = fit_point_process(random_points(shape, process="hardcore", params=base, seed=2), shape)
    assert not hard.clustered and hard.parent_intensity == pytest.approx(100 * hard.intensity)
    assert 15.0 <= hard.min_distance < 18.0


def test_fit_bad_and_tiny_input():
    with pytest.raises(ValueError, match="at least 2"):
        fit_point_process(np.zeros((50, 50), np.uint32))
    one = np.zeros((50, 50), np.uint32)
    one[10:13, 10:13] = 7
    with pytest.raises(ValueError, match="at least 2"):
        fit_point_process(one)
    with pytest.raises(ValueError, match="shape is required"):
        fit_point_process(np.array([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="outside shape"):
        fit_point_process([[1.0, 2.0], [60.0, 4.0]], (50, 50))
    with pytest.raises(ValueError, match="NaN"):
        fit_point_process([[1.0, 2.0], [np.nan, 4.0]], (50, 50))
    few = fit_point_process([[5.0, 5.0], [5.0, 25.0], [30.0, 30.0]], (50, 50))  # < 20 points: documented fallback
    assert few.min_distance == pytest.approx(np.quantile([20.0, 20.0, math.hypot(25, 5)], 0.05))
    assert not few.clustered and few.intensity == pytest.approx(3 / 2500)


# ----------------------------------------------------------------------------------------------------------------
# PointSet transforms
# ----------------------------------------------------------------------------------------------------------------
SMALL = PointSet([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]], (3, 5), [1, 2, 3])


def test_pointset_validation():
    assert PointSet([[1, 1]], (4, 4)).classes.tolist() == [0]
    assert len(PointSet([], (4, 4))) == 0
    with pytest.raises(ValueError, match="NaN"):
        PointSet([[1, np.nan]], (4, 4))
    with pytest.raises(ValueError, match="outside shape"):
        PointSet([[1, 4.0]], (4, 4))
    with pytest.raises(ValueError, match="shape"):
        PointSet([[1, 1]], (4, 4, 3))
    with pytest.raises(ValueError, match="classes"):
        PointSet([[1, 1], [2, 2]], (4, 4), [1])
    with pytest.raises(ValueError, match="classes"):
        PointSet([[1, 1]], (4, 4), [-1])
    with pytest.raises(ValueError, match="points"):
        PointSet([[1, 1, 1]], (4, 4))


def test_flip_exact():
    f0 = SMALL.flip(0)
    np.testing.assert_array_equal(f0.points, [[2, 0], [1, 2], [0, 4]])
    f1 = SMALL.flip(1)
    np.testing.assert_array_equal(f1.points, [[0, 4], [1, 2], [2, 0]])
    assert f0.classes.tolist() == [1, 2, 3] and f1.shape == (3, 5)
    assert SMALL.flip(-1) == f1 and SMALL.flip(0).flip(0) == SMALL
    with pytest.raises(ValueError, match="axis"):
        SMALL.flip(2)


def test_rot90_exact_non_square():
    r1 = SMALL.rot90()
    assert r1.shape == (5, 3)
    np.testing.assert_array_equal(r1.points, [[4, 0], [2, 1], [0, 2]])  # (row, col) -> (W - 1 - col, row)
    assert r1.classes.tolist() == [1, 2, 3]
    assert SMALL.rot90(2).shape == (3, 5)
    np.testing.assert_array_equal(SMALL.rot90(2).points, [[2, 4], [1, 2], [0, 0]])
    assert SMALL.rot90(4) == SMALL and SMALL.rot90(0) == SMALL
    assert SMALL.rot90(-1) == SMALL.rot90(3)
    assert SMALL.rot90(1).rot90(3) == SMALL
    with pytest.raises(ValueError, match="k must"):
        SMALL.rot90(1.5)


@pytest.mark.parametrize("op", ["flip0", "flip1", "rot1", "rot2", "rot3"])
def test_transforms_match_numpy_on_label_maps(op):
    """A point transform must agree with the same numpy transform applied to the image it annotates."""
    rng = np.random.default_rng(0)
    shape = (17, 29)
    flat = rng.choice(shape[0] * shape[1], size=12, replace=False)
    pts_int = np.stack(np.unravel_index(flat, shape), axis=1)
    lab = _dot_labels(shape, pts_int)
    ps = PointSet.from_labels(lab)
    if op.startswith("flip"):
        axis = int(op[-1])
        out, img = ps.flip(axis), np.flip(lab, axis)
    else:
        k = int(op[-1])
        out, img = ps.rot90(k), np.rot90(lab, k)
    assert out.shape == img.shape
    np.testing.assert_array_equal(out.points, centroids(img))


def test_affine_exact_and_drops_outside():
    shift = [[1, 0, 1.0], [0, 1, -1.0]]
    out = SMALL.affine(shift)
    np.testing.assert_array_equal(out.points, [[2, 1]])  # (0,0) -> (1,-1) and (2,4) -> (3,3) leave the image
    assert out.classes.tolist() == [2] and out.shape == (3, 5)
    scale = np.array([[2, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(SMALL.affine(scale).points, [[0, 0], [2, 2]])  # (4, 4) is below row 2.5
    assert SMALL.affine(scale).classes.tolist() == [1, 2]
    assert SMALL.affine(np.eye(3)) == SMALL
    np.testing.assert_array_equal(SMALL.affine(np.eye(3), shape=(2, 5)).points, [[0, 0], [1, 2]])
    with pytest.raises(ValueError, match="last row"):
        SMALL.affine([[1, 0, 0], [0, 1, 0], [0.1, 0, 1]])
    with pytest.raises(ValueError, match="2x3 or 3x3"):
        SMALL.affine(np.eye(2))
    with pytest.raises(ValueError, match="finite"):
        SMALL.affine([[1, 0, np.nan], [0, 1, 0]])


def test_random_affine():
    ps = PointSet(random_points((200, 300), process="poisson", n=150, seed=1), (200, 300), np.arange(150) % 4)
    ident = ps.random_affine(0, max_rotation=0, scale=(1, 1), shear=0, translate=0)
    np.testing.assert_allclose(ident.points, ps.points, atol=1e-9)
    a, b = ps.random_affine(5), ps.random_affine(5)
    assert a == b and a != ps.random_affine(6)
    assert _inside(a.points, (200, 300)) and 0 < len(a) <= 150
    # a translation only: the output is the kept points shifted by one vector, in order, with their classes
    tr = ps.random_affine(7, max_rotation=0, scale=(1, 1), shear=0, translate=0.2)
    tree = cKDTree(ps.points)
    for i in range(len(ps)):
        shift = tr.points[0] - ps.points[i]
        dist, idx = tree.query(tr.points - shift)
        if dist.max() < 1e-9:
            break
    else:
        pytest.fail("random_affine with translate only is not a translation")
    assert 0 < np.abs(shift).max() and np.all(np.abs(shift) <= 0.2 * np.array([200, 300]) + 1e-9)
    assert np.all(np.diff(idx) > 0) and np.array_equal(tr.classes, ps.classes[idx])
    assert len(tr) == int(np.sum(np.all((ps.points + shift >= -0.5) & (ps.points + shift <= [199.5, 299.5]), 1)))
    # a rotation only: an isometry about the image centre
    rot = ps.random_affine(8, max_rotation=180, scale=(1, 1), shear=0, translate=0)
    centre = np.array([99.5, 149.5])
    r_in = np.hypot(*(ps.points - centre).T)
    r_out = np.hypot(*(rot.points - centre).T)
    src = np.abs(r_out[:, None] - r_in[None, :]).argmin(axis=1)
    np.testing.assert_allclose(r_out, r_in[src], atol=1e-9)
    assert np.array_equal(rot.classes, ps.classes[src])
    with pytest.raises(ValueError, match="scale"):
        ps.random_affine(0, scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="shear"):
        ps.random_affine(0, shear=95)


@pytest.mark.parametrize("kind", ["rectangle", "disc"])
def test_cover_drops_exactly_the_points_inside(kind):
    ps = PointSet(random_points((300, 400), process="poisson", n=600, seed=2), (300, 400), np.arange(600) % 3)
    out, region = ps.cover(seed=4, fraction=0.2, kind=kind, return_region=True)
    inside = region.contains(ps.points)
    assert isinstance(region, CoverRegion) and region.kind == kind
    np.testing.assert_array_equal(out.points, ps.points[~inside])
    np.testing.assert_array_equal(out.classes, ps.classes[~inside])
    assert region.area() == pytest.approx(0.2 * 300 * 400)
    assert 0.1 < inside.mean() < 0.3  # about the covered fraction of uniform points
    assert ps.cover(4, fraction=0.2, kind=kind) == out
    assert ps.cover(4, fraction=0.0, kind=kind) == ps
    with pytest.raises(ValueError, match="fraction"):
        ps.cover(0, fraction=1.5)
    with pytest.raises(ValueError, match="kind"):
        ps.cover(0, kind="triangle")


def test_cover_whole_image_and_empty_set():
    ps = PointSet(random_points((50, 60), process="poisson", n=30, seed=0), (50, 60))
    assert len(ps.cover(0, fraction=1.0)) == 0
    empty = PointSet([], (50, 60))
    assert len(empty.cover(0)) == 0 and empty.rot90().shape == (60, 50) and len(empty.flip(0)) == 0
    assert len(empty.affine([[1, 0, 3], [0, 1, 0]])) == 0 and len(empty.random_affine(0)) == 0


def test_combine_keeps_both_classes_and_respects_the_cut():
    shape = (400, 400)
    params = PointProcessParams(1.5e-3, 10.0)
    pa = random_points(shape, process="hardcore", params=params, seed=1)
    pb = random_points(shape, process="hardcore", params=params, seed=2)
    a, b = PointSet(pa, shape, np.ones(len(pa), int)), PointSet(pb, shape, np.full(len(pb), 2))
    out, cut = a.combine(b, seed=3, min_distance=10.0, return_cut=True)
    assert set(out.classes.tolist()) == {1, 2}
    mine, theirs = out.points[out.classes == 1], out.points[out.classes == 2]
    np.testing.assert_array_equal(mine, a.points[cut.side(a.points)])  # every point of a on its side is kept
    assert not cut.side(theirs).any()
    assert set(map(tuple, theirs)) <= set(map(tuple, b.points))
    assert cKDTree(mine).query(theirs)[0].min() >= 10.0
    dropped = (~cut.side(b.points)).sum() - len(theirs)
    assert dropped >= 0
    assert a.combine(b, seed=3, min_distance=10.0) == out
    default = a.combine(b, seed=3)  # min_distance from the pooled 5 % NN quantile (>= 10 by the hard core)
    assert cKDTree(mine).query(default.points[default.classes == 2])[0].min() >= 10.0
    with pytest.raises(ValueError, match="same shape"):
        a.combine(PointSet([], (10, 10)), seed=0)
    with pytest.raises(ValueError, match="other"):
        a.combine(a.points, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# PointLibrary
# ----------------------------------------------------------------------------------------------------------------
def _library() -> PointLibrary:
    lab = np.zeros((40, 50), np.uint32)
    cls = np.zeros((40, 50), np.uint8)
    lab[2:5, 2:5] = 1
    cls[2:5, 2:5] = 2
    cls[2, 2] = 1  # minority pixel: the nucleus stays class 2
    lab[20:22, 30:34] = 5
    cls[20:22, 30:34] = 3
    lab[35:38, 10:12] = 9  # class 0 (background class map)
    lab2 = np.zeros((40, 50), np.uint32)
    lab2[10:12, 10:12] = 1
    lab2[30:33, 40:45] = 2
    return PointLibrary.from_label_maps([lab, lab2], [cls, None])


def test_library_from_label_maps_majority_class():
    lib = _library()
    assert len(lib) == 2
    np.testing.assert_array_equal(lib[0].points, [[3, 3], [20.5, 31.5], [36, 10.5]])
    assert lib[0].classes.tolist() == [2, 3, 0] and lib[1].classes.tolist() == [0, 0]
    with pytest.raises(ValueError, match="class_maps"):
        PointLibrary.from_label_maps([np.zeros((4, 4), int)], [])
    with pytest.raises(ValueError, match="point_set"):
        lib.add(np.zeros((3, 2)))
    assert len(PointLibrary().add(lib[0]).add(lib[1])) == 2


def test_library_augment_and_sample(monuseg_tiles, load_tile):
    lib = PointLibrary.from_label_maps([load_tile(t)[1] for t in monuseg_tiles[:3]])
    sets = [s.points for s in lib]
    plain = lib.augment(seed=1, n_transforms=0)
    assert any(np.array_equal(plain.points, s) for s in sets)
    a, b = lib.augment(seed=5, n_transforms=4), lib.augment(seed=5, n_transforms=4)
    assert a == b
    draws = lib.sample(6, seed=2)
    assert len(draws) == 6 and draws == lib.sample(6, seed=2)
    for d in draws:
        assert isinstance(d, PointSet) and _inside(d.points, d.shape) and len(d) > 0
    assert any(not any(np.array_equal(d.points, s) for s in sets) for d in draws)  # something was transformed
    with pytest.raises(ValueError, match="empty"):
        PointLibrary().augment(0)
    with pytest.raises(ValueError, match="n_transforms"):
        lib.augment(0, n_transforms=-1)
    with pytest.raises(ValueError, match="n must"):
        lib.sample(-2, 0)


# ----------------------------------------------------------------------------------------------------------------
# property-based tests of bad and edge input
# ----------------------------------------------------------------------------------------------------------------
coords = st.floats(min_value=-0.5, max_value=29.5, allow_nan=False)
point_lists = st.lists(st.tuples(coords, coords), min_size=0, max_size=25)


@FAST
@given(pts=st.lists(st.tuples(coords, coords), min_size=1, max_size=10), row=st.integers(0, 9), col=st.integers(0, 1),
       bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_nan_or_inf_points_are_refused(pts, row, col, bad):
    arr = np.array(pts, dtype=float)
    arr[row % len(arr), col] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        PointSet(arr, (30, 30))
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_point_process(arr, (30, 30))


@FAST
@given(shape=st.one_of(
    st.lists(st.integers(1, 50), min_size=0, max_size=4).filter(lambda s: len(s) != 2),
    st.tuples(st.integers(-5, 0), st.integers(1, 5)),
    st.tuples(st.floats(1.1, 9.9).filter(lambda x: x != int(x)), st.integers(1, 5)),
))
def test_bad_shapes_are_refused(shape):
    with pytest.raises(ValueError, match="shape"):
        random_points(shape, n=3, seed=0)
    with pytest.raises(ValueError, match="shape"):
        PointSet([], shape)


@FAST
@given(pts=point_lists, k=st.integers(-6, 6), axis=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
def test_transform_invariants(pts, k, axis, seed):
    arr = np.array(pts, dtype=float).reshape(-1, 2)
    cls = np.arange(len(arr)) % 5
    ps = PointSet(arr, (30, 30), cls)
    back = ps.rot90(k).rot90(-k)  # exact up to float rounding of (W - 1 - x)
    np.testing.assert_allclose(back.points, ps.points, atol=1e-9)
    assert back.shape == ps.shape and np.array_equal(back.classes, cls)
    rot = ps.rot90(k)
    np.testing.assert_array_equal(rot.classes, cls)
    assert _inside(rot.points, rot.shape)
    np.testing.assert_allclose(ps.flip(axis).flip(axis).points, ps.points, atol=1e-9)
    cov = ps.cover(seed, fraction=0.3)
    assert len(cov) <= len(ps) and set(map(tuple, cov.points)) <= set(map(tuple, ps.points))
    aff = ps.random_affine(seed)
    assert _inside(aff.points, aff.shape) and len(aff) <= len(ps)
    comb = ps.combine(ps.flip(axis), seed)
    assert _inside(comb.points, (30, 30)) and len(comb) <= 2 * len(ps)


@FAST
@given(pts=st.lists(st.tuples(coords, coords), min_size=0, max_size=19, unique=True))
def test_fit_small_inputs_documented(pts):
    arr = np.array(pts, dtype=float).reshape(-1, 2)
    if len(arr) < 2:
        with pytest.raises(ValueError, match="at least 2"):
            fit_point_process(arr, (30, 30))
        return
    fit = fit_point_process(arr, (30, 30))
    assert fit.intensity == pytest.approx(len(arr) / 900)
    assert fit.min_distance == pytest.approx(np.quantile(nearest_neighbour_distances(arr), 0.05))
    assert not fit.clustered  # fewer than 20 points: no clustering is fitted


@FAST
@given(lab=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=9), min_size=1, max_size=9)
       .filter(lambda rows: len({len(r) for r in rows}) == 1))
def test_centroids_property_matches_regionprops(lab):
    lab = np.array(lab, dtype=np.int64)
    pts, ids = centroids(lab, return_ids=True)
    props = regionprops(lab)
    assert ids.tolist() == [p.label for p in props]
    expected = np.array([p.centroid for p in props]).reshape(-1, 2)
    np.testing.assert_allclose(pts, expected, atol=1e-12)


@FAST
@given(n=st.integers(0, 60), size=st.sampled_from([10, 20, 40]), seed=st.integers(0, 1000))
def test_tiling_windows_count_every_point_once(n, size, seed):
    pts = random_points((80, 120), process="poisson", n=n, seed=seed)
    assert window_counts(pts, (80, 120), size=size, stride=size).sum() == n


def test_module_imports_no_qt_or_napari():
    src = Path(P.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(napari|qtpy|PyQt\d|PySide\d|magicgui)\b", src, re.M)
