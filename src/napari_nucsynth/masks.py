"""Nucleus instance masks from centroids, shape priors fitted to real tissue, and instance descriptors.

The shape model follows Points2Image (Li, Ren et al.): every point gets one nucleus whose area is drawn from a
distribution that shrinks with the local point density, with a random orientation and an eccentricity drawn from
real nuclei. The contour is made irregular as in Hou et al. (CVPR 2019): the ellipse's radius is modulated by a
few random Fourier harmonics, so nuclei are irregular blobs rather than perfect ellipses.

Pixels wanted by two nuclei go to the one whose contour they lie deeper inside (the smaller normalised radius), so
no pixel belongs to two nuclei while neighbours still touch, as in real tissue. The point at the centre of each
nucleus always belongs to it, so every point inside the image whose pixel is not shared with an earlier point gets
a nucleus.

Everything here is Qt-free and vectorised: sampling runs at tens of thousands of nuclei per second on one core and
:class:`MaskSampler` updates one nucleus among thousands in about a millisecond.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from scipy.special import ndtr

from ._checks import SeedLike, as_classes, as_labels, as_points, as_rgb, as_rng, as_shape

__all__ = [
    "ClassPrior",
    "ShapePrior",
    "NucleusShapes",
    "draw_shapes",
    "rasterize",
    "sample_masks",
    "MaskSampler",
    "semantic_map",
    "hv_maps",
    "distance_map",
    "direction_map",
    "descriptors",
]

#: Masks fitted to a real image's nuclei live in :mod:`napari_nucsynth.annotate`; these names are re-exported here
#: lazily (importing this module does not import that one).
_ANNOTATE_NAMES = frozenset({"fit_masks", "MaskFitter", "FitResult", "fit_methods"})


def __getattr__(name: str):
    if name in _ANNOTATE_NAMES:
        from . import annotate

        return getattr(annotate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: Fourier harmonics used to make contours irregular (k = 2..K_MAX).
HARMONICS = np.arange(2, 7)
#: Number of tiles or points below which the global density feature is shrunk towards the prior's reference.
_SHRINK_N = 30
_DEFAULT_PRIOR_FILE = Path(__file__).parent / "data" / "default_shape_prior.json"
_QUANTILES = np.linspace(0.0, 1.0, 101)


# ----------------------------------------------------------------------------------------------------------------
# Shape prior
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ClassPrior:
    """Shape statistics of one nucleus class.

    The area model is ``log(area) = intercept + slope_local * (log nn - g) + slope_global * (g - g_ref) + e``
    with ``e = sigma * z``, ``z`` drawn from the fitted within-tile residuals' own standardised distribution
    (``resid_quantiles``: real log areas are skewed, a long tail of small nuclei; a prior saved without them, as the
    shipped default, draws ``z ~ Normal(0, 1)``), where ``nn`` is a nucleus's nearest-neighbour distance (the local
    point density) and ``g`` is the log of the 10th percentile of nearest-neighbour distances in the whole layout (the tile's
    packing, which tracks typical nucleus size: touching nuclei cannot be closer than their radii allow).

    Attributes
    ----------
    intercept, slope_local, slope_global, sigma : float
        The area model above (log of pixels).
    g_ref : float
        The reference ``g`` of the data the prior was fitted on.
    log_nn_range : tuple of float
        ``log nn`` is clipped to this range (the fitted data's 1st to 99th percentile) before use, so an isolated
        point does not get an extrapolated giant nucleus.
    ecc_quantiles : list of float
        101 quantiles of the *drawn* ellipse eccentricity, calibrated so that the rasterised nuclei reproduce the
        real eccentricity distribution.
    irregularity : float
        Amplitude of the contour harmonics, calibrated to the real median solidity.
    area_range : tuple of float
        Drawn areas are clipped to this range (pixels).
    resid_quantiles : list of float or None
        101 quantiles of the standardised within-tile log-area residuals (fitted from at least 20 nuclei; None:
        normal residuals). A draw maps its standard normal number through them, so the random stream is the same.
    target : dict
        What the prior was fitted to reproduce (real quantiles of area, eccentricity, solidity; counts).
    """

    intercept: float
    slope_local: float
    slope_global: float
    sigma: float
    g_ref: float
    log_nn_range: tuple[float, float]
    ecc_quantiles: list[float]
    irregularity: float
    area_range: tuple[float, float]
    target: dict = field(default_factory=dict)
    resid_quantiles: list[float] | None = None

    def mean_log_area(self, log_nn: np.ndarray, g: float) -> np.ndarray:
        lo, hi = self.log_nn_range
        ln = np.clip(log_nn, lo, hi)
        return self.intercept + self.slope_local * (ln - g) + self.slope_global * (g - self.g_ref)


@dataclass
class ShapePrior:
    """Nucleus shape prior: one :class:`ClassPrior` per class, plus ``pooled`` for classes it has not seen.

    Fit it from real label maps with :meth:`fit` (one map) or :meth:`fit_many`; :meth:`default` loads the prior
    fitted on the 30 MoNuSeg training tiles that ships with the package.
    """

    pooled: ClassPrior
    per_class: dict[int, ClassPrior] = field(default_factory=dict)
    source: str = ""

    def for_class(self, cls: int) -> ClassPrior:
        """The prior of class ``cls``, or the pooled one where that class was not fitted."""
        return self.per_class.get(int(cls), self.pooled)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, labels, classes=None, *, calibrate: bool = True, seed: SeedLike = 0) -> "ShapePrior":
        """Fit the prior from one instance label map.

        Parameters
        ----------
        labels : (H, W) int array
            Instance label map (0 = background).
        classes : (H, W) int array, optional
            Class map beside ``labels``; each nucleus takes its majority class and gets a prior of its own
            (classes with fewer than 10 nuclei use the pooled prior).
        calibrate : bool
            Adjust the drawn eccentricity, irregularity and area so that masks sampled at the real centroids
            reproduce the real statistics (a few sampling rounds; about a second per 1000 x 1000 tile).
        seed : int or Generator or None
            Randomness of the calibration.

        Raises
        ------
        ValueError
            If ``labels`` is not a 2-D integer map, holds fewer than 3 nuclei, or ``classes`` has another shape.
        """
        return cls.fit_many([labels], None if classes is None else [classes], calibrate=calibrate, seed=seed)

    @classmethod
    def fit_many(
        cls,
        label_maps: Sequence,
        class_maps: Sequence | None = None,
        *,
        calibrate: bool = True,
        seed: SeedLike = 0,
        source: str = "",
    ) -> "ShapePrior":
        """Fit the prior from several instance label maps (tiles), as :meth:`fit` does for one.

        With three or more tiles the between-tile effect of packing on size (``slope_global``) and the spread of
        tile sizes it leaves unexplained are estimated; with fewer, ``slope_global`` equals the within-tile slope.
        """
        label_maps = [as_labels(m, "labels") for m in label_maps]
        if not label_maps:
            raise ValueError("label_maps is empty: give at least one instance label map to fit the prior from")
        if class_maps is not None:
            class_maps = [as_labels(c, "classes") for c in class_maps]
            if len(class_maps) != len(label_maps):
                raise ValueError("class_maps must hold one class map per label map")
            for lab, cm in zip(label_maps, class_maps):
                if cm.shape != lab.shape:
                    raise ValueError(f"classes must have the shape of labels {lab.shape}, got {cm.shape}")
        tiles = [_nucleus_table(lab, None if class_maps is None else class_maps[i]) for i, lab in enumerate(label_maps)]
        n_total = sum(len(t["area"]) for t in tiles)
        if n_total < 3:
            raise ValueError(f"cannot fit a shape prior from {n_total} nuclei: the label map needs at least 3")
        rng = as_rng(seed)
        pooled = _fit_class(tiles, None)
        per_class: dict[int, ClassPrior] = {}
        if class_maps is not None:
            all_cls = np.unique(np.concatenate([t["cls"] for t in tiles]))
            for c in all_cls:
                if sum(int(np.sum(t["cls"] == c)) for t in tiles) >= 10:
                    per_class[int(c)] = _fit_class(tiles, int(c))
        prior = cls(pooled=pooled, per_class=per_class, source=source)
        if calibrate:
            _calibrate(prior, label_maps, tiles, rng)
        return prior

    @classmethod
    def from_image(
        cls,
        image,
        *,
        segmenter="hovernet",
        checkpoint=None,
        device: str = "auto",
        calibrate: bool = True,
        seed: SeedLike = 0,
        progress=None,
        should_stop=None,
    ) -> "ShapePrior":
        """Fit the prior to an image's own nuclei, found by a segmenter (so that points in the style of a tissue get
        nuclei of that tissue's size).

        Parameters
        ----------
        image : array
            An H&E image (RGB uint8; grey, RGBA, uint16 and float in [0, 1] converted by
            :func:`napari_nucsynth._checks.as_rgb`).
        segmenter : str or callable
            A registered segmenter (:func:`napari_nucsynth.segment.segmenters`; default the shipped ``hovernet``),
            or a function ``image -> instance labels``.
        checkpoint, device, progress, should_stop
            Passed to the segmenter (see :func:`napari_nucsynth.segment.segment`).
        calibrate, seed
            As :meth:`fit`.

        Raises
        ------
        ValueError
            If the image is not an image by the conventions, or the segmenter finds fewer than 3 nuclei in it.
        """
        rgb = as_rgb(image, "image")
        if callable(segmenter):
            labels, name = segmenter(rgb), getattr(segmenter, "__name__", "a function")
        else:
            from .segment import segment  # a layer above this module: imported only when asked for

            labels, name = segment(rgb, method=segmenter, checkpoint=checkpoint, device=device, progress=progress,
                                   should_stop=should_stop), segmenter
        labels = as_labels(labels, "the segmenter's labels")
        n = int(np.unique(labels[labels > 0]).size)
        if n < 3:
            raise ValueError(f"the {name} segmenter found {n} nuclei in the image; a shape prior needs at least 3 "
                             "(use an image with stained nuclei, or ShapePrior.fit on its labels)")
        prior = cls.fit(labels, calibrate=calibrate, seed=seed)
        prior.source = f"from_image ({name}, {n} nuclei)"
        return prior

    @classmethod
    def default(cls) -> "ShapePrior":
        """The prior fitted on the 30 MoNuSeg training tiles, shipped with the package.

        Reproduce it with ``python benchmarks/fit_default_prior.py``.
        """
        return cls.load(_DEFAULT_PRIOR_FILE)

    # ---- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": 1,
            "source": self.source,
            "pooled": asdict(self.pooled),
            "per_class": {str(k): asdict(v) for k, v in self.per_class.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ShapePrior":
        if d.get("format") != 1:
            raise ValueError(f"unsupported shape prior format {d.get('format')!r} (expected 1)")

        def one(x):
            x = dict(x)
            x["log_nn_range"] = tuple(x["log_nn_range"])
            x["area_range"] = tuple(x["area_range"])
            return ClassPrior(**x)

        return cls(
            pooled=one(d["pooled"]),
            per_class={int(k): one(v) for k, v in d.get("per_class", {}).items()},
            source=d.get("source", ""),
        )

    def save(self, path) -> None:
        """Write the prior as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "ShapePrior":
        """Read a prior written by :meth:`save`."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a shape prior from {path}: {e}") from None
        return cls.from_dict(d)


def _nn_log(points: np.ndarray) -> np.ndarray:
    """log of each point's nearest-neighbour distance (NaN where there is no other point)."""
    n = len(points)
    if n < 2:
        return np.full(n, np.nan)
    d, _ = cKDTree(points).query(points, k=2)
    return np.log(np.maximum(d[:, 1], 0.5))


def _global_g(log_nn: np.ndarray, prior_g: float) -> float:
    """The layout's packing feature: log of the 10th percentile of NN distances, shrunk towards the prior's
    reference when there are few points."""
    ok = log_nn[np.isfinite(log_nn)]
    if ok.size == 0:
        return prior_g
    g = float(np.percentile(ok, 10))
    w = ok.size / (ok.size + _SHRINK_N)
    return w * g + (1 - w) * prior_g


def _nucleus_table(labels: np.ndarray, classes: np.ndarray | None) -> dict:
    from skimage.measure import regionprops_table

    props = regionprops_table(
        labels.astype(np.int64, copy=False), properties=("label", "area", "eccentricity", "solidity", "centroid")
    )
    pts = np.c_[props["centroid-0"], props["centroid-1"]]
    if classes is not None and len(pts):
        lab = labels.ravel()
        cm = np.asarray(classes).ravel().astype(np.int64)
        fg = lab > 0
        ids = props["label"]
        # majority class per nucleus (ids are sorted, so searchsorted gives each pixel's nucleus)
        pair = np.searchsorted(ids, lab[fg]) * (cm.max() + 1) + cm[fg]
        counts = np.bincount(pair, minlength=len(ids) * (cm.max() + 1)).reshape(len(ids), cm.max() + 1)
        cls_of = counts.argmax(1)
    else:
        cls_of = np.zeros(len(pts), dtype=np.int64)
    log_nn = _nn_log(pts)
    return {
        "points": pts,
        "area": props["area"].astype(float),
        "ecc": props["eccentricity"].astype(float),
        "solidity": props["solidity"].astype(float),
        "log_nn": log_nn,
        "g": float(np.percentile(log_nn[np.isfinite(log_nn)], 10)) if np.isfinite(log_nn).any() else np.nan,
        "cls": cls_of,
    }


def _fit_class(tiles: list[dict], c: int | None) -> ClassPrior:
    """Least-squares fit of the hierarchical log-area model of :class:`ClassPrior` for class ``c`` (None: all)."""
    xs, ys, gs = [], [], []
    areas, eccs, sols, lns = [], [], [], []
    for t in tiles:
        sel = np.ones(len(t["area"]), bool) if c is None else t["cls"] == c
        sel &= np.isfinite(t["log_nn"])
        if sel.sum() == 0:
            continue
        la = np.log(t["area"][sel])
        ln = t["log_nn"][sel]
        xs.append(ln - t["g"])
        ys.append(la)
        gs.append(t["g"])
        areas.append(t["area"][sel])
        eccs.append(t["ecc"][sel])
        sols.append(t["solidity"][sel])
        lns.append(ln)
    if not xs:
        raise ValueError("cannot fit a shape prior: the label map needs at least 2 nuclei to measure density")
    # within-tile slope: centre x and y per tile
    xc = np.concatenate([x - x.mean() for x in xs])
    yc = np.concatenate([y - y.mean() for y in ys])
    slope_local = float(xc @ yc / (xc @ xc)) if xc @ xc > 0 else 0.0
    resid = yc - slope_local * xc
    sigma_w = float(np.std(resid))
    resid_q = np.quantile(resid / sigma_w, _QUANTILES).tolist() if sigma_w > 0 and resid.size >= 20 else None
    # tile intercepts at x = 0, regressed on g between tiles
    icpt = np.array([y.mean() - slope_local * x.mean() for x, y in zip(xs, ys)])
    g = np.array(gs)
    g_ref = float(np.mean(g))
    if len(g) >= 3 and np.ptp(g) > 0:
        slope_global, intercept = np.polyfit(g - g_ref, icpt, 1)
        resid_b = icpt - (intercept + slope_global * (g - g_ref))
        sigma_b = float(np.sqrt(np.sum(resid_b**2) / max(len(g) - 2, 1)))
    else:
        slope_global, intercept, sigma_b = slope_local, float(np.mean(icpt)), 0.0
    all_area = np.concatenate(areas)
    all_ln = np.concatenate(lns)
    all_ecc = np.concatenate(eccs)
    all_sol = np.concatenate(sols)
    return ClassPrior(
        intercept=float(intercept),
        slope_local=slope_local,
        slope_global=float(slope_global),
        sigma=float(np.hypot(sigma_w, sigma_b)),
        g_ref=g_ref,
        log_nn_range=(float(np.percentile(all_ln, 1)), float(np.percentile(all_ln, 99))),
        ecc_quantiles=np.quantile(all_ecc, _QUANTILES).tolist(),
        irregularity=0.04,
        area_range=(float(max(np.percentile(all_area, 0.5), 4.0)), float(np.percentile(all_area, 99.5))),
        resid_quantiles=resid_q,
        target={
            "n": int(all_area.size),
            "tiles": len(xs),
            "area_quantiles": np.quantile(all_area, _QUANTILES).tolist(),
            "ecc_quantiles": np.quantile(all_ecc, _QUANTILES).tolist(),
            "solidity_median": float(np.median(all_sol)),
        },
    )


def _calibrate(
    prior: ShapePrior, label_maps: list[np.ndarray], tiles: list[dict], rng, rounds: int = 4, max_tiles: int = 10
) -> None:
    """Adjust drawn eccentricity, irregularity and area so that masks sampled at the real centroids reproduce the
    real statistics: the rasterised shape differs from the drawn one (pixel grid, contour harmonics, neighbours
    cutting into each other), and this undoes that on the data the prior was fitted on."""
    from skimage.measure import regionprops_table

    cps = [prior.pooled, *prior.per_class.values()]
    if len(label_maps) > max_tiles:  # the corrections are global: an even subset of the tiles suffices
        pick = np.linspace(0, len(label_maps) - 1, max_tiles).round().astype(int)
        label_maps = [label_maps[i] for i in pick]
        tiles = [tiles[i] for i in pick]
    for _ in range(rounds):
        out = {id(cp): {"la_real": [], "la_out": [], "ecc_out": [], "sol_out": []} for cp in cps}
        for lab, t in zip(label_maps, tiles):
            if len(t["points"]) == 0:
                continue
            classes = t["cls"] if prior.per_class else None
            m = sample_masks(t["points"], lab.shape, classes=classes, prior=prior, seed=rng)
            p = regionprops_table(m.astype(np.int64), properties=("label", "area", "eccentricity", "solidity"))
            idx = p["label"] - 1
            for cp in cps:
                if cp is prior.pooled:
                    sel = np.array([prior.for_class(c) is prior.pooled for c in t["cls"][idx]], bool)
                else:
                    sel = np.array([prior.for_class(c) is cp for c in t["cls"][idx]], bool)
                o = out[id(cp)]
                o["la_real"].append(np.log(t["area"][idx[sel]]))
                o["la_out"].append(np.log(p["area"][sel]))
                o["ecc_out"].append(p["eccentricity"][sel])
                o["sol_out"].append(p["solidity"][sel])
        for cp in cps:
            o = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out[id(cp)].items()}
            if o["la_out"].size < 3:
                continue
            # area: shift the intercept so the mean log area matches
            cp.intercept += float(np.mean(o["la_real"]) - np.mean(o["la_out"]))
            # eccentricity: quantile mapping of the drawn distribution
            q_out = np.quantile(o["ecc_out"], _QUANTILES)
            q_tgt = np.asarray(cp.target["ecc_quantiles"])
            cp.ecc_quantiles = np.clip(np.asarray(cp.ecc_quantiles) + (q_tgt - q_out), 0.0, 0.99).tolist()
            cp.ecc_quantiles = np.maximum.accumulate(cp.ecc_quantiles).tolist()
            # irregularity: lower solidity needs more irregular contours
            # (solidity falls by about 0.01 for each +0.05 of irregularity above 0.1; below that, pixelisation
            # dominates, hence the multiplicative step)
            d_sol = float(np.median(o["sol_out"]) - cp.target["solidity_median"])
            cp.irregularity = float(np.clip(cp.irregularity * np.exp(30.0 * d_sol), 0.01, 0.3))


