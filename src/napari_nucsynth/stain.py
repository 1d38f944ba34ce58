"""Stain colour tools for H&E: RGB <-> HED, Reinhard and Macenko normalisation, CLAHE and stain/modality domains
(Qt-free, numpy/scikit-image).

All functions take RGB images by the project's one conversion rule (:func:`napari_nucsynth._checks.as_rgb`: grey,
RGBA, float in [0, 1] and uint16 are converted; anything else is a ``ValueError`` naming the argument) and return
RGB uint8 where they return an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import SeedLike, as_rgb, as_rng

__all__ = [
    "MacenkoStains",
    "clahe",
    "hed_to_rgb",
    "macenko",
    "macenko_stains",
    "reinhard",
    "rgb_to_hed",
    "stain_domains",
    "stain_features",
]


def rgb_to_hed(image) -> np.ndarray:
    """Haematoxylin, eosin and DAB optical densities (Ruifrok & Johnston), float32 ``H x W x 3``.

    scikit-image's ``rgb2hed`` formula and matrix, computed in float32 through a 256-entry logarithm table (the
    input is uint8 by the conversion rule): negative densities are clipped to 0, so the few colours outside the
    stains' cone do not come back exactly through :func:`hed_to_rgb`."""
    from skimage.color import hed_from_rgb

    rgb = as_rgb(image, "image")
    lut = (np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)).astype(np.float32)
    out = lut[rgb] @ hed_from_rgb.astype(np.float32)
    return np.maximum(out, 0, out=out)


def hed_to_rgb(hed) -> np.ndarray:
    """The inverse of :func:`rgb_to_hed`, as RGB uint8 (scikit-image's ``hed2rgb`` formula, in float32)."""
    from skimage.color import rgb_from_hed

    arr = np.asarray(hed, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"hed must be an H x W x 3 array of stain densities, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("hed holds NaN or infinite values")
    log_rgb = arr @ (rgb_from_hed * np.log(1e-6)).astype(np.float32)
    return _to_uint8(np.exp(log_rgb, out=log_rgb))


def _to_uint8(rgb01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb01, 0.0, 1.0) * 255.0).astype(np.uint8)


def reinhard(image, target) -> np.ndarray:
    """Reinhard et al. (2001) colour transfer: match each CIELAB channel's mean and standard deviation to the
    target's. Returns RGB uint8 of ``image``'s shape."""
    from skimage.color import lab2rgb, rgb2lab

    src = rgb2lab(as_rgb(image, "image"))
    tgt = rgb2lab(as_rgb(target, "target"))
    ms, ss = src.reshape(-1, 3).mean(0), src.reshape(-1, 3).std(0)
    mt, st = tgt.reshape(-1, 3).mean(0), tgt.reshape(-1, 3).std(0)
    out = (src - ms) / np.maximum(ss, 1e-6) * st + mt
    return _to_uint8(lab2rgb(out))


@dataclass(frozen=True)
class MacenkoStains:
    """Macenko et al. (2009) stain estimate: ``vectors`` (3, 2) unit optical-density vectors of haematoxylin
    (column 0) and eosin (column 1), and ``max_concentrations`` (2,), the 99th percentiles of their
    concentrations."""

    vectors: np.ndarray
    max_concentrations: np.ndarray


def _optical_density(rgb: np.ndarray, io: float) -> np.ndarray:
    return -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / io)


def macenko_stains(image, *, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15) -> MacenkoStains:
    """Estimate the H and E stain vectors of an H&E image (Macenko et al., ISBI 2009).

    Parameters
    ----------
    image : RGB image
    io : float
        Transmitted light intensity (the background's brightness).
    alpha : float
        Percentile (and 100 - alpha) of the angles that span the stain plane.
    beta : float
        Optical density below which a pixel counts as background and is ignored.

    Raises
    ------
    ValueError
        If fewer than 100 pixels are stained (a blank or nearly white image has no stains to estimate).
    """
    od = _optical_density(as_rgb(image, "image"), io)
    tissue = od[np.all(od >= beta, axis=1)]
    if len(tissue) < 100:
        raise ValueError(
            f"image has only {len(tissue)} stained pixels (optical density >= {beta} in every channel); "
            "Macenko normalisation needs an H&E tile with tissue"
        )
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]  # the two largest eigenvectors span the stain plane
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs red most: the vector with the larger red component is H
    he = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    he = he * np.sign(he.sum(0, keepdims=True))  # optical densities are positive
    he /= np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    return MacenkoStains(vectors=he, max_concentrations=np.percentile(conc, 99, axis=1))


