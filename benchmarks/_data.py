"""Where benchmarks find the MoNuSeg training tiles: ``$NUCSYNTH_DATA`` or ``../shared/data/monuseg/train``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def monuseg_dir() -> Path:
    """The folder holding ``images/`` and ``labels/``; raises ``SystemExit`` with a clear message if absent."""
    env = os.environ.get("NUCSYNTH_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "monuseg" / "train"]:
        if (cand / "labels").is_dir():
            return cand
    raise SystemExit("MoNuSeg tiles not found: set NUCSYNTH_DATA to a folder holding images/ and labels/")


def tile_ids(root: Path | None = None) -> list[str]:
    root = root or monuseg_dir()
    return sorted(p.stem for p in (root / "labels").glob("*.png"))


def load_labels(tile: str, root: Path | None = None) -> np.ndarray:
    import imageio.v3 as iio

    root = root or monuseg_dir()
    return np.asarray(iio.imread(root / "labels" / f"{tile}.png")).astype(np.uint32)


def load_image(tile: str, root: Path | None = None) -> np.ndarray:
    import imageio.v3 as iio

    root = root or monuseg_dir()
    return np.asarray(iio.imread(root / "images" / f"{tile}.png"))[..., :3]


#: Organ of each MoNuSeg training tile, by TCGA tissue source site (as the challenge's tables list them).
ORGANS = {
    "A7": "breast", "AR": "breast", "E2": "breast", "B0": "kidney", "HE": "kidney",
    "18": "liver", "21": "liver", "38": "liver", "49": "liver", "50": "liver",
    "CH": "prostate", "G9": "prostate", "DK": "bladder", "G2": "bladder", "AY": "colon", "NH": "colon",
    "KB": "stomach", "RD": "stomach",
}

#: The segmentation benchmark's held-out tiles: one per organ for six of the seven organs (stomach has two tiles
#: only and stays in training); the other 24 train.
SEGMENT_HELDOUT = [
    "TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1",
    "TCGA-G9-6363-01Z-00-DX1", "TCGA-DK-A2I6-01A-01-TS1", "TCGA-AY-A8YK-01A-01-TS1",
]


def organ(tile: str) -> str:
    return ORGANS.get(tile.split("-")[1], "unknown")
