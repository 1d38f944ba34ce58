"""Stain colour tools for H&E: RGB <-> HED, Reinhard and Macenko normalisation (Qt-free, numpy/scikit-image).

All functions take RGB images by the project's one conversion rule (:func:`napari_nucsynth._checks.as_rgb`: grey,
RGBA, float in [0, 1] and uint16 are converted; anything else is a ``ValueError`` naming the argument) and return
RGB uint8 where they return an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._checks import as_rgb

__all__ = ["MacenkoStains", "hed_to_rgb", "macenko", "macenko_stains", "reinhard", "rgb_to_hed"]


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
