"""The ``adain`` renderer: Gong et al.'s refine-synthesis (WACV 2021). The masks are first rendered by the classic
pre-synthesis in the style of the reference (real reference nuclei warped into them over its inpainted
background), then an AdaIN network (:mod:`napari_nucsynth.models.adain`) adds a learned residual to that render,
with the reference's feature statistics: an untrained model returns the classic render unchanged.

It needs a trained model: ``checkpoint=`` a file written by ``nucsynth train --model adain ...`` (or
``benchmarks/train_adain.py``); without one it uses the model shipped at ``data/models/adain_monuseg.pt`` when the
package has it, and otherwise says how to train one. Loaded models are cached per (path, modification time,
device), and the reference's feature statistics per (model, reference), so re-rendering costs the classic fusion
and one pass of the network.

Which feature network the model's encoder is (by default "hovernet:hovernet_monuseg.pt#<sha>", the shipped
segmenter's encoder; see :mod:`napari_nucsynth.models.features`) is part of every render's record: after each
call the module-level :data:`last_info` (and the renderer's ``last_info`` attribute) hold the checkpoint, its
``features`` source, its config, the training step, ``alpha`` and the device; :func:`model_info` says the same
of a checkpoint without rendering.

torch is imported only when a render runs: listing the renderers (at plugin start) stays light.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .._checks import SeedLike, as_labels, as_rgb
from . import register, resolve_checkpoint, shipped_checkpoint

__all__ = ["AdaINRenderer", "default_checkpoint", "last_info", "load_model", "model_info"]

TRAIN_HINT = "nucsynth train --model adain --images DIR --labels DIR --steps N --out CKPT"

#: what the last ``adain`` render used: checkpoint, features (the encoder), config, step, alpha, device
last_info: dict = {}

_MODELS: dict = {}
_STYLES: OrderedDict = OrderedDict()
_STYLE_CACHE = 3


def default_checkpoint() -> Path:
    """The shipped checkpoint's path."""
    return shipped_checkpoint("adain")


def _resolve_checkpoint(checkpoint) -> Path:
    return resolve_checkpoint("adain", checkpoint, TRAIN_HINT, default_checkpoint())


def load_model(checkpoint, device):
    """``(model, checkpoint dict without weights)`` of an adain checkpoint on ``device``, cached per (path,
    modification time, device); one model at a time. A shipped checkpoint (the EMA decoder and the encoder only)
    loads too."""
    from ..models import get_model, load_checkpoint

    path = Path(checkpoint)
    key = (str(path.resolve()), path.stat().st_mtime if path.exists() else None, str(device))
    if key not in _MODELS:
        ck = load_checkpoint(path, kind="adain")
        model = get_model("adain").build({**ck["config"], "pretrained": None})
        try:
            model.load_shipped(ck["state_dict"])
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{path} does not fit the adain model its config describes ({exc})") from None
        model.to(device).eval()
        meta = {k: v for k, v in ck.items() if k not in ("state_dict", "optimizer", "rng")}
        _MODELS.clear()
        _STYLES.clear()
        _MODELS[key] = (model, meta)
    return _MODELS[key]


def model_info(checkpoint=None) -> dict:
    """What an adain checkpoint (the shipped one when None) holds, without loading its weights onto a device:
    ``checkpoint``, ``features`` (the encoder), ``config``, ``step``, ``metrics``, ``train_data``."""
    from ..models import load_checkpoint

    path = _resolve_checkpoint(checkpoint)
    ck = load_checkpoint(path, kind="adain")
    return {"checkpoint": str(path), "features": _features_of(ck), "config": dict(ck["config"]), "step": int(ck["step"]),
            "metrics": dict(ck.get("metrics", {})), "train_data": dict(ck.get("train_data", {}))}


