"""DAFF-GAN's masks -> H&E renderer: a pix2pixHD-style coarse-to-fine generator with criss-cross attention.

Cheng et al.'s DAFF-GAN builds its generators on pix2pixHD (Wang, Liu, Zhu, Tao, Kautz and Catanzaro,
"High-Resolution Image Synthesis and Semantic Manipulation with Conditional GANs", CVPR 2018) with criss-cross
attention blocks (Huang et al., CCNet, ICCV 2019; :mod:`napari_nucsynth.models.blocks`) in the bottleneck. This
module holds the generator, used twice: here to render instance masks as H&E, and in
:mod:`napari_nucsynth.models.daff` to turn points into instance masks.

- **Generator** (:class:`Pix2PixHDGenerator`), pix2pixHD's ``LocalEnhancer`` with one enhancer:

  - the *global generator* G1 runs at half resolution on the 2x average-pooled input: a 7x7 convolution (``c7s1``,
    reflection padding), ``n_down`` stride-2 3x3 convolutions (widths doubling from ``2 ngf`` up to ``ngf_max``),
    ``n_blocks`` residual blocks at 1/2^(n_down+1) resolution with a recurrent criss-cross attention block
    (``cca_recurrence`` passes with shared weights, so every position sees the whole image) between the first and
    second half of them, and ``n_down`` stride-2 transposed 4x4 convolutions back to half resolution; its last
    features (``2 ngf`` channels, without G1's output layer, as pix2pixHD does when G1 feeds an enhancer) are
    *added* to the enhancer's;
  - the *local enhancer* G2 at full resolution: ``c7s1`` to ``ngf``, one stride-2 convolution to ``2 ngf`` (half
    resolution), the sum with G1's features, ``n_local_blocks`` residual blocks, one transposed convolution back
    to full resolution and a ``c7s1`` output convolution with tanh.

  Every convolution but the last is followed by batch normalisation and ReLU (residual blocks: conv, norm, ReLU,
  conv, norm, plus the input). The batch normalisation's running statistics make inference local (pix2pixHD's
  instance normalisation would depend on the window), and where a ``style`` vector conditions the generator (the
  renderer), every normalisation is followed by a per-channel affine map from it (``(1 + gamma(z)) x + beta(z)``,
  as AdaIN / SPADE's style path). The two generators are trained jointly (pix2pixHD trains G1 first, then both);
  input height and width must be multiples of ``2^(n_down + 1)`` (inference pads).
- **Conditioning** (:func:`conditioning`): pix2pixHD's label map and instance *edge map*: the semantic map of the
  masks (1 on nuclei) and their boundary map (1 where a pixel's 4-neighbours hold another id, background
  included: the edges of touching nuclei and of each nucleus against the background,
  ``skimage.segmentation.find_boundaries(mode="thick")``), plus ``noise_nc`` channels of seeded noise (a hash of
  the seed and the global pixel position, :func:`napari_nucsynth.models.sian.hash_normal`, so windows agree).
- **Style** (``style_source``), two designs:

  - ``"code"`` (the default): the reference's stain statistics themselves,
    :func:`napari_nucsynth.models.points2image.style_code`'s 12 numbers (mean and standard deviation of the H, E
    and D optical densities inside the nuclei and in the background; the nuclei are the reference's labels when
    given, else detected), mapped by a small MLP (:class:`StyleCodeMLP`) to the ``style_dim`` vector; in training
    the code of the real crop with its true nuclei, and a *style loss* (``lambda_style``: the L1 distance between
    the code of the fake, measured on the same nuclei, and the code it was given) makes the generator render the
    colours it is told. Deterministic (``sample_style`` changes nothing). The first full run with the encoder
    below rendered every reference in the same pink (docs/daff.md): a stain code the generator must reproduce
    cannot be ignored as a learned encoding can;
  - ``"encoder"``: as SIAN (:mod:`napari_nucsynth.models.sian`, whose
    :class:`~napari_nucsynth.models.sian.StyleEncoder` this reuses): a VAE-style encoder of the reference tile
    (stride-2 convolutions, the spatial mean and standard deviation of the last features, ``mu`` and ``logvar`` of
    a ``style_dim`` vector, KL x ``lambda_kld``); at inference the reference's mean ``mu`` (or a sample from the
    seed).

  Either way two styles can be blended (:func:`interpolate_styles`, the Render widget's style slider).
- **Training** on the GAN core (:mod:`napari_nucsynth.models.gan`): pix2pixHD's multi-scale PatchGAN sees the
  conditioning beside the image; hinge loss (pix2pixHD uses LSGAN), discriminator feature matching x 10,
  perceptual loss x 10 in a frozen feature network (by default the shipped segmenter's encoder; pix2pixHD's
  VGG-19 where its weights are local), KL; Adam (0, 0.9) with two time-scales, bf16 autocast where native, and
  the EMA of the encoder and generator, which renders and ships.
- **Any size**: fully convolutional; outputs larger than ``tile`` are generated in windows that overlap by
  ``2 halo + blend`` px and are cross-faded (criss-cross attention gives every window global context, so windows
  agree only approximately: the halo keeps each window's borders out of the pixels it contributes, the blend
  hides the rest). A 1000 x 1000 MoNuSeg tile renders in one window with the default ``tile`` of 1024.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .._checks import SeedLike, as_labels
from . import _rendering, gan
from .blocks import RecurrentCrissCross
from .gan import GAN_DEFAULTS, GANModel, MultiscaleDiscriminator
from ._rendering import center_crop, device_of, padded_conditioning, run_windows, window_model
from . import sian
from .sian import StyleEncoder, _init, hash_normal

__all__ = [
    "COND_NC", "Pix2PixHD", "Pix2PixHDGenerator", "SPEC", "build", "conditioning", "default_config",
    "encode_style", "interpolate_styles", "preview", "render", "run_windows", "style_vector", "targets", "validate",
]

#: conditioning channels: semantic map, instance boundary (edge) map
COND_NC = 2
#: the designs of the style path (see the module docstring)
STYLE_SOURCES = ("code", "encoder")
#: pix2pixHD's and SPADE's --lr (the generator trains at half of it, the discriminator at twice it)
DEFAULT_LR = 2e-4


def default_config() -> dict:
    """The default configuration (a 256 x 256 render takes about 0.08 s on one thread of this project's CPU, 2.2 M
    generator parameters; see ``benchmarks/train_pix2pixhd.py --time-render``).

    - ``ngf``: the local enhancer's width at full resolution (its half-resolution blocks and the global
      generator's first layer have ``2 ngf``; widths double per downsampling up to ``ngf_max``); ``n_down``:
      downsamplings of the global generator (inputs must be multiples of ``2^(n_down + 1)``); ``n_blocks``:
      residual blocks in its bottleneck (the criss-cross attention sits in their middle); ``n_local_blocks``:
      residual blocks of the enhancer; ``cca_reduction``, ``cca_recurrence``: CCNet's query/key reduction and
      number of passes (0 passes: no attention);
    - ``noise_nc``: seeded noise channels at the input (0: none); ``style_dim``: length of the style vector;
      ``style_source``: ``"code"`` (the reference's 12-number stain code through an MLP, with the style loss
      x ``lambda_style``) or ``"encoder"`` (a learned VAE encoder of the reference: ``nef``, ``enc_layers``, its
      width and depth; ``lambda_kld``, the weight of its KL term);
    - the GAN core's keys (:data:`napari_nucsynth.models.gan.GAN_DEFAULTS`);
    - ``tile``: outputs larger than this (px) are generated in windows; ``halo``: the margin of each window not
      kept; ``blend``: width of the cross-fade between windows.
    """
    return {
        **GAN_DEFAULTS,
        "ngf": 16, "ngf_max": 128, "n_down": 3, "n_blocks": 4, "n_local_blocks": 2,
        "cca_reduction": 8, "cca_recurrence": 2,
        "noise_nc": 2, "style_dim": 64, "style_source": "code", "lambda_style": 2.0,
        "nef": 16, "enc_layers": 5, "lambda_kld": 0.05,
        "tile": 1024, "halo": 64, "blend": 32,
    }


# ----------------------------------------------------------------------------------------------------------------
# the generator (shared with models/daff.py)


class StyleNorm(nn.Module):
    """Batch normalisation with a learned per-channel affine map, modulated by a style vector when ``style_dim``
    > 0: ``bn(x) * (1 + gamma(z)) + beta(z)``."""

    def __init__(self, channels: int, style_dim: int = 0):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.style = _init(nn.Linear(style_dim, 2 * channels)) if style_dim > 0 else None

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        y = self.norm(x)
        if self.style is None or z is None:
            return y
        gamma, beta = self.style(z)[:, :, None, None].chunk(2, 1)
        return torch.addcmul(beta, y, 1 + gamma)


class ConvLayer(nn.Module):
    """A convolution (``k`` x ``k``, stride ``stride``; a stride-2 4 x 4 transposed convolution with ``up``;
    reflection padding for ``reflect``), a :class:`StyleNorm` and a ReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, *, stride: int = 1, up: bool = False, reflect: bool = False,
                 style_dim: int = 0):
        super().__init__()
        if up:
            self.conv = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False)
        else:
            self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False,
                                  padding_mode="reflect" if reflect else "zeros")
        self.norm = StyleNorm(cout, style_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x), z))


