"""One GAN core for every learned renderer: discriminator, losses, EMA, two time-scale optimisers, one train step.

A learned renderer is one :class:`GANModel` subclass and a config; :func:`gan_spec` turns it into the
:class:`~napari_nucsynth.models.ModelSpec` that the one training loop (:func:`napari_nucsynth.train.train`) runs,
with its checkpoints, resume, SIGINT save, progress updates and previews. What the core provides:

- **Discriminator** (:class:`MultiscaleDiscriminator`): pix2pixHD/SPADE's multi-scale PatchGAN, ``num_d`` scales of
  ``d_layers`` 4 x 4 convolutions, the middle ones spectrally normalised (Miyato et al. 2018) and instance
  normalised, as SPADE's. It sees the model's condition (e.g. the masks' descriptor maps) beside the image.
- **Losses**: hinge adversarial loss (:func:`d_hinge`, :func:`g_hinge`); discriminator feature matching
  (:func:`feature_matching`: L1 over every intermediate layer of every scale, x ``lambda_feat``); a perceptual
  loss in a frozen feature network (:func:`perceptual`, x ``lambda_perc``; the network is
  :func:`napari_nucsynth.models.features.load_features`'s, the shipped segmenter's encoder by default, recorded in
  ``config["features_source"]``); an optional pixel L1 (``lambda_l1``); plus whatever the model adds (KL, style).
- **EMA**: an exponential moving average of the generator's weights (Karras et al.; Yazici et al. 2019), decay
  ``ema_decay`` with the usual warm-up ``min(decay, (1 + step) / (10 + step))``, buffers copied. The EMA copy is
  what renders (previews, validation, :meth:`GANModel.inference`) and what ships.
- **Optimisers** (:func:`optimizers`): Adam, betas (0, 0.9), SPADE's two time-scale rule: generator at ``lr / 2``,
  discriminator at ``2 lr``.
- **Train step** (:func:`train_step`): one discriminator step, one generator step, one EMA update. The forward
  passes run under bfloat16 autocast (``amp``) where the hardware has native bfloat16 (a CPU with AVX-512 BF16 or
  AMX, a CUDA GPU that supports it): on this project's 2-core CPU a SIAN step at 128 px takes 0.6 of the float32
  time (``benchmarks/train_sian.py``). Weights, optimiser state and the EMA stay float32; rendering is float32.

A subclass sets ``G_MODULES`` (the names of its trained generator submodules, e.g. the style encoder and the
generator), builds them and ``self.discriminator`` in ``__init__`` and calls :meth:`GANModel.init_gan` last. It
implements ``inputs(batch) -> (cond or None, real in [-1, 1])`` and ``generate(batch, cond, real, ema=False) ->
(fake in [-1, 1], {name: weighted extra generator loss})``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from . import ModelSpec, register_model

__all__ = [
    "GAN_DEFAULTS", "SHIPPED_PREFIX", "GANModel", "MultiscaleDiscriminator", "PatchDiscriminator", "d_hinge",
    "discriminator_loss", "feature_matching", "features_for", "amp_dtype", "g_hinge", "gan_spec", "generator_loss",
    "optimizers", "perceptual", "frozen", "load_generator", "merged_config", "shipped_state_dict", "train_step"
]

#: the core's configuration keys and defaults (a model's own config adds its keys to these)
GAN_DEFAULTS = {
    "ndf": 32, "d_layers": 3, "num_d": 2,
    "lambda_feat": 10.0, "lambda_perc": 10.0, "lambda_l1": 0.0,
    "perc_weights": [0.125, 0.25, 0.5, 1.0],
    "ema_decay": 0.999,
    "features": "hovernet",
    "amp": "auto",
}


# ----------------------------------------------------------------------------------------------------------------
# discriminator


def _d_conv(cin: int, cout: int, stride: int, sn: bool) -> nn.Module:
    conv = nn.Conv2d(cin, cout, 4, stride=stride, padding=2, bias=not sn)
    nn.init.xavier_normal_(conv.weight, gain=0.02)  # SPADE's initialisation
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return spectral_norm(conv) if sn else conv


class PatchDiscriminator(nn.Module):
    """SPADE's PatchGAN (``NLayerDiscriminator``): a plain first and last convolution, spectral and instance
    normalisation between them; returns the list of every layer's output (the last is the N x 1 x h x w score
    map)."""

    def __init__(self, cin: int, ndf: int, n_layers: int):
        super().__init__()
        seq = [nn.Sequential(_d_conv(cin, ndf, 2, sn=False), nn.LeakyReLU(0.2))]
        nf = ndf
        for n in range(1, int(n_layers)):
            prev, nf = nf, min(nf * 2, 512)
            seq.append(nn.Sequential(_d_conv(prev, nf, 1 if n == n_layers - 1 else 2, sn=True),
                                     nn.InstanceNorm2d(nf, affine=False), nn.LeakyReLU(0.2)))
        seq.append(_d_conv(nf, 1, 1, sn=False))
        self.layers = nn.ModuleList(seq)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` PatchGANs on the input and its 2x, 4x, ... average-pooled copies (pix2pixHD's multi-scale D)."""

    def __init__(self, cin: int, ndf: int = 32, n_layers: int = 3, num_d: int = 2):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(cin, int(ndf), int(n_layers)) for _ in range(int(num_d)))

    def forward(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for i, d in enumerate(self.scales):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(d(x))
        return out


# ----------------------------------------------------------------------------------------------------------------
# losses


def d_hinge(real: Sequence[Sequence[torch.Tensor]], fake: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The discriminator's hinge loss, averaged over scales: ``relu(1 - D(real)) + relu(1 + D(fake))``."""
    r = sum(F.relu(1 - p[-1]).mean() for p in real) / len(real)
    f = sum(F.relu(1 + p[-1]).mean() for p in fake) / len(fake)
    return r + f


def g_hinge(fake: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The generator's hinge loss, averaged over scales: ``-D(fake)``."""
    return -sum(p[-1].mean() for p in fake) / len(fake)


def feature_matching(fake: Sequence[Sequence[torch.Tensor]], real: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """pix2pixHD's discriminator feature matching: L1 between the intermediate layers on fake and on (detached)
    real images, summed over layers, averaged over scales."""
    return sum(F.l1_loss(a, b.detach()) for p, q in zip(fake, real) for a, b in zip(p[:-1], q[:-1])) / len(fake)


_FEATURES: dict = {}


def features_for(model: nn.Module, device) -> nn.Module:
    """The frozen feature network of ``model``'s perceptual loss: its own ``feature_net`` submodule when it has one
    (adain's encoder), else :func:`~napari_nucsynth.models.features.load_features` of ``config["features"]``,
    built once per (name, device)."""
    own = getattr(model, "feature_net", None)
    if own is not None:
        return own
    from .features import load_features

    name = str(model.config.get("features", "hovernet"))
    key = (name, str(device))
    if key not in _FEATURES:
        _FEATURES[key] = load_features(name).to(device)
    return _FEATURES[key]


def perceptual(net: nn.Module, fake01: torch.Tensor, real01: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted L1 between the feature-network activations of ``fake01`` and (detached) ``real01`` (RGB in [0, 1]);
    ``weights`` per stage, shallow to deep (missing ones count 1)."""
    fx = net(fake01)
    with torch.no_grad():
        fy = net(real01)
    w = list(weights) + [1.0] * (len(fx) - len(weights))
    return sum(wi * F.l1_loss(a, b) for wi, a, b in zip(w, fx, fy))


# ----------------------------------------------------------------------------------------------------------------
# the base model


class GANModel(nn.Module):
    """Base of the learned renderers (see the module docstring). ``config`` holds the core's keys
    (:data:`GAN_DEFAULTS`) and the model's own."""

    #: names of the trained generator submodules (optimised together, averaged into ``self.ema``)
    G_MODULES: tuple[str, ...] = ("generator",)

    def init_gan(self) -> None:
        """Make the EMA copies of the generator modules (call at the end of ``__init__``)."""
        self.ema = nn.ModuleDict({n: copy.deepcopy(getattr(self, n)) for n in self.G_MODULES})
        self.ema.requires_grad_(False)
        self.ema.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "ema"):
            self.ema.eval()  # the averaged copy only renders
        return self

    def inference(self, name: str) -> nn.Module:
        """The module that renders: the EMA copy of generator module ``name``."""
        return self.ema[name]

    def g_parameters(self) -> list[nn.Parameter]:
        return [p for n in self.G_MODULES for p in getattr(self, n).parameters() if p.requires_grad]

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(float(self.config.get("ema_decay", 0.999)), (1 + step) / (10 + step))
        for n in self.G_MODULES:
            live, avg = getattr(self, n), self.ema[n]
            for pa, pl in zip(avg.parameters(), live.parameters()):
                pa.lerp_(pl.detach(), 1.0 - decay)
            for ba, bl in zip(avg.buffers(), live.buffers()):
                ba.copy_(bl)

    def load_shipped(self, state_dict: dict) -> None:
        """Load a state dict that may lack the discriminator and the live generator (a shipped checkpoint keeps
        only the EMA copy): missing live modules take the EMA's weights. ``ValueError`` on anything else
        missing or unexpected."""
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        live = tuple(f"{n}." for n in self.G_MODULES)
        bad = [k for k in missing if not (k.startswith("discriminator.") or k.startswith(live))]
        if bad or unexpected:
            raise ValueError(f"the weights do not fit this {type(self).__name__} (missing {bad[:3]}, unexpected "
                             f"{list(unexpected)[:3]})")
        if any(k.startswith(live) for k in missing):
            for n in self.G_MODULES:
                getattr(self, n).load_state_dict(self.ema[n].state_dict())

    # what subclasses implement
    def inputs(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        raise NotImplementedError

    def generate(self, batch: dict, cond, real, *, ema: bool = False) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


#: state-dict prefixes a shipped checkpoint keeps: the moving average (what renders) and any frozen submodule a
#: model keeps in its checkpoint (adain's encoder)
SHIPPED_PREFIX = ("ema.", "feature_net.")


def shipped_state_dict(model: GANModel) -> dict:
    """The weights a shipped checkpoint keeps (:data:`SHIPPED_PREFIX`): not the discriminator, not the live
    generator modules (the EMA copy renders)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(SHIPPED_PREFIX)}


def _d_input(cond, img):
    return img if cond is None else torch.cat([cond, img], 1)


def discriminator_loss(model: GANModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The hinge loss of the discriminator on one batch (fakes generated without gradients)."""
    cond, real = model.inputs(batch)
    with torch.no_grad():
        fake, _ = model.generate(batch, cond, real)
    n = real.shape[0]
    preds = model.discriminator(torch.cat([_d_input(cond, fake), _d_input(cond, real)], 0))
    pf = [[t[:n] for t in p] for p in preds]
    pr = [[t[n:] for t in p] for p in preds]
    loss = d_hinge(pr, pf)
    d_real = sum(F.relu(1 - p[-1]).mean() for p in pr) / len(pr)
    return loss, {"d_loss": float(loss.detach()), "d_real": float(d_real.detach()),
                  "d_fake": float((loss - d_real).detach())}


def generator_loss(model: GANModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's loss on one batch: hinge + ``lambda_feat`` x feature matching + ``lambda_perc`` x perceptual
    + ``lambda_l1`` x L1 + the model's own terms; logs ``loss`` and every term (weighted)."""
    cfg = model.config
    cond, real = model.inputs(batch)
    fake, extra = model.generate(batch, cond, real)
    n = real.shape[0]
    with frozen(model.discriminator):
        preds = model.discriminator(torch.cat([_d_input(cond, fake), _d_input(cond, real)], 0))
    pf = [[t[:n] for t in p] for p in preds]
    pr = [[t[n:] for t in p] for p in preds]
    terms = {"g_gan": g_hinge(pf)}
    if float(cfg.get("lambda_feat", 0)):
        terms["g_fm"] = feature_matching(pf, pr) * float(cfg["lambda_feat"])
    if float(cfg.get("lambda_perc", 0)):
        net = features_for(model, fake.device)
        terms["g_perc"] = perceptual(net, (fake + 1) / 2, (real + 1) / 2, cfg.get("perc_weights", ())) * float(
            cfg["lambda_perc"])
    if float(cfg.get("lambda_l1", 0)):
        terms["g_l1"] = F.l1_loss(fake, real) * float(cfg["lambda_l1"]) / 2
    terms.update(extra)
    total = sum(terms.values())
    return total, {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


def optimizers(model: GANModel, lr: float | None, *, default_lr: float = 2e-4) -> dict[str, torch.optim.Optimizer]:
    """Adam with betas (0, 0.9) and SPADE's two time-scale rule: generator modules ("g") at ``lr / 2``,
    discriminator ("d") at ``2 lr``."""
    lr = default_lr if lr is None else float(lr)
    return {"g": torch.optim.Adam(model.g_parameters(), lr=lr / 2, betas=(0.0, 0.9)),
            "d": torch.optim.Adam(model.discriminator.parameters(), lr=lr * 2, betas=(0.0, 0.9))}


def amp_dtype(config: dict, device) -> torch.dtype | None:
    """The autocast dtype of training steps: bfloat16 when ``config["amp"]`` is "bf16", or "auto" on hardware with
    native bfloat16 (a CPU with AVX-512 BF16 or AMX; a CUDA GPU that supports it); None ("none", or "auto"
    elsewhere: emulated bfloat16 is slower than float32)."""
    mode = str(config.get("amp", "auto"))
    if mode not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {mode!r}")
    dev = torch.device(device)
    if mode == "none" or dev.type not in ("cpu", "cuda"):
        return None
    if mode == "bf16":
        return torch.bfloat16
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else None


def _autocast(model: GANModel, batch: dict):
    ref = batch.get("image", next(iter(batch.values())))
    dev = ref.device if isinstance(ref, torch.Tensor) else torch.device("cpu")
    dtype = amp_dtype(model.config, dev)
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters without gradients for the block (gradients reach its input, not its weights), each
    parameter's ``requires_grad`` restored after."""
    req = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(module.parameters(), req):
            p.requires_grad_(r)


def train_step(model: GANModel, batch: dict, optimizers: dict, step: int, *,
               d_loss_fn: Callable | None = None, g_loss_fn: Callable | None = None) -> dict[str, float]:
    """One discriminator step, one generator step (``D_steps_per_G`` = 1), one EMA update; forward passes under
    :func:`amp_dtype`'s autocast. ``d_loss_fn`` / ``g_loss_fn`` (``(model, batch) -> (loss, logs)``) replace the
    core's hinge losses for models with their own (Points2Image; DRIT has its own step sharing one forward pass)."""
    with _autocast(model, batch):
        d_loss, d_logs = (d_loss_fn or discriminator_loss)(model, batch)
    optimizers["d"].zero_grad(set_to_none=True)
    d_loss.backward()
    optimizers["d"].step()
    with _autocast(model, batch):
        g_loss, g_logs = (g_loss_fn or generator_loss)(model, batch)
    optimizers["g"].zero_grad(set_to_none=True)
    g_loss.backward()
    optimizers["g"].step()
    model.update_ema(step)
    return {**g_logs, **d_logs}


def _not_a_segmenter(kind: str):
    def predict(*args, **kwargs):
        raise ValueError(f"{kind!r} is a generator (it renders images from masks), not a segmenter: render with "
                         f"napari_nucsynth.render.render(labels, style, method={kind!r}, checkpoint=...) or "
                         f"`nucsynth render --method {kind}`")
    return predict


def merged_config(config: dict | None, defaults: dict, name: str, *, positive: Sequence[str] = (),
                  non_negative: Sequence[str] = (), record_features: bool = False) -> dict:
    """A model's full config: ``config`` over ``defaults`` (a key ``defaults`` lacks is a ``ValueError`` listing the
    known ones), the ``positive`` keys checked to be integers >= 1 and the ``non_negative`` ones >= 0. With
    ``record_features``, the perceptual loss's feature network is recorded as ``"features_source"`` when absent,
    in the result and in ``config`` itself (the training loop saves that dict in the checkpoint), without building
    the network."""
    extra = {"features_source"} if record_features else set()
    unknown = set(config or {}) - set(defaults) - extra
    if unknown:
        raise ValueError(f"unknown {name} config key(s) {sorted(unknown)}; known: {sorted(defaults)}")
    cfg = {**defaults, **(config or {})}
    for key in positive:
        if int(cfg[key]) < 1:
            raise ValueError(f"{name} config {key!r} must be a positive integer, got {cfg[key]!r}")
    for key in non_negative:
        if int(cfg[key]) < 0:
            raise ValueError(f"{name} config {key!r} must be 0 or more, got {cfg[key]!r}")
    if record_features and "features_source" not in cfg:
        from .features import feature_source

        cfg["features_source"] = feature_source(cfg["features"])
        if config is not None:
            config.setdefault("features_source", cfg["features_source"])
    return cfg


def gan_spec(kind: str, *, build: Callable[[dict], GANModel], default_config: Callable[[], dict],
             targets: Callable[..., dict], preview: Callable[..., object] | None = None,
             validate: Callable[..., dict] | None = None, collate: Callable[..., dict] | None = None,
             default_lr: float = 2e-4) -> ModelSpec:
    """Register a learned renderer on the core: the training loop gets the core's optimisers and train step."""
    return register_model(ModelSpec(
        kind=kind, build=build, default_config=default_config, targets=targets, loss=generator_loss,
        predict=_not_a_segmenter(kind), optimizers=lambda model, lr: optimizers(model, lr, default_lr=default_lr),
        train_step=train_step, validate=validate, preview=preview, collate=collate, default_lr=default_lr))


def load_generator(checkpoint, kind: str, device, *, cache: dict, hint: str, name: str | None = None,
                   build: Callable[[dict], nn.Module] | None = None) -> nn.Module:
    """The ``kind`` model of a checkpoint (a full or a shipped one: :meth:`GANModel.load_shipped`) on ``device`` in
    eval mode, cached in ``cache`` per (path, modification time, device), one model at a time. ``build`` is the
    registered kind's when None; a checkpoint that does not fit its config raises a ``ValueError`` that names
    ``name`` (``kind`` when None) and the command ``hint`` that trains one."""
    from . import get_model, load_checkpoint

    path = Path(checkpoint)
    key = (str(path.resolve()), path.stat().st_mtime if path.exists() else None, str(device))
    if key not in cache:
        ck = load_checkpoint(path, kind=kind)
        model = (build or get_model(kind).build)(dict(ck["config"]))
        try:
            model.load_shipped(ck["state_dict"])
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{path} does not match its {name or kind} config ({exc}); retrain it with "
                             f"{hint}") from None
        model.to(device).eval()
        cache.clear()  # one model at a time
        cache[key] = model
    return cache[key]
