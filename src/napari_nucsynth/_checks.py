"""Input validation shared by the Qt-free modules.

Every public function converts its inputs through these helpers, so that one rule applies everywhere and every
refusal is a ``ValueError`` that names the argument and says what was expected.
"""

from __future__ import annotations

from typing import Union

import numpy as np

SeedLike = Union[int, np.random.Generator, None]


def as_rng(seed: SeedLike) -> np.random.Generator:
    """Return a ``numpy.random.Generator`` for ``seed`` (an int, a Generator, or None for fresh entropy)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or isinstance(seed, (int, np.integer)):
        if seed is not None and int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, a numpy Generator or None, got {seed!r}")
        return np.random.default_rng(None if seed is None else int(seed))
    raise ValueError(f"seed must be a non-negative integer, a numpy Generator or None, got {type(seed).__name__}")


def as_shape(shape, name: str = "shape") -> tuple[int, int]:
    """Validate a 2-D image shape ``(height, width)`` of positive integers."""
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 2-D shape (height, width), got {shape!r}") from None
    if len(dims) != 2:
        raise ValueError(f"{name} must be a 2-D shape (height, width), got {len(dims)} dimensions: {shape!r}")
    if min(dims) < 1:
        raise ValueError(f"{name} must have positive height and width, got {dims}")
    if any(float(a) != float(b) for a, b in zip(shape, dims)):
        raise ValueError(f"{name} must hold whole numbers, got {shape!r}")
    return dims


def as_points(points, name: str = "points") -> np.ndarray:
    """Validate points as an ``(N, 2)`` float64 array of finite ``(row, col)`` coordinates.

    An empty input (``[]`` or any array with zero rows) gives an empty ``(0, 2)`` array.
    """
    arr = np.asarray(points, dtype=float) if not isinstance(points, np.ndarray) else points.astype(float, copy=False)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of (row, col) coordinates, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.all(np.isfinite(arr), axis=1))
        raise ValueError(f"{name} holds NaN or infinite coordinates at rows {bad[:10].tolist()}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def as_classes(classes, n: int, name: str = "classes") -> np.ndarray:
    """Validate per-point classes: ``None`` (all 0) or ``n`` non-negative integers."""
    if classes is None:
        return np.zeros(n, dtype=np.int64)
    arr = np.asarray(classes)
    if arr.shape != (n,):
        raise ValueError(f"{name} must hold one class per point ({n}), got shape {arr.shape}")
    if n and not np.issubdtype(arr.dtype, np.integer):
        as_int = arr.astype(np.int64) if np.issubdtype(arr.dtype, np.number) else None
        if as_int is None or not np.array_equal(as_int, arr):
            raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
        arr = as_int
    if n and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative integers, got {arr.min()}")
    return arr.astype(np.int64)


def as_labels(labels, name: str = "labels") -> np.ndarray:
    """Validate a 2-D instance label map of non-negative integers (0 = background); returned unchanged in dtype."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D instance label map, got {arr.ndim} dimensions (shape {arr.shape})")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise ValueError(f"{name} must hold non-negative ids (0 = background), found {arr.min()}")
    return arr


def as_rgb(image, name: str = "image") -> np.ndarray:
    """Convert one image to RGB uint8 ``H x W x 3`` by the project's one rule, or raise a ``ValueError`` naming it.

    Grey ``H x W`` or ``H x W x 1`` is repeated into three channels; RGBA drops its alpha channel (no
    compositing); float images must lie in ``[0, 1]`` and become ``round(255 x)``; uint16 becomes
    ``round(x / 257)``. Anything else (other integer dtypes, bool, NaN, other channel counts) is refused.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name} must be an RGB image (H x W x 3; grey H x W and RGBA H x W x 4 are converted), "
            f"got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{name} is a float image with values in [{lo:g}, {hi:g}]; float images must lie in [0, 1] "
                "(or pass uint8 in 0-255)"
            )
        out = np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ValueError(
            f"{name} must be uint8 (or uint16, or float in [0, 1]), got dtype {arr.dtype}; "
            "convert it, e.g. with .astype(np.uint8) if it holds 0-255 values"
        )
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    elif out.shape[2] == 4:
        out = out[..., :3]
    return np.ascontiguousarray(out)


def as_strength(strength, zero: str, one: str) -> float:
    """``strength`` as a float in [0, 1], else a ``ValueError`` that says what the ends mean (``zero``, ``one``):
    the learned refinements' knob between their input and their full effect (adain, drit)."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}") from None
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (0: {zero}, 1: {one}), got {s!r}")
    return s
