"""Nuclei segmenters behind one registry: ``segment(image, method=...)`` returns uint32 instance labels.

The widget and the CLI list methods from :func:`segmenters`; a segmenter joins by registering a class with
:func:`register`. Segmenters that need a model take ``checkpoint`` (a path; the method's shipped default when
None). torch is imported only by the segmenters that need it, when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

__all__ = ["MODALITY_TTA", "TTA_MODES", "Segmenter", "get_segmenter", "modality_tta_methods", "predict_maps",
           "register", "segment", "segmenters", "tta_mode"]

#: The test-time augmentations of :func:`segment` (``tta=True`` is ``"flips"``, ``tta=False`` none).
TTA_MODES = ("flips", "modality", "modality-drit")
#: The modality modes and the restaining of each (:func:`napari_nucsynth.stain.transfer`'s method).
MODALITY_TTA = {"modality": "macenko", "modality-drit": "drit"}


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


def segment(image, *, method: str = "watershed", checkpoint=None, device: str = "auto", tta: bool | str = False,
            tta_references=None, progress=None, should_stop=None, **params) -> np.ndarray:
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
    tta : False, True, "flips", "modality" or "modality-drit"
        Test-time augmentation. ``True`` or ``"flips"``: the 8 flips and 90-degree rotations, outputs merged.
        ``"modality"`` (Liu, Wagner & Peng): the mean of the network's dense maps over the image and its copies
        restained (Macenko, :func:`napari_nucsynth.stain.modality_tta`) to each of ``tta_references``, then
        post-processed once; restaining moves no pixel, so the maps align. ``"modality-drit"``: the same, the
        copies made by the shipped drit model (the paper's own content/style network) in each of
        ``tta_references`` or, without them, in each stain domain of the model's training tiles. Only for
        segmenters with dense maps (:func:`modality_tta_methods`: ``hovernet``); the others raise a
        ``ValueError``.
    tta_references : RGB image, StainReference, int, or a list of them
        The stain modalities of the modality modes: required with ``"modality"`` (e.g. one tile per
        :func:`napari_nucsynth.stain.stain_domains` domain of the data the model was trained on; there is no
        built-in default: restaining to the bundled sample crop lowered the shipped model's AJI and PQ in a check,
        docs/stain_transfer.md); optional with ``"modality-drit"``, which also takes domain indices of the drit
        model. A ``ValueError`` with any other ``tta``.
    progress, should_stop : callables, optional
        ``progress(done, total, what)``; when ``should_stop()`` turns True the work stops with
        ``InterruptedError``.
    **params
        Method-specific post-processing parameters (documented by each method).

    Returns
    -------
    (H, W) uint32 instance labels, 0 = background, ids 1..N.
    """
    mode = tta_mode(tta)
    seg = get_segmenter(method)
    if mode not in MODALITY_TTA:
        _no_references(tta_references)
        return seg(image, checkpoint=checkpoint, device=device, tta=mode == "flips", progress=progress,
                   should_stop=should_stop, **params)
    _check_modality(method, seg)
    maps = predict_maps(image, method=method, checkpoint=checkpoint, device=device, tta=mode,
                        tta_references=tta_references, progress=progress, should_stop=should_stop)
    return seg.postprocess(maps, **params)


def predict_maps(image, *, method: str, checkpoint=None, device: str = "auto", tta: bool | str = False,
                 tta_references=None, progress=None, should_stop=None) -> np.ndarray:
    """The dense maps (``H x W x C`` float32) of a segmenter that has them (``predict_maps``/``postprocess``), with
    any test-time augmentation of :func:`segment`; ``get_segmenter(method).postprocess(maps, **params)`` makes the
    labels. What the Segment widget caches, so that a threshold change re-runs only the post-processing."""
    mode = tta_mode(tta)
    seg = get_segmenter(method)
    if not _has_maps(seg):
        raise ValueError(f"the {method} method has no dense maps; methods that do: "
                         f"{', '.join(modality_tta_methods()) or 'none registered'}")
    if mode not in MODALITY_TTA:
        _no_references(tta_references)
        return seg.predict_maps(image, checkpoint=checkpoint, device=device, tta=mode == "flips", progress=progress,
                                should_stop=should_stop)
    from ..stain import modality_tta

    refs = (_drit_references(tta_references, device) if mode == "modality-drit"
            else _tta_references(tta_references))
    return modality_tta(image, refs,
                        lambda im: seg.predict_maps(im, checkpoint=checkpoint, device=device, tta=False,
                                                    should_stop=should_stop),
                        method=MODALITY_TTA[mode], device=device, progress=progress, should_stop=should_stop)


