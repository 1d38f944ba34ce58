"""Metrics the project's claims rest on.

- :mod:`.instance`: instance segmentation metrics with HoVer-Net's conventions (AJI, AJI+, PQ, Dice, Dice 2,
  object and pixel F1), matching, error maps, and :func:`evaluate` over many images. numpy and scipy only.
"""

from .instance import (
    ERROR_CLASSES,
    METRICS,
    Evaluation,
    Matching,
    Overlaps,
    aji,
    aji_plus,
    dice,
    dice2,
    error_map,
    evaluate,
    instance_metrics,
    match,
    object_f1,
    overlaps,
    pixel_f1,
    pq,
)

__all__ = [
    "METRICS",
    "ERROR_CLASSES",
    "Overlaps",
    "overlaps",
    "aji",
    "aji_plus",
    "pq",
    "dice",
    "dice2",
    "object_f1",
    "pixel_f1",
    "Matching",
    "match",
    "error_map",
    "instance_metrics",
    "Evaluation",
    "evaluate",
]
