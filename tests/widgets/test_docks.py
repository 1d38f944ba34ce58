"""The widgets as napari docks them from the manifest: in scroll areas that share the window's height."""

from __future__ import annotations

import numpy as np
from qtpy.QtWidgets import QApplication

from napari_nucsynth._widgets._dock import ScrollDock

PLUGIN = "napari-nucsynth"


def _settle(qtbot, ms: int = 300):
    qtbot.wait(ms)
    QApplication.processEvents()


def test_docks_fit_the_screen_and_scroll(make_napari_viewer, qtbot):
    """Issue 20: with Train, Segment and Evaluate docked the window grew to 1,627 px on a 1,200-px screen and the
    Segment button and Evaluate were off screen. Now the window fits the (1,000-px Xvfb) screen and every control
    can be scrolled into view."""
    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, "monuseg")
    docks = {name: viewer.window.add_plugin_dock_widget(PLUGIN, name)[1] for name in ("Train", "Segment", "Evaluate")}
    _settle(qtbot)
    window = viewer.window._qt_window
    screen = window.screen().availableGeometry()
    assert window.minimumSizeHint().height() <= screen.height()
    window.resize(window.width(), screen.height() - 50)
    _settle(qtbot)
    assert window.frameGeometry().height() <= screen.height()
    for name, dock in docks.items():
        assert isinstance(dock, ScrollDock), name
        assert viewer.window.dock_widgets[f"{name} ({PLUGIN})"] is dock._magic_widget
    segment, evaluate = docks["Segment"], docks["Evaluate"]
    for dock, last in ((segment, segment._magic_widget.segment_btn), (evaluate, evaluate._magic_widget.status)):
        dock.ensureWidgetVisible(last.native)
        _settle(qtbot, 100)
        assert not last.native.visibleRegion().isEmpty(), "scrolled into view"
    assert docks["Train"].verticalScrollBar().maximum() > 0  # the tallest one scrolls


def test_dropdowns_follow_renames_and_closing_stops_the_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((32, 32, 3), np.uint8), rgb=True, name="tile")
    dock_widget, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    widget = dock._magic_widget
    image.name = "renamed"  # napari calls the dock's reset_choices; the widget's combo follows
    assert widget.image_combo.native.itemText(0) == "renamed"
    widget._cache = ("key", np.zeros(1))
    viewer.window.remove_dock_widget(dock_widget)  # the dock's close button
    assert widget._cache is None  # the widget learnt that it was closed (maps freed, jobs cancelled)


def test_a_dock_widens_when_its_content_needs_it(make_napari_viewer, qtbot):
    """Controls added after docking (a method's parameters, a longer text) widen the dock instead of being clipped
    on the right (the scroll area kept the size it had when docked)."""
    from magicgui.widgets import PushButton

    viewer = make_napari_viewer(show=True)
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Evaluate")
    _settle(qtbot)
    before = dock.viewport().width()
    dock._magic_widget.append(PushButton(text="a control wider than the dock was " * 3))
    _settle(qtbot)
    need = dock.widget().minimumSizeHint().width()
    assert need > before and dock.viewport().width() >= need
