"""Nuclei segmenters behind one registry: ``segment(image, method=...)`` returns uint32 instance labels.

The widget and the CLI list methods from :func:`segmenters`; a segmenter joins by registering a class with
:func:`register`. Segmenters that need a model take ``checkpoint`` (a path; the method's shipped default when
None). torch is imported only by the segmenters that need it, when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

__all__ = ["Segmenter", "get_segmenter", "register", "segment", "segmenters"]


class Segmenter(Protocol):
    """What a registered segmenter provides.

    Segmenters whose work splits into an expensive prediction and a cheap post-processing also provide
    ``predict_maps(image, *, checkpoint, device, tta, progress, should_stop) -> np.ndarray`` (H x W x C float32),
    ``postprocess(maps, **params) -> labels`` and ``params``: ``{name: (default, low, high)}`` of the
    post-processing parameters. ``__call__`` is then ``postprocess(predict_maps(...), **params)``, and the Segment
    widget caches the maps so that moving a threshold re-runs only the post-processing.
    """

    name: str
    description: str
    needs_checkpoint: bool  # True when it runs a trained model (it may still ship a default)

    def __call__(self, image: np.ndarray, *, checkpoint=None, device: str = "auto", tta: bool = False,
                 progress=None, should_stop=None, **params) -> np.ndarray: ...


_REGISTRY: dict[str, Callable[[], Segmenter]] = {}


def register(name: str):
    """Class decorator: register a segmenter factory under ``name`` (instantiated on each use)."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def segmenters() -> list[str]:
    """Names of the registered segmenters (those whose optional packages are missing are not listed)."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_segmenter(name: str) -> Segmenter:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown segmentation method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def segment(image, *, method: str = "watershed", checkpoint=None, device: str = "auto", tta: bool = False,
            progress=None, should_stop=None, **params) -> np.ndarray:
    """Segment the nuclei of an H&E image.

    Parameters
    ----------
    image : array
        RGB uint8 ``H x W x 3`` (grey, RGBA, float in [0, 1] and uint16 are converted by
        :func:`napari_nucsynth._checks.as_rgb`), any size: large images are processed in overlapping tiles.
    method : str
        A registered segmenter (:func:`segmenters`).
    checkpoint : str or Path, optional
        A model checkpoint for the methods that run one (the method's shipped default when None).
    device : str
        "auto", "cpu", "cuda", "mps".
    tta : bool
        Test-time augmentation (flips and 90-degree rotations, outputs merged).
    progress, should_stop : callables, optional
        ``progress(done, total, what)``; when ``should_stop()`` turns True the work stops with
        ``InterruptedError``.
    **params
        Method-specific post-processing parameters (documented by each method).

    Returns
    -------
    (H, W) uint32 instance labels, 0 = background, ids 1..N.
    """
    return get_segmenter(method)(image, checkpoint=checkpoint, device=device, tta=tta, progress=progress,
                                 should_stop=should_stop, **params)


def _load_builtin() -> None:
    import importlib

    for mod in ("watershed", "hovernet", "maskrcnn", "adapters"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:  # a module not written yet, or an optional package missing
            if exc.name and exc.name.startswith(__name__):
                continue
            raise
