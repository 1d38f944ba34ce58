"""What the learned mask -> H&E generators (:mod:`~napari_nucsynth.models.sian`,
:mod:`~napari_nucsynth.models.pix2pixhd`, :mod:`~napari_nucsynth.models.points2image`) share at inference: seeds,
the conversion to uint8, centre crops for validation, eval mode, and the windowed render loop (windows that
overlap by twice a halo plus a blend band and are cross-faded, so a large image has no seams).

torch is imported by the models that use this module; this module itself needs only numpy (and torch inside
:func:`evaluating` and :func:`device_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from .._checks import SeedLike, as_labels, as_rng

__all__ = [
    "axis_weights", "center_crop", "device_of", "evaluating", "padded_conditioning", "run_windows", "seed_int",
    "interpolate_styles", "render_styled", "to_uint8", "window_model", "windows",
]


def seed_int(seed: SeedLike) -> int:
    """An integer seed: ``seed`` itself when it is a (non-negative) integer, else one drawn from ``as_rng(seed)``."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        as_rng(seed)  # validates (non-negative)
        return int(seed)
    return int(as_rng(seed).integers(0, 2**63 - 1))


def to_uint8(x: np.ndarray) -> np.ndarray:
    """An image in [0, 1] as uint8 (rounded, clipped)."""
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def center_crop(img: np.ndarray, lab: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The centre ``size`` x ``size`` (at most) of an image and its label map (``lab``'s shape decides)."""
    H, W = lab.shape
    h, w = min(H, size), min(W, size)
    r, c = (H - h) // 2, (W - w) // 2
    return img[r : r + h, c : c + w], lab[r : r + h, c : c + w]


def device_of(model):
    """The device of a module's (first) parameters."""
    return next(model.parameters()).device


@contextmanager
def evaluating(model) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode`` for the block; the model's train/eval mode is restored after."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was)


def windows(length: int, tile: int, margin: int, blend: int, m: int) -> list[tuple[int, int, int, int]]:
    """Windows along one axis of a padded length: (start, stop, valid_start, valid_stop). Starts are multiples of
    ``m``; each valid part is the window less ``margin`` on sides that are not the image's edge; neighbouring valid
    parts overlap (by about ``blend``) and cover the axis."""
    if length <= tile:
        return [(0, length, 0, length)]
    step = tile - 2 * margin - blend
    n = -(-(length - tile) // step) + 1
    starts = sorted({(i * (length - tile) // (n - 1)) // m * m for i in range(n)} | {length - tile})
    out = []
    for s in starts:
        e = s + tile
        out.append((s, e, s + margin if s > 0 else 0, e - margin if e < length else length))
    return out


def axis_weights(win: tuple[int, int, int, int], blend: int, length: int) -> np.ndarray:
    """Blending weights over a window: 0 outside its valid part, rising linearly over ``blend`` px from the valid
    part's inner edges, 1 elsewhere (never 0 inside the valid part)."""
    s, e, a, b = win
    x = np.arange(s, e, dtype=np.float64) + 0.5
    w = np.ones(e - s)
    ramp = max(1.0, float(blend))
    if a > 0:
        w = np.minimum(w, (x - a) / ramp)
    if b < length:
        w = np.minimum(w, (b - x) / ramp)
    w[(x < a) | (x > b)] = 0
    return np.clip(w, 0, 1)


def run_windows(fn: Callable[[np.ndarray, int, int], np.ndarray], inputs: np.ndarray, out_nc: int, *, tile: int,
                halo: int, blend: int, multiple: int,
                progress: Callable[[int, int, str], None] | None = None,
                should_stop: Callable[[], bool] | None = None, what: str = "rendering") -> np.ndarray:
    """Run a fully convolutional network over ``inputs`` (C x H x W, H and W multiples of ``multiple``) in windows
    of ``tile`` px that overlap by ``2 halo + blend`` (:func:`windows`) and are cross-faded (:func:`axis_weights`);
    ``fn(window, r0, c0) -> out_nc x h x w`` gets each window and its top-left corner. One window (the plain
    forward pass) when the input fits in ``tile``. ``progress(done, total, what)`` per window; ``should_stop()``
    ends the loop with ``InterruptedError``."""
    _, Hp, Wp = inputs.shape
    m = int(multiple)
    blend = max(int(blend), m)  # at least m: the rounding of window starts cannot open a gap
    tile, halo = int(tile), -(-int(halo) // m) * m
    least = 2 * halo + blend + m
    if tile < least or tile % m:
        raise ValueError(f"tile must be a multiple of {m} and at least {least} px for this model, got {tile}")
    rows, cols = windows(Hp, tile, halo, blend, m), windows(Wp, tile, halo, blend, m)
    single = len(rows) == 1 and len(cols) == 1
    out = np.zeros((out_nc, Hp, Wp), np.float32)
    wsum = None if single else np.zeros((Hp, Wp), np.float32)
    total, done = len(rows) * len(cols), 0
    for rw in rows:
        for cw in cols:
            if should_stop is not None and should_stop():
                raise InterruptedError(f"{what} stopped")
            r0, r1, c0, c1 = rw[0], rw[1], cw[0], cw[1]
            y = fn(np.ascontiguousarray(inputs[:, r0:r1, c0:c1]), r0, c0)
            if single:
                out[:] = y
            else:
                w = np.outer(axis_weights(rw, blend, Hp), axis_weights(cw, blend, Wp)).astype(np.float32)
                out[:, r0:r1, c0:c1] += y * w
                wsum[r0:r1, c0:c1] += w
            done += 1
            if progress is not None:
                progress(done, total, what)
    if wsum is not None:
        out /= wsum
    return out


def padded_conditioning(labels, conditioning: Callable[[np.ndarray], np.ndarray], channels: int,
                        multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``conditioning(labels)`` (``channels`` x H x W) zero-padded to multiples of ``multiple`` (float32), and
    ``(H, W)``; ``ValueError`` for empty labels."""
    lab = as_labels(labels)
    H, W = lab.shape
    if H == 0 or W == 0:
        raise ValueError(f"labels is empty (shape {lab.shape})")
    m = int(multiple)
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    cond = np.zeros((channels, Hp, Wp), np.float32)
    cond[:, :H, :W] = conditioning(lab)
    return cond, (H, W)


def window_model(model, fn: Callable[[np.ndarray, int, int], np.ndarray], cond: np.ndarray, size: tuple[int, int],
                 *, tile: int, halo: int, blend: int,
                 progress: Callable[[int, int, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """:func:`run_windows` of ``fn`` (a generator producing 3 channels in [-1, 1]) over the padded conditioning
    ``cond`` with ``model`` in eval and inference mode (restored after), cut to ``size`` = (H, W): float32
    H x W x 3 in [0, 1]."""
    H, W = size
    with evaluating(model):
        out = run_windows(fn, cond, 3, tile=tile, halo=halo, blend=blend, multiple=model.multiple,
                          progress=progress, should_stop=should_stop)
    return np.clip((out[:, :H, :W].transpose(1, 2, 0) + 1) / 2, 0, 1)


def interpolate_styles(render_float: Callable[..., np.ndarray], encode: Callable, model, labels, style_a, style_b,
                       t, seed: SeedLike = None, *, tile: int | None = None, progress=None,
                       should_stop=None):
    """Render ``labels`` with the style vector ``(1 - t) mu_a + t mu_b`` between the mean styles (``encode(model,
    image) -> (mu, logvar)``) of two references, the same noise (seed) for every ``t``; ``render_float(model,
    labels, z, seed, tile=, progress=, should_stop=)`` renders one in [0, 1]. ``t`` a finite number (then one
    uint8 image) or a sequence of them (then a list)."""
    lab = as_labels(labels)
    ts = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if ts.ndim != 1 or ts.size == 0 or not np.all(np.isfinite(ts)):
        raise ValueError(f"t must be a finite number or a sequence of finite numbers, got {t!r}")
    s = seed_int(seed)
    mu_a, _ = encode(model, style_a)
    mu_b, _ = encode(model, style_b)
    out = []
    for ti in ts:
        z = ((1.0 - ti) * mu_a.astype(np.float64) + ti * mu_b.astype(np.float64)).astype(np.float32)
        out.append(to_uint8(render_float(model, lab, z, s, tile=tile, progress=progress, should_stop=should_stop)))
    return out if np.ndim(t) else out[0]


def render_styled(render_float: Callable[..., np.ndarray], style_vector: Callable[..., np.ndarray], model, labels,
                  style_image, seed: SeedLike = None, *, sample_style: bool = False, tile: int | None = None,
                  progress=None, should_stop=None) -> np.ndarray:
    """Render ``labels`` (uint8 RGB) with the style vector ``style_vector(model, style_image, seed,
    sample=sample_style)`` of a reference, the same integer seed drawing the style sample and the noise;
    ``render_float(model, labels, z, seed, tile=, progress=, should_stop=)`` renders in [0, 1]."""
    lab = as_labels(labels)
    s = seed_int(seed)
    z = style_vector(model, style_image, s, sample=sample_style)
    return to_uint8(render_float(model, lab, z, s, tile=tile, progress=progress, should_stop=should_stop))
