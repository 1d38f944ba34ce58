"""AdaIN refine-synthesis (Gong et al., WACV 2021) as a residual refinement of the classic pre-synthesis, trained on
the GAN core with histology features.

Gong et al. make a synthetic H&E tile in two steps: real nuclei of a reference fused into the masks over its
background (the pre-synthesis, :mod:`napari_nucsynth.presynthesis`), then an AdaIN network (Huang & Belongie, ICCV
2017) that refines that fusion in the reference's style. Here the refinement is built so that it can only improve
on the pre-synthesis where training says so:

Network (:class:`AdaINModel`)
    - **Encoder**: a frozen feature network (:func:`napari_nucsynth.models.features.load_features`): by default the
      shipped segmenter's ResNet-18 encoder, trained here on H&E, cut at ``stem`` (stride 2), ``layer1`` (4),
      ``layer2`` (8), ``layer3`` (16); ImageNet VGG-19 to ``relu4_1`` (``features="vgg19"``) only where its weights
      are present locally. It is a submodule (``feature_net``), so its weights travel in the checkpoint and a
      trained model renders the same anywhere; its ``source`` is saved with it and recorded in
      ``config["features_source"]``.
    - **AdaIN at every level**: ``t_k = alpha * (sigma_s (c_k - mu_c) / sigma_c + mu_s) + (1 - alpha) * c_k`` with
      the per-channel means and standard deviations of the content's and the reference's features at level ``k``.
    - **Residual decoder** (:class:`ResidualDecoder`): from the deepest AdaIN-ed level up through a skip of every
      shallower one (U-Net style), then at full resolution a convolution over the upsampled features and the
      content image itself, and a last convolution to a 3-channel **residual** that is added to the content.
      That last convolution starts at zero, so **at step 0 the model returns the classic render exactly** (tested),
      and training moves away from it only where the losses push.

Training (the GAN core, :mod:`napari_nucsynth.models.gan`)
    Each training crop is paired with the classic render of its own labels in its own style (computed in
    :func:`targets`, seeded by a hash of the crop, so a resumed run repeats it): the content is that render, the
    reference and the target are the real crop. Losses: hinge GAN against the core's multi-scale PatchGAN, which sees
    the nuclear mask beside the image (so it checks that nuclei are where the masks say); feature matching x
    ``lambda_feat``; a perceptual loss to the real crop in the encoder's features x ``lambda_perc``; the AdaIN style
    loss (means and standard deviations of the output's features against the reference's, every level) x
    ``style_weight``; Gong et al.'s content loss (the output's features against the AdaIN targets, every level)
    x ``content_weight``, which holds the pre-synthesis's nuclei where the masks put them. The decoder's moving average renders and ships. :func:`validate` reports, on held-out pairs,
    the perceptual distance to the real tile of the refined render and of the classic render it started from.

Inference (:func:`stylize`) on images of any size
    Padded to a multiple of the encoder's largest stride, run in one piece up to ``tile`` px, else in tiles whose
    cores partition the image and which keep ``halo`` px (more than the network's receptive-field radius; see
    :attr:`AdaINModel.halo`) of context on inner sides, so every kept pixel sees what it would in a one-piece run.
    AdaIN normalises by the whole image's statistics, accumulated over the tiles' cores first, so a tiled output
    equals the one-piece output up to rounding (tested). Deterministic: no random draw at inference.

Refinement strength
    ``stylize(..., strength=s)`` returns ``content + s * residual``: 0 is the classic render itself, 1 the network's
    full refinement. The default is the model's ``config["strength"]`` (1 when absent), which
    ``benchmarks/choose_adain_strength.py`` sets by a rule measured on training tiles only (realism against mask
    fidelity; see docs/generators.md). It is a render-time knob: training always uses the full residual.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .._checks import as_labels, as_rgb, as_strength
from . import gan
from .features import FeatureNet, load_features
from .gan import GAN_DEFAULTS, GANModel, MultiscaleDiscriminator

__all__ = [
    "DEFAULT_LR", "SPEC", "TILE", "AdaINModel", "ResidualDecoder", "adain", "adain_losses", "build",
    "check_strength", "classic_content", "default_config", "feature_stats", "mean_std", "model_strength", "preview",
    "stylize", "targets", "validate",
]

#: the variance floor of the feature statistics
EPS = 1e-5
#: the core's ``lr`` when the trainer is given none (generator at half, discriminator at twice): a refinement that
#: starts at the identity wants small steps
DEFAULT_LR = 2e-4
#: default tile size at inference (px): images up to this size run in one piece
TILE = 1024

Stats = list[tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------------------------
# AdaIN


def mean_std(feat: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and standard deviation (biased, ``sqrt(var + eps)``) of N x C x H x W
    features, each N x C x 1 x 1 (computed in float32)."""
    feat = feat.float()
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