# ----------------------------------------------------------------------------------------------------------------
# Shapes and rasterisation
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class NucleusShapes:
    """Per-nucleus shape parameters, one row per point.

    ``centres`` (N, 2) row/col; ``semi_major``, ``semi_minor`` (N,) in pixels; ``angle`` (N,) radians from the row
    axis; ``amp`` and ``phase`` (N, len(HARMONICS)) the contour harmonics (radius factor
    ``1 + sum amp_k cos(k phi + phase_k)`` in the ellipse's normalised frame).
    """

    centres: np.ndarray
    semi_major: np.ndarray
    semi_minor: np.ndarray
    angle: np.ndarray
    amp: np.ndarray
    phase: np.ndarray

    def __len__(self) -> int:
        return len(self.centres)

    def half_extents(self) -> tuple[np.ndarray, np.ndarray]:
        """Half-height and half-width in pixels of the box that holds each (rotated, irregular) nucleus."""
        grow = 1.0 + np.abs(self.amp).sum(1)
        c, s = np.cos(self.angle), np.sin(self.angle)
        a, b = self.semi_major, self.semi_minor
        hr = np.ceil(grow * np.hypot(a * c, b * s)).astype(np.int64) + 1
        hc = np.ceil(grow * np.hypot(a * s, b * c)).astype(np.int64) + 1
        return hr, hc

    def take(self, idx) -> "NucleusShapes":
        return NucleusShapes(*(getattr(self, f)[idx] for f in _SHAPE_FIELDS))

    def set(self, idx, other: "NucleusShapes") -> None:
        for f in _SHAPE_FIELDS:
            getattr(self, f)[idx] = getattr(other, f)

    @classmethod
    def concat(cls, parts: Iterable["NucleusShapes"]) -> "NucleusShapes":
        parts = list(parts)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _SHAPE_FIELDS))

    @classmethod
    def empty(cls) -> "NucleusShapes":
        k = len(HARMONICS)
        z = np.zeros(0)
        return cls(np.zeros((0, 2)), z, z.copy(), z.copy(), np.zeros((0, k)), np.zeros((0, k)))