class ResBlock(nn.Module):
    """pix2pixHD's residual block: conv, norm, ReLU, conv, norm, plus the input."""

    def __init__(self, channels: int, style_dim: int = 0):
        super().__init__()
        self.conv_0 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm_0 = StyleNorm(channels, style_dim)
        self.conv_1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm_1 = StyleNorm(channels, style_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.norm_0(self.conv_0(x), z))
        return x + self.norm_1(self.conv_1(h), z)


class GlobalGenerator(nn.Module):
    """pix2pixHD's G1 without its output layer: ``c7s1`` to ``ngf``, ``n_down`` downsamplings, ``n_blocks``
    residual blocks with recurrent criss-cross attention in their middle, ``n_down`` upsamplings; returns
    ``ngf``-channel features at the input's resolution."""

    def __init__(self, in_nc: int, ngf: int, ngf_max: int, n_down: int, n_blocks: int, *, style_dim: int = 0,
                 cca_reduction: int = 8, cca_recurrence: int = 2):
        super().__init__()
        ch = [min(ngf * 2**s, max(ngf_max, ngf)) for s in range(n_down + 1)]
        self.head = ConvLayer(in_nc, ch[0], 7, reflect=True, style_dim=style_dim)
        self.down = nn.ModuleList(ConvLayer(ch[s], ch[s + 1], 3, stride=2, style_dim=style_dim)
                                  for s in range(n_down))
        self.blocks = nn.ModuleList(ResBlock(ch[-1], style_dim) for _ in range(n_blocks))
        self.split = n_blocks // 2
        self.cca = RecurrentCrissCross(ch[-1], cca_reduction, cca_recurrence) if cca_recurrence > 0 else None
        self.up = nn.ModuleList(ConvLayer(ch[s + 1], ch[s], up=True, style_dim=style_dim)
                                for s in range(n_down - 1, -1, -1))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        x = self.head(x, z)
        for layer in self.down:
            x = layer(x, z)
        for i, block in enumerate(self.blocks):
            if i == self.split and self.cca is not None:
                x = self.cca(x)
            x = block(x, z)
        if self.split == len(self.blocks) and self.cca is not None:  # no blocks after it
            x = self.cca(x)
        for layer in self.up:
            x = layer(x, z)
        return x


