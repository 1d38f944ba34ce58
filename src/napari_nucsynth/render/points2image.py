"""The ``points2image`` renderer: a Points2Image generator (:mod:`napari_nucsynth.models.points2image`), trained
unpaired on images alone, renders instance masks in the stain of a reference tile (its label-free colour
statistics condition the generator).

Without ``checkpoint`` it runs the model shipped with the package (``data/models/points2image_monuseg.pt``) when
there is one; otherwise it says how to train one (on any folder of H&E images: no labels needed). Loaded models are
cached per (path, modification time, device), as the ``sian`` renderer's (:mod:`napari_nucsynth.render.sian`), so a
live re-render only runs the network. Style codes blend linearly, so the renderer also interpolates between two
references (:meth:`Points2ImageRenderer.interpolate`, the Render widget's style slider). torch is imported when a
render runs, not when this module is imported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._checks import SeedLike, as_labels, as_rgb
from . import check_render_inputs, register, resolve_checkpoint, shipped_checkpoint

__all__ = ["Points2ImageRenderer", "default_checkpoint", "load_model"]

_MODELS: dict = {}

TRAIN_HINT = "nucsynth train --model points2image --images DIR --steps N --out CKPT"


def default_checkpoint() -> Path:
    """The shipped checkpoint's path (absent until a trained model is shipped)."""
    return shipped_checkpoint("points2image")


def load_model(checkpoint, device):
    """The Points2Image model of a checkpoint on ``device`` in eval mode, cached per (path, modification time,
    device). A shipped checkpoint, which keeps only the moving average of the generator, loads too."""
    from ..models.gan import load_generator

    return load_generator(checkpoint, "points2image", device, cache=_MODELS, hint=TRAIN_HINT)


@register("points2image")
class Points2ImageRenderer:
    """Points2Image (Li, Ren et al. 2023) as an OASIS-style GAN trained unpaired (masks from the sampler, images
    without labels): the reference's stain statistics condition the generator, the seed its texture."""

    name = "points2image"
    description = ("Points2Image generator trained unpaired (OASIS-style): needs a trained checkpoint; the stain "
                   "follows the reference's colour statistics, the seed changes the texture")
    needs_checkpoint = True
    default_checkpoint = default_checkpoint()  # the shipped model's path (the widget checks whether it exists)

    def __call__(self, labels, style, *, style_labels=None, seed: SeedLike = None, device: str = "auto",
                 checkpoint=None, progress=None, should_stop=None) -> np.ndarray:
        """Render ``labels`` in the stain of ``style``; see :func:`napari_nucsynth.render.render`.

        ``style_labels`` (same shape as ``style``), when given, are the reference's nuclei for its style code
        (else they are detected by Otsu on the haematoxylin channel). Raises ``ValueError`` when no checkpoint is
        given and none is shipped, naming the command that trains one.
        """
        lab, sty, sl = check_render_inputs(labels, style, style_labels)
        from ..devices import resolve_device
        from ..models.points2image import render

        model = load_model(_checkpoint(checkpoint), resolve_device(device))
        return render(model, lab, sty, seed=seed, style_labels=sl, progress=progress, should_stop=should_stop)

    def interpolate(self, labels, style_a, style_b, t, *, seed: SeedLike = None, device: str = "auto",
                    checkpoint=None, progress=None, should_stop=None) -> np.ndarray:
        """Render ``labels`` with the style code ``(1 - t) code_a + t code_b`` between the two references' (the same
        noise at every ``t``; 0 gives exactly the render in ``style_a``): the Render widget's style slider
        (:func:`napari_nucsynth.render.interpolate`)."""
        from ..devices import resolve_device
        from ..models._rendering import seed_int, to_uint8
        from ..models.points2image import _render_float, style_code

        lab = as_labels(labels, "labels")
        a, b = style_code(as_rgb(style_a, "style_a")), style_code(as_rgb(style_b, "style_b"))
        code = ((1.0 - float(t)) * a.astype(np.float64) + float(t) * b.astype(np.float64)).astype(np.float32)
        model = load_model(_checkpoint(checkpoint), resolve_device(device))
        return to_uint8(_render_float(model, lab, code, seed_int(seed), progress=progress, should_stop=should_stop))


def _checkpoint(checkpoint) -> Path:
    """``checkpoint``, or the shipped model when None (a ``ValueError`` that says how to train one when none
    ships: on a folder of H&E images, no labels needed)."""
    return resolve_checkpoint("points2image", checkpoint, TRAIN_HINT, default_checkpoint())
