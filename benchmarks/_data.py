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
