"""Qt tests of the Points -> Masks widget and the sample data, in a real viewer under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nucsynth._widgets._dock import ScrollDock
from napari_nucsynth._widgets.points_to_masks import PointsToMasksWidget
from napari_nucsynth.masks import rasterize


@pytest.fixture
def viewer_with_points(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.full((256, 256, 3), 230, np.uint8), name="tile", rgb=True)
    points = viewer.add_points(np.array([[60.0, 60.0], [120.0, 150.0]]), name="clicks")
    widget = PointsToMasksWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Points to masks")
    widget.points_combo.value = points
    return viewer, points, widget


def _masks(viewer):
    return viewer.layers["clicks masks"]


def test_labels_follow_point_edits(viewer_with_points):
    viewer, points, widget = viewer_with_points
    labels = _masks(viewer)
    assert labels.data.shape == (256, 256) and labels.data.dtype == np.uint32
    assert set(np.unique(labels.data)) == {0, 1, 2}

    # add a point: a third nucleus appears, the others stay as they were
    before = labels.data.copy()
    points.add([[200.0, 40.0]])
    assert labels.data[200, 40] == 3
    assert np.array_equal(labels.data == 1, before == 1)

    # move the first point: nucleus 1 moves, nucleus 3 is untouched
    third = labels.data == 3
    points.data = np.array([[90.0, 200.0], [120.0, 150.0], [200.0, 40.0]])
    assert labels.data[90, 200] == 1 and labels.data[60, 60] == 0
    assert np.array_equal(labels.data == 3, third)

    # delete the second point: ids above it shift down (id = point index + 1)
    points.selected_data = {1}
    points.remove_selected()
    assert set(np.unique(labels.data)) == {0, 1, 2}
    assert labels.data[200, 40] == 2
    assert np.array_equal(labels.data, rasterize(widget._sampler.shapes, (256, 256)))


def test_each_edit_is_one_undo_step(viewer_with_points):
    viewer, points, _ = viewer_with_points
    labels = _masks(viewer)
    before = labels.data.copy()
    points.add([[200.0, 200.0]])
    assert labels.data[200, 200] == 3
    labels.undo()
    assert np.array_equal(labels.data, before)


def _agree(points, labels, widget) -> int:
    """The points, the masks, the sampler and the status tell the same story; returns the number of nuclei."""
    n = len(points.data)
    assert set(np.unique(labels.data)) == set(range(n + 1)), "one mask per point, ids 1..N"
    assert np.array_equal(widget._sampler.points, np.asarray(points.data))
    assert np.array_equal(labels.data, rasterize(widget._sampler.shapes, labels.data.shape))
    assert f"{n} nuclei" in widget.status.value, widget.status.value
    return n


def test_undo_on_the_masks_takes_the_click_back(make_napari_viewer, recwarn):
    """Issue 20's scenario through the Plugins menu (the widget sees napari's proxied viewer): a click, then Ctrl+Z
    on the masks layer; the point goes with its mask, the status follows, and redo brings both back."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-nucsynth", "monuseg")
    _, dock = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Points to masks")
    widget = dock._magic_widget
    points, labels = viewer.layers["centroids"], viewer.layers["centroids masks"]
    points.features = {"class": np.arange(len(points.data)) % 3}
    n0 = len(points.data)
    points.add([[200.0, 210.0]])
    assert len(points.data) == n0 + 1 and labels.data[200, 210] == n0 + 1
    assert _agree(points, labels, widget) == n0 + 1
    labels.undo()
    assert _agree(points, labels, widget) == n0
    assert "Undone" in widget.status.value
    assert list(points.features["class"]) == list(np.arange(n0) % 3)
    labels.redo()
    assert _agree(points, labels, widget) == n0 + 1
    assert "Redone" in widget.status.value and np.allclose(points.data[-1], [200.0, 210.0])
    private = [str(w.message) for w in recwarn if "Private attribute" in str(w.message)]
    assert not private, private  # napari's proxied viewer: public API only


