"""The ``classic`` renderer: Gong et al.'s pre-synthesis (:mod:`napari_nucsynth.presynthesis`) in the registry.

The computation lives in :mod:`napari_nucsynth.presynthesis`, below ``render``, ``models`` and ``train``, so that
the AdaIN generator and the joint loop can use it without importing the render layer. This module only registers
it; ``napari_nucsynth.render.classic.ClassicRenderer`` is the registered class, and renders exactly as
:class:`napari_nucsynth.presynthesis.ClassicRenderer` does.
"""

from __future__ import annotations

from .. import presynthesis
from ..presynthesis import ReferenceStyle, analyse_reference, detect_nuclei, reference_background
from . import register

__all__ = ["ClassicRenderer", "ReferenceStyle", "analyse_reference", "detect_nuclei", "reference_background"]


@register("classic")
class ClassicRenderer(presynthesis.ClassicRenderer):
    """Training-free renderer: :class:`napari_nucsynth.presynthesis.ClassicRenderer` with its registry entry."""

    name = "classic"
    description = "real reference nuclei warped into the masks over the inpainted reference background (no training)"
    needs_checkpoint = False
