"""DRIT++-style stain/modality transfer: content and style disentangled across stain domains.

Liu, Wagner and Peng's multi-modality augmentation for nuclei segmentation restains H&E tiles between stain
"modalities" (domains found by k-means on HSV statistics of CLAHE-equalised tiles,
:func:`napari_nucsynth.stain.stain_domains`) with a DRIT++ model (Lee et al., "Diverse Image-to-Image Translation
via Disentangled Representations", ECCV 2018, and DRIT++, IJCV 2020). This module is that model, small enough to
train on a CPU:

- **Content encoder** ``E_c`` (shared by every domain): a 7 x 7 convolution, ``n_down`` stride-2 convolutions and
  ``n_res`` residual blocks, all instance-normalised (so the per-image colour statistics, the stain, are
  normalised away), giving a content map at 1/2^n_down resolution.
- **Style (attribute) encoder** ``E_s``: :class:`napari_nucsynth.models.sian.StyleEncoder` (stride-2 convolutions
  without normalisation, then the features' spatial mean and standard deviation, then ``mu`` and ``logvar`` of a
  ``style_dim`` code): a reference of any size gives one low-dimensional style code. torch's default
  initialisation and a starting log-variance of ``style_logvar_init`` instead of SPADE's small weights (with
  which codes start near 0 under unit noise and the modalities are learnt much more slowly).
- **Generator** ``G``: ``n_res`` residual blocks and ``n_down`` nearest-neighbour upsamplings, every normalisation an
  AdaIN whose scale and shift an MLP computes from the style code (MUNIT's decoder, DRIT++'s "AdaIN" variant; one
  fused batch-norm call per AdaIN, as MUNIT's), then a 7 x 7 convolution and tanh.
- **Discriminators** (in ``self.discriminator``, so the core's shipped-checkpoint rules apply to both): the GAN
  core's multi-scale spectral-norm PatchGAN (:class:`~napari_nucsynth.models.gan.MultiscaleDiscriminator`) on the
  image beside a one-hot map of its domain (a conditional, multi-domain image discriminator, hinge loss), and a
  **content discriminator** that classifies the domain of a content map (spectrally normalised convolutions,
  global average, linear).

Training (:func:`train_step`, one step of the one training loop :func:`napari_nucsynth.train.train`): the batch
is split into pairs ``(i, p(i))`` from different domains where it can be (:func:`collate`); with ``c_i = E_c(x_i)``
and ``z_i`` sampled from ``E_s(x_i)`` (reparameterised),

- *cross translation*: ``u_i = G(c_i, z_p(i))``, the content of ``x_i`` in the style of ``x_p(i)``;
- *cross-cycle reconstruction* (swap twice and come back): ``x^_i = G(E_c(u_i), E_s(u_p(i)))``, L1 to ``x_i`` x
  ``lambda_cyc``;
- *self-reconstruction*: ``G(c_i, z_i)``, L1 to ``x_i`` x ``lambda_rec``;
- *image adversarial*: the conditional PatchGAN sees real ``x_i`` with domain ``d_i`` and ``u_i`` with domain
  ``d_p(i)`` (hinge) x ``lambda_gan``;
- *content adversarial*: the content discriminator learns the domain of ``c_i`` (cross-entropy); the content
  encoder is pushed towards its uniform prediction (DRIT's content loss with label 0.5, for K domains) x
  ``lambda_content``;
- *KL* of the style code to N(0, I) (summed over the code, averaged over the batch) x ``lambda_kl``;
- *style regression* (DRIT's latent regression, on the translated image): ``mu(E_s(u_i))`` to the (detached) code
  it was given, L1 x ``lambda_style``;
- *haematoxylin structure* (``lambda_h``): one minus the Pearson correlation, over each image's pixels, of the
  haematoxylin density (Ruifrok and Johnston's colour deconvolution, as :func:`napari_nucsynth.stain.rgb_to_hed`)
  of ``u_i`` and of ``x_i``. The correlation ignores the amount and scale of the stain, which the new modality
  sets, and keeps where the haematoxylin is: nuclei stay nuclei. Without it the translations of dark, dense tiles
  to pale, eosin-rich modalities painted the nuclei pink and the segmenter lost them (benchmark AJI ratio 0.72 at
  step 4200, falling as the style matched better);
- optional *perceptual content loss* (``lambda_perc``, default 0): the core's perceptual distance between
  ``u_i`` and ``x_i`` in the frozen feature network (the shipped segmenter's encoder by default) over
  ``perc_weights``, which can weigh only the deep stages, where nuclei rather than colours live.

One forward pass per batch (:func:`translate`; the cross translation and the self-reconstruction in one generator
call) serves one discriminator step (image and content discriminators, on its detached translations and content
maps) and then one step of the encoders and generator (against the just-updated discriminators), as in DRIT's
reference implementation; Adam (0, 0.9) with the core's two time-scale rule (generator at ``lr / 2``,
discriminators at ``2 lr``), forward passes under the core's bfloat16 autocast where the hardware has it, then the
core's EMA of the encoders and generator, which is what transfers and ships.

The training pairs are ``(image, domain map)``: the "labels" the training loop crops beside each image are the
constant map ``domain + 1`` (:func:`domain_maps`), so the loop's crops, flips and checkpoints apply unchanged and
each crop knows its domain (:func:`targets`). ``benchmarks/train_drit.py`` clusters the tiles and trains.

Not built (DRIT++'s diversity machinery, which reference-guided restaining does not need): random-style
translations with the mode-seeking loss and latent regression from the prior.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from .._checks import SeedLike, as_labels, as_rgb, as_rng, as_strength
from . import ModelSpec, register_model
from . import gan
from ._rendering import device_of, evaluating
from .gan import GAN_DEFAULTS, GANModel, MultiscaleDiscriminator
from .sian import StyleEncoder

__all__ = [
    "DRIT",
    "SPEC",
    "ContentDiscriminator",
    "ContentEncoder",
    "DRITGenerator",
    "build",
    "collate",
    "default_checkpoint",
    "default_config",
    "domain_maps",
    "encode_style",
    "load_model",
    "optimizers",
    "preview",
    "style_code",
    "targets",
    "train_step",
    "transfer",
    "translate",
    "validate",
]

#: DRIT's learning rate (0.0001); the generator trains at lr / 2 and the discriminators at 2 lr (the core's rule)
DEFAULT_LR = 2e-4
TRAIN_HINT = ("python benchmarks/train_drit.py --steps 20000 --out drit.pt (clusters the MoNuSeg tiles into stain "
              "domains and trains on them)")


def default_config() -> dict:
    """The default configuration.

    Speed: one training step at 128 px, batch 4 (bf16 autocast, one thread) takes 0.54-0.60 s of CPU time on this
    project's 2-core AMD EPYC (Zen 4) machine with three other training jobs running (1.7-1.9 steps per
    CPU-second; 20000 steps about 3.2 CPU-hours); ``OMP_NUM_THREADS=1 python benchmarks/train_drit.py --steps 20
    --crop 128 --threads 1 --eval-every 0 --out /tmp/drit_speed.pt`` reports it as
    ``cpu_s_per_step_between_steps`` (0.569). Wall time is that divided by the share of a core the run gets (see
    docs/stain_transfer.md, "Speed").

    - ``n_domains``: number of stain domains K (the training data's; 3 for MoNuSeg by :func:`stain_domains`);
    - ``ngf``: width at full resolution (doubling per downsampling); ``n_down``: downsamplings (content at
      1/2^n_down); ``n_res``: residual blocks of the content encoder and of the generator; ``mlp_dim``: hidden
      width of the style MLP; ``style_dim``: length of the style code; ``nef``, ``enc_layers``: style encoder;
      ``style_logvar_init``: the starting log-variance of the style code (-3: standard deviation 0.22; the
      encoder otherwise has torch's default initialisation);
    - ``ncf``: width of the content discriminator;
    - loss weights ``lambda_gan`` (1), ``lambda_rec`` (10), ``lambda_cyc`` (10), ``lambda_content`` (1),
      ``lambda_kl`` (0.01), ``lambda_style`` (1), ``lambda_h`` (the haematoxylin structure term, 0: checkpoints
      from before it have none), ``lambda_perc`` (0, with the core's ``perc_weights`` and
      ``features``);
    - the GAN core's keys (:data:`~napari_nucsynth.models.gan.GAN_DEFAULTS`): image discriminator ``ndf``,
      ``d_layers``, ``num_d``; ``ema_decay``; ``amp``. Feature matching is not used (its real and fake images
      hold different content here).
    """
    return {
        **GAN_DEFAULTS,
        "n_domains": 3,
        "ngf": 16, "n_down": 2, "n_res": 3, "mlp_dim": 64, "style_dim": 8, "nef": 16, "enc_layers": 4,
        "style_logvar_init": -3.0,
        "ncf": 32, "ndf": 16, "d_layers": 3, "num_d": 2,
        "lambda_gan": 1.0, "lambda_rec": 10.0, "lambda_cyc": 10.0, "lambda_content": 1.0, "lambda_kl": 0.01,
        "lambda_style": 1.0, "lambda_h": 0.0, "lambda_perc": 0.0, "lambda_feat": 0.0, "perc_weights": [0.0, 0.0, 0.5, 1.0],
    }


# ----------------------------------------------------------------------------------------------------------------
# networks


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, padding_mode="reflect")


class _ResBlock(nn.Module):
    """conv, IN, ReLU, conv, IN, plus the input."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_conv(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(inplace=True),
                                  _conv(ch, ch, 3), nn.InstanceNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ContentEncoder(nn.Module):
    """Image in [-1, 1] -> content map at 1/2^n_down resolution with ``ngf * 2^n_down`` channels."""

    def __init__(self, ngf: int, n_down: int, n_res: int):
        super().__init__()
        layers: list[nn.Module] = [_conv(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(inplace=True)]
        ch = ngf
        for _ in range(int(n_down)):
            layers += [_conv(ch, 2 * ch, 3, stride=2), nn.InstanceNorm2d(2 * ch), nn.ReLU(inplace=True)]
            ch *= 2
        layers += [_ResBlock(ch) for _ in range(int(n_res))]
        self.body = nn.Sequential(*layers)
        self.channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _AdaIN(nn.Module):
    """Instance normalisation whose per-channel scale and shift are given (``params`` N x 2C: scale, shift);
    ``x_norm * (1 + scale) + shift``, so an all-zero code is plain instance normalisation.

    One fused kernel (MUNIT's ``AdaptiveInstanceNorm2d``): the N x C x H x W input is viewed as one sample of N C
    channels and batch-normalised with the per-sample scales and shifts as the affine weights, which is instance
    normalisation (eps 1e-5, as ``nn.InstanceNorm2d``) followed by the affine map, without the separate
    multiply-add pass over the activations (forward and backward)."""

    eps = 1e-5

    def __init__(self, ch: int):
        super().__init__()
        self.ch = ch

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        scale, shift = params[:, : self.ch], params[:, self.ch :]
        y = F.batch_norm(x.reshape(1, n * c, h, w), None, None, weight=(1 + scale).reshape(-1).to(x.dtype),
                         bias=shift.reshape(-1).to(x.dtype), training=True, eps=self.eps)
        return y.view(n, c, h, w)


class _AdaResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv0, self.norm0 = _conv(ch, ch, 3), _AdaIN(ch)
        self.conv1, self.norm1 = _conv(ch, ch, 3), _AdaIN(ch)
        self.n_params = 4 * ch

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        h = F.relu(self.norm0(self.conv0(x), p[:, : 2 * c]))
        return x + self.norm1(self.conv1(h), p[:, 2 * c :])


class _AdaUp(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv, self.norm = _conv(cin, cout, 3), _AdaIN(cout)
        self.n_params = 2 * cout

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.relu(self.norm(self.conv(x), p))


class DRITGenerator(nn.Module):
    """(content map, style code) -> image in [-1, 1]: AdaIN residual blocks and upsamplings whose every
    normalisation is set by an MLP of the style code, then a 7 x 7 convolution and tanh."""

    def __init__(self, ngf: int, n_down: int, n_res: int, style_dim: int, mlp_dim: int):
        super().__init__()
        ch = ngf * 2 ** int(n_down)
        self.res = nn.ModuleList(_AdaResBlock(ch) for _ in range(int(n_res)))
        ups = []
        for _ in range(int(n_down)):
            ups.append(_AdaUp(ch, ch // 2))
            ch //= 2
        self.ups = nn.ModuleList(ups)
        self.out = _conv(ch, 3, 7)
        n_params = sum(b.n_params for b in (*self.res, *self.ups))
        self.mlp = nn.Sequential(nn.Linear(style_dim, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, mlp_dim),
                                 nn.ReLU(inplace=True), nn.Linear(mlp_dim, n_params))

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        params = self.mlp(style)
        i = 0
        x = content
        for block in (*self.res, *self.ups):
            x = block(x, params[:, i : i + block.n_params])
            i += block.n_params
        return torch.tanh(self.out(x))


class ContentDiscriminator(nn.Module):
    """Content map -> logits of its K domains: spectrally normalised 3 x 3 convolutions (two with stride 2), LReLU,
    global average pooling and a linear layer (DRIT's content discriminator, as a K-way classifier)."""

    def __init__(self, cin: int, ncf: int, n_domains: int):
        super().__init__()
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(cin, ncf, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(ncf, ncf, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(ncf, ncf, 3, padding=1)), nn.LeakyReLU(0.2))
        self.fc = nn.Linear(ncf, int(n_domains))

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(content).mean((2, 3)))


class DRITDiscriminators(nn.Module):
    """The two discriminators of DRIT, in one module: ``image`` (the core's multi-scale PatchGAN on the image and a
    one-hot map of its domain) and ``content`` (:class:`ContentDiscriminator`)."""

    def __init__(self, cfg: dict, content_nc: int):
        super().__init__()
        k = int(cfg["n_domains"])
        self.image = MultiscaleDiscriminator(3 + k, int(cfg["ndf"]), int(cfg["d_layers"]), int(cfg["num_d"]))
        self.content = ContentDiscriminator(content_nc, int(cfg["ncf"]), k)


class DRIT(GANModel):
    """Content encoder, style encoder, generator and both discriminators in one module (one state dict, one
    checkpoint); ``ema`` holds the moving averages of the encoders and the generator, which transfer."""

    G_MODULES = ("content_encoder", "style_encoder", "generator")

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        cfg = self.config
        if int(cfg["n_domains"]) < 1:
            raise ValueError(f"n_domains must be at least 1, got {cfg['n_domains']!r}")
        self.content_encoder = ContentEncoder(int(cfg["ngf"]), int(cfg["n_down"]), int(cfg["n_res"]))
        self.style_encoder = StyleEncoder(int(cfg["nef"]), int(cfg["enc_layers"]), int(cfg["style_dim"]))
        # not SPADE's small initialisation (SIAN's): with it the codes start near 0 under unit noise and the style
        # path learns slowly; torch's default initialisation and a small starting variance learn the modalities
        # several times faster in short runs
        for m in self.style_encoder.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        nn.init.constant_(self.style_encoder.fc_var.bias, float(cfg["style_logvar_init"]))
        self.generator = DRITGenerator(int(cfg["ngf"]), int(cfg["n_down"]), int(cfg["n_res"]),
                                       int(cfg["style_dim"]), int(cfg["mlp_dim"]))
        self.discriminator = DRITDiscriminators(cfg, self.content_encoder.channels)
        self.init_gan()

    @property
    def multiple(self) -> int:
        """Height and width given to the encoders must be multiples of this (inference pads to it)."""
        return 2 ** int(self.config["n_down"])

    def _modules_for(self, ema: bool):
        if ema:
            return self.ema["content_encoder"], self.ema["style_encoder"], self.ema["generator"]
        return self.content_encoder, self.style_encoder, self.generator


def build(config: dict) -> DRIT:
    return DRIT({**default_config(), **dict(config)})


# ----------------------------------------------------------------------------------------------------------------
# data: domain maps, targets, pairing


def domain_maps(images: Sequence, domains: Sequence[int]) -> list[np.ndarray]:
    """The "labels" of DRIT's training pairs: for each image, the constant uint32 map ``domain + 1`` of its shape
    (0 is kept for "no domain", which :func:`targets` refuses). ``domains`` as :func:`stain_domains` returns."""
    doms = np.asarray(domains)
    imgs = list(images)
    if doms.shape != (len(imgs),) or (doms.size and (not np.issubdtype(doms.dtype, np.integer) or doms.min() < 0)):
        raise ValueError(f"domains must hold one non-negative integer per image ({len(imgs)}), got {domains!r}")
    return [np.full(as_rgb(im, f"images[{i}]").shape[:2], int(d) + 1, np.uint32) for i, (im, d) in
            enumerate(zip(imgs, doms))]


def targets(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The domain of one training crop: ``{"domain": int64 scalar}``, read from its constant domain map
    (:func:`domain_maps`). A map that is not constant, or holds 0, is a ``ValueError``: DRIT trains on images and
    their stain domains, not on instance labels."""
    lab = as_labels(labels, "labels")
    v = int(lab.flat[0]) if lab.size else 0
    if v < 1 or np.any(lab != v):
        raise ValueError("drit trains on (image, domain map) pairs: each label map must be the constant domain + 1 "
                         "(napari_nucsynth.models.drit.domain_maps(images, stain_domains(images, k))), "
                         "not instance labels")
    return {"domain": np.asarray(v - 1, np.int64)}


def _pairs(domains: np.ndarray) -> np.ndarray:
    """An involution ``p`` of the batch (``p[p[i]] == i``) pairing samples of different domains where it can: a
    sample of the largest remaining domain with one of another domain, then same-domain pairs, and an odd one
    out paired with itself."""
    n = len(domains)
    p = np.arange(n)
    left = list(range(n))
    while len(left) > 1:
        counts: dict[int, list[int]] = {}
        for i in left:
            counts.setdefault(int(domains[i]), []).append(i)
        groups = sorted(counts.values(), key=len, reverse=True)
        a = groups[0][0]
        b = groups[1][0] if len(groups) > 1 else groups[0][1]
        p[a], p[b] = b, a
        left.remove(a)
        left.remove(b)
    return p


def collate(samples, device) -> dict:
    """Stack the crops (``"image"``: N x 3 x H x W in [0, 1]) and domains (``"domain"``: N int64), and pair the
    samples (``"pair"``: the involution of :func:`_pairs`)."""
    img = np.stack([s[0] for s in samples]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    dom = np.array([int(s[2]["domain"]) for s in samples], np.int64)
    return {"image": torch.from_numpy(img).to(device), "domain": torch.from_numpy(dom).to(device),
            "pair": torch.from_numpy(_pairs(dom)).to(device)}


# ----------------------------------------------------------------------------------------------------------------
# losses and the training step


def _onehot_maps(domain: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    oh = F.one_hot(domain, k).to(like.dtype)
    return oh[:, :, None, None].expand(-1, -1, like.shape[2], like.shape[3])


def _check_domains(model: DRIT, domain: torch.Tensor) -> int:
    k = int(model.config["n_domains"])
    if domain.numel() and (int(domain.min()) < 0 or int(domain.max()) >= k):
        raise ValueError(f"this drit model has {k} domains (0..{k - 1}); the batch holds domain "
                         f"{int(domain.max())}: build it with n_domains equal to the number of stain domains")
    return k


def _reparam(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def translate(model: DRIT, batch: dict, *, cycle: bool = True) -> dict:
    """The forward pass of a training step, shared by the discriminators' and the generator's losses (as in DRIT's
    reference implementation, whose discriminator and encoder-generator updates use one forward pass).

    With ``x`` the batch in [-1, 1], ``p`` its pairing, ``c = E_c(x)``, ``(mu, logvar) = E_s(x)`` and ``z`` sampled
    from them: ``u = G(c, z[p])`` (cross translation) and ``x_self = G(c, z)`` (self-reconstruction) in one
    generator call on the doubled batch (instance normalisation is per sample, so this is the two calls' result);
    with ``cycle``, ``mu2 = mu(E_s(u))`` and ``x_cyc = G(E_c(u), sample(E_s(u))[p])`` (the cross cycle).
    Returns those tensors and ``x``, ``d`` (domains), ``p``, ``k`` (the number of domains, a Python int)."""
    k = _check_domains(model, batch["domain"])
    x, d, p = batch["image"].float() * 2 - 1, batch["domain"], batch["pair"]
    Ec, Es, G = model.content_encoder, model.style_encoder, model.generator
    n = x.shape[0]
    c = Ec(x)
    mu, logvar = Es(x)
    z = _reparam(mu, logvar)
    both = G(torch.cat([c, c]), torch.cat([z[p], z]))
    out = {"k": k, "x": x, "d": d, "p": p, "c": c, "mu": mu, "logvar": logvar, "z": z, "u": both[:n],
           "x_self": both[n:]}
    if cycle:
        u = out["u"]
        mu2, logvar2 = Es(u)
        out["mu2"] = mu2
        out["x_cyc"] = G(Ec(u), _reparam(mu2, logvar2)[p])  # content i (from u_i), style i (from u_p(i))
    return out


def discriminator_loss(model: DRIT, batch: dict, fwd: dict | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Hinge loss of the image discriminator (real images with their domains, cross translations with their style's
    domain) plus the content discriminator's cross-entropy on the domains of the content maps. ``fwd``: the step's
    :func:`translate` (its translations and content maps are detached here); without it a forward pass without
    gradients is made."""
    if fwd is None:
        with torch.no_grad():
            fwd = translate(model, batch, cycle=False)
    k, x, d, p = fwd["k"], fwd["x"], fwd["d"], fwd["p"]
    u, c = fwd["u"].detach(), fwd["c"].detach()
    n = x.shape[0]
    D = model.discriminator
    preds = D.image(torch.cat([torch.cat([u, _onehot_maps(d[p], k, u)], 1), torch.cat([x, _onehot_maps(d, k, x)], 1)]))
    pf = [[t[:n] for t in q] for q in preds]
    pr = [[t[n:] for t in q] for q in preds]
    d_img = gan.d_hinge(pr, pf)
    d_con = F.cross_entropy(D.content(c).float(), d)
    loss = d_img + float(model.config["lambda_content"]) * d_con
    return loss, {"d_loss": float(d_img.detach()), "d_content": float(d_con.detach())}


def haematoxylin_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per image, the Pearson correlation over pixels of the haematoxylin densities of ``a`` and ``b`` (both
    ``N x 3 x H x W`` in [-1, 1]); ``N`` values in [-1, 1], float32. The densities are points2image's
    differentiable :func:`~napari_nucsynth.models.points2image.hed_torch` (the project's colour deconvolution)."""
    from .points2image import hed_torch

    ha = hed_torch((a + 1) / 2)[:, 0].flatten(1)
    hb = hed_torch((b + 1) / 2)[:, 0].flatten(1)
    ha = ha - ha.mean(1, keepdim=True)
    hb = hb - hb.mean(1, keepdim=True)
    return (ha * hb).sum(1) / (ha.norm(dim=1) * hb.norm(dim=1) + eps)


def generator_loss(model: DRIT, batch: dict, fwd: dict | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The encoders' and generator's loss (see the module docstring); logs ``loss`` and every weighted term.
    ``fwd``: the step's :func:`translate` (made here when None)."""
    cfg = model.config
    if fwd is None:
        fwd = translate(model, batch)
    k, x, d, p, z, mu, logvar = (fwd[n] for n in ("k", "x", "d", "p", "z", "mu", "logvar"))
    u, c = fwd["u"], fwd["c"]
    D = model.discriminator
    with gan.frozen(D):  # gradients reach the images and content through D, not D's weights
        preds = D.image(torch.cat([u, _onehot_maps(d[p], k, u)], 1))
        logits = D.content(c).float()
    terms = {
        "g_gan": gan.g_hinge(preds) * float(cfg["lambda_gan"]),
        "g_content": -F.log_softmax(logits, 1).mean() * float(cfg["lambda_content"]),  # CE to the uniform
        "g_rec": F.l1_loss(fwd["x_self"], x) * float(cfg["lambda_rec"]),
        "g_cyc": F.l1_loss(fwd["x_cyc"], x) * float(cfg["lambda_cyc"]),
        "g_kl": (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean() * float(cfg["lambda_kl"]),
        "g_style": F.l1_loss(fwd["mu2"], z[p].detach()) * float(cfg["lambda_style"]),
    }
    if float(cfg.get("lambda_h", 0)):
        terms["g_h"] = (1 - haematoxylin_correlation(u, x)).mean() * float(cfg["lambda_h"])
    if float(cfg.get("lambda_perc", 0)):
        net = gan.features_for(model, x.device)
        terms["g_perc"] = gan.perceptual(net, (u + 1) / 2, (x + 1) / 2, cfg.get("perc_weights", ())) * float(
            cfg["lambda_perc"])
    total = sum(terms.values())
    return total, {"loss": float(total.detach()), **{n: float(v.detach()) for n, v in terms.items()}}


def optimizers(model: DRIT, lr: float | None) -> dict[str, torch.optim.Optimizer]:
    """The core's rule: Adam (0, 0.9); encoders and generator ("g") at ``lr / 2``, both discriminators ("d") at
    ``2 lr`` (``lr`` 2e-4 when None)."""
    lr = DEFAULT_LR if lr is None else float(lr)
    return {"g": torch.optim.Adam(model.g_parameters(), lr=lr / 2, betas=(0.0, 0.9)),
            "d": torch.optim.Adam(model.discriminator.parameters(), lr=lr * 2, betas=(0.0, 0.9))}


def _autocast(model: DRIT, batch: dict):
    dev = batch["image"].device
    dtype = gan.amp_dtype(model.config, dev)
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)


def train_step(model: DRIT, batch: dict, optimizers: dict, step: int) -> dict[str, float]:
    """One step of both discriminators, one step of the encoders and generator, one EMA update.

    One forward pass (:func:`translate`) serves both updates, as in DRIT's reference implementation: the
    discriminators step on its detached translations and content maps, then the encoders and generator step on
    its graph, with the adversarial terms from the just-updated discriminators. Forward passes under the core's
    autocast (:func:`napari_nucsynth.models.gan.amp_dtype`)."""
    with _autocast(model, batch):
        fwd = translate(model, batch)
        d_loss, d_logs = discriminator_loss(model, batch, fwd)
    optimizers["d"].zero_grad(set_to_none=True)
    d_loss.backward()
    optimizers["d"].step()
    with _autocast(model, batch):
        g_loss, g_logs = generator_loss(model, batch, fwd)
    optimizers["g"].zero_grad(set_to_none=True)
    g_loss.backward()
    optimizers["g"].step()
    model.update_ema(step)
    return {**g_logs, **d_logs}


# ----------------------------------------------------------------------------------------------------------------
# inference


def _to_tensor(img: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(device).float()[None] / 127.5 - 1


def encode_style(model: DRIT, reference) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, logvar)`` (float32, ``style_dim``) of a reference image by the EMA style encoder; any size of at
    least 2 x 2 (RGB uint8; grey, RGBA, float in [0, 1] and uint16 are converted)."""
    ref = as_rgb(reference, "reference")
    if min(ref.shape[:2]) < 2:
        raise ValueError(f"reference must be at least 2 x 2 pixels, got {ref.shape[0]} x {ref.shape[1]}")
    with evaluating(model):
        mu, logvar = model.inference("style_encoder")(_to_tensor(ref, device_of(model)))
    return mu[0].float().cpu().numpy(), logvar[0].float().cpu().numpy()


def style_code(model: DRIT, reference, seed: SeedLike = None, *, sample: bool = False) -> np.ndarray:
    """The style code of a reference: its mean ``mu``, or (``sample=True``) ``mu + exp(logvar / 2) * eps`` with
    ``eps`` standard normal drawn from ``seed``. ``reference`` may also be a sequence of images: the mean of their
    codes (a domain's modality rather than one tile's)."""
    refs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    if not refs:
        raise ValueError("reference must be an image or a non-empty sequence of images")
    codes = [encode_style(model, r) for r in refs]
    mu = np.mean([c[0] for c in codes], 0).astype(np.float32)
    if not sample:
        return mu
    logvar = np.mean([c[1] for c in codes], 0)
    eps = as_rng(seed).standard_normal(mu.shape).astype(np.float32)
    return (mu + np.exp(0.5 * logvar) * eps).astype(np.float32)


def check_strength(strength) -> float:
    """``strength`` as a float in [0, 1], else a ValueError that says what it means."""
    return as_strength(strength, "the image's own modality", "the reference's")


def model_strength(model: DRIT) -> float:
    """The model's default transfer strength: its ``config["strength"]`` (chosen on training tiles by
    ``benchmarks/choose_drit_strength.py``), 1 when absent."""
    return check_strength(model.config.get("strength", 1.0))


def transfer(model: DRIT, image, reference, seed: SeedLike = None, *, sample_style: bool = False,
             style: np.ndarray | None = None, strength: float | None = None,
             progress: Callable[[int, int, str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """``image``'s content in ``reference``'s stain modality, by a trained model (the EMA modules, on the model's
    device), as RGB uint8 of ``image``'s shape.

    The image is reflect-padded to a multiple of :attr:`DRIT.multiple` and translated in one piece (the content
    encoder's instance normalisation sees the whole image). ``style`` (a code of length ``style_dim``) replaces the
    reference's when given. ``seed`` draws the style sample with ``sample_style``; otherwise the result is
    deterministic. ``strength`` in [0, 1] moves the style code from the image's own (0: the image decoded in its own
    modality) to the reference's (1); default :func:`model_strength`. A long move (a dark, dense tile to a pale
    one) costs nuclei, a short one leaves more of the old stain: the strength is the knob between the two.
    """
    img = as_rgb(image, "image")
    strength = model_strength(model) if strength is None else check_strength(strength)
    if should_stop is not None and should_stop():
        raise InterruptedError("stain transfer stopped")
    if progress is not None:
        progress(0, 2, "encoding the reference's style")
    if style is None:
        z = style_code(model, reference, seed, sample=sample_style)
    else:
        z = np.asarray(style, np.float32).reshape(-1)
    if z.shape[0] != int(model.config["style_dim"]):
        raise ValueError(f"the style code must have {model.config['style_dim']} values, got {z.shape[0]}")
    if strength < 1.0:
        z = (1.0 - strength) * style_code(model, img) + strength * z
    if should_stop is not None and should_stop():
        raise InterruptedError("stain transfer stopped")
    if progress is not None:
        progress(1, 2, "translating")
    H, W = img.shape[:2]
    m = model.multiple
    ph, pw = -H % m, -W % m
    mode = "reflect" if min(H, W) > max(ph, pw) else "edge"
    x_np = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode=mode) if ph or pw else img
    dev = device_of(model)
    with evaluating(model):
        x = _to_tensor(x_np, dev)
        zt = torch.from_numpy(z[None]).to(dev)
        y = model.inference("generator")(model.inference("content_encoder")(x), zt)[0]
    out = ((y.float().cpu().numpy().transpose(1, 2, 0)[:H, :W] + 1) * 127.5).clip(0, 255)
    if progress is not None:
        progress(2, 2, "translating")
    return np.rint(out).astype(np.uint8)


def default_checkpoint() -> Path:
    """The shipped checkpoint's path (absent until a trained model is shipped)."""
    return Path(__file__).resolve().parents[1] / "data" / "models" / "drit_monuseg.pt"


_MODELS: dict = {}


def load_model(checkpoint, device) -> DRIT:
    """The DRIT model of a checkpoint on ``device`` in eval mode, cached per (path, modification time, device). A
    stripped checkpoint (the EMA modules only) loads too."""
    return gan.load_generator(checkpoint, "drit", device, cache=_MODELS, hint=TRAIN_HINT, build=build)


# ----------------------------------------------------------------------------------------------------------------
# validation and preview (training-loop hooks)


def _center(img: np.ndarray, size: int) -> np.ndarray:
    H, W = img.shape[:2]
    h, w = min(H, size), min(W, size)
    r, c = (H - h) // 2, (W - w) // 2
    return img[r : r + h, c : c + w]


def validate(model: DRIT, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], device,
             crop: int = 256, max_images: int = 6) -> dict[str, float]:
    """Held-out figures (the centre ``crop`` of at most ``max_images`` images, EMA modules):

    - ``rec_l1``: mean absolute error of the self-reconstruction (intensities in [0, 1]);
    - for every ordered pair of images of different domains (of images ``a`` restained to ``b``'s style):
      ``od_ratio``, the distance between the mean optical densities of the result and ``b`` over that of ``a``
      and ``b`` (:func:`napari_nucsynth.stain.mean_optical_density`; the issue's target is <= 0.5), and
      ``h_corr``, the correlation of the haematoxylin density of the result with that of ``a`` (content kept: 1
      is perfect).
    """
    from ..stain import mean_optical_density, rgb_to_hed

    imgs = [_center(as_rgb(im), crop) for im in list(images)[:max_images]]
    doms = [int(np.asarray(lb).flat[0]) - 1 for lb in list(labels)[:max_images]]
    if not imgs:
        return {}
    rec = []
    for im in imgs:
        out = transfer(model, im, im)
        rec.append(np.abs(out.astype(np.float32) - im).mean() / 255.0)
    ratios, corrs = [], []
    for i, a in enumerate(imgs):
        for j, b in enumerate(imgs):
            if i == j or doms[i] == doms[j]:
                continue
            r = transfer(model, a, b)
            dab = np.linalg.norm(mean_optical_density(a) - mean_optical_density(b))
            if dab > 1e-6:
                ratios.append(np.linalg.norm(mean_optical_density(r) - mean_optical_density(b)) / dab)
            ha, hr = rgb_to_hed(a)[..., 0].ravel(), rgb_to_hed(r)[..., 0].ravel()
            if ha.std() > 0 and hr.std() > 0:
                corrs.append(float(np.corrcoef(ha, hr)[0, 1]))
    out = {"rec_l1": float(np.mean(rec))}
    if ratios:
        out["od_ratio"] = float(np.mean(ratios))
    if corrs:
        out["h_corr"] = float(np.mean(corrs))
    return out


def preview(model: DRIT, image: np.ndarray, labels: np.ndarray, device) -> np.ndarray:
    """A held-out crop (centre 256 x 256 at most), its self-reconstruction and its translation with the prior's
    mean style code (zeros), side by side."""
    im = _center(as_rgb(image), 256)
    zero = np.zeros(int(model.config["style_dim"]), np.float32)
    return np.concatenate([im, transfer(model, im, im), transfer(model, im, None, style=zero)], 1)


def _not_a_segmenter(*args, **kwargs):
    raise ValueError("'drit' is a stain-transfer model, not a segmenter: use napari_nucsynth.stain.transfer(image, "
                     "reference, method='drit', checkpoint=...)")


SPEC = register_model(ModelSpec(
    kind="drit", build=build, default_config=default_config, targets=targets, loss=generator_loss,
    predict=_not_a_segmenter, optimizers=optimizers, train_step=train_step, validate=validate, preview=preview,
    collate=collate, default_lr=DEFAULT_LR))
