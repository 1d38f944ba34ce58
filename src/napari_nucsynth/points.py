"""Nucleus centroids, random point processes fitted to real tissue, and a library of point-set augmentations.

Three concerns live here, all Qt-free and vectorised:

* :func:`centroids` turns an instance label map into ``(N, 2)`` float ``(row, col)`` points (napari's order).
* :func:`fit_point_process` fits a :class:`PointProcessParams` (density, hard core, Thomas clustering) to a real
  label map or point set, and :func:`random_points` draws layouts from a homogeneous Poisson process, a hard-core
  process (random sequential inhibition) or a hard-core Thomas cluster process. ``params=None`` uses a default
  fitted on the 30 MoNuSeg training tiles (``data/default_point_process.json``).
* :class:`PointSet` and :class:`PointLibrary` implement DAFF-GAN's point-layout augmentations: flips, 90 degree
  rotations, affine maps, random covers and the combination of two layouts along a random cut, with a per-point
  class carried through every transform.

Coordinates follow napari: pixel ``(i, j)`` is centred on ``(i, j)``, so an image of shape ``(H, W)`` covers the
closed rectangle ``[-0.5, H - 0.5] x [-0.5, W - 0.5]``. A point is *inside* ``shape`` when it lies in that rectangle;
it belongs to pixel ``floor(p + 0.5)`` (the rule :mod:`napari_nucsynth.masks` uses).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
from scipy.special import pdtr
from scipy.spatial import cKDTree

from ._checks import SeedLike, as_classes, as_labels, as_points, as_rng, as_shape

__all__ = [
    "PROCESSES",
    "centroids",
    "nearest_neighbour_distances",
    "window_counts",
    "ripley_k",
    "PointProcessParams",
    "default_point_process",
    "fit_point_process",
    "random_points",
    "CoverRegion",
    "CutLine",
    "PointSet",
    "PointLibrary",
    "AUGMENTATIONS",
]

#: The point processes :func:`random_points` can draw from.
PROCESSES = ("poisson", "hardcore", "cluster")

_DEFAULT_FILE = Path(__file__).parent / "data" / "default_point_process.json"
#: Quantile of the nearest-neighbour distances used as the hard-core distance (see :func:`fit_point_process`).
HARDCORE_QUANTILE = 0.05
#: "No clustering" is represented by this many parents per point (each parent has 1/100 child on average).
_NO_CLUSTER_PARENTS_PER_POINT = 100.0
#: Below this many points the clustering is not fitted (the K function is too noisy): see fit_point_process.
_MIN_POINTS_FOR_CLUSTERING = 20
#: Largest radius of the K function used for the clustering fit (also the largest cluster sigma), pixels.
_K_RMAX = 250.0
_K_RADII = 30
#: Simulated realisations per evaluation and bisection steps of the clustering calibration.
_CALIB_REALISATIONS = 4
_CALIB_CHECK_REALISATIONS = 6
_CALIB_STEPS = 7
#: Densest packing of equal discs in the plane (hexagonal): no layout can beat it.
_HEX_PACKING = math.pi / (2.0 * math.sqrt(3.0))
#: Proposal budget of random sequential inhibition: this many proposals per requested point, plus a constant.
_PROPOSALS_PER_POINT = 200
_MAX_ROUNDS = 400
#: Cluster proposals that have not placed all points after this many proposals per point spill over uniformly.
_SPILL_AFTER = 20


# ----------------------------------------------------------------------------------------------------------------
# Centroids and summary statistics
# ----------------------------------------------------------------------------------------------------------------
def centroids(labels, *, return_ids: bool = False):
    """Centroids of the instances of a label map.

    Parameters
    ----------
    labels : (H, W) array of non-negative integers
        Instance label map, 0 = background. Ids need not be contiguous.
    return_ids : bool, optional
        Also return the id of every centroid.

    Returns
    -------
    points : (N, 2) float64 ndarray
        Centre of mass ``(row, col)`` of every instance (the mean of its pixel coordinates, as
        ``skimage.measure.regionprops(...).centroid``), in ascending id order. ``(0, 2)`` for an empty map.
    ids : (N,) int64 ndarray
        Only with ``return_ids=True``: the instance ids, ascending.

    Raises
    ------
    ValueError
        If ``labels`` is not a 2-D map of non-negative integers.

    Notes
    -----
    One pass of ``np.bincount`` over the foreground pixels (about 10 ms for a 1000 x 1000 tile with 2000 nuclei).
    Very large sparse ids (more than a few times the number of pixels) are compacted with ``np.unique`` first.
    """
    lab = as_labels(labels, "labels")
    width = lab.shape[1]
    flat = lab.ravel()
    fg = np.flatnonzero(flat)
    if fg.size == 0:
        pts = np.zeros((0, 2), dtype=np.float64)
        return (pts, np.zeros(0, dtype=np.int64)) if return_ids else pts
    vals = flat[fg]
    rows, cols = np.divmod(fg, width)
    if int(vals.max()) > 4 * flat.size + 1024:
        ids, inv = np.unique(vals, return_inverse=True)
        cnt = np.bincount(inv).astype(np.float64)
        pts = np.stack([np.bincount(inv, rows) / cnt, np.bincount(inv, cols) / cnt], axis=1)
    else:
        vals = vals.astype(np.intp)
        cnt = np.bincount(vals)
        ids = np.flatnonzero(cnt)
        c = cnt[ids].astype(np.float64)
        pts = np.stack([np.bincount(vals, rows)[ids] / c, np.bincount(vals, cols)[ids] / c], axis=1)
    pts = np.ascontiguousarray(pts, dtype=np.float64)
    return (pts, ids.astype(np.int64)) if return_ids else pts


def nearest_neighbour_distances(points) -> np.ndarray:
    """Distance from every point to its nearest other point.

    Parameters
    ----------
    points : (N, 2) array_like
        Finite ``(row, col)`` coordinates.

    Returns
    -------
    (N,) float64 ndarray
        Empty when ``N < 2`` (no neighbour exists).
    """
    pts = as_points(points, "points")
    if len(pts) < 2:
        return np.zeros(0, dtype=np.float64)
    d, _ = cKDTree(pts).query(pts, k=2)
    return d[:, 1].astype(np.float64)


def _window_starts(length: int, size: int, stride: int) -> np.ndarray:
    starts = np.arange(0, length - size + 1, stride)
    if starts[-1] != length - size:
        starts = np.append(starts, length - size)
    return starts


def window_counts(points, shape, size: int = 256, stride: int = 64) -> np.ndarray:
    """Number of points in every ``size x size`` sliding window.

    Parameters
    ----------
    points : (N, 2) array_like
        ``(row, col)`` coordinates; each point counts in pixel ``floor(p + 0.5)`` (points outside ``shape`` are
        clipped to the border pixel).
    shape : (int, int)
        Image shape ``(H, W)``.
    size : int, optional
        Window side in pixels (at most ``min(H, W)``).
    stride : int, optional
        Step between windows. The last window of each row/column is aligned with the image border, so every
        pixel is covered.

    Returns
    -------
    (M,) int64 ndarray
        Counts, row-major over the window grid.

    Raises
    ------
    ValueError
        If ``size`` or ``stride`` is not a positive integer or ``size`` exceeds the image.
    """
    h, w = as_shape(shape)
    pts = as_points(points, "points")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if size > min(h, w):
        raise ValueError(f"size ({size}) must not exceed the image shape {(h, w)}")
    img = np.zeros((h, w), dtype=np.int64)
    if len(pts):
        r = np.clip(np.floor(pts[:, 0] + 0.5).astype(np.int64), 0, h - 1)
        c = np.clip(np.floor(pts[:, 1] + 0.5).astype(np.int64), 0, w - 1)
        np.add.at(img, (r, c), 1)
    cs = np.zeros((h + 1, w + 1), dtype=np.int64)
    cs[1:, 1:] = img.cumsum(0).cumsum(1)
    rr, cc = np.meshgrid(_window_starts(h, size, stride), _window_starts(w, size, stride), indexing="ij")
    return (cs[rr + size, cc + size] - cs[rr, cc + size] - cs[rr + size, cc] + cs[rr, cc]).ravel()


def ripley_k(points, shape, radii) -> np.ndarray:
    """Ripley's K function with the translation edge correction.

    ``K(r) = |A| / (n (n - 1)) * sum_{i != j} 1(d_ij <= r) |A| / |A intersect (A + x_i - x_j)|``; a Poisson process
    has ``K(r) = pi r^2``, clustering makes it larger, inhibition smaller.

    Parameters
    ----------
    points : (N, 2) array_like
        Points inside ``shape``.
    shape : (int, int)
        The observation window ``(H, W)``.
    radii : (R,) array_like
        Non-negative radii, smaller than the window.

    Returns
    -------
    (R,) float64 ndarray

    Raises
    ------
    ValueError
        With fewer than 2 points, or radii that are negative, non-finite or not smaller than the window.
    """
    h, w = as_shape(shape)
    pts = as_points(points, "points")
    r = np.asarray(radii, dtype=np.float64).ravel()
    if len(pts) < 2:
        raise ValueError(f"points must hold at least 2 points to estimate Ripley's K, got {len(pts)}")
    if r.size == 0 or not np.all(np.isfinite(r)) or r.min() < 0 or r.max() >= min(h, w):
        raise ValueError(f"radii must be finite, non-negative and smaller than the window {(h, w)}")
    n, area = len(pts), float(h * w)
    pairs = cKDTree(pts).query_pairs(float(r.max()), output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros_like(r)
    # each coordinate gathered from a contiguous array: the same differences as rows of the (N, 2) arrays, a quarter
    # faster (the fits' calibrating simulations call this dozens of times)
    i, j = np.ascontiguousarray(pairs.T)
    rows, cols = np.ascontiguousarray(pts.T)
    dr, dc = rows[i] - rows[j], cols[i] - cols[j]
    dist = np.hypot(dr, dc)
    weight = 1.0 / ((h - np.abs(dr)) * (w - np.abs(dc)))
    order = np.argsort(dist)
    cum = np.concatenate([[0.0], np.cumsum(weight[order])])
    k = np.searchsorted(dist[order], r, side="right")
    return 2.0 * cum[k] * area * area / (n * (n - 1))


# ----------------------------------------------------------------------------------------------------------------
# Point-process parameters
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PointProcessParams:
    """Parameters of the point processes of :func:`random_points`.

    Attributes
    ----------
    intensity : float
        Expected points per pixel (``n / (H * W)``); ``>= 0``.
    min_distance : float
        Hard-core distance in pixels: no two points of the ``"hardcore"`` and ``"cluster"`` processes are closer.
        ``>= 0`` (0 = no hard core).
    cluster_sigma : float
        Standard deviation (pixels) of the isotropic Gaussian that scatters a Thomas cluster's points around its
        parent; ``> 0``.
    parent_intensity : float
        Cluster centres (parents) per pixel; ``> 0``. ``intensity / parent_intensity`` is the mean cluster size.
        ``parent_intensity >= 100 * intensity`` (what the fit returns for unclustered data) means no clustering.
    source : str
        Free text saying where the numbers come from (a fit, a file, by hand).
    """

    intensity: float
    min_distance: float = 0.0
    cluster_sigma: float = 50.0
    parent_intensity: float = 1e-4
    source: str = ""

    def __post_init__(self) -> None:
        for f, lower, strict in (
            ("intensity", 0.0, False),
            ("min_distance", 0.0, False),
            ("cluster_sigma", 0.0, True),
            ("parent_intensity", 0.0, True),
        ):
            value = getattr(self, f)
            if isinstance(value, bool):
                raise ValueError(f"{f} must be a number, got {value!r}")
            try:
                x = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{f} must be a number, got {value!r}") from None
            if not math.isfinite(x) or x < lower or (strict and x == lower):
                op = ">" if strict else ">="
                raise ValueError(f"{f} must be finite and {op} {lower}, got {value!r}")
            object.__setattr__(self, f, x)
        if not isinstance(self.source, str):
            raise ValueError(f"source must be a string, got {type(self.source).__name__}")

    @property
    def mean_cluster_size(self) -> float:
        """Mean number of points per Thomas cluster, ``intensity / parent_intensity``."""
        return self.intensity / self.parent_intensity

    @property
    def clustered(self) -> bool:
        """False when the parents are so dense (>= 100 per point) that the layout is effectively unclustered."""
        return self.parent_intensity < _NO_CLUSTER_PARENTS_PER_POINT * self.intensity * (1 - 1e-9)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "PointProcessParams":
        """Inverse of :meth:`to_dict`. Unknown keys are refused with a ``ValueError`` naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"data must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"data holds unknown point-process parameters {unknown}; expected keys {sorted(known)}")
        if "intensity" not in data:
            raise ValueError("data must hold 'intensity'")
        return cls(**dict(data))

    def save(self, path) -> None:
        """Write the parameters as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "PointProcessParams":
        """Read parameters written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


