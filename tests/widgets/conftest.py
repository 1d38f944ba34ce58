"""Fixtures of the widget tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def popups(monkeypatch):
    """The errors that reach napari's notification manager (its traceback pop-ups), recorded instead of shown: a
    widget handles its workers' errors itself, in its status line, so this stays empty."""
    from napari.utils.notifications import notification_manager

    got: list = []
    monkeypatch.setattr(notification_manager, "receive_error", lambda *a, **k: got.append(a))
    return got
