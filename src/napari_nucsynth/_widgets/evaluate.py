"""The Evaluate widget: instance metrics of a prediction against a ground truth, and an error overlay.

Thin: :mod:`napari_nucsynth.metrics` computes everything (off the UI thread); this module shows the table and
adds the overlay layer.
"""

import napari
import numpy as np
from magicgui.widgets import ComboBox, Container, PushButton, Table

from ..metrics import ERROR_CLASSES, METRICS, error_map, instance_metrics
from ._dock import wrapping_label
from ._outputs import ERRORS, output_kind, output_name
from ._worker import error_message, start_worker

#: Overlay colours, as pathologists read error maps: green found, red spurious, yellow missed.
ERROR_COLOURS = {0: "transparent", 1: "#2ca02c", 2: "#d62728", 3: "#ffd700", None: "transparent"}
_LABELS = {
    "aji": "AJI", "aji_plus": "AJI+", "dice": "Dice", "dice2": "Dice 2", "dq": "DQ", "sq": "SQ", "pq": "PQ",
    "object_f1": "object F1", "pixel_f1": "pixel F1",
}


class EvaluateWidget(Container):
    """Pick a ground-truth and a prediction Labels layer; get every instance metric and a TP/FP/FN overlay."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.truth = ComboBox(label="Ground truth", choices=self._labels_choices)
        self.pred = ComboBox(label="Prediction", choices=self._labels_choices)
        self.run_btn = PushButton(text="Evaluate")
        self.table = Table(value={"metric": [], "value": []})
        self.legend = wrapping_label("overlay: green = true positive, red = false positive, yellow = false negative")
        self.status = wrapping_label()
        self.extend([self.truth, self.pred, self.run_btn, self.table, self.legend, self.status])
        self.run_btn.changed.connect(lambda _=None: self.run())
        viewer.layers.events.inserted.connect(self._reset)
        viewer.layers.events.removed.connect(self._reset)
        self._worker = None
        self.result: dict | None = None
        self._reset()

    def _labels_choices(self, _=None):
        from napari.layers import Labels

        return [(lyr.name, lyr) for lyr in self.viewer.layers
                if isinstance(lyr, Labels) and output_kind(lyr) != ERRORS]  # an overlay holds classes, not nuclei

    def _reset(self, _=None):
        self.truth.reset_choices()
        self.pred.reset_choices()
        choices = self.pred.choices
        if len(choices) >= 2 and self.pred.value is self.truth.value:
            self.pred.value = choices[1] if self.truth.value is choices[0] else choices[0]

    def run(self):
        """Compute the metrics and the overlay in a worker; the results arrive in the table and a layer."""
        t, p = self.truth.value, self.pred.value
        if t is None or p is None:
            self.status.value = "Choose a ground-truth and a prediction Labels layer."
            return
        if t.data.shape != p.data.shape:
            self.status.value = f"The layers differ in shape: {t.data.shape} and {p.data.shape}."
            return
        true, pred = np.asarray(t.data), np.asarray(p.data)

        def compute():
            return instance_metrics(true, pred), error_map(true, pred)

        self.status.value = "Evaluating..."
        self.run_btn.enabled = False
        self._worker = start_worker(compute, returned=lambda res: self._show(res, p.name), errored=self._failed,
                                    finished=lambda: setattr(self.run_btn, "enabled", True))

    def _failed(self, exc):
        self.status.value = error_message(exc, "evaluate", "Evaluation")

    def _show(self, res, pred_name: str):
        values, errors = res
        self.result = values
        self.table.value = {"metric": [_LABELS[k] for k in METRICS], "value": [f"{values[k]:.4f}" for k in METRICS]}
        name = output_name(ERRORS, pred_name)
        if name in self.viewer.layers:
            self.viewer.layers[name].data = errors
        else:
            from napari.utils.colormaps import DirectLabelColormap

            self.viewer.add_labels(errors, name=name, opacity=0.6, metadata={ERRORS: pred_name},
                                   colormap=DirectLabelColormap(color_dict=ERROR_COLOURS))
        counts = np.bincount(errors.ravel(), minlength=4)
        self.status.value = "Pixels: " + ", ".join(f"{ERROR_CLASSES[i]} {counts[i]}" for i in (1, 2, 3))
