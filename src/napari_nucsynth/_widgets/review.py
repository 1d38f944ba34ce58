"""The Review widget: go through a dataset's (image, labels) pairs, fix masks, accept or reject, export.

Thin by design: the queue, the loader and the review state are :mod:`napari_nucsynth.io.review` (Qt-free); the
export is :func:`napari_nucsynth.io.export_pairs`, run in a worker. This module shows one pair at a time as an
Image and a Labels layer, binds the keyboard shortcuts while it is open and records each decision at once in
``<dataset>/review.json`` (corrected labels in ``<dataset>/reviewed/<id>.tif``). See ``docs/review.md``.
"""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
)

from ..io.export import FORMATS, MANIFEST, export_pairs
from ..io.review import (
    AcceptedPairs,
    build_queue,
    class_names,
    counts,
    decision,
    first_undecided,
    instance_types,
    load_review_labels,
    load_review_types,
    load_sample,
    next_undecided,
    read_review,
    record,
)
from ._dock import wrapping_label
from ._worker import CloseWatcher, error_message, start_worker

#: Viewer shortcuts while the widget is open (none clashes with napari's Labels-layer keys: 1-7, E, P, F, L, Z,
#: M, X, B, -, =, [, ], Escape, Enter).
SHORTCUTS = {"Shift-A": "accept", "Shift-R": "reject", "Shift-S": "skip", "Shift-B": "back"}
IMAGE_NAME = "review: image"
LABELS_NAME = "review: labels"
TYPES_NAME = "review: types"
_MARK = "nucsynth_review"


