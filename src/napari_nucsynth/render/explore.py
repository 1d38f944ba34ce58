"""Visual style exploration: one mask set rendered between two styles, or in every style of a folder.

:func:`interpolate` renders instance masks with a style between two reference tiles (the Render widget's *Style
position* slider); it needs a renderer whose style is a vector that can be blended, which today is ``sian``
(:func:`interpolatable_methods`). :func:`gallery` renders the same masks, with the same seed, in the style of every
reference tile of a folder (or of a list of images) and lays the results out in one mosaic (the widget's
*Gallery...* button). Both are Qt-free and report progress and honour cancellation like every renderer; torch is
imported only when a learned model runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._checks import SeedLike, as_labels, as_rgb, as_rng
from . import check_options, get_renderer, render, renderers

__all__ = ["GalleryResult", "gallery", "interpolatable_methods", "interpolate"]

#: Suffixes of the files a style folder is searched for (other files are listed as skipped).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: White gutter between the cells of a gallery mosaic, in pixels.
GUTTER = 4


def _sian_interpolate(labels, style_a, style_b, t, *, seed, device, checkpoint, progress, should_stop):
    """``sian``: blend the mean style vectors of the two references (the same noise at every ``t``)."""
    from ..devices import resolve_device
    from ..models.sian import interpolate_styles
    from . import sian

    ckpt = sian.default_checkpoint() if checkpoint is None else Path(checkpoint)
    if checkpoint is None and not ckpt.exists():
        raise ValueError(f"style interpolation with sian needs a trained model, and none is shipped ({ckpt} is "
                         f"missing): train one with `{sian.TRAIN_HINT}` and pass it as checkpoint=")
    model = sian.load_model(ckpt, resolve_device(device))
    return interpolate_styles(model, labels, style_a, style_b, t, seed=seed, progress=progress,
                              should_stop=should_stop)


#: Methods whose style can be blended, and how. A registered renderer can also join by giving an ``interpolate``
#: method with :func:`interpolate`'s arguments (``labels, style_a, style_b, t`` and the keywords).
_INTERPOLATORS: dict[str, Callable] = {"sian": _sian_interpolate}


def _interpolator(method: str) -> Callable | None:
    if method in _INTERPOLATORS:
        return _INTERPOLATORS[method]
    return getattr(get_renderer(method), "interpolate", None)


def interpolatable_methods() -> list[str]:
    """Names of the registered renderers that can render a style between two references."""
    return [m for m in renderers() if _interpolator(m) is not None]


def interpolate(labels, style_a, style_b, t: float, *, method: str = "sian", checkpoint=None, seed: SeedLike = None,
                device: str = "auto", progress: Callable[[int, int, str], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Render ``labels`` with a style between those of two reference tiles.

    Parameters
    ----------
    labels : (H, W) integer array
        Instance masks, 0 = background.
    style_a, style_b : image
        The two references (RGB uint8; grey, RGBA, float in [0, 1] and uint16 are converted), any size.
    t : float
        The position between them: 0 is ``style_a`` (exactly ``render(labels, style_a, method=method, seed=seed,
        ...)``), 1 is ``style_b``; values outside [0, 1] extrapolate.
    method : str
        A renderer that can blend styles (:func:`interpolatable_methods`).
    checkpoint : str or Path, optional
        The trained model (the method's shipped one when None).
    seed : int, numpy Generator or None
        The noise; the same seed gives the same image, and the same noise at every ``t``.
    device, progress, should_stop
        As for :func:`napari_nucsynth.render.render` (``should_stop()`` turning true raises ``InterruptedError``).

    Returns
    -------
    (H, W, 3) uint8 RGB array, the shape of ``labels``.

    Raises
    ------
    ValueError
        A method that cannot interpolate (the message names those that can), bad labels or references, a
        non-finite ``t``, no model to run.
    """
    fn = _interpolator(method)  # an unknown method is get_renderer's ValueError, naming the registered ones
    if fn is None:
        can = interpolatable_methods()
        raise ValueError(f"the {method!r} renderer cannot interpolate between styles; methods that can: "
                         f"{', '.join(can) if can else 'none registered'}")
    lab = _checked_labels(labels)
    a, b = as_rgb(style_a, "style_a"), as_rgb(style_b, "style_b")
    try:
        tf = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"t must be a number (0 = style_a, 1 = style_b), got {t!r}") from None
    if not math.isfinite(tf):
        raise ValueError(f"t must be a finite number (0 = style_a, 1 = style_b), got {t!r}")
    return fn(lab, a, b, tf, seed=seed, device=device, checkpoint=checkpoint, progress=progress,
              should_stop=should_stop)


