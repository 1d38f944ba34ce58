"""DAFF-GAN's points -> instance masks model: a pix2pixHD-style generator with criss-cross attention that sees each
nucleus's neighbours.

Cheng et al.'s DAFF-GAN uses a pix2pixHD-style coarse-to-fine generator with criss-cross attention twice: to render
masks as H&E (:mod:`napari_nucsynth.models.pix2pixhd`) and, here, to grow nuclei from points. It is the learned
alternative to the shape prior of :func:`napari_nucsynth.masks.sample_masks` (``method="daff"`` there): the prior
draws each nucleus from statistics that see the neighbours only through one density number, while this network
sees the whole layout (convolutions for the near neighbours, criss-cross attention for the rest of the tile).

- **Input maps** of a point set (:func:`point_maps`): a Gaussian of the distance to the nearest point (``sigma``),
  the distance to the nearest point (clipped at ``2 radius`` and scaled to [0, 1]: its ridges are the Voronoi
  borders between neighbours), per point ``z_nc`` channels of a latent drawn for that point and painted on its
  Voronoi cell within ``radius`` px (an instance-level noise: the same nucleus gets the same values everywhere,
  so the network can make it larger or rounder as a whole), ``n_classes`` one-hot class channels painted the same
  way (classes at or above ``n_classes`` paint nothing: the pooled, untyped model), and ``noise_nc`` channels of
  per-pixel noise (a hash of the seed and the global position, as the renderers' noise).
- **Outputs** (2 channels, tanh): the nucleus probability (``> 0`` is foreground) and the medial-axis distance map
  (:func:`napari_nucsynth.masks.distance_map`: 1 on each nucleus's core, near 0 at its contour and at the border
  between touching nuclei), both mapped to [-1, 1].
- **Instances** (:func:`sample`): a marker-controlled watershed (``skimage.segmentation.watershed``) of the
  negated distance map, seeded at the points (marker ``i + 1`` at point ``i``'s pixel; where two points share a
  pixel the earlier keeps it) and restricted to the foreground (its holes under 16 px filled, plus the marker
  pixels) within ``max_radius`` px of a point. Every point inside the image gets exactly one connected nucleus
  with id = point index + 1, as the prior sampler gives. The work is done on a canvas ``pad`` px larger than the
  image on every side, so points just outside it still grow the part of their nucleus that lies inside (a nucleus
  that the crop to the image cuts into pieces keeps the piece with its point, or its largest).
- **Training** on MoNuSeg label maps, the points being their centroids, as an adversarial model on the GAN core
  (:mod:`napari_nucsynth.models.gan`): the multi-scale PatchGAN sees the input maps (less the noise) beside the
  two output maps, hinge loss, feature matching x ``lambda_feat``, an L1 to the real maps x ``lambda_l1``, no
  perceptual loss (the outputs are not images), EMA of the generator, bf16 autocast where native.

Why adversarial and not a plain regression (a segmenter-style ``ModelSpec``): the target is a distribution (the
areas and shapes of real nuclei at real centroids, measured by a KS statistic), and the per-pixel loss alone pulls
every nucleus to the conditional median size of its layout, which narrows the area distribution; the
discriminator and the per-point latents give the sizes their spread. The L1 term keeps the samples on the real
masks where the layout decides them. The core brings the EMA, the two time-scale optimisers, bf16, checkpoints and
resume for free.

Typed masks: the class channels exist (``n_classes``), but the training loop passes label maps only, so a model
trained through :func:`napari_nucsynth.train.train` (like the MoNuSeg one, which has no types) has
``n_classes = 0`` and takes classes as given (checked, one per point) without using them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn

from .._checks import SeedLike, as_classes, as_labels, as_points, as_shape
from . import gan, register_model
from ._rendering import seed_int
from .gan import GAN_DEFAULTS, GANModel, MultiscaleDiscriminator
from .pix2pixhd import Pix2PixHDGenerator, generator_kwargs, run_windows, seeded_noise

__all__ = [
    "DAFF", "SPEC", "TRAIN_HINT", "build", "default_checkpoint", "default_config", "load_model", "point_maps",
    "preview", "sample", "sample_masks", "targets", "validate",
]

#: input maps of the point layout (before classes, latents and noise): Gaussian heat, distance to the nearest point
POINT_NC = 2
#: output maps: nucleus probability, medial-axis distance
OUT_NC = 2
DEFAULT_LR = 2e-4
#: background pockets of fewer pixels than this inside the foreground are filled before the watershed
_HOLE = 16
#: the streams of the per-pixel noise (:func:`napari_nucsynth.models.pix2pixhd.seeded_noise`)
_NOISE_STREAM = 5000

TRAIN_HINT = ("python benchmarks/train_daff.py --split all --steps N --out CKPT (or `nucsynth train --model daff "
              "--images DIR --labels DIR --steps N --out CKPT`)")


def default_config() -> dict:
    """The default configuration.

    - the generator's keys as :func:`napari_nucsynth.models.pix2pixhd.default_config` (``ngf``, ``ngf_max``,
      ``n_down``, ``n_blocks``, ``n_local_blocks``, ``cca_reduction``, ``cca_recurrence``);
    - ``n_classes``: one-hot class channels (0: untyped); ``z_nc``: latent channels per point; ``noise_nc``:
      per-pixel noise channels; ``sigma``: width (px) of the Gaussian at each point; ``radius``: how far (px) a
      point's latent and class are painted on its Voronoi cell, and half the range of the distance channel;
    - ``max_radius``: no pixel further than this from every point is a nucleus; ``threshold``: probability above
      which a pixel is foreground; ``pad``: margin (px) of the canvas around the image;
    - the GAN core's keys: discriminator ``ndf``, ``d_layers``, ``num_d``; ``lambda_feat``, ``lambda_l1``
      (``lambda_perc`` must stay 0), ``ema_decay``, ``amp``;
    - ``tile``, ``halo``, ``blend``: windows for canvases larger than ``tile``.
    """
    core = {k: v for k, v in GAN_DEFAULTS.items() if k not in ("features", "perc_weights")}
    return {
        **core, "ndf": 16, "lambda_perc": 0.0, "lambda_l1": 10.0,
        "ngf": 8, "ngf_max": 64, "n_down": 3, "n_blocks": 4, "n_local_blocks": 2,
        "cca_reduction": 8, "cca_recurrence": 2,
        "n_classes": 0, "z_nc": 2, "noise_nc": 1, "sigma": 2.0, "radius": 16.0,
        "max_radius": 32.0, "threshold": 0.5, "pad": 16,
        "tile": 1536, "halo": 64, "blend": 32,
    }


# ----------------------------------------------------------------------------------------------------------------
# input maps


def point_maps(points, shape, *, classes=None, n_classes: int = 0, sigma: float = 2.0,
               radius: float = 16.0) -> dict[str, np.ndarray]:
    """The input maps of a point layout on an ``shape`` canvas (points in its pixel coordinates).

    Returns a dict: ``heat`` (H x W float32, ``exp(-d^2 / 2 sigma^2)`` of the distance ``d`` to the nearest point),
    ``near`` (H x W float32, ``min(d, 2 radius) / (2 radius)``), ``cell`` (H x W int64: the index of the nearest
    point where ``d <= radius``, else -1) and ``classes`` (``n_classes`` x H x W float32: the one-hot class of
    ``cell``'s point). Points are rounded to pixels; points outside the canvas are left out; where two share a
    pixel, the earlier one keeps it. Distances are exact Euclidean (``scipy.ndimage.distance_transform_edt``).
    """
    H, W = as_shape(shape)
    pts = as_points(points)
    cls = as_classes(classes, len(pts))
    out = {"heat": np.zeros((H, W), np.float32), "near": np.ones((H, W), np.float32),
           "cell": np.full((H, W), -1, np.int64), "classes": np.zeros((int(n_classes), H, W), np.float32)}
    if len(pts) == 0:
        return out
    rc = np.floor(pts + 0.5).astype(np.int64)
    inside = np.flatnonzero((rc[:, 0] >= 0) & (rc[:, 0] < H) & (rc[:, 1] >= 0) & (rc[:, 1] < W))
    if inside.size == 0:
        return out
    flat = rc[inside, 0] * W + rc[inside, 1]
    _, first = np.unique(flat, return_index=True)  # the earliest point on each pixel
    raster = np.full(H * W, -1, np.int64)
    raster[flat[first]] = inside[first]
    raster = raster.reshape(H, W)
    d, (ri, ci) = ndi.distance_transform_edt(raster < 0, return_indices=True)
    nearest = raster[ri, ci]
    out["heat"] = np.exp(-(d**2) / (2.0 * float(sigma) ** 2)).astype(np.float32)
    out["near"] = (np.minimum(d, 2.0 * radius) / (2.0 * radius)).astype(np.float32)
    cell = np.where(d <= radius, nearest, -1)
    out["cell"] = cell
    if n_classes:
        c = np.where(cell >= 0, cls[np.maximum(cell, 0)], -1)
        for k in range(int(n_classes)):
            out["classes"][k] = c == k
    return out


def targets(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """One training sample from instance labels (the image is not used): the input maps of the labels' centroids
    (``heat``, ``near``: 1 x H x W float32; ``cell``: 1 x H x W int64, see :func:`point_maps` with the default
    ``sigma`` and ``radius``) and the real outputs ``fg`` (1 on nuclei) and ``dist``
    (:func:`napari_nucsynth.masks.distance_map`), 1 x H x W float32."""
    from ..masks import distance_map
    from ..points import centroids

    lab = as_labels(labels)
    cfg = default_config()
    maps = point_maps(centroids(lab), lab.shape, sigma=cfg["sigma"], radius=cfg["radius"])
    return {"heat": maps["heat"][None], "near": maps["near"][None], "cell": maps["cell"][None],
            "fg": (lab > 0).astype(np.float32)[None], "dist": distance_map(lab)[None]}


# ----------------------------------------------------------------------------------------------------------------
# the model


class DAFF(GANModel):
    """The generator (points -> nucleus probability and distance map) and its discriminator in one module, trained
    on the GAN core; ``ema`` holds the moving average of the generator, which samples and ships."""

    G_MODULES = ("generator",)

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        cfg = self.config
        self.n_classes, self.z_nc, self.noise_nc = int(cfg["n_classes"]), int(cfg["z_nc"]), int(cfg["noise_nc"])
        in_nc = POINT_NC + self.n_classes + self.z_nc + self.noise_nc
        self.generator = Pix2PixHDGenerator(in_nc, OUT_NC, style_dim=0, **generator_kwargs(cfg))
        self.discriminator = MultiscaleDiscriminator(POINT_NC + self.n_classes + OUT_NC, int(cfg["ndf"]),
                                                     int(cfg["d_layers"]), int(cfg["num_d"]))
        self.init_gan()

    @property
    def multiple(self) -> int:
        return self.generator.multiple

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The layout's maps (heat, near, classes: what the discriminator sees beside the outputs) and the real
        outputs (probability, distance) in [-1, 1]."""
        ref = batch["heat"]
        parts = [batch["heat"].float(), batch["near"].float()]
        if self.n_classes:
            cls = batch.get("classes")
            parts.append(cls.float() if cls is not None else ref.new_zeros(ref.shape[0], self.n_classes,
                                                                           *ref.shape[2:]).float())
        real = torch.cat([batch["fg"], batch["dist"]], 1).float() * 2 - 1
        return torch.cat(parts, 1), real

    def generate(self, batch: dict, cond: torch.Tensor, real: torch.Tensor, *,
                 ema: bool = False) -> tuple[torch.Tensor, dict]:
        """Training forward pass: fresh per-point latents painted on the points' cells, fresh per-pixel noise."""
        gen = self.ema["generator"] if ema else self.generator
        n, _, h, w = cond.shape
        parts = [cond]
        if self.z_nc:
            cell = batch["cell"][:, 0].long()
            z = torch.randn(n, int(cell.max().clamp(min=0)) + 1, self.z_nc, device=cond.device, dtype=cond.dtype)
            zmap = z[torch.arange(n, device=cond.device)[:, None, None], cell.clamp(min=0)]
            parts.append((zmap * (cell >= 0)[..., None]).permute(0, 3, 1, 2))
        if self.noise_nc:
            parts.append(torch.randn(n, self.noise_nc, h, w, device=cond.device, dtype=cond.dtype))
        return gen(torch.cat(parts, 1)), {}


# ----------------------------------------------------------------------------------------------------------------
# sampling


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def predict_maps(model: DAFF, points, shape, *, classes=None, seed: SeedLike = None, tile: int | None = None,
                 progress: Callable[[int, int, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, np.ndarray]:
    """The network's outputs for a layout on the padded canvas: ``prob`` and ``dist`` (each (H + 2 pad) x
    (W + 2 pad) float32 in [0, 1]), the canvas's ``near`` distance (px) to the nearest point, ``points`` shifted
    into canvas coordinates and the ``pad``."""
    H, W = as_shape(shape)
    pts = as_points(points)
    cls = as_classes(classes, len(pts))
    cfg = model.config
    s = seed_int(seed)
    pad, m = int(cfg["pad"]), model.multiple
    Hc, Wc = H + 2 * pad, W + 2 * pad
    Hp, Wp = -(-Hc // m) * m, -(-Wc // m) * m
    cpts = pts + pad
    radius = float(cfg["radius"])
    maps = point_maps(cpts, (Hp, Wp), classes=cls, n_classes=model.n_classes, sigma=float(cfg["sigma"]),
                      radius=radius)
    planes = [maps["heat"][None], maps["near"][None], maps["classes"]]
    if model.z_nc:
        z = np.random.default_rng([s, 1]).standard_normal((max(len(pts), 1), model.z_nc)).astype(np.float32)
        cell = maps["cell"]
        planes.append((z[np.maximum(cell, 0)] * (cell >= 0)[..., None]).transpose(2, 0, 1))
    x = np.concatenate(planes, 0).astype(np.float32)
    gen = model.inference("generator")
    dev = _device(model)
    nz = model.noise_nc

    def fn(window: np.ndarray, r0: int, c0: int) -> np.ndarray:
        _, h, w = window.shape
        noise = seeded_noise(s, nz, r0, c0, h, w, stream0=_NOISE_STREAM)  # canvas coordinates (pad is fixed)
        t = torch.from_numpy(np.concatenate([window, noise], 0))[None].to(dev)
        if dev.type == "cpu":
            t = t.contiguous(memory_format=torch.channels_last)
        return gen(t)[0].float().cpu().numpy()

    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            y = run_windows(fn, x, OUT_NC, tile=int(cfg["tile"] if tile is None else tile), halo=int(cfg["halo"]),
                            blend=int(cfg["blend"]), multiple=m, progress=progress, should_stop=should_stop,
                            what="sampling masks")
    finally:
        model.train(was)
    y = (y[:, :Hc, :Wc] + 1) / 2
    return {"prob": y[0], "dist": y[1], "near": maps["near"][:Hc, :Wc] * 2 * radius, "points": cpts, "pad": pad}


def sample(model: DAFF, points, shape, *, classes=None, seed: SeedLike = None, tile: int | None = None,
           progress: Callable[[int, int, str], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """One nucleus instance mask per point, by a trained DAFF model (see the module docstring).

    Parameters
    ----------
    model : DAFF
        A model (e.g. from a checkpoint), on its device; its train/eval mode is restored afterwards.
    points : (N, 2) array
        Nucleus centroids (row, col). Points up to ``pad`` px outside the image grow the part of their nucleus
        inside it; points further out get none.
    shape : (H, W)
        Output shape.
    classes : (N,) int array, optional
        Class per point (one-hot input channels of a typed model; classes at or above the model's ``n_classes``,
        and all classes for an untyped model, are the pooled model's).
    seed : int, numpy Generator or None
        Draws the per-point latents and the per-pixel noise; the same seed gives the same masks.
    tile : int, optional
        Window size (px) of the network (the config's ``tile`` when None).
    progress, should_stop : callables, optional
        ``progress(done, total, "sampling masks")`` per window; ``should_stop()`` ends with ``InterruptedError``.

    Returns
    -------
    (H, W) uint32 array
        Instance labels, id = point index + 1, 0 = background; each point in the image has exactly one connected
        nucleus (where two points share a pixel, the earlier keeps it and the later gets none).
    """
    from skimage.morphology import remove_small_holes
    from skimage.segmentation import watershed

    H, W = as_shape(shape)
    pts = as_points(points)
    as_classes(classes, len(pts))
    if len(pts) == 0:
        return np.zeros((H, W), np.uint32)
    cfg = model.config
    out = predict_maps(model, pts, (H, W), classes=classes, seed=seed, tile=tile, progress=progress,
                       should_stop=should_stop)
    prob, dist, near, cpts, pad = out["prob"], out["dist"], out["near"], out["points"], out["pad"]
    Hc, Wc = prob.shape
    markers = np.zeros((Hc, Wc), np.int64)
    rc = np.floor(cpts + 0.5).astype(np.int64)
    inside = np.flatnonzero((rc[:, 0] >= 0) & (rc[:, 0] < Hc) & (rc[:, 1] >= 0) & (rc[:, 1] < Wc))
    if inside.size == 0:
        return np.zeros((H, W), np.uint32)
    flat = rc[inside, 0] * Wc + rc[inside, 1]
    _, first = np.unique(flat, return_index=True)
    markers.ravel()[flat[first]] = inside[first] + 1
    fg = remove_small_holes(prob > float(cfg["threshold"]), max_size=_HOLE - 1)  # speckle inside a nucleus
    mask = (fg & (near <= float(cfg["max_radius"]))) | (markers > 0)
    lab = np.ascontiguousarray(watershed(-dist, markers, mask=mask)[pad : pad + H, pad : pad + W])
    return _one_piece(lab, rc - pad).astype(np.uint32)


def _one_piece(lab: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """Keep one connected piece of each nucleus of ``lab`` (a watershed region is connected on the canvas, but
    cropping to the image can cut one that left the image and came back): the piece holding its point's pixel
    (``rc[id - 1]``) when that lies in the image, else its largest piece."""
    from skimage.measure import label as components

    comp = components(lab, background=0, connectivity=1)
    n = int(comp.max())
    if n == len(np.unique(lab[lab > 0])):
        return lab  # as many pieces as nuclei: each is whole
    owner = np.zeros(n + 1, np.int64)
    owner[comp.ravel()] = lab.ravel()
    size = np.bincount(comp.ravel(), minlength=n + 1)
    size[0] = 0
    keep = np.zeros(n + 1, bool)
    H, W = lab.shape
    ids = np.arange(1, len(rc) + 1)
    ok = (rc[:, 0] >= 0) & (rc[:, 0] < H) & (rc[:, 1] >= 0) & (rc[:, 1] < W)
    at = comp[rc[ok, 0], rc[ok, 1]]
    mine = owner[at] == ids[ok]  # the point's pixel is in its own nucleus (not in an earlier point's)
    keep[at[mine]] = True
    placed = np.zeros(len(rc) + 1, bool)
    placed[owner[keep]] = True
    order = np.argsort(-size, kind="stable")  # largest first: the first piece seen of an unplaced id is kept
    for c in order:
        if c == 0 or size[c] == 0:
            continue
        o = owner[c]
        if not placed[o]:
            keep[c] = placed[o] = True
    keep[0] = False
    return np.where(keep[comp], lab, 0)


# ----------------------------------------------------------------------------------------------------------------
# training hooks


def _centre(lab, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` (at most) of a label map."""
    lab = as_labels(lab)
    H, W = lab.shape
    h, w = min(H, size), min(W, size)
    r, c = (H - h) // 2, (W - w) // 2
    return lab[r : r + h, c : c + w]


def _areas(lab: np.ndarray) -> np.ndarray:
    a = np.bincount(lab.ravel())[1:]
    return a[a > 0]


def validate(model: DAFF, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], device,
             max_pairs: int = 6, crop: int = 1024) -> dict[str, float]:
    """Masks at real centroids (the centre ``crop`` of at most ``max_pairs`` held-out label maps, seed 0, the EMA
    generator): the two-sample KS statistic ``area_ks`` between the areas of the sampled and the real nuclei (the
    issue's target: <= 0.15), the foreground ``dice`` and the ``aji`` against the real masks, and the share of
    points that got a nucleus (``with_nucleus``); means over the pairs."""
    from scipy.stats import ks_2samp

    from ..metrics import instance_metrics
    from ..points import centroids

    ks, dice, aji, got = [], [], [], []
    for img, lab in list(zip(images, labels))[:max_pairs]:
        lb = _centre(lab, crop)
        pts = centroids(lb)
        if len(pts) < 2:
            continue
        syn = sample(model, pts, lb.shape, seed=0)
        ks.append(float(ks_2samp(_areas(syn), _areas(lb)).statistic))
        r = instance_metrics(lb, syn)
        dice.append(float(r["dice"]))
        aji.append(float(r["aji"]))
        got.append(float(np.isin(np.arange(1, len(pts) + 1), syn).mean()))
    if not ks:
        return {}
    return {"area_ks": float(np.mean(ks)), "dice": float(np.mean(dice)), "aji": float(np.mean(aji)),
            "with_nucleus": float(np.mean(got))}


def _colour(lab: np.ndarray) -> np.ndarray:
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    rgb = label2rgb(lab, bg_label=0, bg_color=(1, 1, 1))
    rgb[find_boundaries(lab, mode="inner")] = 0
    return (rgb * 255).astype(np.uint8)


def preview(model: DAFF, image: np.ndarray, labels: np.ndarray, device) -> np.ndarray:
    """The real masks (left) and the masks sampled at their centroids (right), centre 256 x 256 at most, seed 0,
    as RGB uint8 side by side."""
    from ..points import centroids

    lb = _centre(labels, 256)
    syn = sample(model, centroids(lb), lb.shape, seed=0)
    gap = np.full((lb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([_colour(lb), gap, _colour(syn)], 1)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and the masks.sample_masks entry point


_MODELS: dict = {}


def default_checkpoint() -> Path:
    """The shipped checkpoint's path (absent until a trained model is shipped)."""
    return Path(__file__).resolve().parents[1] / "data" / "models" / "daff_monuseg.pt"


def load_model(checkpoint, device) -> DAFF:
    """The DAFF model of a checkpoint on ``device`` in eval mode, cached per (path, modification time, device);
    one model at a time. A shipped checkpoint (only the moving average of the generator) loads too."""
    from . import get_model, load_checkpoint

    path = Path(checkpoint)
    key = (str(path.resolve()), path.stat().st_mtime if path.exists() else None, str(device))
    if key not in _MODELS:
        ck = load_checkpoint(path, kind="daff")
        model = get_model("daff").build(dict(ck["config"]))
        try:
            model.load_shipped(ck["state_dict"])
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{path} does not match its daff config ({exc}); retrain it with {TRAIN_HINT}") from None
        model.to(device).eval()
        _MODELS.clear()
        _MODELS[key] = model
    return _MODELS[key]


def sample_masks(points, shape, *, classes=None, seed: SeedLike = None, checkpoint=None, device="auto",
                 progress=None, should_stop=None) -> np.ndarray:
    """:func:`sample` with the model of ``checkpoint`` (the shipped ``data/models/daff_monuseg.pt`` when None) on
    ``device``: what :func:`napari_nucsynth.masks.sample_masks` runs for ``method="daff"``. Inputs are checked
    before any model is loaded; a missing model is a ``ValueError`` that says how to train one."""
    from ..devices import resolve_device

    h, w = as_shape(shape)
    pts = as_points(points)
    cls = as_classes(classes, len(pts))
    if checkpoint is None:
        ckpt = default_checkpoint()
        if not ckpt.is_file():
            raise ValueError("method='daff' needs a trained model, and none is shipped with this version "
                             f"({ckpt} is missing). Train one on label maps with {TRAIN_HINT} and pass its file as "
                             "checkpoint=, or use method='prior' (the shape prior, no training needed)")
    else:
        ckpt = Path(checkpoint)
    model = load_model(ckpt, resolve_device(device))
    return sample(model, pts, (h, w), classes=cls, seed=seed, progress=progress, should_stop=should_stop)


# ----------------------------------------------------------------------------------------------------------------
# registration


_POSITIVE = ("ngf", "ngf_max", "n_down", "n_blocks", "cca_reduction", "ndf", "d_layers", "num_d", "tile")
_NON_NEGATIVE = ("n_local_blocks", "cca_recurrence", "n_classes", "z_nc", "noise_nc", "pad", "halo", "blend")


def build(config: dict | None = None) -> DAFF:
    """A DAFF model of ``config`` (missing keys take :func:`default_config`'s values)."""
    cfg = gan.merged_config(config, default_config(), "daff", positive=_POSITIVE, non_negative=_NON_NEGATIVE)
    if float(cfg["lambda_perc"]):
        raise ValueError("daff config 'lambda_perc' must be 0: the outputs are probability and distance maps, not "
                         "images, and have no perceptual loss")
    for key in ("sigma", "radius", "max_radius"):
        if not float(cfg[key]) > 0:
            raise ValueError(f"daff config {key!r} must be a positive number of pixels, got {cfg[key]!r}")
    if not 0 < float(cfg["threshold"]) < 1:
        raise ValueError(f"daff config 'threshold' must lie in (0, 1), got {cfg['threshold']!r}")
    return DAFF(cfg)


def _not_a_segmenter(*args, **kwargs):
    raise ValueError("'daff' grows nucleus masks from points; it does not segment images: sample with "
                     "napari_nucsynth.masks.sample_masks(points, shape, method='daff', checkpoint=...)")


SPEC = register_model(dataclasses.replace(
    gan.gan_spec("daff", build=build, default_config=default_config, targets=targets, validate=validate,
                 preview=preview, default_lr=DEFAULT_LR), predict=_not_a_segmenter))
