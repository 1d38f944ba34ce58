"""The ``watershed`` segmenter: classical, training-free nucleus instances of an H&E image.

1. Haematoxylin optical density (:func:`napari_nucsynth.stain.rgb_to_hed`), smoothed by a Gaussian of ``sigma`` px.
2. Foreground: density above Otsu's threshold times ``threshold_scale`` (the threshold is computed once over the
   whole image, so tiles of a large image share it); holes filled; objects smaller than ``min_area`` px removed.
3. Distance transform of the foreground (smoothed by a Gaussian of 1 px, so ragged edges make no extra peaks);
   markers are its local maxima at least ``min_distance`` px apart (``skimage.feature.peak_local_max``), plus one
   for each foreground component that has none.
4. Marker-controlled watershed of the negated distance (``skimage.segmentation.watershed``) within the foreground;
   pieces smaller than ``min_area / 2`` px are merged into the neighbour they share most border with.

Images larger than 1024 px are segmented in 1024-px tiles overlapping by 128 px (:func:`segment_tiled`), so a
1000 x 1000 tile goes in one piece; ``tta=True`` merges the results on the 8 dihedral transforms
(:func:`tta_instances`).

Defaults picked by mean AJI on the 30 MoNuSeg training tiles among each parameter moved one step either side
(``benchmarks/bench_watershed.py --grid``): mean AJI 0.422, PQ 0.351, Dice 0.730 there, about 0.3 s per
1000 x 1000 tile on one core. The method is (almost exactly) equivariant under flips and transposes, so ``tta=True``
costs 8 times as much and changes little.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy import ndimage as ndi

from .._checks import as_rgb
from ..stain import rgb_to_hed
from . import register
from ..tiling import relabel_contiguous, segment_tiled, tta_instances

__all__ = ["WatershedSegmenter", "watershed_labels"]

#: Tile size and overlap for large images.
TILE, OVERLAP = 1024, 128
#: Smallest useful Otsu threshold of the haematoxylin density: below it the image holds no stained nuclei
#: (a white or empty field) and the result is empty.
MIN_DENSITY = 0.005


def _density(rgb: np.ndarray, sigma: float) -> np.ndarray:
    h = rgb_to_hed(rgb)[..., 0]
    return ndi.gaussian_filter(h, sigma) if sigma > 0 else h


def _threshold(density: np.ndarray, threshold_scale: float) -> float | None:
    """Otsu's threshold of the density times ``threshold_scale``; None when the image holds no nuclei."""
    from skimage.filters import threshold_otsu

    if density.size == 0 or float(np.ptp(density)) <= 1e-6:
        return None
    t = float(threshold_otsu(density))
    if t < MIN_DENSITY:
        return None
    return t * threshold_scale


