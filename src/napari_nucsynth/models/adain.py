"""AdaIN refine-synthesis (Gong et al., WACV 2021): a classic render of the masks, restyled to a reference tile.

Gong et al. make a synthetic H&E tile in two steps: real nuclei fused into the masks over a background (the
classic renderer, :mod:`napari_nucsynth.render.classic`), then an AdaIN style-transfer network (Huang & Belongie,
ICCV 2017) that takes that fusion as *content* and a real tile as *style*. This module holds that network, its
losses, its training hooks and its inference on images of any size.

Network (:class:`AdaINModel`)
    - **Encoder**: VGG-19 to ``relu4_1`` (:func:`napari_nucsynth.models.vgg.load_vgg19`), frozen, returning
      ``relu1_1`` (stride 1, 64 channels), ``relu2_1`` (2, 128), ``relu3_1`` (4, 256) and ``relu4_1`` (8, 512).
      It is a submodule, so its weights are saved in the checkpoint: a trained model renders the same on a machine
      without ImageNet weights. Which weights it holds (``encoder.source``: ``"imagenet:<file>"`` or the documented
      seeded fallback ``"random:seed0"``) travels with the state dict (the model's extra state) and is written to
      ``config["vgg"]`` by :func:`build`.
    - **AdaIN at every level**: ``t_k = alpha * (sigma_s (c_k - mu_c) / sigma_c + mu_s) + (1 - alpha) * c_k`` with
      the per-channel means and standard deviations of the content's and the style's features at level ``k``.
    - **Decoder** (:class:`SkipDecoder`): the mirror of the encoder (3 x 3 reflection-padded convolutions and ReLUs,
      nearest 2x upsampling: ``relu4_1 -> relu3_1 -> relu2_1 -> relu1_1 -> RGB``) with a **skip connection at each
      level**: the level's AdaIN-ed features, projected by a 1 x 1 convolution, are concatenated to the upsampled
      path. ``config["width"]`` scales the decoder's channels (1.0: 256/128/64 as VGG; tests use a tiny decoder).

Why the skips carry AdaIN-ed features, not the content's own
    Huang & Belongie's decoder sees only ``relu4_1`` (stride 8): nuclei of 5-10 px are blurred and shifted, and the
    output no longer matches the instance labels it is meant to illustrate. Skip connections bring the content's
    geometry back at full resolution, but a plain skip of the content's ``relu1_1`` (which holds nearly the whole
    image) lets the decoder copy the content's colours and ignore the style: the style loss must then fight the
    skip. Here every path into the decoder is AdaIN-ed first (as WCT2, Yoo et al. ICCV 2019, also transforms the
    high-frequency components it passes through its wavelet skips, and as the photorealistic "AdaIN with skip
    connections" variants do): each skip already has the style's first- and second-order statistics at its
    own level while keeping the content's layout, so the easiest thing for the decoder is to invert the stylised
    features, which keeps edges where the labels put them *and* transfers colour (``relu1_1``), local contrast and
    texture (``relu2_1``, ``relu3_1``). ``alpha`` blends every level, so ``alpha=0`` reconstructs the content.
    The loss itself (below) does not demand pixel alignment (``relu4_1`` is coarse, the style terms are global):
    alignment comes from the architecture making inversion the cheapest solution, and the tests check it (an edge
    off the pooling grid stays within a pixel after a few dozen steps of a tiny decoder).

Losses (:func:`adain_losses`)
    Huang & Belongie's: content loss = MSE between the output's ``relu4_1`` and the AdaIN target ``t_4``; style loss
    = sum over ``relu1_1..relu4_1`` of the MSE of the per-channel means plus that of the standard deviations
    between the output and the style; total = content + ``style_weight`` x style, ``style_weight = 10`` (Gong et
    al.'s setting).

Training pairs (the :class:`~napari_nucsynth.models.ModelSpec` hooks used by :func:`napari_nucsynth.train.train`)
    The style of sample ``i`` is the (real, augmented) crop ``i - 1`` of the batch (``roll`` by one; a batch of one
    styles a crop with itself). Its content is the crop itself or, for a share ``config["classic_fraction"]`` of
    the samples (0.5 by default), the classic render of the crop's labels in the crop's own style: the input the
    model sees at inference. That render of a 256-px crop costs about 50 ms on a CPU core (the reference analysis
    of so small a tile is cheap), against seconds for a training step of VGG-19 on the CPU; on a GPU it is the
    larger cost, so lower the fraction there. The choice and the render's seed are drawn from a hash of the crop,
    so they follow the training loop's seed and a resumed run repeats them. :func:`validate` reports these losses
    on held-out pairs (centre crops, each styled by the next image's); :func:`preview` renders one held-out pair.

Inference (:func:`stylize`) on images of any size
    The image is padded to a multiple of 8 (VGG's three poolings; at least 16 px) and run in one piece up to
    ``tile`` px, else in tiles of ``tile`` px that start at multiples of 8 (the pooling grid of every tile is the
    whole image's) and overlap by ``2 * HALO``; each output pixel is taken from the one tile whose core (the tile
    less ``HALO`` px on inner sides) holds it. ``HALO = 64`` px exceeds the network's receptive-field radius
    (``relu4_1``'s is 37 px; through the decoder the output's is at most 59 px, measured from the support of the
    gradient in the tests), so every kept pixel sees exactly what it would in a one-piece run. AdaIN normalises by
    the *whole image's* content statistics, not each tile's (tile statistics would differ and leave seams): a tiled
    run first accumulates them over the tiles' cores (one more encoder pass), then restyles and decodes, so a tiled
    output equals the one-piece output up to float rounding (tested). Blending tiles
    (:func:`napari_nucsynth.segment._tiling.predict_dense`) would not give that: its tiles see per-tile statistics
    and its seams are averaged, not avoided. Deterministic: no random draw at inference.

Cost
    A 256 x 256 render on one CPU core is dominated by the fixed encoder (VGG-19 to ``relu4_1``, about 16 GMAC):
    with the default ``width`` 0.25 the decoder adds about 15 %, the classic render about 10 ms. The reference's
    statistics are computed once per reference (the renderer caches them).
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .._checks import as_labels, as_rgb
from . import ModelSpec, register_model
from .vgg import VGGEncoder, find_vgg19_weights, load_vgg19

__all__ = [
    "DEFAULT_LR", "HALO", "LAYERS", "SPEC", "STRIDES", "TILE", "AdaINModel", "SkipDecoder", "adain", "adain_losses", "build",
    "collate", "default_config", "feature_stats", "loss", "mean_std", "optimizers", "predict", "preview",
    "stylize", "targets", "training_content", "validate",
]

#: the encoder's output layers and their strides
LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
STRIDES = (1, 2, 4, 8)
#: the variance floor of the feature statistics
EPS = 1e-5
#: px kept from each tile's inner borders at inference: more than the network's receptive-field radius, a multiple of 8
HALO = 64
#: Adam's peak learning rate when the trainer is given none (``ModelSpec.default_lr``): Huang & Belongie's 1e-4
#: is for 160,000 iterations; the runs here are a few thousand steps under the loop's warm-up and cosine decay,
#: where a small decoder learns much faster at 1e-3
DEFAULT_LR = 1e-3
#: default tile size at inference (px, a multiple of 8): images up to this size run in one piece
TILE = 1024

Stats = list[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------------------------
# AdaIN


def mean_std(feat: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and standard deviation (biased, ``sqrt(var + eps)``) of N x C x H x W
    features, each N x C x 1 x 1."""
    mean = feat.mean((2, 3), keepdim=True)
    var = feat.var((2, 3), keepdim=True, unbiased=False)
    return mean, (var + eps).sqrt()


