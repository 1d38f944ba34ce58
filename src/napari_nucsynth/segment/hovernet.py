"""The ``hovernet`` segmenter: a HoVer-Net checkpoint (:mod:`napari_nucsynth.models.hovernet`) run on an image of
any size, with HoVer-Net's post-processing. Without ``checkpoint`` it runs the model shipped with the package
(trained on the 30 MoNuSeg training tiles; see docs/segment.md for how it was made)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from .._checks import as_rgb
from . import register

__all__ = ["HoVerNetSegmenter", "default_checkpoint", "load_model"]

def default_checkpoint() -> Path:
    """The shipped checkpoint's path (it may be absent from a source checkout that has not fetched it)."""
    return Path(__file__).resolve().parents[1] / "data" / "models" / "hovernet_monuseg.pt"


def load_model(checkpoint, device):
    """:func:`napari_nucsynth.models.hovernet.load_model` (imported when called: listing segmenters stays free of
    torch)."""
    from ..models.hovernet import load_model as _load

    return _load(checkpoint, device)


@register("hovernet")
class HoVerNetSegmenter:
    name = "hovernet"
    description = "HoVer-Net-style network (nuclear pixels + horizontal/vertical maps) with HoVer-Net's watershed"
    needs_checkpoint = True
    default_checkpoint = default_checkpoint()  # the shipped model's path (the widget checks whether it exists)
    #: HoVer-Net's post-processing parameters: (default, low, high)
    params: ClassVar[dict] = {"np_threshold": (0.5, 0.05, 0.95), "edge_threshold": (0.4, 0.05, 0.95), "min_area": (10, 0, 200)}

    def predict_maps(self, image, *, checkpoint=None, device: str = "auto", tta: bool = False, progress=None,
                     should_stop=None) -> np.ndarray:
        """H x W x 3 float32: nucleus probability, horizontal and vertical maps."""
        from ..devices import resolve_device
        from ..models.hovernet import predict_maps

        img = as_rgb(image, "image")
        ckpt = Path(checkpoint) if checkpoint is not None else default_checkpoint()
        if checkpoint is None and not ckpt.exists():
            raise ValueError(f"the shipped hovernet model is missing ({ckpt}); pass checkpoint= a trained one "
                             "(nucsynth train --model hovernet ...)")
        dev = resolve_device(device)
        model = load_model(ckpt, dev)
        return predict_maps(model, img, dev, tta=tta, progress=progress, should_stop=should_stop)

    def postprocess(self, maps: np.ndarray, **params) -> np.ndarray:
        from ..models.hovernet import postprocess

        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"unknown hovernet parameter(s) {sorted(unknown)}; known: {sorted(self.params)}")
        return postprocess(maps[..., 0], maps[..., 1:].transpose(2, 0, 1), **params)

    def __call__(self, image, *, checkpoint=None, device: str = "auto", tta: bool = False, progress=None,
                 should_stop=None, **params) -> np.ndarray:
        maps = self.predict_maps(image, checkpoint=checkpoint, device=device, tta=tta, progress=progress,
                                 should_stop=should_stop)
        return self.postprocess(maps, **params)