_DEFAULT_CACHE: list[PointProcessParams] = []


def default_point_process() -> PointProcessParams:
    """The default parameters, fitted on the 30 MoNuSeg 2018 training tiles.

    Produced by ``python benchmarks/bench_layouts.py --write-default`` (per-tile fits of
    :func:`fit_point_process`; pooled intensity, median hard core, sigma and mean cluster size) and stored in
    ``src/napari_nucsynth/data/default_point_process.json``.
    """
    if not _DEFAULT_CACHE:
        _DEFAULT_CACHE.append(PointProcessParams.load(_DEFAULT_FILE))
    return _DEFAULT_CACHE[0]


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------
def _uniform_proposer(shape: tuple[int, int], rng: np.random.Generator):
    lo = np.array([-0.5, -0.5])
    hi = np.array([shape[0] - 0.5, shape[1] - 0.5])

    def propose(m: int) -> np.ndarray:
        return rng.uniform(lo, hi, size=(m, 2))

    return propose


def _split(rng: np.random.Generator) -> tuple[np.random.Generator, np.random.Generator]:
    try:
        a, b = rng.spawn(2)
    except (AttributeError, TypeError, ValueError):  # a Generator without a SeedSequence
        seeds = rng.integers(0, 2**63, size=2)
        a, b = np.random.default_rng(int(seeds[0])), np.random.default_rng(int(seeds[1]))
    return a, b


