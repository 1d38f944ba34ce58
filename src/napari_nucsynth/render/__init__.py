"""Renderers: synthetic H&E images of instance masks in the style of a reference tile, behind one registry.

``render(labels, style, method="classic", ...)`` looks the method up in the registry; the widget and the CLI list
methods from :func:`renderers`, so a learned generator appears by registering itself with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from .._checks import SeedLike

__all__ = ["GalleryResult", "Renderer", "check_options", "gallery", "get_renderer", "interpolatable_methods",
           "interpolate", "register", "render", "renderers", "resolve_checkpoint", "shipped_checkpoint"]


class Renderer(Protocol):
    """What a registered renderer provides."""

    name: str
    description: str

    needs_checkpoint: bool  # True for learned generators
    # learned generators also give ``default_checkpoint``: the path of the model used when ``checkpoint`` is None
    # (it may not exist: then rendering without a checkpoint is a ValueError that says how to train one)

    def __call__(self, labels: np.ndarray, style: np.ndarray, *, style_labels=None, seed: SeedLike = None,
                 device: str = "auto", checkpoint=None, progress=None, should_stop=None) -> np.ndarray: ...


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
           device: str = "auto", checkpoint=None, progress=None, should_stop=None,
           options: dict | None = None) -> np.ndarray:
    """Render a synthetic H&E image of instance masks in the style of a reference tile.

    Parameters
    ----------
    labels : (H, W) integer array
        Instance masks, 0 = background. An all-zero map renders background only.
    style : image
        The style reference, an H&E tile (RGB uint8; grey, RGBA, float in [0, 1] and uint16 are converted).
    method : str
        A registered renderer (:func:`renderers`).
    style_labels : (h, w) integer array, optional
        The reference's own instance labels; when absent its nuclei are detected.
    seed : int, numpy Generator or None
        The same seed gives the same image.
    device : str
        "auto", "cpu", "cuda", "mps" (learned renderers; the classic one runs on the CPU).
    checkpoint : str or Path, optional
        The trained model of a learned renderer (its shipped default when None, where there is one); the
        classic renderer takes none.
    progress, should_stop : callables, optional
        ``progress(done, total, what)``; when ``should_stop()`` returns True the render stops and raises
        ``InterruptedError``.
    options : dict, optional
        The method's own keywords, e.g. ``{"strength": 0.5}`` for ``adain`` (the share of its refinement added to
        the classic render) or ``{"alpha": 0.8}``; a keyword the method does not take is a ``ValueError``.

    Returns
    -------
    (H, W, 3) uint8 RGB array.

    Raises
    ------
    ValueError
        Bad input: a style that is not an image, labels that are not a 2-D integer map, style labels of another
        shape, a reference with no detectable nuclei, an unknown method.
    """
    renderer = get_renderer(method)
    options = check_options(method, options)
    return renderer(labels, style, style_labels=style_labels, seed=seed, device=device, checkpoint=checkpoint,
                    progress=progress, should_stop=should_stop, **options)


def shipped_checkpoint(method: str):
    """Where the package ships ``method``'s trained model (``data/models/<method>_monuseg.pt``; it may be absent)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "data" / "models" / f"{method}_monuseg.pt"


def resolve_checkpoint(method: str, checkpoint, train_hint: str, shipped):
    """``checkpoint`` as a Path (a ``ValueError`` when that file does not exist), else ``shipped`` (the path of
    ``method``'s shipped model), else a ``ValueError`` that names ``train_hint``, the command that trains one."""
    from pathlib import Path

    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"{method} checkpoint {path} does not exist; give a file written by "
                             f"`nucsynth train --model {method} ...`")
        return path
    path = Path(shipped)
    if not path.is_file():
        raise ValueError(f"the {method!r} renderer needs a trained model, and none is shipped with this installation "
                         f"({path} is absent). Train one with\n    {train_hint}\n(benchmarks/train_{method}.py says "
                         "how a shipped model is made), then pass checkpoint=CKPT (`nucsynth render --method "
                         f"{method} --checkpoint CKPT`, the checkpoint box in the widget), or use method='classic', "
                         "which needs no training.")
    return path


def check_options(method: str, options: dict | None) -> dict:
    """``options`` (a render method's own keywords, see :func:`render`) as a dict, or a ``ValueError`` naming those
    the method does not take and listing those it does."""
    import inspect

    options = dict(options or {})
    if options:
        params = inspect.signature(get_renderer(method).__call__).parameters
        common = {"labels", "style", "style_labels", "seed", "device", "checkpoint", "progress", "should_stop"}
        bad = sorted(k for k in options if k in common or k not in params)
        if bad:
            own = sorted(k for k, p in params.items() if k not in common and p.kind is p.KEYWORD_ONLY)
            raise ValueError(f"render method {method!r} takes no option {', '.join(map(repr, bad))}; its options: "
                             f"{', '.join(own) or 'none'}")
    return options


def check_render_inputs(labels, style, style_labels=None):
    """The learned renderers' input rules: ``(labels, style, style_labels)`` as uint32 labels, RGB uint8 and
    labels of the style's shape (or None); ``ValueError`` naming the argument otherwise."""
    from .._checks import as_labels, as_rgb

    lab = as_labels(labels, "labels")
    if lab.size == 0:
        raise ValueError(f"labels is empty (shape {lab.shape})")
    sty = as_rgb(style, "style")
    sl = None
    if style_labels is not None:
        sl = as_labels(style_labels, "style_labels")
        if sl.shape != sty.shape[:2]:
            raise ValueError(f"style_labels must have the style image's shape {sty.shape[:2]}, got {sl.shape}")
    return lab, sty, sl


def _load_builtin() -> None:
    import importlib

    for mod in ("classic", "adain", "sian", "pix2pixhd", "points2image"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:  # a module not written yet
            if exc.name and exc.name.startswith(__name__):
                continue
            raise


from .explore import GalleryResult, gallery, interpolatable_methods, interpolate  # noqa: E402 - uses the above
