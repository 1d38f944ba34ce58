"""``nucsynth napari``: a viewer with the sample data and the Points to masks widget (the CLI's only Qt code, kept
here so that nothing outside ``_widgets/`` and the npe2 glue imports napari or Qt)."""

from __future__ import annotations

import time

import napari
from qtpy.QtWidgets import QApplication


def launch_viewer(*, sample: bool = True, screenshot: str | None = None) -> int:
    """Open napari with the plugin's sample data (unless ``sample`` is False) and the Points to masks widget, and
    run it; with ``screenshot`` (a path), save a screenshot of the settled window there and close instead."""
    viewer = napari.Viewer(title="napari-nucsynth")
    if sample:
        viewer.open_sample("napari-nucsynth", "monuseg")
    viewer.window.add_plugin_dock_widget("napari-nucsynth", "Points to masks")
    if screenshot:
        viewer.window._qt_window.resize(1400, 850)
        for _ in range(3):  # let the window settle, then fit the view to it
            t0 = time.time()
            while time.time() - t0 < 0.5:
                QApplication.processEvents()
            viewer.reset_view()
        viewer.screenshot(screenshot, canvas_only=False, flash=False)
        viewer.close()
        return 0
    napari.run()
    return 0