def _features_of(ck: dict) -> str:
    """The encoder as the checkpoint records it (its state dict's extra state, else its config)."""
    extra = ck.get("state_dict", {}).get("feature_net._extra_state")
    if extra is not None:
        try:
            return bytes(extra.tolist()).decode("utf-8")
        except (AttributeError, UnicodeDecodeError, ValueError):
            pass
    return str(ck.get("config", {}).get("features_source") or "unknown")


def _style_stats(model, model_key, style: np.ndarray, device, should_stop):
    from ..models.adain import feature_stats

    h = hashlib.blake2b(digest_size=16)
    h.update(repr(style.shape).encode())
    h.update(np.ascontiguousarray(style).data)
    key = (model_key, h.digest())
    if key not in _STYLES:
        _STYLES[key] = feature_stats(model, style, device=device, should_stop=should_stop)
        while len(_STYLES) > _STYLE_CACHE:
            _STYLES.popitem(last=False)
    _STYLES.move_to_end(key)
    return _STYLES[key]


@register("adain")
class AdaINRenderer:
    """Classic render of the masks, refined by a trained AdaIN network (see the module docstring)."""

    name = "adain"
    description = ("classic render refined by a trained AdaIN residual network (Gong et al. 2021) in the "
                   "reference's feature statistics; starts from the classic render, learned on the GAN core")
    needs_checkpoint = True
    default_checkpoint = default_checkpoint()  # the shipped model's path (the widget checks whether it exists)

    def __init__(self) -> None:
        self.last_info: dict = {}

    def __call__(self, labels, style, *, style_labels=None, seed: SeedLike = None, device: str = "auto",
                 checkpoint=None, progress=None, should_stop=None, alpha: float = 1.0,
                 strength: float | None = None, tile: int | None = None) -> np.ndarray:
        """Render ``labels`` in the style of ``style`` (see :func:`napari_nucsynth.render.render`).

        ``alpha`` in [0, 1]: how far the network's features are moved to the reference's statistics (1, default;
        0 keeps the classic render's own); ``strength`` in [0, 1]: the share of the network's residual added to the
        classic render (0: the classic render itself; default the checkpoint's ``config["strength"]``, chosen on
        training tiles, 1 for checkpoints without one); ``tile`` (px, a multiple of the encoder's largest stride;
        default :data:`napari_nucsynth.models.adain.TILE`) bounds the network's memory on large outputs, with the
        same result. ``seed`` fixes the classic render (the network is deterministic). Afterwards :data:`last_info`
        (and ``self.last_info``) say what was used, the feature network included.
        """
        from ..presynthesis import ClassicRenderer

        lab = as_labels(labels, "labels")
        ref = as_rgb(style, "style")
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (1: the reference's statistics, 0: the classic render's), "
                             f"got {alpha!r}")
        from ..models.adain import TILE, check_strength, model_strength, stylize

        if strength is not None:
            strength = check_strength(strength)
        path = _resolve_checkpoint(checkpoint)

        from ..devices import resolve_device

        dev = resolve_device(device)
        model, meta = load_model(path, dev)
        model_key = (str(path.resolve()), path.stat().st_mtime, str(dev))
        if strength is None:
            strength = model_strength(model)

        def stage(done: int, what: str) -> None:
            if should_stop and should_stop():
                raise InterruptedError("render cancelled")
            if progress:
                progress(done, 3, what)

        stage(0, "classic render")
        content = ClassicRenderer()(lab, ref, style_labels=style_labels, seed=seed, should_stop=should_stop)
        stage(1, "reference statistics")
        stats = _style_stats(model, model_key, ref, dev, should_stop)
        stage(2, "AdaIN refinement")
        out = stylize(model, content, stats, alpha=alpha, strength=strength, device=dev,
                      tile=TILE if tile is None else tile, should_stop=should_stop)
        info = {"method": "adain", "checkpoint": str(path), "features": model.features_source,
                "config": dict(meta["config"]),
                "step": int(meta["step"]), "alpha": alpha, "strength": strength, "device": str(dev)}
        self.last_info = info
        last_info.clear()
        last_info.update(info)
        if progress:
            progress(3, 3, "done")
        return out
