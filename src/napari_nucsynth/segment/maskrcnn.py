"""The ``maskrcnn`` segmenter: a Mask R-CNN checkpoint (:mod:`napari_nucsynth.models.maskrcnn`, Gong et al.'s
semantic branch and focal losses) run on an image of any size. No model is shipped: train one with
``nucsynth train --model maskrcnn ...`` (or :func:`napari_nucsynth.train.train`) and pass its checkpoint.

Parameters (keywords of ``segment(..., method="maskrcnn")``): ``score_threshold`` (0.5), ``mask_threshold``
(0.5), ``min_foreground`` (0.5: share of a detection's mask that the semantic branch must call nucleus),
``max_overlap`` (0.5: share of a mask that better detections may already hold), ``min_area`` (5 px); see
:func:`napari_nucsynth.models.maskrcnn.instances_from_detections`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from .._checks import as_rgb
from . import register

__all__ = ["MaskRCNNSegmenter", "clear_detection_cache", "load_model"]

_MODELS: dict = {}


def load_model(checkpoint, device):
    """The model of a maskrcnn checkpoint on ``device`` in eval mode, cached per (path, modification time,
    device); one model is kept at a time."""
    return _load(checkpoint, device)[0]


def clear_detection_cache() -> None:
    """Forget the cached detections of the loaded model (benchmarks time the network, not the cache)."""
    for _, cache in _MODELS.values():
        cache.clear()


def _load(checkpoint, device):
    """``(model, DetectionCache)`` of a checkpoint (see :func:`load_model`)."""
    from ..models import get_model, load_checkpoint
    from ..models.maskrcnn import DetectionCache

    path = Path(checkpoint)
    key = (str(path.resolve()), path.stat().st_mtime if path.exists() else None, str(device))
    if key not in _MODELS:
        ck = load_checkpoint(path, kind="maskrcnn")
        model = get_model("maskrcnn").build({**ck["config"], "pretrained": None})
        model.load_state_dict(ck["state_dict"])
        model.to(device).eval()
        _MODELS.clear()
        _MODELS[key] = (model, DetectionCache())
    return _MODELS[key]


@register("maskrcnn")
class MaskRCNNSegmenter:
    name = "maskrcnn"
    description = ("Mask R-CNN for dense nuclei with a semantic branch and focal losses (Gong et al.); "
                   "needs a trained checkpoint")
    needs_checkpoint = True
    #: post-processing parameters (default, low, high); the network's outputs of the last image are cached, so a
    #: second call with other values runs only the post-processing
    params: ClassVar[dict] = {"score_threshold": (0.5, 0.05, 1.0), "mask_threshold": (0.5, 0.05, 0.95),
                              "min_foreground": (0.5, 0.0, 1.0), "max_overlap": (0.5, 0.0, 1.0),
                              "min_area": (5, 0, 200)}

    def __call__(self, image, *, checkpoint=None, device: str = "auto", tta: bool = False, progress=None,
                 should_stop=None, **params) -> np.ndarray:
        """uint32 instance labels of ``image`` (RGB, any size; see the module docstring for ``params``)."""
        from ..devices import resolve_device
        from ..models.maskrcnn import predict

        img = as_rgb(image, "image")
        if checkpoint is None:
            raise ValueError("the maskrcnn method needs a trained model: train one with "
                             "`nucsynth train --model maskrcnn ...` and pass checkpoint=<its .pt file>")
        dev = resolve_device(device)
        model, cache = _load(checkpoint, dev)
        return predict(model, img, dev, tta=tta, progress=progress, should_stop=should_stop, cache=cache, **params)