_SHAPE_FIELDS = ("centres", "semi_major", "semi_minor", "angle", "amp", "phase")


def draw_shapes(
    points,
    *,
    classes=None,
    prior: ShapePrior | None = None,
    seed: SeedLike = None,
    context=None,
) -> NucleusShapes:
    """Draw a nucleus shape for each point from the prior.

    Parameters
    ----------
    points : (N, 2) array
        Centroids (row, col).
    classes : (N,) int array, optional
        Class per point (selects the class prior; 0 for all when omitted).
    prior : ShapePrior, optional
        Defaults to :meth:`ShapePrior.default`.
    seed : int or Generator or None
        Randomness.
    context : (M, 2) array, optional
        The whole layout the points belong to, used to measure local density (nearest-neighbour distance) and the
        layout's packing. Defaults to ``points``. :class:`MaskSampler` passes the full layout when it draws one
        nucleus.
    """
    pts = as_points(points)
    n = len(pts)
    cls = as_classes(classes, n)
    prior = prior or _default_prior()
    rng = as_rng(seed)
    if n == 0:
        return NucleusShapes.empty()
    ctx = pts if context is None else as_points(context, "context")
    # local density: distance to the nearest *other* point of the layout
    if len(ctx) >= 2:
        d, _ = cKDTree(ctx).query(pts, k=2)
        # a point that is itself in the context has distance 0 first; otherwise the first neighbour counts
        nn = np.where(d[:, 0] < 1e-9, d[:, 1], d[:, 0])
        log_nn = np.log(np.maximum(nn, 0.5))
        log_nn_ctx = _nn_log(ctx)
    else:
        log_nn = np.full(n, np.nan)
        log_nn_ctx = np.full(len(ctx), np.nan)

    k = len(HARMONICS)
    z_area = rng.standard_normal(n)
    u_ecc = rng.random(n)
    angle = rng.random(n) * np.pi
    amp_z = rng.standard_normal((n, k))
    phase = rng.random((n, k)) * 2 * np.pi

    semi_major = np.empty(n)
    semi_minor = np.empty(n)
    amp = np.empty((n, k))
    for c in np.unique(cls):
        cp = prior.for_class(int(c))
        sel = cls == c
        g = _global_g(log_nn_ctx, cp.g_ref)
        ln = np.where(np.isfinite(log_nn[sel]), log_nn[sel], np.mean(cp.log_nn_range))
        z = z_area[sel]
        if cp.resid_quantiles is not None:  # the fitted residuals' own shape (skewed), by the same draws
            z = np.interp(ndtr(z), _QUANTILES, cp.resid_quantiles)
        area = np.exp(cp.mean_log_area(ln, g) + cp.sigma * z)
        area = np.clip(area, *cp.area_range)
        ecc = np.interp(u_ecc[sel], _QUANTILES, cp.ecc_quantiles)
        ratio = np.sqrt(1.0 - np.clip(ecc, 0.0, 0.99) ** 2)  # minor / major
        a = np.sqrt(area / (np.pi * ratio))
        semi_major[sel] = a
        semi_minor[sel] = a * ratio
        amp[sel] = np.clip(amp_z[sel] * (cp.irregularity / (HARMONICS - 1.0)), -0.3, 0.3)
    return NucleusShapes(pts.copy(), semi_major, semi_minor, angle, amp, phase)


