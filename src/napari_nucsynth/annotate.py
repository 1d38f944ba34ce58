"""Masks of the nuclei under clicked points on a real H&E image (Qt-free; torch is imported only by the methods
that run a network, when they run).

A pathologist clicks nucleus centroids; :func:`fit_masks` turns each click into the mask of the nucleus under it,
and :class:`MaskFitter` keeps such masks in step with points being added, moved and deleted, re-fitting only the
nuclei near each edit. Both follow :func:`napari_nucsynth.masks.sample_masks`: id = point index + 1, uint32.

How a click becomes a mask (every method)
-----------------------------------------
A method's *one-time pass* over the image (:func:`image_maps`; cached by image content) gives a nuclear
foreground and an energy. Then:

1. **Anchor.** A click on the foreground anchors there; a click on background anchors at the nearest foreground
   pixel within ``snap`` px (a hand misses the edge of a nucleus by a few pixels).
2. **Markers.** Each anchored click marks a disc of ``marker_radius`` px around its anchor, within the anchor's
   foreground component (a pixel two discs share goes to the nearer anchor; the anchor pixel is always its
   click's own).
3. **Watershed.** A marker-controlled, compact watershed of the energy floods the foreground from the markers
   (``skimage.segmentation.watershed`` with ``compactness``: the energy's ridges and the distance to the click
   both count), each foreground component on its own. Foreground that no click's flood reaches (a component
   nobody clicked) stays background; with ``max_radius``, pixels further than it from their click do too.
4. **Fallback.** A click with no foreground within ``snap`` px (a nucleus the method does not see) gets a small
   nucleus from the shape prior (:func:`napari_nucsynth.masks.draw_shapes`, scaled by ``fallback_scale``), drawn
   on background pixels only; its randomness is seeded by ``seed`` and the click's position, so the same click
   always gets the same nucleus. :attr:`FitResult.fallback` and :attr:`MaskFitter.fallback` say which clicks got
   one (for a status line: "3 clicks on background got a nucleus from the shape prior").

Hence:

- **Every point inside the image gets a nucleus** (at least its anchor or centre pixel), except that where two
  points anchor at the same pixel the earlier one keeps it, as in ``sample_masks``.
- **Two clicks on one nucleus split it between them** along the energy's ridge nearest to their midline; to get
  the nucleus whole, delete one of them.
- **Points outside the image** (rounded to the pixel grid: row in ``[0, H)``, column in ``[0, W)``) are allowed
  and get no nucleus; their ids do not appear. ``FitResult.inside`` says which points were inside.
- Everything a click does stays in its anchor's foreground component, or, for a fallback, in the box of its
  prior nucleus; :class:`MaskFitter` re-fits exactly that, so its labels always equal :func:`fit_masks` of the
  current points (tested).

Methods (:func:`fit_methods`; ``"auto"`` is the first available of ``nuclick``, ``hovernet``, ``watershed``)
----------------------------------------------------------------------------------------------------------
- ``hovernet``: the shipped HoVer-Net segmenter's nucleus probability and horizontal/vertical maps, computed once
  per image (``napari_nucsynth.segment``'s ``predict_maps``); foreground = probability >= ``np_threshold``;
  energy = HoVer-Net's own (the smoothed Sobel response of the HV maps, as in its post-processing).
- ``watershed``: no model: the haematoxylin density (:func:`napari_nucsynth.stain.rgb_to_hed`) smoothed by
  ``sigma`` px, foreground above ``threshold_scale`` x Otsu's threshold, energy = minus the density; a nucleus
  reaches at most ``max_radius`` px from its click.
- ``nuclick``: a point-prompted network in the manner of NuClick (:mod:`napari_nucsynth.models.nuclick`): each
  click's patch, a map of the click and a map of the other clicks in the patch -> the clicked nucleus. It has its
  own fitter, :class:`NuClickFitter` (what ``MaskFitter`` returns for it; steps 1-5 above are replaced by the
  network's masks, with the same contract: every inside point gets a nucleus, two clicks on one nucleus split it,
  a click on background gets a prior nucleus, edits re-fit locally and equal a full fit). It needs a trained
  checkpoint: ``checkpoint=``, or the shipped ``data/models/nuclick_monuseg.pt`` (trained on 24 MoNuSeg tiles;
  held-out AJI 0.780 / PQ 0.752 from true centroids), which makes it ``"auto"``'s choice.

The watershed methods' parameters were chosen on the 24 MoNuSeg training tiles of the segmentation benchmark,
never on its 6 held-out tiles (``benchmarks/bench_clicks.py``; figures in docs/benchmarks.md). A new method is one class
registered with :func:`register_fit_method` whose ``prepare`` returns :class:`ImageMaps` (or, with a
``fitter`` attribute naming a :class:`MaskFitter` subclass, the maps that subclass reads, as ``nuclick`` does).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from scipy import ndimage as ndi

from ._checks import SeedLike, as_classes, as_points, as_rgb, as_rng
from .masks import NucleusShapes, Patch, ShapePrior, _default_prior, draw_shapes, rasterize

__all__ = [
    "FitMethod",
    "FitResult",
    "ImageMaps",
    "MaskFitter",
    "NuClickFitter",
    "NuClickMaps",
    "clear_cache",
    "fit_masks",
    "fit_methods",
    "get_fit_method",
    "image_maps",
    "nuclick_maps",
    "register_fit_method",
]

Progress = Callable[[int, int, str], None] | None
ShouldStop = Callable[[], bool] | None

#: Preference order of "auto": the first available method (``nuclick`` where its checkpoint exists: the shipped
#: one, or a nuclick ``checkpoint=``).
AUTO_ORDER = ("nuclick", "hovernet", "watershed")


# ----------------------------------------------------------------------------------------------------------------
# The one-time pass's result
# ----------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ImageMaps:
    """What a method's one-time pass over an image leaves for the clicks (see the module docstring).

    Attributes
    ----------
    foreground : (H, W) bool
        Nuclear foreground.
    energy : (H, W) float32
        Flooded from the clicks, lowest first; ridges separate nuclei.
    method : str
        The method that made it.
    snap, marker_radius : int
        Anchoring distance and marker disc radius (px).
    compactness : float
        ``skimage.segmentation.watershed``'s compactness (weight of the distance to the click against the energy).
    max_radius : float
        Pixels further than this from their click's anchor stay background (0: no limit).
    fallback_scale : float
        Linear scale of the prior's nucleus given to a click on background.
    components, boxes
        The foreground's 4-connected components (int32 map, 1..K) and each one's bounding box (slices), computed
        on construction.
    """

    foreground: np.ndarray
    energy: np.ndarray
    method: str = ""
    snap: int = 4
    marker_radius: int = 2
    compactness: float = 0.01
    max_radius: float = 0.0
    fallback_scale: float = 0.8
    components: np.ndarray = field(init=False, repr=False)
    boxes: list = field(init=False, repr=False)

    def __post_init__(self):
        fg = np.asarray(self.foreground, dtype=bool)
        en = np.asarray(self.energy, dtype=np.float32)
        if fg.ndim != 2 or en.shape != fg.shape:
            raise ValueError(f"foreground and energy must be 2-D maps of one shape, got {fg.shape} and {en.shape}")
        self.foreground, self.energy = fg, en
        comp, _ = ndi.label(fg)  # 4-connected, as the watershed floods
        self.components = comp.astype(np.int32, copy=False)
        self.boxes = ndi.find_objects(self.components)
        for a in (self.foreground, self.energy, self.components):
            a.flags.writeable = False  # shared through the cache

    @property
    def shape(self) -> tuple[int, int]:
        return self.foreground.shape


@dataclass(eq=False)
class NuClickMaps:
    """The ``nuclick`` method's one-time pass over an image: the network's input channels and the network itself
    (as a function of patches), for :class:`NuClickFitter`.

    Attributes
    ----------
    channels : (C, H, W) float16
        The image's input channels (:func:`napari_nucsynth.models.nuclick.image_channels`).
    predict : callable
        ``predict(inputs) -> probabilities``: (n, C + 2, S, S) float32 patches -> (n, S, S) float32.
    patch, sigma
        The network's patch size and click-map width (px).
    threshold : float
        A pixel belongs to a click's nucleus where its probability is at least this (and the highest of the
        clicks whose windows cover it).
    snap : int
        A click anchors at the nearest pixel within ``snap`` px where its own probability reaches ``threshold``;
        with none, it gets a nucleus from the shape prior (a click on background).
    fallback_scale : float
        Linear scale of the prior's nucleus given to a click on background.
    """

    channels: np.ndarray
    predict: Callable[[np.ndarray], np.ndarray]
    patch: int = 64
    sigma: float = 2.0
    threshold: float = 0.5
    snap: int = 4
    fallback_scale: float = 0.8
    method: str = "nuclick"

    def __post_init__(self):
        ch = np.asarray(self.channels)
        if ch.ndim != 3:
            raise ValueError(f"channels must be a (C, H, W) array, got shape {ch.shape}")
        if self.snap >= self.patch // 2:
            raise ValueError(f"snap ({self.snap}) must be less than half the patch ({self.patch})")
        self.channels = ch
        self.channels.flags.writeable = False  # shared through the cache

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.channels.shape[1:])


def nuclick_maps(model, image, *, device="cpu", progress: Progress = None, should_stop: ShouldStop = None,
                 threshold: float = 0.5, snap: int = 4, tta: int = 1, batch: int = 128) -> NuClickMaps:
    """:class:`NuClickMaps` of ``image`` for a nuclick network already in memory (the ``nuclick`` method loads its
    checkpoint and calls this; so do the model's ``predict`` and ``validate``)."""
    from .devices import resolve_device
    from .models.nuclick import image_channels, predict_patches

    dev = resolve_device(device)
    ch = image_channels(model, as_rgb(image, "image"), dev, progress=progress, should_stop=should_stop)
    cfg = model.config
    return NuClickMaps(ch.astype(np.float16), lambda x: predict_patches(model, x, dev, batch=batch, tta=tta),
                       patch=int(cfg["patch"]), sigma=float(cfg["sigma"]), threshold=float(threshold), snap=int(snap))


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------
class FitMethod(Protocol):
    """What a registered fitting method provides.

    ``params`` lists the one-time pass's keyword parameters ``{name: (default, low, high)}``; ``prepare`` runs
    that pass on an RGB uint8 image and returns :class:`ImageMaps`; it receives (validated) only the parameters
    the caller gave and fills in the rest (``_check_params``, or a default its checkpoint carries, as ``nuclick``'s
    ``tta``); ``available(checkpoint)`` says whether it can run here (its model and packages present).
    """

    name: str
    description: str
    needs_checkpoint: bool
    params: ClassVar[dict]

    def available(self, checkpoint=None) -> bool: ...

    def prepare(self, image: np.ndarray, *, checkpoint=None, device: str = "auto", progress: Progress = None,
                should_stop: ShouldStop = None, **params) -> ImageMaps: ...


_REGISTRY: dict[str, Callable[[], FitMethod]] = {}


def register_fit_method(name: str):
    """Class decorator: register a fitting method under ``name`` (instantiated on each use)."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def fit_methods() -> list[str]:
    """Names of the registered fitting methods (``get_fit_method(name).available()`` says which can run here)."""
    return sorted(_REGISTRY)


def get_fit_method(name: str = "auto", checkpoint=None) -> FitMethod:
    """The method ``name``; ``"auto"`` is the first available of :data:`AUTO_ORDER`."""
    if not isinstance(name, str):
        raise ValueError(f"method must be a method name (one of {['auto', *fit_methods()]}), got {name!r}")
    if name == "auto":
        for cand in AUTO_ORDER:
            if cand in _REGISTRY and _REGISTRY[cand]().available(checkpoint):
                return _REGISTRY[cand]()
        name = "watershed"
    if name not in _REGISTRY:
        raise ValueError(f"unknown fitting method {name!r}; available: {', '.join(['auto', *fit_methods()])}")
    return _REGISTRY[name]()


def _check_params(method: FitMethod, params: dict) -> dict:
    unknown = set(params) - set(method.params)
    if unknown:
        raise ValueError(f"unknown {method.name} parameter(s) {sorted(unknown)}; known: {sorted(method.params)}")
    out = {}
    for k, (default, lo, hi) in method.params.items():
        v = params.get(k, default)
        if isinstance(default, bool):
            out[k] = bool(v)
            continue
        try:
            v = type(default)(v)
        except (TypeError, ValueError):
            raise ValueError(f"{k} must be a number in [{lo}, {hi}], got {v!r}") from None
        if not lo <= v <= hi:
            raise ValueError(f"{k} must lie in [{lo}, {hi}], got {v}")
        out[k] = v
    return out


@register_fit_method("hovernet")
class HoVerNetFit:
    """The shipped (or given) HoVer-Net checkpoint's maps, computed once per image; the clicks are the markers of a
    watershed on HoVer-Net's energy within its nuclear foreground.

    Parameters (keywords): ``np_threshold`` (foreground: nucleus probability at least this; 0.5), ``min_area``
    (foreground pieces smaller than this many px are dropped; 10, as HoVer-Net's post-processing), ``tta``
    (predict under the 8 flips and rotations: 8 times the time for +0.004 AJI on training tiles; False).
    """

    name = "hovernet"
    description = "HoVer-Net maps computed once (nucleus probability, HV); the clicks as watershed markers"
    needs_checkpoint = True
    params: ClassVar[dict] = {"np_threshold": (0.5, 0.05, 0.95), "min_area": (10, 0, 200), "tta": (False, 0, 1)}

    def available(self, checkpoint=None) -> bool:
        import importlib.util

        from .segment.hovernet import default_checkpoint

        if importlib.util.find_spec("torch") is None:
            return False
        return Path(checkpoint).exists() if checkpoint is not None else default_checkpoint().exists()

    def prepare(self, image, *, checkpoint=None, device="auto", progress=None, should_stop=None,
                **params) -> ImageMaps:
        from .segment import get_segmenter

        p = _check_params(self, params)
        maps = get_segmenter("hovernet").predict_maps(image, checkpoint=checkpoint, device=device, tta=p["tta"],
                                                       progress=progress, should_stop=should_stop)
        return self.from_prediction(maps, np_threshold=p["np_threshold"], min_area=p["min_area"])

    def from_prediction(self, maps: np.ndarray, *, np_threshold: float = 0.5, min_area: int = 10) -> ImageMaps:
        """:class:`ImageMaps` from the segmenter's ``predict_maps`` output (H x W x 3: nucleus probability, h, v)."""
        from skimage.morphology import remove_small_objects

        from .models.hovernet import hv_energy

        fg = maps[..., 0] >= np_threshold
        if min_area > 1:
            fg = remove_small_objects(fg, max_size=int(min_area) - 1)
        # HoVer-Net's energy (the borders between touching nuclei from the HV maps), flooded from the clicks
        _, energy = hv_energy(fg, maps[..., 1:].transpose(2, 0, 1))
        return ImageMaps(fg, energy, method=self.name, compactness=0.01)


@register_fit_method("watershed")
class WatershedFit:
    """No model: a seeded watershed on the haematoxylin density.

    Parameters (keywords): ``sigma`` (Gaussian smoothing of the density, px; 1.0), ``threshold_scale`` (foreground:
    density above this times Otsu's threshold; 0.8), ``min_area`` (smaller foreground pieces dropped, px; 30),
    ``max_radius`` (a nucleus reaches at most this far from its click, px; 18, MoNuSeg's 40x).
    """

    name = "watershed"
    description = "haematoxylin density, Otsu foreground, the clicks as markers of a compact watershed (no model)"
    needs_checkpoint = False
    params: ClassVar[dict] = {"sigma": (1.0, 0.0, 5.0), "threshold_scale": (0.8, 0.3, 2.0),
                              "min_area": (30, 0, 500), "max_radius": (18.0, 0.0, 200.0)}

    def available(self, checkpoint=None) -> bool:
        return True

    def prepare(self, image, *, checkpoint=None, device="auto", progress=None, should_stop=None,
                **params) -> ImageMaps:
        from skimage.morphology import remove_small_objects

        from .segment.watershed import _density, _threshold

        p = _check_params(self, params)
        if progress is not None:
            progress(0, 1, "haematoxylin")
        density = _density(as_rgb(image, "image"), p["sigma"])
        thr = _threshold(density, p["threshold_scale"])
        fg = np.zeros(density.shape, bool) if thr is None else ndi.binary_fill_holes(density > thr)
        if p["min_area"] > 1:
            fg = remove_small_objects(fg, max_size=p["min_area"] - 1)
        top = float(density.max())
        energy = -density / top if top > 0 else np.zeros(density.shape, np.float32)
        if progress is not None:
            progress(1, 1, "haematoxylin")
        return ImageMaps(fg, energy, method=self.name, compactness=0.3, max_radius=p["max_radius"])


@register_fit_method("nuclick")
class NuClickFit:
    """A point-prompted network in the manner of NuClick (:mod:`napari_nucsynth.models.nuclick`): each click's
    patch, a map of the click and a map of the other clicks in the patch in, the clicked nucleus's probability out.
    The one-time pass computes the network's input channels (the image; with a "hovernet"-context model also the
    shipped HoVer-Net's maps); the clicks are fitted by :class:`NuClickFitter`.

    Parameters (keywords): ``threshold`` (a pixel is a nucleus's where its probability is at least this; 0.5),
    ``snap`` (a click anchors at the nearest pixel within this many px where its own probability reaches the
    threshold; with none it gets a prior nucleus; 4), ``tta`` (each click's probabilities averaged over this many
    dihedral transforms of its patch, 1-8; each costs one more pass of the network per click; default the
    checkpoint's ``config["tta"]``, 1 when it has none).
    """

    name = "nuclick"
    description = "NuClick-style point-prompted network: each click's patch and the clicks around it -> its nucleus"
    needs_checkpoint = True
    params: ClassVar[dict] = {"threshold": (0.5, 0.05, 0.95), "snap": (4, 0, 16), "tta": (1, 1, 8)}

    @property
    def fitter(self):
        return NuClickFitter

    def available(self, checkpoint=None) -> bool:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return False
        if checkpoint is None:
            from .models.nuclick import default_checkpoint

            return default_checkpoint().is_file()
        return _checkpoint_kind(checkpoint) == "nuclick"

    def prepare(self, image, *, checkpoint=None, device="auto", progress=None, should_stop=None,
                **params) -> NuClickMaps:
        from .devices import resolve_device
        from .models.nuclick import load_model

        p = _check_params(self, params)
        dev = resolve_device(device)
        model = load_model(checkpoint, dev)
        if "tta" not in params:  # the checkpoint's own default (config["tta"], chosen when it was shipped), else 1
            p["tta"] = _check_params(self, {"tta": model.config.get("tta", 1)})["tta"]
        return nuclick_maps(model, image, device=dev, progress=progress, should_stop=should_stop, **p)


_KINDS: dict = {}


def _checkpoint_kind(checkpoint) -> str | None:
    """The model kind a checkpoint file holds (None: absent or unreadable), cached per path and modification time."""
    path = Path(checkpoint)
    if not path.is_file():
        return None
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _KINDS:
        from .models import load_checkpoint

        try:
            _KINDS[key] = load_checkpoint(path)["kind"]
        except ValueError:
            _KINDS[key] = None
    return _KINDS[key]


# ----------------------------------------------------------------------------------------------------------------
# The cached one-time pass
# ----------------------------------------------------------------------------------------------------------------
_CACHE: OrderedDict = OrderedDict()
#: Images whose maps are kept (a 1000 x 1000 image's take about 9 MB).
CACHE_SIZE = 4


def clear_cache() -> None:
    """Forget every cached one-time pass (frees its memory)."""
    _CACHE.clear()


def _image_key(rgb: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.digest()


def image_maps(image, *, method: str = "auto", checkpoint=None, device: str = "auto", progress: Progress = None,
               should_stop: ShouldStop = None, **params) -> ImageMaps:
    """The one-time pass of ``method`` over ``image``, cached by the image's content (and the method, its
    checkpoint file, device and parameters): a second call, or a second :class:`MaskFitter`, on the same image
    reuses it.

    ``image`` follows the project's rule (:func:`napari_nucsynth._checks.as_rgb`: RGB uint8; grey, RGBA, uint16
    and float in [0, 1] converted; anything else a ``ValueError`` naming ``image``). ``progress(done, total,
    what)`` reports the pass; when ``should_stop()`` turns True it stops with ``InterruptedError``.
    """
    rgb = as_rgb(image, "image")
    m = get_fit_method(method, checkpoint)
    p = _check_params(m, params)
    ck = None
    if m.needs_checkpoint and checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            raise ValueError(f"checkpoint {path} does not exist")
        ck = (str(path.resolve()), path.stat().st_mtime)
    dev = None
    if m.needs_checkpoint:  # "auto" and the device it resolves to share one cache entry
        from .devices import resolve_device

        dev = resolve_device(device)
    # which parameters were given is part of the key: a method may take an omitted one from its checkpoint
    key = (m.name, ck, str(dev), tuple(sorted(p.items())), tuple(sorted(params)), _image_key(rgb))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        if progress is not None:
            progress(1, 1, "cached")
        return _CACHE[key]
    if should_stop is not None and should_stop():
        raise InterruptedError("fitting cancelled")
    maps = m.prepare(rgb, checkpoint=checkpoint, device=device, progress=progress, should_stop=should_stop,
                     **{k: v for k, v in p.items() if k in params})  # the method fills in the rest
    _CACHE[key] = maps
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return maps


# ----------------------------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _disc_offsets(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (dy, dx) of the pixels within ``radius`` of the origin, nearest first (ties in raster order), and
    their squared distances."""
    r = int(radius)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d2 = (dy * dy + dx * dx).ravel()
    sel = np.flatnonzero(d2 <= r * r)
    order = sel[np.argsort(d2[sel], kind="stable")]
    off, d2 = np.c_[dy.ravel()[order], dx.ravel()[order]], d2[order]
    off.flags.writeable = d2.flags.writeable = False
    return off, d2


def _anchors(maps: ImageMaps, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point: whether it is inside the image, its anchor pixel (row, col; -1 where none) and the anchor's
    foreground component (0 where none: outside, or a fallback)."""
    h, w = maps.shape
    pix = np.floor(pts + 0.5).astype(np.int64)
    inside = (pix[:, 0] >= 0) & (pix[:, 0] < h) & (pix[:, 1] >= 0) & (pix[:, 1] < w)
    anchor = np.full((len(pts), 2), -1, np.int64)
    comp = np.zeros(len(pts), np.int32)
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return inside, anchor, comp
    off, _ = _disc_offsets(maps.snap)
    cand = pix[idx, None, :] + off[None]  # (n, K, 2), nearest first
    ok = (cand[..., 0] >= 0) & (cand[..., 0] < h) & (cand[..., 1] >= 0) & (cand[..., 1] < w)
    cy, cx = np.where(ok, cand[..., 0], 0), np.where(ok, cand[..., 1], 0)
    hit = ok & maps.foreground[cy, cx]
    has = hit.any(1)
    first = hit.argmax(1)
    sel = idx[has]
    anchor[sel] = cand[has, first[has]]
    comp[sel] = maps.components[anchor[sel, 0], anchor[sel, 1]]
    return inside, anchor, comp


def _markers(maps: ImageMaps, anchor: np.ndarray, comp: np.ndarray, which: np.ndarray, window) -> np.ndarray:
    """int32 marker image of ``window`` (r0, r1, c0, c1) for the anchored points ``which``: discs around the anchors
    within each anchor's component; a shared pixel goes to the nearer anchor (then the lower index), an anchor
    pixel to its own point (the lowest index where several share it)."""
    r0, r1, c0, c1 = window
    out = np.zeros((r1 - r0, c1 - c0), np.int32)
    if which.size == 0:
        return out
    off, d2 = _disc_offsets(maps.marker_radius)
    y = anchor[which, 0, None] + off[None, :, 0]
    x = anchor[which, 1, None] + off[None, :, 1]
    ok = (y >= r0) & (y < r1) & (x >= c0) & (x < c1)
    yc, xc = np.where(ok, y, r0), np.where(ok, x, c0)
    ok &= maps.components[yc, xc] == comp[which, None]
    pt = np.broadcast_to(which[:, None], y.shape)[ok]
    dist = np.broadcast_to(d2[None], y.shape)[ok]
    flat = (y[ok] - r0) * (c1 - c0) + (x[ok] - c0)
    order = np.lexsort((pt, dist, flat))  # per pixel: nearest anchor, then lowest index (d2 = 0: the anchor)
    flat, pt = flat[order], pt[order]
    first = np.ones(flat.size, bool)
    first[1:] = flat[1:] != flat[:-1]
    out.ravel()[flat[first]] = pt[first] + 1
    return out


def _flood(maps: ImageMaps, markers: np.ndarray, mask: np.ndarray, anchor: np.ndarray, window) -> np.ndarray:
    """The compact watershed of the energy in ``window`` from ``markers`` within ``mask``, cut at ``max_radius``."""
    from skimage.segmentation import watershed

    r0, r1, c0, c1 = window
    lab = watershed(maps.energy[r0:r1, c0:c1], markers=markers, mask=mask, compactness=maps.compactness)
    if maps.max_radius > 0 and lab.any():
        yy, xx = np.nonzero(lab)
        k = lab[yy, xx].astype(np.int64) - 1
        far = (yy + r0 - anchor[k, 0]) ** 2 + (xx + c0 - anchor[k, 1]) ** 2 > maps.max_radius**2
        lab[yy[far], xx[far]] = 0
    return lab


class _Seeds:
    """Per-click randomness of the fallback nuclei: a click's nucleus depends on the seed and where it is only."""

    def __init__(self, seed: SeedLike):
        rng = as_rng(seed)  # validates: a non-negative int, a Generator or None
        self.base = int(seed) if isinstance(seed, (int, np.integer)) else int(rng.integers(2**62))

    def rng(self, point: np.ndarray) -> np.random.Generator:
        q = np.floor(np.asarray(point) * 256.0).astype(np.int64)  # 1/256 px: the same click, the same nucleus
        return np.random.default_rng([self.base, int(q[0]) & 0xFFFFFFFF, int(q[1]) & 0xFFFFFFFF])


@dataclass
class FitResult:
    """:func:`fit_masks`'s full answer (``return_result=True``).

    Attributes
    ----------
    labels : (H, W) uint32
        id = point index + 1.
    inside : (N,) bool
        Points inside the image (the others got no nucleus).
    fallback : (N,) bool
        Points on background (no foreground within ``snap`` px) that got a small nucleus from the shape prior.
    method : str
        The method that ran (``"auto"`` resolved).
    """

    labels: np.ndarray
    inside: np.ndarray
    fallback: np.ndarray
    method: str

    @property
    def n_fallback(self) -> int:
        return int(self.fallback.sum())

    @property
    def n_outside(self) -> int:
        return int((~self.inside).sum())

    def summary(self) -> str:
        """One line for a status bar, e.g. ``"120 nuclei (hovernet); 3 clicks on background got a prior nucleus"``."""
        return _summary(int(self.inside.sum()), self.n_fallback, self.n_outside, self.method)


def _summary(n_inside: int, n_fallback: int, n_outside: int, method: str) -> str:
    s = f"{n_inside} nuclei ({method})"
    if n_fallback:
        s += f"; {n_fallback} click{'s' if n_fallback > 1 else ''} on background got a nucleus from the shape prior"
    if n_outside:
        s += f"; {n_outside} point{'s' if n_outside > 1 else ''} outside the image (no nucleus)"
    return s


class MaskFitter:
    """Keeps a label map of the nuclei under editable points in step with them, re-fitting only what an edit
    touches: the foreground component(s) of the edited points' anchors, or the box of a fallback nucleus.

    The image goes in once (:func:`image_maps`: the method's one-time pass, cached by image content, so a second
    fitter on the same image reuses it); then :meth:`reset`, :meth:`add_points`, :meth:`set_points` and
    :meth:`remove_points` (the :class:`napari_nucsynth.masks.MaskSampler` interface), or their one-point forms
    :meth:`add`, :meth:`move` and :meth:`remove`. ``labels`` always equals :func:`fit_masks` of the current points.

    ``MaskFitter(...)`` returns the fitter of the method that runs: this class for the methods whose one-time pass
    is :class:`ImageMaps` (``hovernet``, ``watershed``), :class:`NuClickFitter` for ``nuclick``.

    Parameters
    ----------
    image : array or ImageMaps or NuClickMaps
        The H&E image (see :func:`image_maps` for the accepted forms), or a one-time pass already made.
    method, checkpoint, device, progress, should_stop, **params
        As :func:`fit_masks`; they concern the one-time pass, run here.
    prior : ShapePrior, optional
        Shape prior of the fallback nuclei (default: :meth:`ShapePrior.default`).
    seed : int or Generator or None
        Randomness of the fallback nuclei.
    """

    #: the one-time pass this class fits from (a subclass for a method with its own maps sets its own)
    _maps_type: ClassVar[type] = ImageMaps

    def __new__(cls, image=None, *args, method: str = "auto", checkpoint=None, **kwargs):
        """``MaskFitter(...)`` is the fitter of the method that runs: a method whose one-time pass is not
        :class:`ImageMaps` names its own subclass (``nuclick``: :class:`NuClickFitter`)."""
        if cls is MaskFitter:
            if isinstance(image, NuClickMaps):
                cls = NuClickFitter
            elif not isinstance(image, ImageMaps) and isinstance(method, str):
                try:
                    cls = getattr(get_fit_method(method, checkpoint), "fitter", MaskFitter)
                except ValueError:  # __init__ raises it again, where it is documented
                    pass
        return super().__new__(cls)

    def __init__(self, image, *, method: str = "auto", checkpoint=None, device: str = "auto",
                 prior: ShapePrior | None = None, seed: SeedLike = None, progress: Progress = None,
                 should_stop: ShouldStop = None, **params):
        if isinstance(image, (ImageMaps, NuClickMaps)):
            self.maps = image
        else:
            self.maps = image_maps(image, method=method, checkpoint=checkpoint, device=device, progress=progress,
                                   should_stop=should_stop, **params)
        if not isinstance(self.maps, self._maps_type):
            raise ValueError(f"{type(self).__name__} fits from {self._maps_type.__name__}, got "
                             f"{type(self.maps).__name__} (use MaskFitter(...), which picks the method's fitter)")
        self.method = self.maps.method
        self.shape = self.maps.shape
        self.prior = prior or _default_prior()
        self._seeds = _Seeds(seed)
        self.points = np.zeros((0, 2))
        self._fb_index, self._fb_shapes = np.zeros(0, np.int64), NucleusShapes.empty()
        self._set_state(self.points, np.zeros(0, np.int64))
        self.labels = np.zeros(self.shape, np.uint32)

    # ---- state ---------------------------------------------------------------------------------------------------
    def _set_state(self, points: np.ndarray, classes: np.ndarray, changed=None) -> None:
        """Take ``points`` and ``classes`` as the current state (anchors, fallback nuclei). For an edit that keeps
        every earlier point's index (add, move), ``changed`` lists the edited points: only their anchors are looked
        up again and only their fallback nuclei drawn (a fallback nucleus depends on its own click only); None does
        every point."""
        n_old = len(self.points)
        if changed is None:
            self.inside, self._anchor, self._comp = _anchors(self.maps, points)
            todo = np.arange(len(points))
        else:
            todo = np.asarray(changed, dtype=np.int64)
            inside, anchor, comp = _anchors(self.maps, points[todo])
            n = len(points)
            self.inside = np.concatenate([self.inside, np.zeros(n - n_old, bool)])
            self._anchor = np.concatenate([self._anchor, np.full((n - n_old, 2), -1, np.int64)])
            self._comp = np.concatenate([self._comp, np.zeros(n - n_old, np.int32)])
            self.inside[todo], self._anchor[todo], self._comp[todo] = inside, anchor, comp
        self.points, self.classes = points, classes
        fb = np.flatnonzero(self.inside & (self._comp == 0))
        redo = np.zeros(len(points), bool)
        redo[todo] = True
        if changed is None:
            keep_rows, keep_idx = np.zeros(0, np.int64), np.zeros(0, np.int64)
        else:  # the old fallback nuclei of points not edited
            sel = ~redo[self._fb_index]
            keep_rows, keep_idx = np.flatnonzero(sel), self._fb_index[sel]
        new_idx = fb[redo[fb]]
        shapes = NucleusShapes.concat([self._fb_shapes.take(keep_rows), *[self._draw(i) for i in new_idx.tolist()]])
        idx = np.concatenate([keep_idx, new_idx])
        order = np.argsort(idx, kind="stable")
        self._fb_index, self._fb_shapes = idx[order], shapes.take(order)

    @property
    def fallback(self) -> np.ndarray:
        """(N,) bool: the points that got a nucleus from the shape prior (a click on background)."""
        out = np.zeros(len(self.points), bool)
        out[self._fb_index] = True
        return out

    def summary(self) -> str:
        """One line for a status bar (see :meth:`FitResult.summary`)."""
        return _summary(int(self.inside.sum()), self._fb_index.size, int((~self.inside).sum()), self.method)

    def result(self) -> FitResult:
        return FitResult(self.labels, self.inside.copy(), self.fallback, self.method)

    def _draw(self, i: int) -> NucleusShapes:
        s = draw_shapes(self.points[i : i + 1], classes=self.classes[i : i + 1], prior=self.prior,
                        seed=self._seeds.rng(self.points[i]))
        s.semi_major *= self.maps.fallback_scale
        s.semi_minor *= self.maps.fallback_scale
        return s

    # ---- full fit ------------------------------------------------------------------------------------------------
    def reset(self, points, classes=None) -> np.ndarray:
        """Fit every point afresh; returns the label map."""
        pts = as_points(points).copy()
        self._set_state(pts, as_classes(classes, len(pts)).copy())
        h, w = self.shape
        full = (0, h, 0, w)
        which = np.flatnonzero(self._comp > 0)
        lab = _flood(self.maps, _markers(self.maps, self._anchor, self._comp, which, full), self.maps.foreground,
                     self._anchor, full)
        self.labels = lab.astype(np.uint32)
        self._draw_fallbacks(full)
        return self.labels

    # ---- local re-fits -------------------------------------------------------------------------------------------
    def _draw_fallbacks(self, window) -> None:
        """Re-rasterise the fallback nuclei in ``window`` onto its background pixels."""
        r0, r1, c0, c1 = window
        if r0 >= r1 or c0 >= c1 or self._fb_index.size == 0:
            bg = ~self.maps.foreground[r0:r1, c0:c1]
            self.labels[r0:r1, c0:c1][bg] = 0
            return
        ras = rasterize(self._fb_shapes, self.shape, ids=self._fb_index + 1, window=window)
        fg = self.maps.foreground[r0:r1, c0:c1]
        win = self.labels[r0:r1, c0:c1]
        win[~fg] = ras[~fg]

    def _fallback_box(self, i: int) -> tuple[int, int, int, int] | None:
        k = np.searchsorted(self._fb_index, i)
        if k >= self._fb_index.size or self._fb_index[k] != i:
            return None
        s = self._fb_shapes.take([k])
        hr, hc = s.half_extents()
        cy, cx = np.floor(s.centres[0] + 0.5).astype(int)
        return cy - int(hr[0]), cy + int(hr[0]) + 1, cx - int(hc[0]), cx + int(hc[0]) + 1

    def _regions(self, indices) -> tuple[set, list]:
        """The foreground components and fallback boxes that points ``indices`` (current state) touch."""
        comps, boxes = set(), []
        for i in indices:
            if self._comp[i] > 0:
                comps.add(int(self._comp[i]))
            else:
                b = self._fallback_box(int(i))
                if b is not None:
                    boxes.append(b)
        return comps, boxes

    def _refit(self, comps: set, boxes: list) -> Patch | None:
        """Re-fit the given components and fallback boxes from the current points; the changed box as a Patch."""
        h, w = self.shape
        spans = []
        for c in sorted(comps):
            sl = self.maps.boxes[c - 1]
            win = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
            which = np.flatnonzero(self._comp == c)
            mask = self.maps.components[sl] == c
            lab = _flood(self.maps, _markers(self.maps, self._anchor, self._comp, which, win), mask, self._anchor, win)
            self.labels[sl][mask] = lab[mask]
            spans.append(win)
        for b in boxes:
            win = (max(0, b[0]), min(h, b[1]), max(0, b[2]), min(w, b[3]))
            if win[0] < win[1] and win[2] < win[3]:
                self._draw_fallbacks(win)
                spans.append(win)
        if not spans:
            return None
        r0, r1 = min(s[0] for s in spans), max(s[1] for s in spans)
        c0, c1 = min(s[2] for s in spans), max(s[3] for s in spans)
        return Patch(slice(r0, r1), slice(c0, c1), self.labels[r0:r1, c0:c1].copy())

    def _update(self, points: np.ndarray, classes: np.ndarray, before: np.ndarray, after: np.ndarray) -> Patch | None:
        """Replace the state by ``points``/``classes``; ``before`` and ``after`` are the edited points' indices in the
        old and new state."""
        comps, boxes = self._regions(before)
        self._set_state(points, classes, changed=after)
        c2, b2 = self._regions(after)
        return self._refit(comps | c2, boxes + b2)

    # ---- the MaskSampler interface -------------------------------------------------------------------------------
    def add_points(self, points, classes=None) -> Patch | None:
        """Append points (ids ``len + 1 ...``) and fit their nuclei; the changed region as a Patch (None: none)."""
        new = as_points(np.reshape(points, (-1, 2)))
        if len(new) == 0:
            return None
        n0 = len(self.points)
        pts = np.concatenate([self.points, new])
        cls = np.concatenate([self.classes, as_classes(classes, len(new))])
        return self._update(pts, cls, np.zeros(0, np.int64), np.arange(n0, len(pts)))

    def set_points(self, indices, points, classes=None) -> Patch | None:
        """Move (or re-class) existing points ``indices`` and re-fit what they touch, before and after."""
        idx = self._indices(indices)
        if idx.size == 0:
            return None
        new = as_points(np.reshape(points, (-1, 2)))
        if len(new) != idx.size:
            raise ValueError(f"got {len(new)} points for {idx.size} indices")
        pts = self.points.copy()
        pts[idx] = new
        cls = self.classes.copy()
        if classes is not None:
            cls[idx] = as_classes(classes, idx.size)
        return self._update(pts, cls, idx, idx)

    def remove_points(self, indices) -> np.ndarray:
        """Delete points; the ids above each deleted one shift down by one (id = point index + 1 stays true).
        Returns the new full label map (the ids change everywhere)."""
        self._remove(indices)
        return self.labels

    def _drop_points(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forget the points ``idx``: the labels of the others renumbered (id = new index + 1), their fallback
        nuclei kept under their new indices. Returns ``(keep, old_labels)``: the kept points' mask and the labels
        before."""
        keep = np.ones(len(self.points), bool)
        keep[idx] = False
        new_of_old = np.cumsum(keep) - 1  # the new index of each kept old point
        lut = np.zeros(keep.size + 1, np.uint32)
        lut[1:][keep] = np.arange(1, keep.sum() + 1, dtype=np.uint32)
        old_labels = self.labels
        self.labels = lut[self.labels]
        kept_fb = keep[self._fb_index]
        self._fb_shapes = self._fb_shapes.take(np.flatnonzero(kept_fb))
        self._fb_index = new_of_old[self._fb_index[kept_fb]]
        self.points, self.classes, self.inside = self.points[keep], self.classes[keep], self.inside[keep]
        return keep, old_labels

    def _remove(self, indices) -> Patch | None:
        idx = np.unique(self._indices(indices))
        if idx.size == 0:
            return None
        comps, boxes = self._regions(idx)
        keep, old_labels = self._drop_points(idx)
        self._anchor, self._comp = self._anchor[keep], self._comp[keep]
        self._refit(comps, boxes)
        diff = old_labels != self.labels
        rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
        if rows.size == 0:
            return None
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return Patch(slice(r0, r1), slice(c0, c1), self.labels[r0:r1, c0:c1].copy())

    def _indices(self, indices) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.points)):
            raise ValueError(f"indices must lie in 0..{len(self.points) - 1}, got {idx.tolist()}")
        return idx

    # ---- undo --------------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The fitter's state (points, classes, fallback nuclei; not the labels), for :meth:`restore`."""
        return {"points": self.points.copy(), "classes": self.classes.copy(), "fb_index": self._fb_index.copy(),
                "fb_shapes": self._fb_shapes.take(np.arange(len(self._fb_shapes)))}

    def restore(self, state: dict, labels=None) -> None:
        """Go back to a :meth:`snapshot`. ``labels``: the label map as of that state (e.g. a Labels layer after its
        undo), taken as is; without it the labels are fitted afresh (a full :meth:`reset`)."""
        self.points, self.classes = state["points"].copy(), state["classes"].copy()
        self.inside, self._anchor, self._comp = _anchors(self.maps, self.points)
        self._fb_index = state["fb_index"].copy()
        self._fb_shapes = state["fb_shapes"].take(np.arange(len(state["fb_shapes"])))
        if labels is None:
            self.reset(self.points, self.classes)
        else:
            lab = np.asarray(labels)
            if lab.shape != self.shape:
                raise ValueError(f"labels must have the image's shape {self.shape}, got {lab.shape}")
            self.labels = lab.astype(np.uint32, copy=True)

    # ---- one point at a time -------------------------------------------------------------------------------------
    def add(self, point, cls: int = 0) -> Patch | None:
        """Add one point (its id: the new number of points); the changed region as a Patch."""
        return self.add_points(np.reshape(point, (1, 2)), [cls])

    def move(self, i: int, point) -> Patch | None:
        """Move point ``i``; the changed region as a Patch."""
        return self.set_points([i], np.reshape(point, (1, 2)))

    def remove(self, i: int) -> Patch | None:
        """Delete point ``i`` (ids above it shift down by one); the bounding box of every changed pixel as a Patch
        (with points above ``i`` that is most of the image)."""
        return self._remove([i])


class NuClickFitter(MaskFitter):
    """:class:`MaskFitter` for the ``nuclick`` method (what ``MaskFitter(image, method="nuclick")`` returns): the
    same interface, the network's masks instead of a watershed.

    How the clicks become masks (every step depends on the clicks in a window around each click only, which is
    what lets an edit re-fit only the clicks near it, with labels equal to a full fit's):

    1. **Probabilities.** Each click inside the image gets the network's nucleus probability over its window
       (``patch`` px around its pixel; :mod:`napari_nucsynth.models.nuclick`), given the other clicks in the
       window as exclusion clicks. All clicks of a full fit run in batches; an edit re-runs the edited clicks and
       those whose windows hold an edited click's old or new pixel.
    2. **Anchor.** A click anchors at the nearest pixel within ``snap`` px where its own probability reaches
       ``threshold``; with none (a click on background) it gets a small nucleus from the shape prior instead, as
       the other methods do.
    3. **Ownership.** A pixel goes to the anchored click of highest probability among those whose windows cover
       it, if that probability reaches ``threshold`` (ties: the lower index). Each anchor pixel is its own click's
       (the lowest index where several anchor at one pixel).
    4. **One piece.** A click's nucleus is the 4-connected piece of its pixels that holds its anchor.
    5. **Fallback.** A click on background gets its prior nucleus's pixels (within its window) that no click's
       probability owns and that are no other click's anchor, and its own pixel.

    Two clicks on one nucleus split it: each one's patch shows the other as an exclusion click, and the network
    divides the nucleus between them.
    """

    _maps_type: ClassVar[type] = NuClickMaps

    # ---- state ---------------------------------------------------------------------------------------------------
    def _set_state(self, points: np.ndarray, classes: np.ndarray, changed=None) -> None:
        """Take ``points``/``classes`` as the whole state: every click's probabilities, anchor and fallback nucleus
        computed afresh (``changed`` is not used: edits go through :meth:`_update` and :meth:`_remove`)."""
        n = len(points)
        self.points, self.classes = points, classes
        self._pix = np.floor(points + 0.5).astype(np.int64)
        h, w = self.shape
        self.inside = (self._pix[:, 0] >= 0) & (self._pix[:, 0] < h) & (self._pix[:, 1] >= 0) & (self._pix[:, 1] < w)
        self._corner = self._pix - self.maps.patch // 2
        self._prob: list = [None] * n
        self._anchor = np.full((n, 2), -1, np.int64)
        self._isfb = np.zeros(n, bool)
        self._fb_index, self._fb_shapes = np.zeros(0, np.int64), NucleusShapes.empty()
        self._predict(np.flatnonzero(self.inside))
        self._redraw_fallbacks(np.arange(n))

    def _predict(self, idx: np.ndarray) -> None:
        """The network's probabilities, anchors and fallback status of the (inside) clicks ``idx``."""
        from .models.nuclick import patch_inputs

        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return
        inside = np.flatnonzero(self.inside)
        pos = np.searchsorted(inside, idx)  # idx's places among the inside clicks (every inside click counts)
        m = self.maps
        probs = []
        chunk = 256  # patches built and run a chunk at a time (memory: C + 2 channels of S x S floats each)
        for s in range(0, idx.size, chunk):
            x = patch_inputs(m.channels, self.points[inside], pos[s : s + chunk], patch=m.patch, sigma=m.sigma)
            probs.append(m.predict(x))
        prob = np.concatenate(probs)
        for k, i in enumerate(idx.tolist()):
            self._prob[i] = prob[k]
        # anchors: the nearest pixel within snap (inside the image) where the click's own probability reaches the
        # threshold
        h, w = self.shape
        off, _ = _disc_offsets(m.snap)
        cand = self._pix[idx, None, :] + off[None]
        ok = (cand[..., 0] >= 0) & (cand[..., 0] < h) & (cand[..., 1] >= 0) & (cand[..., 1] < w)
        half = m.patch // 2
        hit = ok & (prob[:, off[:, 0] + half, off[:, 1] + half] >= m.threshold)
        has = hit.any(1)
        first = hit.argmax(1)
        self._anchor[idx] = np.where(has[:, None], cand[np.arange(idx.size), first], self._pix[idx])
        self._isfb[idx] = ~has

    def _redraw_fallbacks(self, idx: np.ndarray) -> None:
        """Bring the fallback nuclei of clicks ``idx`` in line with their status (drawn where a click is on
        background; a nucleus depends on its own click, class and the seed only)."""
        idx = np.asarray(idx, dtype=np.int64)
        redo = np.zeros(len(self.points), bool)
        redo[idx] = True
        sel = ~redo[self._fb_index]
        keep_rows, keep_idx = np.flatnonzero(sel), self._fb_index[sel]
        new_idx = idx[self.inside[idx] & self._isfb[idx]]
        shapes = NucleusShapes.concat([self._fb_shapes.take(keep_rows), *[self._draw(i) for i in new_idx.tolist()]])
        allidx = np.concatenate([keep_idx, new_idx])
        order = np.argsort(allidx, kind="stable")
        self._fb_index, self._fb_shapes = allidx[order], shapes.take(order)

    # ---- composing the labels ------------------------------------------------------------------------------------
    def _windows_meeting(self, boxes) -> np.ndarray:
        """Indices of the inside clicks whose windows meet any of ``boxes`` ((r0, r1, c0, c1) each)."""
        ins = np.flatnonzero(self.inside)
        if ins.size == 0 or not boxes:
            return np.zeros(0, np.int64)
        s = self.maps.patch
        cr, cc = self._corner[ins, 0], self._corner[ins, 1]
        hit = np.zeros(ins.size, bool)
        for r0, r1, c0, c1 in boxes:
            hit |= (cr < r1) & (cr + s > r0) & (cc < c1) & (cc + s > c0)
        return ins[hit]

    def _window(self, i: int, box) -> tuple[slice, slice]:
        """Click ``i``'s window within ``box`` (clipped to it), as slices of the box."""
        r0, r1, c0, c1 = box
        s = self.maps.patch
        a, b = self._corner[i]
        return slice(max(a, r0) - r0, min(a + s, r1) - r0), slice(max(b, c0) - c0, min(b + s, c1) - c0)

    def _compose(self, box, members: np.ndarray) -> np.ndarray:
        """The labels of ``box`` (r0, r1, c0, c1) that belong to the clicks ``members`` (their final nuclei, steps 3-5
        of the class docstring), computed from every click whose window meets the box. A member's window must lie
        within the box (clipped to the image)."""
        r0, r1, c0, c1 = box
        m = self.maps
        s = m.patch
        out = np.zeros((r1 - r0, c1 - c0), np.uint32)
        if members.size == 0 or r0 >= r1 or c0 >= c1:
            return out
        cover = self._windows_meeting([box])
        best = np.full(out.shape, -1.0, np.float32)
        raw = np.zeros(out.shape, np.uint32)
        for k in cover[~self._isfb[cover]].tolist():  # ascending: a strict > leaves ties to the lower index
            rs, cs = self._window(k, box)
            a, b = self._corner[k]
            p = self._prob[k][rs.start + r0 - a : rs.stop + r0 - a, cs.start + c0 - b : cs.stop + c0 - b]
            bw, rw = best[rs, cs], raw[rs, cs]
            better = p > bw
            bw[better] = p[better]
            rw[better] = k + 1
        raw[best < m.threshold] = 0
        anchors = np.zeros(out.shape, np.uint32)
        for k in cover[::-1].tolist():  # descending: the lowest index keeps a shared anchor
            y, x = self._anchor[k, 0] - r0, self._anchor[k, 1] - c0
            if 0 <= y < out.shape[0] and 0 <= x < out.shape[1]:
                anchors[y, x] = k + 1
        free = anchors == 0
        for k in members[~self._isfb[members]].tolist():
            rs, cs = self._window(k, box)
            own = anchors[rs, cs] == k + 1
            region = ((raw[rs, cs] == k + 1) & free[rs, cs]) | own
            pieces, _ = ndi.label(region)
            y, x = self._anchor[k, 0] - r0 - rs.start, self._anchor[k, 1] - c0 - cs.start
            out[rs, cs][pieces == pieces[y, x]] = k + 1
        fb = members[self._isfb[members]]
        if fb.size:
            near = cover[self._isfb[cover]]  # every fallback nucleus that may reach the box decides its pixels
            rows = np.searchsorted(self._fb_index, near)
            ras = rasterize(self._fb_shapes.take(rows), self.shape, ids=near + 1, window=box)
            yy, xx = np.nonzero(ras)
            k = ras[yy, xx].astype(np.int64) - 1
            a, b = self._corner[k, 0] - r0, self._corner[k, 1] - c0
            outside = (yy < a) | (yy >= a + s) | (xx < b) | (xx >= b + s)  # within its own window only
            ras[yy[outside], xx[outside]] = 0
            mine = np.zeros(len(self.points) + 1, bool)
            mine[fb + 1] = True
            take = (mine[ras] & (raw == 0) & free) | mine[anchors]
            vals = np.where(mine[anchors], anchors, ras)
            out[take] = vals[take]
        return out

    def _box_of(self, indices) -> list:
        """The windows (clipped to the image) of the inside clicks ``indices``."""
        h, w = self.shape
        s = self.maps.patch
        out = []
        for i in np.asarray(indices, dtype=np.int64).tolist():
            if self.inside[i]:
                a, b = self._corner[i]
                out.append((max(a, 0), min(a + s, h), max(b, 0), min(b + s, w)))
        return out

    def _refresh(self, boxes: list, clear) -> Patch | None:
        """Re-compose the clicks whose windows meet ``boxes`` (where something changed) and write them into the
        labels, clearing first the pixels of those clicks and of ``clear`` (indices); the changed box as a Patch."""
        h, w = self.shape
        members = self._windows_meeting(boxes)
        spans = boxes + self._box_of(members)
        if not spans:
            return None
        box = (max(0, min(b[0] for b in spans)), min(h, max(b[1] for b in spans)),
               max(0, min(b[2] for b in spans)), min(w, max(b[3] for b in spans)))
        if box[0] >= box[1] or box[2] >= box[3]:
            return None
        new = self._compose(box, members)
        r0, r1, c0, c1 = box
        win = self.labels[r0:r1, c0:c1]
        gone = np.zeros(len(self.points) + 1, bool)
        gone[members + 1] = True
        gone[np.asarray(clear, dtype=np.int64) + 1] = True
        gone[0] = False
        old = win.astype(np.int64)
        old[old > len(self.points)] = 0
        win[gone[old]] = 0
        win[new > 0] = new[new > 0]
        return Patch(slice(r0, r1), slice(c0, c1), win.copy())

    # ---- full fit and edits --------------------------------------------------------------------------------------
    def reset(self, points, classes=None) -> np.ndarray:
        """Fit every point afresh (every inside click's patch through the network, in batches); returns the labels."""
        pts = as_points(points).copy()
        self._set_state(pts, as_classes(classes, len(pts)).copy())
        h, w = self.shape
        self.labels = self._compose((0, h, 0, w), np.flatnonzero(self.inside))
        return self.labels

    def _neighbours(self, pix: np.ndarray, exclude: np.ndarray) -> np.ndarray:
        """Inside clicks (not in ``exclude``) whose windows hold any of the pixels ``pix`` (n x 2)."""
        if len(pix) == 0:
            return np.zeros(0, np.int64)
        boxes = [(int(r), int(r) + 1, int(c), int(c) + 1) for r, c in pix]
        near = self._windows_meeting(boxes)
        return np.setdiff1d(near, exclude)

    def _update(self, points: np.ndarray, classes: np.ndarray, before: np.ndarray, after: np.ndarray) -> Patch | None:
        """Replace the state by ``points``/``classes`` after an add or a move (indices stay): ``before`` and ``after``
        are the edited clicks' indices in the old and new state."""
        old_boxes = self._box_of(before)
        old_pix = self._pix[before][self.inside[before]]
        n_old, n = len(self.points), len(points)
        h, w = self.shape
        self.points, self.classes = points, classes
        if n > n_old:  # room for the added clicks
            k = n - n_old
            self.inside = np.concatenate([self.inside, np.zeros(k, bool)])
            self._pix = np.concatenate([self._pix, np.zeros((k, 2), np.int64)])
            self._corner = np.concatenate([self._corner, np.zeros((k, 2), np.int64)])
            self._anchor = np.concatenate([self._anchor, np.full((k, 2), -1, np.int64)])
            self._isfb = np.concatenate([self._isfb, np.zeros(k, bool)])
            self._prob += [None] * k
        after = np.asarray(after, dtype=np.int64)
        pix = np.floor(points[after] + 0.5).astype(np.int64)
        self._pix[after] = pix
        self._corner[after] = pix - self.maps.patch // 2
        self.inside[after] = (pix[:, 0] >= 0) & (pix[:, 0] < h) & (pix[:, 1] >= 0) & (pix[:, 1] < w)
        out = after[~self.inside[after]]
        self._anchor[out] = -1
        self._isfb[out] = False
        for i in out.tolist():
            self._prob[i] = None
        near = self._neighbours(np.concatenate([old_pix, self._pix[after][self.inside[after]]]), after)
        changed = np.union1d(after[self.inside[after]], near)
        self._predict(changed)
        self._redraw_fallbacks(np.union1d(changed, after))
        return self._refresh(old_boxes + self._box_of(changed), after)

    def _remove(self, indices) -> Patch | None:
        idx = np.unique(self._indices(indices))
        if idx.size == 0:
            return None
        old_boxes = self._box_of(idx)
        old_pix = self._pix[idx][self.inside[idx]]
        keep, old_labels = self._drop_points(idx)
        self._pix, self._corner = self._pix[keep], self._corner[keep]
        self._anchor, self._isfb = self._anchor[keep], self._isfb[keep]
        self._prob = [p for p, k in zip(self._prob, keep.tolist()) if k]
        changed = self._neighbours(old_pix, np.zeros(0, np.int64))
        self._predict(changed)
        self._redraw_fallbacks(changed)
        self._refresh(old_boxes + self._box_of(changed), np.zeros(0, np.int64))
        diff = old_labels != self.labels
        rows, cols = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
        if rows.size == 0:
            return None
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return Patch(slice(r0, r1), slice(c0, c1), self.labels[r0:r1, c0:c1].copy())

    # ---- undo --------------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The fitter's state (points, classes, the network's probabilities, anchors, fallback nuclei; not the
        labels), for :meth:`restore`."""
        return {"points": self.points.copy(), "classes": self.classes.copy(), "inside": self.inside.copy(),
                "pix": self._pix.copy(), "corner": self._corner.copy(), "anchor": self._anchor.copy(),
                "isfb": self._isfb.copy(), "prob": list(self._prob), "fb_index": self._fb_index.copy(),
                "fb_shapes": self._fb_shapes.take(np.arange(len(self._fb_shapes)))}

    def restore(self, state: dict, labels=None) -> None:
        """Go back to a :meth:`snapshot`; ``labels`` as :meth:`MaskFitter.restore` (without them the labels are
        composed afresh from the saved probabilities: no network run)."""
        self.points, self.classes = state["points"].copy(), state["classes"].copy()
        self.inside, self._pix, self._corner = state["inside"].copy(), state["pix"].copy(), state["corner"].copy()
        self._anchor, self._isfb, self._prob = state["anchor"].copy(), state["isfb"].copy(), list(state["prob"])
        self._fb_index = state["fb_index"].copy()
        self._fb_shapes = state["fb_shapes"].take(np.arange(len(state["fb_shapes"])))
        if labels is None:
            h, w = self.shape
            self.labels = self._compose((0, h, 0, w), np.flatnonzero(self.inside))
        else:
            lab = np.asarray(labels)
            if lab.shape != self.shape:
                raise ValueError(f"labels must have the image's shape {self.shape}, got {lab.shape}")
            self.labels = lab.astype(np.uint32, copy=True)


def fit_masks(image, points, *, method: str = "auto", classes=None, checkpoint=None, device: str = "auto",
              prior: ShapePrior | None = None, seed: SeedLike = None, progress: Progress = None,
              should_stop: ShouldStop = None, return_result: bool = False, **params):
    """The mask of the nucleus under each point of a real H&E image (see the module docstring for how).

    Parameters
    ----------
    image : array
        RGB uint8 ``H x W x 3``; grey, RGBA, uint16 and float in [0, 1] are converted
        (:func:`napari_nucsynth._checks.as_rgb`); anything else is a ``ValueError`` naming ``image``.
    points : (N, 2) array
        Clicked nucleus centres (row, col), napari's order. Points outside the image are allowed and get no
        nucleus; an empty array gives empty labels.
    method : str
        A fitting method (:func:`fit_methods`) or ``"auto"`` (the first available of ``nuclick``, ``hovernet``,
        ``watershed``: :data:`AUTO_ORDER`).
    classes : (N,) int array, optional
        Class per point: selects the class's shape prior for fallback nuclei.
    checkpoint : str or Path, optional
        A model checkpoint for the methods that run one (the shipped model when None).
    device : str
        "auto", "cpu", "cuda", "mps".
    prior : ShapePrior, optional
        Shape prior of the fallback nuclei (default: :meth:`ShapePrior.default`).
    seed : int or Generator or None
        Randomness of the fallback nuclei (the rest is deterministic).
    progress, should_stop : callables, optional
        ``progress(done, total, what)`` of the one-time pass; when ``should_stop()`` turns True the work stops with
        ``InterruptedError``.
    return_result : bool
        Return a :class:`FitResult` (labels, which points were inside, which got a fallback nucleus) instead of the
        labels alone.
    **params
        The method's one-time pass parameters (``get_fit_method(name).params``).

    Returns
    -------
    (H, W) uint32 labels, id = point index + 1 (or a :class:`FitResult`).

    Raises
    ------
    ValueError
        For an unreadable image, points that are not (N, 2) finite numbers, classes that are not one non-negative
        integer per point, an unknown method or parameter.
    """
    pts = as_points(points)
    cls = as_classes(classes, len(pts))
    fitter = MaskFitter(image, method=method, checkpoint=checkpoint, device=device, prior=prior, seed=seed,
                        progress=progress, should_stop=should_stop, **params)
    fitter.reset(pts, cls)
    return fitter.result() if return_result else fitter.labels