class Pix2PixHDGenerator(nn.Module):
    """pix2pixHD's coarse-to-fine generator (global generator at half resolution + one local enhancer; see the
    module docstring): N x ``in_nc`` x H x W (+ an N x ``style_dim`` style vector when ``style_dim`` > 0) ->
    N x ``out_nc`` x H x W in [-1, 1] (tanh). H and W must be multiples of :attr:`multiple`."""

    def __init__(self, in_nc: int, out_nc: int, *, ngf: int = 8, ngf_max: int = 128, n_down: int = 3,
                 n_blocks: int = 4, n_local_blocks: int = 2, style_dim: int = 0, cca_reduction: int = 8,
                 cca_recurrence: int = 2):
        super().__init__()
        self.n_down = int(n_down)
        self.style_dim = int(style_dim)
        g = 2 * int(ngf)
        self.global_net = GlobalGenerator(in_nc, g, max(int(ngf_max), g), self.n_down, int(n_blocks),
                                          style_dim=self.style_dim, cca_reduction=int(cca_reduction),
                                          cca_recurrence=int(cca_recurrence))
        self.local_head = ConvLayer(in_nc, int(ngf), 7, reflect=True, style_dim=self.style_dim)
        self.local_down = ConvLayer(int(ngf), g, 3, stride=2, style_dim=self.style_dim)
        self.local_blocks = nn.ModuleList(ResBlock(g, self.style_dim) for _ in range(int(n_local_blocks)))
        self.local_up = ConvLayer(g, int(ngf), up=True, style_dim=self.style_dim)
        self.out = nn.Conv2d(int(ngf), out_nc, 7, padding=3, padding_mode="reflect")

    @property
    def multiple(self) -> int:
        return 2 ** (self.n_down + 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        _, _, H, W = x.shape
        m = self.multiple
        if H % m or W % m:
            raise ValueError(f"the generator needs height and width multiples of {m}, got {H} x {W}")
        if self.style_dim and z is None:
            raise ValueError("this generator is conditioned on a style vector: pass z")
        h = self.local_down(self.local_head(x, z), z) + self.global_net(F.avg_pool2d(x, 2), z)
        for block in self.local_blocks:
            h = block(h, z)
        return torch.tanh(self.out(self.local_up(h, z)))


def generator_kwargs(cfg: dict) -> dict:
    """The :class:`Pix2PixHDGenerator` arguments of a config."""
    return {k: int(cfg[k]) for k in ("ngf", "ngf_max", "n_down", "n_blocks", "n_local_blocks", "cca_reduction",
                                     "cca_recurrence")}


# ----------------------------------------------------------------------------------------------------------------
# the model


class StyleCodeMLP(nn.Module):
    """The ``"code"`` style path: a reference's 12-number stain code
    (:func:`napari_nucsynth.models.points2image.style_code`) -> N x ``style_dim`` style vector (two linear layers)."""

    def __init__(self, style_dim: int, hidden: int = 64):
        super().__init__()
        from .points2image import STYLE_NC

        self.net = nn.Sequential(nn.Linear(STYLE_NC, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, style_dim))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code.float())


