"""The classic (training-free) renderer: nuclei fused with the reference's background in HED space.

Gong et al. (WACV 2021), eq. 1, and Hou et al. (CVPR 2019): the output is ``M * F + (1 - M) * B`` in
haematoxylin-eosin-DAB optical density, where ``B`` is the reference tile with its nuclei inpainted away, ``F``
the nuclei's appearance drawn from the reference's own nuclei (mean stain densities per nucleus, their spread,
chromatin texture) and ``M`` the instance masks with softened edges.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .._checks import SeedLike, as_labels, as_rgb, as_rng
from ..stain import hed_to_rgb, rgb_to_hed
from . import register

__all__ = ["ClassicRenderer", "detect_nuclei", "reference_background"]


def detect_nuclei(image, *, min_area: int = 30) -> np.ndarray:
    """Rough nucleus instances of an H&E tile: Otsu on the smoothed haematoxylin density, small objects removed,
    touching blobs left merged (enough to learn colours and to inpaint). uint32 labels."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    h = ndi.gaussian_filter(rgb_to_hed(image)[..., 0], 1.0)
    if np.ptp(h) <= 0:
        return np.zeros(h.shape, np.uint32)
    fg = remove_small_objects(h > threshold_otsu(h), max_size=min_area - 1)
    return label(fg).astype(np.uint32)


def reference_background(hed: np.ndarray, nuclei: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The reference in HED with its nuclei inpainted by copying: each hole pixel takes the value of the pixel a
    random shift away (the same shift for a whole pass, so texture is copied in coherent pieces), over up to 24
    passes; anything left is filled by a normalised convolution of the surroundings."""
    hole = ndi.binary_dilation(nuclei > 0, iterations=2)
    out = hed.copy()
    todo = hole.copy()
    keep = ~hole
    reach = max(8, int(min(hed.shape[:2]) // 8))
    for _ in range(24):
        if not todo.any():
            break
        dy, dx = (int(v) for v in rng.integers(-reach, reach + 1, 2))
        src_ok = np.roll(keep, (dy, dx), axis=(0, 1))
        fill = todo & src_ok
        out[fill] = np.roll(hed, (dy, dx), axis=(0, 1))[fill]
        todo &= ~fill
    if todo.any():
        w = ndi.gaussian_filter(keep.astype(np.float32), 16.0)
        smooth = np.stack([ndi.gaussian_filter(hed[..., c] * keep, 16.0) for c in range(3)], -1)
        out[todo] = (smooth / np.maximum(w, 1e-3)[..., None])[todo]
    return out


def _fit_output(bg: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Crop (at a random offset) or mirror-tile the background to ``shape``."""
    h, w = shape
    reps = (int(np.ceil(h / bg.shape[0])) + 1, int(np.ceil(w / bg.shape[1])) + 1)
    if reps != (2, 2) or bg.shape[0] < h or bg.shape[1] < w:
        rows = [np.concatenate([bg if (j % 2 == 0) else bg[:, ::-1] for j in range(reps[1])], 1) for _ in range(1)]
        strip = rows[0]
        big = np.concatenate([strip if (i % 2 == 0) else strip[::-1] for i in range(reps[0])], 0)
    else:
        big = bg
    r0 = int(rng.integers(0, big.shape[0] - h + 1))
    c0 = int(rng.integers(0, big.shape[1] - w + 1))
    return big[r0 : r0 + h, c0 : c0 + w]


@register("classic")
class ClassicRenderer:
    """Training-free renderer (see the module docstring)."""

    name = "classic"
    description = "HED-space fusion of reference nuclei colours over the inpainted reference background (no training)"

    def __call__(self, labels, style, *, style_labels=None, seed: SeedLike = None, device: str = "auto",
                 progress=None, should_stop=None) -> np.ndarray:
        lab = as_labels(labels, "labels")
        ref = as_rgb(style, "style")
        if lab.size == 0:
            raise ValueError(f"labels is empty (shape {lab.shape})")
        rng = as_rng(seed)
        if style_labels is None:
            nuclei = detect_nuclei(ref)
        else:
            nuclei = as_labels(style_labels, "style_labels")
            if nuclei.shape != ref.shape[:2]:
                raise ValueError(f"style_labels must have the style's shape {ref.shape[:2]}, got {nuclei.shape}")
        if not nuclei.any():
            raise ValueError("the style reference has no detectable nuclei: give its style_labels, or another tile")
        if progress:
            progress(1, 4, "reference")
        hed = rgb_to_hed(ref)
        # per reference nucleus: mean densities and the chromatin texture's spread around them
        ids, inv = np.unique(nuclei, return_inverse=True)
        inv = inv.reshape(nuclei.shape)
        fg = nuclei > 0
        k = inv[fg] - (1 if ids[0] == 0 else 0)
        n_ref = int(k.max()) + 1
        cnt = np.bincount(k, minlength=n_ref).astype(np.float64)
        means = np.stack([np.bincount(k, weights=hed[..., c][fg], minlength=n_ref) for c in range(3)], 1) / cnt[:, None]
        # the chromatin spread inside nuclei, measured away from their blurred edges
        inner = ndi.binary_erosion(fg, iterations=2)
        kin = inv[inner] - (1 if ids[0] == 0 else 0)
        vals = hed[..., 0][inner] - means[kin, 0] if inner.any() else hed[..., 0][fg] - means[k, 0]
        spread = float(np.std(vals))
        bg = reference_background(hed, nuclei, rng)
        if progress:
            progress(2, 4, "background")
        out_bg = _fit_output(bg, lab.shape, rng)
        # each target nucleus takes the colour of a randomly drawn reference nucleus, with a little variation
        tid, tinv = np.unique(lab, return_inverse=True)
        tinv = tinv.reshape(lab.shape)
        n_t = tid.size
        # draw from the reference's typical nuclei: outliers in haematoxylin (pale: cytoplasm or out of focus) or in
        # DAB (brown: red blood cells, pigment) are left out
        pool = np.flatnonzero(
            (means[:, 0] >= np.percentile(means[:, 0], 10)) & (means[:, 2] <= np.percentile(means[:, 2], 90))
        )
        if pool.size == 0:
            pool = np.arange(n_ref)
        pick = pool[rng.integers(0, pool.size, n_t)]
        col = means[pick] * rng.normal(1.0, 0.05, (n_t, 1))
        if tid[0] == 0:
            col[0] = 0
        fore = col[tinv].astype(np.float32)
        # chromatin texture: smoothed noise on the haematoxylin channel with the reference's spread
        tex = ndi.gaussian_filter(rng.standard_normal(lab.shape).astype(np.float32), 1.0)
        tex *= spread / max(float(tex.std()), 1e-6)
        fore[..., 0] += tex
        if progress:
            progress(3, 4, "fusion")
        # soft masks: blurred instance edges, eq. 1 in HED
        m = ndi.gaussian_filter((lab > 0).astype(np.float32), 0.8)[..., None]
        fused = m * fore + (1 - m) * out_bg
        rgb = hed_to_rgb(np.maximum(fused, 0))
        if progress:
            progress(4, 4, "done")
        return rgb
