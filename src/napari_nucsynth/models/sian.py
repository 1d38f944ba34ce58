"""SIAN: style-guided instance-adaptive normalisation for H&E synthesis from nucleus instance masks.

Wang, Xian, Vakanski and Shareef, "SIAN: Style-Guided Instance-Adaptive Normalization for Multi-Organ
Histopathology Image Synthesis", ISBI 2023. A conditional GAN in the SPADE family (Park et al.,
CVPR 2019) whose every normalisation is modulated by the instance descriptors of the target masks and by a style
vector encoded from a reference image:

- **Style encoder** (VAE-style, as SPADE's ``ConvEncoder``): stride-2 convolutions, then the spatial mean and
  standard deviation of the last features (so a reference of any size gives one style), then ``mu`` and
  ``logvar`` of a ``style_dim`` vector, regularised towards N(0, I) by the KL term. At inference the style is the
  mean ``mu`` of the reference, or ``mu + sigma * eps`` with ``eps`` drawn from the seed.
- **Generator**: fully convolutional. It starts at 1/2^``n_up`` resolution from a convolution of the (area-
  averaged) descriptor maps and seeded noise plus a projection of the style, then one SIAN residual block per
  scale with nearest-neighbour upsampling in between (SPADE's ``SPADEResnetBlock``: norm, LReLU, conv, twice, and a
  learned shortcut when the width changes), and a final LReLU, 3x3 convolution and tanh.
- **SIAN normalisation**: parameter-free batch normalisation (SPADE's default ``spadesyncbatch3x3``; its running
  statistics make inference local, so tiles render exactly like one piece), then ``x * (1 + gamma) + beta`` with
  ``gamma, beta`` the sum of a spatial term and a style term. The spatial term follows the paper's four steps:
  *semantization* (a 3x3 convolution of the semantic map into two branches ``p`` and ``q``), *stylization*
  (each branch multiplied channel-wise by the "style matrix", a linear map of the style vector, then a 3x3
  convolution), *instantiation* (``p`` multiplied by an embedding of the 2-bin direction map, ``q`` by one of the
  medial-axis distance map) and *modulation* (``gamma = gamma_p + gamma_q``, ``beta = beta_p + beta_q``, 3x3
  convolutions of the branches). The style term is a per-channel ``gamma, beta`` from the style vector (as in
  SEAN's style-guided path), so the reference sets the colours of background as well as of nuclei. To keep the
  network fast on a CPU, the normalisations of one residual block share the first three steps (each has its own
  modulation convolutions), and multiplications are by ``1 + embedding`` so that an untrained block starts as plain
  batch normalisation.
- **Noise**: a StyleGAN-style per-channel-scaled noise map after each block's first convolution, and noise
  channels at the input. In training it is ``torch.randn``; at inference it is a hash of (seed, scale, channel,
  global pixel position), so the same seed gives the same image, on any tile layout.
- **Training on the GAN core** (:mod:`napari_nucsynth.models.gan`, SIAN trains "as SPADE"): the core's
  multi-scale PatchGAN (``num_d`` scales of ``d_layers`` spectrally normalised 4x4 convolutions) sees the
  descriptor maps and the image; hinge loss; feature matching x ``lambda_feat`` = 10; a perceptual loss x
  ``lambda_perc`` = 10 in a frozen feature network (``features``: by default the shipped segmenter's encoder,
  trained on H&E, instead of SPADE's ImageNet VGG-19, which cannot be had here; ``"vgg19"`` where its weights are
  present locally); KL divergence x ``lambda_kld`` = 0.05 (SPADE's ``--lambda_kld``; summed over the style
  dimensions, averaged over the batch). Adam (0, 0.9) with the two time-scale rule (generator and encoder at
  ``lr / 2``, discriminator at ``2 lr``, SPADE's ``--lr`` 2e-4); one D step, one G step, then the exponential
  moving average of the encoder and generator, which is what renders and ships. The feature network's
  ``source`` is recorded in the config as ``"features_source"``.

The descriptors are :func:`napari_nucsynth.masks.semantic_map`, :func:`~napari_nucsynth.masks.direction_map`
(2 bins) and :func:`~napari_nucsynth.masks.distance_map`, stacked as 4 channels: semantic, direction (2),
distance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from .._checks import SeedLike, as_labels, as_rgb
from . import _rendering, gan
from ._rendering import center_crop, device_of, evaluating, padded_conditioning, seed_int, window_model

from .gan import GAN_DEFAULTS, GANModel, MultiscaleDiscriminator

__all__ = [
    "COND_NC",
    "SIAN",
    "SPEC",
    "MultiscaleDiscriminator",
    "SIANCondition",
    "SIANGenerator",
    "SIANNorm",
    "SIANResBlock",
    "StyleEncoder",
    "build",
    "conditioning",
    "default_config",
    "discriminator_loss",
    "encode_style",
    "generator_loss",
    "halo",
    "hash_normal",
    "interpolate_styles",
    "optimizers",
    "preview",
    "receptive_radius",
    "render",
    "style_vector",
    "targets",
    "train_step",
    "validate",
]

#: direction-map bins (SIAN's 2-bin direction map)
N_BINS = 2
#: conditioning channels: semantic (1), direction (N_BINS), distance (1)
COND_NC = 1 + N_BINS + 1
#: SPADE's default ``--lr`` (the generator trains at half of it, the discriminator at twice it)
DEFAULT_LR = 2e-4


def default_config() -> dict:
    """The default configuration (a 256 x 256 render takes about 0.1-0.2 s on one CPU core).

    - ``ngf``: generator width at full resolution (doubling per scale down to ``ngf_max``); ``n_up``: number of
      upsamplings (the generator starts at 1/2^n_up); ``hidden``: channels of each branch (p, q) of the SIAN
      conditioning, as a fraction of the block's width (at least 8); ``noise_nc``: noise channels at the input
      (0 disables noise everywhere); ``style_dim``: length of the style vector; ``spectral_g``: spectral norm on
      the generator's convolutions (SPADE does);
    - ``nef``, ``enc_layers``: style encoder width and depth;
    - the GAN core's keys (:data:`napari_nucsynth.models.gan.GAN_DEFAULTS`): discriminator ``ndf``, ``d_layers``,
      ``num_d``; loss weights ``lambda_feat``, ``lambda_perc``, ``lambda_l1``, ``perc_weights``; ``ema_decay``;
      ``features`` (the perceptual loss's network, :func:`napari_nucsynth.models.features.load_features`);
      and ``lambda_kld`` (0.05);
    - ``tile``: outputs larger than this (px) are rendered in overlapping tiles; ``blend``: width (px) of the
      cross-fade between tiles.
    """
    return {
        **GAN_DEFAULTS,
        "ngf": 16, "ngf_max": 128, "n_up": 3, "hidden": 0.5, "noise_nc": 4, "style_dim": 64, "spectral_g": True,
        "nef": 16, "enc_layers": 5, "lambda_kld": 0.05,
        "tile": 1024, "blend": 16,
    }


# ----------------------------------------------------------------------------------------------------------------
# building blocks


def _init(m: nn.Module) -> nn.Module:
    """SPADE's initialisation: Xavier normal with gain 0.02, zero biases."""
    nn.init.xavier_normal_(m.weight, gain=0.02)
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)
    return m


