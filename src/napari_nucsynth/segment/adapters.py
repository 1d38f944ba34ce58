"""Adapters for two published nucleus segmenters, registered only where their packages are installed.

They are optional extras, never dependencies: this module imports neither package (nor TensorFlow) when it is
imported; it asks :func:`importlib.util.find_spec` whether they are there and registers

- ``stardist`` when ``stardist``, ``csbdeep`` and ``tensorflow`` are importable (``pip install stardist tensorflow``);
- ``cellpose`` when ``cellpose`` is importable (``pip install cellpose``; versions 3 and 4 are supported).

Both take images by the project's one rule (:func:`napari_nucsynth._checks.as_rgb`), return uint32 labels with ids
``1..N``, check ``should_stop`` before loading the model and around each call of it (``InterruptedError`` when it
turns True), and merge the results on the 8 flips/rotations with :func:`tta_instances` when ``tta=True``. The last
loaded model is kept, so a second run with other parameters does not load it again.

**stardist** (Schmidt et al. 2018; Weigert et al. 2020). ``checkpoint``: a StarDist model folder (``config.json`` and
the weights, as ``StarDist2D.export`` or training writes it); without one, the pretrained ``2D_versatile_he`` model
(``StarDist2D.from_pretrained``), which is downloaded once and cached by Keras (``~/.keras/models/StarDist2D/``).
Input, as in StarDist's H&E example: the RGB image normalised by its 1st and 99.8th percentiles over all pixels and
channels jointly (``csbdeep.utils.normalize(x, 1, 99.8, axis=(0, 1, 2))``); a model with one input channel gets the
haematoxylin density (:func:`napari_nucsynth.stain.rgb_to_hed`, nuclei bright) normalised the same way. Images
larger than :data:`STARDIST_TILE` px go through StarDist's own tiling (``n_tiles``), with progress and
cancellation between tiles. Parameters: ``prob_thresh`` and ``nms_thresh`` (0 or None: the model's own values,
from its ``thresholds.json``).

**cellpose** (Stringer et al. 2021; Pachitariu & Stringer 2022; Cellpose-SAM 2025). ``checkpoint``: a cellpose model
file, or the name of one of the installed version's built-in models (``cellpose.models.MODEL_NAMES``, e.g. "cyto3"
or "cpsam"). Without one: in cellpose 3 the ``nuclei`` model, in cellpose 4 the package's default (``cpsam``; in
4.2 and later ``cpsam_v2``). The input rule:

- cellpose 3 (models trained on fluorescence-like channels): one channel where nuclei are bright, the haematoxylin
  optical density of :func:`napari_nucsynth.stain.rgb_to_hed`, run with ``channels=[0, 0]``;
- cellpose 4 (trained on all kinds of images, H&E included): the RGB image (``channel_axis=2``).

Each channel is normalised as cellpose itself does (0 at its 1st percentile, 1 at its 99th; 0 everywhere for a
channel whose range is under 1e-3), but with percentiles taken once over the whole image (a regular subsample of
about 4 Mpx of larger ones) and ``normalize=False`` passed to cellpose, so the tiles of a large image and the
transforms of ``tta`` all see the same scale. Images larger than :data:`CELLPOSE_TILE` px are segmented in tiles
overlapping by :data:`CELLPOSE_OVERLAP` px (:func:`segment_tiled`). Parameters: ``diameter`` (typical nucleus
diameter in px, default 22: the median over the 30 MoNuSeg training tiles at 40x of each tile's median
equivalent-circle diameter; 0 lets cellpose choose: cellpose 3 estimates it with its size model (built-in cyto/nuclei
models, or ``<checkpoint>_size.npy`` beside a model file) on the central tile, or else uses the model's training
diameter; cellpose 4 then runs at the image's own scale), ``flow_threshold`` (0.4) and ``cellprob_threshold`` (0.0),
cellpose's own defaults.

Offline, a model that has never been downloaded cannot be fetched: both raise a ``ValueError`` that says where to
put the files or what to pass as ``checkpoint`` instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .._checks import as_rgb
from ..stain import rgb_to_hed
from . import register
from ..tiling import relabel_contiguous, segment_tiled, tta_instances

__all__ = ["CellposeSegmenter", "StarDistSegmenter"]

#: Largest side (px) that StarDist predicts in one piece; larger images get ``n_tiles = ceil(side / STARDIST_TILE)``.
STARDIST_TILE = 1024
#: The pretrained StarDist model used without a checkpoint, and where it is published.
STARDIST_PRETRAINED = "2D_versatile_he"
STARDIST_MODELS_URL = "https://github.com/stardist/stardist-models/releases"
#: Tile size and overlap (px) of cellpose runs on large images (nuclei up to ``CELLPOSE_OVERLAP / 2`` px are never cut).
CELLPOSE_TILE, CELLPOSE_OVERLAP = 2048, 128
#: Pixels sampled for the normalisation percentiles of cellpose's input.
_NORM_SAMPLE = 4_000_000

_MODELS: dict = {}  # the last loaded model: {key: model}


def _importable(*names: str) -> bool:
    """True when every top-level module in ``names`` can be imported (nothing is imported to find out)."""
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):  # a broken install, or a module in sys.modules without a spec
            return False
    return True


def _check_stop(should_stop, what: str) -> None:
    if should_stop is not None and should_stop():
        raise InterruptedError(f"{what} cancelled")


def _check_params(method: str, params: dict, known: dict) -> dict:
    unknown = set(params) - set(known)
    if unknown:
        raise ValueError(f"unknown {method} parameter(s) {sorted(unknown)}; known: {sorted(known)}")
    return {k: params.get(k, v[0]) for k, v in known.items()}


def _as_labels(lab, shape: tuple[int, int], method: str) -> np.ndarray:
    """The labels a package returned, checked against the image's shape, as uint32 with ids ``1..N``."""
    arr = np.asarray(lab)
    if arr.shape != tuple(shape):
        raise ValueError(f"{method} returned labels of shape {arr.shape} for an image of shape {tuple(shape)}")
    return relabel_contiguous(arr)