def adain(content: torch.Tensor, style_mean: torch.Tensor, style_std: torch.Tensor, *,
          content_mean: torch.Tensor | None = None, content_std: torch.Tensor | None = None,
          alpha: float = 1.0) -> torch.Tensor:
    """Adaptive instance normalisation: ``content`` renormalised to the style's per-channel statistics, blended
    with itself by ``alpha`` (1: fully stylised, 0: unchanged). The content's statistics are its own unless given
    (a tiled run gives the whole image's)."""
    if content_mean is None or content_std is None:
        content_mean, content_std = mean_std(content)
    t = (content - content_mean) / content_std * style_std + style_mean
    if alpha == 1.0:
        return t
    return alpha * t + (1.0 - alpha) * content


# ----------------------------------------------------------------------------------------------------------------
# the network


def _conv(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SkipDecoder(nn.Module):
    """VGG's mirror from ``relu4_1`` to RGB with a 1 x 1-projected skip of each shallower level (see the module
    docstring). Channels ``256w, 128w, 64w`` at strides 4, 2, 1 (at least 4 each), ``w = width``.

    ``forward(feats)`` takes the four (AdaIN-ed) levels ``[relu1_1, relu2_1, relu3_1, relu4_1]`` and returns
    N x 3 x H x W RGB in about [0, 1] (unclamped; :func:`stylize` clamps), ``H x W`` the ``relu1_1`` size."""

    def __init__(self, width: float = 0.25):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be a positive multiplier of the decoder's channels, got {width!r}")
        c1, c2, c3 = (max(4, round(n * width)) for n in (64, 128, 256))
        self.channels = (c1, c2, c3)
        self.head = _conv(512, c3)                                    # stride 8 (mirror of conv4_1)
        self.skip3, self.skip2, self.skip1 = nn.Conv2d(256, c3, 1), nn.Conv2d(128, c2, 1), nn.Conv2d(64, c1, 1)
        self.dec3 = nn.Sequential(_conv(2 * c3, c3), _conv(c3, c2))   # stride 4 (conv3_x)
        self.dec2 = nn.Sequential(_conv(2 * c2, c2), _conv(c2, c1))   # stride 2 (conv2_x)
        self.dec1 = nn.Sequential(_conv(2 * c1, c1), _conv(c1, 3, relu=False))  # stride 1 (conv1_x)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3, f4 = feats
        x = self.head(f4)
        for dec, skip, f in ((self.dec3, self.skip3, f3), (self.dec2, self.skip2, f2), (self.dec1, self.skip1, f1)):
            x = F.interpolate(x, size=f.shape[-2:], mode="nearest")
            x = dec(torch.cat([x, skip(f)], 1))
        return x


class AdaINModel(nn.Module):
    """Frozen VGG-19 encoder + AdaIN at every level + :class:`SkipDecoder`.

    ``forward(content, style, alpha=1.0)`` (N x 3 x H x W RGB in [0, 1] each; style of any size) returns the
    stylised content, N x 3 x H x W (H, W multiples of 8 keep the decoder's upsampling exact; others work).
    ``vgg_source`` says which VGG-19 weights the encoder holds; it is saved with the state dict.
    """

    def __init__(self, encoder: VGGEncoder, width: float = 0.25, config: dict | None = None):
        super().__init__()
        if tuple(encoder.layers) != LAYERS:
            raise ValueError(f"the AdaIN encoder must return the layers {LAYERS}, got {encoder.layers}")
        self.encoder = encoder
        self.decoder = SkipDecoder(width)
        self.config = dict(config or {})

    @property
    def vgg_source(self) -> str:
        return self.encoder.source

    # the VGG weights' provenance travels with the state dict (a uint8 tensor, so that the training loop's
    # ``v.detach().cpu()`` and ``torch.load(weights_only=True)`` take it like any other entry)
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(self.encoder.source.encode("utf-8")), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            self.encoder.source = bytes(state.to(torch.uint8).tolist()).decode("utf-8")

    def stylised_features(self, content_feats: Sequence[torch.Tensor], style_stats: Stats, *, alpha: float = 1.0,
                          content_stats: Stats | None = None) -> list[torch.Tensor]:
        """AdaIN of each level of ``content_feats`` to ``style_stats`` (a (mean, std) pair per level)."""
        out = []
        for k, f in enumerate(content_feats):
            cm, cs = content_stats[k] if content_stats is not None else (None, None)
            out.append(adain(f, *style_stats[k], content_mean=cm, content_std=cs, alpha=alpha))
        return out

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        stats = [mean_std(f) for f in self.encoder(style)]
        return self.decoder(self.stylised_features(self.encoder(content), stats, alpha=alpha))


def adain_losses(model: AdaINModel, content: torch.Tensor, style: torch.Tensor, *,
                 style_weight: float | None = None) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Huang & Belongie's losses of one batch: ``(total, logs, output)``.

    ``content`` and ``style`` are N x 3 x H x W in [0, 1] (same N; style may differ in size). Content loss: MSE of
    the output's ``relu4_1`` to the AdaIN target; style loss: sum over the four levels of the MSE of per-channel
    means and of standard deviations; total = content + ``style_weight`` x style (the model's
    ``config["style_weight"]``, 10, when None). Logs: ``loss``, ``content``, ``style`` (floats)."""
    sw = float(model.config.get("style_weight", 10.0) if style_weight is None else style_weight)
    n = content.shape[0]
    if content.shape[-2:] == style.shape[-2:]:
        feats = model.encoder(torch.cat([content, style]))
        c_feats, s_feats = [f[:n] for f in feats], [f[n:] for f in feats]
    else:
        c_feats, s_feats = model.encoder(content), model.encoder(style)
    s_stats = [mean_std(f) for f in s_feats]
    targets_ = model.stylised_features(c_feats, s_stats)
    out = model.decoder(targets_)
    o_feats = model.encoder(out)
    content_loss = F.mse_loss(o_feats[-1], targets_[-1])
    style_loss = out.new_zeros(())
    for f, (sm, ss) in zip(o_feats, s_stats):
        om, os_ = mean_std(f)
        style_loss = style_loss + F.mse_loss(om, sm) + F.mse_loss(os_, ss)
    total = content_loss + sw * style_loss
    logs = {"loss": float(total.detach()), "content": float(content_loss.detach()),
            "style": float(style_loss.detach())}
    return total, logs, out


# ----------------------------------------------------------------------------------------------------------------
# building (the encoder is loaded once per weights file and copied: VGG-19's construction takes about a second)

_ENCODERS: OrderedDict = OrderedDict()


def _encoder(weights) -> VGGEncoder:
    """A fresh copy of the encoder for ``weights`` ("auto", "random", None = "random", or a file)."""
    path = None if weights in (None, "random") else find_vgg19_weights(weights)
    key = "random" if path is None else (str(path.resolve()), path.stat().st_mtime)
    if key not in _ENCODERS:
        _ENCODERS[key] = load_vgg19("random" if path is None else path, layers=LAYERS)
        while len(_ENCODERS) > 2:
            _ENCODERS.popitem(last=False)
    enc = copy.deepcopy(_ENCODERS[key])
    enc.source = _ENCODERS[key].source
    return enc


def default_config() -> dict:
    """``width`` (decoder channel multiplier), ``style_weight`` (10, Gong et al.), ``classic_fraction`` (share of
    training contents that are classic renders), ``pretrained`` (the VGG-19 weights: "auto", a file, or "random"; None = "random", used when the weights come
    from a checkpoint) and ``vgg`` (filled in by :func:`build`: the encoder's ``source``)."""
    return {"width": 0.25, "style_weight": 10.0, "classic_fraction": 0.5, "pretrained": "auto", "vgg": None}


def build(config: dict | None = None) -> AdaINModel:
    """The model of ``config`` (defaults filled in). When it loads VGG weights (``pretrained`` not None), it writes
    the encoder's ``source`` into ``config["vgg"]`` (the dict passed in), so the training loop's checkpoint
    records it; with ``pretrained=None`` the encoder (and its ``source``) comes from the state dict loaded next."""
    cfg = {**default_config(), **(config or {})}
    frac = float(cfg["classic_fraction"])
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"classic_fraction must be in [0, 1], got {frac!r}")
    enc = _encoder(cfg["pretrained"])
    model = AdaINModel(enc, width=float(cfg["width"]), config=cfg)
    if config is not None and cfg["pretrained"] is not None:
        config["vgg"] = enc.source
        model.config["vgg"] = enc.source
    return model


# ----------------------------------------------------------------------------------------------------------------
# training hooks


def targets(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Nothing per sample: the contents are made in :func:`loss` (they depend on the model's config) from the crops
    and labels that :func:`collate` keeps."""
    return {}


def collate(samples, device) -> dict:
    """``image`` (N x 3 x H x W float in [0, 1]) and ``style`` (the batch rolled by one: sample ``i`` is styled by
    crop ``i - 1``) on ``device``; ``rgb`` and ``labels``: the crops and their labels as numpy arrays."""
    rgb = [np.ascontiguousarray(s[0]) for s in samples]
    x = torch.from_numpy(np.stack(rgb).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)).to(device)
    return {"image": x, "style": x.roll(1, 0), "rgb": rgb, "labels": [np.asarray(s[1]) for s in samples]}


def _crop_draws(rgb: np.ndarray) -> tuple[float, int]:
    """A uniform number in [0, 1) and a seed, drawn from the crop's bytes (so they follow the training seed)."""
    h = hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=16).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64, int.from_bytes(h[8:12], "little")


def _classic_of(rgb: np.ndarray, lab: np.ndarray, seed: int) -> np.ndarray:
    """The classic render of ``lab`` in the style of ``rgb`` (its own labels as style labels); the crop itself when
    it has no nuclei to draw from."""
    from ..render.classic import ClassicRenderer

    if not np.asarray(lab).any():
        return rgb
    try:
        return ClassicRenderer()(lab, rgb, style_labels=lab, seed=seed)
    except ValueError:
        return rgb


def training_content(model: AdaINModel, batch: dict, *, fraction: float | None = None) -> torch.Tensor:
    """The batch's contents (N x 3 x H x W on the batch's device): each crop, or for a share ``fraction`` (the
    model's ``classic_fraction`` when None) of them its classic render (see the module docstring)."""
    frac = float(model.config.get("classic_fraction", 0.5) if fraction is None else fraction)
    if frac <= 0 or "rgb" not in batch:
        return batch["image"]
    out = batch["image"].clone()
    for i, (rgb, lab) in enumerate(zip(batch["rgb"], batch["labels"])):
        u, seed = _crop_draws(rgb)
        if u < frac:
            c = _classic_of(rgb, lab, seed)
            out[i] = torch.from_numpy(c.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)).to(out.device)
    return out


def loss(model: AdaINModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of a batch from :func:`collate`: contents by :func:`training_content` (or
    ``batch["content"]`` when given), styles ``batch["style"]``; see :func:`adain_losses`."""
    content = batch["content"] if "content" in batch else training_content(model, batch)
    total, logs, _ = adain_losses(model, content, batch["style"])
    return total, logs


def optimizers(model: AdaINModel, lr: float | None) -> dict:
    """Adam over the decoder (the encoder is frozen) at ``lr`` (:data:`DEFAULT_LR` when None; the training loop
    passes ``SPEC.default_lr`` when it is given none)."""
    lr = float(DEFAULT_LR if lr is None else lr)
    return {"opt": torch.optim.Adam(model.decoder.parameters(), lr=lr)}


def _centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    H, W = a.shape[:2]
    s = min(size, H, W) // 8 * 8  # VGG pools three times
    r, c = (H - s) // 2, (W - s) // 2
    return a[r : r + s, c : c + s]


def validate(model: AdaINModel, images, labels, device, *, crop: int = 256, max_pairs: int = 8) -> dict[str, float]:
    """Losses on held-out pairs: the centre crop (``crop`` px) of each image as content (its classic render when
    the model trains on some), styled by the next image's centre crop (its own corner crop when there is one
    image). Returns ``val_loss``, ``val_content``, ``val_style`` (means)."""
    imgs = [as_rgb(im, "validation image") for im in images][:max_pairs]
    labs = [as_labels(lb, "validation labels") for lb in labels][:max_pairs]
    pairs = [(im, lb) for im, lb in zip(imgs, labs) if min(im.shape[:2]) >= 16]  # relu4_1 at least 2 x 2
    if not pairs:
        return {}
    imgs, labs = [p[0] for p in pairs], [p[1] for p in pairs]
    use_classic = float(model.config.get("classic_fraction", 0.5)) > 0
    logs_all = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, (im, lb) in enumerate(zip(imgs, labs)):
            c, cl = _centre_crop(im, crop), _centre_crop(lb, crop)
            if use_classic:
                c = _classic_of(c, cl, seed=0)
            if len(imgs) > 1:
                s = _centre_crop(imgs[(i + 1) % len(imgs)], c.shape[0])
            else:
                s = im[: c.shape[0], : c.shape[1]]
            ct, st = (torch.from_numpy(a.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255.0)).to(device)
                      for a in (c, s))
            _, logs, _ = adain_losses(model, ct, st)
            logs_all.append(logs)
    model.train(was_training)
    return {f"val_{k}": float(np.mean([lg[k] for lg in logs_all])) for k in ("loss", "content", "style")}


def preview(model: AdaINModel, image, labels, device, *, crop: int = 256) -> np.ndarray:
    """What the model makes of one pair: the classic render of the centre crop's labels in the crop's style
    (seed 0), refined with the crop as style. RGB uint8, at most ``crop`` px square."""
    im, lb = _centre_crop(as_rgb(image, "image"), crop), _centre_crop(as_labels(labels, "labels"), crop)
    content = _classic_of(im, lb, seed=0)
    return stylize(model, content, im, device=device)


def predict(model, image, device, tta=False, progress=None, should_stop=None, **params):
    """AdaIN makes images, not labels: there is nothing to segment with it."""
    raise ValueError("'adain' is a generator (it renders images from masks), not a segmenter: use "
                     "napari_nucsynth.render.render(labels, style, method='adain', checkpoint=...) "
                     "or `nucsynth render --method adain`")


# ----------------------------------------------------------------------------------------------------------------
# inference on images of any size


def _tiles(length: int, tile: int, halo: int) -> list[tuple[int, int, int]]:
    """(start, core start, core end) of the tiles along one axis of a (padded) ``length``; starts and cores are
    multiples of 8 when ``length``, ``tile`` and ``halo`` are. The cores partition ``[0, length)`` and lie at
    least ``halo`` px inside their tile except at the ends."""
    if length <= tile:
        return [(0, 0, length)]
    stride = tile - 2 * halo
    starts = list(range(0, length - tile, stride)) + [length - tile]
    cuts = [0] + [s + halo for s in starts[1:]] + [length]
    return [(s, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def _to_tensor(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))[None].astype(np.float32)
                            / np.float32(255.0)).to(device)


def _pad8(img: np.ndarray) -> np.ndarray:
    """Pad (by mirroring, bottom and right) to multiples of 8 and at least 16 px: ``relu4_1`` is then at least
    2 x 2, which the decoder's reflection padding needs."""
    H, W = img.shape[:2]
    ph, pw = max(16 - H, -H % 8), max(16 - W, -W % 8)
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="symmetric") if ph or pw else img


