"""The ``sian`` renderer: a trained SIAN generator (:mod:`napari_nucsynth.models.sian`) renders instance masks in
the style encoded from a reference tile.

Without ``checkpoint`` it runs the model shipped with the package (``data/models/sian_monuseg.pt``) when there is
one; otherwise it says how to train one. Loaded models are cached per (path, modification time, device), so a live
re-render only runs the network. torch is imported when a render runs, not when this module is imported (the
renderer list is built when the plugin starts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._checks import SeedLike
from . import check_render_inputs, register, resolve_checkpoint, shipped_checkpoint

__all__ = ["SIANRenderer", "default_checkpoint", "load_model"]

_MODELS: dict = {}

TRAIN_HINT = "nucsynth train --model sian --images DIR --labels DIR --steps N --out CKPT"


def default_checkpoint() -> Path:
    """The shipped checkpoint's path (absent until a trained model is shipped)."""
    return shipped_checkpoint("sian")


def load_model(checkpoint, device):
    """The SIAN model of a checkpoint on ``device`` in eval mode, cached per (path, modification time, device).
    A shipped checkpoint, which keeps only the moving average of the generator (the part that renders), loads
    too."""
    from ..models.gan import load_generator

    return load_generator(checkpoint, "sian", device, cache=_MODELS, hint=TRAIN_HINT, name="SIAN")


@register("sian")
class SIANRenderer:
    """SIAN (Wang et al., ISBI 2023): a GAN whose normalisations are modulated by the masks' semantic, direction and
    distance maps and by a style vector encoded from the reference."""

    name = "sian"
    description = ("SIAN generator (style-guided instance-adaptive normalisation): needs a trained checkpoint; "
                   "the style is encoded from the reference image")
    needs_checkpoint = True
    default_checkpoint = default_checkpoint()  # the shipped model's path (the widget checks whether it exists)

    def __call__(self, labels, style, *, style_labels=None, seed: SeedLike = None, device: str = "auto",
                 checkpoint=None, progress=None, should_stop=None) -> np.ndarray:
        """Render ``labels`` in the style of ``style``; see :func:`napari_nucsynth.render.render`.

        ``style_labels`` are checked (same shape as ``style``) but not used: SIAN encodes the style from the image
        alone. Raises ``ValueError`` when no checkpoint is given and none is shipped, naming the command that
        trains one.
        """
        lab, sty, _ = check_render_inputs(labels, style, style_labels)
        ckpt = resolve_checkpoint("sian", checkpoint, TRAIN_HINT, default_checkpoint())
        from ..devices import resolve_device
        from ..models.sian import render

        model = load_model(ckpt, resolve_device(device))
        return render(model, lab, sty, seed=seed, progress=progress, should_stop=should_stop)
