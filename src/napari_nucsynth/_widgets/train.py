"""The Train widget: train any registered model (or Gong et al.'s joint loop) from inside napari.

Thin by design: the computation is :func:`napari_nucsynth.train.train` (kinds listed from
:func:`napari_nucsynth.models.model_kinds`, devices from :func:`napari_nucsynth.devices.available_devices`) and,
when it is installed, :func:`napari_nucsynth.train.joint.train_joint`. This module copies the chosen layers on
the UI thread, runs the training loop in a worker, and shows what the loop reports.

Threading: the training thread only appends the loop's :class:`~napari_nucsynth.train.TrainUpdate` events to a
deque (cheap, lock-free, no Qt call); a QTimer on the UI thread drains it every :data:`DRAIN_MS` and updates the
loss plot, progress bar and preview layer, so a fast loop never floods the event loop and the UI is redrawn at
most twice a second (the live figures go into the progress bar's text, whose repaint changes no geometry; the
status line changes on events: start, checkpoint, pause, end, and every :data:`STATUS_EVERY_S` with the steps per
second and the time left). Pause blocks the training thread inside
``should_stop`` on a ``threading.Event``; Stop (also while paused, and when the widget is closed) makes
``should_stop`` return True, and the loop saves its checkpoint before it returns.
"""

from __future__ import annotations

import collections
import datetime as _dt
import importlib.util
import json
import threading
import time
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)
from qtpy.QtCore import QTimer

from ..devices import available_devices
from ..generate import synthetic_pairs
from ..models import checkpoint_dir, get_model, model_kinds
from ..render import renderers
from ..train import AUGMENTATIONS
from ._checkpoints import CheckpointPicker
from ._dock import wrapping_label
from ._lossplot import LossPlot
from ._outputs import ERRORS, GALLERY, PREVIEW, RENDER, output_kind
from ._worker import CloseWatcher, error_message, release_gpu_memory, start_worker

JOINT = "joint"
#: Milliseconds between two drains of the training thread's events: the UI (plot, progress) is updated twice a
#: second. Every repaint in a window holding napari's OpenGL canvas composites the whole window; under software
#: OpenGL (Mesa llvmpipe: Xvfb, remote desktops, VMs) that costs CPU the training thread needs: with 10 updates a
#: second the widget trained at 0.82 of the main thread's speed on a busy 2-core machine, with 2 at 0.92
#: (benchmarks/bench_training.py).
DRAIN_MS = 500
#: Seconds between two rewrites of the status line's estimate (steps/s, time left) during a run: a label whose
#: text changes re-lays out the dock (see DRAIN_MS); the progress bar's text follows every drain.
STATUS_EVERY_S = 10.0
SOURCES = ("layers", "folder", "synthetic")
_MARK = PREVIEW  # metadata key of the preview layer
_NOT_IMAGES = (PREVIEW, RENDER, GALLERY)  # Image layers of this plugin, never offered as training images
CUSTOM = "custom"
QUICK = "Quick (CPU, ~10 min)"
STANDARD = "Standard (1000 steps)"
#: The length of a run each preset sets (Steps, Crop, Batch size, Validate every, Save every). A HoVer-Net step of
#: 256-px crops in batches of 4 runs at 0.1-0.6 steps/s on a CPU, so the standard 1,000 steps take 30 min to 2.5 h
#: there; Quick's 300 steps of 128-px crops are a quarter of the pixels a step: about 10 min at the slow end (4.4 min
#: at 1.15 steps/s on the busy 2-core development machine, where that model found 130 nuclei of the sample's 121,
#: AJI 0.68 on the tile it trained on). Choosing a preset sets the fields; editing one of them makes it "custom".
PRESETS = {
    QUICK: {"steps": 300, "crop": 128, "batch": 4, "eval_every": 100, "save_every": 100},
    STANDARD: {"steps": 1000, "crop": 256, "batch": 4, "eval_every": 500, "save_every": 200},
}
_NEW = "(new run)"
_NEW_WEIGHTS = "(new weights)"


def joint_available() -> bool:
    """Whether the joint generator-discriminator-segmenter loop (``napari_nucsynth.train.joint``) is installed."""
    try:
        return importlib.util.find_spec("napari_nucsynth.train.joint") is not None
    except (ImportError, ValueError):
        return False


def _joint_kinds() -> tuple[list[str], list[str]]:
    """The generator and segmenter kinds the joint loop can train (not every registered kind); empty when the
    loop is not installed."""
    if not joint_available():
        return [], []
    try:
        from ..train.joint import GENERATORS, SEGMENTERS
    except ImportError:
        return [], []
    kinds = model_kinds()
    return [k for k in GENERATORS if k in kinds], [k for k in SEGMENTERS if k in kinds]


def _is_generator(kind: str) -> bool:
    """Generators are the kinds with a preview hook (they render images); the others segment."""
    try:
        return get_model(kind).preview is not None
    except ValueError:
        return False