def rasterize(
    shapes: NucleusShapes,
    shape,
    *,
    ids=None,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Rasterise nuclei into a uint32 instance label map.

    Parameters
    ----------
    shapes : NucleusShapes
        The nuclei.
    shape : (H, W)
        The image shape.
    ids : (N,) int array, optional
        Label of each nucleus; defaults to ``1..N``.
    window : (r0, r1, c0, c1), optional
        Rasterise only this region of the image; the result then has the window's shape.

    Returns
    -------
    (H, W) or window-shaped uint32 array
        Each pixel is given to the nucleus whose contour it lies deepest inside (smallest normalised radius); ties
        go to the smaller id. Nuclei partly outside the image are clipped.
    """
    h, w = as_shape(shape)
    r0, r1, c0, c1 = (0, h, 0, w) if window is None else (max(0, window[0]), min(h, window[1]), max(0, window[2]), min(w, window[3]))
    wh, ww = max(r1 - r0, 0), max(c1 - c0, 0)
    out = np.zeros((wh, ww), dtype=np.uint32)
    n = len(shapes)
    if n == 0 or wh == 0 or ww == 0:
        return out
    ids = np.arange(1, n + 1, dtype=np.uint64) if ids is None else np.asarray(ids, dtype=np.uint64)
    # Bounding boxes of the outer ellipses (semi-axes scaled by the largest contour factor).
    grow = 1.0 + np.abs(shapes.amp).sum(1)
    A = shapes.semi_major * grow
    B = shapes.semi_minor * grow
    c, s = np.cos(shapes.angle), np.sin(shapes.angle)
    hr, hc = shapes.half_extents()
    cy = np.floor(shapes.centres[:, 0] + 0.5).astype(np.int64)
    cx = np.floor(shapes.centres[:, 1] + 0.5).astype(np.int64)
    keep = (cy + hr >= r0) & (cy - hr < r1) & (cx + hc >= c0) & (cx - hc < c1)
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return out
    win = (r0, r1, c0, c1, ww)
    # Each pixel's key packs (depth score << 32 | id); the smallest key wins. Untouched pixels keep the key
    # (2**32 - 1) << 32: worse than any real key (scores use 24 bits), and its low 32 bits, the id, are
    # 0 = background. The ids are then the low halves of the keys.
    best = np.full(wh * ww, np.uint64(0xFFFFFFFF) << np.uint64(32), dtype=np.uint64)
    # Nuclei go through in chunks of about _CHUNK_PIXELS pixels, so the per-pixel temporaries stay in cache and
    # are recycled by the allocator instead of being page-faulted in afresh (which cost more than the arithmetic).
    est = np.cumsum((2 * hr[idx] + 1) * (2 * hc[idx] + 1))
    cuts = np.searchsorted(est, np.arange(_CHUNK_PIXELS, est[-1], _CHUNK_PIXELS), side="right")
    for part in np.split(idx, np.unique(cuts)):
        if part.size:
            _scatter(shapes, part, ids, A, B, c, s, hr, cy, cx, win, best)
    # centre pixels, with the best possible score, so that each point keeps its own pixel
    cin = idx[(cy[idx] >= r0) & (cy[idx] < r1) & (cx[idx] >= c0) & (cx[idx] < c1)]
    np.minimum.at(best, (cy[cin] - r0) * ww + (cx[cin] - c0), ids[cin])
    low = 0 if np.little_endian else 1
    return best.view(np.uint32)[low::2].reshape(wh, ww).copy()


#: Pixels (of nuclei bounding boxes) handled per chunk by :func:`rasterize`.
_CHUNK_PIXELS = 1 << 16


def _scatter(shapes, idx, ids, A, B, c, s, hr, cy, cx, win, best) -> None:
    """Write the keys of nuclei ``idx`` into ``best`` (a flat window of the image) with a scatter-minimum."""
    r0, r1, c0, c1, ww = win
    f32 = np.float32
    # Row spans: for every image row a nucleus can reach, the columns inside its outer ellipse. Working on spans
    # rather than boxes halves the pixels visited, and the window is applied per row, before any pixel exists.
    nrows = 2 * hr[idx] + 1
    rid = np.repeat(np.arange(idx.size), nrows)  # nucleus (position in idx) of each row
    row = np.repeat(cy[idx] - hr[idx], nrows) + (np.arange(rid.size) - np.repeat(np.cumsum(nrows) - nrows, nrows))
    ok = (row >= r0) & (row < r1)
    rid, row = rid[ok], row[ok]
    g = idx[rid]
    y, x = shapes.centres[g, 0], shapes.centres[g, 1]
    dy = row - y
    # (dy c + dx s)^2 / A^2 + (dx c - dy s)^2 / B^2 <= 1  is  al dx^2 + 2 be dx + ga <= 0
    ia2, ib2 = 1.0 / A[g] ** 2, 1.0 / B[g] ** 2
    cg, sg = c[g], s[g]
    al = sg * sg * ia2 + cg * cg * ib2
    be = dy * cg * sg * (ia2 - ib2)
    ga = dy * dy * (cg * cg * ia2 + sg * sg * ib2) - 1.0
    disc = be * be - al * ga
    root = np.sqrt(np.maximum(disc, 0.0))
    lo = np.maximum(np.ceil(x + (-be - root) / al).astype(np.int64), c0)
    hi = np.minimum(np.floor(x + (-be + root) / al).astype(np.int64), c1 - 1)
    cnt = np.where(disc >= 0, np.maximum(hi - lo + 1, 0), 0)
    P = int(cnt.sum())
    if P == 0:
        return
    # per-pixel arrays, each built from per-row values with one repeat (int32: a chunk is small)
    start = np.cumsum(cnt) - cnt
    k = np.arange(P, dtype=np.int32)
    flat = k + np.repeat(((row - r0) * ww + (lo - c0) - start), cnt)
    # column offset from the pixel holding the centre (a small integer, exact in float32); the sub-pixel part of
    # the centre (ox) and the row offset fold into per-row constants of u and v
    dxi = (k + np.repeat((lo - start - cx[g]).astype(np.int32), cnt)).astype(f32)
    ox = x - cx[g]
    ia, ib = 1.0 / shapes.semi_major[g], 1.0 / shapes.semi_minor[g]
    u = dxi * np.repeat((sg * ia).astype(f32), cnt)
    u += np.repeat(((dy * cg - ox * sg) * ia).astype(f32), cnt)
    v = dxi * np.repeat((cg * ib).astype(f32), cnt)
    v += np.repeat(((ox * cg - dy * sg) * ib).astype(f32), cnt)
    score = np.hypot(u, v)
    # the contour factor f(phi) = 1 + sum_k amp_k cos(k phi + phase_k) matters only in the annulus where the
    # harmonics can move the contour; inside it a pixel is surely in, and its score is q itself
    fmin = np.repeat(np.maximum(1.0 - np.abs(shapes.amp[g]).sum(1), 0.0).astype(f32), cnt)
    ring = np.flatnonzero(score > fmin)
    pix_rid = np.repeat(rid.astype(np.int32), cnt)
    if ring.size:
        nr = pix_rid[ring]
        qr = score[ring]
        z = np.empty(ring.size, dtype=np.complex64)  # e^{i phi}
        z.real = u[ring] / qr
        z.imag = v[ring] / qr
        # sum_k c_k z^k with c_k = amp_k e^{i phase_k}, by Horner's rule; f = 1 + its real part
        coef = (shapes.amp[idx] * np.exp(1j * shapes.phase[idx])).astype(np.complex64)
        acc = coef[nr, -1]
        for m in range(len(HARMONICS) - 2, -1, -1):
            acc *= z
            acc += coef[nr, m]
        for _ in range(int(HARMONICS[0])):
            acc *= z
        score[ring] = qr / (1.0 + acc.real)
    sel = np.flatnonzero(score <= 1.0)
    key = (score[sel] * f32(2**23)).astype(np.uint64)
    key <<= np.uint64(32)
    key |= ids[idx][pix_rid[sel]]
    np.minimum.at(best, flat[sel], key)


_PRIOR_CACHE: list[ShapePrior] = []


def _default_prior() -> ShapePrior:
    if not _PRIOR_CACHE:
        _PRIOR_CACHE.append(ShapePrior.default())
    return _PRIOR_CACHE[0]


def sample_masks(points, shape, *, classes=None, prior: ShapePrior | None = None, seed: SeedLike = None,
                 method: str = "prior", checkpoint=None, device: str = "auto") -> np.ndarray:
    """Sample one nucleus instance mask per point.

    ``method="prior"`` (the default) draws each nucleus from the shape prior (this module); ``method="daff"`` grows
    the nuclei with DAFF-GAN's learned points -> masks generator, which sees each nucleus's neighbours
    (:mod:`napari_nucsynth.models.daff`; torch is imported only then).

    Parameters
    ----------
    points : (N, 2) array
        Nucleus centroids (row, col), napari's order. Points outside the image are allowed: their nucleus is
        clipped to the image, and one lying wholly outside gets no pixels (its id does not appear).
    shape : (H, W)
        Output shape.
    classes : (N,) int array, optional
        Class per point, selecting the class's prior (points of classes the prior has not seen use its pooled
        prior).
    prior : ShapePrior, optional
        Shape statistics; defaults to the prior fitted on the MoNuSeg training tiles (:meth:`ShapePrior.default`).
    seed : int or Generator or None
        The same seed (and inputs) gives the same masks.
    method : {"prior", "daff"}
        The shape prior, or DAFF-GAN's learned model (classes select its class channels; an untyped model, like the
        MoNuSeg one, checks them and samples every point alike).
    checkpoint : str or Path, optional
        ``method="daff"`` only: the trained model (``nucsynth train --model daff`` or
        ``benchmarks/train_daff.py``); None uses the one shipped as ``data/models/daff_monuseg.pt``.
    device : str
        ``method="daff"`` only: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "mps".

    Returns
    -------
    (H, W) uint32 array
        Instance labels, id = point index + 1, 0 = background. No pixel belongs to two nuclei; neighbours may
        touch. Where two points fall on the same pixel, the earlier point keeps the centre pixel; the later one
        gets only what it wins around it (possibly nothing; always nothing with ``method="daff"``).

    Raises
    ------
    ValueError
        If ``points`` is not (N, 2) or holds NaN/inf, ``shape`` is not a 2-D shape of positive integers,
        ``classes`` does not hold one non-negative integer per point, ``method`` is unknown, an argument of the
        other method is given (``prior`` with "daff", ``checkpoint`` with "prior"), or ``method="daff"`` has no
        model (the message says how to train one).
    """
    if method not in ("prior", "daff"):
        raise ValueError(f"method must be 'prior' (the shape prior) or 'daff' (the learned model), got {method!r}")
    if method == "daff":
        if prior is not None:
            raise ValueError("prior= is the shape prior of method='prior'; method='daff' takes checkpoint=")
        from .models.daff import sample_masks as daff_sample_masks  # lazy: torch only when a network runs

        return daff_sample_masks(points, shape, classes=classes, seed=seed, checkpoint=checkpoint, device=device)
    if checkpoint is not None:
        raise ValueError("checkpoint= is for method='daff'; method='prior' takes prior=")
    h, w = as_shape(shape)
    pts = as_points(points)
    cls = as_classes(classes, len(pts))
    if len(pts) == 0:
        return np.zeros((h, w), dtype=np.uint32)
    shapes = draw_shapes(pts, classes=cls, prior=prior, seed=seed)
    return rasterize(shapes, (h, w))


# ----------------------------------------------------------------------------------------------------------------
# Incremental sampler (the Points -> Masks widget drives this)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Patch:
    """A rectangular change to a label map: ``labels[rows, cols] = values``."""

    rows: slice
    cols: slice
    values: np.ndarray


class MaskSampler:
    """Keeps a label map in step with an editable point layout, resampling only the nuclei that change.

    ``labels`` always equals :func:`rasterize` of the current shapes, so editing one point changes one nucleus
    (and the pixels its neighbours win back or lose at their common border).

    Parameters
    ----------
    shape : (H, W)
        Image shape.
    prior : ShapePrior, optional
        Defaults to :meth:`ShapePrior.default`.
    seed : int or Generator or None
        Seed of the random stream all draws come from.
    """

    def __init__(self, shape, *, prior: ShapePrior | None = None, seed: SeedLike = None):
        self.shape = as_shape(shape)
        self.prior = prior or _default_prior()
        self.rng = as_rng(seed)
        self.points = np.zeros((0, 2))
        self.classes = np.zeros(0, dtype=np.int64)
        self.shapes = NucleusShapes.empty()
        self.labels = np.zeros(self.shape, dtype=np.uint32)

    def reset(self, points, classes=None, *, seed: SeedLike = None) -> np.ndarray:
        """Resample every nucleus; returns the new label map."""
        if seed is not None:
            self.rng = as_rng(seed)
        self.points = as_points(points).copy()
        self.classes = as_classes(classes, len(self.points)).copy()
        self.shapes = draw_shapes(self.points, classes=self.classes, prior=self.prior, seed=self.rng)
        self.labels = rasterize(self.shapes, self.shape)
        return self.labels

    def _redraw(self, boxes: list[tuple[int, int, int, int]]) -> Patch | None:
        """Re-rasterise the union box of ``boxes`` from the current shapes and return what changed."""
        h, w = self.shape
        r0 = max(0, min(b[0] for b in boxes))
        r1 = min(h, max(b[1] for b in boxes))
        c0 = max(0, min(b[2] for b in boxes))
        c1 = min(w, max(b[3] for b in boxes))
        if r0 >= r1 or c0 >= c1:
            return None
        win = rasterize(self.shapes, self.shape, window=(r0, r1, c0, c1))
        self.labels[r0:r1, c0:c1] = win
        return Patch(slice(r0, r1), slice(c0, c1), win)

    def _box(self, i: int) -> tuple[int, int, int, int]:
        hr, hc = self.shapes.take([i]).half_extents()
        cy, cx = np.floor(self.shapes.centres[i] + 0.5).astype(int)
        return (cy - int(hr[0]), cy + int(hr[0]) + 1, cx - int(hc[0]), cx + int(hc[0]) + 1)

    def _draw_one(self, indices: np.ndarray) -> NucleusShapes:
        return draw_shapes(
            self.points[indices], classes=self.classes[indices], prior=self.prior, seed=self.rng, context=self.points
        )

    def set_points(self, indices, points, classes=None) -> Patch | None:
        """Move (or re-class) existing points ``indices`` and resample only their nuclei."""
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.size == 0:
            return None
        if idx.min() < 0 or idx.max() >= len(self.points):
            raise ValueError(f"indices must lie in 0..{len(self.points) - 1}, got {idx.tolist()}")
        new = as_points(np.reshape(points, (-1, 2)))
        if len(new) != idx.size:
            raise ValueError(f"got {len(new)} points for {idx.size} indices")
        boxes = [self._box(i) for i in idx]
        self.points[idx] = new
        if classes is not None:
            self.classes[idx] = as_classes(classes, idx.size)
        self.shapes.set(idx, self._draw_one(idx))
        boxes += [self._box(i) for i in idx]
        return self._redraw(boxes)

    def add_points(self, points, classes=None) -> Patch | None:
        """Append points (ids ``len+1...``) and draw their nuclei."""
        new = as_points(np.reshape(points, (-1, 2)))
        if len(new) == 0:
            return None
        n0 = len(self.points)
        self.points = np.concatenate([self.points, new])
        self.classes = np.concatenate([self.classes, as_classes(classes, len(new))])
        idx = np.arange(n0, len(self.points))
        self.shapes = NucleusShapes.concat([self.shapes, self._draw_one(idx)])
        return self._redraw([self._box(i) for i in idx])

    def remove_points(self, indices) -> np.ndarray:
        """Delete points; ids above each deleted one shift down by one (id = index + 1 stays true).

        Returns the new full label map (ids shift, so the change is not local).
        """
        idx = np.unique(np.atleast_1d(np.asarray(indices, dtype=np.int64)))
        if idx.size == 0:
            return self.labels
        if idx.min() < 0 or idx.max() >= len(self.points):
            raise ValueError(f"indices must lie in 0..{len(self.points) - 1}, got {idx.tolist()}")
        boxes = [self._box(i) for i in idx]
        keep = np.ones(len(self.points), bool)
        keep[idx] = False
        self.points = self.points[keep]
        self.classes = self.classes[keep]
        self.shapes = self.shapes.take(keep)
        # relabel: old id k+1 -> new id (rank of k among kept) + 1
        lut = np.zeros(keep.size + 1, dtype=np.uint32)
        lut[1:][keep] = np.arange(1, keep.sum() + 1, dtype=np.uint32)
        self.labels = lut[self.labels]
        self._redraw(boxes)
        return self.labels


# ----------------------------------------------------------------------------------------------------------------
# Instance descriptors
# ----------------------------------------------------------------------------------------------------------------
def _index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids present, dense index map 0..K-1 per pixel, -1 on background)."""
    lab = as_labels(labels)
    ids, inv = np.unique(lab, return_inverse=True)
    inv = inv.reshape(lab.shape) - (1 if ids.size and ids[0] == 0 else 0)
    return ids[ids > 0], inv


