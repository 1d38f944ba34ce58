"""What the widgets that run one job at a time in a napari worker share (Render, Segment).

:class:`WorkerWidget` is the job lifecycle: the run button that becomes Cancel, progress reports from the worker
thread to the UI, cancellation at the job's next progress report, errors to the status line (a ``ValueError`` is
bad input, its message says what to change) or to a napari notification with the traceback (anything else is a
bug), and a re-run of the latest settings when they changed while a job ran. :class:`CloseWatcher` notices a
docked widget being closed; :func:`release_gpu_memory` gives cached GPU memory back when a job ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from magicgui.widgets import Container
from qtpy.QtCore import QEvent, QObject


class Cancelled(Exception):
    """Raised inside the worker, at the job's next progress report, once the user has cancelled."""


class Job:
    """One job in flight; ``cancelled`` is what the computation's ``should_stop`` reads."""

    def __init__(self, layer):
        self.layer = layer  # the layer the job works on (its removal cancels the job)
        self.cancelled = False
        self.reason = "Cancelled."  # the status line once a cancelled job has stopped
        self.started = time.perf_counter()


class CloseWatcher(QObject):
    """Calls ``callback`` when ``widget``, once docked, loses its parent: napari's ``remove_dock_widget`` (the
    dock's close button) reparents the inner widget to None rather than destroying it."""

    def __init__(self, widget, callback):
        super().__init__(widget)
        self._callback = callback
        self._docked = False
        widget.installEventFilter(self)

    def eventFilter(self, obj, event):
        if event.type() == QEvent.Type.ParentChange:
            if obj.parent() is not None:
                self._docked = True
            elif self._docked:
                self._docked = False
                self._callback()
        return False


def release_gpu_memory() -> None:
    """Give cached GPU memory back when a job ends (only where the job has already loaded torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class WorkerWidget(Container):
    """A widget that runs one :class:`Job` at a time in a napari worker.

    Subclasses set :attr:`run_text` (the idle button text), :attr:`action` (the verb in "Cannot <action>: ...")
    and :attr:`failure` (the noun in "<failure> failed: ..."), create ``self.run_button``, ``self.progress``,
    ``self.status`` and ``self._timer`` (a single-shot QTimer whose timeout runs the latest settings again), call
    :meth:`_init_jobs` first thing, implement ``run()`` (which builds the work and calls :meth:`_start`) and may
    override :meth:`_on_cancel` and :meth:`_on_failed`.
    """

    run_text = "Run"
    action = "run"
    failure = "Run"

    def _init_jobs(self) -> None:
        self._job: Job | None = None
        self._worker = None
        self._dirty = False  # settings changed while a job ran: run again when it ends

    @property
    def running(self) -> bool:
        """Whether a job is in flight."""
        return self._job is not None

    def _on_button(self, _=None) -> None:
        if self._job is not None:
            self.cancel()
        else:
            self.run()

    def _progress(self, job: Job, describe: Callable[[str], str]) -> Callable[[int, int, str], None]:
        """The ``progress(i, n, msg)`` callback for the worker: raises :class:`Cancelled` once ``job`` is
        cancelled, else shows ``describe(msg)`` and the fraction on the UI thread."""
        from superqt.utils import ensure_main_thread

        @ensure_main_thread
        def report(i: int, n: int, msg: str) -> None:
            if job is self._job and not job.cancelled:
                self.progress.max = max(int(n), 1)
                self.progress.value = min(int(i), self.progress.max)
                self.status.value = describe(msg)

        def progress(i: int, n: int, msg: str) -> None:
            if job.cancelled:
                raise Cancelled
            report(i, n, msg)

        return progress

    def _start(self, job: Job, work: Callable[[], object], on_result: Callable[[object], None], status: str) -> None:
        """Run ``work`` in a worker for ``job``; ``on_result(value)`` gets what it returns (on the UI thread)."""
        from napari.qt.threading import create_worker

        self._job = job
        self._dirty = False
        self.run_button.text = "Cancel"
        self.progress.max, self.progress.value = 1, 0
        self.status.value = status
        worker = create_worker(work, _ignore_errors=True)  # errors go to the status line (see _on_error)
        worker.returned.connect(lambda value: None if job.cancelled or job is not self._job else on_result(value))
        worker.errored.connect(lambda exc: self._on_error(job, exc))
        worker.finished.connect(lambda: self._on_finished(job))
        self._worker = worker
        worker.start()

    def cancel(self, reason: str = "Cancelled.") -> None:
        """Stop the running job (at its next check) and drop its result."""
        job = self._job
        if job is None:
            return
        job.cancelled = True
        job.reason = reason
        self._dirty = False
        self._on_cancel()
        self.run_button.text = "Cancelling..."
        self.run_button.enabled = False
        self.status.value = "Cancelling..."

    def _on_cancel(self) -> None:
        """Called when the user cancels (before the job has stopped)."""

    def _on_failed(self) -> None:
        """Called when a job failed (bad input or a bug), before the message is shown."""

    def _cancel_on_close(self) -> None:
        """The widget left the viewer or was destroyed: mark the job cancelled and stop the timer."""
        if self._job is not None:
            self._job.cancelled = True
        self._dirty = False
        try:
            self._timer.stop()
        except RuntimeError:  # the Qt objects are already gone
            pass

    def _on_error(self, job: Job, exc: BaseException) -> None:
        if job.cancelled or isinstance(exc, Cancelled):
            return
        if isinstance(exc, InterruptedError):  # the computation saw should_stop and stopped by itself
            job.cancelled = True
            return
        self._on_failed()
        if isinstance(exc, ValueError):  # bad input: the message says what to change
            self.status.value = f"Cannot {self.action}: {exc}"
            return
        self.status.value = f"{self.failure} failed: {type(exc).__name__}: {exc}"
        from napari.utils.notifications import notification_manager

        notification_manager.receive_error(type(exc), exc, exc.__traceback__)  # a bug: keep the traceback

    def _on_finished(self, job: Job) -> None:
        if job is not self._job:
            return
        self._job = None
        self._worker = None
        self.run_button.text = self.run_text
        self.run_button.enabled = True
        if job.cancelled:
            self.progress.value = 0
            self.status.value = job.reason
            return
        if self._dirty:
            self._dirty = False
            self._timer.start()