def test_undo_and_redo_of_moves_deletions_and_resamples(viewer_with_points):
    viewer, points, widget = viewer_with_points
    labels = _masks(viewer)
    history = [(np.array(points.data), labels.data.copy())]

    def edit(fn):
        fn()
        history.append((np.array(points.data), labels.data.copy()))

    edit(lambda: points.add([[200.0, 40.0]]))
    edit(lambda: setattr(points, "data", np.array([[90.0, 200.0], [120.0, 150.0], [200.0, 40.0]])))  # a move

    def delete_second():
        points.selected_data = {1}
        points.remove_selected()

    edit(delete_second)
    edit(lambda: setattr(widget.seed, "value", 7))  # Resample all: one step too
    edit(lambda: points.add([[30.0, 220.0]]))
    for pts, masks in reversed(history[:-1]):  # undo everything, one step at a time
        labels.undo()
        assert np.array_equal(points.data, pts) and np.array_equal(labels.data, masks)
        _agree(points, labels, widget)
    for pts, masks in history[1:]:  # and redo it
        labels.redo()
        assert np.array_equal(points.data, pts) and np.array_equal(labels.data, masks)
        _agree(points, labels, widget)
    points.add([[60.0, 230.0]])  # the incremental path goes on from there
    assert labels.data[60, 230] == len(points.data)
    _agree(points, labels, widget)


def test_edits_by_hand_keep_their_own_undo(viewer_with_points):
    viewer, points, widget = viewer_with_points
    labels = _masks(viewer)
    points.add([[200.0, 40.0]])
    labels.selected_label = 9
    labels.paint((20, 230), 9)  # a brush stroke by hand
    assert labels.data[20, 230] == 9
    labels.undo()  # undoes the stroke only
    assert labels.data[20, 230] == 0 and len(points.data) == 3
    labels.undo()  # then the click
    assert len(points.data) == 2
    _agree(points, labels, widget)
    labels.paint((20, 230), 9)  # a new stroke ends the redo history, in napari and in the widget
    labels.redo()
    assert len(points.data) == 2 and labels.data[20, 230] == 9


