"""The Render widget: a synthetic H&E image of a Labels layer, in the style of a reference Image layer.

Thin by design: the computation is :func:`napari_nucsynth.render.render` (methods listed from its registry,
checkpoints of learned renderers from :func:`napari_nucsynth.models.list_checkpoints`, devices from
:func:`napari_nucsynth.devices.available_devices`); this module copies the layers' data on the UI
thread, runs the renderer in a worker with progress and cancellation, and puts the result into an Image layer.
Style exploration is :func:`napari_nucsynth.render.interpolate` (the *Style position* slider) and
:func:`napari_nucsynth.render.gallery` (*Gallery...*), run the same way.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FloatSlider,
    ProgressBar,
    PushButton,
    SpinBox,
)
from qtpy.QtCore import QTimer

from ..devices import available_devices
from ..models import checkpoint_dir
from ..render import gallery, get_renderer, interpolatable_methods, interpolate, render, renderers
from ._checkpoints import CheckpointPicker, MethodBox, open_train_widget
from ._dock import wrapping_label
from ._outputs import MASKS, output_kind
from ._worker import CloseWatcher, Job, WorkerWidget, release_gpu_memory

#: Milliseconds of quiet after a labels edit before a live re-render starts (edits in between restart the wait).
LIVE_DEBOUNCE_MS = 150
_DETECT = "(detect)"
_MARK = "nucsynth_render_of"  # metadata key that marks the widget's output layers
_GALLERY = "nucsynth_gallery_of"  # metadata key that marks its gallery layers
#: A gallery cell's longer side at most (larger renders are shown scaled down, so a folder of big tiles fits memory)
GALLERY_THUMB = 512
GALLERY_FONT = 10  # points, the tile names over the gallery's cells


#: methods with a refinement strength (the *Refinement* slider): adain's ``classic + strength x residual``
STRENGTH_METHODS = ("adain",)

class _GalleryJob(Job):
    """A gallery in flight: a moved style slider waits for it instead of cancelling it."""


class RenderWidget(MethodBox, WorkerWidget):
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

    For methods that can blend styles (:func:`~napari_nucsynth.render.interpolatable_methods`: ``sian``), *Style B*
    and *Style position* appear: at position t > 0 the render uses the style ``(1 - t)`` Style + ``t`` Style B.
    Moving the slider re-renders after :data:`LIVE_DEBOUNCE_MS` of quiet; a newer position supersedes the render
    in flight (it is cancelled and its result dropped). *Gallery...* asks for a folder of reference tiles and
    renders the labels in each of their styles (method, checkpoint, device and seed as chosen) into one Image
    layer ``"gallery: <labels name>"`` beside the labels, with each cell's tile name written over it by a Shapes
    layer ``"gallery names: <labels name>"``; :meth:`make_gallery` takes the folder directly (for scripts).
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
        self.gallery_result = None  # the last GalleryResult
        self._position_pending = False  # the slider moved while a job ran: render its position when that one ends
        self._gallery_dir: Path | None = None

        self.labels_combo = ComboBox(label="Labels", choices=self._labels_choices)
        self.style_combo = ComboBox(label="Style", choices=self._style_choices)
        self.style_labels_combo = ComboBox(label="Style labels", choices=self._style_labels_choices)
        methods = renderers()
        # refreshed with the layers; methods without a model are labelled so
        self.method = ComboBox(label="Method", choices=self._method_choices,
                               value="classic" if "classic" in methods else methods[0])
        self._ckpt = CheckpointPicker(self._method_needs, lambda msg: setattr(self.status, "value", msg),
                                      shipped=lambda m: getattr(get_renderer(m), "default_checkpoint", None),
                                      train=self._open_train)
        self._ckpt.relabel_all(self.method)
        self.checkpoint, self.browse, self.train_model_btn = self._ckpt.combo, self._ckpt.browse, self._ckpt.train_btn
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        self.seed = SpinBox(label="Seed", value=0, min=0, max=2**31 - 1)
        self.style_b = ComboBox(label="Style B", choices=self._style_choices)
        self.style_b.tooltip = "The second style reference: the Style position slider moves between Style and it"
        self.position = FloatSlider(label="Style position", value=0.0, min=0.0, max=1.0, step=0.05)
        self.position.tooltip = "0 = Style, 1 = Style B; in between, a blend of the two styles (re-renders live)"
        self.strength = FloatSlider(label="Refinement", value=1.0, min=0.0, max=1.0, step=0.05)
        self.strength.tooltip = ("adain: the share of the learned refinement added to the classic render (0 = the "
                                 "classic render, 1 = the full refinement: more realistic, nuclei a little harder to "
                                 "segment; docs/generators.md); set to the model's own default when it is chosen")
        self.live = CheckBox(text="live (re-render when the labels change)", value=False)
        self.render_btn = self.run_button = PushButton(text=self.run_text)
        self.gallery_btn = PushButton(text="Gallery...")
        self.gallery_btn.tooltip = ("Render the labels in the style of every tile of a folder, side by side (same "
                                    "method, checkpoint and seed)")
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = wrapping_label()  # long messages wrap rather than widen the dock
        self.extend([self.labels_combo, self.style_combo, self.style_labels_combo, self.method, self.checkpoint,
                     self.browse, self.train_model_btn, self.style_b, self.position, self.strength, self.device,
                     self.seed, self.live, self.render_btn, self.gallery_btn, self.progress, self.status])

        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(LIVE_DEBOUNCE_MS)
        self._timer.timeout.connect(self._live_render)
        self._position_timer = QTimer(self.native)
        self._position_timer.setSingleShot(True)
        self._position_timer.setInterval(LIVE_DEBOUNCE_MS)
        self._position_timer.timeout.connect(self._position_render)

        self.render_btn.changed.connect(self._on_button)
        self.labels_combo.changed.connect(self._connect_live)
        self.live.changed.connect(self._connect_live)
        self.method.changed.connect(self._on_method)
        self.position.changed.connect(self._on_position)
        self.style_b.changed.connect(self._on_style_b)
        self.gallery_btn.changed.connect(self._on_gallery_button)
        self.checkpoint.changed.connect(self._sync_strength)
        for w in (self.style_combo, self.style_labels_combo, self.method, self.checkpoint, self.device, self.seed,
                  self.strength):
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

    def _method_choices(self, _=None):
        names = renderers()
        picker = getattr(self, "_ckpt", None)  # built after the method box
        return picker.method_choices(names, get_renderer) if picker is not None else names

    def _on_method(self, _=None):
        """Enable the checkpoint controls for learned renderers; say so when one has no model to run yet. Show the
        style interpolation controls for methods that can blend styles."""
        self._ckpt.refresh()
        self._ckpt.relabel(self.method)
        can = self._can_interpolate()
        self.style_b.visible = self.position.visible = can
        self.strength.visible = self.method.value in STRENGTH_METHODS
        self._sync_strength()
        if can and self.style_b.value is self.style_combo.value:  # a second style is what the slider is for
            other = next((lyr for lyr in self.style_b.choices if lyr is not self.style_combo.value), None)
            if other is not None:
                self.style_b.value = other
        method, needs = self._method_needs()
        if not needs:
            return
        if not self._ckpt.has_model(method):
            self.status.value = (f"'{method}' needs a trained model, and none is saved in {checkpoint_dir()}. "
                                 f"Train one here (Train a model...) or with nucsynth train --model {method} "
                                 f"--images DIR --labels DIR --steps N --out {checkpoint_dir() / (method + '.pt')}, "
                                 "or pick a checkpoint file.")

    def _sync_strength(self, _=None) -> None:
        """Set the Refinement slider to the chosen adain model's own default strength (1 for models without one)."""
        if self.method.value not in STRENGTH_METHODS:
            return
        try:
            from ..render.adain import model_info

            value = float(model_info(self.checkpoint.value)["config"].get("strength", 1.0))
        except (ValueError, OSError):  # no model yet: the status line says so
            return
        self.strength.value = value

    def _options(self) -> dict:
        """The chosen method's own render options (adain's refinement strength)."""
        return {"strength": float(self.strength.value)} if self.method.value in STRENGTH_METHODS else {}

    def _open_train(self, method: str) -> None:
        self.status.value = open_train_widget(self.viewer, method)

    # ---- layer choices -----------------------------------------------------------------------------------------
    def _labels_choices(self, _=None):
        """Every Labels layer, the masks made from clicks (Points to masks) first: the default is what to render."""
        from napari.layers import Labels

        labels = [lyr for lyr in self.viewer.layers if isinstance(lyr, Labels)]
        return [(lyr.name, lyr) for lyr in sorted(labels, key=lambda lyr: output_kind(lyr) != MASKS)]

    def _style_choices(self, _=None):
        """Every Image layer but the widget's own outputs; RGB ones first, so the default is a sensible one."""
        from napari.layers import Image

        imgs = [lyr for lyr in self.viewer.layers
                if isinstance(lyr, Image) and _MARK not in lyr.metadata and _GALLERY not in lyr.metadata]
        return [(lyr.name, lyr) for lyr in sorted(imgs, key=lambda lyr: not lyr.rgb)]

    def _style_labels_choices(self, _=None):
        return [(_DETECT, None), *self._labels_choices()]

    def _reset(self, _=None):
        """Refresh the dropdowns (a choice that still exists stays chosen) and drop a removed live layer."""
        for combo in (self.labels_combo, self.style_combo, self.style_labels_combo, self.style_b):
            combo.reset_choices()
        self._ckpt.relabel_all(self.method)  # a renderer registered since (e.g. by another plugin) appears too
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

    # ---- style interpolation -----------------------------------------------------------------------------------
    def _can_interpolate(self) -> bool:
        try:
            return self.method.value in interpolatable_methods()
        except ValueError:
            return False

    def _style_position(self) -> float | None:
        """The slider's position when the render blends two styles (a method that can, Style B chosen, t > 0)."""
        t = float(self.position.value)
        if t <= 0 or self.style_b.value is None or not self._can_interpolate():
            return None
        return t

    def _on_position(self, _=None):
        if self._can_interpolate():
            self._position_timer.start()  # (re)start the debounce wait

    def _on_style_b(self, _=None):
        if self._style_position() is not None:
            self._position_timer.start()

    def _position_render(self):
        """Render the slider's position; a render in flight is superseded (a gallery is waited for)."""
        job = self._job
        if job is not None:
            if not isinstance(job, _GalleryJob) and not job.cancelled:
                job.cancelled = True  # stops at its next check; its result is dropped
                job.reason = "A newer style position supersedes this render."
                self._last_live = None
            self._position_pending = True
            return
        self.run(live=self.live.value)

    def _on_finished(self, job: Job) -> None:
        was_current = job is self._job
        super()._on_finished(job)
        if not was_current:
            return
        self.gallery_btn.text = "Gallery..."
        if self._position_pending and self._job is None:
            self._position_pending = False
            self.run(live=self.live.value)

    # ---- running -----------------------------------------------------------------------------------------------
    def _settings(self):
        t = self._style_position()
        return (self.style_combo.value, self.style_labels_combo.value, self.method.value, self.device.value,
                int(self.seed.value), self.checkpoint.value, None if t is None else (self.style_b.value, t),
                tuple(self._options().items()))

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
        style_labels_layer, method, device, seed, checkpoint, blend = self._settings()[1:7]
        if blend is not None and getattr(blend[0], "multiscale", False):
            self.status.value = "Multiscale layers are not supported: give a single-resolution tile as Style B."
            return
        labels = np.array(labels_layer.data, copy=True)
        if live:
            settings = self._settings()
            last = self._last_live
            if last is not None and last[1] == settings and np.array_equal(last[0], labels):
                return  # nothing changed (a refresh, a visibility toggle...)
            self._last_live = (labels, settings)
        style = np.array(style_layer.data, copy=True)
        style_labels = None if style_labels_layer is None else np.array(style_labels_layer.data, copy=True)
        style_b = None if blend is None else np.array(blend[0].data, copy=True)
        styled = f"the style of {style_layer.name}" if blend is None else \
            f"a style {blend[1]:.2f} of the way from {style_layer.name} to {blend[0].name}"

        options = self._options()
        job = Job(labels_layer)
        progress = self._progress(job, lambda msg: f"Rendering {labels_layer.name}: {msg}")
        kw = dict(method=method, seed=seed, device=device, checkpoint=checkpoint, progress=progress,
                  should_stop=lambda: job.cancelled)

        def work():
            try:
                if style_b is not None:
                    return interpolate(labels, style, style_b, blend[1], **kw)
                return render(labels, style, style_labels=style_labels, options=options, **kw)
            finally:
                release_gpu_memory()

        self._start(job, work, lambda img: self._on_result(job, img, styled), f"Rendering {labels_layer.name} in "
                    f"{styled}...")

    def _on_cancel(self) -> None:
        self._last_live = None
        self._position_pending = False

    def _on_failed(self) -> None:
        self._last_live = None  # let the same state be tried again after the user fixes the input

    def _on_closed(self, _=None):
        """The widget left the viewer (its dock closed) or was destroyed: stop working."""
        self._cancel_on_close()
        self._position_pending = False
        try:
            self._position_timer.stop()
            self.live.value = False  # disconnects from the labels layer
        except RuntimeError:  # the Qt objects are already gone
            pass

    # ---- output ------------------------------------------------------------------------------------------------
    def _on_result(self, job: Job, img: np.ndarray, styled: str = "") -> None:
        labels_layer = job.layer
        self.result = img
        layer = self._output_layer(labels_layer, img)
        secs = time.perf_counter() - job.started
        self.progress.value = self.progress.max
        self.status.value = f"Rendered '{layer.name}' ({img.shape[0]} x {img.shape[1]}) in {secs:.2f} s" + \
            (f" in {styled}." if styled else ".")

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

    # ---- gallery -----------------------------------------------------------------------------------------------
    def _on_gallery_button(self, _=None):
        if isinstance(self._job, _GalleryJob):
            self.cancel()
        else:
            self.make_gallery()

    def make_gallery(self, folder=None) -> None:
        """Render the chosen labels in the style of every image in ``folder`` (asked for with a dialog when None),
        in a worker; the mosaic arrives in the layer ``"gallery: <labels name>"``."""
        if self._job is not None:
            self.status.value = "A render is running: wait for it to end (or cancel it), then make the gallery."
            return
        labels_layer = self.labels_combo.value
        if labels_layer is None or getattr(labels_layer, "multiscale", False):
            self.status.value = "Choose a (single-resolution) Labels layer to render in every style of a folder."
            return
        if folder is None:
            from qtpy.QtWidgets import QFileDialog

            start = str(self._gallery_dir or Path.home())
            folder = QFileDialog.getExistingDirectory(self.native, "Folder of reference H&E tiles", start)
            if not folder:
                return
        folder = Path(folder)
        self._gallery_dir = folder
        labels = np.array(labels_layer.data, copy=True)
        _, _, method, device, seed, checkpoint, _, _ = self._settings()
        options = self._options()

        job = _GalleryJob(labels_layer)
        progress = self._progress(job, lambda msg: f"Gallery of {labels_layer.name}: {msg}")

        def work():
            try:
                return gallery(labels, folder, method=method, checkpoint=checkpoint, seed=seed, device=device,
                               thumb=GALLERY_THUMB, progress=progress, should_stop=lambda: job.cancelled,
                               options=options)
            finally:
                release_gpu_memory()

        self._start(job, work, lambda res: self._on_gallery(job, res, folder),
                    f"Rendering {labels_layer.name} in every style of {folder.name}...")
        self.gallery_btn.text = "Cancel gallery"

    def _on_gallery(self, job: Job, res, folder: Path) -> None:
        self.gallery_result = res
        layer = self._gallery_layers(job.layer, res, folder)
        secs = time.perf_counter() - job.started
        self.progress.value = self.progress.max
        msg = f"Gallery '{layer.name}': {len(res.names)} styles from {folder.name} in {secs:.1f} s."
        if res.skipped:
            shown = "; ".join(f"{name} ({why[:80]})" for name, why in res.skipped[:3])
            more = f" and {len(res.skipped) - 3} more" if len(res.skipped) > 3 else ""
            msg += f" Skipped {len(res.skipped)}: {shown}{more}."
        self.status.value = msg

    def _gallery_layers(self, labels_layer, res, folder: Path):
        """Put the mosaic beside the labels (cells at the labels' own size) and the tile names over its cells."""
        from napari.layers import Image, Shapes

        h, w = np.shape(labels_layer.data)[-2:]
        ch, cw = res.cell_shape
        scale = np.asarray(labels_layer.scale)[-2:] * (h / ch, w / cw)  # a shrunken cell shows at full size
        translate = np.asarray(labels_layer.translate)[-2:] + (0, 1.05 * w * labels_layer.scale[-1])
        name = f"gallery: {labels_layer.name}"
        meta = {_GALLERY: labels_layer.name, "folder": str(folder), "names": list(res.names),
                "cells": [tuple(map(int, c)) for c in res.cells], "skipped": list(res.skipped)}
        layers = self.viewer.layers
        active = layers.selection.active
        layer = next((lyr for lyr in layers if isinstance(lyr, Image) and lyr.metadata.get(_GALLERY) ==
                      labels_layer.name), None)
        new = layer is None
        if new:
            layer = self.viewer.add_image(res.grid, rgb=True, name=name, scale=scale, translate=translate,
                                          metadata=meta)
            self.viewer.reset_view()  # the gallery lies beside the tile: bring both into view
        else:
            layer.data = res.grid
            layer.scale, layer.translate = scale, translate
            layer.metadata = meta
        for lyr in [lyr for lyr in layers if isinstance(lyr, Shapes) and lyr.metadata.get(_GALLERY) ==
                    labels_layer.name]:
            layers.remove(lyr)
        # each name on a dark tag in its cell's top-left corner, sized for the text at the present zoom (napari
        # draws text at a fixed screen size and with no background, and H&E can be as pale as yellow or white)
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera  # napari < 0.9
        px = 1.0 / (camera.zoom * scale)  # data pixels per screen pixel, (row, col)
        tag_h = min(ch, GALLERY_FONT * 2 * px[0])
        tags = []
        for (r, c), nm in zip(res.cells, res.names):
            tag_w = min(cw, (0.9 * GALLERY_FONT * len(nm) + GALLERY_FONT) * px[1])  # ~0.9 px a point a letter
            tags.append(np.array([[r, c], [r, c + tag_w], [r + tag_h, c + tag_w], [r + tag_h, c]], float))
        self.viewer.add_shapes(
            tags, shape_type="rectangle", name=f"gallery names: {labels_layer.name}", scale=scale,
            translate=translate, edge_width=0, face_color=[0, 0, 0, 0.6], edge_color="transparent", opacity=1.0,
            features={"name": list(res.names)}, metadata={_GALLERY: labels_layer.name},
            text={"string": "{name}", "anchor": "center", "size": GALLERY_FONT, "color": "white"},
        )
        if active is not None and active in layers:
            layers.selection.active = active
        return layer
