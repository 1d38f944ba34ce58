"""Qt tests of the Segment widget, with fake segmenters (no trained network) on small images."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_nucsynth._widgets.segment import SegmentWidget
from napari_nucsynth.devices import available_devices
from napari_nucsynth.segment import _REGISTRY, register, segmenters
from napari_nucsynth.segment.hovernet import default_checkpoint

TIMEOUT = 20000  # ms
FAKE = "fake (test)"
FAKE_B = "fake b (test)"
SLOW = "slow (test)"
CALLS = {"predict": 0, "post": 0, "last": {}}


def _blobs(n: int = 64) -> np.ndarray:
    """An RGB tile with three dark squares of different darkness: darkness 0.84, 0.61 and 0.37."""
    img = np.full((n, n, 3), 230, np.uint8)
    img[5:15, 5:15] = 40
    img[25:35, 25:35] = 100
    img[45:55, 45:55] = 160
    return img


class _FakeSegmenter:
    """Darkness as the network output; a threshold on it (and a minimum area) as post-processing."""

    name = FAKE
    description = "test only"
    needs_checkpoint = True
    params = {"threshold": (0.5, 0.0, 1.0), "min_area": (0, 0, 200)}  # noqa: RUF012

    def predict_maps(self, image, *, checkpoint=None, device="auto", tta=False, progress=None, should_stop=None):
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"image must be an RGB image (H x W x 3), got shape {img.shape}")
        CALLS["predict"] += 1
        CALLS["last"] = {"checkpoint": checkpoint, "device": device, "tta": tta}
        if progress:
            progress(1, 1, "predicted")
        return (1 - img.mean(-1, keepdims=True) / 255).astype(np.float32)

    def postprocess(self, maps, *, threshold=0.5, min_area=0):
        CALLS["post"] += 1
        lab, _ = ndi.label(maps[..., 0] > threshold)
        if min_area:
            area = np.bincount(lab.ravel())
            lab[area[lab] < min_area] = 0
        return lab.astype(np.int32)  # the widget makes it uint32

    def __call__(self, image, *, checkpoint=None, device="auto", tta=False, progress=None, should_stop=None,
                 **params):
        return self.postprocess(self.predict_maps(image, checkpoint=checkpoint, device=device, tta=tta), **params)


class _FakeNoModel(_FakeSegmenter):
    name = FAKE_B
    needs_checkpoint = False


class _SlowSegmenter(_FakeSegmenter):
    """A network that takes its time and honours should_stop, to test cancellation."""

    name = SLOW

    def predict_maps(self, image, *, checkpoint=None, device="auto", tta=False, progress=None, should_stop=None):
        for i in range(100):
            if should_stop and should_stop():
                raise InterruptedError("stopped")
            if progress:
                progress(i, 100, "working")
            time.sleep(0.01)
        return super().predict_maps(image)


@pytest.fixture
def fakes():
    CALLS.update(predict=0, post=0, last={})
    for name, cls in ((FAKE, _FakeSegmenter), (FAKE_B, _FakeNoModel), (SLOW, _SlowSegmenter)):
        register(name)(cls)
    yield CALLS
    for name in (FAKE, FAKE_B, SLOW):
        _REGISTRY.pop(name, None)


@pytest.fixture
def setup(fakes, make_napari_viewer):  # fakes first: unregistered after the viewer closes
    viewer = make_napari_viewer()
    image = viewer.add_image(_blobs(), name="tile", rgb=True, scale=(0.5, 0.5), translate=(3, 4))
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.method.value = FAKE
    return viewer, image, widget


def _wait_idle(widget, qtbot):
    qtbot.waitUntil(lambda: not widget.running and not widget._timer.isActive(), timeout=TIMEOUT)


def _outputs(viewer):
    return [lyr for lyr in viewer.layers if lyr.name.startswith("segmentation: ")]


def _n(labels) -> int:
    return len(np.unique(labels)) - 1


def test_segment_lands_as_a_uint32_labels_layer(setup, qtbot):
    viewer, image, widget = setup
    assert widget.image_combo.value is image
    widget.segment_btn.clicked()  # the button the user presses
    assert widget.running and widget.segment_btn.text == "Cancel"
    _wait_idle(widget, qtbot)
    assert widget.segment_btn.text == "Segment" and widget.progress.value == widget.progress.max
    out = viewer.layers[f"segmentation: tile ({FAKE})"]
    assert out.data.dtype == np.uint32 and out.data.shape == (64, 64)
    assert _n(out.data) == 2  # threshold 0.5: the two darkest squares
    assert np.allclose(out.scale, image.scale) and np.allclose(out.translate, image.translate)
    assert "2 nuclei" in widget.status.value
    assert CALLS["last"] == {"checkpoint": None, "device": "auto", "tta": False}

    # segmenting again updates the same layer; deleted, it is added again
    widget.run()
    _wait_idle(widget, qtbot)
    assert _outputs(viewer) == [out]
    viewer.layers.remove(out)
    widget.run()
    _wait_idle(widget, qtbot)
    (again,) = _outputs(viewer)
    assert again is not out and again.data.dtype == np.uint32 and _n(again.data) == 2


def test_parameter_change_reruns_only_postprocessing(setup, qtbot):
    viewer, _, widget = setup
    assert set(widget._param_widgets) == {"threshold", "min_area"}
    assert isinstance(widget._param_widgets["min_area"].value, int)  # an int parameter gets an int slider
    assert widget.params() == {"threshold": 0.5, "min_area": 0}
    widget.run()
    _wait_idle(widget, qtbot)
    out = viewer.layers[f"segmentation: tile ({FAKE})"]
    assert (CALLS["predict"], CALLS["post"]) == (1, 1)

    widget._param_widgets["threshold"].value = 0.3
    qtbot.waitUntil(lambda: _n(out.data) == 3, timeout=TIMEOUT)
    _wait_idle(widget, qtbot)
    assert CALLS["predict"] == 1 and CALLS["post"] == 2
    assert "post-processed cached network outputs" in widget.status.value

    # a burst of changes (a slider drag) while post-processing: the latest value wins, the network never re-runs
    for v in (0.2, 0.45, 0.6, 0.7):
        widget._param_widgets["threshold"].value = v
        qtbot.wait(20)
    _wait_idle(widget, qtbot)
    assert _n(out.data) == 1 and CALLS["predict"] == 1 and CALLS["post"] <= 6
    widget._param_widgets["min_area"].value = 150  # larger than every square (100 px): none left
    _wait_idle(widget, qtbot)
    assert _n(out.data) == 0 and out.data.dtype == np.uint32

    # pressing Segment with unchanged settings reuses the cache too
    widget.run()
    _wait_idle(widget, qtbot)
    assert CALLS["predict"] == 1 and _outputs(viewer) == [out]

    # a method's parameter values are kept when switching away and back
    widget.method.value = FAKE_B
    assert widget.params() == {"threshold": 0.5, "min_area": 0}
    widget.method.value = FAKE
    assert widget.params() == {"threshold": 0.7, "min_area": 150}


def test_settings_changes_invalidate_the_cache(setup, qtbot):
    viewer, image, widget = setup
    widget.run()
    _wait_idle(widget, qtbot)
    out = viewer.layers[f"segmentation: tile ({FAKE})"]
    before = out.data.copy()

    # TTA: a parameter change no longer post-processes the old maps; Segment runs the network again
    widget.tta.value = True
    widget._param_widgets["threshold"].value = 0.3
    _wait_idle(widget, qtbot)
    assert CALLS["post"] == 1 and np.array_equal(out.data, before) and "Press Segment" in widget.status.value
    widget.run()
    _wait_idle(widget, qtbot)
    assert CALLS["predict"] == 2 and CALLS["last"]["tta"] is True and _n(out.data) == 3

    # device
    widget.device.value = "cpu"
    widget.run()
    _wait_idle(widget, qtbot)
    assert CALLS["predict"] == 3 and CALLS["last"]["device"] == "cpu"

    # another image layer, then the same layer with new data
    other = viewer.add_image(_blobs()[::-1].copy(), name="other", rgb=True)
    assert widget.image_combo.value is image  # a new layer does not steal the choice
    widget.image_combo.value = other
    widget.run()
    _wait_idle(widget, qtbot)
    assert CALLS["predict"] == 4 and f"segmentation: other ({FAKE})" in viewer.layers
    other.data = _blobs()
    widget.run()
    _wait_idle(widget, qtbot)
    assert CALLS["predict"] == 5

    # another method: its own output layer
    widget.method.value = FAKE_B
    widget.run()
    _wait_idle(widget, qtbot)
    assert CALLS["predict"] == 6 and f"segmentation: other ({FAKE_B})" in viewer.layers
    # removing the image frees the cached maps
    viewer.layers.remove(other)
    assert widget._cache is None


class _NoSplit:
    """A segmenter without predict_maps/postprocess, with a parameter; counts its runs."""

    name = "nosplit (test)"
    description = "test only"
    needs_checkpoint = False
    params = {"threshold": (0.5, 0.0, 1.0)}  # noqa: RUF012
    runs = 0

    def __call__(self, image, *, checkpoint=None, device="auto", tta=False, progress=None, should_stop=None,
                 threshold=0.5):
        type(self).runs += 1
        return ndi.label((1 - np.asarray(image).mean(-1) / 255) > threshold)[0].astype(np.uint32)


def test_segmenter_without_split_reruns_in_full(make_napari_viewer, qtbot, monkeypatch):
    monkeypatch.setitem(_REGISTRY, _NoSplit.name, _NoSplit)
    monkeypatch.setattr(_NoSplit, "runs", 0)
    viewer = make_napari_viewer()
    viewer.add_image(_blobs(), name="tile", rgb=True)
    widget = SegmentWidget(viewer)
    widget.method.value = _NoSplit.name
    assert not widget.checkpoint.enabled and not widget.browse.enabled
    widget._param_widgets["threshold"].value = 0.3  # nothing segmented yet: nothing runs
    _wait_idle(widget, qtbot)
    assert _NoSplit.runs == 0 and "Press Segment" in widget.status.value
    widget.run()
    _wait_idle(widget, qtbot)
    out = viewer.layers["segmentation: tile (nosplit (test))"]
    assert _NoSplit.runs == 1 and _n(out.data) == 3
    widget._param_widgets["threshold"].value = 0.7  # a classical method re-runs by itself
    qtbot.waitUntil(lambda: _n(out.data) == 1, timeout=TIMEOUT)
    _wait_idle(widget, qtbot)
    assert _NoSplit.runs == 2


def test_cancel_stops_the_worker(setup, qtbot):
    viewer, image, widget = setup
    widget.method.value = SLOW
    widget.segment_btn.clicked()
    qtbot.waitUntil(lambda: widget.progress.value >= 3, timeout=TIMEOUT)  # progress reaches the UI thread
    assert widget.progress.max == 100 and "working" in widget.status.value
    widget.segment_btn.clicked()  # the button now reads Cancel
    assert widget.segment_btn.text == "Cancelling..."
    t0 = time.perf_counter()
    _wait_idle(widget, qtbot)
    assert time.perf_counter() - t0 < 0.5  # stopped at the next check, not after the 1 s the network takes
    assert widget.status.value == "Cancelled." and not _outputs(viewer) and widget._cache is None
    assert widget.segment_btn.text == "Segment" and widget.segment_btn.enabled

    # removing the image being segmented cancels
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=TIMEOUT)
    viewer.layers.remove(image)
    _wait_idle(widget, qtbot)
    assert "was removed" in widget.status.value and not _outputs(viewer)

    # closing the widget cancels a running job
    viewer.add_image(_blobs(), name="tile2", rgb=True)
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=TIMEOUT)
    job, worker = widget._job, widget._worker
    viewer.window.remove_dock_widget(widget.native)  # the dock's close button
    assert job.cancelled
    qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT)
    assert not _outputs(viewer)


def test_bad_input_is_a_message(setup, qtbot, tmp_path):
    viewer, image, widget = setup
    two = viewer.add_image(np.zeros((32, 32, 2), np.uint8), name="two channels")
    widget.image_combo.value = two
    widget.run()
    _wait_idle(widget, qtbot)
    assert widget.status.value.startswith("Cannot segment") and "RGB image" in widget.status.value
    assert not _outputs(viewer) and widget.segment_btn.text == "Segment" and widget.segment_btn.enabled

    # a checkpoint file that is not one, picked with the file field, for a real model-based method
    if "hovernet" in segmenters():
        bad = tmp_path / "broken.pt"
        bad.write_bytes(b"not a checkpoint")
        widget.image_combo.value = image
        widget.method.value = "hovernet"
        assert widget.checkpoint.enabled and widget.checkpoint.value is None  # "(default)"
        widget.browse.value = bad
        assert widget.checkpoint.value == bad and bad in widget.checkpoint.choices
        widget.run()
        _wait_idle(widget, qtbot)
        assert "Cannot segment" in widget.status.value and "broken.pt" in widget.status.value
        assert not _outputs(viewer)

    # nothing to segment: a message, no worker
    for lyr in list(viewer.layers):
        viewer.layers.remove(lyr)
    assert widget.image_combo.value is None
    widget.run()
    assert not widget.running and "Choose an Image layer" in widget.status.value


def test_dropdowns_list_the_registry_checkpoints_and_devices(fakes, make_napari_viewer, tmp_path, monkeypatch):
    from napari_nucsynth.models import save_checkpoint

    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path))
    mine = save_checkpoint(tmp_path / "mine.pt", kind=FAKE, config={}, state_dict={}, step=0)
    save_checkpoint(tmp_path / "someone_else.pt", kind="not the fake", config={}, state_dict={}, step=0)
    (tmp_path / "junk.pt").write_bytes(b"junk")  # unreadable: skipped
    viewer = make_napari_viewer()
    viewer.add_image(_blobs(), name="tile", rgb=True)
    widget = SegmentWidget(viewer)
    assert list(widget.method.choices) == segmenters()
    assert list(widget.device.choices) == available_devices() and widget.device.value == "auto"
    widget.method.value = FAKE
    assert widget.checkpoint.enabled and widget.browse.enabled
    assert widget.checkpoint.choices == (None, mine) and widget.checkpoint.value is None  # "(default)" first

    # a checkpoint saved while the widget is open appears at the next refresh (any layer change)
    time.sleep(0.01)
    newer = save_checkpoint(tmp_path / "newer.pt", kind=FAKE, config={}, state_dict={}, step=1)
    monkeypatch.setitem(_REGISTRY, "late (test)", _FakeNoModel)  # and so does a method registered since
    viewer.add_image(_blobs(), name="another", rgb=True)
    assert set(widget.checkpoint.choices) == {None, mine, newer}
    assert "late (test)" in widget.method.choices and widget.method.value == FAKE
    widget.checkpoint.value = newer
    widget.method.value = FAKE_B  # a method without a model: only "(default)", disabled
    assert widget.checkpoint.choices == (None,) and not widget.checkpoint.enabled and not widget.browse.enabled


@pytest.mark.skipif("maskrcnn" not in segmenters(), reason="maskrcnn is not registered")
def test_train_a_model_is_offered_when_a_method_has_none(make_napari_viewer, tmp_path, monkeypatch):
    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path))  # nothing saved; maskrcnn ships no model
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    assert widget.train_model_btn.native.isHidden()  # watershed runs no model
    widget.method.value = "maskrcnn"
    assert not widget.train_model_btn.native.isHidden() and "needs a trained model" in widget.status.value
    widget.train_model_btn.changed.emit(None)
    assert "Train widget is open with 'maskrcnn'" in widget.status.value, widget.status.value
    _, train = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Train")  # the one just docked
    train = getattr(train, "_magic_widget", train)
    assert train.model.value == "maskrcnn"
    train.model.value = "hovernet"
    widget.train_model_btn.changed.emit(None)  # again, with the Train widget already docked
    assert "Train widget is open with 'maskrcnn'" in widget.status.value, widget.status.value
    assert train.model.value == "maskrcnn"
    if "hovernet" in segmenters():
        widget.method.value = "hovernet"  # the shipped model: nothing to offer
        assert widget.train_model_btn.native.isHidden() == default_checkpoint().is_file()


def test_widget_opens_from_the_plugin_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-nucsynth", "monuseg")
    _, dock = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Segment")
    widget = dock._magic_widget
    assert isinstance(widget, SegmentWidget)
    assert widget.image_combo.value is viewer.layers["H&E (MoNuSeg crop)"]
    assert list(widget.method.choices) == segmenters()


@pytest.mark.skipif("watershed" not in segmenters(), reason="the watershed segmenter is not registered")
def test_watershed_through_the_widget(make_napari_viewer, qtbot):
    from napari_nucsynth._sample_data import monuseg_crop
    from napari_nucsynth.segment import segment

    (img, _, _), _, _ = monuseg_crop()
    crop = img[:128, :128].copy()
    viewer = make_napari_viewer()
    viewer.add_image(crop, name="H&E", rgb=True)
    widget = SegmentWidget(viewer)
    widget.method.value = "watershed"
    assert set(widget._param_widgets) == set(widget._segmenter().params)
    widget.run()
    _wait_idle(widget, qtbot)
    out = viewer.layers["segmentation: H&E (watershed)"]
    assert out.data.dtype == np.uint32 and out.data.shape == (128, 128)
    assert np.array_equal(out.data, segment(crop, method="watershed"))
    assert _n(out.data) > 5, widget.status.value
    # a classical method follows its parameters by itself
    before = out.data.copy()
    widget._param_widgets["min_area"].value = 200
    qtbot.waitUntil(lambda: not np.array_equal(out.data, before), timeout=TIMEOUT)
    _wait_idle(widget, qtbot)
    assert np.array_equal(out.data, segment(crop, method="watershed", **widget.params()))


class _Broken(_FakeNoModel):
    """A segmenter that fails: with bad input (ValueError) or with a bug (anything else)."""

    name = "broken (test)"
    error = ValueError("the tile is too pale")

    def predict_maps(self, image, **kw):
        raise self.error


def test_opens_on_the_best_method_that_has_a_model(make_napari_viewer, tmp_path, monkeypatch):
    """Issue 20: not watershed (AJI 0.43 on the sample) when the trained hovernet (0.61) ships."""
    from napari_nucsynth.segment.hovernet import HoVerNetSegmenter

    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path))  # nothing saved
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    if default_checkpoint().is_file():
        assert widget.method.value == "hovernet"
        assert widget.checkpoint.value is None and widget.status.value == ""  # the shipped model, nothing to say
    monkeypatch.setattr(HoVerNetSegmenter, "default_checkpoint", tmp_path / "missing.pt")  # a clone without it
    widget = SegmentWidget(viewer)
    seg = widget._segmenter()
    assert widget.method.value != "hovernet"
    assert not seg.needs_checkpoint or widget._ckpt.has_model(widget.method.value)  # one that can run


def _run_broken(widget, qtbot, monkeypatch) -> None:
    monkeypatch.setitem(_REGISTRY, _Broken.name, _Broken)
    widget.method.reset_choices()
    widget.method.value = _Broken.name
    widget.run()
    _wait_idle(widget, qtbot)


def test_switching_method_clears_the_old_message(setup, qtbot, popups, monkeypatch):
    viewer, _, widget = setup
    _run_broken(widget, qtbot, monkeypatch)
    assert widget.status.value == "Cannot segment: the tile is too pale"
    widget.method.value = FAKE_B  # a method that can run: nothing to say about it
    assert widget.status.value == "" and popups == []


def test_a_bug_in_a_segmenter_is_the_status_line_only(setup, qtbot, popups, monkeypatch):
    """Issue 20: an error shows once, in the status line; no napari traceback pop-up on top of it."""
    viewer, _, widget = setup
    monkeypatch.setattr(_Broken, "error", RuntimeError("index 3 is out of bounds"))
    _run_broken(widget, qtbot, monkeypatch)
    assert widget.status.value == "Segmentation failed: RuntimeError: index 3 is out of bounds"
    assert popups == [] and not _outputs(viewer) and widget.segment_btn.text == "Segment"


def test_a_model_that_finds_nothing_says_why_it_may(setup, qtbot):
    viewer, _, widget = setup
    widget._param_widgets["threshold"].value = 1.0  # nothing is that dark: the "model" finds no nucleus
    _wait_idle(widget, qtbot)
    widget.run()
    _wait_idle(widget, qtbot)
    assert "0 nuclei" in widget.status.value and "found no nucleus" in widget.status.value
    assert "undertrained" in widget.status.value and "model" in widget.status.value
    widget.method.value = FAKE_B  # a method without a model: 0 nuclei is a plain result
    widget._param_widgets["threshold"].value = 1.0
    _wait_idle(widget, qtbot)
    widget.run()
    _wait_idle(widget, qtbot)
    assert "0 nuclei" in widget.status.value and "found no nucleus" not in widget.status.value


def test_a_file_that_is_not_a_checkpoint_is_refused_aloud(setup, tmp_path):
    _, _, widget = setup
    png = tmp_path / "tile.png"
    png.write_bytes(b"png")
    widget.browse.value = png
    assert "tile.png is not a checkpoint" in widget.status.value and ".pt" in widget.status.value
    assert png not in widget.checkpoint.choices and widget.checkpoint.value is None
    widget.browse.value = tmp_path / "gone.pt"
    assert "does not exist" in widget.status.value


def test_methods_without_a_model_are_labelled_in_the_list(make_napari_viewer, monkeypatch, tmp_path):
    """Issue 20, item 10: a newcomer sees which methods run out of the box before choosing one."""
    from napari_nucsynth.segment import get_segmenter

    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path))  # no saved models
    if getattr(get_segmenter("maskrcnn"), "default_checkpoint", None) is not None and \
            get_segmenter("maskrcnn").default_checkpoint.is_file():
        pytest.skip("a maskrcnn model ships: nothing to label")
    viewer = make_napari_viewer()
    w = SegmentWidget(viewer)
    labels = {w.method.choices[i]: w.method.native.itemText(i) for i in range(len(w.method.choices))}
    assert labels["maskrcnn"].startswith("maskrcnn (no model yet")
    assert labels["watershed"] == "watershed" and labels["hovernet"] == "hovernet"  # the shipped model runs
    w.method.value = "maskrcnn"  # still choosable: the status says how to train one
    assert w.method.value == "maskrcnn" and "Train a model" in w.status.value