def _instance_pixels(lab: np.ndarray):
    """Foreground mask, dense instance index, row and column of each foreground pixel, and each instance's
    centre of mass (rows, cols); None for a map without instances."""
    ids, inv = _index(lab)
    if ids.size == 0:
        return None
    fg = inv >= 0
    k = inv[fg]
    rr, cc = np.nonzero(fg)
    cnt = np.bincount(k, minlength=ids.size).astype(float)
    mean_r = np.bincount(k, weights=rr, minlength=ids.size) / cnt
    mean_c = np.bincount(k, weights=cc, minlength=ids.size) / cnt
    return fg, k, rr, cc, mean_r, mean_c


def semantic_map(labels, classes=None) -> np.ndarray:
    """Semantic map: 1 on nuclei (or the class map's value + 1 there when ``classes`` is given), 0 elsewhere.

    Returns uint8 of the labels' shape (uint16 if a class value exceeds 254).
    """
    lab = as_labels(labels)
    if classes is None:
        return (lab > 0).astype(np.uint8)
    cm = np.asarray(classes)
    if cm.shape != lab.shape:
        raise ValueError(f"classes must have the shape of labels {lab.shape}, got {cm.shape}")
    out = np.where(lab > 0, cm.astype(np.int64) + 1, 0)
    return out.astype(np.uint8 if out.max(initial=0) < 255 else np.uint16)


