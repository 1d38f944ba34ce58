"""Label maps, images and napari points CSV files on disk.

Label maps are never written as 8-bit: ``.tif``/``.tiff`` as uint32 TIFF, ``.png`` as 16-bit PNG (refused when
an id exceeds 65,535), ``.npy`` as uint32.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .._checks import as_labels, as_points

_LABEL_EXT = (".tif", ".tiff", ".png", ".npy")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_labels(path) -> np.ndarray:
    """Read an instance label map (TIFF, PNG or .npy) as uint32; raises ValueError for anything else."""
    path = Path(path)
    ext = path.suffix.lower()
    if not path.is_file():
        raise ValueError(f"label file not found: {path}")
    if ext == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif ext in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(path)
    elif ext == ".png":
        import imageio.v3 as iio

        arr = iio.imread(path)
    else:
        raise ValueError(f"unsupported label file {path.name}: use one of {', '.join(_LABEL_EXT)}")
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise ValueError(f"{path.name} is a colour image, not an instance label map")
    return as_labels(arr, f"labels in {path.name}").astype(np.uint32)


def write_labels(path, labels) -> Path:
    """Write an instance label map by extension: ``.tif``/``.tiff`` uint32 TIFF, ``.png`` 16-bit, ``.npy`` uint32.

    The write is atomic (a temporary file, then a rename).
    """
    path = Path(path)
    ext = path.suffix.lower()
    lab = as_labels(labels)
    if lab.size and int(lab.max()) > np.iinfo(np.uint32).max:
        raise ValueError("labels hold ids above 2**32 - 1")
    lab = lab.astype(np.uint32)
    if ext in (".tif", ".tiff"):
        import tifffile

        _atomic(path, lambda p: tifffile.imwrite(p, lab, compression="zlib"))
    elif ext == ".png":
        if lab.size and lab.max() > 65535:
            raise ValueError(f"{lab.max()} ids do not fit a 16-bit PNG: write a .tif or .npy instead")
        import imageio.v3 as iio

        _atomic(path, lambda p: iio.imwrite(p, lab.astype(np.uint16), extension=".png"))
    elif ext == ".npy":
        _atomic(path, lambda p: np.save(p, lab))
    else:
        raise ValueError(f"unsupported label file {path.name}: use one of {', '.join(_LABEL_EXT)}")
    return path


def read_image(path) -> np.ndarray:
    """Read an image file as an array (no conversion)."""
    import imageio.v3 as iio

    return np.asarray(iio.imread(Path(path)))


def read_points_csv(path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read points from napari's points CSV (``index,axis-0,axis-1`` and optional feature columns).

    Returns ``(points (N, 2) float, classes (N,) int or None)``; classes come from a ``class`` column when there is
    one. A plain two-column CSV of ``row,col`` (with or without header) is accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"points file not found: {path}")
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        return np.zeros((0, 2)), None
    header = [c.strip() for c in rows[0]]
    has_header = not all(_is_number(c) for c in header)
    body = rows[1:] if has_header else rows
    if has_header:
        axes = sorted((h for h in header if h.startswith("axis-")), key=lambda h: int(h.split("-")[1]))
        if len(axes) < 2:
            raise ValueError(f"{path.name}: expected napari's columns index,axis-0,axis-1, got {header}")
        cols = [header.index(a) for a in axes[-2:]]  # the last two axes are (row, col)
        cls_col = header.index("class") if "class" in header else None
    else:
        cols, cls_col = ([0, 1] if len(header) == 2 else [len(header) - 2, len(header) - 1]), None
    try:
        pts = np.array([[float(r[c]) for c in cols] for r in body], dtype=float).reshape(-1, 2)
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path.name}: cannot read coordinates ({e})") from None
    classes = None
    if cls_col is not None:
        try:
            classes = np.array([int(float(r[cls_col])) for r in body], dtype=np.int64)
        except ValueError as e:
            raise ValueError(f"{path.name}: the class column must hold integers ({e})") from None
    return as_points(pts, f"points in {path.name}"), classes


def write_points_csv(path, points, classes=None) -> Path:
    """Write points in napari's points CSV format (``index,axis-0,axis-1[,class]``), atomically."""
    path = Path(path)
    pts = as_points(points)
    header = ["index", "axis-0", "axis-1"] + (["class"] if classes is not None else [])

    def _write(p):
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for i, (r, c) in enumerate(pts):
                w.writerow([i, repr(float(r)), repr(float(c))] + ([int(classes[i])] if classes is not None else []))

    _atomic(path, _write)
    return path


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
