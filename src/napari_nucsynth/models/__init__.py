"""Trainable models behind one registry, and the one checkpoint format every model is saved in.

A checkpoint is one file (``torch.save`` of a dict, GUIDE section 3)::

    {"format": 1, "kind": "hovernet", "config": {...}, "state_dict": {...}, "step": int, "metrics": {...},
     "train_data": {...}, "created": ISO time, "version": package version,
     "optimizer": {...}, "rng": {...}}            # the last two only for resuming

written atomically (a temporary file in the same folder, then ``os.replace``) and loaded with
``torch.load(weights_only=True)``; a file of another kind or format, or a corrupt one, is a ``ValueError`` that
names the file. A trained model appears in the widgets by being saved: :func:`list_checkpoints` finds them.

A trainable model kind registers a :class:`ModelSpec` with :func:`register_model`: how to build the network from
its config, make training targets from instance labels, compute the loss, and turn network outputs into labels.
The training loop (:mod:`napari_nucsynth.train`) and the segmenters use nothing else.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_FORMAT", "ModelSpec", "checkpoint_dir", "get_model", "list_checkpoints", "load_checkpoint",
    "model_kinds", "register_model", "save_checkpoint",
]

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class ModelSpec:
    """What a trainable model kind provides (all functions take and return torch objects or numpy arrays).

    - ``build(config) -> torch.nn.Module``; ``default_config() -> dict``;
    - ``targets(image_uint8_HxWx3, labels_HxW) -> dict[str, np.ndarray]``: per-sample training targets;
    - ``loss(model, batch: dict[str, Tensor]) -> (Tensor, dict[str, float])``: the batch holds ``"image"``
      (N x 3 x H x W float in [0, 1]) and the stacked targets;
    - ``predict(model, image_uint8, device, tta, progress, should_stop, **params) -> labels``: inference on an
      image of any size.
    """

    kind: str
    build: Callable[[dict], Any]
    default_config: Callable[[], dict]
    targets: Callable[..., dict]
    loss: Callable[..., tuple]
    predict: Callable[..., Any]
    #: optional hooks for models that do not train as "one loss, one optimiser" (GANs):
    #: ``optimizers(model, lr) -> {name: torch.optim.Optimizer}`` (default: one AdamW over the parameters that
    #: require gradients, named "opt"); the training loop scales every param group's ``lr`` by its schedule
    #: relative to the group's initial value;
    optimizers: Callable[..., dict] | None = None
    #: ``train_step(model, batch, optimizers, step) -> logs`` (default: ``loss``, backward, step): one update of
    #: every optimiser, e.g. the discriminator and then the generator;
    train_step: Callable[..., dict] | None = None
    #: ``validate(model, images, labels, device) -> {metric: float}`` on the held-out pairs (default: AJI, PQ and
    #: Dice of ``predict`` against the labels, for segmenters);
    validate: Callable[..., dict] | None = None
    #: ``preview(model, image, labels, device) -> RGB uint8``: what a generator makes of one held-out pair, sent
    #: as a "preview" :class:`~napari_nucsynth.train.TrainUpdate` every ``preview_every`` steps.
    preview: Callable[..., Any] | None = None
    #: ``collate(samples, device) -> batch`` (default: stack the images and every target array).
    collate: Callable[..., dict] | None = None
    #: the learning rate :func:`napari_nucsynth.train.train` uses when given none (GANs want less than segmenters)
    default_lr: float = 1e-3
    #: trains on images alone (``train(kind, images, labels=None)``): its masks come from elsewhere (points2image)
    unpaired: bool = False
    #: ``targets`` takes the model's configuration too: ``targets(image, labels, config=...)`` (how points2image
    #: draws the masks of a crop is a setting of the run)
    targets_config: bool = False

    def make_targets(self, image, labels, config: dict | None = None) -> dict:
        """``targets`` of a training sample, given the run's model ``config`` where the kind wants it."""
        return self.targets(image, labels, config=config) if self.targets_config else self.targets(image, labels)


_MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    _MODELS[spec.kind] = spec
    return spec


def model_kinds() -> list[str]:
    _load_builtin()
    return sorted(_MODELS)


def get_model(kind: str) -> ModelSpec:
    if kind not in _MODELS:
        # a built-in kind loads its own module only (maskrcnn's import of torchvision alone takes seconds); any
        # other name loads them all, to find it or to list the kinds there are
        _load_builtin((kind,) if kind in _BUILTIN else _BUILTIN)
    if kind not in _MODELS:
        raise ValueError(f"unknown model kind {kind!r}; trainable kinds: {', '.join(sorted(_MODELS))}")
    return _MODELS[kind]


#: The built-in kinds, each registered by the module of its name in this package.
_BUILTIN = ("hovernet", "maskrcnn", "adain", "sian", "pix2pixhd", "daff", "points2image", "drit", "nuclick")


def _load_builtin(mods: tuple[str, ...] = _BUILTIN) -> None:
    import importlib

    for mod in mods:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(__name__):
                continue
            raise


def save_checkpoint(path, *, kind: str, config: dict, state_dict: dict, step: int, metrics: dict | None = None,
                    train_data: dict | None = None, optimizer: dict | None = None, rng: dict | None = None) -> Path:
    """Write a checkpoint atomically (see the module docstring); returns its path."""
    import torch

    from .. import __version__

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "format": CHECKPOINT_FORMAT, "kind": kind, "config": dict(config), "state_dict": state_dict,
        "step": int(step), "metrics": dict(metrics or {}), "train_data": dict(train_data or {}),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "version": __version__,
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer
    if rng is not None:
        ckpt["rng"] = rng
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path, *, kind: str | None = None, map_location="cpu") -> dict:
    """Load and check a checkpoint; ``kind`` (when given) must match. Errors are ``ValueError`` naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file (RuntimeError, UnpicklingError, struct.error...)
        import zipfile

        why = ""
        if zipfile.is_zipfile(path):  # torch.save's archive, damaged or holding objects weights_only refuses: say why
            text = str(exc).split("WeightsUnpickler error:")[-1]  # torch's own reason, not its advice
            why = f" ({type(exc).__name__}: {' '.join(text.split())[:200]})"
        # anything else (an image, random bytes) is simply not a checkpoint: torch's error (KeyError: 101...) says nothing
        raise ValueError(f"{path} is not a napari-nucsynth checkpoint: not a readable torch.save file{why}") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt or "kind" not in ckpt:
        raise ValueError(f"{path} is not a napari-nucsynth checkpoint (no 'format' and 'kind' entries)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt['format']!r}; this version reads format "
                         f"{CHECKPOINT_FORMAT}")
    if kind is not None and ckpt["kind"] != kind:
        raise ValueError(f"{path} holds a {ckpt['kind']!r} model, not a {kind!r} one")
    for key in ("config", "state_dict", "step"):
        if key not in ckpt:
            raise ValueError(f"{path} is missing the checkpoint entry {key!r}")
    return ckpt


def checkpoint_dir() -> Path:
    """Where saved models live by default: ``$NUCSYNTH_MODELS``, else ``~/.cache/napari-nucsynth/models``."""
    env = os.environ.get("NUCSYNTH_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "napari-nucsynth" / "models"


def list_checkpoints(kind: str | None = None, folders=None) -> list[Path]:
    """Checkpoints (``*.pt``) in ``folders`` (default: :func:`checkpoint_dir`) whose kind is ``kind`` (any when
    None), newest first; unreadable files are skipped."""
    out = []
    for folder in folders or [checkpoint_dir()]:
        for p in sorted(Path(folder).glob("*.pt")):
            try:
                ck = load_checkpoint(p, kind=kind)
            except ValueError:
                continue
            out.append((ck.get("created", ""), p))
    return [p for _, p in sorted(out, reverse=True)]
