"""Points2Image: an unpaired mask -> H&E generator (OASIS-style), so a tissue with no annotation can be learned.

Li, Ren, Ach and Gerig, "Microscopy Image Segmentation via Point and Shape Regularized Data Synthesis" (2023; the
"Points2Image" pipeline): nucleus points -> masks from a shape prior -> an image generator trained **without
paired data**, regularised so that each synthetic nucleus stays where its point says. Their generator is a
CycleGAN with a point loss on the reconstructed mask; this one follows the project's issue 21 and is built as
OASIS (Sushko et al., "You Only Need Adversarial Supervision for Semantic Image Synthesis", ICLR 2021), whose
segmentation-based discriminator needs no paired image for a mask, on the project's GAN core
(:mod:`napari_nucsynth.models.gan`: :class:`~napari_nucsynth.models.gan.GANModel`'s EMA, the core's two time-scale
Adam and bfloat16 autocast).

Data (unpaired; :func:`targets`, one call per training crop)
    - **masks**: a random layout (:func:`napari_nucsynth.points.random_points`, the point process fitted on
      MoNuSeg) and masks from the shape prior (:func:`napari_nucsynth.masks.sample_masks`), both seeded by a hash
      of the crop (:func:`crop_seed`), so a resumed run draws the same masks again;
    - **images**: real crops with no labels. The discriminator's per-pixel classes for them are pseudo-labels:
      :func:`napari_nucsynth.presynthesis.detect_nuclei` (Otsu on the smoothed haematoxylin density, no contour);
    - **style code** (:func:`style_code`): 12 label-free colour statistics of the real crop in HED optical density
      (mean and standard deviation of H, E and D inside the crop's Otsu nuclei and in the rest), scaled to about 1.

Generator (:class:`P2IGenerator`), fully convolutional, any size (multiples of 2^``n_up``, padded by the renderer)
    OASIS's: it starts at 1/2^``n_up`` resolution from a convolution of the (area-averaged) label map
    concatenated with noise, then one SPADE residual block per scale (parameter-free batch normalisation, then
    ``x * (1 + gamma) + beta`` with gamma and beta convolved from the label map; SPADE's ``ResnetBlock``: norm,
    LReLU, conv, twice, a learned shortcut when the width changes) with nearest upsampling in between, and a last
    LReLU, 3x3 convolution and tanh. The label map is 3 channels of the masks: semantic (nucleus or not),
    instance edges (so touching nuclei stay apart) and the medial-axis distance map
    (:func:`conditioning`). As in SIAN here, the normalisations of one block share the hidden convolution of the
    label map (each has its own gamma and beta), for speed on a CPU.

    - **3-D noise** (OASIS): ``z_dim`` channels of per-pixel standard normal noise, drawn at 1/2^``noise_down``
      resolution (by default a noise pixel covers 4 x 4 pixels, less than a nucleus), bilinearly resized to every
      block and concatenated to the label map wherever the label map enters (the input convolution and every
      SPADE), so the seed changes the texture, never the layout (which is the masks'). In training it is
      ``torch.randn``; at inference a hash of (seed, channel, global noise-pixel position)
      (:func:`napari_nucsynth.models.sian.hash_normal`), so a seed gives the same image whatever the tiling.
    - **style**: the style code goes through a small MLP to a vector that sets a per-channel ``gamma, beta`` of
      every normalisation and a bias of the input convolution; these start at zero (an untrained model ignores the
      style until training makes it matter).

Discriminator (:class:`UNetDiscriminator`), OASIS's segmentation-based one
    A small U-Net of residual blocks (spectral normalisation, no normalisation layers, average-pool down, nearest
    up, skip connections) that labels **every pixel** as one of ``1 + N`` classes: 0 = "fake", 1 = background,
    2 = nucleus. Losses (OASIS's (N+1)-class cross-entropy, classes balanced by their inverse frequency in the
    batch's label maps):

    - D: real crops -> their pseudo-labels (class-balanced); generated images -> "fake" at every pixel; optional
      LabelMix (``lambda_labelmix``: the real and the generated image mixed by a random choice per class region of
      the sampled masks; D's output on the mix must equal the same mix of its outputs, mean squared error);
    - G: generated images -> the classes of the masks they were made from (class-balanced), so D must find
      nuclei where the masks are and background elsewhere: adversarial supervision is also segmentation
      supervision.

Regularisation of the generator (both unpaired: they compare the render with its own masks and style code)
    - **point loss** (``lambda_point``, :func:`point_loss`): the haematoxylin optical density of the render,
      differentiable (:func:`hed_torch`), must be high around each nucleus's centroid (a Gaussian of
      ``point_sigma`` px) and low in the background (pixels more than 2 px from any mask), as a logistic
      classification whose threshold and scale come from the style code (halfway between the crop's nucleus and
      background H, a quarter of their difference per unit), the two sides weighted equally. It keeps each
      nucleus where its centroid says from the first steps, before the discriminator has learned anything;
    - **style loss** (``lambda_style``): :func:`style_code_torch` of the render (its masks as the nuclei) must
      equal the style code it was given (L1, in code units), so the style code sets the stain of nuclei and
      background; the nucleus half counts only where the masks hold at least :data:`MIN_FG` pixels.

Training
    Adam (0, 0.9) with the core's two time-scale rule (generator ``lr / 2``, discriminator ``2 lr``; with the
    default ``lr`` 2e-4 these are OASIS's 1e-4 and 4e-4), one D step and one G step per training step
    (:func:`train_step`, under the core's autocast), then the EMA of the generator, which renders and ships. No
    perceptual or feature-matching loss: there is no paired real image to compare with.

Inference (:func:`render`): the style code of the reference (its own labels as the nuclei when given, else Otsu),
seeded noise, windows with a halo beyond the generator's receptive field (:func:`halo`) cross-faded where they
overlap (the tiling of :mod:`napari_nucsynth.models.sian`), so a tiled render equals the one-piece render.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from .._checks import SeedLike, as_labels, as_rgb
from . import gan, register_model
from .gan import GANModel
from ._rendering import device_of, padded_conditioning, seed_int, to_uint8, window_model
from .sian import hash_normal

_to_uint8 = to_uint8  # the name the tests use

__all__ = [
    "COND_NC", "DEFAULT_LR", "MIN_FG", "N_CLASSES", "SPEC", "STYLE_NC", "P2IGenerator", "Points2Image",
    "UNetDiscriminator", "build", "centroid_map", "class_balanced_ce", "conditioning", "crop_seed", "default_config",
    "discriminator_loss", "generator_loss", "halo", "heatmap", "hed_torch", "point_loss", "preview", "receptive_radius",
    "render", "sample_layout", "stain_code_loss", "style_code", "style_code_torch", "targets", "train_step", "validate",
]

#: label-map channels: semantic, instance edges, medial-axis distance
COND_NC = 3
#: semantic classes of the discriminator besides "fake": background, nucleus
N_CLASSES = 2
#: length of the style code: mean and standard deviation of H, E, D, inside nuclei and outside
STYLE_NC = 12
#: scales that bring the code to about unit size (HED densities of MoNuSeg tiles: means 0.003-0.11, standard
#: deviations 0.004-0.04)
MEAN_SCALE, STD_SCALE = 20.0, 50.0
#: fewest pixels a nucleus (or background) region needs for its statistics; fewer: a quantile of H stands in
MIN_FG = 16
#: the core's ``lr`` when none is given: generator 1e-4, discriminator 4e-4 (OASIS's)
DEFAULT_LR = 2e-4
_LOG_EPS = math.log(1e-6)


def default_config() -> dict:
    """The default configuration (a 256 x 256 render takes about 0.1-0.2 s on one CPU thread).

    - ``ngf``: generator width at full resolution (doubling per scale, at most ``ngf_max``); ``n_up``: the number
      of upsamplings (the generator starts at 1/2^n_up); ``hidden``: width of each block's shared label-map
      convolution as a fraction of the block's input width (at least 8); ``spectral_g``: spectral normalisation of
      the generator's convolutions (OASIS does);
    - ``z_dim``: channels of 3-D noise (0: none); ``noise_down``: the noise is drawn at 1/2^noise_down resolution
      (at most ``n_up``); ``style_dim``: width of the style MLP;
    - ``ndf``, ``d_levels``: the U-Net discriminator's width and depth (it needs crops of multiples of
      2^d_levels);
    - ``lambda_labelmix`` (OASIS: 10; 0 here by default: it costs a third discriminator pass on a CPU),
      ``lambda_point``, ``point_sigma`` (px), ``lambda_style``;
    - the core's ``ema_decay`` and ``amp``; ``tile`` (px, larger renders go in windows) and ``blend`` (px of
      cross-fade between windows);
    - ``layout``: how many nuclei a training crop's masks get (:func:`targets`): "process" (MoNuSeg's point
      process) or "matched" (the real crop's own count of Otsu nuclei);
    - ``upsample``: how the generator doubles its resolution between blocks, "nearest" (OASIS's) or "bilinear" (no
      parameters either way, so a model can be fine-tuned from one to the other; docs/points2image.md: nearest drew
      the LabelMix model's cross-hatched backgrounds, and the bilinear fine-tune drew a finer hatch of its own).
    """
    return {
        "ngf": 16, "ngf_max": 128, "n_up": 3, "hidden": 0.5, "spectral_g": True,
        "z_dim": 8, "noise_down": 2, "style_dim": 32,
        "ndf": 16, "d_levels": 4,
        "lambda_labelmix": 0.0, "lambda_point": 2.0, "point_sigma": 2.0, "lambda_style": 2.0,
        "ema_decay": 0.999, "amp": "auto",
        "tile": 1024, "blend": 16, "layout": "process", "upsample": "nearest",
    }


# ----------------------------------------------------------------------------------------------------------------
# style code: label-free colour statistics in HED optical density


def _hed_matrix() -> np.ndarray:
    from skimage.color import hed_from_rgb

    return np.asarray(hed_from_rgb, np.float32)


def _regions(h: np.ndarray, nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus and background pixels: the nuclei's and the rest, each replaced by a quantile of ``h`` (top 15 %,
    bottom half) when it holds fewer than :data:`MIN_FG` pixels."""
    fg = nuclei > 0
    if fg.sum() < MIN_FG:
        fg = h >= np.quantile(h, 0.85)
    bg = ~fg
    if bg.sum() < MIN_FG:
        bg = h <= np.quantile(h, 0.5)
    return fg, bg


def style_code(image, nuclei=None) -> np.ndarray:
    """The style code of an H&E image: float32 (12,) = mean of H, E, D optical density inside the nuclei, mean in
    the background, standard deviation inside, standard deviation in the background (means x
    :data:`MEAN_SCALE`, deviations x :data:`STD_SCALE`).

    ``nuclei`` (labels or a mask of the image's shape) are the image's nuclei; when None they are detected
    (:func:`napari_nucsynth.presynthesis.detect_nuclei`: Otsu on the haematoxylin channel). Label-free and cheap
    (a 256 x 256 reference in about 0.01 s)."""
    from ..presynthesis import detect_nuclei
    from ..stain import rgb_to_hed

    rgb = as_rgb(image, "style")
    if nuclei is None:
        nuclei = detect_nuclei(rgb)
    nuc = np.asarray(nuclei)
    if nuc.shape != rgb.shape[:2]:
        raise ValueError(f"the style image's nuclei must have its shape {rgb.shape[:2]}, got {nuc.shape}")
    hed = rgb_to_hed(rgb).astype(np.float64)
    fg, bg = _regions(hed[..., 0], nuc)
    a, b = hed[fg], hed[bg]
    code = np.concatenate([a.mean(0) * MEAN_SCALE, b.mean(0) * MEAN_SCALE, a.std(0) * STD_SCALE,
                           b.std(0) * STD_SCALE])
    return code.astype(np.float32)


def hed_torch(rgb01: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`napari_nucsynth.stain.rgb_to_hed`: N x 3 x H x W RGB in [0, 1] -> N x 3 x H x W
    haematoxylin, eosin and DAB densities (float32, clipped at 0)."""
    m = torch.from_numpy(_hed_matrix()).to(rgb01.device)
    od = torch.log(rgb01.float().clamp_min(1e-6)) / _LOG_EPS
    return torch.einsum("nchw,cd->ndhw", od, m).clamp_min(0)


def _masked_stats(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel weighted mean and standard deviation of N x C x H x W ``x`` over weights N x 1 x H x
    W (N x C each)."""
    s = w.sum((2, 3)).clamp_min(1e-6)
    mean = (x * w).sum((2, 3)) / s
    var = ((x - mean[:, :, None, None]) ** 2 * w).sum((2, 3)) / s
    return mean, (var + 1e-10).sqrt()


def style_code_torch(rgb01: torch.Tensor, nuclei: torch.Tensor) -> torch.Tensor:
    """:func:`style_code` of images N x 3 x H x W in [0, 1] with nucleus masks N x 1 x H x W (0/1), differentiable:
    N x 12 (no quantile fallback: a sample with an empty region gets zeros for it)."""
    hed = hed_torch(rgb01)
    fg = nuclei.float()
    ma, sa = _masked_stats(hed, fg)
    mb, sb = _masked_stats(hed, 1 - fg)
    return torch.cat([ma * MEAN_SCALE, mb * MEAN_SCALE, sa * STD_SCALE, sb * STD_SCALE], 1)


# ----------------------------------------------------------------------------------------------------------------
# building blocks


def _init(m: nn.Module, gain: float = 0.02) -> nn.Module:
    nn.init.xavier_normal_(m.weight, gain=gain)
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)
    return m


def _conv(cin: int, cout: int, k: int = 3, *, sn: bool = False, bias: bool = True, gain: float = 0.02) -> nn.Module:
    m = _init(nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias), gain)
    return spectral_norm(m) if sn else m


def _zero_linear(cin: int, cout: int) -> nn.Linear:
    m = nn.Linear(cin, cout)
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    return m


class SPADE(nn.Module):
    """Parameter-free batch normalisation, then ``x * (1 + gamma + gamma_s) + beta + beta_s``: ``gamma, beta`` a 3x3
    convolution of the block's shared label-map features, ``gamma_s, beta_s`` per channel from the style vector."""

    def __init__(self, channels: int, hidden: int, style_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.modulation = _conv(hidden, 2 * channels, 3)
        self.style = _zero_linear(style_dim, 2 * channels)

    def forward(self, x: torch.Tensor, feats: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation(feats).chunk(2, 1)
        gs, bs = self.style(w)[:, :, None, None].chunk(2, 1)
        return torch.addcmul(beta + bs, self.norm(x), gamma + (1 + gs))


class SPADEResBlock(nn.Module):
    """OASIS's ``ResnetBlock_with_SPADE`` (norm, LReLU, conv, twice; a learned shortcut when the width changes); the
    label map (with its noise channels) enters through one shared 3x3 convolution + ReLU per block."""

    def __init__(self, fin: int, fout: int, sem_nc: int, hidden: int, style_dim: int, *, spectral: bool = True):
        super().__init__()
        fmid = min(fin, fout)
        self.shared = nn.Sequential(_conv(sem_nc, hidden, 3, gain=1.0), nn.ReLU())
        self.norm_0 = SPADE(fin, hidden, style_dim)
        self.conv_0 = _conv(fin, fmid, 3, sn=spectral)
        self.norm_1 = SPADE(fmid, hidden, style_dim)
        self.conv_1 = _conv(fmid, fout, 3, sn=spectral)
        self.learned_shortcut = fin != fout
        if self.learned_shortcut:
            self.norm_s = SPADE(fin, hidden, style_dim)
            self.conv_s = _conv(fin, fout, 1, sn=spectral, bias=False)

    def forward(self, x: torch.Tensor, seg: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        feats = self.shared(seg)
        xs = self.conv_s(self.norm_s(x, feats, w)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, feats, w), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, feats, w), 0.2))
        return xs + dx


def _widths(cfg: dict) -> list[int]:
    """Generator width per scale, index 0 = full resolution."""
    return [min(int(cfg["ngf"]) * 2**s, int(cfg["ngf_max"])) for s in range(int(cfg["n_up"]) + 1)]


#: how the generator doubles its resolution between blocks (``config["upsample"]``)
UPSAMPLING = ("nearest", "bilinear")


class P2IGenerator(nn.Module):
    """Label map N x 3 x H x W + style code N x 12 (+ noise N x z_dim x H/2^noise_down x W/2^noise_down) -> image
    in [-1, 1]; H and W multiples of 2^n_up."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.n_up = int(cfg["n_up"])
        self.z_dim = int(cfg["z_dim"])
        self.noise_down = int(cfg["noise_down"])
        self.upsample = str(cfg.get("upsample", "nearest"))
        if self.upsample not in UPSAMPLING:
            raise ValueError(f"config['upsample'] must be one of {UPSAMPLING}, got {self.upsample!r}")
        sd = int(cfg["style_dim"])
        ch = _widths(cfg)
        sem_nc = COND_NC + self.z_dim
        self.style = nn.Sequential(_init(nn.Linear(STYLE_NC, sd), 1.0), nn.LeakyReLU(0.2),
                                   _init(nn.Linear(sd, sd), 1.0), nn.LeakyReLU(0.2))
        k = self.n_up
        self.head = _conv(sem_nc, ch[k], 3)
        self.head_style = _zero_linear(sd, ch[k])
        blocks = []
        for s in range(k, -1, -1):
            fin, fout = ch[s], ch[max(s - 1, 0)]
            hidden = max(8, round(float(cfg["hidden"]) * fin))
            blocks.append(SPADEResBlock(fin, fout, sem_nc, hidden, sd, spectral=bool(cfg["spectral_g"])))
        self.blocks = nn.ModuleList(blocks)
        self.conv_img = _conv(ch[0], 3, 3)

    @property
    def multiple(self) -> int:
        return 2**self.n_up

    def noise_shape(self, H: int, W: int) -> tuple[int, int, int]:
        """(channels, h, w) of the noise input for an output of H x W."""
        return self.z_dim, H >> self.noise_down, W >> self.noise_down

    def _noise_at(self, noise: torch.Tensor, s: int) -> torch.Tensor:
        """The noise at scale 1/2^s: bilinear up from its own scale, or area-averaged down to coarser ones."""
        d = s - self.noise_down
        if d > 0:
            return F.avg_pool2d(noise, 2**d)
        if d < 0:
            return F.interpolate(noise, scale_factor=2 ** (-d), mode="bilinear", align_corners=False)
        return noise

    def forward(self, cond: torch.Tensor, code: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        N, _, H, W = cond.shape
        m = self.multiple
        if H % m or W % m:
            raise ValueError(f"the generator needs height and width multiples of {m}, got {H} x {W}")
        if self.z_dim and noise is None:  # training: fresh noise
            c, h, w = self.noise_shape(H, W)
            noise = torch.randn(N, c, h, w, device=cond.device, dtype=cond.dtype)
        w = self.style(code.to(cond.dtype))

        def seg(s: int) -> torch.Tensor:
            c = cond if s == 0 else F.avg_pool2d(cond, 2**s)
            return torch.cat([c, self._noise_at(noise.to(c.dtype), s)], 1) if self.z_dim else c

        k = self.n_up
        x = self.head(seg(k)) + self.head_style(w)[:, :, None, None]
        for s, block in zip(range(k, -1, -1), self.blocks):
            x = block(x, seg(s), w)
            if s > 0:
                x = (F.interpolate(x, scale_factor=2, mode="nearest") if self.upsample == "nearest" else
                     F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


class _DBlock(nn.Module):
    """OASIS's ``residual_block_D``: (LReLU,) SN conv, LReLU, (up,) SN conv, (down); a learned 1x1 SN shortcut when
    the width changes."""

    def __init__(self, fin: int, fout: int, mode: str, first: bool = False):
        super().__init__()
        self.mode = mode  # "down" or "up"
        fmid = fout
        self.first = first
        self.conv1 = spectral_norm(_init(nn.Conv2d(fin, fmid, 3, padding=1), 1.0))
        self.conv2 = spectral_norm(_init(nn.Conv2d(fmid, fout, 3, padding=1), 1.0))
        self.learned_shortcut = fin != fout
        if self.learned_shortcut:
            self.conv_s = spectral_norm(_init(nn.Conv2d(fin, fout, 1, bias=False), 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.mode == "up"
        xs = F.interpolate(x, scale_factor=2, mode="nearest") if up else x
        if self.learned_shortcut:
            xs = self.conv_s(xs)
        if not up:
            xs = F.avg_pool2d(xs, 2)
        dx = self.conv1(x if self.first else F.leaky_relu(x, 0.2))
        dx = F.leaky_relu(dx, 0.2)
        if up:
            dx = F.interpolate(dx, scale_factor=2, mode="nearest")
        dx = self.conv2(dx)
        if not up:
            dx = F.avg_pool2d(dx, 2)
        return xs + dx


class UNetDiscriminator(nn.Module):
    """OASIS's segmentation discriminator, small: ``levels`` residual down blocks (widths ``ndf * 2^i``, at most
    ``8 ndf``), as many up blocks reading the encoder's outputs through skip connections, a 1x1 convolution to
    ``1 + N_CLASSES`` logits per pixel at full resolution. Input: images N x 3 x H x W in [-1, 1], H and W multiples
    of 2^levels."""

    def __init__(self, ndf: int = 16, levels: int = 4, n_out: int = 1 + N_CLASSES):
        super().__init__()
        ch = [min(int(ndf) * 2**i, int(ndf) * 8) for i in range(int(levels))]
        self.levels = int(levels)
        self.down = nn.ModuleList(_DBlock(3 if i == 0 else ch[i - 1], ch[i], "down", first=i == 0)
                                  for i in range(self.levels))
        ups = [_DBlock(ch[-1], ch[-2] if self.levels > 1 else ch[0], "up")]
        for i in range(self.levels - 2, -1, -1):
            ups.append(_DBlock(2 * ch[i], ch[i - 1] if i > 0 else ch[0], "up"))
        self.up = nn.ModuleList(ups)
        self.last = nn.Conv2d(ch[0], int(n_out), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2**self.levels
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"the discriminator needs height and width multiples of {m}, got "
                             f"{x.shape[-2]} x {x.shape[-1]}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = self.up[0](x)
        for i, block in enumerate(self.up[1:]):
            x = block(torch.cat([skips[-2 - i], x], 1))
        return self.last(x)


class Points2Image(GANModel):
    """Generator and U-Net discriminator in one module (one state dict, one checkpoint); ``ema`` holds the
    moving average of the generator, which renders."""

    G_MODULES = ("generator",)

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        cfg = self.config
        self.generator = P2IGenerator(cfg)
        self.discriminator = UNetDiscriminator(int(cfg["ndf"]), int(cfg["d_levels"]))
        self.init_gan()

    @property
    def multiple(self) -> int:
        """Height and width of the generator's input must be multiples of this."""
        return 2 ** int(self.config["n_up"])

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled masks' label map and the real crop in [-1, 1] (unpaired: not the same tissue)."""
        return batch["cond"].float(), batch["image"].float() * 2 - 1

    def generate(self, batch: dict, cond, real, *, ema: bool = False) -> tuple[torch.Tensor, dict]:
        """The generator (live or EMA) on the sampled masks in the real crop's style code, with fresh noise."""
        gen = self.ema["generator"] if ema else self.generator
        return gen(cond, batch["style"].float()), {}