def _check_tiling(tile: int, halo: int) -> tuple[int, int]:
    tile, halo = int(tile), int(halo)
    if tile % 8 or halo % 8 or halo < 0 or tile < 2 * halo + 8:
        raise ValueError(f"tile ({tile}) and halo ({halo}) must be multiples of 8 with tile >= 2 * halo + 8")
    return tile, halo


class _StatsSum:
    """Per-channel sums of the features of the unpadded region at each level, over the tiles' cores (float32 sums
    per tile on the device, accumulated in float64 on the CPU: MPS has no float64)."""

    def __init__(self, valid: tuple[int, int]):
        self.valid = valid
        self.s1 = [np.zeros(c) for c in (64, 128, 256, 512)]
        self.s2 = [np.zeros(c) for c in (64, 128, 256, 512)]
        self.n = [0] * 4

    def add(self, feats: Sequence[torch.Tensor], r0: int, ra: int, rb: int, c0: int, ca: int, cb: int) -> None:
        """Add the core ``[ra, rb) x [ca, cb)`` (image px) of the features of the tile starting at ``(r0, c0)``."""
        H, W = self.valid
        for k, f in enumerate(feats):
            s = STRIDES[k]
            i0, i1 = (ra - r0) // s, min(rb - r0, -(-H // s) * s - r0) // s
            j0, j1 = (ca - c0) // s, min(cb - c0, -(-W // s) * s - c0) // s
            if i1 <= i0 or j1 <= j0:
                continue
            reg = f[0, :, i0:i1, j0:j1]
            self.s1[k] += reg.sum((1, 2)).cpu().double().numpy()
            self.s2[k] += (reg * reg).sum((1, 2)).cpu().double().numpy()
            self.n[k] += (i1 - i0) * (j1 - j0)

    def stats(self, device) -> Stats:
        out = []
        for s1, s2, n in zip(self.s1, self.s2, self.n):
            mean = s1 / max(n, 1)
            var = np.maximum(s2 / max(n, 1) - mean * mean, 0.0)
            out.append((torch.from_numpy(mean).float().view(1, -1, 1, 1).to(device),
                        torch.from_numpy(np.sqrt(var + EPS)).float().view(1, -1, 1, 1).to(device)))
        return out


