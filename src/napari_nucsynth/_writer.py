"""npe2 writers: Labels layers as uint32 TIFF, Points layers as napari's points CSV.

npe2 single-layer writers: ``writer(path, data, meta) -> list[str]``. No Qt or napari import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io._files import _atomic
from .io.formats import _to_uint32


def write_labels_tif(path: str, data, meta: dict | None = None) -> list[str]:
    """Write a Labels layer (2-D or a stack) as a uint32 TIFF, atomically; ``.tif`` is added when missing.

    Raises ValueError for negative ids or ids above 2**32 - 1 (never truncates to 8 or 16 bits).
    """
    import tifffile

    p = Path(path)
    if p.suffix.lower() not in (".tif", ".tiff"):
        p = p.with_name(p.name + ".tif")
    arr = np.asarray(data)
    if arr.ndim < 2:
        raise ValueError(f"labels must be at least 2-D, got shape {arr.shape}")
    lab = _to_uint32(arr.reshape(-1, arr.shape[-1]), "labels").reshape(arr.shape)
    _atomic(p, lambda t: tifffile.imwrite(t, lab, compression="zlib"))
    return [str(p)]


def write_points_csv(path: str, data, meta: dict | None = None) -> list[str]:
    """Write a 2-D Points layer in napari's CSV format (``index,axis-0,axis-1[,class]``), atomically.

    The ``class`` column comes from the layer's ``features["class"]`` when present.
    """
    from .io import write_points_csv as _write

    p = Path(path)
    if p.suffix.lower() != ".csv":
        p = p.with_name(p.name + ".csv")
    pts = np.asarray(data, dtype=float)
    if pts.size and (pts.ndim != 2 or pts.shape[1] != 2):
        raise ValueError(f"only 2-D points (N x 2, row and column) can be written, got shape {pts.shape}")
    classes = None
    feats = (meta or {}).get("features")
    if feats is not None:
        try:
            col = feats["class"]
        except (KeyError, TypeError, IndexError):
            col = None
        if col is not None:
            classes = np.asarray(col)
            if classes.shape != (len(pts),):
                classes = None
            elif not np.issubdtype(classes.dtype, np.integer):
                try:
                    as_int = classes.astype(np.int64)
                    classes = as_int if np.array_equal(as_int, classes) else None
                except (TypeError, ValueError):
                    classes = None
    _write(p, pts.reshape(-1, 2), classes)
    return [str(p)]
