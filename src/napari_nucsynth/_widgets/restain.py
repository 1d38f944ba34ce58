"""The Restain widget: an Image layer in the stain modality of a reference Image layer, as a new Image layer.

Thin by design: the computation is :func:`napari_nucsynth.stain.transfer` (Reinhard, Macenko, or the learned
``drit`` model of Liu, Wagner & Peng's multi-modality transfer; see docs/stain_transfer.md); this module copies the
two layers' data on the UI thread, runs the transfer in a worker with progress and cancellation
(:class:`~napari_nucsynth._widgets._worker.WorkerWidget`, as the Render and Segment widgets do) and puts the result
into an RGB Image layer.

``drit`` is listed only when a model exists for it: the shipped one
(:func:`napari_nucsynth.stain.shipped_drit_checkpoint`), one saved in
:func:`napari_nucsynth.models.checkpoint_dir`, or a file picked with *drit checkpoint file* (picking one lists
``drit`` and chooses it). The classical methods need no model.
"""

from __future__ import annotations

import time

import napari
import numpy as np
from magicgui.widgets import ComboBox, FloatSlider, ProgressBar, PushButton
from qtpy.QtCore import QTimer

from ..devices import available_devices
from ..stain import shipped_drit_checkpoint, transfer
from ._checkpoints import CheckpointPicker
from ._dock import wrapping_label
from ._worker import CloseWatcher, Job, WorkerWidget, release_gpu_memory

__all__ = ["RestainWidget"]

#: The methods that need no model, in the order the list shows them (Macenko first: it keeps the nuclei's
#: haematoxylin, see docs/stain_transfer.md's benchmark).
CLASSIC = ("macenko", "reinhard")
#: metadata key that marks the widget's output layers (the name of the restained image layer)
MARK = "nucsynth_restain_of"
PREFIX = "restained: "


class _Job(Job):
    """One transfer in flight."""

    def __init__(self, layer, reference_name: str, method: str):
        super().__init__(layer)
        self.reference_name = reference_name
        self.method = method