def hv_maps(labels) -> np.ndarray:
    """HoVer-Net's horizontal and vertical distance maps.

    For each nucleus, the column (horizontal) and row (vertical) offset of each pixel from the nucleus's centre of
    mass, negative and positive sides each scaled to [-1, 0] and [0, 1] by that nucleus's extreme offsets, as
    HoVer-Net's target generation does. Returns float32 (2, H, W): [horizontal, vertical]; 0 on background.
    """
    lab = as_labels(labels)
    out = np.zeros((2,) + lab.shape, dtype=np.float32)
    px = _instance_pixels(lab)
    if px is None:
        return out
    fg, k, rr, cc, mean_r, mean_c = px
    n = mean_r.size
    for ch, coord, mean in ((0, cc, mean_c), (1, rr, mean_r)):
        # HoVer-Net rounds the centre of mass to a pixel before taking offsets
        off = coord - np.floor(mean + 0.5)[k]
        neg = np.zeros(n)
        pos = np.zeros(n)
        np.minimum.at(neg, k, off)
        np.maximum.at(pos, k, off)
        val = np.where(off < 0, off / np.where(neg[k] < 0, -neg[k], 1.0), off / np.where(pos[k] > 0, pos[k], 1.0))
        out[ch][fg] = val
    return out


def distance_map(labels) -> np.ndarray:
    """Medial-axis distance map: each nucleus pixel's distance to the nucleus boundary (background or a touching
    neighbour), divided by the nucleus's largest such distance, so 1 on the medial axis's core and near 0 at the
    contour. float32, 0 on background."""
    lab = as_labels(labels)
    out = np.zeros(lab.shape, dtype=np.float32)
    ids, inv = _index(lab)
    if ids.size == 0:
        return out
    from skimage.segmentation import find_boundaries

    inner = (lab > 0) & ~find_boundaries(lab, mode="inner")
    # pixels on the inner boundary are at distance ~1; the edt of the interior gives distance to it
    dist = ndi.distance_transform_edt(inner) + (lab > 0)
    fg = inv >= 0
    mx = ndi.maximum(dist, labels=inv + 1, index=np.arange(1, ids.size + 1))
    out[fg] = dist[fg] / np.asarray(mx)[inv[fg]]
    return out


