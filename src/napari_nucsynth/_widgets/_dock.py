"""What napari docks: each widget inside a vertical scroll area, so that docks never push the window off the screen.

With Train, Segment and Evaluate docked, the window would grow to the sum of their heights (1,627 px), beyond a
1,200-px screen, with the lower controls unreachable. magicgui's ``Container(scrollable=True)`` does not help in
napari: ``add_dock_widget`` docks the container's ``.native`` (the inner widget), not the scroll area around it.
So the npe2 manifest registers a :class:`ScrollDock` subclass per widget (``PointsToMasksDock``, ``SegmentDock``...
of this module, see :data:`DOCKS`), which napari instantiates with the viewer and docks as it is; its minimum
height is small, so the docks share the window's height and each scrolls what it cannot show. The classes are made
on first use, so that opening one widget imports only its own module.

The widget itself stays reachable as napari expects of a magicgui widget: ``viewer.window.dock_widgets[name]``
and ``ScrollDock._magic_widget`` are the container; ``reset_choices`` is forwarded to it, as napari connects it to
the layer list's events.
"""

from __future__ import annotations

import importlib

from magicgui.widgets import Label
from qtpy.QtCore import QEvent, QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QSizePolicy

from ._worker import CloseWatcher

#: The height a dock may shrink to (its contents then scroll).
MIN_HEIGHT = 120
#: The docks the npe2 manifest registers: class name -> (module of ``_widgets``, widget class).
DOCKS = {
    "PointsToMasksDock": ("points_to_masks", "PointsToMasksWidget"),
    "EvaluateDock": ("evaluate", "EvaluateWidget"),
    "RenderDock": ("render", "RenderWidget"),
    "SegmentDock": ("segment", "SegmentWidget"),
    "TrainDock": ("train", "TrainWidget"),
    "ReviewDock": ("review", "ReviewWidget"),
    "RestainDock": ("restain", "RestainWidget"),
}


def wrapping_label(value: str = "") -> Label:
    """A status label whose long lines wrap instead of widening the dock; it takes the row's whole width (a wrapping
    label would otherwise get a narrow width of Qt's choosing, and wrap short lines)."""
    label = Label(value=value)
    label.native.setWordWrap(True)
    policy = label.native.sizePolicy()  # (keeps the height-for-width that word wrap set)
    policy.setHorizontalPolicy(QSizePolicy.Policy.Expanding)
    # fill the row's height: the row is laid out for the wrapped text's height, but a label of the default policy
    # keeps its size hint's (computed for another width), so three wrapped lines were clipped to two
    policy.setVerticalPolicy(QSizePolicy.Policy.MinimumExpanding)
    label.native.setSizePolicy(policy)
    return label


class ScrollDock(QScrollArea):
    """A docked widget in a vertical scroll area (subclasses made by :func:`dock_class` set ``widget_class``)."""

    widget_class: type

    def __init__(self, napari_viewer):
        super().__init__()
        inner = self.widget_class(napari_viewer)
        self._magic_widget = inner  # what napari's dock_widgets gives back, and what scripts unwrap
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        content = inner.native
        _add_vertical_stretch(content)
        self.setWidget(content)
        watcher = content.findChild(CloseWatcher)
        if watcher is not None:  # the dock's close button reparents this wrapper, not the widget inside it
            watcher.watch(self)

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        """The content's size needs changed (a control added, a longer text): so do the dock's, which Qt would
        otherwise keep from when it was docked, clipping the controls on the right."""
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)

    def reset_choices(self, *_) -> None:
        """napari calls this on layer list changes: refresh the widget's dropdowns."""
        self._magic_widget.reset_choices()

    def _bar_width(self) -> int:
        return self.verticalScrollBar().sizeHint().width()

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        hint = self.widget().sizeHint()
        return QSize(hint.width() + self._bar_width(), hint.height())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt's name
        hint = self.widget().minimumSizeHint()
        return QSize(hint.width() + self._bar_width(), min(hint.height(), MIN_HEIGHT))


def _add_vertical_stretch(widget) -> None:
    """What napari does to a docked widget (``_maybe_add_vertical_stretch``): a stretch below the controls, unless one
    of them wants the height (e.g. a plot), so that they keep their size at the top instead of spreading out."""
    layout = widget.layout()
    growing = {QSizePolicy.Policy.Expanding, QSizePolicy.Policy.MinimumExpanding, QSizePolicy.Policy.Ignored}
    items = (layout.itemAt(i).widget() for i in range(layout.count()))
    if not any(w is not None and w.sizePolicy().verticalPolicy() in growing for w in items):
        layout.addStretch(1)


def dock_class(widget_class: type, name: str | None = None) -> type[ScrollDock]:
    """A :class:`ScrollDock` of ``widget_class`` named ``name`` (napari passes the viewer to the constructor's
    argument named ``napari_viewer``)."""
    return type(name or f"{widget_class.__name__}Dock", (ScrollDock,),
                {"widget_class": widget_class, "__doc__": f"The {widget_class.__name__} in a scroll area."})


def __getattr__(name: str):
    """``SegmentDock`` and the others of :data:`DOCKS`, made when the manifest first asks for them."""
    if name not in DOCKS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, widget = DOCKS[name]
    cls = dock_class(getattr(importlib.import_module(f"{__package__}.{module}"), widget), name)
    globals()[name] = cls
    return cls