def _conv(cin: int, cout: int, k: int = 3, *, stride: int = 1, padding: int | None = None, sn: bool = False,
          bias: bool = True, groups: int = 1) -> nn.Module:
    m = _init(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=bias,
                        groups=groups))
    return spectral_norm(m) if sn else m  # after the initialisation: the power iteration starts from these weights


class SIANCondition(nn.Module):
    """The first three steps of SIAN's normalisation, shared by the normalisations of one residual block:
    semantization, stylization and instantiation. ``forward(cond, style)`` with ``cond`` N x 4 x H x W
    (semantic, direction (2), distance) and ``style`` N x style_dim returns N x 2 hidden x H x W: the branches
    ``p`` (instantiated by the direction map) and ``q`` (by the distance map), concatenated."""

    def __init__(self, hidden: int, style_dim: int):
        super().__init__()
        self.hidden = int(hidden)
        self.semantic = _conv(1, 2 * hidden, 3)                  # semantization: p0, q0
        self.style = _init(nn.Linear(style_dim, 2 * hidden))     # stylization: the style matrix
        self.stylize = _conv(2 * hidden, 2 * hidden, 3, groups=2)
        self.direction = _conv(N_BINS, hidden, 1)                # instantiation
        self.distance = _conv(1, hidden, 1)

    def forward(self, cond: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.semantic(cond[:, :1]))
        a = F.relu(self.stylize(a * (1 + self.style(style)[:, :, None, None])))
        p, q = a[:, : self.hidden], a[:, self.hidden :]
        p = p * (1 + self.direction(cond[:, 1 : 1 + N_BINS]))
        q = q * (1 + self.distance(cond[:, 1 + N_BINS :]))
        return torch.cat([p, q], 1)


