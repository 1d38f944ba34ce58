"""A small live loss plot drawn with QPainter (no matplotlib or pyqtgraph needed).

One curve per loss term against the step, a log-scaled y axis when every value is positive, a legend, and the
last value of each term. :meth:`LossPlot.add` only stores the values; a timer repaints at most
``1000 / interval_ms`` times a second (or when the owner calls :meth:`refresh`), so a fast training loop never
floods the event loop with paints.
"""

from __future__ import annotations

import math

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt, QTimer
from qtpy.QtGui import QColor, QFont, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

#: Tableau 10, readable on napari's dark theme.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.0e}"
    return f"{v:.3g}"


class LossPlot(QWidget):
    """Curves of named values against the step; :meth:`add` is cheap, painting is throttled."""

    def __init__(self, parent=None, interval_ms: int | None = 100):
        super().__init__(parent)
        self.series: dict[str, tuple[list[int], list[float]]] = {}
        self.redraws = 0  # paints so far (for tests and benchmarks)
        self._dirty = False
        self.setMinimumHeight(200)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self._timer = QTimer(self)  # None: the owner calls refresh() (one repaint per owner's tick)
        if interval_ms is not None:
            self._timer.setInterval(int(interval_ms))
            self._timer.timeout.connect(self.refresh)
            self._timer.start()

    # ---- data -------------------------------------------------------------------------------------------------
    def add(self, step: int, values: dict) -> None:
        """Append one point per finite numeric value (others are skipped); repainted at the next tick."""
        for name, v in values.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):
                continue
            xs, ys = self.series.setdefault(str(name), ([], []))
            if xs and step <= xs[-1]:  # a resumed run restarts from its checkpoint's step: drop the overlap
                while xs and xs[-1] >= step:
                    xs.pop()
                    ys.pop()
            xs.append(int(step))
            ys.append(v)
        self._dirty = True

    def clear(self) -> None:
        self.series.clear()
        self._dirty = True

    @property
    def points(self) -> int:
        """How many points the plot holds (all terms)."""
        return sum(len(xs) for xs, _ in self.series.values())

    def refresh(self) -> None:
        """Repaint if points were added since the last repaint."""
        if self._dirty:
            self._dirty = False
            self.update()

    # ---- painting ---------------------------------------------------------------------------------------------
    def paintEvent(self, event):
        self.redraws += 1
        p = QPainter(self)
        try:
            self._paint(p)
        finally:
            p.end()

    def _paint(self, p: QPainter) -> None:
        p.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        pal = self.palette()
        fg = pal.color(self.foregroundRole())
        grid = QColor(fg)
        grid.setAlpha(50)
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.85))
        p.setFont(font)
        fm = p.fontMetrics()
        W, H = self.width(), self.height()
        data = [(n, np.asarray(xs, float), np.asarray(ys, float)) for n, (xs, ys) in self.series.items() if xs]
        # legend entries (name and last value of each term), wrapped into as many rows as they need
        left, right, bottom = fm.horizontalAdvance("0.000e") + 6, 8, fm.height() + 8
        legend, x, row = [], float(left), 0
        for i, (name, _, ys) in enumerate(data):
            text = f"{name} {_fmt(float(ys[-1]))}"
            w = fm.horizontalAdvance(text) + 18
            if x + w > W and x > left:
                x, row = float(left), row + 1
            legend.append((x, row, i, text))
            x += w
        top = fm.height() * (row + 1) + 6
        rect = QRectF(left, top, max(W - left - right, 10), max(H - top - bottom, 10))
        p.setPen(QPen(grid))
        p.drawRect(rect)
        if not data:
            p.setPen(fg)
            p.drawText(rect, Qt.AlignmentFlag.AlignCenter, "losses appear here while training")
            return
        x0 = min(float(x[0]) for _, x, _ in data)
        x1 = max(float(x[-1]) for _, x, _ in data)
        x1 = x1 if x1 > x0 else x0 + 1
        all_y = np.concatenate([y for _, _, y in data])
        log = bool(np.all(all_y > 0)) and all_y.max() / all_y.min() > 20
        ty = np.log10(all_y) if log else all_y
        y0, y1 = float(np.percentile(ty, 1)), float(ty.max())  # one early spike must not flatten the rest
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5
        pad = 0.05 * (y1 - y0)
        y0, y1 = y0 - pad, y1 + pad

        def px(x):
            return rect.left() + (x - x0) / (x1 - x0) * rect.width()

        def py(y):
            return rect.bottom() - (np.clip(y, y0, y1) - y0) / (y1 - y0) * rect.height()

        # grid and tick labels
        for t in _nice_ticks(y0, y1):
            yy = float(py(t))
            p.setPen(QPen(grid))
            p.drawLine(QPointF(rect.left(), yy), QPointF(rect.right(), yy))
            p.setPen(fg)
            p.drawText(QRectF(0, yy - fm.height() / 2, left - 4, fm.height()),
                       Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, _fmt(10**t if log else t))
        for t in _nice_ticks(x0, x1):
            xx = float(px(t))
            p.setPen(QPen(grid))
            p.drawLine(QPointF(xx, rect.top()), QPointF(xx, rect.bottom()))
            p.setPen(fg)
            p.drawText(QRectF(xx - 40, rect.bottom() + 2, 80, fm.height()), Qt.AlignmentFlag.AlignHCenter,
                       f"{t:g}")
        # curves: at most about two points per pixel column (column means beyond that)
        cols = max(int(rect.width()), 2)
        for i, (_name, xs, ys) in enumerate(data):
            yt = np.log10(ys) if log else ys
            if len(xs) > 2 * cols:
                b = np.minimum(((xs - x0) / (x1 - x0) * cols).astype(int), cols - 1)
                n = np.bincount(b, minlength=cols)
                keep = n > 0
                xs = (np.bincount(b, xs, minlength=cols)[keep] / n[keep])
                yt = (np.bincount(b, yt, minlength=cols)[keep] / n[keep])
            path = QPainterPath(QPointF(float(px(xs[0])), float(py(yt[0]))))
            for a, c in zip(px(xs[1:]), py(yt[1:])):
                path.lineTo(float(a), float(c))
            pen = QPen(QColor(PALETTE[i % len(PALETTE)]))
            pen.setWidthF(1.4)
            p.setPen(pen)
            p.setBrush(Qt.BrushStyle.NoBrush)
            if len(xs) == 1:
                p.drawEllipse(QPointF(float(px(xs[0])), float(py(yt[0]))), 2, 2)
            else:
                p.drawPath(path)
        for x, row, i, text in legend:
            y = 2 + row * fm.height()
            p.fillRect(QRectF(x, y + fm.height() / 2 - 2, 10, 4), QColor(PALETTE[i % len(PALETTE)]))
            p.setPen(fg)
            p.drawText(QPointF(x + 13, y + fm.ascent()), text)
        if log:
            p.setPen(fg)
            p.drawText(QRectF(rect.right() - 60, rect.top() + 2, 56, fm.height()), Qt.AlignmentFlag.AlignRight,
                       "log y")