def test_ctrl_z_on_the_points_layer_undoes_on_the_masks(viewer_with_points, qtbot):
    from qtpy.QtCore import Qt

    viewer, points, widget = viewer_with_points
    labels = _masks(viewer)
    points.add([[200.0, 40.0]])
    viewer.layers.selection.active = points
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    assert len(points.data) == 2 and labels.data[200, 40] == 0
    qtbot.keyClick(canvas, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert len(points.data) == 3 and labels.data[200, 40] == 3
    _agree(points, labels, widget)


def test_an_undo_while_the_masks_are_hidden(viewer_with_points):
    viewer, points, widget = viewer_with_points
    labels = _masks(viewer)
    points.add([[200.0, 40.0]])
    labels.visible = False
    labels.undo()  # napari sends no event for a hidden layer
    points.add([[40.0, 200.0]])  # the next click: the masks follow the points as they are
    assert len(points.data) == 4
    _agree(points, labels, widget)
    labels.visible = True
    _agree(points, labels, widget)


def test_resample_all_uses_the_seed(viewer_with_points):
    viewer, _, widget = viewer_with_points
    labels = _masks(viewer)
    first = labels.data.copy()
    widget.seed.value = 5
    assert not np.array_equal(labels.data, first)
    widget.seed.value = 0
    assert np.array_equal(labels.data, first)


def test_classes_from_features_and_prior_from_labels(viewer_with_points, qtbot):
    viewer, points, widget = viewer_with_points
    rng = np.random.default_rng(0)
    ref = np.zeros((256, 256), np.uint32)
    for i, (r, c) in enumerate(rng.uniform(20, 236, (40, 2)).astype(int)):
        ref[max(r - 2, 0) : r + 3, max(c - 2, 0) : c + 3] = i + 1  # small square nuclei
    ref_layer = viewer.add_labels(ref, name="reference")
    widget.prior_combo.value = ref_layer
    qtbot.waitUntil(lambda: widget._prior is not None, timeout=20000)
    labels = _masks(viewer)
    areas = np.bincount(labels.data.ravel())[1:]
    assert np.all(areas[areas > 0] < 80)  # a prior of ~25-pixel nuclei gives small nuclei


def test_screenshot_is_not_blank(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-nucsynth", "monuseg")
    widget = PointsToMasksWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Points to masks")
    widget.points_combo.value = viewer.layers["centroids"]
    assert "centroids masks" in viewer.layers
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.ndim == 3 and shot.shape[0] > 200 and shot.shape[1] > 200
    rgb = shot[..., :3].astype(float)
    assert rgb.std() > 20  # an image, not a blank window
    assert len(np.unique(rgb.reshape(-1, 3)[::97], axis=0)) > 200  # many colours: the H&E crop is drawn


def test_widget_opens_through_the_plugin_menu(make_napari_viewer):
    """The path a user takes (Plugins menu): npe2 builds the widget and hands it the viewer."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-nucsynth", "monuseg")
    _, dock = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Points to masks")
    assert isinstance(dock, ScrollDock)  # docked in a scroll area (see test_docks_fit_the_screen)
    widget = dock._magic_widget
    assert isinstance(widget, PointsToMasksWidget)
    assert viewer.window.dock_widgets["Points to masks (napari-nucsynth)"] is widget
    assert widget.points_combo.value is viewer.layers["centroids"]
    masks = viewer.layers["centroids masks"].data
    assert masks.shape == (400, 400) and masks.max() == len(viewer.layers["centroids"].data)


def test_a_failed_prior_fit_is_the_status_line_only(viewer_with_points, qtbot, popups):
    """Issue 20: fitting the prior to an empty Labels layer showed the message and napari's traceback pop-up."""
    viewer, _, widget = viewer_with_points
    empty = viewer.add_labels(np.zeros((256, 256), np.uint32), name="empty")
    widget.prior_combo.value = empty
    qtbot.waitUntil(lambda: widget._fit_worker is not None and not widget._fit_worker.is_running, timeout=20000)
    qtbot.waitUntil(lambda: widget.status.value.startswith("Cannot fit the prior:"), timeout=20000)
    assert "at least 3" in widget.status.value and popups == []


SCRIPT = """
import time
import numpy as np
import napari
from qtpy.QtWidgets import QApplication
from napari_nucsynth._widgets.points_to_masks import PointsToMasksWidget

viewer = napari.Viewer(show=False)
viewer.add_image(np.full((64, 64, 3), 200, np.uint8), rgb=True)
viewer.add_points(np.array([[10.0, 10.0]]), name="clicks")
empty = viewer.add_labels(np.zeros((64, 64), np.uint32), name="empty")
widget = PointsToMasksWidget(viewer)
widget.points_combo.value = viewer.layers["clicks"]
widget.prior_combo.value = empty
t0 = time.time()
while time.time() - t0 < 30 and not widget.status.value.startswith("Cannot"):
    QApplication.processEvents()
    time.sleep(0.01)
print("STATUS:", widget.status.value)
viewer.close()
"""


def test_a_script_driving_the_viewer_survives_a_failed_fit(tmp_path):
    """Issue 20: in a script that drives the viewer with processEvents, the same error aborted the process
    (SIGABRT: the worker's error was raised again inside a Qt slot)."""
    import subprocess
    import sys

    script = tmp_path / "drive.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "STATUS: Cannot fit the prior" in out.stdout


def test_long_status_lines_wrap(viewer_with_points):
    _, _, widget = viewer_with_points
    width = widget.native.sizeHint().width()
    widget.status.value = "Cannot fit the prior: " + "a long message " * 60
    assert widget.status.native.wordWrap() and widget.native.sizeHint().width() <= max(width, 400)


# ---- Masks from: image (issue 18) --------------------------------------------------------------------------------


@pytest.fixture
def crop_viewer(make_napari_viewer):
    """The package's sample crop (image, centroids of its true nuclei) and the widget on them."""
    from importlib.resources import files

    import imageio.v3 as iio

    from napari_nucsynth.points import centroids

    data = files("napari_nucsynth") / "data"
    truth = iio.imread(data / "monuseg_crop_labels.png")
    viewer = make_napari_viewer()
    image = viewer.add_image(iio.imread(data / "monuseg_crop_image.png"), name="crop", rgb=True)
    points = viewer.add_points(centroids(truth)[:40], name="clicks")
    widget = PointsToMasksWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Points to masks")
    widget.points_combo.value = points
    widget.method.value = "watershed"
    return viewer, image, points, widget, truth


def _fitted(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: not widget.running and widget._sampler is not None, timeout=60_000)


def _agree_fit(points, labels, widget) -> None:
    """Image mode: the points, the masks and the fitter tell the same story (the fitter's labels are fit_masks')."""
    from napari_nucsynth.annotate import MaskFitter, fit_masks

    fitter = widget._sampler
    assert isinstance(fitter, MaskFitter)
    assert np.array_equal(fitter.points, np.asarray(points.data))
    assert np.array_equal(labels.data, fitter.labels)
    expected = fit_masks(widget.image_combo.value.data, points.data, method="watershed", seed=int(widget.seed.value))
    assert np.array_equal(labels.data, expected)
    assert widget.status.value.endswith(fitter.summary()), widget.status.value


def test_image_mode_fits_the_existing_points(crop_viewer, qtbot):
    viewer, image, points, widget, truth = crop_viewer
    assert widget.image_combo.value is image  # preselected
    assert widget.method.native.isHidden()  # (the viewer is not shown: isHidden, not visible)
    widget.source.value = "image"
    assert not widget.method.native.isHidden()
    from napari_nucsynth.annotate import fit_methods, get_fit_method

    runnable = [m for m in fit_methods() if get_fit_method(m).available()]
    assert list(widget.method.choices) == ["auto", *runnable] and "watershed" in runnable  # no model, not offered
    _fitted(qtbot, widget)
    labels = viewer.layers["clicks masks"]
    _agree_fit(points, labels, widget)
    assert "(watershed)" in widget.status.value
    # each click's mask lies on the real nucleus under it
    r, c = np.round(points.data).astype(int).T
    assert (labels.data[r, c] == np.arange(1, len(r) + 1)).mean() >= 0.9
    # back to the prior: sampled masks again
    widget.source.value = "shape prior"
    assert "nuclei" in widget.status.value and widget._sampler is not None
    assert np.array_equal(labels.data, rasterize(widget._sampler.shapes, labels.data.shape))


def test_a_click_adds_its_nucleus_from_the_image_and_undo_keeps_both_in_step(crop_viewer, qtbot):
    from napari_nucsynth.points import centroids

    viewer, _, points, widget, truth = crop_viewer
    widget.source.value = "image"
    _fitted(qtbot, widget)
    labels = viewer.layers["clicks masks"]
    history = [(np.array(points.data), labels.data.copy())]
    target = centroids(truth)[60]  # a nucleus nobody clicked yet
    tid = truth[int(round(target[0])), int(round(target[1]))]
    points.add([target])
    n = len(points.data)
    new = labels.data == n
    assert new[truth == tid].mean() >= 0.75  # its mask covers the nucleus under the click
    _agree_fit(points, labels, widget)
    history.append((np.array(points.data), labels.data.copy()))
    points.data = np.array([*points.data[:-1], target + [0.0, 1.5]])  # a move
    _agree_fit(points, labels, widget)
    history.append((np.array(points.data), labels.data.copy()))
    points.selected_data = {0}
    points.remove_selected()  # a deletion: ids shift down
    _agree_fit(points, labels, widget)
    for pts, masks in reversed(history):
        labels.undo()
        assert np.array_equal(points.data, pts) and np.array_equal(labels.data, masks)
        _agree_fit(points, labels, widget)
        assert "Undone" in widget.status.value
    labels.redo()
    assert np.array_equal(points.data, history[1][0]) and np.array_equal(labels.data, history[1][1])
    _agree_fit(points, labels, widget)


def test_cancel_stops_the_image_pass(crop_viewer, qtbot, monkeypatch):
    import time

    from napari_nucsynth.annotate import MaskFitter

    viewer, _, points, widget, _ = crop_viewer
    before = viewer.layers["clicks masks"].data.copy()
    started = []
    real = MaskFitter.__init__

    def slow(self, *a, should_stop=None, **k):  # a pass that runs until the user cancels (10 s at most)
        started.append(True)
        t0 = time.perf_counter()
        while not should_stop() and time.perf_counter() - t0 < 10:
            time.sleep(0.01)
        real(self, *a, should_stop=should_stop, **k)

    monkeypatch.setattr(MaskFitter, "__init__", slow)
    widget.source.value = "image"
    assert widget.running and widget.run_button.text == "Cancel"
    qtbot.waitUntil(lambda: bool(started), timeout=5_000)
    widget.run_button.clicked()  # the run button is Cancel while the pass runs
    qtbot.waitUntil(lambda: not widget.running, timeout=15_000)
    monkeypatch.setattr(MaskFitter, "__init__", real)
    assert widget.status.value == "Cancelled." and widget.run_button.text == "Fit to image"
    assert np.array_equal(viewer.layers["clicks masks"].data, before)  # nothing written
    points.add([[10.0, 10.0]])  # no fitter: the masks wait for Fit to image
    assert widget._sampler is None
    widget.run_button.clicked()
    _fitted(qtbot, widget)
    _agree_fit(points, viewer.layers["clicks masks"], widget)


def test_shape_prior_from_this_image(crop_viewer, qtbot):
    pytest.importorskip("torch")
    _, image, points, widget, _ = crop_viewer
    choice = next(v for v in widget.prior_combo.choices if v is image)
    widget.prior_combo.value = choice
    qtbot.waitUntil(lambda: widget._prior is not None, timeout=120_000)
    assert widget._sampler.prior is widget._prior
    assert "nuclei" in widget.status.value


def test_closing_clears_the_image_cache(crop_viewer, qtbot):
    from napari_nucsynth import annotate

    viewer, _, _, widget, _ = crop_viewer
    widget.source.value = "image"
    _fitted(qtbot, widget)
    assert annotate._CACHE  # the one-time pass, cached
    viewer.window.remove_dock_widget(widget.native)  # the dock's close button
    assert not annotate._CACHE
