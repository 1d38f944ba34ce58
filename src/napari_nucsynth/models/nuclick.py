"""A point-prompted nucleus network in the manner of NuClick (Koohbanani et al., Medical Image Analysis 2020):
an image patch around a click, a map of that click (*inclusion*) and a map of the other clicks in the patch
(*exclusion*) in; the mask of the clicked nucleus out.

Designed for a 2-core CPU (docs/masks.md, "The nuclick method"):

- **Small patches.** ``patch`` px (64 by default: MoNuSeg's 40x nuclei are 10-25 px across) centred on the click's
  pixel (``floor(point + 0.5)``); the window of a click at pixel ``(r, c)`` covers rows ``r - patch // 2`` to
  ``r - patch // 2 + patch - 1`` (columns alike). Outside the image the input channels are 0.
- **Click maps.** Gaussians of ``sigma`` px (peak 1) at the clicks' exact (sub-pixel) positions. The inclusion map
  holds the patch's own click; the exclusion map the maximum of the Gaussians of every *other* click whose pixel
  lies inside the window (clicks outside the window do not count, however close: a patch depends on the clicks in
  its window only, which keeps incremental re-fitting exact and local).
- **A small U-Net** of torchvision ResNet basic blocks whose body runs at half resolution (a stride-2 stem):
  ``depth`` down-samplings with ``width * 2**i`` channels, bilinear up-sampling with one 3 x 3 convolution per
  decoder stage, one light full-resolution convolution over the features and the input. About 0.45 M parameters
  (1.8 MB) at width 16; about 3.5 ms of CPU time a 64-px patch on one thread (half what a full-resolution U-Net
  of the same width costs).
- **Context channels** (``config["context"]``): ``"rgb"`` (the image alone) or ``"hovernet"``: the image plus the
  shipped (or a given) HoVer-Net's nucleus probability and horizontal/vertical maps (computed once per image at
  inference, per training crop in training), so a smaller net can refine what the segmenter already sees.
- Batches: every click of an image runs in batches of patches (the image-wide fit); an edit re-runs only the
  patches it changes (:class:`napari_nucsynth.annotate.MaskFitter`).

Training (``nucsynth train --model nuclick``, :func:`napari_nucsynth.train.train`): :func:`targets` draws, per
crop, up to :data:`CLICKS_PER_CROP` nuclei (seeded by the crop's content, so a run is reproducible), clicks each
one near its centroid (jitter as a hand would: N(0, s) px with s uniform in [0, :data:`JITTER`]) and every other
nucleus as an exclusion click (each dropped with a probability up to :data:`DROP`, as NuClick trains), and a few
nuclei a second time (:data:`DOUBLE`: the target is then the part nearer the own click, so that two clicks on one
nucleus split it, as the other fitting methods do); :func:`loss` builds the patches with the model's own ``patch``
and ``sigma`` and scores binary cross-entropy + Dice of the clicked nucleus's mask. :func:`validate` fits every true centroid of the held-out pairs (AJI, PQ, Dice).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import ModelSpec, register_model

__all__ = [
    "SPEC", "NuClickNet", "batch_inputs", "build", "click_windows", "collate", "default_checkpoint", "default_config",
    "image_channels", "in_channels", "load_model", "loss", "patch_inputs", "predict", "predict_patches", "targets",
    "validate", "window_members",
]

#: Nuclei clicked per training crop (fewer when the crop holds fewer).
CLICKS_PER_CROP = 8
#: A training click lies N(0, s) px from the nucleus's centroid, s uniform in [0, JITTER] per click.
JITTER = 3.0
#: Each exclusion click of a training crop is dropped with probability uniform in [0, DROP] (per crop).
DROP = 0.2
#: Probability that a clicked training nucleus gets a second click (an exclusion click on a pixel of it at least
#: 3 px away); its target is then the part nearer the own click: two clicks on one nucleus split it.
DOUBLE = 0.1
#: Nuclei smaller than this (px) are not clicked in training (slivers cut by the crop's border).
MIN_AREA = 10
#: ImageNet statistics, as the shipped segmenter normalises.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CONTEXTS = ("rgb", "hovernet")


def default_config() -> dict:
    """The default configuration (stored in checkpoints). ``tta`` is not a training setting: it is the number of
    dihedral transforms the ``nuclick`` fitting method averages by default with this model (1-8; a shipped model
    carries the value chosen for it)."""
    return {"width": 16, "depth": 3, "patch": 64, "sigma": 2.0, "context": "rgb", "hovernet_checkpoint": None,
            "tta": 1, "refine": 0}


def in_channels(config: dict) -> int:
    """Input channels of a config: 3 image (+ 3 HoVer-Net maps with context "hovernet") + inclusion + exclusion."""
    return (6 if config.get("context", "rgb") == "hovernet" else 3) + 2


def _check_config(config: dict) -> dict:
    cfg = {**default_config(), **(config or {})}
    unknown = set(cfg) - set(default_config())
    if unknown:
        raise ValueError(f"unknown nuclick config key(s) {sorted(unknown)}; known: {sorted(default_config())}")
    if cfg["context"] not in CONTEXTS:
        raise ValueError(f"nuclick config 'context' must be one of {CONTEXTS}, got {cfg['context']!r}")
    for key, lo in (("width", 1), ("depth", 1), ("patch", 8), ("tta", 1), ("refine", 0)):
        if not isinstance(cfg[key], (int, np.integer)) or isinstance(cfg[key], bool) or cfg[key] < lo:
            raise ValueError(f"nuclick config {key!r} must be an integer >= {lo}, got {cfg[key]!r}")
    if cfg["tta"] > 8:
        raise ValueError(f"nuclick config 'tta' must be at most 8 (the dihedral transforms), got {cfg['tta']!r}")
    if cfg["patch"] % (2 ** (cfg["depth"] + 1)):
        raise ValueError(f"nuclick config 'patch' ({cfg['patch']}) must be a multiple of 2**(depth + 1) "
                         f"({2 ** (cfg['depth'] + 1)})")
    if not float(cfg["sigma"]) > 0:
        raise ValueError(f"nuclick config 'sigma' must be positive, got {cfg['sigma']!r}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# network


def _res(cin: int, cout: int, stride: int = 1) -> nn.Module:
    from torchvision.models.resnet import BasicBlock

    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return BasicBlock(cin, cout, stride=stride, downsample=down)


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class NuClickNet(nn.Module):
    """A small U-Net: N x ``in_channels`` x S x S (S a multiple of ``2**(depth + 1)``) -> N x 1 x S x S logits of
    the clicked nucleus. For a CPU its body runs at half resolution: a stride-2 stem, ``depth`` ResNet basic-block
    down-samplings (``width * 2**i`` channels), bilinear up-sampling with one 3 x 3 convolution per decoder stage,
    then back at full resolution one light convolution over the features and the input itself (where the borders
    are) before the 1 x 1 head. ``config`` is kept on the module (``patch``, ``sigma`` and ``context`` are what
    inference and :func:`loss` read).

    ``config["refine"]`` > 0 adds a full-resolution refinement of that many channels: two 3 x 3 convolutions over
    the input, the last features and the logits, whose 1 x 1 output (initialised to zero) is added to the logits.
    It starts as the identity, so a trained model without it fine-tunes with it (``train(..., init=...)``; its
    weights are the only ones the checkpoint lacks: :attr:`identity_prefixes`)."""

    #: state-dict prefixes of the parts that start as the identity (zero output): a checkpoint without them loads
    #: into this model for fine-tuning (:func:`napari_nucsynth.train.train` with ``init``)
    identity_prefixes = ("refine.",)

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = _check_config(config or {})
        self.config = cfg
        w, depth, cin = int(cfg["width"]), int(cfg["depth"]), in_channels(cfg)
        self.stem = nn.Sequential(nn.Conv2d(cin, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                                  _res(w, w))
        chans = [w * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_res(chans[i], chans[i + 1], stride=2) for i in range(depth)])
        self.up = nn.ModuleList([_conv(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth))])
        self.final = _conv(w + cin, max(w // 2, 4))
        self.head = nn.Conv2d(max(w // 2, 4), 1, 1)
        r = int(cfg["refine"])
        self.refine = None
        if r:
            out = nn.Conv2d(r, 1, 1)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.refine = nn.Sequential(_conv(cin + max(w // 2, 4) + 1, r), _conv(r, r), out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            # inference on the CPU: oneDNN's convolutions are faster on channels-last input (a batch of patches
            # ~2x); not in training, where torch 2.14's CPU backward of this net corrupted memory at width 4
            x = x.contiguous(memory_format=torch.channels_last)
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        y = skips.pop()
        for stage in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = stage(torch.cat([y, skip], 1))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.final(torch.cat([y, x], 1))
        logits = self.head(feat)
        if self.refine is not None:
            logits = logits + self.refine(torch.cat([x, feat, logits], 1))
        return logits.contiguous()


def build(config: dict) -> NuClickNet:
    return NuClickNet(config)


# ----------------------------------------------------------------------------------------------------------------
# patches and click maps (numpy: shared by training and inference)


def click_windows(points: np.ndarray, patch: int) -> np.ndarray:
    """(N, 2) int64: the top-left corner (row, col) of each click's window (see the module docstring)."""
    pix = np.floor(np.asarray(points, dtype=np.float64) + 0.5).astype(np.int64)
    return pix - int(patch) // 2