class Pix2PixHD(GANModel):
    """Style encoder, generator and discriminator in one module (one state dict, one checkpoint), trained on the
    GAN core; ``ema`` holds the moving averages of the encoder and generator, which render."""

    G_MODULES = ("encoder", "generator")

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        cfg = self.config
        if cfg["style_source"] == "code":
            self.encoder = StyleCodeMLP(int(cfg["style_dim"]))
        else:
            self.encoder = StyleEncoder(int(cfg["nef"]), int(cfg["enc_layers"]), int(cfg["style_dim"]))
        self.generator = Pix2PixHDGenerator(COND_NC + int(cfg["noise_nc"]), 3, style_dim=int(cfg["style_dim"]),
                                            **generator_kwargs(cfg))
        self.discriminator = MultiscaleDiscriminator(COND_NC + 3, int(cfg["ndf"]), int(cfg["d_layers"]),
                                                     int(cfg["num_d"]))
        self.init_gan()

    @property
    def multiple(self) -> int:
        """Height and width of the generator's input must be multiples of this."""
        return self.generator.multiple

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioning maps (what the discriminator sees beside the image) and the real image in [-1, 1]."""
        cond = torch.cat([batch["semantic"], batch["boundary"]], 1).float()
        return cond, batch["image"].float() * 2 - 1

    def generate(self, batch: dict, cond: torch.Tensor, real: torch.Tensor, *,
                 ema: bool = False) -> tuple[torch.Tensor, dict]:
        """Training forward pass with fresh noise channels; returns the fake in [-1, 1] and the weighted extra
        generator terms. ``"code"``: the style from the stain code of ``real`` on its true nuclei, and the style
        loss (``g_style``); ``"encoder"``: the style sampled from the encoding of ``real`` (reparameterised) and
        the KL term (``g_kld``)."""
        enc, gen = (self.ema["encoder"], self.ema["generator"]) if ema else (self.encoder, self.generator)
        code = None
        if self.config["style_source"] == "code":
            from .points2image import style_code_torch

            with torch.no_grad():
                code = style_code_torch((real.float() + 1) / 2, batch["semantic"].float())
            z, extra = enc(code), {}
        else:
            mu, logvar = enc(real)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
            kld = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
            extra = {"g_kld": kld * float(self.config["lambda_kld"])}
        x = cond
        nz = int(self.config["noise_nc"])
        if nz:
            n, _, h, w = cond.shape
            x = torch.cat([cond, torch.randn(n, nz, h, w, device=cond.device, dtype=cond.dtype)], 1)
        fake = gen(x, z)
        if code is not None and float(self.config["lambda_style"]) > 0:
            from .points2image import stain_code_loss

            extra["g_style"] = stain_code_loss((fake.float() + 1) / 2, batch["semantic"].float(), code) * \
                float(self.config["lambda_style"])
        return fake, extra


# ----------------------------------------------------------------------------------------------------------------
# conditioning, targets, training hooks


def conditioning(labels) -> np.ndarray:
    """pix2pixHD's conditioning of instance labels: float32 (2, H, W) = semantic map (1 on nuclei) and instance
    boundary map (1 where a 4-neighbour holds another id, background included)."""
    from skimage.segmentation import find_boundaries

    lab = as_labels(labels)
    return np.stack([(lab > 0), find_boundaries(lab, connectivity=1, mode="thick")]).astype(np.float32)


def targets(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The conditioning maps of one training sample: ``semantic`` and ``boundary`` (each 1 x H x W, float32)."""
    c = conditioning(labels)
    return {"semantic": c[:1], "boundary": c[1:]}


