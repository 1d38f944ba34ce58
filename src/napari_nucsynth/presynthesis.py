"""Gong et al.'s pre-synthesis (WACV 2021), the classic training-free render: real reference nuclei warped into the
target masks, fused with the reference's inpainted background in HED space.

A base layer, Qt- and torch-free: the ``classic`` renderer (:mod:`napari_nucsynth.render.classic`, which only
registers :class:`ClassicRenderer`), the AdaIN generator's content images (:mod:`napari_nucsynth.models.adain`)
and the joint loop (:mod:`napari_nucsynth.train.joint`) import it; it imports none of ``render``, ``segment``,
``models`` or ``train`` (``tests/test_layers.py``).

Gong et al., eq. 1, and Hou et al. (CVPR 2019): the output is ``M * F + (1 - M) * B`` in
haematoxylin-eosin-DAB optical density, where

- ``B`` is the reference tile with its nuclei inpainted away (:func:`reference_background`), mirror-tiled to any
  output size;
- ``F`` is, inside each target nucleus, a real nucleus of the reference of similar size, mapped onto the target
  shape by the affine map that aligns their second moments (random flips of the principal axes), with a small
  smooth random deformation and a per-nucleus stain jitter: colour, intensity spread, chromatin texture and the
  darker rim all come from the reference's own nuclei;
- ``M`` is the instance foreground with edges softened by a Gaussian of ``edge_sigma`` px (``EDGE_SIGMA``, 0.8, by
  default; a sharper edge keeps more of the darker rim of vesicular nuclei, see docs/headline.md).

The target masks are never moved: the deformation acts on the texture mapped into them, so the rendered nuclei
sit exactly where the labels say.

Outputs taller or wider than ``TILE`` px are computed in strips of rows with a halo wider than every filter; each
pixel's value does not depend on the strip it was computed in, so the result equals the one-piece render (no
seams; tested). The analysis of a reference (nuclei, texture field, inpainted background) depends only on the
reference and its labels, so it is cached: in memory for the last references (a live re-render costs only the
fusion), and on disk by content (:func:`style_cache_dir`), so a style tile is analysed once per machine rather than
once per process; :func:`reference_from_files` keys a tile on disk by its files' sha256, so a tile analysed before is
not even decoded. A cached analysis is the same arrays, bit for bit, as a fresh one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ._checks import SeedLike, as_labels, as_rgb, as_rng
from .stain import hed_to_rgb, rgb_to_hed

__all__ = ["ClassicRenderer", "ReferenceStyle", "analyse_reference", "cache_dir", "detect_nuclei", "file_sha256",
           "is_analysed", "pin_reference", "reference_background", "reference_from_files", "style_cache_dir"]

#: Outputs larger than this in either dimension are computed in strips of this many rows.
TILE = 2048
#: Gaussian sigma (px) of the soft nucleus edges (the renderer's default ``edge_sigma``).
EDGE_SIGMA = 0.8
#: The largest ``edge_sigma``: its Gaussian (radius 4 sigma) must stay within a strip's halo.
MAX_EDGE_SIGMA = 2.0
#: Amplitude (px) and grid spacing (px) of the smooth random deformation of the mapped texture.
WARP_AMPLITUDE, WARP_SPACING = 1.5, 8
_HALO = 8  # >= the radius of the edge's Gaussian (4 * MAX_EDGE_SIGMA) and the label extension


def detect_nuclei(image, *, min_area: int = 30) -> np.ndarray:
    """Rough nucleus instances of an H&E tile: Otsu on the smoothed haematoxylin density, small objects removed,
    touching blobs left merged (enough to learn colours and to inpaint). uint32 labels."""
    from skimage.measure import label

    return label(_nuclei_mask(rgb_to_hed(image), min_area)).astype(np.uint32)


def _nuclei_mask(hed: np.ndarray, min_area: int = 30) -> np.ndarray:
    """The foreground of :func:`detect_nuclei` (bool) from the tile's HED densities (shared with the analysis, which
    needs only the mask of the detected nuclei when the reference has labels)."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    h = ndi.gaussian_filter(hed[..., 0], 1.0)
    if np.ptp(h) <= 0:
        return np.zeros(h.shape, bool)
    return remove_small_objects(h > threshold_otsu(h), max_size=min_area - 1)