def window_members(points: np.ndarray, corners: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Which clicks lie in which windows: pairs ``(w, j)`` (window index, click index) with click ``j``'s pixel
    inside window ``w`` (the window's own click included), sorted by ``w``."""
    pix = np.floor(np.asarray(points, dtype=np.float64) + 0.5).astype(np.int64)
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    if len(pix) == 0 or len(corners) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(pix[:, 0], kind="stable")
    rows = pix[order, 0]
    lo = np.searchsorted(rows, corners[:, 0], side="left")
    hi = np.searchsorted(rows, corners[:, 0] + patch, side="left")
    counts = hi - lo
    w = np.repeat(np.arange(len(corners)), counts)
    start = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    j = order[np.arange(counts.sum()) + start]
    dc = pix[j, 1] - corners[w, 1]
    ok = (dc >= 0) & (dc < patch)
    return w[ok], j[ok]


def _gauss_1d(offsets: np.ndarray, patch: int, sigma: float) -> np.ndarray:
    """(n, patch): exp(-(k - offset)^2 / 2 sigma^2) for k = 0..patch-1."""
    k = np.arange(patch, dtype=np.float32)
    return np.exp(-((k[None, :] - offsets[:, None].astype(np.float32)) ** 2) / np.float32(2 * sigma * sigma))


def patch_inputs(channels: np.ndarray, points: np.ndarray, which, *, patch: int, sigma: float) -> np.ndarray:
    """The network's inputs for the clicks ``which``: (len(which), C + 2, patch, patch) float32.

    Parameters
    ----------
    channels : (C, H, W) float array
        The image's input channels (:func:`image_channels`); 0 is used outside the image.
    points : (N, 2) float array
        Every click that counts (row, col): the exclusion map of click ``i`` holds every other click whose pixel
        lies in ``i``'s window.
    which : (n,) int array
        Indices into ``points`` of the clicks to make patches for.
    """
    ch = np.asarray(channels)
    c, h, w = ch.shape
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    which = np.asarray(which, dtype=np.int64).reshape(-1)
    n = which.size
    out = np.zeros((n, c + 2, patch, patch), np.float32)
    if n == 0:
        return out
    corners = click_windows(pts[which], patch)
    for k in range(n):  # image channels: a slice of the padded-by-zero image
        r0, c0 = corners[k]
        rr0, rr1, cc0, cc1 = max(r0, 0), min(r0 + patch, h), max(c0, 0), min(c0 + patch, w)
        if rr0 < rr1 and cc0 < cc1:
            out[k, :c, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = ch[:, rr0:rr1, cc0:cc1]
    # inclusion: the own click's Gaussian (separable)
    off = pts[which] - corners
    gy, gx = _gauss_1d(off[:, 0], patch, sigma), _gauss_1d(off[:, 1], patch, sigma)
    out[:, c] = gy[:, :, None] * gx[:, None, :]
    # exclusion: the other clicks in the window
    wi, j = window_members(pts, corners, patch)
    keep = j != which[wi]
    wi, j = wi[keep], j[keep]
    if wi.size:
        o = pts[j] - corners[wi]
        g = _gauss_1d(o[:, 0], patch, sigma)[:, :, None] * _gauss_1d(o[:, 1], patch, sigma)[:, None, :]
        starts = np.flatnonzero(np.r_[True, wi[1:] != wi[:-1]])
        out[wi[starts], c + 1] = np.maximum.reduceat(g, starts, axis=0)
    return out


def _normalise(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) float32: ImageNet-normalised RGB of an H x W x 3 uint8 image."""
    x = (np.asarray(rgb, np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _context_from_maps(maps: np.ndarray) -> np.ndarray:
    """(3, H, W): HoVer-Net's H x W x 3 maps (probability, h, v) as input channels (probability centred)."""
    m = np.asarray(maps, np.float32).transpose(2, 0, 1).copy()
    m[0] = 2.0 * m[0] - 1.0
    return m


# ----------------------------------------------------------------------------------------------------------------
# the HoVer-Net context


def _hovernet_path(config: dict) -> Path:
    from .features import shipped_hovernet

    path = Path(config["hovernet_checkpoint"]) if config.get("hovernet_checkpoint") else shipped_hovernet()
    if not path.is_file():
        raise ValueError(f"this nuclick model reads HoVer-Net maps (context 'hovernet'), but the HoVer-Net "
                         f"checkpoint {path} is missing; train one (nucsynth train --model hovernet) or set the "
                         "config's 'hovernet_checkpoint'")
    return path


def _hovernet_batch(config: dict, images: torch.Tensor) -> np.ndarray:
    """HoVer-Net's maps of a batch of training crops (N x 3 x H x W in [0, 1]) -> N x 3 x H x W numpy (the
    probability centred as :func:`_context_from_maps`)."""
    from .hovernet import load_model as hv_load

    model = hv_load(_hovernet_path(config), images.device)
    with torch.no_grad():
        out = model(images)
        prob = torch.softmax(out[:, :2], 1)[:, 1:]
        maps = torch.cat([2 * prob - 1, out[:, 2:]], 1)
    return maps.float().cpu().numpy()


def image_channels(model_or_config, image: np.ndarray, device="cpu", *, progress=None,
                   should_stop=None) -> np.ndarray:
    """The one-time pass over an image: its input channels (C, H, W) float32 for :func:`patch_inputs` (the
    normalised RGB, plus HoVer-Net's maps for a model with context "hovernet")."""
    from .._checks import as_rgb

    cfg = model_or_config.config if isinstance(model_or_config, NuClickNet) else _check_config(model_or_config)
    rgb = as_rgb(image, "image")
    chans = [_normalise(rgb)]
    if cfg["context"] == "hovernet":
        from ..devices import resolve_device
        from .hovernet import load_model as hv_load
        from .hovernet import predict_maps

        dev = resolve_device(device)
        maps = predict_maps(hv_load(_hovernet_path(cfg), dev), rgb, dev, progress=progress, should_stop=should_stop)
        chans.append(_context_from_maps(maps))
    elif progress is not None:
        progress(1, 1, "image")
    return np.concatenate(chans, 0)


#: The dihedral transforms of a square patch, in the order test-time augmentation uses them (``tta = k``: the
#: first ``k``): identity, the two flips, the half turn, then the transposes and quarter turns. Each is
#: ``(flip dims, transpose)`` applied to the last two axes; its inverse undoes the transpose first.
_DIHEDRAL = (((), False), ((-1,), False), ((-2,), False), ((-2, -1), False),
             ((), True), ((-1,), True), ((-2,), True), ((-2, -1), True))


def _dihedral(x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
    dims, tr = _DIHEDRAL[k]
    if inverse:
        x = x.transpose(-2, -1) if tr else x
        return torch.flip(x, dims) if dims else x
    x = torch.flip(x, dims) if dims else x
    return x.transpose(-2, -1) if tr else x


def predict_patches(model: NuClickNet, inputs: np.ndarray, device="cpu", batch: int = 128, tta: int = 1) -> np.ndarray:
    """Nucleus probabilities (n, S, S) float32 of the inputs from :func:`patch_inputs` (model in eval mode).

    ``tta`` (1-8): the probabilities averaged over the first ``tta`` dihedral transforms of each patch (image and
    click maps transformed together, each output transformed back; :data:`_DIHEDRAL`); each costs one more pass of
    the network."""
    if isinstance(tta, bool) or not isinstance(tta, (int, np.integer)) or not 1 <= tta <= len(_DIHEDRAL):
        raise ValueError(f"tta must be an integer in [1, {len(_DIHEDRAL)}], got {tta!r}")
    out = np.zeros((len(inputs),) + inputs.shape[2:], np.float32)
    was = model.training
    if was:  # (switching modes walks every submodule: not on every click)
        model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(inputs), batch):
                x = torch.from_numpy(np.ascontiguousarray(inputs[s : s + batch])).to(device)
                if tta == 1:
                    prob = torch.sigmoid(model(x))
                else:  # all transforms in one batch: one call of the network
                    xs = torch.cat([_dihedral(x, k) for k in range(tta)])
                    ps = torch.sigmoid(model(xs)).float().chunk(tta)
                    prob = sum(_dihedral(q, k, inverse=True) for k, q in enumerate(ps)) / tta
                out[s : s + batch] = prob[:, 0].float().cpu().numpy()
    finally:
        if was:
            model.train()
    return out


# ----------------------------------------------------------------------------------------------------------------
# training: targets, collate, loss


def _crop_rng(image: np.ndarray, labels: np.ndarray) -> np.random.Generator:
    """A generator seeded by the crop's content (targets gets no seed; the crops come from the seeded loop)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(labels).data)
    h.update(np.ascontiguousarray(image[::5, ::5]).data)
    return np.random.default_rng(int.from_bytes(h.digest(), "little"))


def targets(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """NuClick's samples of one training crop (see the module docstring).

    Returns ``points`` (M x 2 float32: a jittered click on every nucleus of the crop, some dropped, and the
    second clicks), ``own`` (K int64: the clicked nuclei's indices into ``points``, never dropped) and ``masks``
    (K x H x W bool: their masks; for a nucleus clicked twice the part nearer its own click).
    K = min(:data:`CLICKS_PER_CROP`, nuclei of at least :data:`MIN_AREA` px); 0 for a crop without nuclei.
    """
    from ..points import centroids

    lab = np.asarray(labels)
    rng = _crop_rng(np.asarray(image), lab)
    pts, ids = centroids(lab, return_ids=True)
    h, w = lab.shape
    if len(ids) == 0:
        return {"points": np.zeros((0, 2), np.float32), "own": np.zeros(0, np.int64),
                "masks": np.zeros((0, h, w), bool)}
    area = np.bincount(lab.ravel().astype(np.intp))[ids]
    cand = np.flatnonzero(area >= MIN_AREA)
    k = min(CLICKS_PER_CROP, cand.size)
    own = np.sort(rng.choice(cand, size=k, replace=False)) if k else np.zeros(0, np.int64)
    s = rng.uniform(0, JITTER, len(pts))
    clicks = pts + rng.normal(0, 1, pts.shape) * s[:, None]
    clicks = np.clip(clicks, 0, [h - 1, w - 1])
    keep = rng.random(len(pts)) >= rng.uniform(0, DROP)
    keep[own] = True
    new_index = np.cumsum(keep) - 1
    masks = lab[None] == ids[own][:, None, None]
    extra = []
    for i in np.flatnonzero(rng.random(own.size) < DOUBLE):  # a second click on the nucleus: it is split
        yy, xx = np.nonzero(masks[i])
        c = clicks[own[i]]
        d2 = (yy - c[0]) ** 2 + (xx - c[1]) ** 2
        far = np.flatnonzero(d2 >= 9)
        if far.size == 0:
            continue
        q = np.array([yy[far], xx[far]], np.float64)[:, int(rng.integers(far.size))]
        extra.append(q)
        nearer = d2 <= (yy - q[0]) ** 2 + (xx - q[1]) ** 2
        masks[i] = False
        masks[i, yy[nearer], xx[nearer]] = True
    points = clicks[keep]
    if extra:
        points = np.concatenate([points, np.array(extra)])
    return {"points": points.astype(np.float32), "own": new_index[own].astype(np.int64), "masks": masks}


def collate(samples, device=None) -> dict:
    """A batch from ``(image_uint8, labels, targets)`` samples: ``image`` (N x 3 x H x W float in [0, 1] on
    ``device``) and, per sample, the numpy ``points``, ``own`` and ``masks`` (the patches are cut in :func:`loss`,
    which knows the model's patch size)."""
    imgs = np.stack([np.asarray(s[0]) for s in samples])
    return {"image": torch.from_numpy(imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0).to(device),
            "rgb": imgs, "points": [s[2]["points"] for s in samples], "own": [s[2]["own"] for s in samples],
            "masks": [s[2]["masks"] for s in samples]}


def _mask_patches(masks: np.ndarray, corners: np.ndarray, patch: int) -> np.ndarray:
    k, h, w = masks.shape
    out = np.zeros((k, patch, patch), np.float32)
    for i in range(k):
        r0, c0 = corners[i]
        rr0, rr1, cc0, cc1 = max(r0, 0), min(r0 + patch, h), max(c0, 0), min(c0 + patch, w)
        if rr0 < rr1 and cc0 < cc1:
            out[i, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = masks[i, rr0:rr1, cc0:cc1]
    return out


def batch_inputs(model: NuClickNet, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The patches of a :func:`collate` batch: inputs (B x C x S x S) and target masks (B x S x S) on the model's
    device."""
    cfg = model.config
    patch, sigma = int(cfg["patch"]), float(cfg["sigma"])
    ctx = _hovernet_batch(cfg, batch["image"]) if cfg["context"] == "hovernet" else None
    xs, ys = [], []
    for n, rgb in enumerate(batch["rgb"]):
        own = batch["own"][n]
        if own.size == 0:
            continue
        ch = _normalise(rgb)
        if ctx is not None:
            ch = np.concatenate([ch, ctx[n]], 0)
        pts = batch["points"][n]
        xs.append(patch_inputs(ch, pts, own, patch=patch, sigma=sigma))
        ys.append(_mask_patches(batch["masks"][n], click_windows(pts[own], patch), patch))
    dev = next(model.parameters()).device
    if not xs:
        c = in_channels(cfg)
        return torch.zeros((0, c, patch, patch), device=dev), torch.zeros((0, patch, patch), device=dev)
    return torch.from_numpy(np.concatenate(xs)).to(dev), torch.from_numpy(np.concatenate(ys)).to(dev)


def loss(model: NuClickNet, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Binary cross-entropy + soft Dice (per patch, averaged) of the clicked nuclei's masks."""
    x, y = batch_inputs(model, batch)
    if len(x) == 0:  # crops without nuclei: a zero loss that still has a graph
        z = sum(p.sum() for p in model.parameters()) * 0.0
        return z, {"loss": 0.0, "bce": 0.0, "dice": 0.0, "patches": 0.0}
    logits = model(x)[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, y)
    p = torch.sigmoid(logits)
    dice = (1 - (2 * (p * y).sum((1, 2)) + 1.0) / (p.sum((1, 2)) + y.sum((1, 2)) + 1.0)).mean()
    total = bce + dice
    return total, {"loss": float(total.detach()), "bce": float(bce.detach()), "dice": float(dice.detach()),
                   "patches": float(len(x))}


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and inference


def default_checkpoint() -> Path:
    """The shipped checkpoint's path (``benchmarks/train_nuclick.py --split bench``, 20000 steps; docs/masks.md)."""
    return Path(__file__).resolve().parents[1] / "data" / "models" / "nuclick_monuseg.pt"


_MODELS: dict = {}


def load_model(checkpoint, device) -> NuClickNet:
    """The model of a nuclick checkpoint on ``device`` (eval mode), cached per (path, modification time, device).
    A missing file is a ``ValueError`` that says how to train one."""
    from ..models import load_checkpoint

    path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    if not path.is_file():
        if checkpoint is None:
            raise ValueError(f"the shipped nuclick model {path} is missing (a damaged install?): train one with "
                             "`nucsynth train --model nuclick --images DIR --labels DIR --steps N --out nuclick.pt` "
                             "(or benchmarks/train_nuclick.py) and pass checkpoint=")
        raise ValueError(f"nuclick checkpoint {path} does not exist")
    key = (str(path.resolve()), path.stat().st_mtime, str(device))
    if key not in _MODELS:
        ck = load_checkpoint(path, kind="nuclick")
        model = build(dict(ck["config"]))
        model.load_state_dict(ck["state_dict"])
        model.to(device).eval()
        _MODELS.clear()
        _MODELS[key] = model
    return _MODELS[key]


def predict(model: NuClickNet, image: np.ndarray, device, tta: bool = False, progress=None, should_stop=None,
            points=None, **params) -> np.ndarray:
    """The labels of the nuclei under ``points`` (N x 2, row/col; id = point index + 1): the image-wide fit of
    :func:`napari_nucsynth.annotate.fit_masks` with this model; ``params``: ``threshold``, ``snap`` (see the
    ``nuclick`` fitting method) and ``tta`` (an integer: dihedral transforms averaged per patch). NuClick needs the
    clicks: without ``points`` it is a ``ValueError``. The segmenters' boolean ``tta`` is refused: pass
    ``tta=<number of transforms>`` as a parameter instead."""
    if points is None:
        raise ValueError("nuclick segments the nuclei under clicked points: pass points= (N x 2, row/col), e.g. "
                         "napari_nucsynth.annotate.fit_masks(image, points, method='nuclick', checkpoint=...)")
    if tta:
        raise ValueError("nuclick has no test-time augmentation")
    unknown = set(params) - {"threshold", "snap", "tta"}
    if unknown:
        raise ValueError(f"unknown nuclick parameter(s) {sorted(unknown)}; known: ['snap', 'threshold', 'tta']")
    from ..annotate import MaskFitter, nuclick_maps

    maps = nuclick_maps(model, image, device=device, progress=progress, should_stop=should_stop, **params)
    fitter = MaskFitter(maps, seed=0)
    return fitter.reset(points)


def validate(model: NuClickNet, images, labels, device) -> dict:
    """AJI, PQ and Dice (means over the pairs) of the masks fitted to every true centroid of each held-out pair."""
    from ..metrics import instance_metrics
    from ..points import centroids

    res = [instance_metrics(lb, predict(model, im, device, points=centroids(lb))) for im, lb in zip(images, labels)]
    return {k: float(np.mean([r[k] for r in res])) for k in ("aji", "pq", "dice")}


SPEC = register_model(ModelSpec(kind="nuclick", build=build, default_config=default_config, targets=targets,
                                loss=loss, predict=predict, collate=collate, validate=validate))
