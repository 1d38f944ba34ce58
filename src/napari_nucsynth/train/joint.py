"""Gong et al.'s joint adversarial training of a generator, a discriminator and a segmenter (WACV 2021, Alg. 1).

Gong, Chen, Zhang and Doermann, "Style Consistent Image Generation for Nuclei Instance Segmentation", WACV 2021:
a generator makes H&E images of nucleus masks in the style of real tiles, a discriminator judges them, and a
segmenter learns from real *and* synthetic pairs; the segmenter's loss on the synthetic images flows back into the
generator through a **gradient reversal layer** (Ganin & Lempitsky, ICML 2015), so the generator learns to make
images the segmenter finds hard (it *ascends* the segmentation loss) while the discriminator keeps them realistic,
and the segmenter *descends* the same loss. :func:`train_joint` runs it for any registered generator ("adain",
"sian") with any registered segmenter ("hovernet", "maskrcnn"); see ``docs/joint.md``.

Phases (``pretrain_steps = (g, s)``, counted inside ``steps``)
    1. steps ``[0, g)``: generator and discriminator on the global loss alone (skipped, ``g = 0``, by default when
       ``generator_checkpoint`` is given);
    2. steps ``[g, g + s)``: the segmenter on real pairs alone (skipped by default with ``segmenter_checkpoint``);
    3. steps ``[g + s, steps)``: all three. Each step: one discriminator step (real pairs against the synthetic
       images, hinge loss), then one step of generator and segmenter together on
       ``global_G + L_S(real) + synthetic_weight * L_S(GRL_lambda(G(masks, style)))``: one backward pass, in which
       the reversal layer hands the generator ``-lambda`` times the segmenter's gradient (``adversarial="reverse"``,
       the paper) or ``+lambda`` times it (``"acgan"``, the AC-GAN-style ablation in which the generator *helps*
       the segmenter), while the segmenter receives its own gradient unchanged.

``lambda`` follows Ganin & Lempitsky's ramp over phase 3, ``lam * (2 / (1 + exp(-10 p)) - 1)`` with ``p`` the
share of phase 3 done, so the adversary starts gently on a generator that has just been pretrained.

Synthetic pairs
    The masks of sample ``i`` are the labels of the batch's (augmented) real crop ``i``, turned once more by a random
    dihedral transform (so they are not the layout of any image in the batch), and they are rendered in the style
    of crop ``i - 1`` (the batch rolled by one, as the generators' own training does). The adapters
    (:class:`_AdaINAdapter`, :class:`_SIANAdapter`) say how a generator makes a *differentiable* image of them:

    - ``adain``: the classic render of the masks in the style crop (with its labels as style labels) is the
      content; the AdaIN decoder restyles it to the style crop. The classic render is numpy (not differentiable):
      the decoder is what trains. Global loss: Huang & Belongie's content + style loss of that same forward pass,
      plus ``adv_weight`` x the hinge loss of a small conditional PatchGAN discriminator owned by this loop (AdaIN
      has none of its own), which sees the image and the nuclear mask.
    - ``sian``: the descriptor maps of the masks and the style vector of the style crop (reparameterised sample of
      its encoding) into the generator. Global loss: SIAN's own generator loss on the real pairs (hinge + feature
      matching + VGG + KL, its reconstruction setting) plus the hinge loss of SIAN's own multi-scale discriminator
      on the synthetic pairs; the discriminator's step is SIAN's on the real pairs plus the hinge on the synthetic.

Checkpoint
    One file in the one format (:func:`napari_nucsynth.models.save_checkpoint`) of kind ``"joint"``: ``config``
    holds the generator's and segmenter's kinds and configs and the loop's settings, ``state_dict`` the sub-dicts
    ``"generator"``, ``"segmenter"`` and ``"discriminator"`` (empty for SIAN, whose discriminator is part of its
    state dict), plus the optimisers and the random state, so a stopped run resumes exactly. At the end (and on
    stop) :func:`export_parts` writes ``<out stem>.generator.pt`` and ``<out stem>.segmenter.pt`` beside ``out``:
    ordinary "adain"/"sian" and "hovernet"/"maskrcnn" checkpoints for the Render and Segment widgets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .._checks import SeedLike, as_rng
from . import (
    TrainResult,
    TrainUpdate,
    _augment,
    _default_collate,
    _rng_state,
    load_pairs,
)

__all__ = ["GENERATORS", "SEGMENTERS", "export_parts", "grad_reverse", "lambda_at", "part_paths", "train_joint"]

#: the generator and segmenter kinds the joint loop can pair
GENERATORS = ("adain", "sian")
SEGMENTERS = ("hovernet", "maskrcnn")
#: the default GRL weight (the ramp's end value), the synthetic share of the segmenter's loss, the weight of the
#: joint PatchGAN's adversarial term in AdaIN's global loss
LAMBDA = 0.1
SYNTHETIC_WEIGHT = 1.0
ADV_WEIGHT = 1.0


# ----------------------------------------------------------------------------------------------------------------
# the gradient reversal layer and its schedule


def _grl_function():
    import torch

    class _Scale(torch.autograd.Function):
        """Identity forward; backward multiplies the gradient by ``coeff`` (negative: a reversal layer)."""

        @staticmethod
        def forward(ctx, x, coeff):
            ctx.coeff = float(coeff)
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * ctx.coeff, None

    return _Scale


_GRL = None


def grad_reverse(x, coeff: float):
    """``x`` unchanged, but the gradient flowing back through it is multiplied by ``coeff`` (``-lambda`` for
    Ganin & Lempitsky's gradient reversal layer, ``+lambda`` for the AC-GAN ablation)."""
    global _GRL
    if _GRL is None:
        _GRL = _grl_function()
    return _GRL.apply(x, coeff)


def lambda_at(step: int, start: int, steps: int, lam: float) -> float:
    """The GRL weight at global step ``step`` of a run whose joint phase is ``[start, steps)``: Ganin & Lempitsky's
    ramp ``lam * (2 / (1 + exp(-10 p)) - 1)``, ``p`` the share of the joint phase done (0 before it)."""
    if step < start:
        return 0.0
    p = min(1.0, (step - start + 1) / max(1, steps - start))
    return float(lam * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0))


