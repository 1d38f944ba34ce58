"""The Segment widget: nucleus instances of an Image layer, as a Labels layer.

Thin by design: the computation is :mod:`napari_nucsynth.segment` (methods listed from its registry, checkpoints
from :func:`napari_nucsynth.models.list_checkpoints`, devices from :func:`napari_nucsynth.devices.available_devices`);
this module copies the image on the UI thread, runs the segmenter in a worker with progress and cancellation, and
puts the labels into a Labels layer.

Segmenters that split their work (``predict_maps`` + ``postprocess`` + ``params``, see
:class:`napari_nucsynth.segment.Segmenter`) have their network outputs cached, as cellpose-napari does: moving a
post-processing parameter re-runs only ``postprocess`` on the cached maps.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import (
    ComboBox,
    FloatSlider,
    ProgressBar,
    PushButton,
    Select,
    Slider,
)
from qtpy.QtCore import QTimer

from ..devices import available_devices
from ..segment import MODALITY_TTA, get_segmenter, modality_tta_methods, predict_maps, segmenters
from ._checkpoints import CheckpointPicker, MethodBox, open_train_widget
from ._dock import wrapping_label
from ._outputs import SEGMENTATION, output_name
from ._worker import Cancelled, CloseWatcher, Job, WorkerWidget, release_gpu_memory

#: Milliseconds of quiet after a parameter change before post-processing starts (a slider drag is one re-run).
PARAM_DEBOUNCE_MS = 60
_MARK = SEGMENTATION  # metadata key that marks the widget's output layers
#: The methods from best to worst on MoNuSeg (AJI of the sample: hovernet 0.61, watershed 0.43): the widget opens
#: on the first that is registered and can run (a model shipped, saved or picked, or none needed).
PREFERRED = ("hovernet", "maskrcnn", "stardist", "cellpose", "watershed")
_MODALITY = tuple(MODALITY_TTA)  # the tta modes that restain copies (and take TTA references)
#: The *Test-time augmentation* choices: (label, the ``tta`` of :func:`napari_nucsynth.segment.segment`).
TTA_CHOICES = [("off", False), ("flips (8 flips/rotations)", True),
               ("modality (restained copies; dense-map methods)", "modality"),
               ("modality by drit (its stain domains; dense-map methods)", "modality-drit")]


class _Job(Job):
    """One segmentation in flight."""

    def __init__(self, image_layer, method: str, key: tuple, post_only: bool):
        super().__init__(image_layer)
        self.method = method
        self.key = key  # the cache key of the settings it runs with
        self.post_only = post_only  # post-processing of cached maps (no network)


def _has_split(seg) -> bool:
    return callable(getattr(seg, "predict_maps", None)) and callable(getattr(seg, "postprocess", None))


def _param_specs(seg) -> dict:
    return dict(getattr(seg, "params", None) or {})


class SegmentWidget(MethodBox, WorkerWidget):
    """Segment the nuclei of an Image layer with a registered segmenter.

    The result goes into a uint32 Labels layer named ``"segmentation: <image name> (<method>)"`` with the image
    layer's scale and translate; segmenting again replaces its data in place (a new layer is added if the user
    deleted it).

    The checkpoint list holds ``(default)`` (the method's shipped model), the checkpoints of the method's kind saved
    in :func:`napari_nucsynth.models.checkpoint_dir`, and files picked with *Checkpoint file*; it is disabled for
    methods that run no model. A slider is shown for each of the method's post-processing parameters.

    For segmenters with ``predict_maps``/``postprocess`` the network outputs of the last run are kept, keyed by the
    image (layer and data), method, checkpoint (path and modification time), device and TTA (mode and references):
    pressing Segment again, or moving a parameter, runs only ``postprocess``. A parameter change re-runs
    post-processing after :data:`PARAM_DEBOUNCE_MS` of quiet; one arriving while a job runs is applied when it ends,
    so at most one worker runs and the latest parameters win. Segmenters without the split re-run in full on a
    parameter change when they need no model (classical ones are fast) and the shown result came from the current
    settings; otherwise the new parameters apply at the next Segment.

    *Test-time aug.*: off, flips (the 8 flips/rotations) or modality (the maps averaged over the image and its
    copies restained to each of *TTA references*: :func:`napari_nucsynth.segment.predict_maps`); modality needs
    at least one reference and a segmenter with dense maps (hovernet): otherwise a status line says so.

    The Segment button turns into Cancel while a job runs; cancelling makes ``should_stop`` return True
    (segmenters then raise ``InterruptedError``; one that never checks is stopped at its next progress report) and
    drops the result. Closing the widget, or removing the image being segmented, cancels too.
    """

    run_text, action, failure = "Segment", "segment", "Segmentation"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self._init_jobs()  # _job, _worker, _dirty (parameters changed while a job ran: post-process at its end)
        self._cache: tuple[tuple, np.ndarray] | None = None  # (key, maps) of the last predict_maps
        self._last_key: tuple | None = None  # settings key of the last full run whose labels are shown
        self._param_values: dict[str, dict] = {}  # method -> {param: value}, kept across method switches
        self._param_widgets: dict = {}
        self._outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # image layer -> {method: labels}
        self.result: np.ndarray | None = None  # the last labels (for scripts and tests)

        self.image_combo = ComboBox(label="Image", choices=self._image_choices)
        # refreshed with the layers; methods without a model are labelled so
        self.method = ComboBox(label="Method", choices=self._method_choices)
        self._ckpt = CheckpointPicker(self._method_needs, lambda msg: setattr(self.status, "value", msg),
                                      shipped=lambda m: getattr(self._segmenter(m), "default_checkpoint", None),
                                      train=self._open_train)
        self._ckpt.relabel_all(self.method)
        best = self._best_method()
        if best is not None:
            self.method.value = best
        self.checkpoint, self.browse, self.train_model_btn = self._ckpt.combo, self._ckpt.browse, self._ckpt.train_btn
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        self.tta = ComboBox(label="Test-time aug.", choices=TTA_CHOICES, value=False)
        self.tta.tooltip = ("flips: the outputs on the 8 flips/rotations merged; modality: the network's maps "
                            "averaged over the image and its copies restained (Macenko) to each TTA reference "
                            "(methods with dense maps only, e.g. hovernet)")
        self.tta_refs = Select(label="TTA references", choices=self._ref_choices, allow_multiple=True)
        self.tta_refs.tooltip = ("tiles whose stain modalities the modality TTA restains to (at least one; modality by "
                                 "drit needs none: it restains to each of its own stain domains)")
        self.tta_refs.visible = False
        self.tta_refs.native.setMaximumHeight(110)  # about five layers; it scrolls beyond (not the dock's height)
        self.segment_btn = self.run_button = PushButton(text=self.run_text)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = wrapping_label()
        self.extend([self.image_combo, self.method, self.checkpoint, self.browse, self.train_model_btn, self.device,
                     self.tta, self.tta_refs, self.segment_btn, self.progress, self.status])

        self._timer = QTimer(self.native)
        self._timer.setSingleShot(True)
        self._timer.setInterval(PARAM_DEBOUNCE_MS)
        self._timer.timeout.connect(self._auto_run)

        self.segment_btn.changed.connect(self._on_button)
        self.method.changed.connect(self._on_method)
        self.tta.changed.connect(self._on_tta)
        viewer.layers.events.inserted.connect(self._reset)
        viewer.layers.events.removed.connect(self._reset)
        self.native.destroyed.connect(self._on_closed)
        self._close_watcher = CloseWatcher(self.native, self._on_closed)
        self._on_method()
        self._reset()

    # ---- choices -----------------------------------------------------------------------------------------------
    def _image_choices(self, _=None):
        """Every Image layer, RGB ones first (so the default is an H&E tile)."""
        from napari.layers import Image

        imgs = [lyr for lyr in self.viewer.layers if isinstance(lyr, Image)]
        return [(lyr.name, lyr) for lyr in sorted(imgs, key=lambda lyr: not lyr.rgb)]

    def _ref_choices(self, _=None):
        """The RGB Image layers (reference tiles of the modality TTA)."""
        return [(name, lyr) for name, lyr in self._image_choices() if getattr(lyr, "rgb", False)]

    def _on_tta(self, _=None):
        self.tta_refs.visible = self.tta.value in _MODALITY

    def _method_choices(self, _=None):
        names = segmenters()
        picker = getattr(self, "_ckpt", None)  # built after the method box
        return picker.method_choices(names, get_segmenter) if picker is not None else names

    def _segmenter(self, method: str | None = None, strict: bool = False):
        """An instance of the chosen (or named) segmenter; None when there is none (unless ``strict``: then an
        unregistered name is the registry's ``ValueError``)."""
        method = self.method.value if method is None else method
        if method is None:
            return None
        try:
            return get_segmenter(method)
        except ValueError:
            if strict:
                raise
            return None

    def _best_method(self) -> str | None:
        """The first method of :data:`PREFERRED` that is registered and can run now; else the first registered."""
        methods = list(self.method.choices)
        for method in (m for m in PREFERRED if m in methods):
            seg = self._segmenter(method)
            if seg is not None and (not getattr(seg, "needs_checkpoint", False) or self._ckpt.has_model(method)):
                return method
        return methods[0] if methods else None

    def _method_needs(self) -> tuple[str | None, bool]:
        seg = self._segmenter()
        return self.method.value, seg is not None and bool(getattr(seg, "needs_checkpoint", False))

    def _reset(self, _=None):
        """Refresh the dropdowns (a choice that still exists stays chosen); drop what belonged to a removed image."""
        self.image_combo.reset_choices()
        self._ckpt.relabel_all(self.method)  # a segmenter registered since (e.g. by another plugin) appears
        self._ckpt.refresh()
        layers = self.viewer.layers
        if self._cache is not None and self._cache[0][0] not in layers:
            self._cache = None  # the maps of a removed image: free the memory
        if self._last_key is not None and self._last_key[0] not in layers:
            self._last_key = None
        job = self._job
        if job is not None and not job.cancelled and job.layer not in layers:
            self.cancel(f"'{job.layer.name}' was removed: its segmentation was cancelled.")

    def _on_method(self, _=None):
        """Show the method's parameters and checkpoints; the status line now speaks of this method (a message about
        the previous one, e.g. its error, goes), unless a job is running."""
        self._ckpt.refresh()
        self._ckpt.relabel(self.method)
        self._build_params(self._segmenter())
        method, needs = self._method_needs()
        if needs and not self._ckpt.has_model(method):
            self.status.value = (f"'{method}' needs a trained model and has none: train one here (Train a model...) "
                                 f"or with nucsynth train --model {method}, or pick a checkpoint file.")
        elif self._job is None:
            self.status.value = ""

    def _open_train(self, method: str) -> None:
        self.status.value = open_train_widget(self.viewer, method)

    # ---- post-processing parameters ----------------------------------------------------------------------------
    def _build_params(self, seg) -> None:
        for w in self._param_widgets.values():
            self.remove(w)
        self._param_widgets = {}
        if seg is None:
            return
        method = self.method.value
        values = self._param_values.setdefault(method, {})
        at = self.index(self.segment_btn)
        for name, (default, low, high) in _param_specs(seg).items():
            value = values.get(name, default)
            label = name.replace("_", " ")
            if isinstance(default, (int, np.integer)) and not isinstance(default, bool):
                w = Slider(label=label, value=int(value), min=int(low), max=int(high), step=1)
            else:
                step = float(high - low) / 100 if high > low else 0.01
                w = FloatSlider(label=label, value=float(value), min=float(low), max=float(high), step=step)
            w.tooltip = f"{method} post-processing parameter {name!r} (default {default})"
            w.changed.connect(lambda v, name=name, method=method: self._on_param(method, name, v))
            self.insert(at, w)
            at += 1
            self._param_widgets[name] = w

    def params(self) -> dict:
        """The post-processing parameters as the sliders show them."""
        return {name: w.value for name, w in self._param_widgets.items()}

    def _on_param(self, method: str, name: str, value) -> None:
        self._param_values.setdefault(method, {})[name] = value
        if method == self.method.value:
            self._timer.start()  # (re)start the debounce wait

    def _auto_run(self):
        if self._job is not None:
            self._dirty = True
            return
        self.run(auto=True)

    # ---- running -----------------------------------------------------------------------------------------------
    def _key(self, layer) -> tuple:
        """What the network outputs depend on: the image (layer and data), method, checkpoint, device and TTA (its
        mode, and for modality TTA the reference layers and their data)."""
        ckpt = self.checkpoint.value
        mtime = None
        if ckpt is not None:
            try:
                mtime = Path(ckpt).stat().st_mtime_ns
            except OSError:
                pass
        data = layer.data
        tta = self.tta.value
        refs = tuple((lyr, id(lyr.data)) for lyr in self.tta_refs.value) if tta in _MODALITY else ()
        return (layer, id(data), tuple(np.shape(data)), str(getattr(data, "dtype", "")), self.method.value,
                None if ckpt is None else str(ckpt), mtime, self.device.value, tta, refs)

    def run(self, auto: bool = False) -> None:
        """Segment the chosen image in a worker; the labels arrive in a layer when it is done.

        ``auto`` (a parameter change) only re-runs what is cheap: post-processing of cached maps, or a classical
        segmenter whose shown result came from the current settings.
        """
        if self._job is not None:  # one worker at a time: apply the latest parameters when this one ends
            self._dirty = True
            return
        layer, method = self.image_combo.value, self.method.value
        if layer is None or method is None:
            self.status.value = "Choose an Image layer (an H&E tile) and a method."
            return
        if getattr(layer, "multiscale", False):
            self.status.value = "Multiscale images are not supported: give a single-resolution tile."
            return
        try:
            seg = self._segmenter(method, strict=True)
        except ValueError as exc:
            self.status.value = f"Cannot segment: {exc}"
            return
        key = self._key(layer)
        params = self.params()
        split = _has_split(seg)
        maps = self._cache[1] if split and self._cache is not None and self._cache[0] == key else None
        if auto and maps is None:
            rerun = not split and not getattr(seg, "needs_checkpoint", False) and self._last_key == key
            if not rerun:
                why = "no cached network outputs for these settings" if split else f"{method} runs a model"
                self.status.value = f"Press Segment to apply the parameters ({why})."
                return
        checkpoint, device, tta = self.checkpoint.value, self.device.value, self.tta.value
        if tta in _MODALITY and maps is None and method not in modality_tta_methods():
            dense = " or ".join(modality_tta_methods()) or "a method with dense maps"
            self.status.value = (f"Cannot segment: modality test-time augmentation averages dense network maps and "
                                 f"{method} has none; choose {dense}, or flips or off.")
            return
        refs = None  # the modality TTA's reference tiles
        if tta in _MODALITY and maps is None:
            refs = [np.array(lyr.data, copy=True) for lyr in self.tta_refs.value] or None
            if refs is None and tta == "modality":
                self.status.value = ("Cannot segment: modality test-time augmentation restains the image to the "
                                     "stain modalities of reference tiles: choose at least one in TTA references.")
                return
        image = None if maps is not None else np.array(layer.data, copy=True)

        job = _Job(layer, method, key, post_only=maps is not None)
        progress = self._progress(job, lambda msg: f"Segmenting {layer.name} ({method}): {msg}")

        def should_stop() -> bool:
            return job.cancelled

        def work():
            try:
                if maps is not None:
                    return seg.postprocess(maps, **params), None
                if split:
                    if tta in _MODALITY:  # the mean maps over restained copies (napari_nucsynth.segment)
                        m = predict_maps(image, method=method, checkpoint=checkpoint, device=device, tta=tta,
                                         tta_references=refs, progress=progress, should_stop=should_stop)
                    else:
                        m = seg.predict_maps(image, checkpoint=checkpoint, device=device, tta=tta,
                                             progress=progress, should_stop=should_stop)
                    m = np.asarray(m)
                    m.flags.writeable = False  # shared by later post-processing runs: nothing may edit it
                    if job.cancelled:
                        raise Cancelled
                    return seg.postprocess(m, **params), m
                return seg(image, checkpoint=checkpoint, device=device, tta=tta, progress=progress,
                           should_stop=should_stop, **params), None
            finally:
                if maps is None:
                    release_gpu_memory()

        self._start(job, work, lambda out: self._on_result(job, *out),
                    f"Post-processing {layer.name} ({method})..." if job.post_only
                    else f"Segmenting {layer.name} with {method}...")

    def _on_closed(self, _=None):
        """The widget left the viewer (its dock closed) or was destroyed: stop working, free the cached maps."""
        self._cancel_on_close()
        self._cache = None

    # ---- output ------------------------------------------------------------------------------------------------
    def _on_result(self, job: _Job, labels, maps) -> None:
        layer = job.layer
        labels = np.asarray(labels)
        shape = tuple(np.shape(layer.data))
        if labels.ndim != 2 or labels.shape != shape[:2]:
            self.status.value = (f"Segmentation failed: {job.method} returned labels of shape {labels.shape} for "
                                 f"an image of shape {shape}.")
            return
        labels = labels.astype(np.uint32, copy=False)
        if maps is not None:
            self._cache = (job.key, maps)
        if not job.post_only:
            self._last_key = job.key
        self.result = labels
        out = self._output_layer(layer, job.method, labels)
        secs = time.perf_counter() - job.started
        n = len(np.unique(labels)) - (1 if labels.size and labels.min() == 0 else 0)
        self.progress.value = self.progress.max
        how = "post-processed cached network outputs" if job.post_only else "segmented"
        self.status.value = f"'{out.name}': {n} nuclei ({how} in {secs:.2f} s).{self._none_found(job, n)}"

    def _none_found(self, job: _Job, n: int) -> str:
        """A hint when a model found no nucleus: a model trained for a few steps, or for other images, does that."""
        seg = self._segmenter(job.method)
        if n or not getattr(seg, "needs_checkpoint", False):
            return ""
        ckpt = job.key[5]
        which = f"The checkpoint {Path(ckpt).name}" if ckpt else f"The {job.method} model"
        return (f" {which} found no nucleus: it may be undertrained (a run of a few steps finds nothing) or made "
                "for other images. Try another checkpoint or lower thresholds, or train it longer.")

    def _output_layer(self, image_layer, method: str, labels: np.ndarray):
        from napari.layers import Labels

        name = output_name(SEGMENTATION, f"{image_layer.name} ({method})")
        mine = self._outputs.setdefault(image_layer, {})
        layer = mine.get(method)
        if layer is None or layer not in self.viewer.layers:
            layer = next((lyr for lyr in self.viewer.layers if isinstance(lyr, Labels) and lyr.name == name
                          and lyr.metadata.get(_MARK) == image_layer.name), None)
        scale, translate = np.asarray(image_layer.scale)[-2:], np.asarray(image_layer.translate)[-2:]
        if layer is not None:
            layer.data = labels
            layer.scale, layer.translate = scale, translate
            if layer.name != name:  # the image was renamed
                layer.name = name
                layer.metadata[_MARK] = image_layer.name
        else:
            layer = self.viewer.add_labels(labels, name=name, scale=scale, translate=translate,
                                           metadata={_MARK: image_layer.name, "method": method})
        mine[method] = layer
        return layer