def tta_mode(tta) -> str | None:
    """``tta`` of :func:`segment` as None (no test-time augmentation), ``"flips"`` or ``"modality"``; a
    ``ValueError`` for anything else. False, None and "none" mean none; True means "flips"."""
    if tta is None or tta is False or (isinstance(tta, str) and tta == "none"):
        return None
    if tta is True:
        return "flips"
    if isinstance(tta, str) and tta in TTA_MODES:
        return tta
    raise ValueError(f"tta must be False, True, 'flips', 'modality' or 'modality-drit', got {tta!r}")


def modality_tta_methods() -> list[str]:
    """The registered segmenters that ``tta="modality"`` works with: those with dense maps (``predict_maps`` and
    ``postprocess``), whose maps over restained copies can be averaged pixel by pixel."""
    _load_builtin()
    return sorted(n for n, f in _REGISTRY.items() if _has_maps(f))


def _has_maps(seg) -> bool:
    """Whether a segmenter (class or instance) has dense maps: ``predict_maps`` and ``postprocess``."""
    return callable(getattr(seg, "predict_maps", None)) and callable(getattr(seg, "postprocess", None))


def _check_modality(method: str, seg) -> None:
    if not _has_maps(seg):
        raise ValueError(f"tta='modality' averages dense network maps over restained copies and the {method} "
                         f"method has none; methods that support it: "
                         f"{', '.join(modality_tta_methods()) or 'none registered'} (or use tta='flips')")


def _no_references(refs) -> None:
    if refs is not None:
        raise ValueError("tta_references are the stain modalities of tta='modality' (or 'modality-drit'); give "
                         "one of those or no references")


def _drit_references(refs, device: str = "auto") -> list:
    """``tta_references`` of ``tta="modality-drit"``: as given (images, StainReferences or the drit model's domain
    indices), or every stain domain of the shipped drit model when None (read from the model the transfer then
    uses, loaded once and cached on ``device``)."""
    if refs is None:
        from ..devices import resolve_device
        from ..models import drit
        from ..stain import _drit_checkpoint

        n = len(drit.load_model(_drit_checkpoint(None), resolve_device(device)).config.get("domain_styles") or [])
        if n == 0:
            raise ValueError("the drit model holds no domain styles: give tta_references (reference tiles)")
        return list(range(n))
    if isinstance(refs, (int, np.integer)) or (isinstance(refs, np.ndarray) and refs.ndim in (2, 3)
                                               and refs.dtype != object):
        refs = [refs]
    refs = list(refs)
    if not refs:
        raise ValueError("tta_references is empty: give at least one reference image or domain index")
    return refs


def _tta_references(refs) -> list:
    """``tta_references`` as a non-empty list of StainReferences."""
    from ..stain import StainReference, stain_reference

    if refs is None:
        raise ValueError("tta='modality' needs tta_references: reference tiles of the stain modalities to restain "
                         "to (one per stain domain of the data the model was trained on, e.g. a few of its "
                         "training tiles)")
    if isinstance(refs, StainReference) or (isinstance(refs, np.ndarray) and refs.ndim in (2, 3)
                                            and refs.dtype != object):
        refs = [refs]
    refs = list(refs)
    if not refs:
        raise ValueError("tta_references is empty: give at least one reference image")
    return [r if isinstance(r, StainReference) else stain_reference(r) for r in refs]


def _load_builtin() -> None:
    import importlib

    for mod in ("watershed", "hovernet", "maskrcnn", "adapters"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:  # a module not written yet, or an optional package missing
            if exc.name and exc.name.startswith(__name__):
                continue
            raise