def _poisson_ppf(u: float, mean: float) -> int:
    """The Poisson(mean) quantile of ``u``: the smallest k with CDF(k) >= u (monotone in ``mean``)."""
    half = 12.0 * math.sqrt(mean) + 20.0  # the CDF is 0 or 1 to double precision outside mean +- half
    ks = np.arange(max(0, int(mean - half)), int(mean + half) + 1)
    return int(ks[min(np.searchsorted(pdtr(ks, mean), u), len(ks) - 1)])


def _thomas_proposer(shape: tuple[int, int], params: PointProcessParams, n: int, rng: np.random.Generator):
    """Proposals from one realisation of the Thomas intensity field (parents fixed, children i.i.d.)."""
    h, w = shape
    sigma = params.cluster_sigma
    margin = 4.0 * sigma
    ext = (h + 2 * margin) * (w + 2 * margin)
    expected_parents = params.parent_intensity * ext
    if not params.clustered or expected_parents > _NO_CLUSTER_PARENTS_PER_POINT * max(n, 1) + 1e5:
        return _uniform_proposer(shape, rng)  # parents so dense that the field is flat
    # Parents come from their own stream, their number by inversion of one uniform and their positions as a prefix
    # of one sequence: a realisation changes smoothly with parent_intensity (common random numbers for the fit).
    # Conditioned on the window holding points, there is at least one parent.
    parent_rng, rng = _split(rng)
    n_par = max(1, int(_poisson_ppf(parent_rng.random(), expected_parents)))
    lo = np.array([-0.5 - margin, -0.5 - margin])
    parents = lo + parent_rng.random((n_par, 2)) * np.array([h + 2 * margin, w + 2 * margin])
    oversample = int(math.ceil(ext / (h * w)))
    hi = np.array([h - 0.5, w - 0.5])
    fallback = _uniform_proposer(shape, rng)

    def propose(m: int) -> np.ndarray:
        mm = min(m * oversample, 2_000_000)
        c = parents[rng.integers(0, n_par, mm)] + rng.normal(0.0, sigma, size=(mm, 2))
        ok = np.all((c >= -0.5) & (c <= hi), axis=1)
        c = c[ok][:m]
        return c if len(c) else fallback(min(m, 16))  # parents all far outside: keep the loop moving

    return propose


def _inhibit(propose, n: int, min_distance: float, process: str, spill=None) -> np.ndarray:
    """Random sequential inhibition: accept proposals farther than ``min_distance`` from accepted points.

    Each round proposes a batch, removes proposals too close to accepted points (KD-tree query), then thins
    conflicts inside the batch Matérn-II style (a proposal is dropped if an earlier one of the batch is too close).
    Bounded by ``_PROPOSALS_PER_POINT * n + 10_000`` proposals and ``_MAX_ROUNDS`` rounds. With ``spill`` (a
    second proposer), proposals switch to it once ``_SPILL_AFTER * n + 2000`` proposals have not placed all points
    (clusters too dense to hold their points under the hard core).
    """
    accepted: list[np.ndarray] = []
    n_acc = 0
    total = 0
    budget = _PROPOSALS_PER_POINT * n + 10_000
    rate = 1.0
    tree = None
    for _ in range(_MAX_ROUNDS):
        need = n - n_acc
        if need <= 0 or total >= budget:
            break
        if spill is not None and total >= _SPILL_AFTER * n + 2000:
            propose, spill = spill, None
        m = int(min(max(need / rate * 1.2, 64), 100_000, budget - total + 64))
        cand = propose(m)
        total += m
        if min_distance > 0 and len(cand):
            if tree is not None:
                d, _ = tree.query(cand, k=1, distance_upper_bound=min_distance)
                cand = cand[d >= min_distance]
            if len(cand) > 1:
                pairs = cKDTree(cand).query_pairs(min_distance, output_type="ndarray")
                if len(pairs):
                    keep = np.ones(len(cand), dtype=bool)
                    keep[pairs.max(axis=1)] = False
                    cand = cand[keep]
        cand = cand[:need]
        rate = max(len(cand) / m, 1e-3)
        if len(cand):
            accepted.append(cand)
            n_acc += len(cand)
            if min_distance > 0:
                tree = cKDTree(np.concatenate(accepted))
    out = np.concatenate(accepted) if accepted else np.zeros((0, 2))
    if len(out) < n:
        warnings.warn(
            f"random_points: placed only {len(out)} of {n} points with min_distance={min_distance:g} "
            f"(process={process!r}) within the proposal budget; the requested density is too close to the "
            "packing limit of random sequential inhibition (a covered fraction of about 0.55)",
            RuntimeWarning,
            stacklevel=3,
        )
    return np.ascontiguousarray(out, dtype=np.float64)