def _lr_factor(i: int, total: int) -> float:
    """:func:`napari_nucsynth.train.train`'s schedule (linear warm-up, cosine to 1 %) at a network's ``i``-th update
    of ``total``."""
    total = max(1, int(total))
    warm = max(1, min(200, total // 20))
    if i < warm:
        return (i + 1) / warm
    return float(0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(1.0, (i - warm) / max(1, total - warm)))))


# ----------------------------------------------------------------------------------------------------------------
# a PatchGAN for generators with no discriminator of their own


def _patch_discriminator(cin: int, ndf: int = 32, n_layers: int = 3):
    """A conditional PatchGAN (pix2pix's 70 x 70 at ``n_layers = 3``: 4 x 4 convolutions, spectral norm, LReLU),
    returning an N x 1 x h x w map of patch scores."""
    from torch import nn
    from torch.nn.utils.parametrizations import spectral_norm

    layers: list = [spectral_norm(nn.Conv2d(cin, ndf, 4, 2, 1)), nn.LeakyReLU(0.2)]
    nf = ndf
    for n in range(1, int(n_layers)):
        prev, nf = nf, min(nf * 2, 256)
        layers += [spectral_norm(nn.Conv2d(prev, nf, 4, 2 if n < n_layers - 1 else 1, 1)), nn.LeakyReLU(0.2)]
    layers.append(spectral_norm(nn.Conv2d(nf, 1, 4, 1, 1)))
    return nn.Sequential(*layers)


def _hinge_d(real_scores, fake_scores):
    import torch.nn.functional as F

    return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()


# ----------------------------------------------------------------------------------------------------------------
# synthetic masks


def _dihedral(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    a = np.rot90(a, k)
    return np.ascontiguousarray(a[:, ::-1] if flip else a)


def _classic_content(syn_lab: np.ndarray, style_rgb: np.ndarray, style_lab: np.ndarray, fallback: np.ndarray,
                     seed: int) -> np.ndarray:
    """The classic render of ``syn_lab`` in the style crop (its labels as style labels); ``fallback`` (the real crop
    the masks come from, turned the same way) when there is nothing to render from."""
    from ..presynthesis import ClassicRenderer

    if not syn_lab.any() or not style_lab.any():
        return fallback
    try:
        return ClassicRenderer()(syn_lab, style_rgb, style_labels=style_lab, seed=seed)
    except ValueError:
        return fallback


def _to_tensor(arrs, device):
    import torch

    return torch.from_numpy(np.stack(arrs).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)).to(device)