def _conv(cin: int, cout: int, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, 3)]
    if act:
        layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


class ResidualDecoder(nn.Module):
    """From the encoder's AdaIN-ed levels (shallow to deep) and the content image to a residual image.

    Level ``k`` gets ``max(8, round(channels[k] * width))`` channels; the deepest is convolved, then at each
    shallower level the path is upsampled (nearest) to that level's size, concatenated with a 1 x 1 projection of
    the level and convolved twice; at full resolution the path is concatenated with the content and convolved, and
    a last 3 x 3 convolution, initialised to zero, gives the residual.
    """

    def __init__(self, channels: Sequence[int], width: float = 0.25):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be a positive multiplier of the decoder's channels, got {width!r}")
        ch = [max(8, round(c * width)) for c in channels]
        self.widths = tuple(ch)
        self.head = _conv(channels[-1], ch[-1])
        self.skips = nn.ModuleList(nn.Conv2d(channels[k], ch[k], 1) for k in range(len(channels) - 1))
        self.blocks = nn.ModuleList(nn.Sequential(_conv(ch[k + 1] + ch[k], ch[k]), _conv(ch[k], ch[k]))
                                    for k in range(len(channels) - 1))
        self.full = _conv(ch[0] + 3, ch[0])
        self.out = _conv(ch[0], 3, act=False)
        nn.init.zeros_(self.out[1].weight)  # the identity at step 0
        nn.init.zeros_(self.out[1].bias)

    def forward(self, feats: Sequence[torch.Tensor], content: torch.Tensor) -> torch.Tensor:
        x = self.head(feats[-1])
        for k in range(len(feats) - 2, -1, -1):
            x = F.interpolate(x, size=feats[k].shape[-2:], mode="nearest")
            x = self.blocks[k](torch.cat([x, self.skips[k](feats[k])], 1))
        x = F.interpolate(x, size=content.shape[-2:], mode="nearest")
        return self.out(self.full(torch.cat([x, content.to(x.dtype)], 1)))