def _is_unpaired(kind: str) -> bool:
    """Kinds that train on images alone (their masks come from the mask sampler)."""
    try:
        return kind != JOINT and bool(getattr(get_model(kind), "unpaired", False))
    except ValueError:
        return False


def default_out(kind: str) -> Path:
    """``checkpoint_dir()/<kind>-<timestamp>.pt``."""
    return checkpoint_dir() / f"{kind}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.pt"


class _Job:
    """One training run. ``events`` is filled by the training thread and drained by the UI thread; ``running``
    is cleared while paused; ``stop`` is what ``should_stop`` returns."""

    def __init__(self, kind: str, out: Path, steps: int):
        self.kind, self.out, self.steps = kind, out, steps
        self.events: collections.deque = collections.deque()
        self.running = threading.Event()
        self.running.set()
        self.stop = False
        self.reason = ""
        self.started = time.perf_counter()
        self.step = 0
        self.checkpoint: str | None = None  # the last checkpoint written
        self.saved_step = 0  # its step
        self.rate_window: collections.deque = collections.deque(maxlen=50)  # (time, step) of recent steps
        self.status_at: float | None = None  # when the status line last showed the estimate

    def should_stop(self) -> bool:
        """Blocks while paused (waking every 0.1 s to honour Stop); True once stopped."""
        while not self.running.wait(0.1):
            if self.stop:
                break
        return self.stop

    def on_update(self, update) -> None:
        self.events.append((time.perf_counter(), update))

    def rate(self) -> float | None:
        w = self.rate_window
        if len(w) < 2 or w[-1][0] <= w[0][0]:
            return None
        return (w[-1][1] - w[0][1]) / (w[-1][0] - w[0][0])


def _fmt_secs(s: float) -> str:
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fmt_span(s: float) -> str:
    """A duration in words, rounded as an estimate is: "40 s", "12 min", "2.5 h"."""
    if s < 90:
        return f"{max(round(s), 1)} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    return f"{s / 3600:.1f} h"