# ----------------------------------------------------------------------------------------------------------------
# generator adapters


class _AdaINAdapter:
    """AdaIN refine-synthesis: decoder trained, VGG encoder fixed, a joint-loop PatchGAN (see the module docstring)."""

    kind = "adain"

    def __init__(self, model, disc_cfg: dict, adv_weight: float):
        self.model = model
        self.disc_cfg = dict(disc_cfg)
        self.disc = _patch_discriminator(4, int(disc_cfg["ndf"]), int(disc_cfg["n_layers"]))
        self.adv_weight = float(adv_weight)

    @staticmethod
    def default_disc_cfg() -> dict:
        return {"kind": "patchgan", "ndf": 32, "n_layers": 3}

    def to(self, dev):
        self.model.to(dev)
        self.disc.to(dev)

    def train(self):
        self.model.train()
        self.disc.train()

    def optimizers(self, lr: float) -> dict:
        import torch

        return {"g": torch.optim.Adam(self.model.decoder.parameters(), lr=lr),
                "d": torch.optim.Adam(self.disc.parameters(), lr=lr, betas=(0.5, 0.999))}

    def prepare(self, real: list, syn_labs: list, seeds: list, dev) -> dict:
        """Contents (numpy classic renders), styles, real images and the nuclear masks, on ``dev``."""
        import torch

        n = len(real)
        contents = []
        for i in range(n):
            j = (i - 1) % n
            contents.append(_classic_content(syn_labs[i], real[j][0], real[j][1], real[i][2], seeds[i]))
        x = _to_tensor([r[0] for r in real], dev)
        return {"content": _to_tensor(contents, dev), "style": x.roll(1, 0), "real": x,
                "real_mask": torch.from_numpy(np.stack([r[1] > 0 for r in real]).astype(np.float32))[:, None].to(dev),
                "syn_mask": torch.from_numpy(np.stack([s > 0 for s in syn_labs]).astype(np.float32))[:, None].to(dev)}

    def synthesize(self, batch: dict):
        """``(synthetic N x 3 x H x W in about [0, 1], its global (non-adversarial) loss, logs)``: one forward pass."""
        from ..models.adain import adain_losses

        total, logs, out = adain_losses(self.model, batch["content"], batch["style"])
        return out, total, {"g_content": logs["content"], "g_style": logs["style"]}

    def d_loss(self, batch: dict, fake):
        import torch

        real = self.disc(torch.cat([batch["real"], batch["real_mask"]], 1))
        fk = self.disc(torch.cat([fake.detach(), batch["syn_mask"]], 1))
        loss = _hinge_d(real, fk)
        return loss, {"d_loss": float(loss.detach())}

    def g_loss(self, batch: dict, fake, own):
        import torch

        self.disc.requires_grad_(False)
        try:
            g_adv = -self.disc(torch.cat([fake, batch["syn_mask"]], 1)).mean() * self.adv_weight
        finally:
            self.disc.requires_grad_(True)
        return own + g_adv, {"g_adv": float(g_adv.detach())}

    def state_dicts(self) -> tuple[dict, dict]:
        return _cpu(self.model.state_dict()), _cpu(self.disc.state_dict())

    def load(self, gen_sd: dict, disc_sd: dict | None) -> None:
        self.model.load_state_dict(gen_sd)
        if disc_sd:
            self.disc.load_state_dict(disc_sd)


