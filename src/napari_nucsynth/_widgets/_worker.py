"""What the widgets that run work in a background thread share.

:func:`start_worker` is how every widget starts one: the work's exception goes to the widget's own handler and
nowhere else, and :func:`error_message` is the status line it shows. :class:`WorkerWidget` is the lifecycle of
the widgets that run one job at a time (Render, Segment): the run button that becomes Cancel, progress reports
from the worker thread to the UI, cancellation at the job's next progress report, errors to the status line, and a
re-run of the latest settings when they changed while a job ran. :class:`CloseWatcher` notices a docked widget
being closed; :func:`release_gpu_memory` gives cached GPU memory back when a job ends.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from magicgui.widgets import Container
from qtpy.QtCore import QEvent, QObject

logger = logging.getLogger(__name__)


def start_worker(work: Callable[[], object], *, returned: Callable[[object], None] | None = None,
                 errored: Callable[[BaseException], None] | None = None,
                 finished: Callable[[], None] | None = None):
    """Run ``work()`` in a thread; ``returned(value)``, ``errored(exc)`` and ``finished()`` run on the UI thread.

    An exception of ``work`` is handled once, by ``errored``. napari's ``create_worker`` would also relay it to
    napari's notification manager (a traceback pop-up on top of the widget's own message) and, unless told to
    ignore errors, raise it again on the UI thread, which aborts a process that drives the viewer with
    ``processEvents`` (PyQt turns an exception in a slot into a fatal error: SIGABRT). superqt's worker, the one
    napari's wraps, does neither when ``_ignore_errors`` is set. Warnings raised in the thread still reach napari's
    notifications, as they did. Keep the returned worker referenced until it has finished.
    """
    from superqt.utils import create_worker

    worker = create_worker(work, _start_thread=False, _ignore_errors=True)
    if returned is not None:
        worker.returned.connect(returned)
    if errored is not None:
        worker.errored.connect(errored)
    if finished is not None:
        worker.finished.connect(finished)
    worker.warned.connect(_relay_warning)
    worker.start()
    return worker


def _relay_warning(args: tuple) -> None:
    from napari.utils.notifications import notification_manager

    notification_manager.receive_warning(*args)


def error_message(exc: BaseException, action: str, failure: str,
                  expected: tuple[type[BaseException], ...] = (ValueError,)) -> str:
    """The status line for an error of a widget's work: ``"Cannot <action>: <message>"`` for the ``expected``
    kinds (bad input: the message says what to change), else ``"<failure> failed: <type>: <message>"`` with the
    traceback written to the log (a bug)."""
    if isinstance(exc, expected):
        return f"Cannot {action}: {exc}"
    logger.error("%s failed", failure, exc_info=(type(exc), exc, exc.__traceback__))
    return f"{failure} failed: {type(exc).__name__}: {exc}"


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
    dock's close button) reparents the inner widget to None rather than destroying it. A widget docked inside a
    wrapper (:class:`~napari_nucsynth._widgets._dock.ScrollDock`) hands the watch to it with :meth:`watch`."""

    def __init__(self, widget, callback):
        super().__init__(widget)
        self._callback = callback
        self._docked = False
        self._watched = widget
        widget.installEventFilter(self)

    def watch(self, outer) -> None:
        """Watch ``outer`` (the widget napari docks, which holds ``widget``) instead."""
        self._watched.removeEventFilter(self)
        self._watched = outer
        self._docked = outer.parent() is not None
        outer.installEventFilter(self)

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
        self._job = job
        self._dirty = False
        self.run_button.text = "Cancel"
        self.progress.max, self.progress.value = 1, 0
        self.status.value = status
        self._worker = start_worker(
            work, returned=lambda value: None if job.cancelled or job is not self._job else on_result(value),
            errored=lambda exc: self._on_error(job, exc), finished=lambda: self._on_finished(job))

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
        self.status.value = error_message(exc, self.action, self.failure)

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