def watershed_labels(density: np.ndarray, threshold: float, *, min_area: int = 50, min_distance: int = 7,
                     should_stop=None) -> np.ndarray:
    """Steps 2-4 of the module docstring on a smoothed haematoxylin density with a given threshold: uint32
    labels, ids ``1..N``."""
    from skimage.feature import peak_local_max
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    fg = ndi.binary_fill_holes(density > threshold)
    if min_area > 1:
        fg = remove_small_objects(fg, max_size=int(min_area) - 1)
    if not fg.any():
        return np.zeros(density.shape, np.uint32)
    comp, n_comp = ndi.label(fg)
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg).astype(np.float32), 1.0)
    dist[~fg] = 0
    if should_stop is not None and should_stop():
        raise InterruptedError("segmentation cancelled")
    peaks = peak_local_max(dist, min_distance=max(1, int(min_distance)), labels=comp, exclude_border=False)
    markers = np.zeros(density.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # a component without a peak (a plateau) gets one marker at its most central pixel
    has = np.zeros(n_comp + 1, bool)
    has[comp[tuple(peaks.T)]] = True
    missing = np.flatnonzero(~has[1:]) + 1
    if missing.size:
        at = ndi.maximum_position(dist, comp, missing)
        for k, (r, c) in enumerate(at):
            markers[r, c] = len(peaks) + 1 + k
    lab = watershed(-dist, markers=markers, mask=fg)
    lab = _merge_small(lab, max(1, int(min_area) // 2))
    return relabel_contiguous(lab)


def _merge_small(lab: np.ndarray, min_size: int) -> np.ndarray:
    """Pieces smaller than ``min_size`` px join the larger touching instance they share most border with (they are
    dropped when they touch none)."""
    if min_size <= 1 or not lab.any():
        return lab
    area = np.bincount(lab.ravel())
    is_small = (area > 0) & (area < min_size)
    is_small[0] = False
    if not is_small.any():
        return lab
    # 4-connected neighbouring pairs of different instances, both ways round
    a = np.concatenate([lab[:, :-1].ravel(), lab[:-1, :].ravel()])
    b = np.concatenate([lab[:, 1:].ravel(), lab[1:, :].ravel()])
    sel = (a != b) & (a > 0) & (b > 0)
    src, dst = np.concatenate([a[sel], b[sel]]).astype(np.int64), np.concatenate([b[sel], a[sel]]).astype(np.int64)
    sel = is_small[src] & ~is_small[dst]
    lut = np.arange(area.size)
    if sel.any():
        key, cnt = np.unique(src[sel] * area.size + dst[sel], return_counts=True)
        s, d = key // area.size, key % area.size
        order = np.lexsort((-cnt, s))  # per small piece, the neighbour with the longest shared border first
        s, d = s[order], d[order]
        first = np.ones(s.size, bool)
        first[1:] = s[1:] != s[:-1]
        lut[s[first]] = d[first]
    lut[is_small & (lut == np.arange(area.size))] = 0
    return lut[lab]


@register("watershed")
class WatershedSegmenter:
    """Classical marker-controlled watershed on the haematoxylin channel (see the module docstring).

    Parameters (keywords of ``__call__``)
    -------------------------------------
    sigma : float
        Gaussian smoothing (px) of the haematoxylin density before thresholding (default 1.0).
    threshold_scale : float
        Multiplies Otsu's threshold: below 1 takes paler nuclei, above 1 only darker ones (default 1.1).
    min_area : int
        Objects smaller than this (px) are removed from the foreground; watershed pieces under half of it are
        merged into a neighbour (default 50, an 8-px disc; MoNuSeg nuclei are ~20-600 px at 40x).
    min_distance : int
        Minimum distance (px) between watershed markers: larger merges more, smaller splits more (default 7).
    """

    name = "watershed"
    description = "haematoxylin channel, Otsu threshold, distance transform, marker-controlled watershed (no training)"
    needs_checkpoint = False
    #: the keyword parameters: (default, low, high)
    params: ClassVar[dict] = {
        "sigma": (1.0, 0.0, 5.0),
        "threshold_scale": (1.1, 0.3, 2.0),
        "min_area": (50, 0, 500),
        "min_distance": (7, 1, 30),
    }

    def __call__(self, image, *, checkpoint=None, device: str = "auto", tta: bool = False, progress=None,
                 should_stop=None, **params) -> np.ndarray:
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"unknown watershed parameter(s) {sorted(unknown)}; known: {sorted(self.params)}")
        p = {k: params.get(k, v[0]) for k, v in self.params.items()}
        if float(p["sigma"]) < 0:
            raise ValueError(f"sigma must be >= 0, got {p['sigma']}")
        if float(p["threshold_scale"]) <= 0:
            raise ValueError(f"threshold_scale must be > 0, got {p['threshold_scale']}")
        if int(p["min_area"]) < 0 or int(p["min_distance"]) < 1:
            raise ValueError(f"min_area must be >= 0 and min_distance >= 1, got {p['min_area']}, {p['min_distance']}")
        img = as_rgb(image, "image")
        if should_stop is not None and should_stop():
            raise InterruptedError("segmentation cancelled")
        # one threshold for the whole image: every tile and every transform shares it
        thr = _threshold(_density(img, float(p["sigma"])), float(p["threshold_scale"]))
        if thr is None:
            if progress is not None:
                progress(1, 1, "no stained nuclei")
            return np.zeros(img.shape[:2], np.uint32)

        def one(rgb: np.ndarray) -> np.ndarray:
            return watershed_labels(_density(rgb, float(p["sigma"])), thr, min_area=int(p["min_area"]),
                                    min_distance=int(p["min_distance"]), should_stop=should_stop)

        fn = one
        if tta:
            def fn(rgb: np.ndarray) -> np.ndarray:
                return tta_instances(one, rgb, should_stop=should_stop)

        return segment_tiled(fn, img, tile=TILE, overlap=OVERLAP, progress=progress, should_stop=should_stop)