def _accumulate_stats(model: AdaINModel, padded: np.ndarray, valid: tuple[int, int], device, tile: int, halo: int,
                      tick: Callable[[], None]) -> Stats:
    """The whole image's per-channel (mean, std) at each level, from an encoder pass over the tiles."""
    Hp, Wp = padded.shape[:2]
    acc = _StatsSum(valid)
    for r0, ra, rb in _tiles(Hp, tile, halo):
        for c0, ca, cb in _tiles(Wp, tile, halo):
            tick()
            acc.add(model.encoder(_to_tensor(padded[r0 : r0 + tile, c0 : c0 + tile], device)), r0, ra, rb, c0, ca, cb)
    return acc.stats(device)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def feature_stats(model: AdaINModel, image, *, device=None, tile: int = TILE, halo: int = HALO,
                  should_stop: Callable[[], bool] | None = None) -> Stats:
    """Per-channel (mean, std) of the image's VGG features at each level (a style's statistics), over the whole
    image (tiled when larger than ``tile``). A list of four (1 x C x 1 x 1, 1 x C x 1 x 1) float32 pairs."""
    tile, halo = _check_tiling(tile, halo)
    img = as_rgb(image, "style")
    dev = _model_device(model) if device is None else torch.device(device)

    def tick() -> None:
        if should_stop is not None and should_stop():
            raise InterruptedError("render cancelled")

    model.eval()
    with torch.inference_mode():
        return _accumulate_stats(model, _pad8(img), img.shape[:2], dev, tile, halo, tick)


