"""npe2 sample data: a MoNuSeg crop with its real centroids (Points) and instance labels (Labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
ATTRIBUTION = (
    "MoNuSeg 2018 (Kumar et al., IEEE TMI 2017 and 2020), TCGA-49-4488-01Z-00-DX1, CC BY-NC-SA 4.0"
)


def load_monuseg_crop() -> tuple[np.ndarray, np.ndarray]:
    """The shipped crop: (RGB uint8 image, uint32 instance labels), 400 x 400."""
    import imageio.v3 as iio

    img = np.asarray(iio.imread(DATA / "monuseg_crop_image.png"))[..., :3]
    lab = np.asarray(iio.imread(DATA / "monuseg_crop_labels.png")).astype(np.uint32)
    return img, lab


def monuseg_crop():
    """Layer data tuples: the H&E crop, its nucleus centroids, and its instance labels."""
    from .points import centroids

    img, lab = load_monuseg_crop()
    pts = centroids(lab)
    meta = {"source": ATTRIBUTION}
    return [
        (img, {"name": "H&E (MoNuSeg crop)", "rgb": True, "metadata": meta}, "image"),
        (lab, {"name": "nuclei (MoNuSeg labels)", "metadata": meta, "visible": False}, "labels"),
        (
            pts,
            {
                "name": "centroids",
                "size": 8,
                "face_color": "yellow",
                "border_color": "black",
                "features": {"class": np.zeros(len(pts), dtype=int)},
                "feature_defaults": {"class": 0},
                "metadata": meta,
            },
            "points",
        ),
    ]