class SIANNorm(nn.Module):
    """Parameter-free batch normalisation modulated by SIAN's conditioning features (the modulation step: gamma and
    beta of each branch, summed) and by a per-channel style term: ``bn(x) * (1 + gamma) + beta``."""

    def __init__(self, channels: int, hidden: int, style_dim: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.modulation = _conv(2 * hidden, 2 * channels, 3)  # [gamma_p + gamma_q, beta_p + beta_q]
        self.style = _init(nn.Linear(style_dim, 2 * channels))

    def forward(self, x: torch.Tensor, feats: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation(feats).chunk(2, 1)
        gs, bs = self.style(style)[:, :, None, None].chunk(2, 1)
        return torch.addcmul(beta + bs, self.norm(x), gamma + (1 + gs))


class SIANResBlock(nn.Module):
    """SPADE's residual block with SIAN normalisations and a noise input after the first convolution."""

    def __init__(self, fin: int, fout: int, hidden: int, style_dim: int, *, spectral: bool = True,
                 noise: bool = True):
        super().__init__()
        fmid = min(fin, fout)
        self.condition = SIANCondition(hidden, style_dim)
        self.norm_0 = SIANNorm(fin, hidden, style_dim)
        self.conv_0 = _conv(fin, fmid, 3, sn=spectral)
        self.norm_1 = SIANNorm(fmid, hidden, style_dim)
        self.conv_1 = _conv(fmid, fout, 3, sn=spectral)
        self.learned_shortcut = fin != fout
        if self.learned_shortcut:
            self.norm_s = SIANNorm(fin, hidden, style_dim)
            self.conv_s = _conv(fin, fout, 1, sn=spectral, bias=False)
        self.noise_weight = nn.Parameter(torch.zeros(1, fmid, 1, 1)) if noise else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor, style: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.condition(cond, style)
        xs = self.conv_s(self.norm_s(x, feats, style)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, feats, style), 0.2))
        if self.noise_weight is not None and noise is not None:
            dx = dx + self.noise_weight * noise
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, feats, style), 0.2))
        return xs + dx


def _widths(cfg: dict) -> list[int]:
    """Generator width per scale, index 0 = full resolution."""
    return [min(int(cfg["ngf"]) * 2**s, int(cfg["ngf_max"])) for s in range(int(cfg["n_up"]) + 1)]