def direction_map(labels, n_bins: int = 2) -> np.ndarray:
    """SIAN's direction map: the angle of each nucleus pixel around its nucleus's centre of mass, quantised into
    ``n_bins`` equal sectors and one-hot encoded (bin ``b`` covers angles ``[b, b + 1) * 2 pi / n_bins`` measured
    from the +column axis towards +row). With the default 2 bins, channel 0 marks the half of each nucleus at or
    below its centre (angles in [0, pi)) and channel 1 the half above, so two touching nuclei show a sharp
    change of pattern at their border. Returns uint8 (n_bins, H, W), all 0 on background."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    lab = as_labels(labels)
    out = np.zeros((int(n_bins),) + lab.shape, dtype=np.uint8)
    px = _instance_pixels(lab)
    if px is None:
        return out
    _, k, rr, cc, my, mx = px
    ang = np.mod(np.arctan2(rr - my[k], cc - mx[k]), 2 * np.pi)
    b = np.minimum((ang / (2 * np.pi / n_bins)).astype(np.int64), n_bins - 1)
    out[b, rr, cc] = 1
    return out


def descriptors(labels, classes=None, n_bins: int = 2) -> dict[str, np.ndarray]:
    """All instance descriptors at once: ``semantic``, ``hv``, ``distance`` and ``direction``."""
    return {
        "semantic": semantic_map(labels, classes),
        "hv": hv_maps(labels),
        "distance": distance_map(labels),
        "direction": direction_map(labels, n_bins),
    }