class TrainWidget(Container):
    """Train a registered model on image + labels pairs in a background thread, watch it learn, stop it without
    losing anything, and use the result at once.

    Data: pairs of an Image and a Labels layer of the same height and width (one or more), two folders (images
    and labels, files matched by name), or *synthetic* pairs generated in the worker when training starts
    (random layouts, sampled masks, the classic renderer in the style of the chosen Image layers). Kinds that
    train unpaired (``ModelSpec.unpaired``: points2image) take images alone: Image layers, or a folder of images
    (no Labels layer, no labels folder).

    The checkpoint goes to *Save to* (blank: ``checkpoint_dir()/<kind>-<timestamp>.pt``; when resuming, blank
    continues in the resumed file). *Resume from* continues a run where it stopped (model, optimiser, step and
    random state). A saved model is listed at once by the Render and Segment widgets (they read
    :func:`~napari_nucsynth.models.checkpoint_dir`; the docked ones are refreshed when a run ends).
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self._job: _Job | None = None
        self._worker = None
        self._last_run: Path | None = None
        self._last_kind: str | None = None
        self._preview_layer = None
        self.result = None  # the last TrainResult (for scripts and tests)

        kinds = self._kinds()
        self.model = ComboBox(label="Model", choices=kinds, value="hovernet" if "hovernet" in kinds else kinds[0])
        self.model.tooltip = "What to train: a segmenter, a generator, or (joint) both adversarially"
        gens, segs = _joint_kinds()
        self.generator = ComboBox(label="Generator", choices=gens or [None])
        self.segmenter = ComboBox(label="Segmenter", choices=segs or [None])
        self.adversarial = ComboBox(label="Adversarial", choices=["reverse", "acgan"], value="reverse")
        self.config = LineEdit(label="Config (JSON)", value="")
        self.config.tooltip = ('Model settings over the defaults, e.g. {"width": 8}; blank: the defaults. Ignored '
                               "when resuming (the checkpoint's are used).")

        self.source = ComboBox(label="Data", choices=list(SOURCES), value="layers")
        self.pairs = Select(label="Pairs", choices=self._pair_choices, allow_multiple=True)
        self.pairs.tooltip = "Image + Labels layers of the same height and width (select one or more)"
        self.pairs.native.setMaximumHeight(90)
        self.images = Select(label="Images", choices=self._image_choices, allow_multiple=True)
        self.images.tooltip = "H&E Image layers to learn from, without labels (for models that train unpaired)"
        self.images.native.setMaximumHeight(90)
        self.images_dir = FileEdit(label="Images folder", mode="d")
        self.labels_dir = FileEdit(label="Labels folder", mode="d")
        self.styles = Select(label="Styles", choices=self._image_choices, allow_multiple=True)
        self.styles.tooltip = "H&E Image layers whose style the synthetic pairs take (in turn)"
        self.styles.native.setMaximumHeight(90)
        self.fit_to = ComboBox(label="Fit layout to", choices=self._fit_choices)
        self.fit_to.tooltip = "A Labels layer to fit the layout and nucleus shapes to (default: MoNuSeg's fit)"
        self.process = ComboBox(label="Layout", choices=["cluster", "hardcore", "poisson"], value="cluster")
        self.n_synth = SpinBox(label="Synthetic pairs", value=16, min=1, max=10000)
        self.synth_size = SpinBox(label="Pair size", value=256, min=32, max=4096, step=32)
        self.mix = SpinBox(label="Mix in synthetic", value=0, min=0, max=10000)
        self.mix.tooltip = ("Segmenters: add this many synthetic pairs made from the training pairs alone (their "
                            "layouts, nucleus shapes and styles), the headline's recipe B; as many as the real "
                            "pairs trains on half real, half synthetic crops (on MoNuSeg that cost 0.02 AJI; a "
                            "third as many, one crop in four, was level with real pairs alone: docs/headline.md). "
                            "0: real pairs only.")
        self.mix_renderer = ComboBox(label="Mix renderer", choices=renderers(), value="classic")
        self.mix_renderer.tooltip = ("The renderer of the mixed-in synthetic pairs (learned ones use their shipped "
                                     "model)")

        self.preset = ComboBox(label="Preset", choices=[CUSTOM, *PRESETS], value=STANDARD)
        self.preset.tooltip = (f"{QUICK}: 300 steps of 128-px crops, a first model in minutes on a CPU. {STANDARD}: "
                               "1000 steps of 256-px crops, 30 min to 2.5 h on a CPU, minutes on a GPU. Editing "
                               "the fields it sets makes it 'custom'.")
        self.steps = SpinBox(label="Steps", value=1000, min=1, max=10_000_000)
        self.batch = SpinBox(label="Batch size", value=4, min=1, max=1024)
        self.lr = LineEdit(label="Learning rate", value="")
        self.lr.tooltip = "Peak learning rate (warm-up, then cosine decay); blank: the model's default"
        self.crop = SpinBox(label="Crop", value=256, min=16, max=4096, step=16)
        self.augment = ComboBox(label="Augmentation", choices=list(AUGMENTATIONS), value="basic")
        self.augment.tooltip = ("basic: crops, flips, 90-degree rotations, stain jitter; strong: also HoVer-Net's "
                                "scale, blur and colour jitter; modality: basic, with half the crops restained to "
                                "another training image's stain modality (Macenko); modality-drit: the same by "
                                "the shipped drit model (about 0.1 s a crop). A resumed run keeps its own.")
        self.device = ComboBox(label="Device", choices=available_devices(), value="auto")
        self.seed = SpinBox(label="Seed", value=0, min=0, max=2**31 - 1)
        self.val_fraction = FloatSpinBox(label="Validation share", value=0.2, min=0.0, max=0.9, step=0.05)
        self.eval_every = SpinBox(label="Validate every", value=500, min=1, max=10_000_000)
        self.save_every = SpinBox(label="Save every", value=200, min=1, max=10_000_000)
        self.preview_every = SpinBox(label="Preview every", value=50, min=0, max=10_000_000)
        self.preview_every.tooltip = "Generators: re-render the preview layer every this many steps (0: never)"

        self.out = FileEdit(label="Save to", mode="w", filter="*.pt")
        self.out.tooltip = f"Blank: {checkpoint_dir()}/<model>-<time>.pt (or the resumed file when resuming)"
        self._resume = CheckpointPicker(self._resume_needs, lambda msg: setattr(self.status, "value", msg))
        self.resume, self.resume_file = self._resume.combo, self._resume.browse
        self.resume.label, self.resume_file.label = "Resume from", "Resume file"
        self.resume.choices = self._resume_choices  # "(new run)", the last run, saved ones, picked files
        self.init = ComboBox(label="Start from", choices=self._init_choices)
        self.init.tooltip = ("New weights, the model that ships with the plugin, or a saved checkpoint's weights "
                             "(fine-tuning: its configuration, a new optimiser and schedule). Ignored when resuming.")

        self.start_btn = PushButton(text="Start")
        self.pause_btn = PushButton(text="Pause", enabled=False)
        buttons = Container(widgets=[self.start_btn, self.pause_btn], layout="horizontal", labels=False)
        buttons.margins = (0, 0, 0, 0)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = wrapping_label()
        self.metrics = wrapping_label()
        self.extend([self.model, self.generator, self.segmenter, self.adversarial, self.config, self.source,
                     self.pairs, self.images, self.images_dir, self.labels_dir, self.styles, self.fit_to, self.process,
                     self.n_synth, self.synth_size, self.mix, self.mix_renderer, self.preset, self.steps, self.batch,
                     self.lr, self.crop,
                     self.augment, self.device, self.seed, self.val_fraction, self.eval_every, self.save_every,
                     self.preview_every, self.init,
                     self.out, self.resume, self.resume_file, buttons, self.progress, self.status, self.metrics])
        self.plot = LossPlot(interval_ms=None)  # repainted by the drain, in the same tick as the labels
        self.native.layout().addWidget(self.plot)

        self._drain_timer = QTimer(self.native)
        self._drain_timer.setInterval(DRAIN_MS)
        self._drain_timer.timeout.connect(self._drain)

        self.start_btn.changed.connect(self._on_start_stop)
        self.pause_btn.changed.connect(self._on_pause)
        self.model.changed.connect(self._on_model)
        self.source.changed.connect(self._on_source)
        self.mix.changed.connect(self._on_source)
        self._applying_preset = False
        self._cost_hint = ""
        self.preset.changed.connect(self._on_preset)
        for name in PRESETS[STANDARD]:
            getattr(self, name).changed.connect(self._on_length)
        self.device.changed.connect(self._on_length)
        viewer.layers.events.inserted.connect(self._reset)
        viewer.layers.events.removed.connect(self._reset)
        self.native.destroyed.connect(self._on_closed)
        self._close_watcher = CloseWatcher(self.native, self._on_closed)
        self._on_model()
        self._on_source()
        self._reset()
        self._show_cost()

    # ---- choices -----------------------------------------------------------------------------------------------
    @staticmethod
    def _kinds() -> list[str]:
        return model_kinds() + ([JOINT] if joint_available() else [])

    def _image_layers(self):
        from napari.layers import Image

        imgs = [lyr for lyr in self.viewer.layers if isinstance(lyr, Image) and output_kind(lyr) not in _NOT_IMAGES]
        return sorted(imgs, key=lambda lyr: not lyr.rgb)  # RGB (H&E) first

    def _labels_layers(self):
        """Every Labels layer but the Evaluate widget's error overlays (they hold TP/FP/FN classes, not nuclei)."""
        from napari.layers import Labels

        return [lyr for lyr in self.viewer.layers if isinstance(lyr, Labels) and output_kind(lyr) != ERRORS]

    def _image_choices(self, _=None):
        return [(lyr.name, lyr) for lyr in self._image_layers()]

    def _fit_choices(self, _=None):
        return [("(MoNuSeg default)", None)] + [(lyr.name, lyr) for lyr in self._labels_layers()]

    @staticmethod
    def _hw(layer) -> tuple:
        shape = tuple(np.shape(layer.data))
        return shape[:2] if getattr(layer, "rgb", False) else shape[-2:]

    def _pair_choices(self, _=None):
        """Every (Image, Labels) combination of the same height and width."""
        out = []
        for lab in self._labels_layers():
            for img in self._image_layers():
                if self._hw(img) == tuple(np.shape(lab.data)):
                    out.append((f"{img.name} + {lab.name}", (img, lab)))
        return out

    def _init_choices(self, _=None):
        kind = self.model.value
        out: list = [(_NEW_WEIGHTS, None)]
        if kind is None or kind == JOINT:
            return out
        from ..train import shipped_checkpoint

        try:
            shipped = shipped_checkpoint(kind)
        except Exception:  # noqa: BLE001 - a broken registry entry must not break the dropdown
            shipped = None
        if shipped is not None:
            out.append((f"shipped model ({shipped.name})", shipped))
        out += [(p.name, p) for p in self._resume.saved(kind)]
        return out

    def _resume_needs(self):
        return self.model.value, True

    def _resume_choices(self, _=None):
        kind = self.model.value
        out: list = [(_NEW, None)]
        if kind is None:
            return out
        saved = self._resume.saved(kind)
        last = self._last_run if self._last_run is not None and self._last_run.is_file() else None
        if last is not None and kind == self._last_kind:
            out.append((f"last run: {last.name}", last))
        out += [(p.name, p) for p in saved if p != last]
        out += [(str(p), p) for p in self._resume._browsed.get(kind, []) if p not in saved and p != last]
        return out

    def _reset(self, _=None):
        """Refresh the layer dropdowns (a choice that still exists stays chosen); default pairs: each Labels layer
        of the user's own (not a segmentation, masks sampled from clicks or an error overlay made by a widget) with
        the first RGB Image layer of its size."""
        for w in (self.pairs, self.images, self.styles, self.fit_to):
            w.reset_choices()
        if not self.pairs.value and self.pairs.choices:
            seen, default = set(), []
            for img, lab in self.pairs.choices:
                if lab not in seen and output_kind(lab) is None:
                    seen.add(lab)
                    default.append((img, lab))
            self.pairs.value = default
        if not self.styles.value and self.styles.choices:
            self.styles.value = [self.styles.choices[0]]
        if not self.images.value and self.images.choices:  # every RGB layer (H&E tiles) of the user's
            self.images.value = [lyr for lyr in self.images.choices if getattr(lyr, "rgb", False)] or [
                self.images.choices[0]]
        self._resume.refresh()
        self.init.reset_choices()

    def _on_model(self, _=None):
        joint = self.model.value == JOINT
        for w in (self.generator, self.segmenter, self.adversarial):
            w.visible = joint
        for w in (self.config, self.val_fraction, self.eval_every, self.init, self.augment):
            w.visible = not joint
        self._resume.refresh()
        self.init.reset_choices()
        self._on_source()

    def _on_preset(self, _=None):
        values = PRESETS.get(self.preset.value)
        if values is None:
            return
        self._applying_preset = True
        try:
            for name, value in values.items():
                getattr(self, name).value = value
        finally:
            self._applying_preset = False
        self._show_cost()

    def _on_length(self, _=None):
        """Steps, crop, batch or device changed: a field set by hand makes the preset 'custom'."""
        if not self._applying_preset:
            values = PRESETS.get(self.preset.value)
            if values is not None and any(getattr(self, k).value != v for k, v in values.items()):
                self.preset.value = CUSTOM
            self._show_cost()

    def _show_cost(self) -> None:
        """Before Start: say what a run of this length costs on a CPU, and that the time left is measured."""
        if self._job is not None:
            return
        try:
            from ..devices import resolve_device

            cpu = resolve_device(self.device.value).type == "cpu"
        except Exception:  # noqa: BLE001 - an unusable device choice is the run's error to report, not this hint's
            cpu = False
        steps, crop, batch = int(self.steps.value), int(self.crop.value), int(self.batch.value)
        # the reference: a HoVer-Net step of 256-px crops in batches of 4 runs at 0.1-0.6 steps/s on a CPU
        secs = steps * batch * crop * crop / (4 * 256 * 256) / np.array([0.6, 0.1])
        hint = "" if not cpu or secs[1] < 15 * 60 else (
            f"On the CPU, {steps} steps of {crop}-px crops (batch {batch}) take about {_fmt_span(secs[0])} to "
            f"{_fmt_span(secs[1])} for a HoVer-Net; the time left is shown once the first steps are measured. "
            f"{QUICK} makes a first model in minutes.")
        if hint or self.status.value == self._cost_hint:  # (a hint that no longer applies goes; other news stays)
            self._set_status(hint)
        self._cost_hint = hint

    def _on_source(self, _=None):
        src = self.source.value
        unpaired = _is_unpaired(self.model.value)
        self.pairs.visible = src == "layers" and not unpaired
        self.images.visible = src == "layers" and unpaired
        self.images_dir.visible = src == "folder"
        self.labels_dir.visible = src == "folder" and not unpaired
        for w in (self.styles, self.fit_to, self.process, self.n_synth, self.synth_size):
            w.visible = src == "synthetic"
        self.mix.visible = self._mixable()
        self.mix_renderer.visible = self._mixable() and int(self.mix.value) > 0

    def _mixable(self) -> bool:
        """*Mix in synthetic* applies: a segmenter trained on real pairs (layers or folders)."""
        kind = self.model.value
        return self.source.value != "synthetic" and kind != JOINT and not _is_generator(kind)

    # ---- running -----------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._job is not None

    @property
    def paused(self) -> bool:
        return self._job is not None and not self._job.running.is_set()

    def _on_start_stop(self, _=None):
        if self._job is not None:
            self.stop()
        else:
            self.start()

    def _on_pause(self, _=None):
        if self.paused:
            self.resume_training()
        else:
            self.pause()

    def _collect(self) -> dict | str:
        """Everything the worker needs, copied on the UI thread; a string says what is wrong."""
        kind = self.model.value
        if kind is None:
            return "Choose a model to train."
        kw: dict = {"kind": kind}
        lr = self.lr.value.strip()
        try:
            kw["lr"] = float(lr) if lr else None
        except ValueError:
            return f"Learning rate must be a number (or blank for the model's default), got {lr!r}."
        if kw["lr"] is not None and not kw["lr"] > 0:
            return f"Learning rate must be positive, got {lr!r}."
        cfg = self.config.value.strip()
        try:
            kw["config"] = json.loads(cfg) if cfg and kind != JOINT else None
        except json.JSONDecodeError as exc:
            return f'Config must be a JSON object such as {{"width": 8}}: {exc}.'
        if kw["config"] is not None and not isinstance(kw["config"], dict):
            return 'Config must be a JSON object such as {"width": 8}.'
        if kind == JOINT and (self.generator.value is None or self.segmenter.value is None):
            return "The joint loop needs a generator and a segmenter."
        src = self.source.value
        kw["source"] = src
        if _is_unpaired(kind):
            problem = self._unpaired_data(kw, src)
            if problem:
                return problem
        elif src == "layers":
            pairs = list(self.pairs.value or [])
            if not pairs:
                return "Choose one or more Image + Labels pairs (layers of the same height and width)."
            imgs, labs, names = [], [], []
            for img, lab in pairs:
                if getattr(img, "multiscale", False) or getattr(lab, "multiscale", False):
                    return f"'{img.name}' or '{lab.name}' is multiscale: give single-resolution tiles."
                a, b = np.array(img.data, copy=True), np.array(lab.data, copy=True)
                hw = a.shape[:2] if a.ndim == 3 else a.shape
                if hw != b.shape:
                    return (f"'{img.name}' is {hw[0]} x {hw[1]} but '{lab.name}' is "
                            f"{' x '.join(map(str, b.shape))}: a pair needs the same height and width.")
                imgs.append(a)
                labs.append(b)
                names.append(f"{img.name} + {lab.name}")
            kw.update(images=imgs, labels=labs, data={"source": "layers", "pairs": names})
        elif src == "folder":
            idir, ldir = self.images_dir.value, self.labels_dir.value
            for d, what in ((idir, "Images"), (ldir, "Labels")):
                if d is None or str(d) in ("", ".") or not Path(d).is_dir():
                    return f"{what} folder {'is not set' if d is None or str(d) in ('', '.') else f'{d} does not exist'}."
            kw.update(images=str(idir), labels=str(ldir),
                      data={"source": "folder", "images": str(idir), "labels": str(ldir)})
        else:
            layers = list(self.styles.value or [])
            if not layers:
                return "Choose one or more style Image layers (H&E tiles) for the synthetic pairs."
            fit = self.fit_to.value
            fit_labels = None if fit is None else np.array(fit.data, copy=True)
            styles, style_labels = [], []
            for lyr in layers:
                styles.append(np.array(lyr.data, copy=True))
                hw = self._hw(lyr)
                style_labels.append(fit_labels if fit_labels is not None and fit_labels.shape == hw else None)
            kw.update(synth={"n": int(self.n_synth.value), "size": int(self.synth_size.value), "styles": styles,
                             "style_labels": style_labels, "fit_labels": fit_labels,
                             "process": self.process.value, "seed": int(self.seed.value)},
                      data={"source": "synthetic", "n": int(self.n_synth.value), "size": int(self.synth_size.value),
                            "styles": [lyr.name for lyr in layers], "process": self.process.value,
                            "fit_to": None if fit is None else fit.name})
        if self._mixable() and int(self.mix.value) > 0:
            n = int(self.mix.value)
            kw["mix"] = {"n": n, "size": max(256, int(self.crop.value)), "renderer": self.mix_renderer.value}
            kw["data"]["mixed_synthetic"] = dict(kw["mix"])
        resume = self.resume.value
        out = self.out.value
        if out is None or str(out) in ("", "."):
            out = Path(resume) if resume is not None else default_out(kind)
        init = self.init.value if kind != JOINT and resume is None else None
        if init is not None:
            kw["data"]["init"] = str(init)
        kw.update(resume=resume, out=Path(out), init=init)
        return kw

    def _unpaired_data(self, kw: dict, src: str) -> str | None:
        """The data of a kind that trains on images alone, into ``kw``: Image layers or a folder of images (labels
        None); a string says what is wrong."""
        kind = kw["kind"]
        if src == "layers":
            layers = list(self.images.value or [])
            if not layers:
                return f"Choose one or more H&E Image layers: {kind} learns from images alone (no labels)."
            imgs = []
            for lyr in layers:
                if getattr(lyr, "multiscale", False):
                    return f"'{lyr.name}' is multiscale: give single-resolution tiles."
                imgs.append(np.array(lyr.data, copy=True))
            kw.update(images=imgs, labels=None, data={"source": "layers", "images": [lyr.name for lyr in layers]})
        elif src == "folder":
            idir = self.images_dir.value
            if idir is None or str(idir) in ("", "."):
                return "Images folder is not set."
            if not Path(idir).is_dir():
                return f"Images folder {idir} does not exist."
            kw.update(images=str(idir), labels=None, data={"source": "folder", "images": str(idir)})
        else:
            return (f"{kind} learns from real images without labels: choose Image layers ('layers') or a folder "
                    "of images, not synthetic pairs.")
        return None

    def start(self) -> None:
        """Start training in a worker with the widget's settings."""
        if self._job is not None:
            return
        kw = self._collect()
        if isinstance(kw, str):
            self.status.value = kw
            return
        kind, steps = kw["kind"], int(self.steps.value)
        common = {"steps": steps, "out": kw["out"], "resume": kw["resume"], "device": self.device.value,
                  "seed": int(self.seed.value), "batch_size": int(self.batch.value), "crop": int(self.crop.value),
                  "lr": kw["lr"], "save_every": int(self.save_every.value),
                  "preview_every": int(self.preview_every.value)}
        job = _Job(kind, kw["out"], steps)
        synth = kw.get("synth")
        data = {**kw["data"], "crop": common["crop"], "batch_size": common["batch_size"]}
        joint = (self.generator.value, self.segmenter.value, self.adversarial.value)
        val = {"val_fraction": float(self.val_fraction.value), "eval_every": int(self.eval_every.value),
               "augment": None if kw["resume"] is not None else self.augment.value}

        def work():
            try:
                images, labels = kw.get("images"), kw.get("labels")
                if synth is not None:
                    images, labels = synthetic_pairs(
                        synth["n"], synth["size"], synth["styles"], style_labels=synth["style_labels"],
                        fit_labels=synth["fit_labels"], process=synth["process"], seed=synth["seed"],
                        progress=lambda i, n, msg: job.events.append((time.perf_counter(), ("generate", i, n, msg))),
                        should_stop=job.should_stop)
                    if job.stop:
                        return None
                if kind == JOINT:
                    from ..train.joint import train_joint

                    return train_joint(joint[0], joint[1], images, labels, adversarial=joint[2],
                                       should_stop=job.should_stop, on_update=job.on_update, **common)
                from ..train import train

                mix = {}
                if kw.get("mix"):
                    mix = {"synthetic": kw["mix"]["n"], "synthetic_size": kw["mix"]["size"],
                           "synthetic_renderer": kw["mix"]["renderer"],
                           "progress": lambda i, n, msg: job.events.append(
                               (time.perf_counter(), ("generate", 0, 0, msg)))}
                return train(kind, images, labels, config=kw["config"], init=kw["init"], train_data=data,
                             should_stop=job.should_stop, on_update=job.on_update, **mix, **val, **common)
            finally:
                release_gpu_memory()

        if kw["resume"] is None or kw["resume"] != self._last_run:
            self.plot.clear()
        self.metrics.value = ""
        self._job = job
        self.start_btn.text = "Stop"
        self.pause_btn.text, self.pause_btn.enabled = "Pause", True
        self._set_progress(0, steps, f"0/{steps}")
        what = f"synthesising {synth['n']} pairs, then " if synth else ""
        self.status.value = f"Training {kind}: {what}starting (checkpoint {kw['out']})..."
        self._drain_timer.start()
        self._worker = start_worker(work, returned=lambda res: self._on_returned(job, res),
                                    errored=lambda exc: self._on_error(job, exc),
                                    finished=lambda: self._on_finished(job))

    def stop(self, reason: str = "") -> None:
        """Stop after the current step; the loop saves its checkpoint first. Works while paused too."""
        job = self._job
        if job is None:
            return
        job.stop = True
        job.reason = reason
        job.running.set()  # wake a paused thread: should_stop then returns True
        self.start_btn.text, self.start_btn.enabled = "Stopping...", False
        self.pause_btn.enabled = False
        self.status.value = reason or "Stopping: saving the checkpoint..."

    def pause(self) -> None:
        """Block the training thread before its next step (nothing is lost; the GPU memory stays allocated)."""
        job = self._job
        if job is None or job.stop or not job.running.is_set():
            return
        job.running.clear()
        self.pause_btn.text = "Resume"
        self.status.value = f"Paused at step {job.step}/{job.steps} (Resume continues, Stop saves)."

    def resume_training(self) -> None:
        """Let a paused run continue."""
        job = self._job
        if job is None or job.running.is_set():
            return
        job.rate_window.clear()  # the time-left estimate must not count the pause
        job.running.set()
        self.pause_btn.text = "Pause"
        self.status.value = f"Training {job.kind}: resumed at step {job.step}/{job.steps}."

    def _on_closed(self, _=None):
        """The widget left the viewer (its dock closed) or was destroyed: stop (the checkpoint is saved)."""
        job = self._job
        if job is not None:
            job.stop = True
            job.reason = "The widget was closed: training stopped."
            job.running.set()

    # ---- events from the training thread -------------------------------------------------------------------------
    def _drain(self) -> None:
        job = self._job
        if job is None:
            self._drain_timer.stop()
            return
        self._apply_events(job)

    def _apply_events(self, job: _Job) -> None:
        preview = None
        checkpoint = False
        while job.events:
            t, ev = job.events.popleft()
            if isinstance(ev, tuple):  # ("generate", i, n, msg)
                _, i, n, msg = ev
                self._set_progress(i, n, f"pair {i}/{n}")
                self._set_status(f"Synthetic data: {msg} (training starts when all are made).")
                continue
            if ev.kind == "step":
                job.step = ev.step
                job.rate_window.append((t, ev.step))
                self.plot.add(ev.step, ev.losses)
            elif ev.kind == "validation":
                shown = {k: v for k, v in ev.metrics.items() if k != "val_step" and isinstance(v, (int, float))}
                self.metrics.value = f"validation at step {ev.step}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in shown.items())
            elif ev.kind == "checkpoint":
                job.checkpoint, job.saved_step = ev.path, ev.step
                checkpoint = True
            elif ev.kind == "preview" and ev.image is not None:
                preview = ev
        if preview is not None:
            self._show_preview(job.kind, preview)
        self.plot.refresh()
        if not job.step:
            return
        # the live figures go into the progress bar's text and the plot: their repaints change no geometry (a
        # label whose text changes re-lays out the dock, which costs the training thread a quarter of its speed
        # under software OpenGL, see benchmarks/bench_training.py)
        text = f"{job.step}/{job.steps}"
        rate = job.rate()
        if job.stop:
            text += " stopping"
        elif not job.running.is_set():
            text += " paused"
        elif rate:
            text += f" · {rate:.2f} steps/s · {_fmt_secs((job.steps - job.step) / rate)} left"
        self._set_progress(job.step, job.steps, text)
        if not job.stop and not job.running.is_set():
            self._set_status(f"Paused at step {job.step}/{job.steps} (Resume continues, Stop saves).")
        elif not job.stop and rate and (checkpoint or job.status_at is None
                                        or time.perf_counter() - job.status_at >= STATUS_EVERY_S):
            job.status_at = time.perf_counter()
            saved = f" Saved {Path(job.checkpoint).name} at step {job.saved_step}." if job.checkpoint else ""
            self._set_status(f"Training {job.kind}: step {job.step}/{job.steps} at {rate:.2f} steps/s, about "
                             f"{_fmt_span((job.steps - job.step) / rate)} left.{saved}")

    @property
    def live_text(self) -> str:
        """What the progress bar says (step, steps per second, time left)."""
        return self.progress.native.format()

    def _set_progress(self, value: int, maximum: int, text: str = "%p%") -> None:
        bar = self.progress.native
        maximum = max(int(maximum), 1)
        if bar.maximum() != maximum:
            bar.setMaximum(maximum)
        bar.setValue(min(int(value), maximum))
        bar.setFormat(text)

    def _set_status(self, text: str) -> None:
        if self.status.value != text:  # a new text may re-lay out the dock: only when it changes
            self.status.value = text

    def _show_preview(self, kind: str, ev) -> None:
        name = f"train preview: {kind}"
        layer = self._preview_layer
        if layer is None or layer not in self.viewer.layers:
            layer = next((lyr for lyr in self.viewer.layers if lyr.metadata.get(_MARK) == kind), None)
        img = np.asarray(ev.image)
        if layer is not None:
            layer.data = img
        else:
            active = self.viewer.layers.selection.active
            layer = self.viewer.add_image(img, rgb=img.ndim == 3 and img.shape[-1] in (3, 4), name=name,
                                          metadata={_MARK: kind})
            if active is not None and active in self.viewer.layers:
                self.viewer.layers.selection.active = active
        layer.metadata["step"] = ev.step
        self._preview_layer = layer

    def _on_returned(self, job: _Job, res) -> None:
        self._apply_events(job)
        self.result = res
        if res is None:  # stopped while the synthetic pairs were being made
            job.reason = job.reason or "Stopped before training started: nothing was saved."
            return
        self._last_run, self._last_kind = Path(res.path), job.kind
        how = "stopped" if res.stopped else "finished"
        msg = (f"{job.reason + ' ' if job.reason else ''}Training {how} at step {res.step}/{job.steps} in "
               f"{_fmt_secs(res.seconds)}; saved {res.path}.")
        if res.stopped:
            msg += " Resume from 'last run' continues it."
        job.reason = msg

    def _on_error(self, job: _Job, exc: BaseException) -> None:
        self._apply_events(job)
        kept = f" The last checkpoint (step {job.saved_step}) is kept: {job.checkpoint}." if job.checkpoint else ""
        job.reason = f"{error_message(exc, 'train', f'Training {job.kind}')}.{kept}"

    def _on_finished(self, job: _Job) -> None:
        if job is not self._job:
            return
        self._job = None
        self._worker = None
        try:
            self._drain_timer.stop()
            self.start_btn.text, self.start_btn.enabled = "Start", True
            self.pause_btn.text, self.pause_btn.enabled = "Pause", False
            self.status.value = job.reason or "Stopped."
            self._set_progress(job.step, job.steps, f"{job.step}/{job.steps}")
            self._resume.refresh()
        except RuntimeError:  # the Qt objects are gone (the widget was deleted)
            pass
        release_gpu_memory()
        self._refresh_checkpoint_lists()

    def _refresh_checkpoint_lists(self) -> None:
        """Let the docked Render and Segment widgets list the new checkpoint now (they re-read the folder)."""
        try:
            docks = list(self.viewer.window.dock_widgets.values())
        except Exception:  # noqa: BLE001 - no window (headless viewer), or it is closing
            return
        for w in docks:
            picker = getattr(w, "_ckpt", None)
            if isinstance(picker, CheckpointPicker):
                try:
                    picker.refresh()
                except RuntimeError:
                    pass

