"""Renderers: synthetic H&E images of instance masks in the style of a reference tile, behind one registry.

``render(labels, style, method="classic", ...)`` looks the method up in the registry; the widget and the CLI list
methods from :func:`renderers`, so a learned generator appears by registering itself with :func:`register`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .._checks import SeedLike

__all__ = ["Renderer", "register", "renderers", "get_renderer", "render"]


class Renderer(Protocol):
    """What a registered renderer provides."""

    name: str
    description: str

    def __call__(self, labels: np.ndarray, style: np.ndarray, *, style_labels=None, seed: SeedLike = None,
                 device: str = "auto", progress=None, should_stop=None) -> np.ndarray: ...


_REGISTRY: dict[str, Callable[[], Renderer]] = {}


def register(name: str):
    """Class decorator: register a renderer factory under ``name`` (instantiated on first use)."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def renderers() -> list[str]:
    """Names of the registered renderers."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_renderer(name: str) -> Renderer:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown render method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def render(labels, style, *, method: str = "classic", style_labels=None, seed: SeedLike = None,
           device: str = "auto", progress=None, should_stop=None) -> np.ndarray:
    """Render a synthetic H&E image (RGB uint8, the shape of ``labels``) of the instance masks ``labels`` in the
    style of the reference tile ``style`` (optionally with its own instance labels ``style_labels``)."""
    return get_renderer(method)(labels, style, style_labels=style_labels, seed=seed, device=device,
                                progress=progress, should_stop=should_stop)


def _load_builtin() -> None:
    from . import classic  # noqa: F401  (registers "classic")