class _SIANAdapter:
    """SIAN: style encoder + generator on descriptor maps, its own multi-scale discriminator."""

    kind = "sian"

    def __init__(self, model, disc_cfg: dict | None = None, adv_weight: float = 1.0):
        self.model = model
        self.disc = None
        self.disc_cfg = None

    @staticmethod
    def default_disc_cfg() -> None:
        return None

    def to(self, dev):
        self.model.to(dev)

    def train(self):
        self.model.train()

    def optimizers(self, lr: float) -> dict:
        from ..models.sian import optimizers

        return optimizers(self.model, lr)

    def prepare(self, real: list, syn_labs: list, seeds: list, dev) -> dict:
        import torch

        from ..models.sian import conditioning

        c_real = np.stack([conditioning(r[1]) for r in real])
        c_syn = np.stack([conditioning(s) for s in syn_labs])
        x = _to_tensor([r[0] for r in real], dev)
        cr = torch.from_numpy(c_real).to(dev)
        return {"image": x, "semantic": cr[:, :1], "direction": cr[:, 1:3], "distance": cr[:, 3:],
                "cond_syn": torch.from_numpy(c_syn).to(dev), "style": x.roll(1, 0)}

    def synthesize(self, batch: dict):
        import torch

        m = self.model
        mu, logvar = m.encode(batch["style"] * 2 - 1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        fake = m.generator(batch["cond_syn"], z)
        return (fake + 1) / 2, None, {}

    def d_loss(self, batch: dict, fake):
        import torch
        import torch.nn.functional as F

        from ..models.sian import discriminator_loss

        own, _logs = discriminator_loss(self.model, batch)
        preds = self.model.discriminator(torch.cat([batch["cond_syn"], fake.detach() * 2 - 1], 1))
        syn = sum(F.relu(1 + p[-1]).mean() for p in preds) / len(preds)
        loss = own + syn
        return loss, {"d_loss": float(loss.detach()), "d_syn": float(syn.detach())}

    def g_loss(self, batch: dict, fake, own):
        import torch

        from ..models.sian import generator_loss

        total, logs = generator_loss(self.model, batch)
        d = self.model.discriminator
        d.requires_grad_(False)
        try:
            preds = d(torch.cat([batch["cond_syn"], fake * 2 - 1], 1))
        finally:
            d.requires_grad_(True)
        g_syn = -sum(p[-1].mean() for p in preds) / len(preds)
        out = {f"g_{k}" if not k.startswith("g_") else k: v for k, v in logs.items() if k != "loss"}
        out["g_adv_syn"] = float(g_syn.detach())
        return total + g_syn, out

    def state_dicts(self) -> tuple[dict, dict]:
        return _cpu(self.model.state_dict()), {}

    def load(self, gen_sd: dict, disc_sd: dict | None) -> None:
        self.model.load_state_dict(gen_sd)


_ADAPTERS = {"adain": _AdaINAdapter, "sian": _SIANAdapter}


def _cpu(sd: dict) -> dict:
    return {k: v.detach().cpu() for k, v in sd.items()}


def _for_rebuild(cfg: dict) -> dict:
    """A saved config to rebuild from: weights come from the state dict, not from a pretrained file."""
    return {**cfg, "pretrained": None} if "pretrained" in cfg else dict(cfg)


# ----------------------------------------------------------------------------------------------------------------
# the three networks and one step


class _Joint:
    """Generator (through its adapter), discriminator and segmenter with their optimisers; :meth:`step` is one step
    of any phase. Built by :func:`train_joint`; the tests drive it directly."""

    def __init__(self, generator: str, segmenter: str, gen_cfg: dict, seg_cfg: dict, disc_cfg, *, dev, lr_g: float,
                 lr_s: float, adversarial: str, synthetic_weight: float, adv_weight: float):
        import torch

        from ..models import get_model

        self.gspec, self.sspec = get_model(generator), get_model(segmenter)
        self.gen_cfg, self.seg_cfg = gen_cfg, seg_cfg
        gmodel = self.gspec.build(gen_cfg)  # fills in the VGG source where the generator records one
        self.adapter = _ADAPTERS[generator](gmodel, disc_cfg, adv_weight)
        self.seg = self.sspec.build(seg_cfg)
        self.dev = dev
        self.adapter.to(dev)
        self.seg.to(dev)
        self.adversarial = adversarial
        self.synthetic_weight = float(synthetic_weight)
        self.opts = {f"gen_{k}": o for k, o in self.adapter.optimizers(lr_g).items()}
        self.opts["seg"] = torch.optim.AdamW([p for p in self.seg.parameters() if p.requires_grad], lr=lr_s,
                                             weight_decay=1e-4)
        for o in self.opts.values():
            for g in o.param_groups:
                g.setdefault("base_lr", g["lr"])
        self.collate = self.sspec.collate or _default_collate

    @property
    def gen(self):
        return self.adapter.model

    def set_lr(self, g_factor: float, s_factor: float) -> None:
        for name, o in self.opts.items():
            f = s_factor if name == "seg" else g_factor
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * f

    def seg_batch(self, imgs, labs):
        return self.collate([(im, lb, self.sspec.targets(im, lb)) for im, lb in zip(imgs, labs)], self.dev)

    def step(self, phase: str, real: list, syn_labs: list, seeds: list, lam: float) -> dict:
        """One step. ``phase``: "generator" (D, then G on the global loss), "segmenter" (S on real pairs) or
        "joint" (D, then G and S together with the reversal layer of weight ``lam``). ``real``: (rgb, labels,
        rgb turned like the synthetic masks) per sample; ``syn_labs``: the synthetic masks; ``seeds``: of their
        classic renders. Returns the logs (floats)."""
        logs: dict = {}
        seg_real = None
        if phase in ("segmenter", "joint"):
            seg_real = self.seg_batch([r[0] for r in real], [r[1] for r in real])
        if phase == "segmenter":
            loss, _slogs = self.sspec.loss(self.seg, seg_real)
            self.opts["seg"].zero_grad(set_to_none=True)
            loss.backward()
            self.opts["seg"].step()
            return {"loss": float(loss.detach()), "seg_real": float(loss.detach())}
        a = self.adapter
        batch = a.prepare(real, syn_labs, seeds, self.dev)
        fake, own, glogs = a.synthesize(batch)
        logs.update(glogs)
        # the discriminator: real pairs against the synthetic ones (no gradient into the generator)
        d_loss, dlogs = a.d_loss(batch, fake)
        self.opts["gen_d"].zero_grad(set_to_none=True)
        d_loss.backward()
        self.opts["gen_d"].step()
        logs.update(dlogs)
        own = fake.new_zeros(()) if own is None else own
        g_total, alogs = a.g_loss(batch, fake, own)
        logs.update(alogs)
        logs["g_loss"] = float(g_total.detach())
        total = g_total
        if phase == "joint":
            coeff = -lam if self.adversarial == "reverse" else lam
            syn_in = grad_reverse(fake, coeff)
            seg_syn = self.seg_batch([r[0] for r in real], syn_labs)  # targets of the synthetic masks
            seg_syn["image"] = syn_in
            l_syn, _ = self.sspec.loss(self.seg, seg_syn)
            l_real, _ = self.sspec.loss(self.seg, seg_real)
            total = total + l_real + self.synthetic_weight * l_syn
            logs.update({"seg_real": float(l_real.detach()), "seg_syn": float(l_syn.detach()), "lambda": float(lam)})
            self.opts["seg"].zero_grad(set_to_none=True)
        self.opts["gen_g"].zero_grad(set_to_none=True)
        total.backward()
        self.opts["gen_g"].step()
        if phase == "joint":
            self.opts["seg"].step()
        logs["loss"] = float(total.detach())
        return logs


def _draw(imgs, labs, t_idx, batch_size: int, crop: int, rng: np.random.Generator):
    """One step's data: ``batch_size`` augmented real crops, each with its synthetic masks (its labels turned by a
    random dihedral transform), the crop turned the same way, and a seed for the classic render."""
    real, syn, seeds = [], [], []
    for _ in range(batch_size):
        i = t_idx[int(rng.integers(0, len(t_idx)))]
        im, lb = _augment(imgs[i], labs[i], crop, rng)
        k, flip = int(rng.integers(0, 4)), bool(rng.random() < 0.5)
        real.append((im, lb, _dihedral(im, k, flip)))
        syn.append(_dihedral(lb, k, flip))
        seeds.append(int(rng.integers(0, 2**31)))
    return real, syn, seeds


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def part_paths(out) -> tuple[Path, Path]:
    """Where :func:`train_joint` exports the parts of its checkpoint ``out``: ``<stem>.generator.pt`` and
    ``<stem>.segmenter.pt`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.generator.pt"), out.with_name(f"{out.stem}.segmenter.pt")


def export_parts(joint_ckpt, generator_out, segmenter_out) -> tuple[Path, Path]:
    """Write the generator and the segmenter of a "joint" checkpoint as ordinary checkpoints of their kinds
    ("adain"/"sian", "hovernet"/"maskrcnn"; no optimiser state), usable at once by
    :func:`napari_nucsynth.render.render` and :func:`napari_nucsynth.segment.segment` (``checkpoint=``). Returns
    their paths."""
    from ..models import load_checkpoint, save_checkpoint

    ck = load_checkpoint(joint_ckpt, kind="joint")
    cfg, sd = ck["config"], ck["state_dict"]
    data = {**ck.get("train_data", {}), "joint_checkpoint": str(joint_ckpt), "adversarial": cfg.get("adversarial")}
    g = save_checkpoint(generator_out, kind=cfg["generator"], config=cfg["generator_config"],
                        state_dict=sd["generator"], step=ck["step"], metrics=ck.get("metrics", {}), train_data=data)
    s = save_checkpoint(segmenter_out, kind=cfg["segmenter"], config=cfg["segmenter_config"],
                        state_dict=sd["segmenter"], step=ck["step"], metrics=ck.get("metrics", {}), train_data=data)
    return g, s


# ----------------------------------------------------------------------------------------------------------------
# the loop


def train_joint(generator: str, segmenter: str, images, labels, *, steps: int, out, resume=None,
                device: str = "auto", seed: SeedLike = 0, batch_size: int = 4, crop: int = 256,
                lr: float | None = None, segmenter_lr: float | None = None, adversarial: str = "reverse",
                pretrain_steps: tuple[int, int] | None = None, save_every: int = 200, preview_every: int = 0, generator_checkpoint=None, segmenter_checkpoint=None,
                progress: Callable[[int, int, str], None] | None = None,
                should_stop: Callable[[], bool] | None = None, on_update: Callable[[TrainUpdate], None] | None = None,
                train_data: dict | None = None, generator_config: dict | None = None,
                segmenter_config: dict | None = None, lam: float = LAMBDA,
                synthetic_weight: float = SYNTHETIC_WEIGHT, adv_weight: float = ADV_WEIGHT) -> TrainResult:
    """Train a generator, a discriminator and a segmenter together (Gong et al., WACV 2021; module docstring).

    Parameters
    ----------
    generator, segmenter : str
        A generator kind ("adain", "sian") and a segmenter kind ("hovernet", "maskrcnn").
    images, labels : folders or sequences of arrays
        The real pairs (:func:`napari_nucsynth.train.load_pairs`); all of them train (no validation split).
    steps : int
        Total steps, pretraining included (a resumed run continues up to this number).
    out : path
        The "joint" checkpoint, written every ``save_every`` steps, on stop and at the end; at the end and on stop
        the parts are also exported beside it (:func:`part_paths`, :func:`export_parts`).
    resume : path, optional
        A "joint" checkpoint to continue from (networks, optimisers, step, random state; its settings are used).
    lr : float, optional
        Peak learning rate of the generator (and its discriminator); None: the generator kind's ``default_lr``.
    segmenter_lr : float, optional
        Peak learning rate of the segmenter; None: its kind's ``default_lr`` (a lower one suits a segmenter started
        from ``segmenter_checkpoint``). Each network follows the warm-up and cosine schedule of
        :func:`napari_nucsynth.train.train` over its own updates.
    adversarial : {"reverse", "acgan"}
        "reverse": the generator ascends the segmenter's loss on synthetic images (gradient reversal, the paper);
        "acgan": it descends it (the AC-GAN-style ablation).
    pretrain_steps : (int, int), optional
        Steps of generator + discriminator pretraining and then of segmenter pretraining, inside ``steps``. Default:
        a fifth of ``steps`` each, and 0 for a part started from a checkpoint.
    generator_checkpoint, segmenter_checkpoint : path, optional
        Start the generator / the segmenter from these checkpoints (their configs too).
    generator_config, segmenter_config : dict, optional
        Configurations of networks built from scratch (the kinds' defaults otherwise).
    lam : float
        The gradient reversal weight reached at the end of the ramp (:func:`lambda_at`).
    synthetic_weight : float
        Weight of the segmenter's loss on synthetic pairs (1: real and synthetic pairs count the same).
    adv_weight : float
        Weight of the joint PatchGAN's hinge loss in AdaIN's global loss (unused for SIAN).
    progress, should_stop, on_update : callables, optional
        As :func:`napari_nucsynth.train.train`: "step", "checkpoint" and "preview" updates; ``should_stop()`` ends
        the run after the current step, saving and exporting.
    train_data : dict, optional
        What to record about the data (defaults to the image names and counts).

    Returns
    -------
    TrainResult
        ``metrics`` holds ``generator_checkpoint`` and ``segmenter_checkpoint``: the exported parts.
    """
    import torch

    from ..devices import resolve_device
    from ..models import get_model, load_checkpoint, save_checkpoint

    if int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    imgs, labs, names = load_pairs(images, labels)
    dev = resolve_device(device)
    rng = as_rng(seed)
    t_idx = list(range(len(imgs)))
    ck = None
    if resume is not None:
        ck = load_checkpoint(resume, kind="joint")
        cfg = dict(ck["config"])
        generator, segmenter = cfg["generator"], cfg["segmenter"]
    else:
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, got {generator!r}")
        if segmenter not in SEGMENTERS:
            raise ValueError(f"segmenter must be one of {', '.join(SEGMENTERS)}, got {segmenter!r}")
        if adversarial not in ("reverse", "acgan"):
            raise ValueError(f"adversarial must be 'reverse' (the paper) or 'acgan' (the ablation), got "
                             f"{adversarial!r}")
        gspec, sspec = get_model(generator), get_model(segmenter)
        g_ck = load_checkpoint(generator_checkpoint, kind=generator) if generator_checkpoint is not None else None
        s_ck = load_checkpoint(segmenter_checkpoint, kind=segmenter) if segmenter_checkpoint is not None else None
        if pretrain_steps is None:
            pretrain_steps = (0 if g_ck else steps // 5, 0 if s_ck else steps // 5)
        pg, ps = (int(v) for v in pretrain_steps)
        if pg < 0 or ps < 0 or pg + ps > steps:
            raise ValueError(f"pretrain_steps must be two non-negative numbers of steps summing to at most steps "
                             f"({steps}), got {pretrain_steps!r}")
        gen_cfg = (_for_rebuild(g_ck["config"]) if g_ck else {**gspec.default_config(), **(generator_config or {})})
        seg_cfg = (_for_rebuild(s_ck["config"]) if s_ck else {**sspec.default_config(), **(segmenter_config or {})})
        adapter_cls = _ADAPTERS[generator]
        cfg = {"generator": generator, "segmenter": segmenter, "generator_config": gen_cfg,
               "segmenter_config": seg_cfg, "discriminator_config": adapter_cls.default_disc_cfg(),
               "adversarial": adversarial, "lambda": float(lam), "synthetic_weight": float(synthetic_weight),
               "adv_weight": float(adv_weight), "pretrain_steps": [pg, ps],
               "lr_generator": float(gspec.default_lr if lr is None else lr), "lr_segmenter": float(sspec.default_lr if segmenter_lr is None else segmenter_lr),
               "crop": int(crop), "batch_size": int(batch_size)}
    pg, ps = (int(v) for v in cfg["pretrain_steps"])
    data = train_data or {"images": names, "n_train": len(imgs), "crop": crop, "batch_size": batch_size,
                          "generator_checkpoint": str(generator_checkpoint) if generator_checkpoint else None,
                          "segmenter_checkpoint": str(segmenter_checkpoint) if segmenter_checkpoint else None}
    if ck is None:  # before building: the initial weights are drawn from torch's generator
        torch.manual_seed(int(rng.integers(2**31)))
    gen_cfg = cfg["generator_config"] if ck is None else _for_rebuild(cfg["generator_config"])
    seg_cfg = cfg["segmenter_config"] if ck is None else _for_rebuild(cfg["segmenter_config"])
    J = _Joint(cfg["generator"], cfg["segmenter"], gen_cfg, seg_cfg, cfg["discriminator_config"], dev=dev,
               lr_g=cfg["lr_generator"], lr_s=cfg["lr_segmenter"], adversarial=cfg["adversarial"],
               synthetic_weight=cfg["synthetic_weight"], adv_weight=cfg["adv_weight"])
    if ck is None:
        cfg["generator_config"], cfg["segmenter_config"] = gen_cfg, seg_cfg  # with what build() filled in
        if g_ck is not None:
            J.adapter.load(g_ck["state_dict"], None)
        if s_ck is not None:
            J.seg.load_state_dict(s_ck["state_dict"])
    start, metrics = 0, {}
    if ck is not None:
        J.adapter.load(ck["state_dict"]["generator"], ck["state_dict"].get("discriminator"))
        J.seg.load_state_dict(ck["state_dict"]["segmenter"])
        for name, o in J.opts.items():
            if name in ck.get("optimizer", {}):
                o.load_state_dict(ck["optimizer"][name])
        if "rng" in ck:
            rng.bit_generator.state = ck["rng"]["numpy"]
            torch.set_rng_state(ck["rng"]["torch"])
        start, metrics = int(ck["step"]), dict(ck.get("metrics", {}))
    J.adapter.to(dev)
    J.seg.to(dev)
    joint_start = pg + ps
    g_total, s_total = pg + (steps - joint_start), ps + (steps - joint_start)
    g_out, s_out = part_paths(out)
    t0 = time.perf_counter()

    def save(step: int) -> Path:
        gsd, dsd = J.adapter.state_dicts()
        p = save_checkpoint(out, kind="joint", config=cfg,
                            state_dict={"generator": gsd, "segmenter": _cpu(J.seg.state_dict()), "discriminator": dsd},
                            step=step, metrics=metrics, train_data=data,
                            optimizer={n: o.state_dict() for n, o in J.opts.items()}, rng=_rng_state(rng))
        if on_update:
            on_update(TrainUpdate("checkpoint", step, steps, path=str(p), seconds=time.perf_counter() - t0))
        return p

    def preview(step: int) -> None:
        if not preview_every or on_update is None or J.gspec.preview is None:
            return
        J.gen.eval()
        with torch.no_grad():
            img = J.gspec.preview(J.gen, imgs[0], labs[0], dev)
        J.gen.train()
        on_update(TrainUpdate("preview", step, steps, image=img, seconds=time.perf_counter() - t0))

    J.adapter.train()
    J.seg.train()
    step, stopped = start, False
    while step < steps:
        if should_stop and should_stop():
            stopped = True
            break
        phase = "generator" if step < pg else "segmenter" if step < joint_start else "joint"
        real, syn, seeds = _draw(imgs, labs, t_idx, batch_size, crop, rng)
        gi = step if step < pg else None if step < joint_start else step - ps  # the generator's update index
        si = None if step < pg else step - pg  # the segmenter's
        J.set_lr(_lr_factor(gi, g_total) if gi is not None else 0.0, _lr_factor(si, s_total) if si is not None else 0.0)
        lam_t = lambda_at(step, joint_start, steps, cfg["lambda"])
        logs = J.step(phase, real, syn, seeds, lam_t)
        step += 1
        if on_update:
            on_update(TrainUpdate("step", step, steps, losses=logs, seconds=time.perf_counter() - t0))
        if progress:
            progress(step, steps, f"{phase} step {step}/{steps}, loss {logs.get('loss', float('nan')):.3f}")
        if preview_every and phase != "segmenter" and (step % preview_every == 0 or step == steps):
            preview(step)
        if step % save_every == 0 and step < steps:
            save(step)
    metrics.update({"generator_checkpoint": str(g_out), "segmenter_checkpoint": str(s_out), "joint_step": step})
    path = save(step)
    export_parts(path, g_out, s_out)
    if on_update:
        for p in (g_out, s_out):
            on_update(TrainUpdate("checkpoint", step, steps, path=str(p), seconds=time.perf_counter() - t0))
    if progress:
        progress(step, steps, f"saved {path}; generator {g_out.name}, segmenter {s_out.name} beside it")
    return TrainResult(path=path, step=step, stopped=stopped, metrics=dict(metrics), seconds=time.perf_counter() - t0)