def validate(model: Pix2PixHD, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], device,
             max_pairs: int = 4, crop: int = 256) -> dict[str, float]:
    """Reconstruction of held-out pairs (the centre ``crop`` of at most ``max_pairs`` pairs, each rendered from its
    own labels in its own style, seed 0, by the EMA generator): mean absolute error ``l1`` (intensities in [0, 1])
    and the ``perceptual`` distance in the model's feature network (the core's weighting, unscaled)."""
    l1, perc = [], []
    net = gan.features_for(model, device)
    for img, lab in list(zip(images, labels))[:max_pairs]:
        im, lb = center_crop(np.asarray(img), np.asarray(lab), crop)
        out = _render_float(model, lb, style_vector(model, im, nuclei=lb), 0)
        with torch.no_grad():
            fake = torch.from_numpy(out.transpose(2, 0, 1))[None].to(device)
            real = torch.from_numpy(im.transpose(2, 0, 1).astype(np.float32) / 255)[None].to(device)
            l1.append(float((fake - real).abs().mean()))
            perc.append(float(gan.perceptual(net, fake, real, model.config["perc_weights"])))
    return {"l1": float(np.mean(l1)), "perceptual": float(np.mean(perc))} if l1 else {}


def preview(model: Pix2PixHD, image: np.ndarray, labels: np.ndarray, device) -> np.ndarray:
    """What the generator makes of a held-out pair's labels in its own style (centre 512 x 512 at most, seed 0)."""
    im, lb = center_crop(np.asarray(image), np.asarray(labels), 512)
    return render(model, lb, im, seed=0, style_labels=lb)


# ----------------------------------------------------------------------------------------------------------------
# inference