def _cached(key: tuple, build):
    """The model cached under ``key``, built by ``build()`` when absent; one model is kept at a time."""
    if key not in _MODELS:
        model = build()
        _MODELS.clear()
        _MODELS[key] = model
    return _MODELS[key]


def _file_key(path: Path | None) -> tuple:
    """(resolved path, modification time) of a model file, or of a model folder's newest file."""
    if path is None:
        return (None, None)
    if path.is_dir():
        stamps = [p.stat().st_mtime for p in path.iterdir() if p.is_file()]
        return (str(path.resolve()), max(stamps, default=None))
    return (str(path.resolve()), path.stat().st_mtime if path.exists() else None)


# ----------------------------------------------------------------------------------------------------------------
# StarDist


def _tf_memory_growth(tf) -> None:
    """Let TensorFlow take GPU memory as it needs it (by default it reserves all of it, leaving none to torch)."""
    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except (AttributeError, RuntimeError, ValueError):  # GPUs already initialised, or an API without it: leave it
        pass


def _tf_device(tf, device) -> contextlib.AbstractContextManager:
    """A TensorFlow device scope for ``device``: "auto" leaves the placement to TensorFlow (its GPU when it has
    one); "cpu" is ``/CPU:0``; "cuda[:N]" and "mps" are TensorFlow's GPU N (an error when it sees none)."""
    if isinstance(device, str) and device == "auto":
        return contextlib.nullcontext()
    from ..devices import resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu":
        return tf.device("/CPU:0")
    try:
        gpus = tf.config.list_physical_devices("GPU")
    except AttributeError:
        gpus = []
    if not gpus:
        raise ValueError(f"device={device!r}, but TensorFlow (which StarDist runs on) sees no GPU here: use "
                         "device='auto' or 'cpu', or install a GPU build of TensorFlow")
    return tf.device(f"/GPU:{dev.index or 0}")


