"""The Points -> Masks widget: clicked centroids become nucleus instance masks as they are clicked.

Thin by design: the computation is :class:`napari_nucsynth.masks.MaskSampler` (*Masks from: shape prior*) or
:class:`napari_nucsynth.annotate.MaskFitter` (*Masks from: image*: the mask of the nucleus under each click, after
a one-time pass over the image in a worker, with progress and Cancel); this module only follows the Points layer's
events, writes the changed pixels into the Labels layer (one undo step per user action), keeps the points in step
with the masks' undo and redo, and fits a shape prior (to a Labels layer, or to an image's nuclei) off the UI
thread.
"""

from collections import deque
from dataclasses import dataclass

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, ProgressBar, PushButton, SpinBox
from qtpy.QtCore import QTimer

from ..annotate import MaskFitter, clear_cache, fit_methods, get_fit_method
from ..masks import MaskSampler, NucleusShapes, Patch, ShapePrior, rasterize
from ._dock import wrapping_label
from ._outputs import ERRORS, MASKS, output_kind
from ._worker import CloseWatcher, Job, WorkerWidget, error_message, release_gpu_memory, start_worker

_DEFAULT_PRIOR = "default (MoNuSeg)"
#: *Masks from* choices: sampled from the shape prior, or fitted to the nuclei of an image.
PRIOR, IMAGE = "shape prior", "image"
#: Steps of the widget's own undo journal; napari keeps as many in a Labels layer's history.
HISTORY = 100
#: Keys bound on the followed Points layer: they undo and redo on the masks layer (napari's Points layers have no
#: undo), so a click and its mask undo together whichever of the two layers is selected.
UNDO_KEY, REDO_KEY = "Control-Z", "Control-Shift-Z"


@dataclass
class _State:
    """What an undo or redo restores: the Points layer's data and features, and the sampler's (or fitter's) state."""

    data: np.ndarray
    features: object  # the Points layer's features table (a pandas DataFrame)
    sampler: "MaskSampler | MaskFitter"
    points: np.ndarray
    classes: np.ndarray
    shapes: "NucleusShapes | None"  # a MaskSampler's shapes
    fitted: "dict | None" = None  # a MaskFitter's snapshot()


@dataclass
class _Step:
    """One write of the widget into the masks layer (one step of napari's undo history) and the states around it."""

    pixels: tuple
    old: np.ndarray
    new: np.ndarray
    before: _State
    after: _State


def _copy_shapes(shapes: NucleusShapes) -> NucleusShapes:
    return shapes.take(np.arange(len(shapes)))  # an index array copies (the sampler edits its shapes in place)


