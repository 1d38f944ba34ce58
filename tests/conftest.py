"""Shared fixtures.

torch and torchvision are imported here, before any viewer exists: importing torchvision (which loads triton)
after Mesa's llvmpipe has loaded segfaults the process (GUIDE section 5).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

try:  # noqa: SIM105 - import order matters, see the module docstring
    import torch  # noqa: F401
    import torchvision  # noqa: F401
except ImportError:  # pragma: no cover - torch is a dependency, but the Qt-free tests do not need it
    pass

REPO = Path(__file__).resolve().parents[1]


def _monuseg_dir() -> Path | None:
    env = os.environ.get("NUCSYNTH_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "monuseg" / "train"]:
        if (cand / "labels").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def monuseg_dir() -> Path:
    """The MoNuSeg training folder (``images/``, ``labels/``, ``annotations_xml/``); tests skip without it."""
    path = _monuseg_dir()
    if path is None:
        pytest.skip("MoNuSeg tiles not found: set NUCSYNTH_DATA or place them in ../shared/data/monuseg/train")
    return path


@pytest.fixture(scope="session")
def monuseg_tiles(monuseg_dir) -> list[str]:
    return sorted(p.stem for p in (monuseg_dir / "labels").glob("*.png"))


@pytest.fixture(scope="session")
def load_tile(monuseg_dir):
    """``load_tile(stem) -> (image uint8 HxWx3, labels uint32 HxW)``, cached."""
    import imageio.v3 as iio

    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _load(stem: str):
        if stem not in cache:
            img = np.asarray(iio.imread(monuseg_dir / "images" / f"{stem}.png"))[..., :3]
            lab = np.asarray(iio.imread(monuseg_dir / "labels" / f"{stem}.png")).astype(np.uint32)
            cache[stem] = (img, lab)
        return cache[stem]

    return _load


@pytest.fixture
def crop_pair_dirs(load_tile, tmp_path) -> tuple[Path, Path]:
    """Two 96 x 96 crops of a MoNuSeg tile as ``im/t0.png, t1.png`` and their labels as ``lb/t0.png, t1.png``:
    image and label folders for the training CLI."""
    import imageio.v3 as iio

    from napari_nucsynth.io import write_labels

    img, lab = load_tile("TCGA-A7-A13F-01Z-00-DX1")
    for d in ("im", "lb"):
        (tmp_path / d).mkdir()
    for i in range(2):
        iio.imwrite(tmp_path / "im" / f"t{i}.png", img[i * 96 : i * 96 + 96, :96])
        write_labels(tmp_path / "lb" / f"t{i}.png", lab[i * 96 : i * 96 + 96, :96])
    return tmp_path / "im", tmp_path / "lb"


@pytest.fixture(scope="session")
def tiny_sian_checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained SIAN checkpoint (``_tiny.SIAN``), saved through the public ``build`` and
    ``save_checkpoint`` (whatever its state dict holds), its weights made larger than the initial ones so that the
    style visibly changes the image."""
    import torch
    from _tiny import SIAN

    from napari_nucsynth.models import get_model, save_checkpoint
    from napari_nucsynth.models import sian as S

    cfg = {k: v for k, v in SIAN.items() if k in S.default_config()}  # the keys of the SIAN being tested
    torch.manual_seed(0)
    model = get_model("sian").build(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "parametrizations" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    path = tmp_path_factory.mktemp("sian") / "tiny_sian.pt"
    return save_checkpoint(path, kind="sian", config=model.config, state_dict=model.state_dict(), step=0)