class AdaINModel(GANModel):
    """Frozen encoder + AdaIN at every level + :class:`ResidualDecoder` over the content, and the GAN core's
    discriminator (nuclear mask + image).

    ``forward(content, style, alpha=1.0)`` (N x 3 x H x W RGB in [0, 1] each; style of any size) returns the
    refined content ``content + residual`` (unclamped; :func:`stylize` clamps). ``decoder`` trains; its moving
    average ``ema["decoder"]`` renders.
    """

    G_MODULES = ("decoder",)

    def __init__(self, encoder: FeatureNet, config: dict):
        super().__init__()
        self.config = dict(config)
        self.feature_net = encoder
        self.decoder = ResidualDecoder(encoder.channels, float(self.config["width"]))
        self.discriminator = MultiscaleDiscriminator(1 + 3, int(self.config["ndf"]), int(self.config["d_layers"]),
                                                     int(self.config["num_d"]))
        self.init_gan()

    @property
    def encoder(self) -> FeatureNet:
        return self.feature_net

    @property
    def features_source(self) -> str:
        return self.feature_net.source

    @property
    def multiple(self) -> int:
        """Inputs are padded to multiples of this (the encoder's largest stride, at least 2 px per deepest cell)."""
        return int(max(self.feature_net.strides))

    @property
    def halo(self) -> int:
        """Context (px) each inference tile keeps beyond its core: 12 cells of the deepest level, more than the
        receptive-field radius of encoder and decoder together (measured in the tests)."""
        return 12 * self.multiple

    def stylised_features(self, content_feats: Sequence[torch.Tensor], style_stats: Stats, *, alpha: float = 1.0,
                          content_stats: Stats | None = None) -> list[torch.Tensor]:
        """AdaIN of each level of ``content_feats`` to ``style_stats`` (a (mean, std) pair per level)."""
        out = []
        for k, f in enumerate(content_feats):
            cm, cs = content_stats[k] if content_stats is not None else (None, None)
            out.append(adain(f.float(), *style_stats[k], content_mean=cm, content_std=cs, alpha=alpha))
        return out

    def refine(self, content: torch.Tensor, style_stats: Stats, *, alpha: float = 1.0,
               content_stats: Stats | None = None, ema: bool = True) -> torch.Tensor:
        """``content + residual`` with the given reference statistics (the EMA decoder unless ``ema=False``)."""
        dec = self.ema["decoder"] if ema else self.decoder
        feats = self.stylised_features(self.feature_net(content), style_stats, alpha=alpha,
                                       content_stats=content_stats)
        return content + dec(feats, content).to(content.dtype)

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0,
                ema: bool = False) -> torch.Tensor:
        stats = [mean_std(f) for f in self.feature_net(style)]
        return self.refine(content, stats, alpha=alpha, ema=ema)

    # the GAN core's hooks
    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The nuclear mask (what the discriminator sees beside the image) and the real crop in [-1, 1]."""
        return batch["semantic"].float(), batch["image"].float() * 2 - 1

    def generate(self, batch: dict, cond, real, *, ema: bool = False) -> tuple[torch.Tensor, dict]:
        """The refined classic render (in [-1, 1]) of each crop, the crop as reference; extra loss: the AdaIN style
        loss x ``style_weight``."""
        style, content = batch["image"].float(), batch["content"].float()
        s_stats = [mean_std(f) for f in self.feature_net(style)]
        dec = self.ema["decoder"] if ema else self.decoder
        t = self.stylised_features(self.feature_net(content), s_stats)
        out = content + dec(t, content).to(content.dtype)
        extra = {}
        sw = float(self.config.get("style_weight", 0.0))
        cw = float(self.config.get("content_weight", 0.0))
        if sw or cw:
            o_feats = self.feature_net(out)
            if sw:
                extra["g_style"] = _style_loss(o_feats, s_stats) * sw
            if cw:
                extra["g_content"] = _content_loss(o_feats, t, self.config.get("perc_weights", ())) * cw
        return out * 2 - 1, extra


def _style_loss(o_feats: Sequence[torch.Tensor], s_stats: Stats) -> torch.Tensor:
    """Huang & Belongie's style loss: MSE of the per-channel means plus that of the standard deviations, summed
    over levels."""
    loss = 0
    for f, (sm, ss) in zip(o_feats, s_stats):
        om, os_ = mean_std(f)
        loss = loss + F.mse_loss(om, sm) + F.mse_loss(os_, ss)
    return loss


def _content_loss(o_feats: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                  weights: Sequence[float]) -> torch.Tensor:
    """Gong et al.'s content loss at every level: the weighted L1 (the perceptual loss's form and weighting, so
    the two weights compare) between the output's features and the AdaIN targets (the content's features in the
    reference's statistics), which holds the pre-synthesis's nuclei in place while the other losses restyle it."""
    w = list(weights) + [1.0] * (len(o_feats) - len(weights))
    return sum(wi * F.l1_loss(o.float(), tk.detach()) for wi, o, tk in zip(w, o_feats, targets))


def adain_losses(model: AdaINModel, content: torch.Tensor, style: torch.Tensor, *,
                 style_weight: float | None = None) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """The refinement's non-adversarial losses of a batch, ``(total, logs, output)`` (used by the joint loop,
    which brings its own discriminator): content loss (MSE of the output's deepest features to the AdaIN target)
    + ``style_weight`` x style loss (the model's ``style_weight`` when None). Inputs in [0, 1]; the live
    decoder."""
    sw = float(model.config.get("style_weight", 1.0) if style_weight is None else style_weight)
    s_stats = [mean_std(f) for f in model.feature_net(style)]
    c_feats = model.feature_net(content)
    t = model.stylised_features(c_feats, s_stats)
    out = content + model.decoder(t, content)
    o_feats = model.feature_net(out)
    content_loss = F.mse_loss(o_feats[-1].float(), t[-1])
    style_loss = _style_loss(o_feats, s_stats)
    total = content_loss + sw * style_loss
    return total, {"loss": float(total.detach()), "content": float(content_loss.detach()),
                   "style": float(style_loss.detach())}, out


# ----------------------------------------------------------------------------------------------------------------
# building


def default_config() -> dict:
    """``width`` (decoder channels as a share of the encoder's), ``style_weight``, ``content_weight`` (Gong et
    al.'s content loss to the AdaIN targets, :func:`_content_loss`), ``pretrained`` ("auto": build
    the encoder from the weights of the core's ``features`` network, which is adain's encoder and the network of
    its perceptual loss: ``"hovernet"``, ``"vgg19"`` where ImageNet weights are local, ``"vgg19-random"``; None: the
    weights come from a state dict loaded next) and the GAN core's keys (:data:`napari_nucsynth.models.gan.GAN_DEFAULTS`);
    ``features_source`` is filled in by :func:`build`; ``strength`` is the render-time share of the residual
    (:func:`stylize`; training ignores it)."""
    return {**GAN_DEFAULTS, "width": 0.25, "style_weight": 1.0, "content_weight": 0.0, "lambda_perc": 1.0,
            "pretrained": "auto", "features_source": None, "strength": 1.0}


def _skeleton(name: str) -> FeatureNet:
    """The encoder's structure with no trained weights (they come from a checkpoint)."""
    from .features import FEATURES

    if name == "hovernet" or str(name).startswith("hovernet:"):
        from .hovernet import HoVerNet

        with torch.random.fork_rng(devices=[]):
            net = HoVerNet(backbone="resnet18", width=8, pretrained=None)
        stages = [net.stem, nn.Sequential(net.pool, net.layer1), net.layer2, net.layer3]
        return FeatureNet(stages, ("stem", "layer1", "layer2", "layer3"), (64, 64, 128, 256), (2, 4, 8, 16),
                          "unloaded", mean=HoVerNet.MEAN, std=HoVerNet.STD)
    if name in ("vgg19", "vgg19-random"):
        return load_features("vgg19-random")
    raise ValueError(f"unknown adain encoder {name!r}; choose from {', '.join(FEATURES)}")


def build(config: dict | None = None) -> AdaINModel:
    """The model of ``config`` (defaults filled in). With ``pretrained`` not None it loads the encoder's weights
    and writes their ``source`` into ``config["features_source"]`` (the dict passed in, so the training loop's
    checkpoint records it); with ``pretrained=None`` the encoder's weights and source come from the state dict
    loaded next."""
    cfg = {**default_config(), **(config or {})}
    unknown = set(cfg) - set(default_config())
    if unknown:
        raise ValueError(f"unknown adain config key(s) {sorted(unknown)}; known: {sorted(default_config())}")
    if cfg["pretrained"] is None:
        enc = _skeleton(str(cfg["features"]))
    else:
        enc = load_features(str(cfg["features"]))
        cfg["features_source"] = enc.source
        if config is not None:
            config["features_source"] = enc.source
    return AdaINModel(enc, cfg)


# ----------------------------------------------------------------------------------------------------------------
# training hooks


def _crop_seed(rgb: np.ndarray) -> int:
    """A seed drawn from the crop's bytes (so it follows the training loop's seed and a resumed run repeats it)."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=4).digest(), "little")


def classic_content(rgb: np.ndarray, lab: np.ndarray, seed: int) -> np.ndarray:
    """The classic pre-synthesis of ``lab`` in the style of ``rgb`` (its own labels as style labels); the crop
    itself when it has no nuclei to draw from."""
    from ..presynthesis import ClassicRenderer

    if not np.asarray(lab).any():
        return rgb
    try:
        return ClassicRenderer()(lab, rgb, style_labels=lab, seed=seed)
    except ValueError:
        return rgb


def targets(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per training crop: ``content`` (3 x H x W float32 in [0, 1]: the classic render of the crop's labels in
    the crop's style) and ``semantic`` (1 x H x W float32 nuclear mask)."""
    c = classic_content(image, labels, _crop_seed(image))
    return {"content": np.ascontiguousarray(c.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0),
            "semantic": (np.asarray(labels) > 0)[None].astype(np.float32)}


def _centre_crop(a: np.ndarray, size: int, multiple: int) -> np.ndarray:
    H, W = a.shape[:2]
    s = max(multiple, min(size, H, W) // multiple * multiple)
    r, c = max(0, (H - s) // 2), max(0, (W - s) // 2)
    return a[r : r + s, c : c + s]


def validate(model: AdaINModel, images, labels, device, *, crop: int = 256, max_pairs: int = 6) -> dict[str, float]:
    """Held-out pairs (the centre ``crop`` of each): the classic render of its labels in its own style, refined by
    the EMA decoder; the mean perceptual distance (the encoder's features, the core's weighting) and L1 to the real
    crop of the refined render (``perc``, ``l1``) and of the classic render it started from (``perc_classic``,
    ``l1_classic``)."""
    net = model.feature_net
    w = model.config.get("perc_weights", ())
    rows = []
    with torch.no_grad():
        for im, lb in list(zip(images, labels))[:max_pairs]:
            im = _centre_crop(as_rgb(im, "validation image"), crop, model.multiple)
            lb = _centre_crop(as_labels(lb, "validation labels"), crop, model.multiple)
            content = classic_content(im, lb, seed=0)
            real_t, cont_t = (_to_tensor(a, device) for a in (im, content))
            out = model.refine(cont_t, [mean_std(f) for f in net(real_t)]).clamp(0, 1)
            rows.append((float(gan.perceptual(net, out, real_t, w)), float(gan.perceptual(net, cont_t, real_t, w)),
                         float((out - real_t).abs().mean()), float((cont_t - real_t).abs().mean())))
    if not rows:
        return {}
    m = np.mean(rows, axis=0)
    return {"perc": float(m[0]), "perc_classic": float(m[1]), "l1": float(m[2]), "l1_classic": float(m[3])}


def preview(model: AdaINModel, image, labels, device, *, crop: int = 256) -> np.ndarray:
    """One held-out pair side by side: the classic render of the centre crop's labels in the crop's style | its
    refinement | the real crop. RGB uint8."""
    im = _centre_crop(as_rgb(image, "image"), crop, model.multiple)
    lb = _centre_crop(as_labels(labels, "labels"), crop, model.multiple)
    content = classic_content(im, lb, seed=0)
    out = stylize(model, content, im, device=device)
    gap = np.full((im.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([content, gap, out, gap, im], 1)


# ----------------------------------------------------------------------------------------------------------------
# inference on images of any size


def _tiles(length: int, tile: int, halo: int, m: int) -> list[tuple[int, int, int]]:
    """(start, core start, core end) of the tiles along one axis of a (padded) ``length``; starts and cores are
    multiples of ``m`` when ``length``, ``tile`` and ``halo`` are. The cores partition ``[0, length)`` and lie at
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


def _pad(img: np.ndarray, m: int) -> np.ndarray:
    """Pad (by mirroring, bottom and right) to multiples of ``m`` and at least ``2 m`` px."""
    H, W = img.shape[:2]
    ph, pw = max(2 * m - H, -H % m), max(2 * m - W, -W % m)
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="symmetric") if ph or pw else img


def _check_tiling(model: AdaINModel, tile: int, halo: int | None) -> tuple[int, int]:
    m = model.multiple
    tile, halo = int(tile), int(model.halo if halo is None else halo)
    if tile % m or halo % m or halo < 0 or tile < 2 * halo + m:
        raise ValueError(f"tile ({tile}) and halo ({halo}) must be multiples of {m} with tile >= 2 * halo + {m}")
    return tile, halo


class _StatsSum:
    """Per-channel sums of the features of the unpadded region at each level, over the tiles' cores (float32 sums
    per tile on the device, accumulated in float64 on the CPU: MPS has no float64)."""

    def __init__(self, valid: tuple[int, int], channels: Sequence[int], strides: Sequence[int]):
        self.valid, self.strides = valid, tuple(strides)
        self.s1 = [np.zeros(c) for c in channels]
        self.s2 = [np.zeros(c) for c in channels]
        self.n = [0] * len(channels)

    def add(self, feats: Sequence[torch.Tensor], r0: int, ra: int, rb: int, c0: int, ca: int, cb: int) -> None:
        """Add the core ``[ra, rb) x [ca, cb)`` (image px) of the features of the tile starting at ``(r0, c0)``."""
        H, W = self.valid
        for k, f in enumerate(feats):
            s = self.strides[k]
            i0, i1 = (ra - r0) // s, min(rb - r0, -(-H // s) * s - r0) // s
            j0, j1 = (ca - c0) // s, min(cb - c0, -(-W // s) * s - c0) // s
            if i1 <= i0 or j1 <= j0:
                continue
            reg = f[0, :, i0:i1, j0:j1].float()
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
    net = model.feature_net
    acc = _StatsSum(valid, net.channels, net.strides)
    for r0, ra, rb in _tiles(Hp, tile, halo, model.multiple):
        for c0, ca, cb in _tiles(Wp, tile, halo, model.multiple):
            tick()
            acc.add(net(_to_tensor(padded[r0 : r0 + tile, c0 : c0 + tile], device)), r0, ra, rb, c0, ca, cb)
    return acc.stats(device)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def feature_stats(model: AdaINModel, image, *, device=None, tile: int = TILE, halo: int | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Stats:
    """Per-channel (mean, std) of the image's encoder features at each level (a reference's statistics), over the
    whole image (tiled when larger than ``tile``): a list of (1 x C x 1 x 1, 1 x C x 1 x 1) float32 pairs."""
    tile, halo = _check_tiling(model, tile, halo)
    img = as_rgb(image, "style")
    dev = _model_device(model) if device is None else torch.device(device)

    def tick() -> None:
        if should_stop is not None and should_stop():
            raise InterruptedError("render cancelled")

    model.eval()
    with torch.inference_mode():
        return _accumulate_stats(model, _pad(img, model.multiple), img.shape[:2], dev, tile, halo, tick)


def stylize(model: AdaINModel, content, style, *, alpha: float = 1.0, strength: float | None = None, device=None,
            tile: int = TILE, halo: int | None = None, progress: Callable[[int, int, str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Refine ``content`` (an RGB image of any size, e.g. a classic render) in the style of ``style`` (an RGB image,
    or its :func:`feature_stats`), by the model's EMA decoder.

    Parameters
    ----------
    model : AdaINModel
        A trained model (put in eval mode here).
    content, style : arrays
        RGB uint8 images (converted by :func:`napari_nucsynth._checks.as_rgb`); ``style`` may instead be the
        statistics :func:`feature_stats` returned (to refine many contents for one reference).
    alpha : float
        In [0, 1]: how far the encoder features are moved to the reference's statistics (1, default) before the
        decoder reads them; 0 keeps the content's own.
    strength : float, optional
        In [0, 1]: the share of the network's residual added to the content (0: the content itself, 1: the full
        refinement); default the model's ``config["strength"]`` (1 when the checkpoint has none).
    device : torch device, optional
        Where to run (the model's device when None).
    tile, halo : int
        Images up to ``tile`` px (after padding) run in one piece; larger ones in tiles of ``tile`` px keeping all
        but ``halo`` px (default :attr:`AdaINModel.halo`) of their inner borders. Multiples of
        :attr:`AdaINModel.multiple`.
    progress, should_stop : callables, optional
        ``progress(done, total, what)`` once per tile and pass; ``should_stop()`` checked before each, raising
        ``InterruptedError``.

    Returns
    -------
    (H, W, 3) uint8 RGB array, aligned with ``content``.
    """
    tile, halo = _check_tiling(model, tile, halo)
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (1: the reference's statistics, 0: the content's), got {alpha!r}")
    strength = model_strength(model) if strength is None else check_strength(strength)
    img = as_rgb(content, "content")
    dev = _model_device(model) if device is None else torch.device(device)
    model.eval()
    m = model.multiple
    H, W = img.shape[:2]
    padded = _pad(img, m)
    Hp, Wp = padded.shape[:2]
    rows, cols = _tiles(Hp, tile, halo, m), _tiles(Wp, tile, halo, m)
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
    net = model.feature_net
    with torch.inference_mode():
        if isinstance(style, (list, tuple)):
            s_stats = [(a.to(dev), b.to(dev)) for a, b in style]
        else:
            s_stats = feature_stats(model, style, device=dev, tile=tile, halo=halo, should_stop=should_stop)
        if one_piece:
            tick()
            x = _to_tensor(padded, dev)
            feats = net(x)
            acc = _StatsSum((H, W), net.channels, net.strides)
            acc.add(feats, 0, 0, Hp, 0, 0, Wp)
            c_stats = acc.stats(dev)
            t = model.stylised_features(feats, s_stats, alpha=alpha, content_stats=c_stats)
            y = x + strength * model.ema["decoder"](t, x)
            out[:] = _to_uint8(y[0, :, :H, :W])
        else:
            c_stats = _accumulate_stats(model, padded, (H, W), dev, tile, halo, tick)
            for r0, ra, rb in rows:
                for c0, ca, cb in cols:
                    tick()
                    x = _to_tensor(padded[r0 : r0 + tile, c0 : c0 + tile], dev)
                    t = model.stylised_features(net(x), s_stats, alpha=alpha, content_stats=c_stats)
                    y = x + strength * model.ema["decoder"](t, x)
                    rb_, cb_ = min(rb, H), min(cb, W)
                    if rb_ > ra and cb_ > ca:
                        out[ra:rb_, ca:cb_] = _to_uint8(y[0, :, ra - r0 : rb_ - r0, ca - c0 : cb_ - c0])
    if progress is not None:
        progress(total, total, "AdaIN refinement")
    return out


def check_strength(strength) -> float:
    """``strength`` as a float in [0, 1], else a ValueError that says what it means."""
    return as_strength(strength, "the classic render", "the full refinement")


def model_strength(model: AdaINModel) -> float:
    """The model's default refinement strength (``config["strength"]``; 1 for checkpoints saved without one)."""
    return check_strength(model.config.get("strength", 1.0))


def _to_uint8(y: torch.Tensor) -> np.ndarray:
    """C x h x w float (RGB in [0, 1]) to h x w x 3 uint8."""
    return (y.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


SPEC = gan.gan_spec("adain", build=build, default_config=default_config, targets=targets, validate=validate,
                    preview=preview, default_lr=DEFAULT_LR)