class PointsToMasksWidget(WorkerWidget):
    """Choose a Points layer; every point added, moved or deleted updates the output Labels layer.

    *Masks from: shape prior* samples each nucleus from the prior; *image* fits it to the nucleus under the click
    in the chosen Image layer (:class:`~napari_nucsynth.annotate.MaskFitter`, *Method* its one-time pass, which
    runs in a worker with progress and Cancel; the points are fitted when it ends, and every edit after it
    re-fits only the nuclei it touches). The undo journal below works the same in both modes.

    Undo: each edit of the points is one step of the masks layer's undo history, and the widget keeps a journal of
    its own steps beside it: the pixels each one changed (their values before and after) and the state of the
    points (data and features) and of the sampler before and after it. napari announces an undo or redo of a
    Labels layer only as a repaint of its data (``set_data``, which any other refresh also sends), so at each one
    the widget compares the pixels of its latest step with the journal: if they hold their values from before the
    step, it was undone, and the points and the sampler go back to their state before it; if the pixels of the
    latest undone step hold their values after it, it was redone. A click and its mask thus undo together, and the
    points, the masks and the status agree after any number of undos and redos, whichever layer had focus (Ctrl+Z
    and Ctrl+Shift+Z on the Points layer undo and redo on the masks layer). This was chosen over recounting the
    masks after a change: ids shift when a point is deleted and a moved point's mask comes back elsewhere, so only
    the states themselves can put the points back. Each check reads the pixels of one step. Edits by hand keep
    their own undo steps (undoing them moves no point), and one (napari's ``paint``) ends the journal's redo history
    as it ends napari's. A masks layer hidden during an undo sends nothing: it is synchronised when shown again, or
    at the next point edit, whose points then win (the masks follow them). Features edited without a point edit (a
    script setting classes) become part of the present state. The journal holds :data:`HISTORY` steps, as many as
    napari's history, and starts again when the Points or masks layer is replaced or *Follow point edits* is off.
    """

    run_text = "Fit to image"
    action = "fit the masks to the image"
    failure = "Fitting to the image"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self._init_jobs()
        self.viewer = viewer
        self._points_layer = None
        self._labels_layer = None
        self._watched_labels = None  # the masks layer whose events the widget follows
        self._sampler: "MaskSampler | None" = None
        self._prior: "ShapePrior | None" = None
        self._fit_worker = None
        self._undo: deque = deque(maxlen=HISTORY)  # the journal: the widget's writes, oldest first
        self._redo: list = []  # the undone ones, latest undone last
        self._state: "_State | None" = None  # the points and sampler as of the last write
        self._busy = False  # the widget itself is writing the masks or restoring the points
        self._fitter: "MaskFitter | None" = None  # image mode: the fitter of the one-time pass, once it has run
        self._fit_key = None  # (image layer, method) of self._fitter

        self.points_combo = ComboBox(label="Points", choices=self._points_choices, nullable=True)
        self.source = ComboBox(label="Masks from", choices=[PRIOR, IMAGE], value=PRIOR)
        self.image_combo = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        # methods that can run here (a learned one without its model, e.g. nuclick before it ships, is left out)
        self.method = ComboBox(label="Method", choices=["auto", *(m for m in fit_methods()
                                                                  if get_fit_method(m).available())], value="auto")
        self.prior_combo = ComboBox(label="Shape prior", choices=self._prior_choices)
        self.seed = SpinBox(label="Seed", value=0, min=0, max=2**31 - 1)
        self.follow = CheckBox(text="Follow point edits", value=True)
        self.resample_btn = PushButton(text="Resample all")
        self.run_button = PushButton(text=self.run_text)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = wrapping_label()
        self.extend([self.points_combo, self.source, self.image_combo, self.method, self.prior_combo, self.seed,
                     self.follow, self.resample_btn, self.run_button, self.progress, self.status])
        self._timer = QTimer(self.native)  # a setting changed while the pass ran: run again when it ends
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self.run)

        self.points_combo.changed.connect(self._on_points_layer)
        self.source.changed.connect(self._on_source)
        self.image_combo.changed.connect(self._on_image_settings)
        self.method.changed.connect(self._on_image_settings)
        self.prior_combo.changed.connect(self._on_prior)
        self.seed.changed.connect(lambda _=None: self.resample_all())
        self.resample_btn.changed.connect(lambda _=None: self.resample_all())
        self.run_button.changed.connect(self._on_button)
        viewer.layers.events.inserted.connect(self._refresh_choices)
        viewer.layers.events.removed.connect(self._refresh_choices)
        self.native.destroyed.connect(self._on_closed)
        self._close_watcher = CloseWatcher(self.native, self._on_closed)
        self._refresh_choices()
        self._show_mode()

    # ---- layer choices -----------------------------------------------------------------------------------------
    def _points_choices(self, _=None):
        from napari.layers import Points

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Points)]

    def _image_choices(self, _=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, Image)]

    def _prior_choices(self, _=None):
        from napari.layers import Image, Labels

        labels = [
            (f"fit to {layer.name}", layer)
            for layer in self.viewer.layers
            if isinstance(layer, Labels) and layer is not self._labels_layer and output_kind(layer) != ERRORS
        ]
        images = [(f"from this image: {layer.name}", layer) for layer in self.viewer.layers if isinstance(layer, Image)]
        return [(_DEFAULT_PRIOR, None), *labels, *images]

    def _refresh_choices(self, _=None):
        self.points_combo.reset_choices()
        self.image_combo.reset_choices()
        self.prior_combo.reset_choices()
        if self.image_combo.value is None and self.image_combo.choices:
            self.image_combo.value = self.image_combo.choices[-1]  # the image is preselected when there is one
        if self.points_combo.value is None and self.points_combo.choices:
            self.points_combo.value = self.points_combo.choices[-1]

    # ---- masks from the image ----------------------------------------------------------------------------------
    def _show_mode(self) -> None:
        image = self.source.value == IMAGE
        for w in (self.image_combo, self.method, self.run_button, self.progress):
            w.visible = image
        self.resample_btn.text = "Fit all again" if image else "Resample all"

    def _on_source(self, _=None) -> None:
        self._show_mode()
        if self.source.value == PRIOR and self._job is not None:
            self.cancel()
        self.resample_all()

    def _on_image_settings(self, _=None) -> None:
        if self.source.value == IMAGE:
            self.resample_all()

    def _image_key(self):
        return (self.image_combo.value, self.method.value)

    def run(self) -> None:
        """Image mode: the one-time pass over the chosen image (in a worker), then every point fitted."""
        if self._job is not None:  # one pass at a time: the latest settings run when this one ends
            self._dirty = True
            return
        if self.source.value != IMAGE or self._points_layer is None:
            return
        layer, method = self.image_combo.value, self.method.value
        if layer is None:
            self.status.value = "Masks from image: add or choose an Image layer (an H&E tile)."
            return
        if getattr(layer, "multiscale", False):
            self.status.value = "Multiscale images are not supported: give a single-resolution tile."
            return
        image = np.array(layer.data, copy=True)
        pts = np.asarray(self._points_layer.data, dtype=float).reshape(-1, 2).copy()
        classes = self._classes()
        prior, seed = self._prior, int(self.seed.value)
        job = Job(layer)
        progress = self._progress(job, lambda msg: f"Fitting to {layer.name} ({method}): {msg}")

        def work():
            try:
                fitter = MaskFitter(image, method=method, prior=prior, seed=seed, progress=progress,
                                    should_stop=lambda: job.cancelled)
                fitter.reset(pts, classes)
                return fitter
            finally:
                release_gpu_memory()

        self._start(job, work, lambda fitter: self._on_fitted(job, method, fitter),
                    f"Fitting the masks to {layer.name} with {method}...")

    def _on_fitted(self, job: Job, method, fitter: MaskFitter) -> None:
        if (self.source.value != IMAGE or self._points_layer is None
                or self._image_key() != (job.layer, method)):
            return  # the settings changed meanwhile (a new pass follows when they need one)
        self._fitter, self._fit_key = fitter, (job.layer, method)
        self.progress.value = self.progress.max
        pts = np.asarray(self._points_layer.data, dtype=float).reshape(-1, 2)
        if not np.array_equal(pts, fitter.points):  # points edited during the pass: fit them as they are now
            self._refit_all(fitter)
            return
        self._sampler = fitter
        self._ensure_labels_layer(fitter.shape)
        self._write(fitter.labels.copy())
        self.status.value = fitter.summary()

    def _refit_all(self, fitter: MaskFitter) -> None:
        """Image mode, the pass done: a new fitter on its maps (prior and seed as set now), every point fitted."""
        fitter = MaskFitter(fitter.maps, prior=self._prior, seed=int(self.seed.value))
        self._fitter = fitter
        self._ensure_labels_layer(fitter.shape)
        pts = np.asarray(self._points_layer.data, dtype=float).reshape(-1, 2)
        try:
            labels = fitter.reset(pts, self._classes())
        except ValueError as e:
            self.status.value = str(e)
            return
        self._sampler = fitter
        self._write(labels.copy())
        self.status.value = fitter.summary()

    def _on_cancel(self) -> None:
        self._sampler = None  # the masks no longer follow the points until a pass has run
        self._forget()

    def _on_finished(self, job: Job) -> None:
        try:
            super()._on_finished(job)
        except RuntimeError:  # the widget's Qt objects are gone: it was closed while the pass ran
            pass

    def _on_closed(self, _=None) -> None:
        """The widget left the viewer (its dock closed) or was destroyed: stop the pass, free the cached maps."""
        self._cancel_on_close()
        self._fitter = self._sampler = None
        clear_cache()

    # ---- wiring ------------------------------------------------------------------------------------------------
    def _on_points_layer(self, layer=None):
        old = self._points_layer
        if old is not None:
            try:
                old.events.data.disconnect(self._on_points_data)
                old.events.features.disconnect(self._on_points_features)
                for key in (UNDO_KEY, REDO_KEY):
                    old.bind_key(key, None)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._points_layer = layer
        self._labels_layer = None
        self._forget()
        if layer is None:
            self.status.value = "Add a Points layer and click nuclei centroids."
            return
        if layer.ndim != 2:
            self.status.value = f"{layer.name} has {layer.ndim} dimensions; only 2-D points are supported."
            self._points_layer = None
            return
        layer.events.data.connect(self._on_points_data)
        layer.events.features.connect(self._on_points_features)
        layer.bind_key(UNDO_KEY, self._undo_masks, overwrite=True)
        layer.bind_key(REDO_KEY, self._redo_masks, overwrite=True)
        self.resample_all()

    def _on_prior(self, layer=None):
        from napari.layers import Image

        if layer is None:
            self._prior = None
            self.resample_all()
            return
        if isinstance(layer, Image):  # the prior of the image's own nuclei (found by the default segmenter)
            image = np.array(layer.data, copy=True)
            self.status.value = f"Fitting the shape prior to the nuclei of {layer.name}..."
            work = lambda: ShapePrior.from_image(image, seed=0)  # noqa: E731
        else:
            labels = np.asarray(layer.data)
            self.status.value = f"Fitting the shape prior to {layer.name}..."
            work = lambda: ShapePrior.fit(labels, seed=0)  # noqa: E731
        # a fit that finishes (or fails) after the user has chosen another prior is dropped
        self._fit_worker = start_worker(
            work,
            returned=lambda prior: self.prior_combo.value is layer and self._prior_fitted(prior),
            errored=lambda exc: self.prior_combo.value is layer and self._fit_failed(exc))

    def _fit_failed(self, exc: BaseException) -> None:
        self.status.value = error_message(exc, "fit the prior", "Fitting the prior")

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
                layer.metadata[MASKS] = self._points_layer.name
            else:
                layer = self.viewer.add_labels(np.zeros(shape, dtype=np.uint32), name=name, opacity=0.5,
                                               metadata={MASKS: self._points_layer.name})
                # keep the Points layer on top so the user can go on clicking
                self.viewer.layers.selection.active = self._points_layer
            self._labels_layer = layer
            self._watch_labels(layer)
            self.prior_combo.reset_choices()
        return layer

    # ---- undo and redo (see the class docstring) ---------------------------------------------------------------
    def _watch_labels(self, layer) -> None:
        old = self._watched_labels
        if old is layer:
            return
        if old is not None:
            try:
                old.events.set_data.disconnect(self._on_masks_changed)
                old.events.paint.disconnect(self._on_masks_painted)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._forget()
        layer.events.set_data.connect(self._on_masks_changed)
        layer.events.paint.connect(self._on_masks_painted)
        self._watched_labels = layer

    def _forget(self) -> None:
        """Start the journal again (the layers it was about are gone or were replaced)."""
        self._undo.clear()
        self._redo.clear()
        self._state = None

    def _snapshot(self) -> _State:
        s, layer = self._sampler, self._points_layer
        if isinstance(s, MaskFitter):
            return _State(np.array(layer.data, copy=True), layer.features.copy(), s, s.points.copy(),
                          s.classes.copy(), None, s.snapshot())
        return _State(np.array(layer.data, copy=True), layer.features.copy(), s, s.points.copy(), s.classes.copy(),
                      _copy_shapes(s.shapes))

    def _restore(self, state: _State, points: bool = True) -> None:
        """Put the sampler (and, with ``points``, the Points layer) back in ``state``; the masks are already there."""
        s = state.sampler
        if state.fitted is not None:
            s.restore(state.fitted, labels=self._labels_layer.data)
            if self.source.value == IMAGE:
                self._fitter = s
        else:
            s.points, s.classes, s.shapes = state.points.copy(), state.classes.copy(), _copy_shapes(state.shapes)
            s.labels = rasterize(s.shapes, s.shape)
        self._sampler = s
        self._state = state
        if not points:
            return
        layer = self._points_layer
        self._busy = True
        try:
            layer.selected_data = set()
            layer.data = state.data.copy()
            layer.features = state.features.copy()
        finally:
            self._busy = False

    def _sync(self, points: bool = True) -> bool:
        """Follow undos and redos of the masks layer that happened since the last call; True when there were any."""
        layer = self._labels_layer
        if layer is None or not (self._undo or self._redo):
            return False
        data, state, what = layer.data, None, ""
        while self._undo and np.array_equal(data[self._undo[-1].pixels], self._undo[-1].old):
            step = self._undo.pop()
            self._redo.append(step)
            state, what = step.before, "Undone"
        while state is None and self._redo and np.array_equal(data[self._redo[-1].pixels], self._redo[-1].new):
            step = self._redo.pop()
            self._undo.append(step)
            state, what = step.after, "Redone"
        if state is None:
            return False
        self._restore(state, points=points)
        summary = state.sampler.summary() if state.fitted is not None else f"{len(state.points)} nuclei."
        self.status.value = f"{what}: {summary}"
        return True

    def _on_points_features(self, _=None) -> None:
        """Features edited without a data event (e.g. classes set by a script) are part of the present state."""
        state, layer = self._state, self._points_layer
        if not self._busy and state is not None and layer is not None and len(layer.features) == len(state.data):
            state.features = layer.features.copy()

    def _on_masks_changed(self, _=None) -> None:
        if not self._busy:
            self._sync()

    def _on_masks_painted(self, _=None) -> None:
        if not self._busy:  # an edit by hand: napari's redo history ends here, so does the journal's
            self._redo.clear()

    def _undo_masks(self, _layer=None) -> None:
        if self._labels_layer is not None and self._labels_layer in self.viewer.layers:
            self._labels_layer.undo()

    def _redo_masks(self, _layer=None) -> None:
        if self._labels_layer is not None and self._labels_layer in self.viewer.layers:
            self._labels_layer.redo()

    def _write(self, new: np.ndarray, rows: slice = slice(None), cols: slice = slice(None)) -> None:
        """Write ``new`` into the labels layer's ``[rows, cols]`` as one undoable action, and journal it."""
        layer = self._labels_layer
        old = layer.data[rows, cols]
        changed = np.nonzero(old != new)
        after = self._snapshot()
        if changed[0].size == 0:
            self._state = after
            return
        pixels = (changed[0] + (rows.start or 0), changed[1] + (cols.start or 0))
        step = _Step(pixels, old[changed], new[changed], self._state, after)  # (fancy indexing copies)
        self._busy = True
        try:
            with layer.block_history():
                layer.data_setitem(pixels, step.new)
        finally:
            self._busy = False
        if step.before is not None:  # (the first write into a new layer has no state to go back to)
            self._undo.append(step)
        self._redo.clear()
        self._state = after

    def resample_all(self) -> None:
        """Resample every nucleus from the current points, seed and prior (image mode: fit every point, after the
        image's one-time pass if it has not run for the chosen image and method)."""
        if self._points_layer is None:
            return
        if self.source.value == IMAGE:
            if self._fitter is not None and self._fit_key == self._image_key() and self._job is None:
                self._refit_all(self._fitter)
            else:
                self._sampler = None
                self.run()
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
        if self._busy or action not in (ActionType.ADDED, ActionType.REMOVED, ActionType.CHANGED):
            return
        if not self.follow.value:
            self._forget()  # the masks no longer follow the points: an undo cannot put both back
            return
        if self._labels_layer is None or self._labels_layer not in self.viewer.layers:
            self.resample_all()
            return
        self._sync(points=False)  # an undo not seen yet (a hidden masks layer): the masks follow these points
        s = self._sampler
        if self.source.value == IMAGE and (s is None or self._job is not None):
            # the pass is running (its end fits the points as they are then) or was cancelled (Fit to image)
            self._forget()
            return
        if s is None or isinstance(s, MaskFitter) != (self.source.value == IMAGE):  # (an undo across a mode switch)
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
        self.status.value = s.summary() if isinstance(s, MaskFitter) else f"{len(s.points)} nuclei."
