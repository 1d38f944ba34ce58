"""The checkpoint dropdown and file picker shared by the Render and Segment widgets.

The list holds ``(default)`` (the method's shipped model; value None), the checkpoints of the method's kind saved
in :func:`napari_nucsynth.models.checkpoint_dir` (newest first), and files picked with *Checkpoint file*. Both
controls are disabled for methods that run no model. A trained model appears by being saved: the folder is
re-read whenever its listing changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from magicgui.widgets import ComboBox, FileEdit

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


class CheckpointPicker:
    """``combo`` (the Checkpoint dropdown) and ``browse`` (a *Checkpoint file* picker) for the method that
    ``current()`` names; ``current() -> (method or None, needs_checkpoint)``. Call :meth:`refresh` when the method
    changes; ``status(message)`` reports a picked file."""

    def __init__(self, current: Callable[[], tuple[str | None, bool]], status: Callable[[str], None] | None = None):
        self._current = current
        self._status = status
        self._lists: dict = {}  # (method, folder) -> (folder listing signature, checkpoint paths)
        self._browsed: dict[str, list[Path]] = {}  # method -> checkpoint files picked by hand
        self.combo = ComboBox(label="Checkpoint", choices=self._choices)
        self.browse = FileEdit(label="Checkpoint file", mode="r", filter="*.pt")
        self.browse.changed.connect(self._on_browse)

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

    def refresh(self, _=None) -> None:
        """Re-list the checkpoints (a choice that still exists stays chosen); enable the controls when the method
        runs a model."""
        _, needs = self._current()
        self.combo.reset_choices()
        self.combo.enabled = bool(needs)
        self.browse.enabled = bool(needs)

    def _on_browse(self, _=None):
        path = self.browse.value
        if not isinstance(path, Path) or path.suffix != ".pt" or not path.is_file() or not self.combo.enabled:
            return
        method, _ = self._current()
        path = path.resolve()
        picked = self._browsed.setdefault(method, [])
        if path not in picked:
            picked.append(path)
        self.combo.reset_choices()
        self.combo.value = next(p for p in self.combo.choices if p is not None and p.resolve() == path)
        if self._status:
            self._status(f"Checkpoint {path.name} chosen for {method}.")
