"""Metrics the project's claims rest on.

- :mod:`.instance`: instance segmentation metrics with HoVer-Net's conventions (AJI, AJI+, PQ, Dice, Dice 2,
  object and pixel F1), matching, error maps, and :func:`evaluate` over many images. numpy and scipy only.
- :mod:`.image`: image metrics for synthetic H&E (FID, KID, SSIM, sample diversity, classifier two-sample test)
  and their feature extractors. They need torch, so their names are imported lazily, on first access
  (``from napari_nucsynth.metrics import fid`` imports torch; ``import napari_nucsynth.metrics`` does not).
"""

from .instance import *  # noqa: F403 - re-exported: napari_nucsynth.metrics is where metrics are imported from
from .instance import __all__ as _INSTANCE_NAMES

__all__ = [
    *_INSTANCE_NAMES,
    # image metrics (lazy: see __getattr__)
    "FeatureExtractor",
    "InceptionExtractor",
    "RandomConvExtractor",
    "feature_extractor",
    "inception_weights_path",
    "MetricResult",
    "fid",
    "kid",
    "ssim",
    "diversity",
    "C2STResult",
    "c2st",
]

_IMAGE_NAMES = frozenset(__all__[__all__.index("FeatureExtractor") :])


def __getattr__(name: str):
    """Import the image metrics (and torch) only when one of their names is first used."""
    if name in _IMAGE_NAMES:
        from . import image

        return getattr(image, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _IMAGE_NAMES)