class RestainWidget(WorkerWidget):
    """Restain an Image layer to the stain modality of another (the *Reference*).

    The result goes into a new RGB Image layer ``"restained: <image> (<method> to <reference>)"`` with the image
    layer's scale and translate, just above it; restaining the same image to the same reference by the same method
    again replaces that layer's data (a new layer is added if the user deleted it). The Restain button turns into
    Cancel while a transfer runs; closing the widget, or removing the image or the reference, cancels too.
    """

    run_text, action, failure = "Restain", "restain", "Restain"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self._init_jobs()
        self.result: np.ndarray | None = None  # the last restained image (for scripts and tests)

        self.image_combo = ComboBox(label="Image", choices=self._image_choices)
        self.reference_combo = ComboBox(label="Reference", choices=self._image_choices)
        self.reference_combo.tooltip = "The tile whose stain modality the image takes"
        # the picker is drit's alone: the only method here that runs a model
        self._ckpt = CheckpointPicker(lambda: ("drit", True), lambda msg: setattr(self.status, "value", msg),
                                      shipped=lambda _m: shipped_drit_checkpoint())
        self.checkpoint, self.browse = self._ckpt.combo, self._ckpt.browse
        self.checkpoint.label = "drit model"
        self.browse.label = "drit checkpoint file"
        self.browse.tooltip = "A trained drit checkpoint (.pt): lists the drit method and chooses it"
        self.method = ComboBox(label="Method", choices=self._method_choices, value="macenko")
        self.method.tooltip = ("macenko: Macenko's H and E stain vectors and concentration range; reinhard: CIELAB "
                               "mean and spread; drit: the learned content/style model (listed when a model exists)")
        self.strength = FloatSlider(label="Strength", value=1.0, min=0.0, max=1.0, step=0.05)
        self.strength.tooltip = ("drit: how far the style moves from the image's own modality (0) to the "
                                 "reference's (1); set to the model's own default when it is chosen (a long move, a "
                                 "dark tile to a pale one, can lose nuclei; docs/stain_transfer.md)")
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        self.restain_btn = self.run_button = PushButton(text=self.run_text)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = wrapping_label()
        self.extend([self.image_combo, self.reference_combo, self.method, self.checkpoint, self.browse,
                     self.strength, self.device, self.restain_btn, self.progress, self.status])

        self._timer = QTimer(self.native)  # (WorkerWidget's re-run timer; nothing here re-runs by itself)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.run)

        self.restain_btn.changed.connect(self._on_button)
        self.method.changed.connect(self._on_method)
        self.checkpoint.changed.connect(self._sync_strength)
        self.browse.changed.connect(self._on_browsed)  # after the picker's own handler has taken the file
        viewer.layers.events.inserted.connect(self._reset)
        viewer.layers.events.removed.connect(self._reset)
        self.native.destroyed.connect(self._on_closed)
        self._close_watcher = CloseWatcher(self.native, self._on_closed)
        self._reset()
        self._on_method()

    # ---- choices -----------------------------------------------------------------------------------------------
    def _image_choices(self, _=None):
        """Every Image layer, RGB ones first (H&E tiles)."""
        from napari.layers import Image

        imgs = [lyr for lyr in self.viewer.layers if isinstance(lyr, Image)]
        return [(lyr.name, lyr) for lyr in sorted(imgs, key=lambda lyr: not lyr.rgb)]

    def drit_available(self) -> bool:
        """Whether a drit model exists: shipped, saved in the models folder, or picked."""
        return self._ckpt.has_model("drit")

    def _method_choices(self, _=None):
        return [*CLASSIC, "drit"] if self.drit_available() else list(CLASSIC)

    def reset_choices(self, *args) -> None:
        """napari's refresh of the dropdowns on layer changes: the method stays chosen (drit stays listed once it
        has a model)."""
        value = self.method.value
        with self.method.changed.blocked():
            super().reset_choices(*args)
            if value in self.method.choices:
                self.method.value = value
        self._show_checkpoint()

    def _reset(self, _=None):
        self.image_combo.reset_choices()
        self.reference_combo.reset_choices()
        choices = self.reference_combo.choices
        if len(choices) >= 2 and self.reference_combo.value is self.image_combo.value:  # another tile by default
            self.reference_combo.value = next(c for c in choices if c is not self.image_combo.value)
        job = self._job
        if job is not None and not job.cancelled and job.layer not in self.viewer.layers:
            self.cancel(f"'{job.layer.name}' was removed: its restaining was cancelled.")

    def _show_checkpoint(self) -> None:
        """The drit model list shows only for drit; the file picker always (picking a model lists drit)."""
        drit = self.method.value == "drit"
        self.checkpoint.visible = drit
        self.strength.visible = drit
        if drit:
            self._ckpt.refresh()
            if self.checkpoint.value is None and not shipped_drit_checkpoint().is_file():
                saved = [c for c in self.checkpoint.choices if c is not None]  # "(default)" would not run
                if saved:
                    self.checkpoint.value = saved[0]

    def _sync_strength(self, _=None) -> None:
        """Set the Strength slider to the chosen drit model's own default (1 for models without one)."""
        if self.method.value != "drit":
            return
        path = self.checkpoint.value if self.checkpoint.value is not None else shipped_drit_checkpoint()
        try:
            from ..models import load_checkpoint

            value = float(load_checkpoint(path, kind="drit")["config"].get("strength", 1.0))
        except (ValueError, OSError):  # no model yet: running says so
            return
        self.strength.value = value

    def _on_method(self, _=None) -> None:
        self._show_checkpoint()
        self._sync_strength()
        if self._job is None:
            self.status.value = ""

    def _on_browsed(self, _=None) -> None:
        if self._ckpt._browsed.get("drit"):
            chosen = self.checkpoint.value
            self.method.reset_choices()
            self.method.value = "drit"
            if chosen is not None:
                self.checkpoint.value = chosen

    # ---- running -----------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Restain the chosen image to the reference's modality in a worker; the result arrives in a layer."""
        if self._job is not None:
            return
        layer, ref, method = self.image_combo.value, self.reference_combo.value, self.method.value
        if layer is None or ref is None or method is None:
            self.status.value = "Choose an Image layer to restain and a reference Image layer (two H&E tiles)."
            return
        if getattr(layer, "multiscale", False) or getattr(ref, "multiscale", False):
            self.status.value = "Multiscale images are not supported: give single-resolution tiles."
            return
        image, reference = np.array(layer.data, copy=True), np.array(ref.data, copy=True)
        checkpoint = self.checkpoint.value if method == "drit" else None
        if method == "drit" and checkpoint is None and not shipped_drit_checkpoint().is_file():
            checkpoint = next((c for c in self.checkpoint.choices if c is not None), None)
        device = self.device.value
        extra = {"strength": float(self.strength.value)} if method == "drit" else {}
        job = _Job(layer, ref.name, method)
        progress = self._progress(job, lambda msg: f"Restaining {layer.name} ({method}): {msg}")

        def work():
            try:
                return transfer(image, reference, method=method, checkpoint=checkpoint, device=device,
                                progress=progress, should_stop=lambda: job.cancelled, **extra)
            finally:
                release_gpu_memory()

        self._start(job, work, lambda out: self._on_result(job, out),
                    f"Restaining {layer.name} to {ref.name} with {method}...")

    def _on_closed(self, _=None):
        self._cancel_on_close()

    # ---- output ------------------------------------------------------------------------------------------------
    def _on_result(self, job: _Job, out: np.ndarray) -> None:
        from napari.layers import Image

        layer = job.layer
        self.result = out
        name = f"{PREFIX}{layer.name} ({job.method} to {job.reference_name})"
        scale, translate = np.asarray(layer.scale)[-2:], np.asarray(layer.translate)[-2:]
        existing = next((lyr for lyr in self.viewer.layers if isinstance(lyr, Image) and lyr.name == name
                         and lyr.metadata.get(MARK) == layer.name), None)
        if existing is not None:
            existing.data = out
            existing.scale, existing.translate = scale, translate
        else:
            meta = {MARK: layer.name, "reference": job.reference_name, "method": job.method}
            added = self.viewer.add_image(out, name=name, rgb=True, scale=scale, translate=translate, metadata=meta)
            if layer in self.viewer.layers:  # just above the image it restains
                src, dst = self.viewer.layers.index(added), self.viewer.layers.index(layer) + 1
                if src != dst:
                    self.viewer.layers.move(src, dst)
        self.progress.value = self.progress.max
        secs = time.perf_counter() - job.started
        self.status.value = f"'{name}': {out.shape[0]} x {out.shape[1]} ({job.method}, {secs:.2f} s)."