def _stardist_folder(checkpoint) -> Path:
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise ValueError(f"the stardist checkpoint must be a StarDist model folder (config.json and weights), got "
                         f"{str(checkpoint)!r}, which is not a folder; leave checkpoint empty for the pretrained "
                         f"{STARDIST_PRETRAINED!r} model")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} holds no config.json: it is not a StarDist model folder (one holds config.json, "
                         "weights_best.h5 and thresholds.json)")
    return folder


def _load_stardist(folder: Path | None):
    """A ``StarDist2D`` from ``folder``, or the pretrained H&E model when None (raises ``ValueError`` with what to do
    when it cannot be downloaded)."""
    from stardist.models import StarDist2D

    if folder is not None:
        return StarDist2D(None, name=folder.name, basedir=str(folder.parent))
    try:
        model = StarDist2D.from_pretrained(STARDIST_PRETRAINED)
    except Exception as exc:  # Keras' get_file raises a bare Exception when a download fails
        raise ValueError(
            f"StarDist could not download or load its pretrained {STARDIST_PRETRAINED!r} model ({exc}). This happens "
            "offline: run it once with network access (Keras caches the model in ~/.keras/models/StarDist2D/), or "
            f"download python_{STARDIST_PRETRAINED}.zip from {STARDIST_MODELS_URL}, unzip it and pass the folder "
            "as checkpoint"
        ) from exc
    if model is None:  # from_pretrained prints the registered names and returns None for an unknown one
        raise ValueError(f"this stardist version has no pretrained model {STARDIST_PRETRAINED!r}; pass a StarDist "
                         "model folder as checkpoint")
    return model


