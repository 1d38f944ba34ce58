"""The checkpoint dropdown and file picker shared by the Render and Segment widgets.

The list holds ``(default)`` (the method's shipped model; value None), the checkpoints of the method's kind saved
in :func:`napari_nucsynth.models.checkpoint_dir` (newest first), and files picked with *Checkpoint file*. Both
controls are disabled for methods that run no model. A trained model appears by being saved: the folder is
re-read whenever its listing changes. When the method needs a model and none exists (no shipped one, none
saved, none picked), *Train a model...* opens the Train widget with that model chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from magicgui.widgets import ComboBox, FileEdit, PushButton

from ..models import checkpoint_dir, list_checkpoints, load_checkpoint

DEFAULT = "(default)"


def _list_checkpoints(kind: str, folder: Path) -> list[Path]:
    """``list_checkpoints(kind)``, but a file that breaks it (torch raises more than ``ValueError`` on some
    corrupt files) only drops that file: a dropdown refresh must never fail."""
    try:
        return list_checkpoints(kind=kind, folders=[folder])
    except Exception:  # noqa: BLE001 - then look at the files one by one
        found = []
    for p in sorted(folder.glob("*.pt")):
        try:
            found.append((load_checkpoint(p, kind=kind).get("created", ""), p))
        except Exception:  # noqa: BLE001, S112 - not a readable checkpoint of this kind: not listed
            continue
    return [p for _, p in sorted(found, reverse=True)]


class MethodBox:
    """Mixin for widgets with a method box ``self.method`` and a :class:`CheckpointPicker` ``self._ckpt``: napari
    resets every dropdown on layer changes, and a method whose label just changed (a model saved for it) must
    stay chosen."""

    def reset_choices(self, *args) -> None:
        value = self.method.value
        with self.method.changed.blocked():
            super().reset_choices(*args)
        self._ckpt.relabel_all(self.method, keep=value)


def open_train_widget(viewer, kind: str) -> str:
    """Dock the Train widget (or show the docked one) with model ``kind`` chosen; returns a status line."""
    try:
        _, widget = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Train")
    except Exception as exc:  # noqa: BLE001 - e.g. the plugin not registered with napari: say so, do not crash
        return f"Could not open the Train widget ({type(exc).__name__}: {exc}); use nucsynth train --model {kind}."
    widget = getattr(widget, "_magic_widget", widget)  # a widget docked before comes back as its Qt widget
    model = getattr(widget, "model", None)
    if model is None or kind not in model.choices:
        return f"The Train widget is open; '{kind}' is not among its models."
    model.value = kind
    return f"The Train widget is open with '{kind}' chosen: pick the data and press Start."


class CheckpointPicker:
    """``combo`` (the Checkpoint dropdown), ``browse`` (a *Checkpoint file* picker) and ``train_btn`` (*Train a
    model...*, shown only when the method needs a model and has none) for the method that ``current()`` names;
    ``current() -> (method or None, needs_checkpoint)``; ``shipped(method)`` is the path of the method's shipped
    model or None; ``train(method)`` is what *Train a model...* does. Call :meth:`refresh` when the method changes;
    ``status(message)`` reports a picked file, or why it was not taken (not a ``.pt`` file, or missing)."""

    def __init__(self, current: Callable[[], tuple[str | None, bool]], status: Callable[[str], None] | None = None,
                 shipped: Callable[[str], Path | None] | None = None, train: Callable[[str], None] | None = None):
        self._current = current
        self._status = status
        self._shipped = shipped
        self._train = train
        self._lists: dict = {}  # (method, folder) -> (folder listing signature, checkpoint paths)
        self._browsed: dict[str, list[Path]] = {}  # method -> checkpoint files picked by hand
        self.combo = ComboBox(label="Checkpoint", choices=self._choices)
        self.browse = FileEdit(label="Checkpoint file", mode="r", filter="*.pt")
        self.browse.changed.connect(self._on_browse)
        self.train_btn = PushButton(text="Train a model...")
        self.train_btn.tooltip = "Open the Train widget with this model chosen"
        self.train_btn.visible = False
        self.train_btn.changed.connect(self._on_train)

    @property
    def value(self) -> Path | None:
        return self.combo.value

    def saved(self, method: str) -> list[Path]:
        """``list_checkpoints(kind=method)``, re-read only when the folder's listing changed: napari refreshes the
        dropdowns on every layer change, and reading a checkpoint loads the whole file."""
        folder = checkpoint_dir()
        try:
            sig = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.pt")))
        except OSError:
            sig = ()
        cached = self._lists.get((method, str(folder)))
        if cached is None or cached[0] != sig:
            cached = (sig, _list_checkpoints(method, folder) if sig else [])
            self._lists[(method, str(folder))] = cached
        return cached[1]

    def _choices(self, _=None):
        out: list[tuple[str, Path | None]] = [(DEFAULT, None)]
        method, needs = self._current()
        if method is None or not needs:
            return out
        saved = self.saved(method)
        out += [(p.name, p) for p in saved]
        out += [(str(p), p) for p in self._browsed.get(method, []) if p not in saved]
        return out

    def method_choices(self, names, get) -> list[tuple[str, str]]:
        """Dropdown choices ``(label, name)`` for the method names: a method that needs a model and has none is
        labelled so (``"maskrcnn (no model yet: Train a model...)"``), so that a newcomer sees before choosing it
        which methods run out of the box. ``get(name)`` is the registry's instance."""
        out = []
        for name in names:
            try:
                needs = bool(getattr(get(name), "needs_checkpoint", False))
            except ValueError:
                needs = False
            label = f"{name} (no model yet: Train a model...)" if needs and not self.has_model(name) else name
            out.append((label, name))
        return out

    def relabel_all(self, combo, keep=None) -> None:
        """Rebuild a method box's list in registry order with the labels of :meth:`method_choices` (magicgui keys
        items by label: an item whose label changes would move to the end, or lose the selection), keeping the
        choice (or choosing ``keep``) without firing a change event."""
        value = combo.value if keep is None else keep
        with combo.changed.blocked():
            combo.native.clear()
            combo.reset_choices()
            if value in combo.choices:
                combo.value = value

    def relabel(self, combo) -> None:
        """Re-read a method box's labels when its chosen method has a model now (saved or picked since), keeping
        the choice and firing no change event."""
        if combo.value is not None and self.has_model(combo.value) and "no model" in combo.current_choice:
            with combo.changed.blocked():
                value = combo.value
                combo.reset_choices()
                combo.value = value

    def has_model(self, method: str) -> bool:
        """Whether ``method`` has a model to run: a shipped one, a saved one or a picked file."""
        shipped = self._shipped(method) if self._shipped is not None else None
        return bool((shipped is not None and Path(shipped).is_file()) or self.saved(method)
                    or self._browsed.get(method))

    def refresh(self, _=None) -> None:
        """Re-list the checkpoints (a choice that still exists stays chosen); enable the controls when the method
        runs a model; show *Train a model...* when it has none."""
        method, needs = self._current()
        self.combo.reset_choices()
        self.combo.enabled = bool(needs)
        self.browse.enabled = bool(needs)
        self.train_btn.visible = bool(needs and self._train is not None and method and not self.has_model(method))

    def _on_train(self, _=None):
        method, needs = self._current()
        if method and needs and self._train is not None:
            self._train(method)

    def _on_browse(self, _=None):
        path = self.browse.value
        if not isinstance(path, Path) or str(path) in ("", ".") or not self.combo.enabled:
            return
        problem = (f"{path.name} is not a checkpoint: pick a .pt file saved by nucsynth train or the Train widget."
                   if path.suffix != ".pt" else None if path.is_file() else f"{path} does not exist.")
        if problem is not None:  # say so: a file silently ignored looks like a file in use
            if self._status:
                self._status(problem)
            return
        method, _ = self._current()
        path = path.resolve()
        picked = self._browsed.setdefault(method, [])
        if path not in picked:
            picked.append(path)
        self.combo.reset_choices()
        self.combo.value = next(p for p in self.combo.choices if p is not None and p.resolve() == path)
        self.train_btn.visible = False
        if self._status:
            self._status(f"Checkpoint {path.name} chosen for {method}.")
