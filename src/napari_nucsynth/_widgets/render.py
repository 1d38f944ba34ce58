"""The Render widget: a synthetic H&E image of a Labels layer, in the style of a reference Image layer.

Thin by design: the computation is :func:`napari_nucsynth.render.render` (methods listed from its registry,
checkpoints of learned renderers from :func:`napari_nucsynth.models.list_checkpoints`, devices from
:func:`napari_nucsynth.devices.available_devices`); this module copies the layers' data on the UI
thread, runs the renderer in a worker with progress and cancellation, and puts the result into an Image layer.
"""

from __future__ import annotations

import time
import weakref

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from qtpy.QtCore import QTimer

from ..devices import available_devices
from ..models import checkpoint_dir
from ..render import get_renderer, render, renderers
from ._checkpoints import CheckpointPicker, open_train_widget
from ._worker import CloseWatcher, Job, WorkerWidget, release_gpu_memory

#: Milliseconds of quiet after a labels edit before a live re-render starts (edits in between restart the wait).
LIVE_DEBOUNCE_MS = 150
_DETECT = "(detect)"
_MARK = "nucsynth_render_of"  # metadata key that marks the widget's output layers


class RenderWidget(WorkerWidget):
    """Render a Labels layer as a synthetic H&E image in the style of a reference Image layer.

    The result goes into an RGB Image layer named ``"render: <labels name>"`` with the labels layer's scale and
    translate. Rendering again (by hand or live) replaces that layer's data in place; if the user has deleted
    it, a new one is added. A new layer is inserted directly above the topmost Image layer that lies below the
    labels layer (the bottom of the list if there is none): it covers the tile it imitates while the labels,
    points and shapes drawn over that tile stay on top and the active layer stays the one the user works in.

    With *live* checked, edits of the labels layer (painting, ``data_setitem``, replacing ``.data``, undo)
    re-render after :data:`LIVE_DEBOUNCE_MS` of quiet; an edit that arrives during a render is rendered when that
    one ends, so at most one worker runs and the latest state wins. Changing the style, method, device or seed
    re-renders too. The Render button turns into Cancel while a render runs; cancelling makes the renderer's
    ``should_stop`` return True (renderers then raise ``InterruptedError``; one that never checks is stopped at
    its next progress report) and drops its result. Closing the widget, or removing the labels layer being
    rendered, cancels too.
    """

    run_text, action, failure = "Render", "render", "Render"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self._init_jobs()  # _job, _worker, _dirty (an edit arrived while a render ran: render again when it ends)
        self._live_layer = None
        self._last_live: tuple | None = None  # (labels copy, settings) of the last live render, to skip no-ops
        self._outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # labels layer -> its render layer
        self.result: np.ndarray | None = None  # the last rendered image (for scripts and tests)

        self.labels_combo = ComboBox(label="Labels", choices=self._labels_choices)
        self.style_combo = ComboBox(label="Style", choices=self._style_choices)
        self.style_labels_combo = ComboBox(label="Style labels", choices=self._style_labels_choices)
        methods = renderers()
        self.method = ComboBox(label="Method", choices=lambda _=None: renderers(),  # refreshed with the layers
                               value="classic" if "classic" in methods else methods[0])
        self._ckpt = CheckpointPicker(self._method_needs, lambda msg: setattr(self.status, "value", msg),
                                      shipped=lambda m: getattr(get_renderer(m), "default_checkpoint", None),
                                      train=self._open_train)
        self.checkpoint, self.browse, self.train_model_btn = self._ckpt.combo, self._ckpt.browse, self._ckpt.train_btn
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        self.seed = SpinBox(label="Seed", value=0, min=0, max=2**31 - 1)
        self.live = CheckBox(text="live (re-render when the labels change)", value=False)
        self.render_btn = self.run_button = PushButton(text=self.run_text)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)  # long messages wrap rather than widen the dock
        self.extend([self.labels_combo, self.style_combo, self.style_labels_combo, self.method, self.checkpoint,
                     self.browse, self.train_model_btn, self.device, self.seed, self.live, self.render_btn,
                     self.progress, self.status])

        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(LIVE_DEBOUNCE_MS)
        self._timer.timeout.connect(self._live_render)

        self.render_btn.changed.connect(self._on_button)
        self.labels_combo.changed.connect(self._connect_live)
        self.live.changed.connect(self._connect_live)
        self.method.changed.connect(self._on_method)
        for w in (self.style_combo, self.style_labels_combo, self.method, self.checkpoint, self.device, self.seed):
            w.changed.connect(self._on_setting)
        viewer.layers.events.inserted.connect(self._reset)
        viewer.layers.events.removed.connect(self._reset)
        self.native.destroyed.connect(self._on_closed)
        self._close_watcher = CloseWatcher(self.native, self._on_closed)
        self._on_method()
        self._reset()

    # ---- method and checkpoint ---------------------------------------------------------------------------------
    def _method_needs(self) -> tuple[str | None, bool]:
        method = self.method.value
        try:
            r = get_renderer(method) if method is not None else None
        except ValueError:
            r = None
        return method, r is not None and bool(getattr(r, "needs_checkpoint", False))

    def _on_method(self, _=None):
        """Enable the checkpoint controls for learned renderers; say so when one has no model to run yet."""
        self._ckpt.refresh()
        method, needs = self._method_needs()
        if not needs:
            return
        if not self._ckpt.has_model(method):
            self.status.value = (f"'{method}' needs a trained model, and none is saved in {checkpoint_dir()}. "
                                 f"Train one here (Train a model...) or with nucsynth train --model {method} "
                                 f"--images DIR --labels DIR --steps N --out {checkpoint_dir() / (method + '.pt')}, "
                                 "or pick a checkpoint file.")

    def _open_train(self, method: str) -> None:
        self.status.value = open_train_widget(self.viewer, method)

    # ---- layer choices -----------------------------------------------------------------------------------------
    def _labels_choices(self, _=None):
        from napari.layers import Labels

        return [(lyr.name, lyr) for lyr in self.viewer.layers if isinstance(lyr, Labels)]

    def _style_choices(self, _=None):
        """Every Image layer but the widget's own outputs; RGB ones first, so the default is a sensible one."""
        from napari.layers import Image

        imgs = [lyr for lyr in self.viewer.layers if isinstance(lyr, Image) and _MARK not in lyr.metadata]
        return [(lyr.name, lyr) for lyr in sorted(imgs, key=lambda lyr: not lyr.rgb)]

    def _style_labels_choices(self, _=None):
        return [(_DETECT, None), *self._labels_choices()]

    def _reset(self, _=None):
        """Refresh the dropdowns (a choice that still exists stays chosen) and drop a removed live layer."""
        for combo in (self.labels_combo, self.style_combo, self.style_labels_combo, self.method):
            combo.reset_choices()  # a renderer registered since (e.g. by another plugin) appears too
        self._ckpt.refresh()
        if self._live_layer is not None and self._live_layer not in self.viewer.layers:
            self._connect_live()
        job = self._job
        if job is not None and not job.cancelled and job.layer not in self.viewer.layers:
            self.cancel(f"'{job.layer.name}' was removed: its render was cancelled.")

    # ---- live mode ---------------------------------------------------------------------------------------------
    def _connect_live(self, _=None):
        old = self._live_layer
        if old is not None:
            for name in ("paint", "data", "set_data"):
                try:
                    getattr(old.events, name).disconnect(self._on_labels_edit)
                except (TypeError, ValueError, RuntimeError):
                    pass
        self._live_layer = None
        self._last_live = None
        self._timer.stop()
        layer = self.labels_combo.value
        if not self.live.value or layer is None:
            return
        # napari 0.9 emits `paint` for brush, fill and data_setitem edits, `data` (with `set_data`) when .data is
        # replaced, and only `set_data` on undo/redo (and on refreshes, which the no-op check below skips)
        for name in ("paint", "data", "set_data"):
            getattr(layer.events, name).connect(self._on_labels_edit)
        self._live_layer = layer
        self._timer.start()

    def _on_labels_edit(self, _=None):
        self._timer.start()  # (re)start the debounce wait

    def _on_setting(self, _=None):
        if self.live.value and self._live_layer is not None:
            self._timer.start()

    def _live_render(self):
        if not self.live.value or self._live_layer is None:
            return
        if self._job is not None:
            self._dirty = True
            return
        self.run(live=True)

    # ---- running -----------------------------------------------------------------------------------------------
    def _settings(self):
        return (self.style_combo.value, self.style_labels_combo.value, self.method.value, self.device.value,
                int(self.seed.value), self.checkpoint.value)

    def run(self, live: bool = False) -> None:
        """Start rendering the chosen labels layer in a worker; the image arrives in a layer when it is done."""
        if self._job is not None:  # one worker at a time: render the latest state when this one ends
            self._dirty = True
            return
        labels_layer, style_layer = self.labels_combo.value, self.style_combo.value
        if labels_layer is None or style_layer is None:
            self.status.value = "Choose a Labels layer to render and an H&E Image layer as the style reference."
            return
        if getattr(style_layer, "multiscale", False) or getattr(labels_layer, "multiscale", False):
            self.status.value = "Multiscale layers are not supported: give a single-resolution tile."
            return
        style_labels_layer, method, device, seed, checkpoint = self._settings()[1:]
        labels = np.array(labels_layer.data, copy=True)
        if live:
            settings = self._settings()
            last = self._last_live
            if last is not None and last[1] == settings and np.array_equal(last[0], labels):
                return  # nothing changed (a refresh, a visibility toggle...)
            self._last_live = (labels, settings)
        style = np.array(style_layer.data, copy=True)
        style_labels = None if style_labels_layer is None else np.array(style_labels_layer.data, copy=True)

        job = Job(labels_layer)
        progress = self._progress(job, lambda msg: f"Rendering {labels_layer.name}: {msg}")

        def work():
            try:
                return render(labels, style, method=method, style_labels=style_labels, seed=seed, device=device,
                              checkpoint=checkpoint, progress=progress, should_stop=lambda: job.cancelled)
            finally:
                release_gpu_memory()

        self._start(job, work, lambda img: self._on_result(job, img),
                    f"Rendering {labels_layer.name} in the style of {style_layer.name}...")

    def _on_cancel(self) -> None:
        self._last_live = None

    def _on_failed(self) -> None:
        self._last_live = None  # let the same state be tried again after the user fixes the input

    def _on_closed(self, _=None):
        """The widget left the viewer (its dock closed) or was destroyed: stop working."""
        self._cancel_on_close()
        try:
            self.live.value = False  # disconnects from the labels layer
        except RuntimeError:  # the Qt objects are already gone
            pass

    # ---- output ------------------------------------------------------------------------------------------------
    def _on_result(self, job: Job, img: np.ndarray) -> None:
        labels_layer = job.layer
        self.result = img
        layer = self._output_layer(labels_layer, img)
        secs = time.perf_counter() - job.started
        self.progress.value = self.progress.max
        self.status.value = f"Rendered '{layer.name}' ({img.shape[0]} x {img.shape[1]}) in {secs:.2f} s."

    def _output_layer(self, labels_layer, img: np.ndarray):
        from napari.layers import Image

        name = f"render: {labels_layer.name}"
        layer = self._outputs.get(labels_layer)
        if layer is None or layer not in self.viewer.layers:
            layer = next((lyr for lyr in self.viewer.layers if isinstance(lyr, Image) and lyr.name == name
                          and lyr.metadata.get(_MARK) == labels_layer.name), None)
        scale, translate = np.asarray(labels_layer.scale)[-2:], np.asarray(labels_layer.translate)[-2:]
        if layer is not None:
            layer.data = img
            layer.scale, layer.translate = scale, translate
        else:
            layer = Image(img, rgb=True, name=name, scale=scale, translate=translate,
                          metadata={_MARK: labels_layer.name})
            layers = self.viewer.layers
            active = layers.selection.active
            below = layers[: layers.index(labels_layer)] if labels_layer in layers else []
            images = [i for i, lyr in enumerate(below) if isinstance(lyr, Image)]
            layers.insert(images[-1] + 1 if images else 0, layer)
            if active is not None and active in layers:
                layers.selection.active = active
        self._outputs[labels_layer] = layer
        return layer