class StarDistSegmenter:
    """StarDist (star-convex polygons) through the ``stardist`` package; see the module docstring.

    Parameters (keywords of ``__call__``)
    -------------------------------------
    prob_thresh : float
        Object probability threshold; 0 or None: the model's own (``thresholds.json``; 0.69 for
        ``2D_versatile_he``).
    nms_thresh : float
        Overlap threshold of the non-maximum suppression; 0 or None: the model's own (0.3 for ``2D_versatile_he``).
    """

    name = "stardist"
    description = ("StarDist star-convex polygons (stardist package, TensorFlow); pretrained 2D_versatile_he H&E "
                   "model, or a StarDist model folder")
    needs_checkpoint = True
    #: (default, low, high); 0 means the model's own threshold
    params: ClassVar[dict] = {"prob_thresh": (0.0, 0.0, 1.0), "nms_thresh": (0.0, 0.0, 1.0)}

    def __call__(self, image, *, checkpoint=None, device: str = "auto", tta: bool = False, progress=None,
                 should_stop=None, **params) -> np.ndarray:
        """uint32 instance labels of ``image`` (RGB, any size)."""
        p = _check_params("stardist", params, self.params)
        thresh: dict[str, float | None] = {}
        for k, v in p.items():
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{k} must be in [0, 1] (0 or None: the model's own), got {v}")
            thresh[k] = float(v) if v is not None and float(v) > 0 else None
        img = as_rgb(image, "image")
        folder = _stardist_folder(checkpoint) if checkpoint is not None else None
        _check_stop(should_stop, "segmentation")
        try:
            import tensorflow as tf
            from csbdeep.utils import normalize
            from stardist.models import StarDist2D  # noqa: F401 - fails here, not in the loader, when broken
        except ImportError as exc:
            raise ValueError(f"the stardist method needs stardist and TensorFlow: pip install stardist tensorflow "
                             f"({exc})") from exc
        _tf_memory_growth(tf)
        with _tf_device(tf, device):
            key = ("stardist", *_file_key(folder), str(device))
            if progress is not None:
                progress(0, 1, "loading the StarDist model")
            model = _cached(key, lambda: _load_stardist(folder))
            n_in = int(getattr(getattr(model, "config", None), "n_channel_in", 3))
            if n_in not in (1, 3):
                raise ValueError(f"this StarDist model takes {n_in} input channels; only RGB (3) and single-channel "
                                 "(1: given the haematoxylin density) models can run on H&E")

            def one(rgb: np.ndarray, report=None) -> np.ndarray:
                x = rgb if n_in == 3 else rgb_to_hed(rgb)[..., 0]
                x = normalize(x, 1, 99.8, axis=tuple(range(x.ndim)))
                n_tiles = tuple(max(1, math.ceil(s / STARDIST_TILE)) for s in x.shape[:2]) + (1,) * (x.ndim - 2)
                return _stardist_predict(model, x, n_tiles, thresh, report, should_stop, rgb.shape[:2])

            if tta:
                return tta_instances(one, img, progress=progress, should_stop=should_stop)
            return one(img, progress)


def _stardist_predict(model, x: np.ndarray, n_tiles: tuple[int, ...], thresh: dict, progress, should_stop,
                      shape) -> np.ndarray:
    """``model.predict_instances`` through its generator (progress and cancellation between tiles) when it has one."""
    kwargs: dict[str, Any] = {"prob_thresh": thresh["prob_thresh"], "nms_thresh": thresh["nms_thresh"],
                              "n_tiles": n_tiles, "show_tile_progress": False}
    _check_stop(should_stop, "segmentation")
    gen = getattr(model, "_predict_instances_generator", None)  # what stardist-napari runs (stardist >= 0.8)
    if not callable(gen):
        res = model.predict_instances(x, **kwargs)
        if progress is not None:
            progress(1, 1, "StarDist")
    else:
        total = math.prod(n_tiles) + 1  # the tiles, then the non-maximum suppression
        done, res = 0, None
        for step in gen(x, **kwargs):
            _check_stop(should_stop, "segmentation")
            if isinstance(step, str):
                if step == "tile":
                    done = min(done + 1, total - 1)
                    what = "StarDist: predicting tiles"
                elif step == "nms":
                    done, what = total - 1, "StarDist: non-maximum suppression"
                else:
                    what = "StarDist: predicting"
                if progress is not None:
                    progress(done, total, what)
            else:
                res = step
        if res is None:
            raise RuntimeError("StarDist's prediction ended without a result")
        if progress is not None:
            progress(total, total, "StarDist: done")
    _check_stop(should_stop, "segmentation")
    return _as_labels(res[0], shape, "stardist")


# ----------------------------------------------------------------------------------------------------------------
# Cellpose


def _cellpose_major(cellpose, models) -> int:
    """Major version of the installed cellpose: its ``version`` string, the package metadata, or (neither
    readable) 4 when its built-in models are the Cellpose-SAM ones."""
    v = getattr(cellpose, "version", None)
    if not isinstance(v, str) or not re.match(r"\d", v):
        try:
            from importlib.metadata import version

            v = version("cellpose")
        except Exception:  # noqa: BLE001 - no metadata (a source checkout): look at the models instead
            v = None
    if isinstance(v, str) and re.match(r"\d+", v):
        return int(re.match(r"\d+", v).group())
    return 4 if any(str(n).startswith("cpsam") for n in getattr(models, "MODEL_NAMES", ())) else 3


def _offline(what: str, models, exc: BaseException) -> ValueError:
    where = getattr(models, "MODEL_DIR", "~/.cellpose/models")
    return ValueError(
        f"cellpose could not download {what} ({type(exc).__name__}: {exc}). This happens offline: run it once with "
        f"network access (cellpose keeps the models it downloads in {where}; $CELLPOSE_LOCAL_MODELS_PATH names "
        "another folder), copy the model files into that folder from a machine that has them, or pass a cellpose "
        "model file as checkpoint"
    )


def _cellpose_source(checkpoint, models) -> tuple[Path | None, str | None]:
    """``(model file, None)``, ``(None, built-in name)`` or ``(None, None)`` (the version's default model)."""
    if checkpoint is None:
        return None, None
    path = Path(checkpoint)
    if path.is_file():
        return path, None
    names = [str(n) for n in getattr(models, "MODEL_NAMES", ())]
    if isinstance(checkpoint, str) and checkpoint in names:
        return None, checkpoint
    raise ValueError(f"the cellpose checkpoint {str(checkpoint)!r} is neither a model file nor a built-in model of "
                     f"this cellpose ({', '.join(names) or 'none listed'}); pass a file saved by cellpose's training, "
                     "or leave it empty for the default model")


def _load_cellpose(major: int, models, path: Path | None, name: str | None, dev):
    """A ``cellpose.models.CellposeModel`` of a model file, a built-in name or the version's default; a failed
    download becomes a ``ValueError`` that says what to do."""
    import http.client

    gpu = dev.type in ("cuda", "mps")
    what = f"the {name or ('nuclei' if major < 4 else 'default')} model" if path is None else str(path)
    try:
        if major < 4:
            if path is not None:
                model = models.CellposeModel(gpu=gpu, pretrained_model=str(path), device=dev)
            else:
                model = models.CellposeModel(gpu=gpu, model_type=name or "nuclei", device=dev)
        else:
            kw = {} if path is None and name is None else {"pretrained_model": str(path) if path else name}
            model = models.CellposeModel(gpu=gpu, device=dev, **kw)
    except (OSError, http.client.HTTPException) as exc:
        if path is not None:
            raise ValueError(f"could not read the cellpose model {path} ({type(exc).__name__}: {exc})") from exc
        raise _offline(what, models, exc) from exc
    return model


def _size_model_file(major: int, models, path: Path | None, name: str | None) -> str | None:
    """Cellpose 3's size model for the model in use: the built-in one of cyto/nuclei models (downloaded once), or
    ``<model file>_size.npy``; None where there is none (and with cellpose 4, which has no size models)."""
    if major >= 4 or not hasattr(models, "SizeModel"):
        return None
    if path is not None:
        size = Path(f"{path}_size.npy")
        return str(size) if size.is_file() else None
    builtin = name or "nuclei"
    if builtin not in ("cyto", "cyto2", "cyto3", "nuclei"):
        return None
    import http.client

    try:
        return str(models.size_model_path(builtin))
    except (OSError, http.client.HTTPException) as exc:
        raise _offline(f"the size model of {builtin!r} (needed by diameter=0)", models, exc) from exc


def _percentiles(x: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``lower`` and ``upper`` percentiles of ``x`` (H x W x C), as float32 arrays of C values."""
    lo, hi = np.percentile(x.reshape(-1, x.shape[2]).astype(np.float32), [lower, upper], axis=0)
    return lo.astype(np.float32), hi.astype(np.float32)


def _apply_norm(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """cellpose's ``normalize99`` with given percentiles: ``(x - lo) / (hi - lo)``, 0 where ``hi - lo <= 1e-3``."""
    x = x.astype(np.float32)
    span = hi - lo
    ok = span > 1e-3
    out = (x - lo) / np.where(ok, span, 1.0).astype(np.float32)
    out[..., ~ok] = 0.0
    return out


class CellposeSegmenter:
    """Cellpose (flows and cell probability) through the ``cellpose`` package, version 3 or 4; see the module
    docstring for the input rule.

    Parameters (keywords of ``__call__``)
    -------------------------------------
    diameter : float
        Typical nucleus diameter in px (default 22, 40x H&E); 0 lets cellpose choose (see the module docstring).
    flow_threshold : float
        Largest error between a mask's flows and the predicted ones for it to be kept (default 0.4; 0 keeps all).
    cellprob_threshold : float
        Cell probability (logit) above which pixels are followed (default 0.0; lower finds more and larger masks).
    """

    name = "cellpose"
    description = ("Cellpose (cellpose package; v3: nuclei model on the haematoxylin channel, v4: Cellpose-SAM on "
                   "RGB), or a cellpose model file")
    needs_checkpoint = True
    #: (default, low, high)
    params: ClassVar[dict] = {"diameter": (22.0, 0.0, 100.0), "flow_threshold": (0.4, 0.0, 3.0),
                              "cellprob_threshold": (0.0, -6.0, 6.0)}

    def __call__(self, image, *, checkpoint=None, device: str = "auto", tta: bool = False, progress=None,
                 should_stop=None, **params) -> np.ndarray:
        """uint32 instance labels of ``image`` (RGB, any size)."""
        from ..devices import resolve_device

        p = _check_params("cellpose", params, self.params)
        diameter = float(p["diameter"] or 0.0)
        flow, cellprob = float(p["flow_threshold"]), float(p["cellprob_threshold"])
        if not math.isfinite(diameter) or diameter < 0:
            raise ValueError(f"diameter must be >= 0 px (0: let cellpose choose), got {p['diameter']}")
        if not math.isfinite(flow) or flow < 0:
            raise ValueError(f"flow_threshold must be >= 0 (0 keeps every mask), got {p['flow_threshold']}")
        if not math.isfinite(cellprob):
            raise ValueError(f"cellprob_threshold must be a finite number, got {p['cellprob_threshold']}")
        img = as_rgb(image, "image")
        dev = resolve_device(device)
        _check_stop(should_stop, "segmentation")
        try:
            import cellpose
            from cellpose import models
        except ImportError as exc:
            raise ValueError(f"the cellpose method needs the cellpose package: pip install cellpose ({exc})") from exc
        major = _cellpose_major(cellpose, models)
        path, name = _cellpose_source(checkpoint, models)
        if progress is not None:
            progress(0, 1, "loading the cellpose model")
        key = ("cellpose", major, *_file_key(path), name, str(dev))
        model = _cached(key, lambda: _load_cellpose(major, models, path, name, dev))
        _check_stop(should_stop, "segmentation")

        # the network's input: one channel (v3: haematoxylin, nuclei bright) or RGB (v4), normalised once for all
        if major < 4:
            def channels(rgb: np.ndarray) -> np.ndarray:
                return rgb_to_hed(rgb)[..., :1]
        else:
            def channels(rgb: np.ndarray) -> np.ndarray:
                return rgb

        step = max(1, math.ceil(math.sqrt(img.shape[0] * img.shape[1] / _NORM_SAMPLE)))  # a subsample of big ones
        lo, hi = _percentiles(channels(np.ascontiguousarray(img[::step, ::step])))

        def prepare(rgb: np.ndarray) -> np.ndarray:
            x = _apply_norm(channels(rgb), lo, hi)
            return x[..., 0] if major < 4 else x

        def run(rgb: np.ndarray, diam: float | None) -> np.ndarray:
            _check_stop(should_stop, "segmentation")
            kw: dict[str, Any] = {"diameter": diam, "flow_threshold": flow, "cellprob_threshold": cellprob,
                                  "normalize": False}
            kw.update({"channels": [0, 0]} if major < 4 else {"channel_axis": 2})
            out = model.eval(prepare(rgb), **kw)
            _check_stop(should_stop, "segmentation")
            return _as_labels(out[0], rgb.shape[:2], "cellpose")

        diam: float | None = diameter if diameter > 0 else None
        if diam is None:
            size_file = _size_model_file(major, models, path, name)
            if size_file is not None:  # cellpose 3: estimate once, on the central tile, for every tile
                r0 = max(0, (img.shape[0] - CELLPOSE_TILE) // 2)
                c0 = max(0, (img.shape[1] - CELLPOSE_TILE) // 2)
                crop = img[r0 : r0 + CELLPOSE_TILE, c0 : c0 + CELLPOSE_TILE]
                if progress is not None:
                    progress(0, 1, "cellpose: estimating the nucleus diameter")
                sz = models.SizeModel(cp_model=model, pretrained_size=size_file)
                est = float(np.ravel(sz.eval(prepare(crop), channels=[0, 0], normalize=False)[0])[0])
                diam = est if math.isfinite(est) and est > 0 else None
                _check_stop(should_stop, "segmentation")

        def one(rgb: np.ndarray) -> np.ndarray:
            return run(rgb, diam)

        fn = one
        if tta:
            def fn(rgb: np.ndarray) -> np.ndarray:
                return tta_instances(one, rgb, should_stop=should_stop)

        return segment_tiled(fn, img, tile=CELLPOSE_TILE, overlap=CELLPOSE_OVERLAP, progress=progress,
                             should_stop=should_stop)


if _importable("stardist", "csbdeep", "tensorflow"):
    register("stardist")(StarDistSegmenter)
if _importable("cellpose"):
    register("cellpose")(CellposeSegmenter)
