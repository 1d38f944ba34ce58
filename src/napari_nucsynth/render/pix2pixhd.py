"""The ``pix2pixhd`` renderer: DAFF-GAN's masks -> H&E generator (:mod:`napari_nucsynth.models.pix2pixhd`), a
pix2pixHD-style coarse-to-fine generator with criss-cross attention, renders instance masks in the style of a
reference tile (its stain statistics, or a learned encoding of it, per the model's ``style_source``).

Without ``checkpoint`` it runs the model shipped with the package (``data/models/pix2pixhd_monuseg.pt``) when there
is one; otherwise it says how to train one. Loaded models are cached per (path, modification time, device). The
style of two references can be blended (:meth:`Pix2PixHDRenderer.interpolate`, the Render widget's style slider).
torch is imported when a render runs, not when this module is imported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._checks import SeedLike, as_labels, as_rgb
from . import check_render_inputs, register, resolve_checkpoint, shipped_checkpoint

__all__ = ["Pix2PixHDRenderer", "TRAIN_HINT", "default_checkpoint", "load_model"]

_MODELS: dict = {}

TRAIN_HINT = "nucsynth train --model pix2pixhd --images DIR --labels DIR --steps N --out CKPT"


def default_checkpoint() -> Path:
    """The shipped checkpoint's path (absent until a trained model is shipped)."""
    return shipped_checkpoint("pix2pixhd")


def _resolve(checkpoint) -> Path:
    return resolve_checkpoint("pix2pixhd", checkpoint, TRAIN_HINT, default_checkpoint())


def load_model(checkpoint, device):
    """The pix2pixHD model of a checkpoint on ``device`` in eval mode, cached per (path, modification time,
    device); one model at a time. A shipped checkpoint (only the moving average of the encoder and generator)
    loads too."""
    from ..models.gan import load_generator

    return load_generator(checkpoint, "pix2pixhd", device, cache=_MODELS, hint=TRAIN_HINT)


@register("pix2pixhd")
class Pix2PixHDRenderer:
    """DAFF-GAN's renderer (Cheng et al.): pix2pixHD's global generator + local enhancer with criss-cross
    attention, conditioned on the masks' semantic and boundary maps and a style vector of the reference."""

    name = "pix2pixhd"
    description = ("pix2pixHD generator with criss-cross attention (DAFF-GAN): needs a trained checkpoint; the "
                   "style is the reference's stain statistics")
    needs_checkpoint = True
    default_checkpoint = default_checkpoint()

    def __call__(self, labels, style, *, style_labels=None, seed: SeedLike = None, device: str = "auto",
                 checkpoint=None, progress=None, should_stop=None) -> np.ndarray:
        """Render ``labels`` in the style of ``style``; see :func:`napari_nucsynth.render.render`.

        ``style_labels`` (same shape as ``style``): the reference's nuclei, on which a model with the stain-code
        style (``style_source`` "code", the default) measures the code (detected when None); a model with the
        learned encoder encodes the image alone. Raises ``ValueError`` when no checkpoint is given and none is
        shipped, naming the command that trains one.
        """
        lab, sty, sty_lab = check_render_inputs(labels, style, style_labels)
        from ..devices import resolve_device
        from ..models.pix2pixhd import render

        model = load_model(_resolve(checkpoint), resolve_device(device))
        return render(model, lab, sty, seed=seed, style_labels=sty_lab, progress=progress, should_stop=should_stop)

    def interpolate(self, labels, style_a, style_b, t, *, seed: SeedLike = None, device: str = "auto",
                    checkpoint=None, progress=None, should_stop=None):
        """Render ``labels`` with the mean style vector blended between two references (see
        :func:`napari_nucsynth.render.interpolate`)."""
        from ..devices import resolve_device
        from ..models.pix2pixhd import interpolate_styles

        lab = as_labels(labels, "labels")
        model = load_model(_resolve(checkpoint), resolve_device(device))
        return interpolate_styles(model, lab, as_rgb(style_a, "style_a"), as_rgb(style_b, "style_b"), t, seed=seed,
                                  progress=progress, should_stop=should_stop)
