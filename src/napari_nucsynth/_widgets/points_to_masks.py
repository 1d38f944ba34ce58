"""The Points -> Masks widget: clicked centroids become nucleus instance masks as they are clicked.

Thin by design: the computation is :class:`napari_nucsynth.masks.MaskSampler`; this module only follows the
Points layer's events, writes the changed pixels into the Labels layer (one undo step per user action) and
fits a shape prior off the UI thread.
"""

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton, SpinBox

from ..masks import MaskSampler, Patch, ShapePrior

_DEFAULT_PRIOR = "default (MoNuSeg)"


class PointsToMasksWidget(Container):
    """Choose a Points layer; every point added, moved or deleted updates the output Labels layer."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self._points_layer = None
        self._labels_layer = None
        self._sampler: "MaskSampler | None" = None
        self._prior: "ShapePrior | None" = None
        self._fit_worker = None

        self.points_combo = ComboBox(label="Points", choices=self._points_choices, nullable=True)
        self.prior_combo = ComboBox(label="Shape prior", choices=self._prior_choices)
        self.seed = SpinBox(label="Seed", value=0, min=0, max=2**31 - 1)
        self.follow = CheckBox(text="Follow point edits", value=True)
        self.resample_btn = PushButton(text="Resample all")
        self.status = Label(value="")
        self.extend([self.points_combo, self.prior_combo, self.seed, self.follow, self.resample_btn, self.status])

        self.points_combo.changed.connect(self._on_points_layer)
        self.prior_combo.changed.connect(self._on_prior)
        self.seed.changed.connect(lambda _=None: self.resample_all())
        self.resample_btn.changed.connect(lambda _=None: self.resample_all())
        viewer.layers.events.inserted.connect(self._refresh_choices)
        viewer.layers.events.removed.connect(self._refresh_choices)
        self._refresh_choices()

    # ---- layer choices -----------------------------------------------------------------------------------------
    def _points_choices(self, _=None):
        from napari.layers import Points

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Points)]

    def _prior_choices(self, _=None):
        from napari.layers import Labels

        labels = [
            (f"fit to {layer.name}", layer)
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and layer is not self._labels_layer
        ]
        return [(_DEFAULT_PRIOR, None), *labels]

    def _refresh_choices(self, _=None):
        self.points_combo.reset_choices()
        self.prior_combo.reset_choices()
        if self.points_combo.value is None and self.points_combo.choices:
            self.points_combo.value = self.points_combo.choices[-1]

    # ---- wiring ------------------------------------------------------------------------------------------------
    def _on_points_layer(self, layer=None):
        if self._points_layer is not None:
            try:
                self._points_layer.events.data.disconnect(self._on_points_data)
            except (TypeError, ValueError):
                pass
        self._points_layer = layer
        self._labels_layer = None
        if layer is None:
            self.status.value = "Add a Points layer and click nuclei centroids."
            return
        if layer.ndim != 2:
            self.status.value = f"{layer.name} has {layer.ndim} dimensions; only 2-D points are supported."
            self._points_layer = None
            return
        layer.events.data.connect(self._on_points_data)
        self.resample_all()

    def _on_prior(self, layer=None):
        if layer is None:
            self._prior = None
            self.resample_all()
            return
        from napari.qt.threading import create_worker

        labels = np.asarray(layer.data)
        self.status.value = f"Fitting the shape prior to {layer.name}..."
        worker = create_worker(ShapePrior.fit, labels, seed=0)
        # a fit that finishes after the user has chosen another prior is dropped
        worker.returned.connect(lambda prior: self.prior_combo.value is layer and self._prior_fitted(prior))
        worker.errored.connect(lambda e: setattr(self.status, "value", f"Cannot fit the prior: {e}"))
        self._fit_worker = worker
        worker.start()

    def _prior_fitted(self, prior: ShapePrior):
        self._prior = prior
        self._fit_worker = None
        self.resample_all()

    # ---- output ------------------------------------------------------------------------------------------------
    def _output_shape(self) -> "tuple[int, int]":
        from napari.layers import Image, Labels

        for layer in self.viewer.layers:
            if isinstance(layer, (Image, Labels)) and layer is not self._labels_layer:
                shp = layer.data.shape[:2] if getattr(layer, "rgb", False) else layer.data.shape[-2:]
                return int(shp[0]), int(shp[1])
        pts = np.asarray(self._points_layer.data) if self._points_layer is not None else np.zeros((0, 2))
        extent = pts.max(0) if len(pts) else np.array([0.0, 0.0])
        return tuple(int(np.ceil((e + 64) / 256.0) * 256) for e in extent)

    def _classes(self) -> "np.ndarray | None":
        feats = self._points_layer.features
        if "class" in feats and len(feats) == len(self._points_layer.data):
            cls = np.asarray(feats["class"])
            if np.issubdtype(cls.dtype, np.number) and np.all(np.isfinite(cls)):
                return cls.astype(np.int64)
        return None

    def _ensure_labels_layer(self, shape):
        from napari.layers import Labels

        layer = self._labels_layer
        if layer is None or layer not in self.viewer.layers or layer.data.shape != tuple(shape):
            name = f"{self._points_layer.name} masks"
            existing = [lyr for lyr in self.viewer.layers if isinstance(lyr, Labels) and lyr.name == name]
            if existing and existing[0].data.shape == tuple(shape) and existing[0].data.dtype == np.uint32:
                layer = existing[0]
            else:
                layer = self.viewer.add_labels(np.zeros(shape, dtype=np.uint32), name=name, opacity=0.5)
                # keep the Points layer on top so the user can go on clicking
                self.viewer.layers.selection.active = self._points_layer
            self._labels_layer = layer
            self.prior_combo.reset_choices()
        return layer

    def _write(self, new: np.ndarray, rows: slice = slice(None), cols: slice = slice(None)) -> None:
        """Write ``new`` into the labels layer's ``[rows, cols]`` as one undoable action."""
        layer = self._labels_layer
        old = layer.data[rows, cols]
        changed = np.nonzero(old != new)
        if changed[0].size == 0:
            return
        r0 = rows.start or 0
        c0 = cols.start or 0
        with layer.block_history():
            layer.data_setitem((changed[0] + r0, changed[1] + c0), new[changed])

    def resample_all(self) -> None:
        """Resample every nucleus from the current points, seed and prior."""
        if self._points_layer is None:
            return
        shape = self._output_shape()
        self._ensure_labels_layer(shape)
        pts = np.asarray(self._points_layer.data, dtype=float).reshape(-1, 2)
        self._sampler = MaskSampler(shape, prior=self._prior, seed=int(self.seed.value))
        try:
            labels = self._sampler.reset(pts, self._classes())
        except ValueError as e:
            self.status.value = str(e)
            return
        self._write(labels)
        self.status.value = f"{len(pts)} nuclei ({'default' if self._prior is None else 'fitted'} prior)."

    def _apply(self, patch: "Patch | None") -> None:
        if patch is not None:
            self._write(patch.values, patch.rows, patch.cols)

    def _on_points_data(self, event) -> None:
        from napari.layers.base._base_constants import ActionType

        action = getattr(event, "action", None)
        if not self.follow.value or action not in (ActionType.ADDED, ActionType.REMOVED, ActionType.CHANGED):
            return
        s = self._sampler
        if s is None or self._labels_layer is None or self._labels_layer not in self.viewer.layers:
            self.resample_all()
            return
        data = np.asarray(self._points_layer.data, dtype=float).reshape(-1, 2)
        n_old, n_new = len(s.points), len(data)
        idx = np.asarray(getattr(event, "data_indices", ()), dtype=np.int64)
        classes = self._classes()
        try:
            if action == ActionType.ADDED and n_new > n_old and np.array_equal(data[:n_old], s.points):
                self._apply(s.add_points(data[n_old:], None if classes is None else classes[n_old:]))
            elif action == ActionType.REMOVED and n_new < n_old and idx.size == n_old - n_new:
                self._write(s.remove_points(idx).copy())
            elif action == ActionType.CHANGED and n_new == n_old:
                moved = np.flatnonzero(np.any(data != s.points, axis=1))
                if classes is not None:
                    moved = np.union1d(moved, np.flatnonzero(classes != s.classes))
                if moved.size:
                    self._apply(s.set_points(moved, data[moved], None if classes is None else classes[moved]))
            else:  # anything else (the data replaced wholesale): start again
                self.resample_all()
                return
        except ValueError as e:
            self.status.value = str(e)
            return
        self.status.value = f"{len(s.points)} nuclei."