def _draw(shape, process: str, params: PointProcessParams, n: int, rng: np.random.Generator) -> np.ndarray:
    if n == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if process == "poisson":
        return _uniform_proposer(shape, rng)(n)
    d = params.min_distance
    fraction = n * math.pi * d * d / 4.0 / (shape[0] * shape[1])
    if fraction > _HEX_PACKING:
        raise ValueError(
            f"n={n} points with min_distance={d:g} cannot fit in shape {shape}: discs of diameter min_distance "
            f"would cover {fraction:.2f} of the image, above the densest packing {_HEX_PACKING:.3f}; lower n or "
            "min_distance"
        )
    if process == "hardcore":
        return _inhibit(_uniform_proposer(shape, rng), n, d, process)
    return _inhibit(_thomas_proposer(shape, params, n, rng), n, d, process, spill=_uniform_proposer(shape, rng))


def random_points(
    shape,
    *,
    process: str = "cluster",
    params: PointProcessParams | None = None,
    n: int | None = None,
    seed: SeedLike = None,
) -> np.ndarray:
    """Draw a random nucleus layout.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(H, W)``; points lie in ``[-0.5, H - 0.5] x [-0.5, W - 0.5]``.
    process : {"cluster", "hardcore", "poisson"}
        * ``"poisson"``: homogeneous Poisson process (points i.i.d. uniform); ignores ``min_distance``.
        * ``"hardcore"``: random sequential inhibition (RSI, a Matérn-type hard-core process): uniform proposals
          are accepted when farther than ``params.min_distance`` from every accepted point.
        * ``"cluster"``: a Thomas cluster process with the hard core applied too (nuclei never overlap): parents
          are Poisson with ``params.parent_intensity`` (in a margin of ``4 * cluster_sigma`` around the image, so
          clusters straddle the border), proposals are drawn from the Gaussian clusters (sigma
          ``params.cluster_sigma``) and accepted by RSI as above. Dense clusters therefore saturate at the hard
          core's packing instead of stacking nuclei; when the clusters cannot hold all ``n`` points (still short
          after ``20 n + 2000`` proposals), the remaining points are proposed uniformly over the image (they
          spill over into the background).
    params : PointProcessParams, optional
        ``None`` uses :func:`default_point_process` (fitted on MoNuSeg).
    n : int, optional
        Number of points. ``None`` draws it from ``Poisson(params.intensity * H * W)``; the processes then place
        that many points, i.e. the layout is drawn conditionally on its count.
    seed : int, numpy.random.Generator or None
        Randomness; the same seed gives the same layout.

    Returns
    -------
    (n, 2) float64 ndarray
        ``(row, col)`` points in acceptance order.

    Raises
    ------
    ValueError
        For a bad ``shape``, ``process``, ``params``, ``n`` or ``seed``; or when ``n`` discs of diameter
        ``min_distance`` cannot fit even in the densest (hexagonal) packing.

    Warns
    -----
    RuntimeWarning
        When the hard core leaves no room for all ``n`` points within the bounded proposal budget
        (``200 n + 10000`` proposals; RSI jams at a covered fraction of about 0.55): the points placed so far are
        returned, fewer than ``n``. Sampling never loops forever.

    Notes
    -----
    A 1000 x 1000 layout of about 700 points takes a few milliseconds on one core.
    """
    dims = as_shape(shape)
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
    if params is None:
        params = default_point_process()
    if not isinstance(params, PointProcessParams):
        raise ValueError(f"params must be a PointProcessParams or None, got {type(params).__name__}")
    rng = as_rng(seed)
    if n is None:
        n = int(rng.poisson(params.intensity * dims[0] * dims[1]))
    elif isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer or None, got {n!r}")
    return _draw(dims, process, params, int(n), rng)


# ----------------------------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------------------------
def _thomas_k(r: np.ndarray, log_inv_kappa: float, log_sigma: float) -> np.ndarray:
    sigma = math.exp(log_sigma)
    return math.pi * r * r + math.exp(log_inv_kappa) * (1.0 - np.exp(-r * r / (4.0 * sigma * sigma)))