def macenko(image, target, *, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15) -> np.ndarray:
    """Macenko stain normalisation of ``image`` to ``target``'s stains (vectors and concentration range).

    ``target`` may be an RGB image or a :class:`MacenkoStains` estimated before. Returns RGB uint8.
    """
    img = as_rgb(image, "image")
    src = macenko_stains(img, io=io, alpha=alpha, beta=beta)
    tgt = target if isinstance(target, MacenkoStains) else macenko_stains(target, io=io, alpha=alpha, beta=beta)
    od = _optical_density(img, io)
    conc = np.linalg.lstsq(src.vectors, od.T, rcond=None)[0]
    conc *= (tgt.max_concentrations / np.maximum(src.max_concentrations, 1e-6))[:, None]
    out = io * np.exp(-(tgt.vectors @ conc))
    return np.round(np.clip(out.T, 0, 255)).reshape(img.shape).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# CLAHE and stain/modality domains (Liu et al.: k-means on HSV statistics of CLAHE-equalised tiles)


def clahe(image, *, clip_limit: float = 0.01, kernel_size=None) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of an RGB image, RGB uint8 out.

    scikit-image's ``equalize_adapthist`` (on an RGB image it equalises the V channel of HSV, so hues are kept);
    ``kernel_size`` None is its default (1/8 of each side)."""
    from skimage.exposure import equalize_adapthist

    rgb = as_rgb(image, "image")
    out = equalize_adapthist(rgb, kernel_size=kernel_size, clip_limit=clip_limit)
    return _to_uint8(out)


def stain_features(image, *, max_side: int = 256) -> np.ndarray:
    """The descriptor :func:`stain_domains` clusters, 19 numbers of the HSV pixels after :func:`clahe`: hue's
    mean and spread in cos/sin form (4), mean, standard deviation and 10/50/90 % quantiles of S and of V (10),
    hue's 10/50/90 % quantiles, standard deviation and mean (5).

    The image is first subsampled (by striding) to at most ``max_side`` pixels a side, so a 1000 x 1000 tile
    costs a few milliseconds."""
    from skimage.color import rgb2hsv

    rgb = as_rgb(image, "image")
    step = max(1, int(np.ceil(max(rgb.shape[:2]) / max_side)))
    hsv = rgb2hsv(clahe(rgb[::step, ::step])).reshape(-1, 3)
    ang = hsv[:, 0] * 2 * np.pi
    hue = [np.cos(ang).mean(), np.sin(ang).mean(), np.cos(ang).std(), np.sin(ang).std()]
    sv = []
    for c in (1, 2):
        x = hsv[:, c]
        sv += [x.mean(), x.std(), *np.quantile(x, [0.1, 0.5, 0.9])]
    sat_hue = np.quantile(hsv[:, 0], [0.1, 0.5, 0.9])
    return np.array(hue + sv + list(sat_hue) + [hsv[:, 0].std(), hsv[:, 0].mean()], dtype=np.float64)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 10, iters: int = 100):
    """Lloyd's k-means with k-means++ seeding, best of ``n_init`` starts (small numpy version)."""
    best = (np.inf, None)
    n = len(x)
    for _ in range(n_init):
        centres = [x[int(rng.integers(n))]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            centres.append(x[int(rng.choice(n, p=p))])
        c = np.asarray(centres)
        lab = np.zeros(n, dtype=np.int64)
        for it in range(iters):
            d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
            new = d.argmin(1)
            if it and np.array_equal(new, lab):
                break
            lab = new
            for j in range(k):
                if np.any(lab == j):
                    c[j] = x[lab == j].mean(0)
                else:  # an emptied cluster restarts at the point farthest from its centre
                    far = int(d[np.arange(n), lab].argmax())
                    c[j] = x[far]
                    lab[far] = j
        inertia = float(((x - c[lab]) ** 2).sum())
        if inertia < best[0] - 1e-12:
            best = (inertia, lab.copy())
    return best[1]


def stain_domains(images, k: int, seed: SeedLike = 0) -> np.ndarray:
    """Cluster tiles into ``k`` stain/modality domains (Liu et al.): k-means on HSV statistics after CLAHE.

    Parameters
    ----------
    images : sequence of RGB images (any sizes), or an (N, F) array of :func:`stain_features`
    k : int
        Number of domains, ``1 <= k <= len(images)``.
    seed : int, numpy Generator or None
        k-means++ seeding; the same seed gives the same domains.

    Returns
    -------
    (N,) int64 array
        Domain of each image, ``0..k-1``, numbered by the order of first appearance (image 0 is in domain 0), so
        the numbering does not depend on the k-means internals. Every domain holds at least one image.

    Notes
    -----
    Features are standardised (zero mean, unit variance per feature) before clustering. scikit-learn is not
    needed: the clustering is a small numpy k-means (k-means++, 10 restarts).
    """
    if isinstance(images, np.ndarray) and images.ndim == 2 and images.dtype.kind == "f":
        feats = images.astype(np.float64)
    else:
        imgs = list(images)
        feats = np.stack([stain_features(im) for im in imgs]) if imgs else np.zeros((0, 19))
    n = len(feats)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer number of domains, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} domains need at least {k} images, got {n}")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    sd = feats.std(0)
    x = (feats - feats.mean(0)) / np.where(sd > 1e-12, sd, 1.0)
    lab = _kmeans(x, int(k), as_rng(seed))
    _, first = np.unique(lab, return_index=True)
    order = np.argsort(np.argsort(first))  # cluster -> rank of its first image
    return order[lab].astype(np.int64)