# ----------------------------------------------------------------------------------------------------------------
# receptive field and tiling


def receptive_radius(config: dict) -> int:
    """A bound (px, full resolution) on how far from an output pixel the generator looks: at scale 1/f each block
    has four 3x3 convolutions on any path (the label map's shared one, a modulation, conv_0, conv_1), each adding
    f; each upsampling and the pooling of the label map add f; the bilinear resize of the noise one noise pixel."""
    k = int(config["n_up"])
    r = 1 + 2 * 2**k  # conv_img; the head conv and the pooling at the coarsest scale
    for s in range(k + 1):
        r += 5 * 2**s  # four convolutions and an upsampling (or the pooling) per scale
    return r + 2 ** int(config["noise_down"])


def halo(config: dict) -> int:
    """The margin (px, a multiple of 2^n_up) each window computes beyond the part of it that is kept."""
    m = 2 ** int(config["n_up"])
    return -(-receptive_radius(config) // m) * m


def _window_noise(gen: P2IGenerator, seed: int, r0: int, c0: int, h: int, w: int, device) -> torch.Tensor:
    c, hh, ww = gen.noise_shape(h, w)
    d = gen.noise_down
    chans = [hash_normal(seed, 7000 + j, r0 >> d, c0 >> d, hh, ww) for j in range(c)]
    return torch.from_numpy(np.stack(chans)[None]).to(device)


# ----------------------------------------------------------------------------------------------------------------
# data: sampled masks, pseudo-labels, style codes


def crop_seed(rgb: np.ndarray) -> int:
    """A seed from a crop's bytes: it follows the training loop's seed, so a resumed run draws the same masks."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(rgb).data, digest_size=4).digest(), "little")


def sample_layout(shape, seed: SeedLike = None, *, process: str = "cluster", n: int | None = None) -> np.ndarray:
    """Instance masks of a random layout: :func:`napari_nucsynth.points.random_points` (MoNuSeg's point process; ``n``
    points, or as many as the process draws when None) and :func:`napari_nucsynth.masks.sample_masks` (MoNuSeg's
    shape prior), uint32."""
    from .._checks import as_rng
    from ..masks import sample_masks
    from ..points import random_points

    rng = as_rng(seed)
    with warnings.catch_warnings():  # a jammed hard core places fewer points; fine for training layouts
        warnings.simplefilter("ignore", RuntimeWarning)
        pts = random_points(shape, process=process, n=n, seed=rng)
    return sample_masks(pts, shape, seed=rng)


def conditioning(labels) -> np.ndarray:
    """The generator's label map of instance labels: float32 (3, H, W) = semantic map, instance edges (the inner
    boundary of every nucleus, so touching nuclei stay apart) and the medial-axis distance map."""
    from skimage.segmentation import find_boundaries

    from ..masks import distance_map

    lab = as_labels(labels)
    out = np.zeros((COND_NC,) + lab.shape, np.float32)
    if lab.size == 0 or not lab.any():
        return out
    out[0] = lab > 0
    out[1] = find_boundaries(lab, mode="inner")
    out[2] = distance_map(lab)
    return out


def centroid_map(labels) -> np.ndarray:
    """float32 H x W: 1 at the pixel of each nucleus's centroid (:func:`napari_nucsynth.points.centroids`, rounded),
    0 elsewhere."""
    from ..points import centroids

    lab = as_labels(labels)
    out = np.zeros(lab.shape, np.float32)
    pts = np.asarray(centroids(lab))
    if len(pts):
        idx = np.clip(np.rint(pts).astype(int), 0, np.array(lab.shape) - 1)
        out[idx[:, 0], idx[:, 1]] = 1
    return out


def heatmap(points: torch.Tensor, sigma: float) -> torch.Tensor:
    """N x 1 x H x W centroid map -> a Gaussian of ``sigma`` px with peak 1 at each centroid (summed where they
    overlap, clipped at 1)."""
    r = max(1, int(math.ceil(3 * float(sigma))))
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=points.device)
    g = torch.exp(-(x**2) / (2 * float(sigma) ** 2))
    p = points.float()
    p = F.conv2d(p, g.view(1, 1, 1, -1), padding=(0, r))
    p = F.conv2d(p, g.view(1, 1, -1, 1), padding=(r, 0))
    return p.clamp_max(1)


LAYOUTS = ("process", "matched")


def targets(image: np.ndarray, labels: np.ndarray, config: dict | None = None) -> dict[str, np.ndarray]:
    """One unpaired training sample from a real crop (``labels`` is not used: the kind trains without labels).

    - ``cond`` (3 x H x W) and ``points`` (1 x H x W): the label map (:func:`conditioning`) and the centroid map
      (:func:`centroid_map`) of masks sampled for this crop (:func:`sample_layout`, seeded by :func:`crop_seed`):
      with ``config["layout"]`` "process" (the default) as many nuclei as MoNuSeg's point process draws; with
      "matched" as many as the crop's own Otsu nuclei (connected components; still a random layout, not theirs),
      so the masks' densities range as the real crops' do, empty stroma included;
    - ``real_sem`` (1 x H x W): the real crop's pseudo-labels (Otsu nuclei, 0/1);
    - ``style`` (12,): the real crop's style code with those nuclei.
    """
    from ..presynthesis import detect_nuclei

    layout = (config or {}).get("layout", "process")
    if layout not in LAYOUTS:
        raise ValueError(f"config['layout'] must be one of {LAYOUTS}, got {layout!r}")
    rgb = as_rgb(image, "image")
    nuc = detect_nuclei(rgb)
    n = None
    if layout == "matched":
        from scipy import ndimage as ndi

        n = int(ndi.label(nuc > 0)[1])
    lab = sample_layout(rgb.shape[:2], crop_seed(rgb), n=n)
    return {"cond": conditioning(lab), "points": centroid_map(lab)[None],
            "real_sem": (nuc > 0)[None].astype(np.float32), "style": style_code(rgb, nuc)}


# ----------------------------------------------------------------------------------------------------------------
# losses and the training step


def class_balanced_ce(logits: torch.Tensor, target: torch.Tensor, *, balance: bool = True) -> torch.Tensor:
    """OASIS's per-pixel cross-entropy: ``target`` (N x H x W, long) over ``logits`` (N x C x H x W); with
    ``balance`` each pixel weighted by ``numel / (count of its class x classes present)`` (the batch's inverse
    class frequency, so every present class weighs the same)."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    if not balance:
        return ce.mean()
    counts = torch.bincount(target.flatten(), minlength=logits.shape[1]).float()
    present = (counts > 0).sum().clamp_min(1)
    coef = torch.where(counts > 0, target.numel() / (counts.clamp_min(1) * present), torch.zeros_like(counts))
    return (ce * coef[target]).mean()


