"""Qt tests of the Evaluate widget."""

from __future__ import annotations

import numpy as np

from napari_nucsynth._widgets.evaluate import EvaluateWidget
from napari_nucsynth.metrics import instance_metrics


def _pair():
    truth = np.zeros((60, 60), np.uint32)
    truth[5:15, 5:15] = 1  # found
    truth[20:30, 20:30] = 2  # missed
    pred = np.zeros_like(truth)
    pred[5:15, 6:15] = 7  # IoU 0.9 with nucleus 1
    pred[40:50, 40:50] = 9  # spurious
    return truth, pred


def test_table_and_error_overlay(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    truth, pred = _pair()
    t_layer = viewer.add_labels(truth, name="truth")
    p_layer = viewer.add_labels(pred, name="pred")
    widget = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.truth.value = t_layer
    widget.pred.value = p_layer
    widget.run()
    qtbot.waitUntil(lambda: widget.result is not None, timeout=20000)
    expected = instance_metrics(truth, pred)
    assert widget.result == expected
    assert abs(expected["dq"] - 1 / (1 + 0.5 + 0.5)) < 1e-12
    table = widget.table.value
    assert len(table["data"]) == 9 and float(table["data"][6][1]) == round(expected["pq"], 4)
    errors = viewer.layers["errors: pred"].data
    assert errors[10, 10] == 1 and errors[25, 25] == 3 and errors[45, 45] == 2 and errors[0, 0] == 0
    # running again updates the same overlay layer
    widget.run()
    qtbot.waitUntil(lambda: widget.run_btn.enabled, timeout=20000)
    assert sum(layer.name.startswith("errors") for layer in viewer.layers) == 1
    # the overlay holds classes, not nuclei: it is never offered as a ground truth or a prediction
    overlay = viewer.layers["errors: pred"]
    assert overlay.metadata == {"nucsynth_errors_of": "pred"}
    assert overlay not in widget.truth.choices and overlay not in widget.pred.choices


def test_failures_are_the_status_line_only(make_napari_viewer, qtbot, popups, monkeypatch):
    """Issue 20: an error shows once, in the status line, not also as napari's traceback pop-up."""
    import napari_nucsynth._widgets.evaluate as evaluate

    viewer = make_napari_viewer()
    truth, pred = _pair()
    viewer.add_labels(truth, name="truth")
    viewer.add_labels(pred, name="pred")
    widget = EvaluateWidget(viewer)
    for error, status in ((ValueError("labels must be integers"), "Cannot evaluate: labels must be integers"),
                          (MemoryError("4 GB"), "Evaluation failed: MemoryError: 4 GB")):

        def broken(*a, error=error):
            raise error

        monkeypatch.setattr(evaluate, "instance_metrics", broken)
        widget.run()
        qtbot.waitUntil(lambda: widget.run_btn.enabled, timeout=20000)
        assert widget.status.value == status and widget.result is None
    assert popups == []


def test_shape_mismatch_is_a_message(make_napari_viewer):
    viewer = make_napari_viewer()
    a = viewer.add_labels(np.zeros((10, 10), np.uint32), name="a")
    b = viewer.add_labels(np.zeros((12, 10), np.uint32), name="b")
    widget = EvaluateWidget(viewer)
    widget.truth.value, widget.pred.value = a, b
    widget.run()
    assert "differ in shape" in widget.status.value and widget.result is None
