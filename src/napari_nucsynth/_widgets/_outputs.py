"""The layers the widgets add, and how the other widgets tell them from the user's own.

Each widget marks the layers it adds with a metadata key (it survives renaming) and names them with a fixed
prefix (what is left of the mark once a layer was saved and opened again). The widgets that pick layers ask
:func:`output_kind` instead of comparing names: the Train widget never preselects a prediction or an error
overlay as training labels, no widget offers an error overlay as labels, and the Render widget prefers the masks
just made from clicks over a ground truth.
"""

from __future__ import annotations

SEGMENTATION = "nucsynth_segmentation_of"  # Segment: instance labels predicted from an image
ERRORS = "nucsynth_errors_of"  # Evaluate: the TP/FP/FN overlay of a prediction (classes, not instances)
MASKS = "nucsynth_masks_of"  # Points to masks: nuclei sampled around clicked points
RENDER = "nucsynth_render_of"  # Render: a synthetic image of a labels layer
GALLERY = "nucsynth_gallery_of"  # Render's Gallery...: one labels layer in many styles
PREVIEW = "nucsynth_train_preview"  # Train: what a generator renders during training

#: The name prefix of each kind of output (the masks of Points to masks are "<points name> masks": marked only).
PREFIXES = {SEGMENTATION: "segmentation: ", ERRORS: "errors: ", RENDER: "render: ", GALLERY: "gallery: ",
            PREVIEW: "train preview: "}
_MARKS = (*PREFIXES, MASKS)


def output_name(kind: str, of: str) -> str:
    """The name of the output layer of ``kind`` made from the layer named ``of``."""
    return PREFIXES[kind] + of


def output_kind(layer) -> str | None:
    """Which of the widgets' outputs ``layer`` is (one of this module's constants), or None for the user's own
    layers. The metadata mark decides; a layer without one is recognised by its name's prefix."""
    meta = getattr(layer, "metadata", None) or {}
    for mark in _MARKS:
        if mark in meta:
            return mark
    name = str(getattr(layer, "name", ""))
    return next((mark for mark, prefix in PREFIXES.items() if name.startswith(prefix)), None)
