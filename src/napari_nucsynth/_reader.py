"""npe2 readers: Aperio/MoNuSeg XML, HoVer-Net/CoNSeP ``.npy``/``.mat`` and PanNuke ``.npy``.

Each ``get_*_reader(path)`` returns a function that turns the path into napari layer data tuples, or None when
the file is not of its format (so napari can try another reader). No Qt or napari import: the layer data are
plain tuples. The computation lives in :mod:`napari_nucsynth.io.formats`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import formats

LayerData = tuple  # (data, kwargs, layer_type)


def _one_path(path) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return Path(path)


def _layers(sample: formats.Sample, *, source: str) -> list[LayerData]:
    meta = {"source": source, **{k: v for k, v in sample.meta.items() if k in ("format", "image_path")}}
    out: list[LayerData] = []
    if sample.image is not None:
        out.append((sample.image, {"name": sample.name, "rgb": True, "metadata": meta}, "image"))
    out.append((sample.labels, {"name": f"{sample.name} nuclei", "metadata": meta}, "labels"))
    if sample.types is not None:
        out.append((sample.types, {"name": f"{sample.name} types", "metadata": {**meta, "class_names":
                    sample.meta.get("class_names", {})}, "visible": False}, "labels"))
    return out


# ------------------------------------------------------------------------------------------------ Aperio XML


def _is_aperio(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip()
    except OSError:
        return False
    return b"<Annotations" in head or b"<Annotation " in head


def get_xml_reader(path):
    """Reader for Aperio ImageScope XML nuclei outlines (MoNuSeg, MoNuSAC): tile (when found) + labels."""
    p = _one_path(path)
    if p is None or p.suffix.lower() != ".xml" or not p.is_file() or not _is_aperio(p):
        return None
    return read_xml


def read_xml(path) -> list[LayerData]:
    """Layers of an Aperio XML file: the tile beside it (or in ``../images``), its labels (uint32), types."""
    p = _one_path(path)
    sample = formats.read_aperio_xml(p)
    if sample.image is None:  # no tile: the label map takes the polygons' extent
        sample.meta["note"] = "no tile found beside the XML or in ../images; the label map spans the polygons"
    return _layers(sample, source=str(p))


# ------------------------------------------------------------------------------------------------ HoVer-Net


def _npy_shape(path: Path):
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # noqa: BLE001 - not a readable plain .npy: not ours, let another reader try
        return None
    return arr.shape if isinstance(arr, np.ndarray) else None


def get_hovernet_reader(path):
    """Reader for HoVer-Net patches (``.npy`` H x W x 5/4) and HoVer-Net/CoNSeP label ``.mat`` files."""
    p = _one_path(path)
    if p is None or not p.is_file():
        return None
    ext = p.suffix.lower()
    if ext == ".npy":
        shape = _npy_shape(p)
        if shape is None or len(shape) != 3 or shape[-1] not in (4, 5):
            return None
        return read_hovernet
    if ext == ".mat":
        try:
            from scipy.io import whosmat

            names = {w[0] for w in whosmat(p)}
        except Exception:  # noqa: BLE001 - scipy raises several types for files it cannot read: not ours
            return None
        return read_hovernet if "inst_map" in names else None
    return None


def read_hovernet(path) -> list[LayerData]:
    """Layers of a HoVer-Net ``.npy`` patch or ``.mat`` label file (tile found beside a ``.mat`` when present)."""
    p = _one_path(path)
    sample = formats.read_hovernet_npy(p) if p.suffix.lower() == ".npy" else formats.read_hovernet_mat(p)
    layers = _layers(sample, source=str(p))
    cen = sample.meta.get("centroids")
    if cen is not None and len(cen):
        feats = {}
        inst_type = sample.meta.get("inst_type")
        if inst_type is not None and len(inst_type) == len(cen):
            feats["class"] = np.asarray(inst_type, dtype=int)
        layers.append((np.asarray(cen), {"name": f"{sample.name} centroids", "size": 6, "features": feats,
                                         "visible": False}, "points"))
    return layers


# ------------------------------------------------------------------------------------------------ PanNuke


def get_pannuke_reader(path):
    """Reader for PanNuke ``images.npy`` / ``masks.npy`` (the other file found beside it or in PanNuke's layout)."""
    p = _one_path(path)
    if p is None or p.suffix.lower() != ".npy" or not p.is_file():
        return None
    shape = _npy_shape(p)
    if shape is None or len(shape) != 4:
        return None
    if p.stem == "masks" and shape[-1] == 6:
        return read_pannuke
    if p.stem == "images" and shape[-1] == 3:
        _, masks = formats.find_pannuke_pair(p)
        return read_pannuke if masks is not None else None
    return None


def read_pannuke(path) -> list[LayerData]:
    """Layers of a PanNuke fold: images (N x 256 x 256 x 3), nuclei (uint32) and types stacks."""
    p = _one_path(path)
    images, masks = formats.find_pannuke_pair(p)
    if masks is None:
        raise ValueError(f"no PanNuke masks.npy found for {p}")
    types = images.with_name("types.npy") if images is not None else None
    samples = formats.read_pannuke(images, masks, types if types is not None and types.is_file() else None)
    meta = {"source": str(masks), "format": "pannuke",
            "class_names": {c + 1: n for c, n in enumerate(formats.PANNUKE_CLASSES)},
            "tissue": [s.meta.get("tissue") for s in samples]}
    out: list[LayerData] = []
    if images is not None:
        out.append((np.stack([s.image for s in samples]), {"name": "PanNuke images", "rgb": True,
                                                          "metadata": meta}, "image"))
    out.append((np.stack([s.labels for s in samples]), {"name": "PanNuke nuclei", "metadata": meta}, "labels"))
    out.append((np.stack([s.types for s in samples]), {"name": "PanNuke types", "metadata": meta,
                                                      "visible": False}, "labels"))
    return out
