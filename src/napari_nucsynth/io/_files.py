"""Label maps, images and napari points CSV files on disk.

Label maps are never written as 8-bit: ``.tif``/``.tiff`` as uint32 TIFF, ``.png`` as 16-bit PNG (refused when
an id exceeds 65,535), ``.npy`` as uint32.

Every error is a ``ValueError`` that names the file: a missing file, an extension no reader or writer here knows
(:data:`EXTENSIONS`), a file that cannot be decoded (truncated, damaged, not what its extension says).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .._checks import as_labels, as_points

#: The file extensions each kind of file is read and written with.
EXTENSIONS = {
    "labels": (".tif", ".tiff", ".png", ".npy"),
    "image": (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"),
    "points": (".csv",),
}
_NOUNS = {"labels": "a label map", "image": "an image", "points": "a napari points CSV file"}


def check_output(path, kind: str, *, name: str = "output") -> Path:
    """``path`` as a :class:`~pathlib.Path` once a ``kind`` file (``"labels"``, ``"image"``, ``"points"``) can be
    written there: an extension of ``EXTENSIONS[kind]`` and a folder that exists. Call it before the work whose
    result it will hold.

    Raises
    ------
    ValueError
        Naming ``name`` (e.g. ``"--out"``), the path and the extensions accepted.
    """
    path = Path(path)
    exts = EXTENSIONS[kind]
    if path.suffix.lower() not in exts:
        got = f"unsupported extension {path.suffix}" if path.suffix else "no extension"
        raise ValueError(f"{name} {path}: {got}; {_NOUNS[kind]} must end in {', '.join(exts)}")
    if not path.parent.is_dir():
        raise ValueError(f"{name} {path}: the folder {path.parent} does not exist")
    return path


def _decode(path: Path, what: str, read):
    """``read(path)``, with a missing file or one that cannot be decoded as ``what`` raised as a ValueError that
    names the path (imageio, Pillow and tifffile raise OSError, SyntaxError, struct.error, zlib.error... for a
    truncated or damaged file, none of them naming it)."""
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        return read(path)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any undecodable file is the same user error
        why = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"cannot read {path} as {_NOUNS.get(what, what)}: {why}") from None


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
    if ext not in EXTENSIONS["labels"]:
        raise ValueError(f"unsupported label file {path}: use one of {', '.join(EXTENSIONS['labels'])}")
    arr = np.squeeze(np.asarray(_decode(path, "labels", _read_label_array)))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise ValueError(f"{path.name} is a colour image, not an instance label map")
    return as_labels(arr, f"labels in {path.name}").astype(np.uint32)


def _read_label_array(path: Path):
    ext = path.suffix.lower()
    if ext == ".npy":
        return np.load(path, allow_pickle=False)
    if ext in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    import imageio.v3 as iio

    return iio.imread(path)


def write_labels(path, labels) -> Path:
    """Write an instance label map by extension: ``.tif``/``.tiff`` uint32 TIFF, ``.png`` 16-bit, ``.npy`` uint32.

    The write is atomic (a temporary file, then a rename).
    """
    path = check_output(path, "labels")
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
    else:
        _atomic(path, lambda p: np.save(p, lab))
    return path


def read_image(path) -> np.ndarray:
    """Read an image file as an array (no conversion); a missing or undecodable file raises a ValueError naming it."""
    import imageio.v3 as iio

    return np.asarray(_decode(Path(path), "image", iio.imread))


def write_image(path, image) -> Path:
    """Write an RGB(A) or grey uint8 image by extension (``EXTENSIONS["image"]``), atomically."""
    import imageio.v3 as iio

    path = check_output(path, "image")
    _atomic(path, lambda p: iio.imwrite(p, np.asarray(image), extension=path.suffix.lower()))
    return path


#: PNG files whose chunks were verified in this process: (path, size, mtime_ns) -> (height, width, Pillow mode)
_PNG_CHECKED: dict[tuple[str, int, int], tuple[int, int, str]] = {}


def png_info(path, what: str = "image") -> tuple[int, int, str]:
    """(height, width, Pillow mode) of a PNG file, its header and chunk checksums verified without decoding it
    (a 1000 x 1000 tile in about 7 ms against 30 ms). Remembered per file (its path, size and modification time),
    so a file checked twice in one process (``generate``'s CLI checks the style tiles, then reads their shapes) is
    read once.

    Raises
    ------
    ValueError
        Naming the file (read as ``what``): missing, truncated or damaged.
    """
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _PNG_CHECKED:
        return _PNG_CHECKED[key]

    def _header(p):
        from PIL import Image

        with Image.open(p) as im:
            size, mode = im.size, im.mode
            im.verify()
        return size[1], size[0], mode

    info = _decode(path, what, _header)
    if key is not None:
        _PNG_CHECKED[key] = info
    return info


def verify_image(path) -> Path:
    """Check that an image file can be read, without decoding what need not be: a PNG by its chunk checksums
    (:func:`png_info`), other formats by reading them.

    Raises
    ------
    ValueError
        Naming the file: missing, truncated or damaged.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        read_image(path)
        return path
    png_info(path, "image")
    return path


def read_points_csv(path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read points from napari's points CSV (``index,axis-0,axis-1`` and optional feature columns).

    Returns ``(points (N, 2) float, classes (N,) int or None)``; classes come from a ``class`` column when there is
    one. A plain two-column CSV of ``row,col`` (with or without header) is accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"points file not found: {path}")
    try:
        with path.open(newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read {path} as {_NOUNS['points']}: {e}") from None
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