@dataclass
class GalleryResult:
    """What :func:`gallery` returns.

    Attributes
    ----------
    grid : (H, W, 3) uint8 array
        The mosaic: the renders in rows of ``columns``, separated by a white gutter of :data:`GUTTER` pixels.
    renders : list of (h, w, 3) uint8 arrays
        Each render at full size, in the order of ``names``.
    names : list of str
        The style of each render (a file's stem, or the given name).
    skipped : list of (str, str)
        ``(name, reason)`` of every style that was left out: a file that is not a readable image, a reference the
        renderer refused.
    cells : list of (int, int)
        The ``(row, col)`` pixel offset of each render's cell in ``grid``.
    cell_shape : (int, int)
        The size of one cell in ``grid`` (the render's, or its thumbnail's).
    """

    grid: np.ndarray
    renders: list[np.ndarray]
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cells: list[tuple[int, int]] = field(default_factory=list)
    cell_shape: tuple[int, int] = (0, 0)


def gallery(labels, styles, *, method: str = "classic", checkpoint=None, seed: SeedLike = 0, device: str = "auto",
            names: Sequence[str] | None = None, columns: int | None = None, thumb: int | None = None,
            progress: Callable[[int, int, str], None] | None = None,
            should_stop: Callable[[], bool] | None = None, options: dict | None = None) -> GalleryResult:
    """Render the same masks, with the same seed, in the style of every reference, and lay them out in a mosaic.

    Parameters
    ----------
    labels : (H, W) integer array
        Instance masks, 0 = background.
    styles : str, Path or sequence of images
        A folder (every image file in it, sorted by name, read with :func:`napari_nucsynth.io.read_image`; files
        that cannot be read as an image are skipped and listed) or the reference images themselves.
    method, checkpoint, device, options
        As for :func:`napari_nucsynth.render.render`.
    seed : int, numpy Generator or None
        Every style is rendered with the same seed (a Generator or None draws one integer first), so the renders
        differ by style only.
    names : sequence of str, optional
        A name for each image of a sequence (default ``"style 1"``, ...); a folder's names are its files' stems.
    columns : int, optional
        Renders per row of the mosaic (default: ``ceil(sqrt(n))``).
    thumb : int, optional
        When given, each cell of the mosaic is its render scaled down so its longer side is at most ``thumb``
        pixels (``renders`` keep the full size).
    progress, should_stop : callables, optional
        ``progress(done, total, what)`` once per style; when ``should_stop()`` returns True the gallery raises
        ``InterruptedError``.

    Returns
    -------
    GalleryResult

    Raises
    ------
    ValueError
        Bad labels, a folder that does not exist, is empty or holds no readable image, no style the renderer
        accepts (the message gives the reasons), names of the wrong length, a bad ``columns`` or ``thumb``.
    InterruptedError
        ``should_stop()`` returned True.
    """
    lab = _checked_labels(labels)
    seed = _one_seed(seed)
    refs, skipped = _read_styles(styles, names)
    if columns is not None and int(columns) < 1:
        raise ValueError(f"columns must be a positive integer, got {columns!r}")
    if thumb is not None and int(thumb) < 1:
        raise ValueError(f"thumb must be a positive number of pixels, got {thumb!r}")
    options = check_options(method, options)  # an unknown method or option fails before any work
    n = len(refs)
    renders, done_names, refused = [], [], []
    for i, (name, img) in enumerate(refs):
        if should_stop is not None and should_stop():
            raise InterruptedError("gallery cancelled")
        if progress is not None:
            progress(i, n, f"style {i + 1}/{n}: {name}")
        try:
            out = render(lab, img, method=method, seed=seed, device=device, checkpoint=checkpoint,
                         should_stop=should_stop, options=options)
        except ValueError as exc:  # this reference (e.g. no detectable nuclei): skip it, say why
            skipped.append((name, str(exc)))
            refused.append(str(exc))
            continue
        renders.append(out)
        done_names.append(name)
    if not renders:
        if len(set(refused)) == 1:  # the same refusal for every style (no model, a bad checkpoint...): say it once
            raise ValueError(refused[0])
        reasons = "; ".join(f"{nm}: {why}" for nm, why in skipped[-3:])
        raise ValueError(f"none of the {n} styles could be rendered ({reasons})")
    if progress is not None:
        progress(n, n, "done")
    cells_img = [_shrink(r, thumb) for r in renders] if thumb is not None else renders
    grid, cells = _mosaic(cells_img, columns)
    return GalleryResult(grid=grid, renders=renders, names=done_names, skipped=skipped, cells=cells,
                         cell_shape=tuple(cells_img[0].shape[:2]))


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _checked_labels(labels) -> np.ndarray:
    lab = as_labels(labels, "labels")
    if lab.size == 0:
        raise ValueError(f"labels is empty (shape {lab.shape})")
    return lab


