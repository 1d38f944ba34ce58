"""Stain colour tools for H&E: RGB <-> HED, Reinhard and Macenko normalisation, CLAHE, stain/modality domains, and
stain/modality transfer between tiles (Qt-free, numpy/scikit-image; the learned ``drit`` transfer loads torch only
when it runs).

All functions take RGB images by the project's one conversion rule (:func:`napari_nucsynth._checks.as_rgb`: grey,
RGBA, float in [0, 1] and uint16 are converted; anything else is a ``ValueError`` naming the argument) and return
RGB uint8 where they return an image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._checks import SeedLike, as_rgb, as_rng

__all__ = [
    "TRANSFER_METHODS",
    "MacenkoStains",
    "StainReference",
    "clahe",
    "hed_to_rgb",
    "macenko",
    "macenko_stains",
    "mean_optical_density",
    "modality_augment",
    "modality_tta",
    "od_distance",
    "reinhard",
    "rgb_to_hed",
    "shipped_drit_checkpoint",
    "stain_domains",
    "stain_features",
    "stain_reference",
    "transfer",
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
    mt, st = _lab_stats(as_rgb(target, "target"))
    ms, ss = src.reshape(-1, 3).mean(0), src.reshape(-1, 3).std(0)
    out = (src - ms) / np.maximum(ss, 1e-6) * st + mt
    return _to_uint8(lab2rgb(out))


def _lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each CIELAB channel of an RGB uint8 image."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb).reshape(-1, 3)
    return lab.mean(0), lab.std(0)


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


# ----------------------------------------------------------------------------------------------------------------
# stain/modality transfer (Liu, Wagner & Peng's multi-modality augmentation; Reinhard and Macenko for comparison)

#: the methods of :func:`transfer`
TRANSFER_METHODS = ("drit", "reinhard", "macenko")


@dataclass(frozen=True)
class StainReference:
    """A reference modality with its statistics computed once (:func:`stain_reference`), for transferring many
    images (training augmentation, test-time augmentation) to it: ``image`` (RGB uint8, what ``drit`` encodes),
    ``lab_mean`` and ``lab_std`` (Reinhard's CIELAB statistics) and ``stains`` (Macenko's estimate, None when the
    image has too few stained pixels for one)."""

    image: np.ndarray
    lab_mean: np.ndarray
    lab_std: np.ndarray
    stains: MacenkoStains | None


def stain_reference(image) -> StainReference:
    """The :class:`StainReference` of an RGB image (any size; converted by the project's rule)."""
    rgb = as_rgb(image, "reference")
    mean, std = _lab_stats(rgb)
    try:
        stains = macenko_stains(rgb)
    except ValueError:
        stains = None
    return StainReference(image=rgb, lab_mean=mean, lab_std=std, stains=stains)


def mean_optical_density(image) -> np.ndarray:
    """The mean optical density of each RGB channel, ``-log10((I + 1) / 256)`` averaged over every pixel: (3,)
    float64. Its Euclidean distance between two images (:func:`od_distance`) is how the stain-transfer benchmark
    measures how far apart two modalities are."""
    rgb = as_rgb(image, "image")
    lut = -np.log10((np.arange(256) + 1.0) / 256.0)
    return lut[rgb.reshape(-1, 3)].mean(0)


def od_distance(a, b) -> float:
    """Euclidean distance between the mean optical densities (:func:`mean_optical_density`) of two images."""
    return float(np.linalg.norm(mean_optical_density(a) - mean_optical_density(b)))


def _macenko_transfer(img: np.ndarray, src: MacenkoStains, tgt: MacenkoStains, io: float = 240.0) -> np.ndarray:
    """Macenko's concentrations of ``img`` (under its own stains ``src``), scaled to ``tgt``'s concentration range
    and rendered with ``tgt``'s stain vectors; the part of each pixel's optical density the two source stains do not
    explain is carried over unchanged, so an image restained to its own stains comes back exactly (the classic
    :func:`macenko` drops it). Exact inverse of the optical density: ``I = io exp(-OD) - 1``."""
    od = _optical_density(img, io).T  # 3 x P
    conc = np.linalg.lstsq(src.vectors, od, rcond=None)[0]
    residual = od - src.vectors @ conc
    conc *= (tgt.max_concentrations / np.maximum(src.max_concentrations, 1e-6))[:, None]
    out = io * np.exp(-(tgt.vectors @ conc + residual)) - 1.0
    return np.round(np.clip(out.T, 0, 255)).reshape(img.shape).astype(np.uint8)


def _reinhard_transfer(img: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """:func:`reinhard` with the target's CIELAB statistics given (colours outside sRGB are clipped, silently)."""
    import warnings

    from skimage.color import lab2rgb, rgb2lab

    src = rgb2lab(img)
    ms, ss = src.reshape(-1, 3).mean(0), src.reshape(-1, 3).std(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*negative Z values.*")
        return _to_uint8(lab2rgb((src - ms) / np.maximum(ss, 1e-6) * std + mean))


def shipped_drit_checkpoint() -> Path:
    """Where the ``drit`` model shipped with the package lives, ``data/models/drit_monuseg.pt`` (absent until one is
    trained and shipped): :func:`napari_nucsynth.models.drit.default_checkpoint` without importing torch, for the
    widgets that list ``drit`` only when a model exists."""
    return Path(__file__).resolve().parent / "data" / "models" / "drit_monuseg.pt"


def _drit_checkpoint(checkpoint) -> Path:
    from .models.drit import TRAIN_HINT, default_checkpoint  # a layer above this module: imported only when asked for

    if checkpoint is not None:
        return Path(checkpoint)
    path = default_checkpoint()
    if not path.is_file():
        raise ValueError(f"method='drit' needs a trained model: the shipped {path.name} is absent. Train one with "
                         f"{TRAIN_HINT} and pass checkpoint=, or use method='reinhard' or 'macenko' (no model needed)")
    return path


def transfer(image, reference, method: str = "drit", seed: SeedLike = None, checkpoint=None, device: str = "auto",
             progress: Callable[[int, int, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None, *, strength: float | None = None) -> np.ndarray:
    """``image``'s content (nuclei, tissue) in ``reference``'s stain modality (Liu, Wagner & Peng's multi-modality
    transfer), as RGB uint8 of ``image``'s shape.

    Parameters
    ----------
    image : RGB image
        What to restain (grey, RGBA, float in [0, 1] and uint16 are converted by
        :func:`napari_nucsynth._checks.as_rgb`), any size.
    reference : RGB image, :class:`StainReference`, or int
        The target modality: an image of any size, or its precomputed :class:`StainReference`. With
        ``method="drit"`` also an int ``k``: the mean style of stain domain ``k`` of the model's training tiles
        (stored in the checkpoint by ``benchmarks/train_drit.py``), so no reference image is needed.
    method : {"drit", "reinhard", "macenko"}
        ``"drit"``: the DRIT++-style model (:mod:`napari_nucsynth.models.drit`): the image's content code decoded
        with the reference's style code. ``"reinhard"``: each CIELAB channel's mean and standard deviation matched
        to the reference's (Reinhard et al. 2001). ``"macenko"``: Macenko et al.'s (2009) stain vectors of both
        images; the image's H and E concentrations, scaled to the reference's 99th-percentile range, rendered with
        the reference's stain vectors (the optical density the two stains do not explain is kept, so a tile
        restained to itself comes back unchanged).
    seed : int, numpy Generator or None
        The three methods are deterministic (``drit`` uses the mean of the reference's style code); accepted for
        the project's convention and kept for sampled styles.
    checkpoint : path, optional
        A ``drit`` checkpoint (the shipped ``data/models/drit_monuseg.pt`` when None; an error saying how to train
        one when it is absent). Ignored by the other methods.
    device : str
        "auto", "cpu", "cuda", "mps" (``drit`` only).
    progress, should_stop : callables, optional
        ``progress(done, total, what)``; ``should_stop()`` True stops the work with ``InterruptedError``.
    strength : float in [0, 1], optional
        ``drit`` only: how far the style code moves from the image's own (0) to the reference's (1); default the
        checkpoint's ``config["strength"]`` (chosen on training tiles), 1 when it has none.

    Raises
    ------
    ValueError
        An unknown method, a bad image, a reference without tissue for ``macenko`` (an image with fewer than 100
        stained pixels has no stains to estimate), ``drit`` without a model, or a ``strength`` out of [0, 1] or
        given to another method.
    """
    if method not in TRANSFER_METHODS:
        raise ValueError(f"method must be one of {TRANSFER_METHODS}, got {method!r}")
    img = as_rgb(image, "image")
    as_rng(seed)  # validated like every seed
    if should_stop is not None and should_stop():
        raise InterruptedError("stain transfer stopped")
    if method == "drit":
        return _transfer_drit(img, reference, seed, checkpoint, device, progress, should_stop, strength)
    if strength is not None:
        raise ValueError(f"strength is a drit setting; {method!r} restains fully")
    if isinstance(reference, (bool, int, np.integer)):
        raise ValueError(f"reference must be an RGB image or a StainReference for method={method!r} (a domain "
                         "index needs method='drit')")
    ref = reference if isinstance(reference, StainReference) else None
    if method == "reinhard":
        mean, std = (ref.lab_mean, ref.lab_std) if ref is not None else _lab_stats(as_rgb(reference, "reference"))
        out = _reinhard_transfer(img, mean, std)
    else:
        tgt = _macenko_target(reference)
        out = _macenko_transfer(img, macenko_stains(img), tgt)
    if progress is not None:
        progress(1, 1, f"{method} stain transfer")
    return out


def _macenko_target(reference) -> MacenkoStains:
    """The stains of a reference (an image or a :class:`StainReference`) for Macenko transfer, or a ``ValueError``
    that says the reference has no tissue."""
    if isinstance(reference, StainReference):
        if reference.stains is None:
            raise ValueError("reference has too few stained pixels for Macenko's stain estimate; choose a "
                             "reference with tissue, or method='reinhard'")
        return reference.stains
    try:
        return macenko_stains(as_rgb(reference, "reference"))
    except ValueError as exc:
        raise ValueError(f"reference: {exc}") from None


def _transfer_drit(img, reference, seed, checkpoint, device, progress, should_stop, strength=None) -> np.ndarray:
    from .devices import resolve_device
    from .models import drit  # a layer above this module: imported only when asked for

    model = drit.load_model(_drit_checkpoint(checkpoint), resolve_device(device))
    style = None
    if isinstance(reference, (bool, int, np.integer)):
        styles = model.config.get("domain_styles")
        if not styles:
            raise ValueError("this drit checkpoint holds no domain styles; pass a reference image instead of a "
                             "domain index")
        if isinstance(reference, bool) or not 0 <= int(reference) < len(styles):
            raise ValueError(f"reference domain must be in 0..{len(styles) - 1}, got {reference!r}")
        style, reference = np.asarray(styles[int(reference)], np.float32), None
    elif isinstance(reference, StainReference):
        reference = reference.image
    else:
        reference = as_rgb(reference, "reference")
    return drit.transfer(model, img, reference, seed, style=style, strength=strength, progress=progress,
                         should_stop=should_stop)


def _references(references, name: str = "references") -> list:
    refs = list(references) if isinstance(references, (list, tuple)) else None
    if not refs:
        raise ValueError(f"{name} must be a non-empty list of reference images or StainReferences")
    return refs


def modality_augment(image, rng: SeedLike, references: Sequence, *, method: str | None = None, checkpoint=None,
                     device: str = "cpu") -> np.ndarray:
    """A training augmentation (Liu et al.): ``image`` restained to the modality of a reference drawn at random.

    Parameters
    ----------
    image : RGB image
        A training crop; its labels stay valid (only colours change).
    rng : int, numpy Generator or None
        Draws the reference (pass the training loop's Generator).
    references : list of RGB images or :class:`StainReference`
        The modalities to draw from (prepare them once with :func:`stain_reference`: it caches the statistics), e.g.
        one or a few tiles per :func:`stain_domains` domain; with a ``drit`` model, ints (domain indices) work too.
    method : {"drit", "reinhard", "macenko"}, optional
        Default: ``"drit"`` when ``checkpoint`` is given, else ``"macenko"``.
    checkpoint : path, optional
        A ``drit`` checkpoint.
    device : str
        For ``drit`` (the training loop's device).

    Returns
    -------
    RGB uint8 of ``image``'s shape. With ``"macenko"``, a reference without enough stained pixels for a stain
    estimate falls back to ``"reinhard"``, and a crop without them (background) comes back unchanged (Reinhard
    would stretch its noise to the reference's contrast).
    """
    img = as_rgb(image, "image")
    refs = _references(references)
    gen = as_rng(rng)
    ref = refs[int(gen.integers(len(refs)))]
    method = method or ("drit" if checkpoint is not None else "macenko")
    if method == "macenko":
        ref = ref if isinstance(ref, StainReference) else stain_reference(ref)
        if ref.stains is None:
            return transfer(img, ref, method="reinhard")
        try:
            src = macenko_stains(img)
        except ValueError:  # (almost) no tissue in the crop: no stains to change
            return img.copy()
        return _macenko_transfer(img, src, ref.stains)
    return transfer(img, ref, method=method, seed=gen, checkpoint=checkpoint, device=device)


def modality_tta(image, references: Sequence, predict: Callable[[np.ndarray], np.ndarray], *,
                 postprocess: Callable[[np.ndarray], np.ndarray] | None = None, method: str = "macenko",
                 checkpoint=None, device: str = "auto", include_original: bool = True,
                 progress: Callable[[int, int, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Test-time augmentation over stain modalities: the mean of a dense predictor's maps over restained copies.

    Restaining changes colours only, never geometry, so the maps of every copy are aligned with the image and can
    be averaged pixel by pixel (HoVer-Net's nucleus probability and horizontal/vertical maps; any per-pixel
    probabilities), then post-processed once.

    Parameters
    ----------
    image : RGB image
    references : list of RGB images, :class:`StainReference` (or, for ``drit``, domain indices)
        One copy of ``image`` is made in each reference's modality (:func:`transfer`).
    predict : callable
        ``predict(rgb_uint8) -> H x W (x C)`` float maps, e.g. ``lambda im: seg.predict_maps(im, ...)`` of a
        segmenter with ``predict_maps`` (:mod:`napari_nucsynth.segment`).
    postprocess : callable, optional
        ``postprocess(mean_maps) -> labels``; when None the mean maps are returned.
    method, checkpoint, device
        How the copies are made (:func:`transfer`).
    include_original : bool
        Average the original image's maps in too (default).
    progress, should_stop : callables, optional
        ``progress(done, total, "modality test-time augmentation")`` per copy; ``should_stop()`` True raises
        ``InterruptedError``.

    Returns
    -------
    The mean maps (float32, ``predict``'s shape), or ``postprocess`` of them. With ``"macenko"`` the image's own
    stains are estimated once for all copies; an image without tissue (fewer than 100 stained pixels) has no stains
    to change, so its maps are those of the image alone (one prediction).
    """
    img = as_rgb(image, "image")
    refs = _references(references)
    if method not in TRANSFER_METHODS:
        raise ValueError(f"method must be one of {TRANSFER_METHODS}, got {method!r}")
    src, blank = None, False
    if method == "macenko":
        targets = [_macenko_target(r) for r in refs]  # a reference without tissue fails here, before any work
        try:
            src = macenko_stains(img)
        except ValueError:
            blank = True
    items = [None] if blank else ([None] if include_original else []) + refs
    total = len(items)
    acc, done = None, 0
    for k, ref in enumerate(items):
        if should_stop is not None and should_stop():
            raise InterruptedError("modality test-time augmentation stopped")
        if ref is None:
            copy = img
        elif method == "macenko":
            copy = _macenko_transfer(img, src, targets[k - int(include_original)])
        else:
            copy = transfer(img, ref, method=method, checkpoint=checkpoint, device=device)
        maps = np.asarray(predict(copy), dtype=np.float32)
        if maps.shape[:2] != img.shape[:2]:
            raise ValueError(f"predict must return maps of the image's height and width {img.shape[:2]}, got "
                             f"{maps.shape}")
        if acc is None:
            acc = maps.astype(np.float64)
        elif maps.shape != acc.shape:
            raise ValueError(f"predict returned maps of shape {maps.shape}, then {acc.shape}")
        else:
            acc += maps
        done += 1
        if progress is not None:
            progress(done, total, "modality test-time augmentation")
    mean = (acc / done).astype(np.float32)
    return postprocess(mean) if postprocess is not None else mean