def stylize(model: AdaINModel, content, style, *, alpha: float = 1.0, device=None, tile: int = TILE,
            halo: int = HALO, progress: Callable[[int, int, str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Restyle ``content`` (RGB image of any size) to ``style`` (an RGB image, or its :func:`feature_stats`).

    Parameters
    ----------
    model : AdaINModel
        A trained model (put in eval mode here).
    content, style : arrays
        RGB uint8 images (converted by :func:`napari_nucsynth._checks.as_rgb`); ``style`` may instead be the
        statistics :func:`feature_stats` returned (to restyle many contents to one reference).
    alpha : float
        Content-style trade-off in [0, 1]: 1 fully stylised (default), 0 the decoder's reconstruction of the content.
    device : torch device, optional
        Where to run (the model's device when None).
    tile, halo : int
        Images up to ``tile`` px (after padding to a multiple of 8) run in one piece; larger ones in tiles of
        ``tile`` px keeping all but ``halo`` px of their inner borders (see the module docstring). Multiples of 8.
    progress, should_stop : callables, optional
        ``progress(done, total, what)`` once per tile and pass; ``should_stop()`` checked before each, raising
        ``InterruptedError``.

    Returns
    -------
    (H, W, 3) uint8 RGB array, aligned with ``content``.
    """
    tile, halo = _check_tiling(tile, halo)
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (1: fully stylised, 0: the content), got {alpha!r}")
    img = as_rgb(content, "content")
    dev = _model_device(model) if device is None else torch.device(device)
    model.eval()
    H, W = img.shape[:2]
    padded = _pad8(img)
    Hp, Wp = padded.shape[:2]
    rows, cols = _tiles(Hp, tile, halo), _tiles(Wp, tile, halo)
    one_piece = len(rows) == 1 and len(cols) == 1
    total = len(rows) * len(cols) * (1 if one_piece else 2)
    started = [0]

    def tick() -> None:  # before each tile pass: cancel, and report the passes done
        if should_stop is not None and should_stop():
            raise InterruptedError("render cancelled")
        if progress is not None and started[0]:
            progress(started[0], total, "AdaIN refinement")
        started[0] += 1

    out = np.empty((H, W, 3), np.uint8)
    with torch.inference_mode():
        if isinstance(style, (list, tuple)):
            s_stats = [(m.to(dev), s.to(dev)) for m, s in style]
        else:
            s_stats = feature_stats(model, style, device=dev, tile=tile, halo=halo, should_stop=should_stop)
        if one_piece:
            tick()
            feats = model.encoder(_to_tensor(padded, dev))
            acc = _StatsSum((H, W))
            acc.add(feats, 0, 0, Hp, 0, 0, Wp)
            c_stats = acc.stats(dev)
            y = model.decoder(model.stylised_features(feats, s_stats, alpha=alpha, content_stats=c_stats))
            out[:] = _to_uint8(y[0, :, :H, :W])
        else:
            c_stats = _accumulate_stats(model, padded, (H, W), dev, tile, halo, tick)
            for r0, ra, rb in rows:
                for c0, ca, cb in cols:
                    tick()
                    x = _to_tensor(padded[r0 : r0 + tile, c0 : c0 + tile], dev)
                    feats = model.encoder(x)
                    y = model.decoder(model.stylised_features(feats, s_stats, alpha=alpha, content_stats=c_stats))
                    rb_, cb_ = min(rb, H), min(cb, W)
                    if rb_ > ra and cb_ > ca:
                        out[ra:rb_, ca:cb_] = _to_uint8(y[0, :, ra - r0 : rb_ - r0, ca - c0 : cb_ - c0])
    if progress is not None:
        progress(total, total, "AdaIN refinement")
    return out


def _to_uint8(y: torch.Tensor) -> np.ndarray:
    """C x h x w float (RGB in [0, 1]) to h x w x 3 uint8."""
    return (y.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


SPEC = register_model(ModelSpec(kind="adain", build=build, default_config=default_config, targets=targets,
                                loss=loss, predict=predict, optimizers=optimizers, validate=validate,
                                preview=preview, collate=collate, default_lr=DEFAULT_LR))