class SIANGenerator(nn.Module):
    """Descriptor maps + style vector (+ noise) -> image in [-1, 1]; fully convolutional (H, W multiples of
    2^n_up)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.n_up = int(cfg["n_up"])
        self.noise_nc = int(cfg["noise_nc"])
        sd = int(cfg["style_dim"])
        ch = _widths(cfg)
        k = self.n_up
        self.head = _conv(COND_NC + self.noise_nc, ch[k], 3)
        self.head_style = _init(nn.Linear(sd, ch[k]))
        blocks = []
        for s in range(k, -1, -1):
            fin, fout = ch[s], ch[max(s - 1, 0)]
            hidden = max(8, round(float(cfg["hidden"]) * fin))
            blocks.append(SIANResBlock(fin, fout, hidden, sd, spectral=bool(cfg["spectral_g"]),
                                       noise=self.noise_nc > 0))
        self.blocks = nn.ModuleList(blocks)
        self.conv_img = _conv(ch[0], 3, 3)

    def noise_shapes(self, H: int, W: int) -> list[tuple[int, int, int]]:
        """(channels, h, w) of the noise inputs: the head's (at 1/2^n_up), then one per block (coarse to fine)."""
        k = self.n_up
        out = [(self.noise_nc, H >> k, W >> k)]
        out += [(1, H >> s, W >> s) for s in range(k, -1, -1)]
        return out

    def forward(self, cond: torch.Tensor, style: torch.Tensor,
                noises: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        N, _, H, W = cond.shape
        m = 2**self.n_up
        if H % m or W % m:
            raise ValueError(f"the generator needs height and width multiples of {m}, got {H} x {W}")
        if self.noise_nc and noises is None:  # training: fresh noise from torch's generator
            noises = [torch.randn(N, c, h, w, device=cond.device, dtype=cond.dtype)
                      for c, h, w in self.noise_shapes(H, W)]
        conds = [cond] + [F.avg_pool2d(cond, 2**s) for s in range(1, self.n_up + 1)]
        x = conds[-1] if not self.noise_nc else torch.cat([conds[-1], noises[0]], 1)
        x = self.head(x) + self.head_style(style)[:, :, None, None]
        for i, (s, block) in enumerate(zip(range(self.n_up, -1, -1), self.blocks)):
            x = block(x, conds[s], style, noises[i + 1] if self.noise_nc else None)
            if s > 0:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


class StyleEncoder(nn.Module):
    """Image in [-1, 1] (any size) -> (mu, logvar) of the style vector: stride-2 3x3 convolutions with LReLU (no
    normalisation, which would erase the stain colours the style is about), then the spatial mean and standard
    deviation of the last features and two linear maps."""

    def __init__(self, nef: int, n_layers: int, style_dim: int):
        super().__init__()
        layers, cin = [], 3
        for i in range(int(n_layers)):
            cout = min(nef * 2**i, nef * 8)
            layers += [_conv(cin, cout, 3, stride=2), nn.LeakyReLU(0.2)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.fc_mu = _init(nn.Linear(2 * cin, style_dim))
        self.fc_var = _init(nn.Linear(2 * cin, style_dim))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(image)
        mean = h.mean((2, 3))
        std = (h.var((2, 3), unbiased=False) + 1e-8).sqrt()
        f = torch.cat([mean, std], 1)
        return self.fc_mu(f), self.fc_var(f)


class SIAN(GANModel):
    """Style encoder, generator and discriminator in one module (one state dict, one checkpoint), trained on the
    GAN core; ``ema`` holds the moving averages of the encoder and generator, which render. ``config`` is the
    full configuration (see :func:`default_config`)."""

    G_MODULES = ("encoder", "generator")

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        cfg = self.config
        self.encoder = StyleEncoder(int(cfg["nef"]), int(cfg["enc_layers"]), int(cfg["style_dim"]))
        self.generator = SIANGenerator(cfg)
        self.discriminator = MultiscaleDiscriminator(COND_NC + 3, int(cfg["ndf"]), int(cfg["d_layers"]),
                                                     int(cfg["num_d"]))
        self.init_gan()

    @property
    def multiple(self) -> int:
        """Height and width of the generator's input must be multiples of this."""
        return 2 ** int(self.config["n_up"])

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of images N x 3 x H x W in [-1, 1] by the live (training) encoder."""
        return self.encoder(image)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The descriptor maps (what the discriminator sees beside the image) and the real image in [-1, 1]."""
        return _inputs(batch)

    def generate(self, batch: dict, cond: torch.Tensor, real: torch.Tensor, *,
                 ema: bool = False) -> tuple[torch.Tensor, dict]:
        """Training forward pass: the style sampled from the encoding of ``real`` (reparameterised), then the
        generator with fresh noise; returns the fake in [-1, 1] and the weighted KL term."""
        enc, gen = (self.ema["encoder"], self.ema["generator"]) if ema else (self.encoder, self.generator)
        mu, logvar = enc(real)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        kld = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean() * float(self.config["lambda_kld"])
        return gen(cond, z), {"g_kld": kld}


# ----------------------------------------------------------------------------------------------------------------
# receptive field and tiling


def receptive_radius(config: dict) -> int:
    """A bound (px, full resolution) on how far from an output pixel the generator looks: each 3x3 convolution at
    scale 1/f adds f, each upsampling and average pooling f; the conditioning of a block (three convolutions) is
    read at the inputs of both of its convolutions. Pixels further than this from a tile's edge equal the
    one-piece render."""
    k = int(config["n_up"])
    r = 1  # conv_img
    radius = r
    for s in range(k + 1):
        f = 2**s
        if s > 0:
            r += f  # nearest upsampling from scale s
        radius = max(radius, r + 2 * f + 3 * f + f)  # norm_0's input (two convs away), trunk + modulation, pooling
        r += 2 * f  # conv_0, conv_1 (the shortcut is 1x1)
    f = 2**k
    return max(radius, r + f + f)  # head conv and pooling


def halo(config: dict) -> int:
    """The margin (px, a multiple of 2^n_up) each tile computes beyond the part of it that is kept."""
    m = 2 ** int(config["n_up"])
    return -(-receptive_radius(config) // m) * m


# ----------------------------------------------------------------------------------------------------------------
# seeded noise (position-hashed, so tiles agree with the one-piece render)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_normal(seed: int, stream: int, r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """Standard normal float32 noise of shape (h, w) at global grid positions ``r0..r0+h, c0..c0+w`` of stream
    ``stream``: a SplitMix64 hash of (seed, stream, row, column) and a Box-Muller transform. The value at a
    position does not depend on the window it is computed in."""
    with np.errstate(over="ignore"):
        base = _splitmix(np.array([seed], np.uint64) ^ _splitmix(np.array([stream], np.uint64)))
        rows = _splitmix(np.arange(r0, r0 + h, dtype=np.uint64) + base)[:, None]
        cols = np.arange(c0, c0 + w, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)
        key = _splitmix(rows ^ cols)
    u1 = ((key >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32
    u2 = ((key & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) / 2.0**32
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def _window_noise(gen: SIANGenerator, seed: int, r0: int, c0: int, h: int, w: int, device) -> list[torch.Tensor]:
    """The generator's noise inputs for the window at (r0, c0) of size (h, w) (multiples of 2^n_up)."""
    k = gen.n_up
    out = []
    for i, (c, hh, ww) in enumerate(gen.noise_shapes(h, w)):
        s = k if i == 0 else k - (i - 1)
        chans = [hash_normal(seed, 1000 * i + j, r0 >> s, c0 >> s, hh, ww) for j in range(c)]
        out.append(torch.from_numpy(np.stack(chans)[None]).to(device))
    return out


# ----------------------------------------------------------------------------------------------------------------
# targets, losses, training hooks


def conditioning(labels) -> np.ndarray:
    """SIAN's descriptor maps of instance labels: float32 (4, H, W) = semantic map, 2-bin direction map, medial-axis
    distance map (:mod:`napari_nucsynth.masks`)."""
    from ..masks import direction_map, distance_map, semantic_map

    lab = as_labels(labels)
    return np.concatenate([semantic_map(lab)[None].astype(np.float32), direction_map(lab, N_BINS).astype(np.float32),
                           distance_map(lab)[None]], 0)


def targets(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The descriptor maps of one training sample: ``semantic`` (1 x H x W), ``direction`` (2 x H x W) and
    ``distance`` (1 x H x W), float32. The image itself is the batch's ``"image"``."""
    c = conditioning(labels)
    return {"semantic": c[:1], "direction": c[1 : 1 + N_BINS], "distance": c[1 + N_BINS :]}


def _inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    cond = torch.cat([batch["semantic"], batch["direction"], batch["distance"]], 1).float()
    return cond, batch["image"].float() * 2 - 1


#: the GAN core's losses, optimisers and step (kept under these names for the joint loop and the tests)
discriminator_loss = gan.discriminator_loss
generator_loss = gan.generator_loss
train_step = gan.train_step


def optimizers(model: SIAN, lr: float | None) -> dict[str, torch.optim.Optimizer]:
    """The core's two time-scale Adam: encoder + generator ("g") at ``lr / 2``, discriminator ("d") at ``2 lr``;
    ``lr`` is SPADE's ``--lr`` (2e-4 when None)."""
    return gan.optimizers(model, lr, default_lr=DEFAULT_LR)


def validate(model: SIAN, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], device,
             max_pairs: int = 4, crop: int = 256) -> dict[str, float]:
    """Reconstruction of held-out pairs (cheap: the centre ``crop`` of at most ``max_pairs`` pairs, each rendered
    from its own labels in its own style, seed 0, by the EMA generator): mean absolute error ``l1`` (intensities
    in [0, 1]) and the ``perceptual`` distance in the model's feature network (the core's weighting, unscaled)."""
    l1, perc = [], []
    net = gan.features_for(model, device)
    for img, lab in list(zip(images, labels))[:max_pairs]:
        im, lb = center_crop(np.asarray(img), np.asarray(lab), crop)
        out = _render_float(model, lb, style_vector(model, im), 0)
        with torch.no_grad():
            fake = torch.from_numpy(out.transpose(2, 0, 1))[None].to(device) * 2 - 1
            real = torch.from_numpy(im.transpose(2, 0, 1).astype(np.float32) / 255)[None].to(device) * 2 - 1
            l1.append(float((fake - real).abs().mean()) / 2)
            perc.append(float(gan.perceptual(net, (fake + 1) / 2, (real + 1) / 2, model.config["perc_weights"])))
    return {"l1": float(np.mean(l1)), "perceptual": float(np.mean(perc))} if l1 else {}


def preview(model: SIAN, image: np.ndarray, labels: np.ndarray, device) -> np.ndarray:
    """What the generator makes of a held-out pair's labels in its own style (centre 512 x 512 at most, seed 0)."""
    im, lb = center_crop(np.asarray(image), np.asarray(labels), 512)
    return render(model, lb, im, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# inference


def encode_style(model: SIAN, image) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, logvar)`` (float32 vectors of length ``style_dim``) of a style reference image (RGB uint8; grey,
    RGBA, float in [0, 1] and uint16 are converted), of any size (at least 2 x 2)."""
    img = as_rgb(image, "style")
    if min(img.shape[:2]) < 2:
        raise ValueError(f"the style image must be at least 2 x 2 pixels, got {img.shape[0]} x {img.shape[1]}")
    with evaluating(model):
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(device_of(model)).float()
        mu, logvar = model.inference("encoder")(x[None] / 127.5 - 1)
    return mu[0].float().cpu().numpy(), logvar[0].float().cpu().numpy()


def style_vector(model: SIAN, image, seed: SeedLike = None, *, sample: bool = False) -> np.ndarray:
    """The style vector of a reference: its mean ``mu``, or (``sample=True``) ``mu + exp(logvar / 2) * eps`` with
    ``eps`` standard normal drawn from ``seed``."""
    mu, logvar = encode_style(model, image)
    if not sample:
        return mu
    eps = np.random.default_rng(seed_int(seed)).standard_normal(mu.shape).astype(np.float32)
    return (mu + np.exp(0.5 * logvar) * eps).astype(np.float32)


def _render_float(model: SIAN, labels, style: np.ndarray, seed: int, *, tile: int | None = None,
                  progress: Callable[[int, int, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """The generator on the descriptors of ``labels`` with style vector ``style``: float32 H x W x 3 in [0, 1].
    Images larger than ``tile`` (the config's when None) are generated in windows that overlap by twice
    :func:`halo` plus ``blend`` and are cross-faded where they overlap (the pixels kept from each window equal the
    one-piece render, so there is no seam)."""
    cfg = model.config
    gen = model.inference("generator")
    dev = device_of(model)
    cond, size = padded_conditioning(labels, conditioning, COND_NC, model.multiple)
    z = torch.from_numpy(np.asarray(style, np.float32).reshape(1, -1)).to(dev)
    if z.shape[1] != int(cfg["style_dim"]):
        raise ValueError(f"the style vector must have {cfg['style_dim']} values, got {z.shape[1]}")

    def fn(window: np.ndarray, r0: int, c0: int) -> np.ndarray:
        _, h, w = window.shape
        x = torch.from_numpy(window)[None].to(dev)
        if dev.type == "cpu":  # oneDNN's convolutions are about 30 % faster on channels-last input
            x = x.contiguous(memory_format=torch.channels_last)
        noise = _window_noise(gen, seed, r0, c0, h, w, dev) if gen.noise_nc else None
        return gen(x, z, noise)[0].float().cpu().numpy()

    return window_model(model, fn, cond, size, tile=int(cfg["tile"] if tile is None else tile), halo=halo(cfg),
                        blend=int(cfg.get("blend", 16)), progress=progress, should_stop=should_stop)


def render(model: SIAN, labels, style_image, seed: SeedLike = None, *, sample_style: bool = False,
           tile: int | None = None, progress: Callable[[int, int, str], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Render instance ``labels`` in the style of ``style_image`` with a trained SIAN model (on its device).

    Parameters
    ----------
    model : SIAN
        A model (e.g. from a checkpoint); its train/eval mode is restored afterwards.
    labels : (H, W) integer array
        Instance masks, 0 = background; any size (windows of ``tile`` px beyond it, without seams).
    style_image : image
        The style reference (RGB uint8; grey, RGBA, float in [0, 1] and uint16 are converted), any size.
    seed : int, numpy Generator or None
        Draws the noise maps (and the style sample with ``sample_style``); the same seed gives the same image.
    sample_style : bool
        Use ``mu + sigma * eps`` of the reference's encoding instead of its mean ``mu``.
    tile : int, optional
        Window size (the config's ``tile`` when None).
    progress, should_stop : callables, optional
        ``progress(done, total, "rendering")`` per window; ``should_stop()`` ends the render with
        ``InterruptedError``.

    Returns
    -------
    (H, W, 3) uint8 RGB array.
    """
    return _rendering.render_styled(_render_float, style_vector, model, labels, style_image, seed,
                                    sample_style=sample_style, tile=tile, progress=progress, should_stop=should_stop)


def interpolate_styles(model: SIAN, labels, style_a, style_b, t, seed: SeedLike = None, *, tile: int | None = None,
                       progress=None, should_stop=None):
    """Visual style exploration: render ``labels`` with the style vector ``(1 - t) mu_a + t mu_b`` between the
    mean styles of two references (the same noise for every ``t``, so only the style changes).

    ``t`` is a number (0 gives exactly ``render(model, labels, style_a, seed)``, 1 that of ``style_b``; values
    outside [0, 1] extrapolate) or a sequence of numbers, for which a list of images is returned.
    """
    return _rendering.interpolate_styles(_render_float, encode_style, model, labels, style_a, style_b, t, seed,
                                         tile=tile, progress=progress, should_stop=should_stop)


# ----------------------------------------------------------------------------------------------------------------
# registration


def build(config: dict) -> SIAN:
    """A SIAN model of ``config`` (missing keys take :func:`default_config`'s values). Records the perceptual loss's
    feature network in ``config["features_source"]`` when absent (the training loop saves that dict in the
    checkpoint), without building the network."""
    cfg = gan.merged_config(config, default_config(), "SIAN", record_features=True,
                            positive=("ngf", "ngf_max", "n_up", "style_dim", "nef", "enc_layers", "ndf", "d_layers",
                                      "num_d"), non_negative=("noise_nc",))
    return SIAN(cfg)


SPEC = gan.gan_spec("sian", build=build, default_config=default_config, targets=targets, validate=validate,
                    preview=preview, default_lr=DEFAULT_LR)