def reference_background(hed: np.ndarray, hole: np.ndarray, rng: np.random.Generator, *, piece: int = 24,
                         candidates: int = 24, rounds: int = 4) -> np.ndarray:
    """Inpaint ``hole`` (bool) in the HED image ``hed`` by copying coherent pieces of the rest of the image.

    The hole is cut into pieces: its connected components split on a ``piece``-px grid whose lines are bent by
    smooth noise, so seams are not straight. In each round, every unfilled piece that borders known pixels takes,
    among ``candidates`` random shifts, the one whose source lies wholly outside the hole and whose copied border
    best matches the known pixels around the piece (mean absolute difference over a 3-px ring); filled pieces
    become known for the next round, so large holes fill from the outside in. Pieces no shift fits are filled by a
    normalised convolution of their surroundings. Finally the seams (piece and hole borders) are smoothed over
    one pixel.
    """
    H, W = hole.shape
    out = hed.copy()
    keep = ~hole
    if not hole.any():
        return out
    # grid lines bent into waves (amplitude piece/4, random wavelengths and phases); each wave depends on one
    # coordinate, so it is computed once per column (row) and read at the hole pixels only
    lam, phase = rng.uniform(2, 4, 2) * piece, rng.uniform(0, 2 * np.pi, 2)
    wave_r = piece / 4 * np.sin(np.arange(W)[None, :] / lam[0] * 2 * np.pi + phase[0])
    wave_c = piece / 4 * np.sin(np.arange(H)[:, None] / lam[1] * 2 * np.pi + phase[1])
    hy, hx = np.nonzero(hole)
    gr = np.floor((hy + wave_r[0, hx]) / piece).astype(np.int64) + 2
    gc = np.floor((hx + wave_c[hy, 0]) / piece).astype(np.int64) + 2
    comp, _ = ndi.label(hole)
    key = (comp[hy, hx].astype(np.int64) * (H // piece + 6) + gr) * (W // piece + 6) + gc
    present = np.bincount(key) > 0
    remap = np.cumsum(present)
    hp = remap[key]  # pieces 1..n of the hole pixels (raster order)
    n_pieces = int(remap[-1]) + 1
    pieces = np.zeros((H, W), np.int32)
    pieces[hy, hx] = hp
    flat_out = out.reshape(-1, 3)
    filled = np.zeros(n_pieces, bool)
    filled[0] = True
    known = keep.copy()
    reach = max(8, min(H, W) // 3)
    # sources are read through copies padded by ``reach``, so a shift is one addition to a flat index: the mask of
    # known pixels padded with False (a source outside the image is invalid), H and E by their edge values (the
    # clipping of the context's sources)
    R = reach
    Wp = W + 2 * R
    keep_pad = np.pad(keep, R, constant_values=False).ravel()
    hed_pad_h = np.pad(np.ascontiguousarray(hed[..., 0]), R, mode="edge").ravel()
    hed_pad_e = np.pad(np.ascontiguousarray(hed[..., 1]), R, mode="edge").ravel()
    # hole pixels sorted by piece (stable: raster order within each piece)
    by_piece = np.argsort(hp, kind="stable")
    shy, shx, shp = hy[by_piece], hx[by_piece], hp[by_piece]
    for _ in range(rounds):
        # each known pixel within 3 px of an unfilled piece is that piece's context (one piece per pixel: the
        # largest id), found within the unfilled pieces' bounding box and a 3-px margin of zeros (the same as
        # over the whole image)
        unf = ~filled[shp]
        if not unf.any():
            break
        uy, ux, up = shy[unf], shx[unf], shp[unf]
        r0, r1 = max(int(uy.min()) - 3, 0), min(int(uy.max()) + 4, H)
        c0, c1 = max(int(ux.min()) - 3, 0), min(int(ux.max()) + 4, W)
        crop = np.zeros((r1 - r0, c1 - c0), np.int32)
        crop[uy - r0, ux - c0] = up
        near = _grey_dilate(crop, 7)
        cy, cx = np.nonzero(known[r0:r1, c0:c1] & (near > 0))
        cp = near[cy, cx].astype(np.intp)
        cy += r0
        cx += c0
        if cp.size == 0:
            break
        best = np.full(n_pieces, np.inf)
        shift = np.zeros((n_pieces, 2), np.int64)
        ctx_count = np.bincount(cp, minlength=n_pieces)
        cy, cx, cp = cy[::2], cx[::2], cp[::2]  # every other context pixel is enough to score a shift
        ctx_h, ctx_e = flat_out[cy * W + cx, 0], flat_out[cy * W + cx, 1]  # H and E (DAB is ~0 in H&E)
        # a shift is valid for a piece when its source lies wholly outside the hole; the pieces' pixels are in
        # runs (up is sorted), and a sample of each run (its first pixel, then every 8th) rejects most shifts
        # before every pixel of the pieces left is checked
        starts = np.flatnonzero(np.r_[True, up[1:] != up[:-1]])
        ids = up[starts]
        lengths = np.diff(np.r_[starts, up.size])
        pos = np.arange(up.size) - np.repeat(starts, lengths)
        smp = np.flatnonzero(pos % 8 == 0)
        smp_starts = np.flatnonzero(pos[smp] == 0)
        base = (uy + R) * Wp + (ux + R)
        smp_base = base[smp]
        cbase = (cy + R) * Wp + (cx + R)
        cand = ~filled & (ctx_count > 0)
        for _c in range(candidates):
            dy, dx = (int(v) for v in rng.integers(-reach, reach + 1, 2))
            off = dy * Wp + dx
            alive = np.flatnonzero(np.logical_and.reduceat(keep_pad[smp_base + off], smp_starts))
            valid = np.zeros(n_pieces, bool)
            if alive.size:
                n_a = lengths[alive]
                first = np.cumsum(n_a) - n_a
                px_idx = np.repeat(starts[alive] - first, n_a) + np.arange(int(n_a.sum()))
                valid[ids[alive]] = np.logical_and.reduceat(keep_pad[base[px_idx] + off], first)
            # scored on the context of valid pieces only (the sums of a piece are over the same pixels, in order)
            use = np.flatnonzero(valid[cp])
            src = cbase[use] + off
            diff = np.abs(ctx_h[use] - hed_pad_h[src]) + np.abs(ctx_e[use] - hed_pad_e[src])
            score = np.bincount(cp[use], weights=diff, minlength=n_pieces) / np.maximum(ctx_count, 1)
            better = valid & cand & (score < best)
            best[better] = score[better]
            shift[better] = (dy, dx)
        take = np.isfinite(best)
        if not take.any():
            break
        sel = take[hp]
        ty, tx = hy[sel] + shift[hp[sel], 0], hx[sel] + shift[hp[sel], 1]
        _rows(out)[hy[sel] * W + hx[sel]] = _rows(hed)[ty * W + tx]
        known[hy[sel], hx[sel]] = True
        filled |= take
    todo = ~known
    if todo.any():  # normalised convolution (sigma 16 px), computed at a quarter of the resolution
        f = 4
        hp4, wp4 = -(-H // f) * f, -(-W // f) * f
        kn = np.pad(known.astype(np.float32), ((0, hp4 - H), (0, wp4 - W)))
        val = np.zeros((hp4, wp4, 3), out.dtype)
        np.multiply(out, known[..., None], out=val[:H, :W])
        kn = ndi.gaussian_filter(kn.reshape(hp4 // f, f, wp4 // f, f).mean((1, 3)), 16.0 / f)
        val = ndi.gaussian_filter(_block_means(val, f), (16.0 / f, 16.0 / f, 0))
        smooth = val / np.maximum(kn, 1e-3)[..., None]
        ty, tx = np.nonzero(todo)
        out[ty, tx] = smooth[ty // f, tx // f]
    # the seams: pixels whose 3 x 3 neighbourhood holds another piece (or the known region): the 3 x 3 maximum
    # differs from the minimum, i.e. some neighbour differs from the pixel itself
    seam = np.zeros((H, W), bool)
    for a, b in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                 ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
                 ((slice(1, None), slice(1, None)), (slice(None, -1), slice(None, -1))),
                 ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None)))):
        differs = pieces[a] != pieces[b]
        seam[a] |= differs
        seam[b] |= differs
    soft = ndi.gaussian_filter(out, (1.0, 1.0, 0))  # each channel alone (sigma 0: that axis is left as it is)
    seam = np.flatnonzero(seam)
    _rows(out)[seam] = _rows(soft)[seam]
    return out


def _grey_dilate(a: np.ndarray, size: int) -> np.ndarray:
    """``ndi.grey_dilation(a, size=size)`` of a 2-D integer image for an odd ``size``, bit for bit, about 5x faster:
    the maximum over each axis's window by doubling spans (``log2(size) + 1`` elementwise maxima an axis). At the
    borders scipy's default ``reflect`` mode adds only values already inside the window, so the window cut at the
    border (padding with the dtype's minimum) has the same maximum."""
    r = size // 2
    lo = np.iinfo(a.dtype).min
    for axis in (0, 1):
        n = a.shape[axis]
        m = np.moveaxis(np.pad(a, [(r, r) if ax == axis else (0, 0) for ax in (0, 1)], constant_values=lo), axis, 0)
        span = 1
        while 2 * span <= size:  # m[i] is the maximum of the padded image's rows i .. i + span - 1
            m, span = np.maximum(m[:-span], m[span:]), 2 * span
        a = np.moveaxis(np.maximum(m[:n], m[size - span:size - span + n]), 0, axis)
    return a


def _binary_dilate(a: np.ndarray, iterations: int) -> np.ndarray:
    """``ndi.binary_dilation(a, iterations=iterations)`` of a 2-D mask for ``iterations >= 1`` (the 4-connected
    cross, nothing outside the image), bit for bit, about 15x faster: each iteration ORs the mask with its four
    one-pixel shifts."""
    out = np.asarray(a, dtype=bool)
    for _ in range(iterations):
        prev, out = out, out.copy()
        out[1:] |= prev[:-1]
        out[:-1] |= prev[1:]
        out[:, 1:] |= prev[:, :-1]
        out[:, :-1] |= prev[:, 1:]
    return out


def _block_means(x: np.ndarray, f: int) -> np.ndarray:
    """The means of the ``f`` x ``f`` blocks of an H x W x C image (H and W multiples of ``f``):
    ``x.reshape(H // f, f, W // f, f, C).mean((1, 3))`` bit for bit, 5x faster. With C >= 2 channels numpy sums
    each block's values one after the other, row by row, in ``x``'s dtype, then divides (checked on thousands of
    shapes; with one channel it sums in another order, and numpy's own mean is used)."""
    v = x.reshape(x.shape[0] // f, f, x.shape[1] // f, f, *x.shape[2:])
    if x.ndim != 3 or x.shape[2] < 2:
        return v.mean((1, 3))
    s = v[:, 0, :, 0].copy()
    for k in range(f):
        for j in range(f):
            if k or j:
                s += v[:, k, :, j]
    return np.true_divide(s, np.intp(f * f), out=s, casting="unsafe")


def _rows(img: np.ndarray) -> np.ndarray:
    """An H x W x C image as a flat array of H * W pixels of C values each, one opaque item per pixel (a view of a
    C-contiguous image, which is written through): gathering and scattering whole pixels through it moves the
    same bytes about twice as fast as indexing the rows of the (H * W, C) array."""
    img = np.ascontiguousarray(img)
    return img.reshape(-1, img.shape[-1]).view(f"V{img.shape[-1] * img.itemsize}").ravel()


@dataclass(frozen=True)
class ReferenceStyle:
    """What the renderer learns from one reference tile (see :func:`analyse_reference`)."""

    field: np.ndarray  # H x W x 3 HED: the reference with every non-nucleus pixel taking its nearest nucleus pixel
    background: np.ndarray  # H x W x 3 HED: the reference with its nuclei inpainted away
    centroid: np.ndarray  # (n, 2) row, col of the typical nuclei drawn from
    axes: np.ndarray  # (n, 2, 2) principal axes (columns) of each nucleus
    sd: np.ndarray  # (n, 2) standard deviations along those axes (px)
    log_area: np.ndarray  # (n,) log area (px)
    n_detected: int  # nuclei found in the reference (before leaving out outliers)


def _moments(lab: np.ndarray, n: int):
    """Area, centroid (n, 2) and covariance (n, 2, 2) of labels 0..n-1 (rows of absent labels are zero)."""
    rr, cc = np.nonzero(lab)
    k = lab[rr, cc]
    area = np.bincount(k, minlength=n).astype(np.float64)
    a = np.maximum(area, 1)
    mr = np.bincount(k, weights=rr, minlength=n) / a
    mc = np.bincount(k, weights=cc, minlength=n) / a
    dr, dc = rr - mr[k], cc - mc[k]
    cov = np.empty((n, 2, 2))
    cov[:, 0, 0] = np.bincount(k, weights=dr * dr, minlength=n) / a
    cov[:, 1, 1] = np.bincount(k, weights=dc * dc, minlength=n) / a
    cov[:, 0, 1] = cov[:, 1, 0] = np.bincount(k, weights=dr * dc, minlength=n) / a
    # a pixel is a unit square: add its own variance so one-pixel-wide objects have a non-zero width
    cov[:, 0, 0] += 1 / 12
    cov[:, 1, 1] += 1 / 12
    return area, np.stack([mr, mc], 1), cov


def _ranks(labels: np.ndarray) -> np.ndarray:
    """Each pixel's rank among the label values present (``np.unique(labels, return_inverse=True)[1]``, intp, the
    labels' shape), by a table of the values present where they are not much larger than the image (a
    ``bincount``, about 20x faster than the sort ``np.unique`` does)."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top > 4 * flat.size + 65536:  # sparse huge ids: the sort
        return np.unique(flat, return_inverse=True)[1].reshape(labels.shape)
    rank = np.cumsum(np.bincount(flat.astype(np.intp, copy=False), minlength=1) > 0) - 1
    return rank[flat].reshape(labels.shape)


def analyse_reference(style, style_labels=None) -> ReferenceStyle:
    """Find the reference's nuclei (``style_labels``, or :func:`detect_nuclei`), their shapes and stain, the
    texture field sampled by the renderer, and the background with every nucleus (labelled or detected)
    inpainted. Deterministic (the inpainting uses a fixed seed), so the result can be cached per reference."""
    from skimage.measure import label

    ref = as_rgb(style, "style")
    hed = rgb_to_hed(ref)
    detected = _nuclei_mask(hed)  # detect_nuclei(ref) > 0
    if style_labels is None:
        nuclei = label(detected).astype(np.uint32)  # detect_nuclei(ref)
    else:
        nuclei = as_labels(style_labels, "style_labels")
        if nuclei.shape != ref.shape[:2]:
            raise ValueError(f"style_labels must have the style's shape {ref.shape[:2]}, got {nuclei.shape}")
    if not nuclei.any():
        raise ValueError("the style reference has no detectable nuclei: give its style_labels, or another tile")
    nuclei = _ranks(nuclei)
    n = int(nuclei.max()) + 1
    area, centroid, cov = _moments(nuclei, n)
    fg = nuclei > 0
    k = nuclei[fg]
    sums = np.stack([np.bincount(k, weights=hed[..., c][fg], minlength=n) for c in range(3)], 1)  # HED per nucleus
    mean_h = sums[:, 0] / np.maximum(area, 1)
    mean_d = sums[:, 2] / np.maximum(area, 1)
    ids = np.arange(1, n)
    # typical nuclei only: pale ones (cytoplasm, out of focus), brown ones (red cells, pigment) and fragments are
    # left out when there are enough others
    typical = ids[(mean_h[ids] >= np.percentile(mean_h[ids], 10)) & (mean_d[ids] <= np.percentile(mean_d[ids], 90))
                  & (area[ids] >= 20)]
    if typical.size < 3:
        typical = ids
    order = typical
    evals, evecs = np.linalg.eigh(cov[order])
    idx = ndi.distance_transform_edt(~fg, return_distances=False, return_indices=True)
    field = _rows(hed)[idx[0] * hed.shape[1] + idx[1]].view(hed.dtype).reshape(hed.shape)
    hole = _binary_dilate(fg | detected, 2)  # ndi.binary_dilation(fg | detected, iterations=2)
    background = reference_background(hed, hole, np.random.default_rng(0))
    # keep the reference's mean densities. The inpainting removed everything dark (blobs detected outside the
    # labels too), so the background is lifted back to the reference's mean outside its nuclei; a lift, not a
    # scale, keeps the nuclei/background contrast the reference has. Likewise the texture field is scaled so the
    # nuclei drawn from (typical ones only) have the mean density of all the reference's nuclei.
    # The means are float64 sums in numpy's own order, not BLAS: a multi-threaded BLAS sums in an order that
    # depends on the thread count, which changed a few pixels by 1 between OPENBLAS_NUM_THREADS=1 and 2. The
    # nuclei's means come from the per-nucleus sums above.
    off = (~fg).ravel()
    lift = np.einsum("n,nk->k", off, (hed - background).reshape(-1, 3), dtype=np.float64) / max(float(off.sum()), 1.0)
    background += lift.astype(np.float32)
    field *= ((sums.sum(0) / max(float(area.sum()), 1.0))
              / np.maximum(sums[order].sum(0) / max(float(area[order].sum()), 1.0), 1e-6)).astype(np.float32)
    return ReferenceStyle(field=field, background=background, centroid=centroid[order], axes=evecs,
                          sd=np.sqrt(np.maximum(evals, 0.25)), log_area=np.log(area[order]), n_detected=n - 1)


# ----------------------------------------------------------------------------------------------------------------
# the cache of analyses: in memory (the last references) and on disk (by content, shared by processes and runs)

_CACHE: OrderedDict[bytes, ReferenceStyle] = OrderedDict()
#: The in-memory cache keeps the most recent analyses up to this many bytes (and at least the last one): about 20
#: references of 1000 x 1000 px, so a worker of ``generate`` holds a style bank of that size without reloading.
_CACHE_BYTES = 512 * 2**20
_CACHE_MAX = 64
#: The disk cache (:func:`style_cache_dir`) drops its least recently used analyses beyond this many bytes.
DISK_CACHE_BYTES = 2 * 2**30
#: References smaller than this (pixels) stay in memory only: the training loops render every random crop (128 or
#: 256 px) in its own style, crops that never come back and take well under 0.3 s to analyse.
DISK_CACHE_MIN_PIXELS = 384 * 384
#: Bump when the cached arrays change meaning in a way the source hash of :func:`_analysis_version` cannot see.
ANALYSIS_FORMAT = 1
_OFF = ("", "0", "off", "none", "false", "no")


def cache_dir() -> Path | None:
    """The folder of napari-nucsynth's caches: ``$NUCSYNTH_CACHE``, else ``~/.cache/napari-nucsynth`` (where the
    models folder ``models/`` also lives unless ``$NUCSYNTH_MODELS`` says otherwise). None when
    ``NUCSYNTH_CACHE`` is ``off`` (or ``0``, ``none``, empty): nothing is cached on disk."""
    env = os.environ.get("NUCSYNTH_CACHE")
    if env is None:
        return Path.home() / ".cache" / "napari-nucsynth"
    return None if env.strip().lower() in _OFF else Path(env).expanduser()


def style_cache_dir() -> Path | None:
    """Where analysed references are kept (``<cache_dir>/styles``), or None when the disk cache is off.

    One ``.npz`` file per reference (of at least ``DISK_CACHE_MIN_PIXELS``) and analysis version, named by a hash
    of the reference's pixels, its ``style_labels`` (values, shape and dtype) and :func:`_analysis_version`;
    written atomically, checked when read (a damaged or foreign file is ignored and rewritten), and the least
    recently used files are removed beyond ``DISK_CACHE_BYTES``. Deleting the folder is always safe.
    """
    root = cache_dir()
    return None if root is None else root / "styles"


def code_version(*objs, fmt: int = 1) -> str:
    """A hash of the source of ``objs`` (functions, classes, modules) and of the numpy, scipy and scikit-image
    versions: the version of a computation, for the caches of its results. Editing the code starts fresh caches
    instead of reading results made by other code. Without source (a frozen install) the package version stands
    in for it."""
    import inspect
    import sys

    import scipy
    import skimage

    from . import __version__

    h = hashlib.blake2b(digest_size=16)
    h.update(repr((fmt, np.__version__, scipy.__version__, skimage.__version__)).encode())
    try:
        for obj in objs:
            h.update(inspect.getsource(obj).encode())
    except (OSError, TypeError):
        h.update(f"{__version__} {sys.version}".encode())
    return h.hexdigest()


#: The code of the analysis (taken when the module loads, so a patched name cannot change the version).
_ANALYSIS_CODE = (detect_nuclei, _nuclei_mask, reference_background, _grey_dilate, _binary_dilate, _block_means, _rows,
                  _moments, _ranks, analyse_reference, ReferenceStyle)


@lru_cache(maxsize=1)
def _analysis_version() -> str:
    """The version of :func:`analyse_reference`: its functions and the modules they call into (stain conversion,
    input checks)."""
    from . import _checks, stain

    return code_version(*_ANALYSIS_CODE, stain, _checks, fmt=ANALYSIS_FORMAT)


def _content_key(ref: np.ndarray, style_labels) -> bytes:
    """What the analysis is a function of: the reference's pixels and its labels (values, shape and dtype)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(ref.shape).encode())
    h.update(np.ascontiguousarray(ref).data)
    if style_labels is not None:
        sl = np.asarray(style_labels)
        h.update(repr((sl.shape, sl.dtype.str)).encode())
        h.update(np.ascontiguousarray(sl).data)
    return h.digest()


#: References whose content key is known: id(style) -> (weak reference to style, to style_labels or None, key).
_PINNED: dict[int, tuple] = {}


def pin_reference(style, style_labels=None) -> tuple[np.ndarray, np.ndarray | None]:
    """``style`` as the renderer reads it (RGB uint8) and ``style_labels``, both made read-only, with their content
    key computed once: rendering with these very arrays then skips hashing them at every call (7 MB, 10-15 ms,
    for a 1000 x 1000 tile and its labels). For callers that keep references in memory and never change them (the
    workers of ``generate``). The key is forgotten when the arrays are."""
    ref = as_rgb(style, "style")
    if ref is style:
        ref = ref.view()  # read-only without touching the caller's array
    ref.flags.writeable = False
    labels = None
    if style_labels is not None:
        labels = np.asarray(style_labels).view()
        labels.flags.writeable = False
    key = _content_key(ref, labels)
    _PINNED[id(ref)] = (weakref.ref(ref), None if labels is None else weakref.ref(labels), key)
    weakref.finalize(ref, _PINNED.pop, id(ref), None)
    return ref, labels


def _key(ref: np.ndarray, style_labels) -> bytes:
    pinned = _PINNED.get(id(ref))
    if pinned is not None and pinned[0]() is ref and \
            (pinned[1] is None if style_labels is None else pinned[1] is not None and pinned[1]() is style_labels):
        return pinned[2]
    return _content_key(ref, style_labels)


#: The arrays of a ReferenceStyle: (dtype, number of dimensions, trailing shape).
_LAYOUT = {"field": ("float32", 3, (3,)), "background": ("float32", 3, (3,)), "centroid": ("float64", 2, (2,)),
           "axes": ("float64", 3, (2, 2)), "sd": ("float64", 2, (2,)), "log_area": ("float64", 1, ())}


def _nbytes(ref: ReferenceStyle) -> int:
    return sum(getattr(ref, f).nbytes for f in _LAYOUT)


def _disk_load(path: Path, tag: bytes) -> ReferenceStyle | None:
    """The analysis stored at ``path``, or None if it is missing, damaged (zip CRC), another key's or malformed.

    The arrays are read-only views of the file mapped into memory (:func:`_npz_views`), each member checked
    against its CRC: no copy of the 24 MB of a 1000 x 1000 tile's analysis, and processes that load the same
    analysis share the operating system's one copy of the file."""
    if not path.is_file():
        return None
    arrays = _npz_views(path)
    if arrays is None or set(arrays) != {"tag", "n_detected", *_LAYOUT}:
        return None
    try:
        if arrays["tag"].tobytes() != tag:
            return None
        n_detected = int(arrays["n_detected"])
    except (TypeError, ValueError):
        return None
    arrays = {name: arrays[name] for name in _LAYOUT}
    n = arrays["log_area"].shape[0] if arrays["log_area"].ndim == 1 else -1
    for name, (dtype, ndim, tail) in _LAYOUT.items():
        a = arrays[name]
        if a.dtype != np.dtype(dtype) or a.ndim != ndim or a.shape[ndim - len(tail):] != tail or \
                (name not in ("field", "background") and a.shape[0] != n):
            return None
    if arrays["field"].shape != arrays["background"].shape:
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: the last to be evicted
    return ReferenceStyle(**arrays, n_detected=n_detected)


#: Array data in the cache's .npz files starts at multiples of this many bytes (the .npy headers are padded to it).
_ALIGN = 64


def _npz_views(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an uncompressed ``.npz`` file as read-only views of the file mapped into memory, each member
    checked against its zip CRC; None for a file that is damaged, compressed, or holds anything but plain arrays.
    A member whose data is not aligned for its dtype is copied (the files :func:`_disk_save` writes are
    aligned)."""
    import ast
    import mmap
    import struct
    import zipfile
    import zlib

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return None
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            with zipfile.ZipFile(fh) as zf:
                infos = zf.infolist()
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    buf = memoryview(mm)
    out = {}
    try:
        for zi in infos:
            if zi.compress_type != zipfile.ZIP_STORED or not zi.filename.endswith(".npy"):
                return None
            h = zi.header_offset
            if buf[h : h + 4] != b"PK\x03\x04":
                return None
            n_name, n_extra = struct.unpack("<HH", buf[h + 26 : h + 30])
            start = h + 30 + n_name + n_extra
            member = buf[start : start + zi.file_size]
            if len(member) != zi.file_size or zlib.crc32(member) != zi.CRC:
                return None
            if bytes(member[:6]) != b"\x93NUMPY" or member[6] not in (1, 2, 3):
                return None
            if member[6] == 1:
                hlen, hstart = struct.unpack("<H", member[8:10])[0], 10
            else:
                hlen, hstart = struct.unpack("<I", member[8:12])[0], 12
            header = ast.literal_eval(bytes(member[hstart : hstart + hlen]).decode("latin1"))
            dtype = np.dtype(header["descr"])
            shape = tuple(int(v) for v in header["shape"])
            if dtype.hasobject or header["fortran_order"]:
                return None
            count = int(np.prod(shape, dtype=np.int64))
            offset = start + hstart + hlen
            if offset + count * dtype.itemsize > start + zi.file_size:
                return None
            arr = np.frombuffer(mm, dtype, count, offset).reshape(shape)
            if offset % dtype.alignment:
                arr = arr.copy()
            out[zi.filename[:-4]] = arr
    except (ValueError, TypeError, KeyError, SyntaxError, MemoryError, struct.error):
        return None
    return out


def _disk_save(path: Path, tag: bytes, ref: ReferenceStyle) -> None:
    """Write ``ref`` atomically (a temporary file, then a rename); a cache that cannot be written is no error.

    An uncompressed ``.npz`` (``numpy.load`` reads it) whose array data is aligned to ``_ALIGN`` bytes in the
    file, so :func:`_npz_views` maps it without copying: each member's local header is padded with an extra
    field (id 0xD935, as Android's zipalign does)."""
    import io
    import struct
    import zipfile

    from .io._files import _atomic

    arrays = {"tag": np.frombuffer(tag, np.uint8), "n_detected": np.int64(ref.n_detected),
              **{name: getattr(ref, name) for name in _LAYOUT}}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                data = io.BytesIO()
                np.lib.format.write_array(data, np.asarray(arr), allow_pickle=False)
                zi = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                zi.compress_type = zipfile.ZIP_STORED
                fixed = fh.tell() + 30 + len(zi.filename.encode()) + 4
                zi.extra = struct.pack("<HH", 0xD935, -fixed % _ALIGN) + bytes(-fixed % _ALIGN)
                zf.writestr(zi, data.getbuffer())

    with contextlib.suppress(OSError):
        _atomic(path, write)
        _evict(path.parent, keep=path)


def _evict(folder: Path, keep: Path) -> None:
    """Remove the least recently used analyses beyond ``DISK_CACHE_BYTES`` (and, after an hour, the temporary
    files of writers that died and the lock files of references that were never stored)."""
    now, files = time.time(), []
    for p in folder.iterdir():
        with contextlib.suppress(OSError):
            st = p.stat()
            old = now - st.st_mtime > 3600
            if old and (p.name.startswith(".") or (p.suffix == ".lock" and not p.with_suffix(".npz").exists())):
                p.unlink()
            elif p.suffix == ".npz":
                files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files):
        if total <= DISK_CACHE_BYTES:
            break
        if p != keep:
            with contextlib.suppress(OSError):
                p.unlink()
                p.with_suffix(".lock").unlink(missing_ok=True)
            total -= size


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` between processes (``fcntl.flock``; released if the holder dies), so that
    processes that need the same new reference analyse it once. Without ``fcntl`` (Windows) or where the file
    system has no locks, none: two processes may then both analyse a reference, and both write the same file."""
    try:
        import fcntl

        fh = open(path, "a+b")  # noqa: SIM115 - closed below, which releases the lock
    except (ImportError, OSError):
        fh = None
    try:
        if fh is not None:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
            except OSError:  # a file system without locks: go on unlocked
                pass
        yield
    finally:
        if fh is not None:
            fh.close()


def _analysis(ref: np.ndarray, style_labels, key: bytes) -> ReferenceStyle:
    """The analysis of ``ref``: from the disk cache, else computed (once across processes) and stored."""
    folder = style_cache_dir()
    if folder is None or ref.shape[0] * ref.shape[1] < DISK_CACHE_MIN_PIXELS:
        return analyse_reference(ref, style_labels)
    return _stored(folder, key, lambda: analyse_reference(ref, style_labels))


def _stored_path(folder: Path, key: bytes) -> tuple[bytes, Path]:
    tag = hashlib.blake2b(key + _analysis_version().encode(), digest_size=20).digest()
    return tag, folder / f"{tag.hex()}.npz"


def _stored(folder: Path, key: bytes, compute) -> ReferenceStyle:
    """The analysis of key ``key`` in the disk cache ``folder``, else ``compute()`` (once across processes: a file
    lock) and stored. The file's name and its ``tag`` are a hash of ``key`` and :func:`_analysis_version`."""
    tag, path = _stored_path(folder, key)
    res = _disk_load(path, tag)
    if res is not None:
        return res
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return compute()
    with _file_lock(path.with_suffix(".lock")):
        res = _disk_load(path, tag)  # written by another process while this one waited
        if res is None:
            res = compute()
            _disk_save(path, tag, res)
    return res


def _remember(key: bytes, make) -> ReferenceStyle:
    """The analysis of key ``key`` from the in-memory cache (the most recent ones, ``_CACHE_BYTES``), else
    ``make()``, kept."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    res = make()
    _CACHE[key] = res
    total = sum(_nbytes(r) for r in _CACHE.values())
    while len(_CACHE) > 1 and (total > _CACHE_BYTES or len(_CACHE) > _CACHE_MAX):
        total -= _nbytes(_CACHE.popitem(last=False)[1])
    return res


def _cached_reference(style, style_labels) -> ReferenceStyle:
    """:func:`analyse_reference` of ``style``, from the in-memory cache, else the disk cache, else computed."""
    ref = as_rgb(style, "style")
    key = _key(ref, style_labels)
    return _remember(key, lambda: _analysis(ref, style_labels, key))


def file_sha256(path) -> str:
    """The sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_key(image_sha256: str, labels_sha256: str | None) -> bytes:
    return hashlib.blake2b(repr(("files", image_sha256, labels_sha256)).encode(), digest_size=16).digest()


def is_analysed(image_sha256: str, labels_sha256: str | None = None) -> bool:
    """Whether the disk cache holds the analysis of the tile file of sha256 ``image_sha256`` with the labels file
    of sha256 ``labels_sha256`` (:func:`reference_from_files`; None: no labels) for this analysis code. A
    file that is there but damaged counts as there (it is rewritten when read)."""
    folder = style_cache_dir()
    return folder is not None and _stored_path(folder, _files_key(image_sha256, labels_sha256))[1].is_file()


def reference_from_files(image, labels=None, *, image_sha256: str | None = None,
                         labels_sha256: str | None = None) -> ReferenceStyle:
    """:func:`analyse_reference` of the style tile in the file ``image`` with its labels in the file ``labels``
    (else its detected nuclei), cached by the files' contents: in memory, then on disk (:func:`style_cache_dir`,
    whatever the tile's size), under a hash of the image file's sha256, the labels file's sha256 and
    :func:`_analysis_version`. A tile analysed before is read back without decoding its files (``generate``'s
    workers: a style bank is analysed once per machine, and each later run only loads the analyses). The same
    arrays, bit for bit, as ``analyse_reference(read_image(image), read_labels(labels))``.

    Parameters
    ----------
    image, labels : path
        The tile (any image file :func:`~napari_nucsynth.io.read_image` reads) and its instance labels (optional).
    image_sha256, labels_sha256 : str, optional
        The files' sha256 when the caller knows them (a style bank lists them); computed otherwise. A file whose
        bytes no longer match when it is read for an analysis is an error (nothing is stored under the old sum).

    Raises
    ------
    ValueError
        Unreadable files, labels of another shape, a tile without nuclei, a file changed since its sha256 was taken.
    """
    from .io import read_image, read_labels

    image = Path(image)
    labels = None if labels is None else Path(labels)
    if image_sha256 is None:
        image_sha256 = file_sha256(image)
    if labels is None:
        labels_sha256 = None
    elif labels_sha256 is None:
        labels_sha256 = file_sha256(labels)
    key = _files_key(image_sha256, labels_sha256)

    def compute() -> ReferenceStyle:
        ref = as_rgb(read_image(image), "style")
        lab = None if labels is None else read_labels(labels)
        for path, sha in ((image, image_sha256), (labels, labels_sha256)):
            if path is not None and file_sha256(path) != sha:
                raise ValueError(f"style file {path} changed while it was in use (its sha256 is no longer "
                                 f"{sha[:16]}...): run again")
        return analyse_reference(ref, lab)

    folder = style_cache_dir()
    return _remember(key, compute if folder is None else lambda: _stored(folder, key, compute))


def _similar(ref: ReferenceStyle, log_area: np.ndarray, log_aspect: np.ndarray, rng: np.random.Generator,
             k: int = 6) -> np.ndarray:
    """For each target nucleus, one of the ``k`` reference nuclei nearest in (log area, log aspect ratio), at
    random: similar shapes need little stretching, so the mapped chromatin keeps its grain."""
    ref_aspect = np.log(ref.sd[:, 1] / ref.sd[:, 0])
    k = min(k, ref.log_area.size)
    pick = np.empty(log_area.size, np.int64)
    choice = rng.integers(0, k, log_area.size)
    for a in range(0, log_area.size, 4096):  # bounded memory for outputs with very many nuclei
        b = min(log_area.size, a + 4096)
        d = (log_area[a:b, None] - ref.log_area[None]) ** 2 + (log_aspect[a:b, None] - ref_aspect[None]) ** 2
        near = np.argpartition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else np.argsort(d, 1)[:, :k]
        near = np.take_along_axis(near, np.argsort(np.take_along_axis(d, near, 1), 1, kind="stable"), 1)
        pick[a:b] = near[np.arange(b - a), choice[a:b]]
    return pick


@dataclass(frozen=True)
class _BackgroundPlan:
    """Where the output's background comes from: one crop of the reference's (``offsets`` of shape (1, 1, 2)) when
    the output fits in it, else a quilt of ``step + overlap``-px blocks placed every ``step`` px, each a random
    crop, cross-faded over ``overlap`` px (no mirror symmetry, no repeats at a fixed period)."""

    offsets: np.ndarray  # (rows of blocks, columns of blocks, 2) top-left corners in the reference
    step: tuple[int, int]
    overlap: tuple[int, int]


def _plan_background(bg_shape, shape, rng: np.random.Generator) -> _BackgroundPlan:
    (bh, bw), (H, W) = bg_shape, shape
    if H <= bh and W <= bw:
        off = np.array([[[rng.integers(0, bh - H + 1), rng.integers(0, bw - W + 1)]]])
        return _BackgroundPlan(off, (H, W), (0, 0))
    step = (max(1, (bh * 2) // 5), max(1, (bw * 2) // 5))
    overlap = (step[0] // 4, step[1] // 4)
    nr, nc = -(-H // step[0]), -(-W // step[1])
    lim = np.array([bh - step[0] - overlap[0] + 1, bw - step[1] - overlap[1] + 1])
    return _BackgroundPlan(rng.integers(0, lim, (nr, nc, 2)), step, overlap)


def _ramp(pos: np.ndarray, step: int, overlap: int, first: bool) -> np.ndarray:
    """Weight of a block over its own coordinates ``pos`` (0 .. step + overlap): rising over the first
    ``overlap`` px (not for the first block), flat, falling over the last ``overlap`` px."""
    w = np.ones(pos.shape, np.float32)
    if overlap:
        if not first:
            w = np.minimum(w, (pos + 0.5) / overlap)
        w = np.minimum(w, (step + overlap - pos - 0.5) / overlap)
    return np.clip(w, 0, 1)


def _background(bg: np.ndarray, plan: _BackgroundPlan, r0: int, h: int, w: int) -> np.ndarray:
    """Rows ``r0 .. r0 + h`` (all ``w`` columns) of the output's background, by ``plan``."""
    (sr, sc), (orr, oc) = plan.step, plan.overlap
    out = np.zeros((h, w, 3), np.float32)
    if plan.offsets.shape[:2] == (1, 1):
        y, x = plan.offsets[0, 0]
        return bg[y + r0 : y + r0 + h, x : x + w].copy()
    norm = np.zeros((h, w), np.float32)
    rows = np.arange(r0, r0 + h)
    nr, nc = plan.offsets.shape[:2]
    for i in range(max(0, (r0 - orr) // sr), min(nr, (r0 + h - 1) // sr + 1)):
        ri = rows[(rows >= i * sr) & (rows < i * sr + sr + orr)]
        if ri.size == 0:
            continue
        wr = _ramp(ri - i * sr, sr, orr, i == 0)
        for j in range(nc):
            cj = np.arange(j * sc, min(w, j * sc + sc + oc))
            if cj.size == 0:
                continue
            wc = _ramp(cj - j * sc, sc, oc, j == 0)
            y, x = plan.offsets[i, j]
            wgt = wr[:, None] * wc[None, :]
            block = bg[y + ri[0] - i * sr : y + ri[-1] - i * sr + 1, x : x + cj.size]
            out[ri[0] - r0 : ri[-1] - r0 + 1, cj[0] : cj[-1] + 1] += wgt[..., None] * block
            norm[ri[0] - r0 : ri[-1] - r0 + 1, cj[0] : cj[-1] + 1] += wgt
    return out / np.maximum(norm, 1e-6)[..., None]


class ClassicRenderer:
    """Training-free renderer (see the module docstring); :mod:`napari_nucsynth.render` registers it as
    ``"classic"``. Called as a renderer is (:func:`napari_nucsynth.render.render`): ``device`` is ignored (it runs
    on the CPU) and ``checkpoint`` must be None. ``style`` may also be an analysed reference (a
    :class:`ReferenceStyle`, e.g. from :func:`reference_from_files`, without ``style_labels``): the same image as
    rendering with the tile it was analysed from, without looking the tile up.

    Its one option, ``edge_sigma`` (px, 0 to :data:`MAX_EDGE_SIGMA`; default :data:`EDGE_SIGMA`), is the Gaussian
    that softens the nuclei's edges into the background: 0 pastes the mapped nuclei with hard edges. The same seed
    draws the same nuclei and background whatever its value."""

    def __call__(self, labels, style, *, style_labels=None, seed: SeedLike = None, device: str = "auto",
                 checkpoint=None, progress=None, should_stop=None, edge_sigma: float = EDGE_SIGMA) -> np.ndarray:
        if isinstance(edge_sigma, bool) or not isinstance(edge_sigma, (int, float, np.integer, np.floating)) \
                or not 0 <= float(edge_sigma) <= MAX_EDGE_SIGMA:
            raise ValueError(f"edge_sigma must be a number from 0 to {MAX_EDGE_SIGMA:g} (px), got {edge_sigma!r}")
        edge_sigma = float(edge_sigma)
        if checkpoint is not None:
            raise ValueError("the classic renderer needs no checkpoint (it is not trained); "
                             "use method='adain' or 'sian' to render with a trained model")
        lab = as_labels(labels, "labels")
        analysed = isinstance(style, ReferenceStyle)
        if analysed and style_labels is not None:
            raise ValueError("style_labels go with a style image: an analysed reference (ReferenceStyle) holds its "
                             "nuclei already")
        if not analysed:
            as_rgb(style, "style")
        if lab.size == 0:
            raise ValueError(f"labels is empty (shape {lab.shape})")
        rng = as_rng(seed)
        if progress:
            progress(0, 3, "analysing the reference")
        ref = style if analysed else _cached_reference(style, style_labels)
        if should_stop and should_stop():
            raise InterruptedError("render cancelled")
        H, W = lab.shape
        bgH, bgW = ref.background.shape[:2]
        # every random draw is made here, for the whole output, so strips cannot change the result
        plan = _plan_background((bgH, bgW), (H, W), rng)
        if int(lab.max()) >= 1 << 24:  # sparse huge ids: make them contiguous first
            lab = np.unique(lab, return_inverse=True)[1].reshape(lab.shape).astype(np.uint32)
        n = int(lab.max()) + 1
        area, ct, cov = _moments(lab, n)
        present = area > 0
        present[0] = False
        ev, evec = np.linalg.eigh(cov)
        sd_t = np.sqrt(np.maximum(ev, 0.25))
        pick = _similar(ref, np.log(np.maximum(area, 1)), np.log(sd_t[:, 1] / sd_t[:, 0]), rng)
        flips = rng.choice([-1.0, 1.0], (n, 2))
        # A maps target offsets to reference offsets: into the target's axes, scaled, out along the reference's
        A = np.einsum("nij,nj,nkj->nik", ref.axes[pick], flips * ref.sd[pick] / sd_t, evec)
        jitter = rng.normal(1.0, [0.06, 0.06, 0.0], (n, 3)).astype(np.float32)
        gh, gw = H // WARP_SPACING + 3, W // WARP_SPACING + 3
        warp = ndi.gaussian_filter(rng.standard_normal((2, gh, gw)), (0, 1, 1)).astype(np.float32)
        warp *= WARP_AMPLITUDE / max(float(warp.std()), 1e-6)
        if progress:
            progress(1, 3, "fusing nuclei and background")
        out = np.empty((H, W, 3), np.uint8)
        rows = TILE if max(H, W) > TILE else H
        for r0 in range(0, H, rows):
            if should_stop and should_stop():
                raise InterruptedError("render cancelled")
            r1 = min(H, r0 + rows)
            a0, a1 = max(0, r0 - _HALO), min(H, r1 + _HALO)
            strip = self._strip(lab[a0:a1], a0, ref, plan, ct, A, pick, jitter, warp, present, edge_sigma)
            out[r0:r1] = strip[r0 - a0 : r1 - a0]
        if progress:
            progress(3, 3, "done")
        return out

    @staticmethod
    def _strip(lab, r_off, ref, plan, ct, A, pick, jitter, warp, present, edge_sigma=EDGE_SIGMA) -> np.ndarray:
        h, w = lab.shape
        bg = ref.background
        back = _background(bg, plan, r_off, h, w)
        fg = lab > 0
        # labels extended 3 px outward, so the soft edge blends into the nucleus's own colour, not into nothing
        ext = np.where(fg, lab, ndi.grey_dilation(lab, size=7))
        ext[~present[ext]] = 0
        yy, xx = np.nonzero(ext)
        t = ext[yy, xx]
        gy, gx = yy + r_off, xx
        dr, dc = gy - ct[t, 0], gx - ct[t, 1]
        wy = ndi.map_coordinates(warp[0], [gy / WARP_SPACING, gx / WARP_SPACING], order=1)
        wx = ndi.map_coordinates(warp[1], [gy / WARP_SPACING, gx / WARP_SPACING], order=1)
        p = pick[t]
        sy = ref.centroid[p, 0] + A[t, 0, 0] * dr + A[t, 0, 1] * dc + wy
        sx = ref.centroid[p, 1] + A[t, 1, 0] * dr + A[t, 1, 1] * dc + wx
        fore = np.stack([ndi.map_coordinates(ref.field[..., c], [sy, sx], order=1, mode="nearest")
                         for c in range(3)], 1) * jitter[t]
        m = ndi.gaussian_filter(fg.astype(np.float32), edge_sigma)
        fused = back.copy()
        mm = m[yy, xx, None]
        fused[yy, xx] = mm * fore + (1 - mm) * back[yy, xx]
        return hed_to_rgb(np.maximum(fused, 0))
