"""Qt tests of the Train widget's data for kinds that train unpaired (points2image): Image layers or a folder of
images, no Labels layer, no labels folder. A tiny model, 64-px crops, two steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_nucsynth._widgets.train import TrainWidget
from napari_nucsynth.models import load_checkpoint

TIMEOUT = 30000  # ms
TINY = {"ngf": 4, "ngf_max": 16, "n_up": 2, "z_dim": 2, "noise_down": 1, "style_dim": 8, "ndf": 4, "d_levels": 3}


def _tile(n: int = 96, seed: int = 0) -> np.ndarray:
    """Dark discs (nuclei) on a pink background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    img = np.empty((n, n, 3), np.uint8)
    img[:] = (235, 200, 220)
    for r, c in rng.integers(8, n - 8, (14, 2)):
        img[(yy - r) ** 2 + (xx - c) ** 2 <= 36] = (80, 50, 140)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (restored after): a tiny model's convolutions gain nothing from two, and on a busy machine
    the second thread's waiting makes them many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def setup(make_napari_viewer, monkeypatch, tmp_path):
    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path / "models"))
    viewer = make_napari_viewer()
    a = viewer.add_image(_tile(), name="H&E a", rgb=True)
    b = viewer.add_image(_tile(seed=1), name="H&E b", rgb=True)
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    widget.model.value = "points2image"
    widget.config.value = json.dumps(TINY)
    widget.steps.value = 2
    widget.batch.value = 1
    widget.crop.value = 64
    widget.device.value = "cpu"
    widget.val_fraction.value = 0.0
    widget.preview_every.value = 0
    return viewer, (a, b), widget


def _hidden(w) -> bool:
    return w.native.isHidden()


def test_unpaired_kind_trains_on_image_layers_alone(setup, qtbot):
    viewer, (a, b), widget = setup
    # no Labels layer at all: the widget offers the Image layers, not pairs
    assert not _hidden(widget.images) and _hidden(widget.pairs)
    assert widget.images.value == [a, b]  # every RGB layer by default
    widget.images.value = [b]
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    res = widget.result
    assert res is not None and res.step == 2 and not res.stopped, widget.status.value
    ck = load_checkpoint(res.path, kind="points2image")
    assert ck["train_data"]["source"] == "layers" and ck["train_data"]["images"] == ["H&E b"]
    # a paired kind shows the pairs again (and says what is missing: there is no Labels layer)
    widget.model.value = "hovernet"
    assert _hidden(widget.images) and not _hidden(widget.pairs)
    widget.start()
    assert not widget.running and "Image + Labels" in widget.status.value


def test_unpaired_kind_folder_and_sources(setup, qtbot, tmp_path):
    import imageio.v3 as iio

    _, _, widget = setup
    widget.source.value = "folder"
    assert not _hidden(widget.images_dir) and _hidden(widget.labels_dir) and _hidden(widget.images)
    widget.images_dir.value = tmp_path / "nope"
    widget.start()
    assert not widget.running and "does not exist" in widget.status.value
    (tmp_path / "imgs").mkdir()
    iio.imwrite(tmp_path / "imgs" / "t0.png", _tile())
    widget.images_dir.value = tmp_path / "imgs"
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)
    res = widget.result
    assert res is not None and res.step == 2, widget.status.value
    assert load_checkpoint(res.path)["train_data"]["source"] == "folder"
    widget.model.value = "hovernet"  # a paired kind needs the labels folder again
    assert not _hidden(widget.labels_dir)
    widget.model.value = "points2image"
    widget.source.value = "synthetic"  # synthetic pairs are renders: not what an unpaired model learns from
    widget.start()
    assert not widget.running and "without labels" in widget.status.value