class ReviewWidget(Container):
    """Review a dataset's pairs: accept, reject or skip each, correcting its mask with napari's label tools.

    *Dataset* is a folder with a ``manifest.json`` (any export format) or a plain folder of image + label files.
    Opening it loads ``review.json`` when there is one and shows the first pair that is neither accepted nor
    rejected. The pair is shown in two layers, ``"review: image"`` and ``"review: labels"`` (re-used from pair to
    pair; the labels' undo history is cleared when another pair is loaded, so undo never reaches into the
    previous pair). Pairs with classes (a type map) get a third layer, ``"review: types"``, to re-class nuclei
    with the same tools; at export each nucleus takes the most common class painted under it. Accept / Reject / Skip (Shift+A / Shift+R / Shift+S) record the decision, save corrected
    labels when the mask differs from the dataset's, and move to the next undecided pair; Back (Shift+B) shows the
    previous pair (saving an edit of the current one first). Closing the widget, or napari, saves an unsaved edit
    of the shown pair.

    *Export accepted* writes the accepted pairs, corrected labels where edited, with
    :func:`~napari_nucsynth.io.export_pairs` in a worker (progress, Cancel) to *Export to* in the chosen format.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = viewer
        self.dataset: Path | None = None
        self.queue: list[dict] = []
        self.state: dict | None = None
        self.index: int | None = None
        self._original: np.ndarray | None = None  # the dataset's labels of the shown pair
        self._baseline: np.ndarray | None = None  # what was loaded into the layer (original or saved correction)
        self._image_layer = None
        self._labels_layer = None
        self._types_layer = None
        self._original_types: np.ndarray | None = None  # the dataset's type map of the shown pair (None: no classes)
        self._baseline_types: np.ndarray | None = None
        self._bound: dict[str, object] = {}  # key -> the binding it replaced (restored on close)
        self._export_job: dict | None = None
        self._class_names: dict[int, str] = {}
        self._closed = False

        self.folder = FileEdit(label="Dataset", mode="d")
        self.folder.tooltip = "A folder with a manifest.json, or a folder of image + label pairs"
        self.open_btn = PushButton(text="Open")
        self.pair_info = wrapping_label("No dataset open.")
        self.accept_btn = PushButton(text="Accept (Shift+A)")
        self.reject_btn = PushButton(text="Reject (Shift+R)")
        self.skip_btn = PushButton(text="Skip (Shift+S)")
        self.back_btn = PushButton(text="Back (Shift+B)")
        row1 = Container(widgets=[self.accept_btn, self.reject_btn], layout="horizontal", labels=False)
        row2 = Container(widgets=[self.skip_btn, self.back_btn], layout="horizontal", labels=False)
        for r in (row1, row2):
            r.margins = (0, 0, 0, 0)
        self.counter = Label(value="")
        self.fmt = ComboBox(label="Format", choices=list(FORMATS), value="stardist")
        self.out = FileEdit(label="Export to", mode="d")
        self.overwrite = CheckBox(text="overwrite existing files", value=False)
        self.export_btn = PushButton(text="Export accepted")
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = wrapping_label()
        self.extend([self.folder, self.open_btn, self.pair_info, row1, row2, self.counter, self.fmt, self.out,
                     self.overwrite, self.export_btn, self.progress, self.status])

        self.open_btn.changed.connect(lambda _=None: self.open(self.folder.value))
        self.accept_btn.changed.connect(lambda _=None: self.accept())
        self.reject_btn.changed.connect(lambda _=None: self.reject())
        self.skip_btn.changed.connect(lambda _=None: self.skip())
        self.back_btn.changed.connect(lambda _=None: self.back())
        self.export_btn.changed.connect(self._on_export_button)
        self._bind_keys()
        self.native.destroyed.connect(self._on_closed)
        self._close_watcher = CloseWatcher(self.native, self._on_closed)
        self._update()

    # ---- keys --------------------------------------------------------------------------------------------------
    def _bind_keys(self) -> None:
        for key, action in SHORTCUTS.items():
            def _fn(_viewer, action=action):
                getattr(self, action)()

            self._bound[key] = self.viewer.bind_key(key, _fn, overwrite=True)

    def _unbind_keys(self) -> None:
        for key, previous in self._bound.items():
            try:
                self.viewer.bind_key(key, None)
                if previous is not None:
                    self.viewer.bind_key(key, previous, overwrite=True)
            except Exception:  # noqa: BLE001, S110 - the viewer may be half torn down
                pass
        self._bound = {}

    # ---- opening -----------------------------------------------------------------------------------------------
    def open(self, folder) -> bool:
        """Open a dataset folder; restore its review state and show the first undecided pair."""
        self._save_current()
        try:
            folder = Path(folder)
            if not folder.is_dir():
                raise ValueError(f"{folder} is not a folder: choose a dataset folder")
            queue, source = build_queue(folder)
            if not queue:
                raise ValueError(f"{folder} holds no pairs")
            state = read_review(folder, source)
        except (ValueError, OSError) as exc:
            self.status.value = f"Cannot open: {exc}"
            return False
        self.dataset, self.queue, self.state = folder, queue, state
        try:
            self._class_names = class_names(folder)
        except (ValueError, OSError):
            self._class_names = {}
        if Path(self.folder.value or "") != folder:
            self.folder.value = folder
        self.index = None
        first = first_undecided(queue, state)
        self._show(0 if first is None else first)
        how = "manifest.json" if source == "manifest" else "image + label files (no manifest)"
        c = counts(queue, state)
        resumed = f", resumed ({c['accepted'] + c['rejected']} decided)" if state["pairs"] else ""
        done = " Every pair is decided." if first is None else ""
        self.status.value = f"Opened {len(queue)} pairs from {how}{resumed}.{done}"
        if self.out.value in (None, Path("."), Path("")):
            self.out.value = folder.parent / f"{folder.name}_reviewed"
        return True

    # ---- showing a pair ----------------------------------------------------------------------------------------
    def _show(self, index: int) -> None:
        entry = self.queue[index]
        pid = str(entry["id"])
        try:
            sample = load_sample(self.dataset, entry)
            edited = load_review_labels(self.dataset, self.state, pid)
            edited_types = load_review_types(self.dataset, self.state, pid) if sample.types is not None else None
        except (ValueError, OSError) as exc:
            self.index = index
            self._original = self._baseline = self._original_types = self._baseline_types = None
            self.status.value = f"Cannot load pair {pid}: {exc} (reject or skip it)"
            self._update()
            return
        self.index = index
        self._original, self._original_types = sample.labels, sample.types
        shown = sample.labels if edited is None else edited
        shown_types = sample.types if edited_types is None else edited_types
        self._baseline = shown.copy()
        self._baseline_types = None if shown_types is None else shown_types.copy()
        self._put_layers(sample.image, shown.copy(), None if shown_types is None else shown_types.copy())
        self._update()

    def _find_layer(self, layer, kind, mark: str):
        """``layer`` if still in the viewer, else one a previous Review widget left (reopening after closing)."""
        if layer is not None and layer in self.viewer.layers:
            return layer
        return next((lyr for lyr in self.viewer.layers if isinstance(lyr, kind) and lyr.metadata.get(_MARK) == mark),
                    None)

    def _put_layers(self, image, labels, types=None) -> None:
        from napari.layers import Image, Labels

        layers = self.viewer.layers
        reset = True
        self._image_layer = self._find_layer(self._image_layer, Image, "image")
        self._labels_layer = self._find_layer(self._labels_layer, Labels, "labels")
        self._types_layer = self._find_layer(self._types_layer, Labels, "types")
        if image is not None:
            if self._image_layer is None or getattr(self._image_layer, "rgb", True) is False:
                self._image_layer = self.viewer.add_image(image, name=IMAGE_NAME, rgb=True,
                                                          metadata={_MARK: "image"})
            else:
                reset = self._image_layer.data.shape != image.shape
                self._image_layer.data = image
                self._image_layer.visible = True
        elif self._image_layer is not None and self._image_layer in layers:
            self._image_layer.visible = False
        outline = False
        if types is not None:
            if self._types_layer is None:  # below the instances, whose outlines stay on top
                self._types_layer = self.viewer.add_labels(types, name=TYPES_NAME, metadata={_MARK: "types"},
                                                           opacity=0.5)
                outline = True
            else:
                self._types_layer.data = types
                self._types_layer.visible = True
                self._clear_history(self._types_layer)
        elif self._types_layer is not None:
            self._types_layer.visible = False
        if self._labels_layer is None:
            self._labels_layer = self.viewer.add_labels(labels, name=LABELS_NAME, metadata={_MARK: "labels"},
                                                        opacity=0.5)
        else:
            self._labels_layer.data = labels
            self._clear_history(self._labels_layer)
        if outline:  # classes as fill, instances as outlines (the layer's contour control turns this back)
            self._labels_layer.contour = 2
            self._labels_layer.opacity = 1.0
        if self._types_layer is not None and layers.index(self._types_layer) > layers.index(self._labels_layer):
            layers.move(layers.index(self._types_layer), layers.index(self._labels_layer))
        self.viewer.layers.selection.active = self._labels_layer  # the label tools act on it
        if reset:
            self.viewer.reset_view()

    @staticmethod
    def _clear_history(layer) -> None:
        """Forget the undo/redo history (it belongs to the previous pair).

        napari has no public call for it; a Labels layer that stops being editable drops its history (napari 0.5 to
        0.9), so the layer is made read-only and editable again, in its tool mode. The private ``_reset_history``
        printed a FutureWarning on every pair through the viewer napari hands to plugins and goes in napari 0.10.
        ``test_undo_stays_within_the_pair`` checks that the history is gone.
        """
        mode = layer.mode
        layer.editable = False
        layer.editable = True
        layer.mode = mode

    def _current_labels(self) -> np.ndarray | None:
        return self._layer_data(self._labels_layer, self._baseline)

    def _current_types(self) -> np.ndarray | None:
        return self._layer_data(self._types_layer, self._baseline_types)

    def _layer_data(self, lyr, baseline) -> np.ndarray | None:
        if lyr is None or baseline is None or lyr not in self.viewer.layers:
            return None
        data = np.asarray(lyr.data)
        return data if data.shape == baseline.shape else None

    @property
    def current_id(self) -> str | None:
        return None if self.index is None else str(self.queue[self.index]["id"])

    def _update(self) -> None:
        has = self.index is not None and self.state is not None
        for b in (self.accept_btn, self.reject_btn, self.skip_btn, self.back_btn):
            b.enabled = has
        self.back_btn.enabled = has and self.index > 0
        if not has:
            self.counter.value = ""
            return
        pid = self.current_id
        rec = self.state["pairs"].get(pid) or {}
        what = rec.get("decision") or "undecided"
        if rec.get("edited"):
            what += ", corrected mask saved"
        if rec.get("types_edited"):
            what += ", corrected classes saved"
        info = f"Pair {self.index + 1} / {len(self.queue)}: {pid} ({what})"
        if self._baseline_types is not None:
            ids = sorted((set(self._class_names) | set(np.unique(self._baseline_types).tolist())) - {0})
            info += "\nClasses (paint on 'review: types'): " + ", ".join(
                f"{i} {self._class_names.get(i, '')}".strip() for i in ids)
        self.pair_info.value = info
        c = counts(self.queue, self.state)
        self.counter.value = (f"accepted {c['accepted']} · rejected {c['rejected']} · remaining {c['remaining']}"
                              + (f" · edited {c['edited']}" if c["edited"] else ""))
        self.export_btn.enabled = self._export_job is not None or c["accepted"] > 0

    # ---- decisions ---------------------------------------------------------------------------------------------
    def _save_current(self, decision_: str | None = None) -> bool:
        """Record ``decision_`` for the shown pair, with its labels and classes when they changed; False when it
        failed."""
        if self.index is None or self.state is None:
            return False
        labels, types = self._current_labels(), self._current_types()
        changed = labels is not None and not np.array_equal(labels, self._baseline)
        types_changed = types is not None and not np.array_equal(types, self._baseline_types)
        if decision_ is None and not changed and not types_changed:
            return True
        try:
            record(self.dataset, self.state, self.current_id, decision_,
                   labels if changed else None, original=self._original,
                   types=types if types_changed else None, original_types=self._original_types)
        except (ValueError, OSError) as exc:
            self.status.value = f"Could not save the review of {self.current_id}: {exc}"
            return False
        if changed:
            self._baseline = np.array(labels, copy=True)
        if types_changed:
            self._baseline_types = np.array(types, copy=True)
        return True

    def _untyped(self) -> int:
        """Nuclei of the shown pair without a class under them (0 for pairs without classes)."""
        labels, types = self._current_labels(), self._current_types()
        if labels is None or types is None:
            return 0
        return instance_types(labels, types)[1]

    def _decide(self, decision_: str) -> None:
        if self.index is None or self._closed:
            return
        pid = self.current_id
        untyped = self._untyped() if decision_ == "accepted" else 0
        if not self._save_current(decision_):
            return
        note = (f" {untyped} nuclei have no class: go Back and paint them on '{TYPES_NAME}'." if untyped else "")
        nxt = next_undecided(self.queue, self.state, self.index)
        if nxt is None:
            self._update()
            self.status.value = f"{pid}: {decision_}. Every pair is decided: export the accepted ones.{note}"
            return
        if nxt != self.index:
            self._show(nxt)
        else:
            self._update()
        self.status.value = f"{pid}: {decision_}.{note}"

    def accept(self) -> None:
        """Accept the shown pair (with its corrected labels) and go to the next undecided one."""
        self._decide("accepted")

    def reject(self) -> None:
        """Reject the shown pair and go to the next undecided one."""
        self._decide("rejected")

    def skip(self) -> None:
        """Leave the shown pair undecided (saving an edit) and go to the next undecided one."""
        self._decide("skipped")

    def back(self) -> None:
        """Show the previous pair in the queue (an edit of the shown one is saved first)."""
        if self.index is None or self.index == 0:
            return
        if self._save_current():
            self._show(self.index - 1)
            self.status.value = f"Back to {self.current_id} ({decision(self.state, self.current_id) or 'undecided'})."

    # ---- export ------------------------------------------------------------------------------------------------
    def _on_export_button(self, _=None) -> None:
        if self._export_job is not None:
            self._export_job["cancelled"] = True
            self.export_btn.text = "Cancelling..."
            self.export_btn.enabled = False
        else:
            self.export()

    def export(self) -> None:
        """Export the accepted pairs (corrected labels where edited) in a worker."""
        if self.state is None or self._export_job is not None:
            return
        self._save_current()
        out, fmt = self.out.value, self.fmt.value
        if out is None or str(out) in ("", "."):
            self.status.value = "Choose a folder to export to."
            return
        out = Path(out)
        if out.resolve() == self.dataset.resolve() or (out / MANIFEST).resolve() == (self.dataset / MANIFEST).resolve():
            self.status.value = "Export to another folder than the dataset under review."
            return
        pairs = AcceptedPairs(self.dataset, self.queue, self.state)
        if not len(pairs):
            self.status.value = "No accepted pair to export yet."
            return
        overwrite = bool(self.overwrite.value)

        from superqt.utils import ensure_main_thread

        job = {"cancelled": False, "n": len(pairs), "out": out, "fmt": fmt}

        @ensure_main_thread
        def report(i: int, n: int, msg: str) -> None:
            if job is self._export_job and not self._closed:
                self.progress.max = max(int(n), 1)
                self.progress.value = min(int(i), self.progress.max)
                self.status.value = f"Exporting ({fmt}): {msg} ({i}/{n})"

        def work():
            return export_pairs(pairs, out, fmt, overwrite=overwrite, progress=report,
                                should_stop=lambda: job["cancelled"], class_names=pairs.class_names)

        self._export_job = job
        self.export_btn.text = "Cancel export"
        self.progress.max, self.progress.value = max(len(pairs), 1), 0
        self.status.value = f"Exporting {len(pairs)} accepted pairs as {fmt} to {out}..."
        self._worker = start_worker(work, returned=lambda manifest: self._on_exported(job, manifest),
                                    errored=lambda exc: self._on_export_error(job, exc),
                                    finished=lambda: self._on_export_finished(job))

    def _on_exported(self, job: dict, manifest: dict) -> None:
        if self._closed:
            return
        n = len(manifest["pairs"])
        if manifest.get("complete"):
            self.status.value = f"Exported {n} accepted pairs as {job['fmt']} to {job['out']}."
        else:
            self.status.value = f"Export cancelled: {n} of {job['n']} pairs written to {job['out']}."
        self.last_manifest = manifest

    def _on_export_error(self, job: dict, exc: BaseException) -> None:
        if self._closed:
            return
        if isinstance(exc, FileExistsError):  # the library's message names its argument; the user has a checkbox
            what = str(exc).split(";")[0]
            self.status.value = (f"Cannot export: {what}. Tick '{self.overwrite.text}' to replace it, or export to "
                                 "another folder.")
            return
        self.status.value = error_message(exc, "export", "Export", expected=(ValueError, OSError))

    def _on_export_finished(self, job: dict) -> None:
        if job is not self._export_job:
            return
        self._export_job = None
        self._worker = None
        if self._closed:
            return
        self.export_btn.text = "Export accepted"
        self.export_btn.enabled = True
        self._update()

    @property
    def exporting(self) -> bool:
        return self._export_job is not None

    # ---- closing -----------------------------------------------------------------------------------------------
    def _on_closed(self, _=None) -> None:
        """The widget left the viewer or was destroyed: save an unsaved edit, stop the export, unbind keys."""
        if self._closed:
            return
        try:
            self._save_current()
        except Exception:  # noqa: BLE001, S110 - the layers may already be gone
            pass
        self._closed = True
        if self._export_job is not None:
            self._export_job["cancelled"] = True
        self._unbind_keys()