def _one_seed(seed: SeedLike) -> int:
    """The one integer seed every style is rendered with."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        as_rng(seed)  # validates (non-negative)
        return int(seed)
    return int(as_rng(seed).integers(0, 2**31 - 1))


def _read_styles(styles, names) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:
    """``([(name, RGB image)], [(name, why skipped)])`` of a folder or a sequence of images."""
    if isinstance(styles, (str, Path)):
        if names is not None:
            raise ValueError("names are taken from the file names when styles is a folder; pass names=None")
        return _read_folder(Path(styles))
    if isinstance(styles, np.ndarray) and styles.ndim in (2, 3) and styles.dtype != object:
        raise ValueError("styles must be a folder or a sequence of images; for one image pass [image]")
    try:
        imgs = list(styles)
    except TypeError:
        raise ValueError(f"styles must be a folder or a sequence of images, got {type(styles).__name__}") from None
    if not imgs:
        raise ValueError("styles is empty: give at least one reference image")
    if names is None:
        names = [f"style {i + 1}" for i in range(len(imgs))]
    names = [str(nm) for nm in names]
    if len(names) != len(imgs):
        raise ValueError(f"names must give one name per style ({len(imgs)}), got {len(names)}")
    return [(nm, as_rgb(img, f"styles[{i}]")) for i, (nm, img) in enumerate(zip(names, imgs))], []


def _read_folder(folder: Path) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, str]]]:
    from ..io import read_image

    if not folder.is_dir():
        raise ValueError(f"style folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"the style folder {folder} is empty: put reference H&E tiles (PNG, JPEG, TIFF) in it")
    refs, skipped = [], []
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((p.name, f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})"))
            continue
        try:
            refs.append((p.stem, as_rgb(read_image(p), p.name)))
        except Exception as exc:  # noqa: BLE001 - imageio raises many types on a corrupt file: skip it, say why
            skipped.append((p.name, f"unreadable: {type(exc).__name__}: {exc}"[:200]))
    if not refs:
        why = "; ".join(f"{nm}: {reason}" for nm, reason in skipped[:3])
        raise ValueError(f"no readable image in the style folder {folder} ({why})")
    return refs, skipped


def _shrink(img: np.ndarray, thumb: int) -> np.ndarray:
    """``img`` scaled down (anti-aliased) so its longer side is at most ``thumb`` pixels."""
    h, w = img.shape[:2]
    f = int(thumb) / max(h, w)
    if f >= 1:
        return img
    from skimage.transform import resize

    out = resize(img, (max(1, round(h * f)), max(1, round(w * f))), anti_aliasing=True, preserve_range=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _mosaic(imgs: list[np.ndarray], columns: int | None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The images (all of one shape) in rows of ``columns`` on white, :data:`GUTTER` px apart; and each offset."""
    n = len(imgs)
    cols = min(n, int(columns) if columns is not None else math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    h, w = imgs[0].shape[:2]
    grid = np.full((rows * h + (rows - 1) * GUTTER, cols * w + (cols - 1) * GUTTER, 3), 255, np.uint8)
    cells = []
    for i, img in enumerate(imgs):
        r0, c0 = (i // cols) * (h + GUTTER), (i % cols) * (w + GUTTER)
        grid[r0 : r0 + h, c0 : c0 + w] = img
        cells.append((r0, c0))
    return grid, cells