def point_loss(fake01: torch.Tensor, heat: torch.Tensor, semantic: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The point regularisation (see the module docstring): logistic loss of the render's haematoxylin density,
    high (positive) around the centroids (weights: the :func:`heatmap` ``heat`` where above 0.1) and low
    (negative) in the background more than 2 px from any mask; threshold and scale from the style ``code`` (N x
    12, the nucleus and background mean H)."""
    h = hed_torch(fake01)[:, :1]
    h_fg, h_bg = code[:, 0] / MEAN_SCALE, code[:, 3] / MEAN_SCALE
    t = ((h_fg + h_bg) / 2)[:, None, None, None]
    s = ((h_fg - h_bg).abs() / 4).clamp_min(2e-3)[:, None, None, None]
    logit = (h - t) / s
    pos = heat * (heat > 0.1)
    neg = 1 - F.max_pool2d(semantic.float(), 5, stride=1, padding=2)
    lp = (pos * F.softplus(-logit)).sum() / pos.sum().clamp_min(1e-6)
    ln = (neg * F.softplus(logit)).sum() / neg.sum().clamp_min(1e-6)
    return (lp * (pos.sum() > 0) + ln * (neg.sum() > 0)) / 2


def stain_code_loss(fake01: torch.Tensor, semantic: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between the stain code (:func:`style_code_torch`) of images N x 3 x H x W in [0, 1],
    measured on nucleus masks ``semantic`` N x 1 x H x W, and the codes ``code`` N x 12 they should have; a region
    with fewer than :data:`MIN_FG` pixels in a sample leaves its six numbers out. Differentiable in ``fake01``
    (points2image's and pix2pixhd's style loss)."""
    got = style_code_torch(fake01, semantic)
    err = (got - code).abs()
    has_fg = (semantic.float().sum((1, 2, 3)) >= MIN_FG).float()[:, None]
    has_bg = ((1 - semantic.float()).sum((1, 2, 3)) >= MIN_FG).float()[:, None]
    w = torch.cat([has_fg.expand(-1, 3), has_bg.expand(-1, 3), has_fg.expand(-1, 3), has_bg.expand(-1, 3)], 1)
    return (err * w).sum() / w.sum().clamp_min(1)


def _classes(semantic: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W 0/1 nucleus map -> N x H x W class indices (1 = background, 2 = nucleus; 0 is "fake")."""
    return 1 + (semantic[:, 0] > 0.5).long()


def _labelmix(model: Points2Image, batch: dict, real, fake, out_real, out_fake) -> torch.Tensor:
    """OASIS's LabelMix: each class region of the sampled masks (background, nuclei) taken from the real or the
    generated image at random (per sample); D's output on the mix must match the same mix of its outputs."""
    sem = (batch["cond"][:, :1] > 0.5).float()
    bits = torch.randint(0, 2, (sem.shape[0], 2, 1, 1), device=sem.device).float()
    mask = sem * bits[:, 1:] + (1 - sem) * bits[:, :1]
    mixed = mask * real + (1 - mask) * fake
    out_mixed = model.discriminator(mixed)
    return F.mse_loss(out_mixed.float(), (mask * out_real + (1 - mask) * out_fake).float())


def discriminator_loss(model: Points2Image, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """OASIS's discriminator loss on one batch: real crops to their pseudo-labels (class-balanced), generated
    images to "fake", + ``lambda_labelmix`` x LabelMix."""
    cond, real = model.inputs(batch)
    with torch.no_grad():
        fake, _ = model.generate(batch, cond, real)
    n = real.shape[0]
    out = model.discriminator(torch.cat([fake.to(real.dtype), real], 0))
    out_fake, out_real = out[:n], out[n:]
    l_real = class_balanced_ce(out_real, _classes(batch["real_sem"]))
    l_fake = class_balanced_ce(out_fake, torch.zeros_like(_classes(batch["real_sem"])), balance=False)
    loss = l_real + l_fake
    logs = {"d_real": float(l_real.detach()), "d_fake": float(l_fake.detach())}
    lam = float(model.config.get("lambda_labelmix", 0))
    if lam:
        lm = _labelmix(model, batch, real, fake.to(real.dtype), out_real, out_fake) * lam
        loss = loss + lm
        logs["d_labelmix"] = float(lm.detach())
    logs["d_loss"] = float(loss.detach())
    return loss, logs


def generator_loss(model: Points2Image, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's loss on one batch: OASIS's adversarial term (D must find the masks' classes in the render,
    class-balanced) + ``lambda_point`` x :func:`point_loss` + ``lambda_style`` x the style loss; logs ``loss``
    and every term (weighted)."""
    cfg = model.config
    cond, real = model.inputs(batch)
    fake, _ = model.generate(batch, cond, real)
    with gan.frozen(model.discriminator):  # gradients reach the image through D, not D's weights
        out = model.discriminator(fake)
    sem = cond[:, :1]
    terms = {"g_adv": class_balanced_ce(out, _classes(sem))}
    with torch.autocast(fake.device.type, enabled=False):  # optical densities and statistics in float32
        fake01 = (fake.float() + 1) / 2
        code = batch["style"].float()
        if float(cfg.get("lambda_point", 0)):
            heat = heatmap(batch["points"], float(cfg.get("point_sigma", 2.0)))
            terms["g_point"] = point_loss(fake01, heat, sem, code) * float(cfg["lambda_point"])
        if float(cfg.get("lambda_style", 0)):
            terms["g_style"] = stain_code_loss(fake01, sem, code) * float(cfg["lambda_style"])
    total = sum(terms.values())
    return total, {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


def train_step(model: Points2Image, batch: dict, optimizers: dict, step: int) -> dict[str, float]:
    """One discriminator step, one generator step, one EMA update (the core's autocast, optimisers and EMA; OASIS's
    losses instead of the core's hinge)."""
    return gan.train_step(model, batch, optimizers, step, d_loss_fn=discriminator_loss, g_loss_fn=generator_loss)


def optimizers(model: Points2Image, lr: float | None) -> dict[str, torch.optim.Optimizer]:
    """The core's two time-scale Adam (generator ``lr / 2``, discriminator ``2 lr``; ``lr`` 2e-4 when None)."""
    return gan.optimizers(model, lr, default_lr=DEFAULT_LR)


# ----------------------------------------------------------------------------------------------------------------
# inference


def _render_float(model: Points2Image, labels, code: np.ndarray, seed: int, *, tile: int | None = None,
                  progress: Callable[[int, int, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """The EMA generator on ``labels`` with style code ``code``: float32 H x W x 3 in [0, 1]. Outputs larger than
    ``tile`` run in windows that overlap by twice :func:`halo` plus ``blend``, cross-faded (no seams)."""
    cfg = model.config
    gen = model.inference("generator")
    dev = device_of(model)
    code = np.asarray(code, np.float32).reshape(1, -1)
    if code.shape[1] != STYLE_NC:
        raise ValueError(f"the style code must have {STYLE_NC} values, got {code.shape[1]}")
    cond, size = padded_conditioning(labels, conditioning, COND_NC, model.multiple)
    z = torch.from_numpy(code).to(dev)

    def fn(window: np.ndarray, r0: int, c0: int) -> np.ndarray:
        _, h, w = window.shape
        x = torch.from_numpy(window)[None].to(dev)
        noise = _window_noise(gen, seed, r0, c0, h, w, dev) if gen.z_dim else None
        return gen(x, z, noise)[0].float().cpu().numpy()

    return window_model(model, fn, cond, size, tile=int(cfg["tile"] if tile is None else tile), halo=halo(cfg),
                        blend=int(cfg.get("blend", 16)), progress=progress, should_stop=should_stop)


def render(model: Points2Image, labels, style_image, seed: SeedLike = None, *, style_labels=None,
           tile: int | None = None, progress: Callable[[int, int, str], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Render instance ``labels`` in the stain of ``style_image`` with a trained Points2Image model (on its device).

    Parameters
    ----------
    model : Points2Image
        A model (e.g. from a checkpoint); its train/eval mode is restored afterwards.
    labels : (H, W) integer array
        Instance masks, 0 = background; any size (windows of ``tile`` px beyond it, without seams).
    style_image : image
        The style reference (RGB uint8; grey, RGBA, float in [0, 1] and uint16 are converted), any size: its
        :func:`style_code` conditions the generator.
    seed : int, numpy Generator or None
        Draws the noise (texture); the same seed gives the same image, another seed another texture over the same
        nuclei.
    style_labels : (h, w) integer array, optional
        The reference's own nuclei for its style code (detected by Otsu when None).
    tile, progress, should_stop
        Window size (the config's when None); ``progress(done, total, "rendering")`` per window;
        ``should_stop()`` ends the render with ``InterruptedError``.

    Returns
    -------
    (H, W, 3) uint8 RGB array.
    """
    lab = as_labels(labels)
    code = style_code(style_image, style_labels)
    return to_uint8(_render_float(model, lab, code, seed_int(seed), tile=tile, progress=progress,
                                   should_stop=should_stop))


# ----------------------------------------------------------------------------------------------------------------
# training hooks: validation and preview (label-free)


def _centre_crop(a: np.ndarray, size: int, multiple: int) -> np.ndarray:
    H, W = a.shape[:2]
    s = max(multiple, min(size, H, W) // multiple * multiple)
    r, c = max(0, (H - s) // 2), max(0, (W - s) // 2)
    return a[r : r + s, c : c + s]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def validate(model: Points2Image, images: Sequence[np.ndarray], labels=None, device=None, *, max_images: int = 4,
             crop: int = 256) -> dict[str, float]:
    """Label-free checks on held-out images (``labels`` unused): the centre ``crop`` of each gets masks sampled
    with seed ``i`` rendered in its own style (seed 0, EMA generator). ``mask_dice``: Dice of the render's Otsu
    nuclei (:func:`~napari_nucsynth.presynthesis.detect_nuclei`) against the masks; ``point_hit``: the share of
    nuclei whose centroid pixel's haematoxylin density is above the render's Otsu threshold; ``style_l1``: mean
    absolute difference (code units) between the render's style code (its masks as nuclei) and the real crop's."""
    from skimage.filters import threshold_otsu

    from ..points import centroids
    from ..presynthesis import detect_nuclei
    from ..stain import rgb_to_hed

    dice, hit, sty = [], [], []
    for i, img in enumerate(list(images)[:max_images]):
        im = _centre_crop(as_rgb(img, "validation image"), crop, model.multiple)
        lab = sample_layout(im.shape[:2], i)
        real_code = style_code(im)
        out = to_uint8(_render_float(model, lab, real_code, 0))
        dice.append(_dice(detect_nuclei(out) > 0, lab > 0))
        h = rgb_to_hed(out)[..., 0]
        pts = np.asarray(centroids(lab))
        if len(pts) and np.ptp(h) > 0:
            idx = np.clip(np.rint(pts).astype(int), 0, np.array(lab.shape) - 1)
            hit.append(float((h[idx[:, 0], idx[:, 1]] > threshold_otsu(h)).mean()))
        sty.append(float(np.abs(style_code(out, lab) - real_code).mean()))
    res = {"mask_dice": float(np.mean(dice)) if dice else float("nan"), "style_l1": float(np.mean(sty)) if sty else
           float("nan")}
    if hit:
        res["point_hit"] = float(np.mean(hit))
    return res if dice else {}


def preview(model: Points2Image, image: np.ndarray, labels, device) -> np.ndarray:
    """What the generator makes of masks in ``image``'s style (its centre 512 x 512 at most, seed 0): ``labels``
    when they hold nuclei, else masks sampled with seed 0."""
    im = _centre_crop(as_rgb(image, "image"), 512, model.multiple)
    lab = None
    if labels is not None and np.shape(labels)[:2] == np.shape(image)[:2]:
        lab = _centre_crop(np.asarray(labels), 512, model.multiple)
        if not lab.any():
            lab = None
    if lab is None:
        lab = sample_layout(im.shape[:2], 0)
    return render(model, lab, im, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# registration


_INT_KEYS = ("ngf", "ngf_max", "n_up", "style_dim", "ndf", "d_levels")


def build(config: dict) -> Points2Image:
    """A Points2Image model of ``config`` (missing keys take :func:`default_config`'s values)."""
    cfg = gan.merged_config(config, default_config(), "points2image", positive=_INT_KEYS, non_negative=("z_dim",))
    if not 0 <= int(cfg["noise_down"]) <= int(cfg["n_up"]):
        raise ValueError(f"points2image config 'noise_down' must be in [0, n_up] = [0, {cfg['n_up']}], got "
                         f"{cfg['noise_down']!r}")
    if float(cfg["point_sigma"]) <= 0:
        raise ValueError(f"points2image config 'point_sigma' must be positive, got {cfg['point_sigma']!r}")
    return Points2Image(cfg)


SPEC = register_model(replace(
    gan.gan_spec("points2image", build=build, default_config=default_config, targets=targets, validate=validate,
                 preview=preview, default_lr=DEFAULT_LR),
    loss=generator_loss, train_step=train_step, optimizers=optimizers, unpaired=True, targets_config=True))
