"""Qt tests of the Points -> Masks widget and the sample data, in a real viewer under Xvfb."""

from __future__ import annotations

import numpy as np
import pytest

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
    _, widget = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Points to masks")
    assert isinstance(widget, PointsToMasksWidget)
    assert widget.points_combo.value is viewer.layers["centroids"]
    masks = viewer.layers["centroids masks"].data
    assert masks.shape == (400, 400) and masks.max() == len(viewer.layers["centroids"].data)