def _contrast_fit(r: np.ndarray, k: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Diggle's minimum contrast: least squares of ``K^(1/4)`` against the Thomas K; a few starts in sigma."""
    target = np.maximum(k, 0.0) ** 0.25

    def resid(theta):
        return _thomas_k(r, theta[0], theta[1]) ** 0.25 - target

    excess = float(k[-1] - math.pi * r[-1] ** 2)
    start0 = math.log(max(excess, math.exp(lower[0])))
    from scipy.optimize import least_squares  # only fits need it (and it is 50 ms of every start-up)

    best = None
    for s0 in np.linspace(lower[1], upper[1], 5)[1:-1]:
        x0 = np.clip([start0, s0], lower + 1e-6, upper - 1e-6)
        sol = least_squares(resid, x0, bounds=(lower, upper))
        if best is None or sol.cost < best.cost:
            best = sol
    return best.x


def fit_point_process(labels_or_points, shape=None, *, seed: SeedLike = 0) -> PointProcessParams:
    """Fit the parameters of :func:`random_points` to a real layout.

    Parameters
    ----------
    labels_or_points : (H, W) integer label map, or (N, 2) points
        With ``shape=None`` an instance label map (its :func:`centroids` are the points); with ``shape`` given,
        ``(row, col)`` points inside that shape.
    shape : (int, int), optional
        The image shape of the points. Required for points.
    seed : int, numpy.random.Generator or None, optional
        Randomness of the simulations that calibrate the clustering. The default 0 makes the fit deterministic.

    Returns
    -------
    PointProcessParams

    Raises
    ------
    ValueError
        For bad input, points outside ``shape``, or fewer than 2 points (an empty map or a single nucleus has no
        nearest-neighbour distance, so no density structure can be fitted).

    Notes
    -----
    * ``intensity = n / (H * W)``.
    * ``min_distance`` is the 5 % quantile of the nearest-neighbour distances. The minimum itself is set by the
      odd pair of split or overlapping annotations; a low quantile is robust to them and, on the MoNuSeg training
      tiles, gave the closest nearest-neighbour distributions among the 1-12 % quantiles.
    * Clustering: Diggle's minimum contrast fit of the Thomas K function,
      ``K(r) = pi r^2 + (1 - exp(-r^2 / (4 sigma^2))) / kappa``, to the translation-corrected :func:`ripley_k`
      over ``2 * min_distance <= r <= min(250, min(H, W) / 4)`` on the ``K^(1/4)`` scale, with
      ``sigma <= min(250, min(H, W) / 4)``. The hard core dilutes dense clusters, so the clustering strength
      ``1 / kappa`` is then calibrated by simulation: 6 realisations of the hard-core Thomas process at the fit
      and the data's ``n`` check whether their mean ``K^(1/4)`` (over the same radii) falls short of the
      data's by more than two standard errors; only then a bisection (7 steps of 4 realisations, common random
      numbers, strength raised at most e^4-fold) finds the strength whose simulated statistic matches the
      data's. About 0.1-1 s per 1000 x 1000 tile.
    * No clustering (K at or below the Poisson value) and fewer than 20 points (K too noisy) give
      ``parent_intensity = 100 * intensity`` (an unclustered layout) and ``cluster_sigma = max(min_distance, 1)``.
    """
    if shape is None:
        arr = np.asarray(labels_or_points)
        if arr.ndim == 2 and arr.shape[1] == 2 and arr.dtype.kind == "f":
            raise ValueError("shape is required when labels_or_points holds (N, 2) points rather than a label map")
        lab = as_labels(arr, "labels_or_points")
        dims = lab.shape
        pts = centroids(lab)
    else:
        dims = as_shape(shape)
        pts = as_points(labels_or_points, "labels_or_points")
        outside = ~_inside(pts, dims)
        if outside.any():
            raise ValueError(
                f"labels_or_points holds {int(outside.sum())} points outside shape {dims} "
                f"(rows {np.flatnonzero(outside)[:10].tolist()})"
            )
    n = len(pts)
    if n < 2:
        raise ValueError(f"labels_or_points must hold at least 2 nuclei to fit a point process, got {n}")
    area = float(dims[0] * dims[1])
    lam = n / area
    nn = nearest_neighbour_distances(pts)
    d = float(np.quantile(nn, HARDCORE_QUANTILE))
    rmax = min(_K_RMAX, min(dims) / 4.0)
    r_lo = max(2.0 * d, rmax / 25.0)
    unclustered = PointProcessParams(
        intensity=lam,
        min_distance=d,
        cluster_sigma=max(d, 1.0),
        parent_intensity=_NO_CLUSTER_PARENTS_PER_POINT * lam,
        source="fit_point_process (no clustering)",
    )
    if n < _MIN_POINTS_FOR_CLUSTERING or r_lo >= rmax / 2.0:
        return unclustered
    r = np.linspace(r_lo, rmax, _K_RADII)
    k_data = ripley_k(pts, dims, r)
    lower = np.array([math.log(1.0 / (_NO_CLUSTER_PARENTS_PER_POINT * lam)), math.log(max(1.0, d / 2.0))])
    upper = np.array([math.log(10.0 * area), math.log(rmax)])
    if lower[1] >= upper[1]:
        return unclustered
    theta = _contrast_fit(r, k_data, lower, upper)
    if theta[0] <= lower[0] + 1e-3:
        return unclustered

    base = int(as_rng(seed).integers(2**62))
    stat_data = float(np.mean(k_data**0.25))

    def params_at(log_inv_kappa: float) -> PointProcessParams:
        return PointProcessParams(lam, d, math.exp(theta[1]), math.exp(-log_inv_kappa), "fit_point_process")

    def simulated_stats(log_inv_kappa: float, realisations: int) -> np.ndarray:
        rng = np.random.default_rng(base)  # common random numbers: a smooth, monotone objective
        p = params_at(log_inv_kappa)
        vals = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(realisations):
                sim = _draw(dims, "cluster", p, n, rng)
                vals.append(np.mean(ripley_k(sim, dims, r) ** 0.25) if len(sim) >= 2 else 0.0)
        return np.asarray(vals)

    def simulated_stat(log_inv_kappa: float) -> float:
        return float(np.mean(simulated_stats(log_inv_kappa, _CALIB_REALISATIONS)))

    lo = float(theta[0])
    best = lo
    at_fit = simulated_stats(lo, _CALIB_CHECK_REALISATIONS)
    # Calibrate only when the simulated statistic falls short of the data's by more than two standard errors:
    # otherwise the shortfall is Monte-Carlo noise and bisecting on it would inflate weak clustering.
    if stat_data - np.mean(at_fit) > 2.0 * np.std(at_fit, ddof=1) / math.sqrt(len(at_fit)):
        hi = min(lo + 4.0, float(upper[0]))
        for _ in range(_CALIB_STEPS):
            mid = 0.5 * (lo + hi)
            if simulated_stat(mid) < stat_data:
                lo = mid
            else:
                hi = mid
        best = 0.5 * (lo + hi)
    return params_at(best)


# ----------------------------------------------------------------------------------------------------------------
# Point sets and their augmentations (DAFF-GAN)
# ----------------------------------------------------------------------------------------------------------------
def _inside(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return (
        (points[:, 0] >= -0.5)
        & (points[:, 0] <= shape[0] - 0.5)
        & (points[:, 1] >= -0.5)
        & (points[:, 1] <= shape[1] - 0.5)
    )


@dataclass(frozen=True)
class CoverRegion:
    """The region removed by :meth:`PointSet.cover`.

    Attributes
    ----------
    kind : {"rectangle", "disc"}
    bounds : tuple of float
        ``(row0, col0, row1, col1)`` for a rectangle (closed); ``(row, col, radius)`` for a disc (closed).
    """

    kind: str
    bounds: tuple

    def contains(self, points) -> np.ndarray:
        """Boolean mask of the points inside the region (borders included)."""
        pts = as_points(points, "points")
        if self.kind == "rectangle":
            r0, c0, r1, c1 = self.bounds
            return (pts[:, 0] >= r0) & (pts[:, 0] <= r1) & (pts[:, 1] >= c0) & (pts[:, 1] <= c1)
        r, c, rad = self.bounds
        return (pts[:, 0] - r) ** 2 + (pts[:, 1] - c) ** 2 <= rad * rad

    def area(self) -> float:
        """Area of the region in pixels (its part inside the image for a rectangle, the whole disc otherwise)."""
        if self.kind == "rectangle":
            r0, c0, r1, c1 = self.bounds
            return float((r1 - r0) * (c1 - c0))
        return float(math.pi * self.bounds[2] ** 2)


@dataclass(frozen=True)
class CutLine:
    """The straight cut of :meth:`PointSet.combine`: the line through ``point`` with normal ``normal``.

    ``side(points)`` is True on the side the normal points to (where the first set's points are kept).
    """

    point: tuple
    normal: tuple

    def side(self, points) -> np.ndarray:
        pts = as_points(points, "points")
        return (pts - np.asarray(self.point)) @ np.asarray(self.normal) >= 0


@dataclass
class PointSet:
    """A nucleus layout: points, the image shape they live in and one class per point.

    Every method returns a new :class:`PointSet` and carries each point's class with it.

    Parameters
    ----------
    points : (N, 2) array_like
        Finite ``(row, col)`` coordinates inside ``shape`` (``[-0.5, H - 0.5] x [-0.5, W - 0.5]``); an empty
        list gives an empty set.
    shape : (int, int)
        Image shape ``(H, W)``.
    classes : (N,) array_like of non-negative int, optional
        Per-point class; ``None`` gives zeros.

    Raises
    ------
    ValueError
        For NaN/infinite or malformed points, points outside ``shape``, a shape that is not 2-D and positive, or
        classes that are not one non-negative integer per point.
    """

    points: np.ndarray
    shape: tuple
    classes: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        self.shape = as_shape(self.shape)
        self.points = as_points(self.points, "points").copy()
        self.classes = as_classes(self.classes, len(self.points), "classes").copy()
        out = ~_inside(self.points, self.shape)
        if out.any():
            raise ValueError(
                f"points holds {int(out.sum())} points outside shape {self.shape} "
                f"(rows {np.flatnonzero(out)[:10].tolist()}); keep them in [-0.5, H - 0.5] x [-0.5, W - 0.5]"
            )

    # -- basics ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.points)

    def __eq__(self, other) -> bool:
        if not isinstance(other, PointSet):
            return NotImplemented
        return (
            self.shape == other.shape
            and np.array_equal(self.points, other.points)
            and np.array_equal(self.classes, other.classes)
        )

    @classmethod
    def from_labels(cls, labels, class_map=None) -> "PointSet":
        """The centroids of a label map; each point's class is the majority of ``class_map`` over its nucleus.

        Parameters
        ----------
        labels : (H, W) integer label map
        class_map : (H, W) non-negative integer map, optional
            Per-pixel class (type map). ``None`` gives class 0 everywhere.
        """
        lab = as_labels(labels, "labels")
        pts, ids = centroids(lab, return_ids=True)
        if class_map is None:
            return cls(pts, lab.shape)
        cm = np.asarray(class_map)
        if cm.shape != lab.shape:
            raise ValueError(f"class_map must have the shape of labels {lab.shape}, got {cm.shape}")
        if not np.issubdtype(cm.dtype, np.integer) or (cm.size and cm.min() < 0):
            raise ValueError("class_map must hold non-negative integer classes")
        fg = lab.ravel() > 0
        if not fg.any():
            return cls(pts, lab.shape)
        _, inv = np.unique(lab.ravel()[fg], return_inverse=True)
        cls_vals = cm.ravel()[fg].astype(np.int64)
        ncls = int(cls_vals.max()) + 1
        votes = np.bincount(inv * ncls + cls_vals, minlength=len(ids) * ncls).reshape(len(ids), ncls)
        return cls(pts, lab.shape, votes.argmax(axis=1))

    def _subset(self, keep: np.ndarray, points: np.ndarray | None = None, shape=None) -> "PointSet":
        pts = self.points if points is None else points
        return PointSet(pts[keep], self.shape if shape is None else shape, self.classes[keep])

    # -- geometric transforms ---------------------------------------------------------------------------------
    def flip(self, axis: int) -> "PointSet":
        """Mirror the layout as ``numpy.flip(image, axis)`` mirrors its image.

        ``axis=0`` maps ``row -> H - 1 - row``; ``axis=1`` maps ``col -> W - 1 - col`` (``-2``/``-1`` also work).
        """
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis not in (0, 1, -1, -2):
            raise ValueError(f"axis must be 0 (rows) or 1 (columns), got {axis!r}")
        ax = int(axis) % 2
        pts = self.points.copy()
        pts[:, ax] = self.shape[ax] - 1 - pts[:, ax]
        return PointSet(pts, self.shape, self.classes)

    def rot90(self, k: int = 1) -> "PointSet":
        """Rotate by ``k`` quarter turns as ``numpy.rot90(image, k)`` rotates its image.

        One turn maps ``(row, col) -> (W - 1 - col, row)`` and the shape ``(H, W) -> (W, H)``; odd ``k`` swap the
        shape (non-square shapes are fine), negative ``k`` turn the other way and ``k % 4 == 0`` is the identity.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be an integer number of quarter turns, got {k!r}")
        pts, shape = self.points.copy(), self.shape
        for _ in range(int(k) % 4):
            pts = np.stack([shape[1] - 1 - pts[:, 1], pts[:, 0]], axis=1)
            shape = (shape[1], shape[0])
        return PointSet(pts, shape, self.classes)

    def affine(self, matrix, shape=None) -> "PointSet":
        """Apply ``p' = A p + t`` in ``(row, col)`` coordinates; points landing outside the shape are dropped.

        Parameters
        ----------
        matrix : (2, 3) or (3, 3) array_like
            ``[[a, b, t_row], [c, d, t_col]]`` (a 3 x 3 matrix must have last row ``[0, 0, 1]``).
        shape : (int, int), optional
            Output shape; defaults to the current one.
        """
        m = np.asarray(matrix, dtype=np.float64) if not isinstance(matrix, np.ndarray) else matrix.astype(float)
        if m.shape not in ((2, 3), (3, 3)):
            raise ValueError(f"matrix must be a 2x3 or 3x3 affine matrix in (row, col) coordinates, got {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError("matrix must hold finite numbers")
        if m.shape == (3, 3) and not np.allclose(m[2], [0.0, 0.0, 1.0]):
            raise ValueError(f"matrix must be affine: its last row must be [0, 0, 1], got {m[2].tolist()}")
        out_shape = self.shape if shape is None else as_shape(shape)
        pts = self.points @ m[:2, :2].T + m[:2, 2]
        return PointSet(pts[_inside(pts, out_shape)], out_shape, self.classes[_inside(pts, out_shape)])

    def random_affine(
        self,
        seed: SeedLike = None,
        max_rotation: float = 180.0,
        scale: tuple[float, float] = (0.9, 1.1),
        shear: float = 10.0,
        translate: float = 0.1,
    ) -> "PointSet":
        """A random affine map about the image centre (then :meth:`affine`: points leaving the image drop).

        Parameters
        ----------
        seed : int, numpy.random.Generator or None
        max_rotation : float
            Rotation drawn uniformly in ``[-max_rotation, max_rotation]`` degrees.
        scale : (float, float)
            Isotropic scale drawn log-uniformly in ``[low, high]``, ``0 < low <= high``.
        shear : float
            Shear angle drawn uniformly in ``[-shear, shear]`` degrees, ``0 <= shear < 90``.
        translate : float
            Shift drawn uniformly in ``[-translate, translate]`` times the image side, per axis, ``0 <= translate
            <= 1``.
        """
        rng = as_rng(seed)
        for name, v in (("max_rotation", max_rotation), ("shear", shear), ("translate", translate)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
        if shear >= 90:
            raise ValueError(f"shear must be below 90 degrees, got {shear!r}")
        if translate > 1:
            raise ValueError(f"translate must be at most 1 (a fraction of the image side), got {translate!r}")
        try:
            lo_s, hi_s = (float(s) for s in scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale must be a (low, high) pair, got {scale!r}") from None
        if not (math.isfinite(lo_s) and math.isfinite(hi_s) and 0 < lo_s <= hi_s):
            raise ValueError(f"scale must satisfy 0 < low <= high, got {scale!r}")
        a = math.radians(rng.uniform(-max_rotation, max_rotation))
        sh = math.tan(math.radians(rng.uniform(-shear, shear)))
        s = math.exp(rng.uniform(math.log(lo_s), math.log(hi_s)))
        t = rng.uniform(-translate, translate, 2) * np.asarray(self.shape)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        lin = rot @ np.array([[1.0, sh], [0.0, 1.0]]) * s
        centre = (np.asarray(self.shape, dtype=float) - 1.0) / 2.0
        offset = centre + t - lin @ centre
        return self.affine(np.concatenate([lin, offset[:, None]], axis=1))

    # -- DAFF-GAN's cover and combination ----------------------------------------------------------------------
    def cover(
        self,
        seed: SeedLike = None,
        fraction: float = 0.25,
        kind: str = "rectangle",
        return_region: bool = False,
    ):
        """Random cover: drop the points inside a random region of about ``fraction`` of the image area.

        Parameters
        ----------
        seed : int, numpy.random.Generator or None
        fraction : float
            Target covered fraction in ``[0, 1]``.
        kind : {"rectangle", "disc"}
            ``"rectangle"``: axis-aligned, aspect ratio log-uniform in ``[1/2, 2]``, sides clipped to the image
            (the other side then grows to keep the area), placed uniformly inside the image; covers exactly
            ``fraction`` unless clipping at both sides makes it the whole image. ``"disc"``: radius
            ``sqrt(fraction * H * W / pi)``, centre uniform over the positions that keep the disc inside the
            image when it fits, otherwise over the image (then less than ``fraction`` is covered).
        return_region : bool
            Also return the :class:`CoverRegion`.

        Returns
        -------
        PointSet, or (PointSet, CoverRegion)
        """
        rng = as_rng(seed)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)) or not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
        if kind not in ("rectangle", "disc"):
            raise ValueError(f"kind must be 'rectangle' or 'disc', got {kind!r}")
        h, w = self.shape
        area = fraction * h * w
        if kind == "rectangle":
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            rh = min(float(h), math.sqrt(area * aspect))
            rw = min(float(w), area / rh if rh > 0 else 0.0)
            rh = min(float(h), area / rw) if rw > 0 else rh
            r0 = rng.uniform(0.0, h - rh) - 0.5
            c0 = rng.uniform(0.0, w - rw) - 0.5
            region = CoverRegion("rectangle", (r0, c0, r0 + rh, c0 + rw))
        else:
            rad = math.sqrt(area / math.pi)
            rc = rng.uniform(rad, h - rad) - 0.5 if 2 * rad <= h else rng.uniform(0, h) - 0.5
            cc = rng.uniform(rad, w - rad) - 0.5 if 2 * rad <= w else rng.uniform(0, w) - 0.5
            region = CoverRegion("disc", (rc, cc, rad))
        out = self._subset(~region.contains(self.points)) if fraction > 0 else self._subset(np.ones(len(self), bool))
        return (out, region) if return_region else out

    def combine(
        self,
        other: "PointSet",
        seed: SeedLike = None,
        min_distance: float | None = None,
        return_cut: bool = False,
    ):
        """DAFF-GAN's combination of two layouts of the same shape along a random straight cut.

        A line through a uniform random point of the image with a uniform random direction splits it in two;
        the result holds the points of ``self`` on one side and those of ``other`` on the other side, minus the
        points of ``other`` closer than ``min_distance`` to a kept point of ``self`` (nuclei never overlap across
        the seam). Classes of both sets are kept.

        Parameters
        ----------
        other : PointSet
            Same ``shape`` as ``self``.
        seed : int, numpy.random.Generator or None
        min_distance : float, optional
            ``None`` uses the 5 % quantile of the nearest-neighbour distances of ``self`` and ``other`` pooled
            (the hard-core rule of :func:`fit_point_process`; 0 when neither has 2 points).
        return_cut : bool
            Also return the :class:`CutLine` (``side(p)`` True where ``self`` is kept).

        Returns
        -------
        PointSet, or (PointSet, CutLine)
            Points of ``self`` first, then those of ``other``.
        """
        if not isinstance(other, PointSet):
            raise ValueError(f"other must be a PointSet, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"other must have the same shape as self {self.shape}, got {other.shape}")
        rng = as_rng(seed)
        if min_distance is None:
            nn = np.concatenate([nearest_neighbour_distances(self.points), nearest_neighbour_distances(other.points)])
            min_distance = float(np.quantile(nn, HARDCORE_QUANTILE)) if nn.size else 0.0
        elif (
            isinstance(min_distance, bool)
            or not isinstance(min_distance, (int, float, np.number))
            or not math.isfinite(min_distance)
            or min_distance < 0
        ):
            raise ValueError(f"min_distance must be a finite non-negative number or None, got {min_distance!r}")
        h, w = self.shape
        p0 = (float(rng.uniform(-0.5, h - 0.5)), float(rng.uniform(-0.5, w - 0.5)))
        angle = rng.uniform(0.0, 2.0 * math.pi)
        cut = CutLine(p0, (math.cos(angle), math.sin(angle)))
        mine = self.points[cut.side(self.points)]
        mine_cls = self.classes[cut.side(self.points)]
        keep_other = ~cut.side(other.points)
        if min_distance > 0 and len(mine) and keep_other.any():
            d, _ = cKDTree(mine).query(other.points, k=1, distance_upper_bound=min_distance)
            keep_other &= d >= min_distance
        out = PointSet(
            np.concatenate([mine, other.points[keep_other]]),
            self.shape,
            np.concatenate([mine_cls, other.classes[keep_other]]),
        )
        return (out, cut) if return_cut else out


#: Transforms :meth:`PointLibrary.augment` chooses from.
AUGMENTATIONS = ("flip", "rot90", "affine", "cover", "combine")


class PointLibrary:
    """A collection of real layouts and DAFF-GAN's random augmentations of them.

    Parameters
    ----------
    sets : iterable of PointSet, optional
    """

    def __init__(self, sets: Iterable[PointSet] = ()) -> None:
        self._sets: list[PointSet] = []
        for s in sets:
            self.add(s)

    @classmethod
    def from_label_maps(cls, label_maps: Sequence, class_maps: Sequence | None = None) -> "PointLibrary":
        """One :class:`PointSet` per label map (see :meth:`PointSet.from_labels`).

        Parameters
        ----------
        label_maps : sequence of (H, W) integer label maps
        class_maps : sequence of (H, W) class maps, optional
            Same length as ``label_maps``; ``None`` entries (or ``None``) give class 0.
        """
        maps = list(label_maps)
        if class_maps is None:
            cmaps = [None] * len(maps)
        else:
            cmaps = list(class_maps)
            if len(cmaps) != len(maps):
                raise ValueError(f"class_maps must hold one map per label map ({len(maps)}), got {len(cmaps)}")
        return cls(PointSet.from_labels(lab, cm) for lab, cm in zip(maps, cmaps))

    def add(self, point_set: PointSet) -> "PointLibrary":
        """Add a layout; returns the library (for chaining)."""
        if not isinstance(point_set, PointSet):
            raise ValueError(f"point_set must be a PointSet, got {type(point_set).__name__}")
        self._sets.append(point_set)
        return self

    def __len__(self) -> int:
        return len(self._sets)

    def __getitem__(self, index: int) -> PointSet:
        return self._sets[index]

    def __iter__(self) -> Iterator[PointSet]:
        return iter(self._sets)

    def augment(self, seed: SeedLike = None, n_transforms: int = 3) -> PointSet:
        """A random layout of the library passed through a random chain of transforms.

        Each of the ``n_transforms`` steps is drawn uniformly from :data:`AUGMENTATIONS`: a flip (random axis),
        a rotation by 1-3 quarter turns, :meth:`PointSet.random_affine` (defaults), a cover of a random rectangle
        or disc of 10-30 % of the area, or a combination with another random layout of the same shape (a step is
        redrawn among the others when no such layout exists).

        Raises
        ------
        ValueError
            If the library is empty or ``n_transforms`` is not a non-negative integer.
        """
        if not self._sets:
            raise ValueError("the PointLibrary is empty: add PointSets before augmenting")
        if isinstance(n_transforms, bool) or not isinstance(n_transforms, (int, np.integer)) or n_transforms < 0:
            raise ValueError(f"n_transforms must be a non-negative integer, got {n_transforms!r}")
        rng = as_rng(seed)
        current = self._sets[int(rng.integers(len(self._sets)))]
        for _ in range(int(n_transforms)):
            partners = [s for s in self._sets if s.shape == current.shape]
            names = [a for a in AUGMENTATIONS if a != "combine" or len(partners) > 0]
            name = names[int(rng.integers(len(names)))]
            if name == "flip":
                current = current.flip(int(rng.integers(2)))
            elif name == "rot90":
                current = current.rot90(int(rng.integers(1, 4)))
            elif name == "affine":
                current = current.random_affine(rng)
            elif name == "cover":
                kind = ("rectangle", "disc")[int(rng.integers(2))]
                current = current.cover(rng, fraction=float(rng.uniform(0.1, 0.3)), kind=kind)
            else:
                current = current.combine(partners[int(rng.integers(len(partners)))], rng)
        return current

    def sample(self, n: int, seed: SeedLike = None, n_transforms: int = 3) -> list[PointSet]:
        """``n`` independent :meth:`augment` draws (one generator, so the list is reproducible from ``seed``)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        rng = as_rng(seed)
        return [self.augment(rng, n_transforms) for _ in range(int(n))]
