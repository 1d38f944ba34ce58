"""Time the Points -> Masks widget's incremental update inside a real napari viewer; prints one JSON object.

    xvfb-run -a .venv/bin/python benchmarks/bench_widget.py

1,000 nuclei on a 1000 x 1000 image; each edit moves one point (as a drag ends), adds one, or deletes one.
`handler_ms` is the widget's event handler (resample the nucleus, write the changed pixels into the Labels layer
with undo history); `edit_ms` is the whole edit as napari runs it (the Points layer's own update included).
Target: an incremental update in at most 30 ms.
"""

from __future__ import annotations

import json
import time

import numpy as np


def main(n=1000, edits=100, seed=0) -> dict:
    import torch  # noqa: F401  (GUIDE: import torch before any viewer exists)
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_nucsynth._widgets.points_to_masks import PointsToMasksWidget

    rng = np.random.default_rng(seed)
    viewer = napari.Viewer(show=False)
    viewer.add_image(np.full((1000, 1000, 3), 220, np.uint8), rgb=True, name="tile")
    pts = rng.uniform(0, 1000, (n, 2))
    layer = viewer.add_points(pts, name="clicks")
    widget = PointsToMasksWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.points_combo.value = layer
    QApplication.processEvents()

    handler_times: list[float] = []
    inner = widget._on_points_data

    def timed(event):
        t0 = time.perf_counter()
        inner(event)
        handler_times.append(time.perf_counter() - t0)

    layer.events.data.disconnect(inner)
    layer.events.data.connect(timed)

    def run(kind):
        handler_times.clear()
        whole = []
        for _ in range(edits):
            t0 = time.perf_counter()
            if kind == "move":
                data = layer.data.copy()
                i = int(rng.integers(len(data)))
                data[i] += rng.normal(0, 5, 2)
                layer.data = data
            elif kind == "add":
                layer.add(rng.uniform(0, 1000, (1, 2)))
            else:
                layer.selected_data = {int(rng.integers(len(layer.data)))}
                layer.remove_selected()
            whole.append(time.perf_counter() - t0)
            QApplication.processEvents()
        return {
            "handler_ms_median": 1e3 * float(np.median(handler_times)),
            "handler_ms_p95": 1e3 * float(np.percentile(handler_times, 95)),
            "edit_ms_median": 1e3 * float(np.median(whole)),
        }

    out = {"benchmark": "widget", "nuclei": n, "shape": [1000, 1000], "target_ms": 30}
    for kind in ("move", "add", "remove"):
        out[kind] = run(kind)
    lab = viewer.layers["clicks masks"].data
    out["consistent"] = bool(np.array_equal(lab, widget._sampler.labels))
    viewer.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