def encode_style(model: Pix2PixHD, image, nuclei=None) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, logvar)`` (float32 vectors of length ``style_dim``) of a style reference image (RGB uint8; grey,
    RGBA, float in [0, 1] and uint16 are converted). ``"code"`` models: the MLP of the image's stain code, its
    nuclei ``nuclei`` (labels or a mask of the image's shape) or, when None, detected; ``logvar`` is then zeros
    (the style is deterministic). ``"encoder"`` models: SIAN's encoding of the image (``nuclei`` unused)."""
    if model.config["style_source"] != "code":
        return sian.encode_style(model, image)
    from .points2image import style_code

    code = torch.from_numpy(style_code(image, nuclei))[None].to(device_of(model))
    with torch.no_grad():
        mu = model.inference("encoder")(code)[0].float().cpu().numpy()
    return mu, np.zeros_like(mu)


def style_vector(model: Pix2PixHD, image, seed: SeedLike = None, *, sample: bool = False,
                 nuclei=None) -> np.ndarray:
    """The style vector of a reference (see :func:`encode_style`): ``"code"`` models, the MLP of its stain code
    (``seed`` and ``sample`` change nothing); ``"encoder"`` models, SIAN's mean or (``sample=True``) a sample drawn
    from ``seed``."""
    if model.config["style_source"] != "code":
        return sian.style_vector(model, image, seed, sample=sample)
    return encode_style(model, image, nuclei)[0]


def seeded_noise(seed: int, channels: int, r0: int, c0: int, h: int, w: int, *, stream0: int = 0) -> np.ndarray:
    """``channels`` x h x w standard normal noise at global positions ``(r0.., c0..)``: channel ``j`` is
    :func:`~napari_nucsynth.models.sian.hash_normal` stream ``stream0 + j`` (the same at a position whatever window
    it is computed in)."""
    return np.stack([hash_normal(seed, stream0 + j, r0, c0, h, w) for j in range(channels)]) if channels else \
        np.zeros((0, h, w), np.float32)


def _render_float(model: Pix2PixHD, labels, style: np.ndarray, seed: int, *, tile: int | None = None,
                  progress: Callable[[int, int, str], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """The EMA generator on the conditioning of ``labels`` with style vector ``style``: float32 H x W x 3 in
    [0, 1] (padded to a multiple of the generator's inside, in windows beyond ``tile``, see :func:`run_windows`)."""
    cfg = model.config
    gen = model.inference("generator")
    dev = device_of(model)
    cond, size = padded_conditioning(labels, conditioning, COND_NC, model.multiple)
    z = torch.from_numpy(np.asarray(style, np.float32).reshape(1, -1)).to(dev)
    if z.shape[1] != int(cfg["style_dim"]):
        raise ValueError(f"the style vector must have {cfg['style_dim']} values, got {z.shape[1]}")
    nz = int(cfg["noise_nc"])

    def fn(window: np.ndarray, r0: int, c0: int) -> np.ndarray:
        _, h, w = window.shape
        x = np.concatenate([window, seeded_noise(seed, nz, r0, c0, h, w)], 0)
        t = torch.from_numpy(x)[None].to(dev)
        if dev.type == "cpu":  # oneDNN's convolutions are faster on channels-last input
            t = t.contiguous(memory_format=torch.channels_last)
        return gen(t, z)[0].float().cpu().numpy()

    return window_model(model, fn, cond, size, tile=int(cfg["tile"] if tile is None else tile),
                        halo=int(cfg["halo"]), blend=int(cfg["blend"]), progress=progress, should_stop=should_stop)


def render(model: Pix2PixHD, labels, style_image, seed: SeedLike = None, *, style_labels=None,
           sample_style: bool = False, tile: int | None = None,
           progress: Callable[[int, int, str], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Render instance ``labels`` (any size: windows of ``tile`` px beyond it) in the style of ``style_image``
    with a trained pix2pixHD model (on its device): the parameters and result of
    :func:`napari_nucsynth.models.sian.render`, the seed drawing the noise channels (and the style sample of an
    ``"encoder"`` model). ``style_labels``: the reference's nuclei, which a ``"code"`` model measures its stain
    code on (detected when None)."""
    def vector(m, image, s, sample=False):
        return style_vector(m, image, s, sample=sample, nuclei=style_labels)

    return _rendering.render_styled(_render_float, vector, model, labels, style_image, seed,
                                    sample_style=sample_style, tile=tile, progress=progress, should_stop=should_stop)


def interpolate_styles(model: Pix2PixHD, labels, style_a, style_b, t, seed: SeedLike = None, *,
                       tile: int | None = None, progress=None, should_stop=None):
    """Render ``labels`` with the style vector ``(1 - t) mu_a + t mu_b`` between the mean styles of two references
    (the same noise for every ``t``). ``t`` a number (0 gives exactly ``render(model, labels, style_a, seed)``) or
    a sequence of numbers (then a list of images)."""
    return _rendering.interpolate_styles(_render_float, encode_style, model, labels, style_a, style_b, t, seed,
                                         tile=tile, progress=progress, should_stop=should_stop)


# ----------------------------------------------------------------------------------------------------------------
# registration


_POSITIVE = ("ngf", "ngf_max", "n_down", "n_blocks", "cca_reduction", "style_dim", "nef", "enc_layers", "ndf",
             "d_layers", "num_d", "tile")
_NON_NEGATIVE_FLOATS = ("lambda_style", "lambda_kld")
_NON_NEGATIVE = ("n_local_blocks", "cca_recurrence", "noise_nc", "halo", "blend")


def build(config: dict) -> Pix2PixHD:
    """A pix2pixHD model of ``config`` (missing keys take :func:`default_config`'s values). Records the perceptual
    loss's feature network in ``config["features_source"]`` and the style design in ``config["style_source"]``
    when absent (what the training loop saves), without building the feature network."""
    cfg = gan.merged_config(config, default_config(), "pix2pixhd", positive=_POSITIVE, non_negative=_NON_NEGATIVE,
                            record_features=True)
    if cfg["style_source"] not in STYLE_SOURCES:
        raise ValueError(f"pix2pixhd config 'style_source' must be one of {STYLE_SOURCES}, got {cfg['style_source']!r}")
    if config is not None:  # recorded, as the feature network is, so a checkpoint says which design it holds
        config.setdefault("style_source", cfg["style_source"])
    for key in _NON_NEGATIVE_FLOATS:
        try:
            ok = float(cfg[key]) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"pix2pixhd config {key!r} must be a number >= 0, got {cfg[key]!r}")
    return Pix2PixHD(cfg)


SPEC = gan.gan_spec("pix2pixhd", build=build, default_config=default_config, targets=targets, validate=validate,
                    preview=preview, default_lr=DEFAULT_LR)
