"""Batch generation of synthetic (image, labels) datasets, reproducible pair by pair and resumable (Qt-free).

:func:`generate` draws ``n`` nucleus layouts (real centroids, fitted random point processes or DAFF-GAN's
point-library transforms), samples masks for them (:func:`~napari_nucsynth.masks.sample_masks`), renders each in the
style of a reference tile of a style bank (:func:`~napari_nucsynth.render.render`), optionally balanced across
stain/modality domains (:func:`~napari_nucsynth.stain.stain_domains`), and writes the pairs with
:class:`~napari_nucsynth.io.export.PairAppender` in one of the export layouts. Every pair's manifest entry records
what made it (point source, style file and sha256, domain, renderer, checkpoint sha256, per-pair seed, parameters,
version), so :func:`regenerate` reproduces it bit for bit on the CPU. See ``docs/generate.md``.

Pair ``i`` depends only on the run seed and ``i`` (its seed is ``SeedSequence([seed, i])``), never on how the
pairs were spread over worker processes, so ``workers=2`` writes the same dataset as ``workers=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "POINT_MODES",
    "generate",
    "load_point_sources",
    "load_style_bank",
    "pair_id",
    "read_pair",
    "regenerate",
    "synthetic_pairs",
    "verify",
]

IMAGE_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_EXT = (".png", ".tif", ".tiff", ".npy")
#: How layouts are made: real centroids (cropped), fitted random processes, or point-library transforms.
POINT_MODES = ("real", "process", "library")
_LABEL_DIRS = ("labels", "masks")
_STYLE_CACHE_SIZE = 64


def pair_id(index: int) -> str:
    """The id (file stem) of pair ``index``: ``syn_000000``, ``syn_000001``, ..."""
    return f"syn_{int(index):06d}"


def _sha256(path) -> str:
    from .presynthesis import file_sha256  # the one file hash (the style cache keys by it too)

    return file_sha256(path)


def _files(folder: Path, exts) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


_LABEL_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L")


def _tile_shape(path: Path, what: str) -> tuple[int, int]:
    """(height, width) of an image (``what="image"``) or label file, checked to be readable: a PNG by its header
    and chunk checksums, without decoding it (:func:`~napari_nucsynth.io._files.png_info`); any other file, and a
    PNG that is no grey label map, by reading it (which raises the readers' errors)."""
    from .io import read_image, read_labels
    from .io._files import png_info

    if path.suffix.lower() == ".png":
        h, w, mode = png_info(path, what)
        if what == "image" or mode in _LABEL_MODES:
            return h, w
    arr = read_image(path) if what == "image" else read_labels(path)
    return int(arr.shape[0]), int(arr.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# inputs: style bank and point sources


def load_style_bank(folder) -> list[dict]:
    """The reference tiles of a style bank folder, with their labels where present.

    Images are the image files of ``folder`` (``.png``, ``.tif``, ``.jpg``...). A tile's labels are taken from a
    ``labels/`` (or ``masks/``) subfolder file of the same stem, or from a same-stem file beside it that is a 2-D
    label map (e.g. ``a.png`` the tile, ``a.tif`` its labels). Returns ``[{"file", "sha256", "labels",
    "labels_sha256"}]`` sorted by file name (``labels`` None where there are none).

    Raises
    ------
    ValueError
        Not a folder, no image in it, or labels whose shape differs from their tile's.
    """
    from .io import read_image

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"styles must be a folder of reference H&E tiles, got {folder}")
    by_stem: dict[str, list[Path]] = {}
    for p in _files(folder, IMAGE_EXT + LABEL_EXT):
        by_stem.setdefault(p.stem, []).append(p)
    label_dir = {}
    for d in _LABEL_DIRS:
        if (folder / d).is_dir():
            for p in _files(folder / d, LABEL_EXT):
                label_dir.setdefault(p.stem, p)
    bank = []
    for stem, paths in sorted(by_stem.items()):
        image, labels = None, label_dir.get(stem)
        if len(paths) == 1:
            image = paths[0]
            if image.suffix.lower() == ".npy":
                continue
        else:  # same-stem files: the colour one is the tile, a 2-D integer one its labels
            for p in paths:
                arr = np.load(p) if p.suffix.lower() == ".npy" else read_image(p)
                if arr.ndim == 3 and arr.shape[-1] in (3, 4) and image is None:
                    image = p
                elif arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer) and labels is None:
                    labels = p
            if image is None:
                continue
        bank.append({"file": str(image.resolve()), "labels": str(labels.resolve()) if labels else None})
    if not bank:
        raise ValueError(f"no reference image (.png, .tif, .jpg) in the style folder {folder}")
    for t in bank:
        t["sha256"] = _sha256(t["file"])
        t["labels_sha256"] = _sha256(t["labels"]) if t["labels"] else None
        if t["labels"]:
            shape_i = _tile_shape(Path(t["file"]), "image")
            shape_l = _tile_shape(Path(t["labels"]), "labels")
            if shape_i != shape_l:
                raise ValueError(f"style labels {t['labels']} have shape {shape_l}, their tile {t['file']} {shape_i}")
    return bank


def _read_source(path: Path, size) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int], str]:
    """(points, classes, extent, kind) of a label map or napari points CSV."""
    from .io import read_labels, read_points_csv
    from .points import centroids

    if path.suffix.lower() == ".csv":
        pts, cls = read_points_csv(path)
        ext = [int(size[0]), int(size[1])]
        if len(pts):
            ext = [max(ext[0], int(np.ceil(pts[:, 0].max() + 0.5))), max(ext[1], int(np.ceil(pts[:, 1].max() + 0.5)))]
        if len(pts) and pts.min() < -0.5:
            raise ValueError(f"{path.name}: points with negative coordinates; napari's image covers [-0.5, H - 0.5]")
        return pts, cls, (ext[0], ext[1]), "csv"
    lab = read_labels(path)
    return centroids(lab), None, tuple(int(s) for s in lab.shape), "labels"


def load_point_sources(folder, size=(256, 256)) -> tuple[list[dict], list[tuple[np.ndarray, np.ndarray | None]]]:
    """The layouts of a ``points_from`` folder: label maps (their centroids) and napari points CSV files.

    Returns ``(sources, points)``: ``sources[i] = {"file", "sha256", "kind", "extent"}`` (``extent`` the label
    map's shape, or for a CSV the bounding size of its points, at least ``size``) and ``points[i] = (points,
    classes or None)``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"points_from must be a folder of label maps or napari points CSV files, got {folder}")
    files = _files(folder, LABEL_EXT + (".csv",))
    if not files:
        raise ValueError(f"no label map (.png, .tif, .npy) or points CSV in {folder}")
    sources, points = [], []
    for f in files:
        pts, cls, extent, kind = _read_source(f, size)
        sources.append({"file": str(f.resolve()), "sha256": _sha256(f), "kind": kind, "extent": list(extent)})
        points.append((pts, cls))
    return sources, points


@lru_cache(maxsize=1)
def _fit_version() -> str:
    from . import points
    from .io import read_labels
    from .presynthesis import code_version

    return code_version(points, read_labels, _read_source)


def _cached_fit(sha256: str, kind: str, extent, fit) -> dict | None:
    """``fit()`` (a point-process fit's ``to_dict()``, or None), kept on disk by the fitted file's sha256 in
    ``<cache_dir>/fits/`` (:func:`~napari_nucsynth.presynthesis.cache_dir`): a style bank's 14 tiles take 2-3 s
    to fit, on every run. A damaged or foreign cache file is ignored and rewritten."""
    from .io._files import _atomic
    from .presynthesis import cache_dir

    root = cache_dir()
    if root is None:
        return fit()
    tag = hashlib.blake2b(json.dumps([sha256, kind, list(extent), _fit_version()]).encode(), digest_size=20).hexdigest()
    path = root / "fits" / f"{tag}.json"

    def check(params) -> str:
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

    try:
        doc = json.loads(path.read_text())
        if doc["tag"] == tag and doc["check"] == check(doc["params"]):
            return doc["params"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    params = fit()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"tag": tag, "check": check(params), "params": params})
        _atomic(path, lambda p: p.write_text(text))
    except (OSError, TypeError, ValueError):
        pass
    return params


def _fits(sources, points, bank) -> list[dict]:
    """Point processes fitted to real tissue: each point source, else each style tile with labels, else the default
    (fits of files kept on disk by content: :func:`_cached_fit`)."""
    from .io import read_labels
    from .points import centroids, default_point_process, fit_point_process

    fits = []
    for src, (pts, _) in zip(sources, points):
        if len(pts) >= 2:
            def fit(src=src, pts=pts):
                if src["kind"] == "csv":
                    return fit_point_process(pts, tuple(src["extent"])).to_dict()
                return fit_point_process(read_labels(src["file"])).to_dict()

            p = _cached_fit(src["sha256"], src["kind"], src["extent"], fit)
            fits.append({"fitted_on": src["file"], "sha256": src["sha256"], "params": p})
    if not fits and not sources:
        for t in bank:
            if t["labels"]:
                def fit(t=t):
                    lab = read_labels(t["labels"])
                    pts = centroids(lab)  # what fit_point_process(lab) fits, counted without a sort of the pixels
                    return fit_point_process(pts, lab.shape).to_dict() if len(pts) >= 2 else None

                p = _cached_fit(t["labels_sha256"], "style labels", [], fit)
                if p is not None:
                    fits.append({"fitted_on": t["labels"], "sha256": t["labels_sha256"], "params": p})
    if not fits:
        if sources:
            raise ValueError("no point source holds 2 or more points: a point process cannot be fitted to them")
        fits.append({"fitted_on": "default (MoNuSeg training tiles)", "sha256": None,
                     "params": default_point_process().to_dict()})
    return fits


# ----------------------------------------------------------------------------------------------------------------
# one pair: the plan (cheap, in the parent) and its making (in a worker)


def _pair_seed(run_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(run_seed), int(index)]).generate_state(1)[0])


def _draw_style(cfg: dict, index: int, rng: np.random.Generator) -> tuple[int, int | None]:
    """(style index, domain) of pair ``index``: the first draws of its plan's ``rng``."""
    styles = cfg["styles"]
    if cfg["domains"]:
        domain = index % int(cfg["domains"])
        members = [j for j, t in enumerate(styles) if t["domain"] == domain]
        style = members[int(rng.integers(len(members)))]
    else:
        style = int(rng.integers(len(styles)))
        domain = styles[style]["domain"]
    return style, domain


def _plan_rng(cfg: dict, index: int) -> tuple[int, np.random.Generator]:
    seed = _pair_seed(cfg["seed"], index)
    return seed, np.random.default_rng([seed, 1])


def _styles_needed(cfg: dict, indices) -> list[int]:
    """The style tiles pairs ``indices`` are rendered in, each once, in the order the pairs first draw them
    (what :func:`_plan` draws; needs no point-process fit)."""
    seen: dict[int, None] = {}
    for i in indices:
        seen.setdefault(_draw_style(cfg, i, _plan_rng(cfg, i)[1])[0], None)
    return list(seen)


def _plan(cfg: dict, index: int) -> dict:
    """Everything random about pair ``index`` that the manifest records; a pure function of (cfg, index)."""
    seed, rng = _plan_rng(cfg, index)
    style, domain = _draw_style(cfg, index, rng)
    h, w = cfg["size"]
    mode = cfg["mode"]
    if mode == "real":
        j = int(rng.integers(len(cfg["sources"])))
        src = cfg["sources"][j]
        r0 = int(rng.integers(0, max(src["extent"][0] - h, 0) + 1))
        c0 = int(rng.integers(0, max(src["extent"][1] - w, 0) + 1))
        points = {"source": src["kind"], "index": j, "file": src["file"], "sha256": src["sha256"],
                  "crop": [r0, c0, h, w]}
    elif mode == "process":
        j = int(rng.integers(len(cfg["fits"])))
        fit = cfg["fits"][j]
        points = {"source": "process", "index": j, "process": cfg["process"], "params": fit["params"],
                  "fitted_on": fit["fitted_on"], "sha256": fit["sha256"]}
    else:
        points = {"source": "library", "n_sources": len(cfg["sources"]), "n_transforms": cfg["n_transforms"],
                  "crops": "one random crop of each source, then PointLibrary.augment (pair seed)"}
    t = cfg["styles"][style]
    return {
        "index": int(index),
        "seed": seed,
        "run_seed": int(cfg["seed"]),
        "points": points,
        "style": {"index": style, "file": t["file"], "sha256": t["sha256"], "labels": t["labels"],
                  "labels_sha256": t["labels_sha256"]},
        "domain": domain,
        "renderer": cfg["method"],
        "checkpoint": cfg["checkpoint"],
        "checkpoint_sha256": cfg["checkpoint_sha256"],
        "device": cfg["device"],
        "params": {"size": list(cfg["size"]), "prior": "default", "relabel": "sequential"},
        "nucsynth_version": cfg["version"],
    }


def _crop_points(pts, cls, r0, c0, h, w):
    q = pts - np.array([r0, c0], dtype=float)
    keep = (q[:, 0] >= -0.5) & (q[:, 0] <= h - 0.5) & (q[:, 1] >= -0.5) & (q[:, 1] <= w - 0.5)
    return q[keep], (cls[keep] if cls is not None else None)


def _layout(cfg: dict, points_data, plan: dict, seed: int):
    from .points import PointLibrary, PointProcessParams, PointSet, random_points

    h, w = cfg["size"]
    spec = plan["points"]
    if spec["source"] in ("labels", "csv"):
        pts, cls = points_data[spec["index"]]
        return _crop_points(pts, cls, *spec["crop"])
    if spec["source"] == "process":
        params = PointProcessParams.from_dict(spec["params"])
        return random_points((h, w), process=spec["process"], params=params, seed=seed), None
    rng = np.random.default_rng(seed)
    sets = []
    for src, (pts, cls) in zip(cfg["sources"], points_data):
        r0 = int(rng.integers(0, max(src["extent"][0] - h, 0) + 1))
        c0 = int(rng.integers(0, max(src["extent"][1] - w, 0) + 1))
        q, c = _crop_points(pts, cls, r0, c0, h, w)
        sets.append(PointSet(q, (h, w), c))
    ps = PointLibrary(sets).augment(rng, int(spec["n_transforms"]))
    if tuple(ps.shape) != (h, w):  # an odd number of quarter turns of a non-square layout
        ps = ps.rot90(1)
    return ps.points, (ps.classes if np.any(ps.classes) else None)


_STATE: dict[str, Any] = {}


def _init_worker(cfg: dict, points_data) -> None:
    _STATE.clear()
    _STATE.update(cfg=cfg, points=points_data, styles=OrderedDict())


def _worker_imports() -> None:
    """Import what a pair needs (a spawned worker at its start; before forking, the parent, once for all)."""
    import skimage.segmentation  # noqa: F401

    from . import masks, points, presynthesis, render  # noqa: F401
    from .render import classic  # noqa: F401


def _libc(name: str):
    """The C library's function ``name`` on Linux (through ctypes), else None."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def tune_malloc() -> bool:
    """Make glibc's ``malloc`` keep the memory a process frees for its next allocations (``mallopt``: arrays up to
    32 MB from the heap rather than each from a fresh ``mmap``, up to 512 MB of freed heap kept, 64 MB more taken
    at a time). The analysis of a style tile makes a hundred temporaries of 1-12 MB; each fresh mapping faults its
    pages in again: a fresh 60-pair run on the 2-core machine spent 2.0-2.3 s of its 14-15 CPU s in the kernel, and
    1.1-1.3 s with these settings. For processes ``generate`` owns: the CLI's and the pool's workers, not a napari
    session. False where there is no glibc (nothing changed)."""
    import ctypes

    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    return all([mallopt(m_mmap_threshold, 32 << 20), mallopt(m_trim_threshold, 512 << 20),
                mallopt(m_top_pad, 64 << 20)])


def _die_with(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when ``parent`` (the process that started it) ends, so a pool
    worker does not wait forever for tasks from a parent that was killed."""
    import signal

    prctl = _libc("prctl")
    if prctl is None:
        return
    pr_set_pdeathsig = 1  # linux/prctl.h
    prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it ended before the request was made
        os._exit(1)


def _init_pool_worker(cfg: dict, points_data, parent: int | None = None) -> None:
    """A pool worker ignores Ctrl-C and SIGTERM: the parent stops cleanly after the current pair and ends its
    workers (a signal sent to every process of the run, by Ctrl-C, ``kill -- -PGID``, systemd or a batch system,
    must not kill a worker while it sends a result back: ``ProcessPoolExecutor`` would wait for the rest of that
    result forever). It dies with its parent (:func:`_die_with`), and imports what a pair needs at once (while the
    parent is still preparing the run)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if parent is not None:
        _die_with(parent)
    tune_malloc()
    _init_worker(cfg, points_data)
    _worker_imports()


#: Set to ``spawn``, :func:`generate`'s worker processes are always spawned (else :func:`_start_method` decides).
START_METHOD_ENV = "NUCSYNTH_WORKER_START"
#: Modules whose presence makes forking unsafe (their threads and state do not survive a fork).
_NO_FORK_MODULES = ("torch", "PyQt5", "PyQt6", "PySide2", "PySide6")


def _start_method() -> str:
    """How the pool's workers start: ``fork`` on Linux when this process runs one thread (the CLI; not napari's
    worker threads) and has loaded no torch and no Qt, else ``spawn``. A forked worker inherits the parent's imports
    (a spawned one spends about 0.5 CPU s and 0.8 s importing numpy, scipy, scikit-image and the package) and
    starts at once. :data:`START_METHOD_ENV` set to ``spawn`` always spawns."""
    import multiprocessing as mp
    import sys
    import threading

    if os.environ.get(START_METHOD_ENV, "").strip().lower() == "spawn":
        return "spawn"
    safe = (sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()
            and threading.active_count() == 1 and threading.current_thread() is threading.main_thread()
            and not any(m in sys.modules for m in _NO_FORK_MODULES))
    return "fork" if safe else "spawn"


def _started() -> None:
    """Worker entry point that does nothing: submitted once per worker, it starts every process at once."""


def _style(cfg: dict, i: int):
    """(style, style_labels) of style tile ``i`` for the renderer. The classic renderer takes the tile's analysis,
    looked up by the files' sha256 (:func:`~napari_nucsynth.presynthesis.reference_from_files`: kept in memory
    and on disk, so a tile analysed before is not even decoded); the others take the tile and its labels."""
    from .io import read_image, read_labels
    from .presynthesis import pin_reference, reference_from_files

    t = cfg["styles"][i]
    if cfg["method"] == "classic":
        return reference_from_files(t["file"], t["labels"], image_sha256=t["sha256"],
                                    labels_sha256=t["labels_sha256"]), None
    cache = _STATE.setdefault("styles", OrderedDict())
    if i not in cache:
        # read-only, their content key computed once (not at every render): presynthesis.pin_reference
        cache[i] = pin_reference(read_image(t["file"]), read_labels(t["labels"]) if t["labels"] else None)
        while len(cache) > _STYLE_CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(i)
    return cache[i]


def _make(cfg: dict, points_data, plan: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """The pair of ``plan``: (image RGB uint8, labels uint32, number of points)."""
    from skimage.segmentation import relabel_sequential

    from .masks import sample_masks
    from .render import render

    s_points, s_masks, s_render = (int(v) for v in np.random.SeedSequence(plan["seed"]).generate_state(3))
    pts, cls = _layout(cfg, points_data, plan, s_points)
    labels = sample_masks(pts, tuple(cfg["size"]), classes=cls, seed=s_masks)
    labels = relabel_sequential(labels)[0].astype(np.uint32)
    style, style_labels = _style(cfg, plan["style"]["index"])
    image = render(labels, style, method=cfg["method"], style_labels=style_labels, seed=s_render,
                   device=cfg["device"], checkpoint=cfg["checkpoint"])
    return np.asarray(image, dtype=np.uint8), labels, len(pts)


def _work(plan: dict):
    """Worker entry point (spawn-safe: a module-level function over the state set by :func:`_init_worker`)."""
    image, labels, n_points = _make(_STATE["cfg"], _STATE["points"], plan)
    return plan["index"], image, labels, n_points


def _prefetch(style: int) -> str | None:
    """Worker entry point: analyse style tile ``style`` into the disk cache before the pairs that draw it arrive
    (a process that needs it meanwhile waits for this analysis rather than repeating it: the cache's file lock).
    An error is returned, not raised: the pair that draws the tile reports it."""
    try:
        _style(_STATE["cfg"], style)
    except Exception as exc:  # noqa: BLE001 - reported by the pair that needs the style
        return f"{type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# generate


#: CPU seconds of one 256 x 256 classic pair (layout, masks, render, files) and of analysing a new 1000 x 1000
#: style tile, on this project's 2-core machine (docs/benchmarks.md, "Fresh and analysed styles")
_PAIR_CPU_S, _TILE_CPU_S = 0.02, 0.3
#: a run shorter than this (CPU seconds in one process) is made in one: a spawned worker's start-up (about 1 s of
#: imports) would not pay back; a forked worker (:func:`_start_method`) starts at once and pays back sooner
_AUTO_MIN_CPU_S = 3.0
_AUTO_MIN_CPU_S_FORK = 1.0
_AUTO_MAX_WORKERS = 4


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def auto_workers(cfg: dict, todo) -> int:
    """The worker processes ``workers="auto"`` uses for pairs ``todo`` of a run's settings ``cfg``: 1 with one CPU
    core, a learned renderer (torch uses the cores within one process) or a run estimated (from its pairs' size and
    the style tiles the disk cache does not hold yet) at most :data:`_AUTO_MIN_CPU_S` CPU seconds
    (:data:`_AUTO_MIN_CPU_S_FORK` where the workers are forked); else one per core, at most
    :data:`_AUTO_MAX_WORKERS`. Measured on two cores: a 60-pair run of styles already analysed is faster in one
    process than with two spawned workers, and faster with two forked ones; the same run with 13 new styles is
    faster with two workers either way."""
    from .presynthesis import is_analysed, style_cache_dir

    todo = list(todo)
    cores = _cpu_count()
    if cores < 2 or cfg["method"] != "classic" or not todo:
        return 1
    h, w = cfg["size"]
    cpu = len(todo) * _PAIR_CPU_S * (h * w) / (256 * 256)
    if style_cache_dir() is not None:
        new = [j for j in _styles_needed(cfg, todo)
               if not is_analysed(cfg["styles"][j]["sha256"], cfg["styles"][j]["labels_sha256"])]
        cpu += len(new) * _TILE_CPU_S
    else:  # no disk cache: each process analyses every tile it draws
        cpu += len(_styles_needed(cfg, todo)) * _TILE_CPU_S
    least = _AUTO_MIN_CPU_S_FORK if _start_method() == "fork" else _AUTO_MIN_CPU_S
    return 1 if cpu <= least else min(cores, _AUTO_MAX_WORKERS)


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _config(n, styles, *, points_from, random_points, library_transforms, method, checkpoint, size, fmt, seed,
            domains, device, process, n_transforms):
    from . import __version__
    from .io.export import FORMATS
    from .points import PROCESSES
    from .render import get_renderer
    from .stain import stain_domains

    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    from ._checks import as_shape

    size = list(as_shape(size, "size"))
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
    renderer = get_renderer(method)  # ValueError naming the available methods
    if random_points:
        mode = "process"
    elif points_from is not None:
        mode = "library" if library_transforms else "real"
    else:
        raise ValueError("say where the nucleus layouts come from: points_from (a folder of label maps or points CSV "
                         "files) or random_points=True (processes fitted to real tissue)")
    ck, ck_sha = None, None
    if checkpoint is not None:
        if not getattr(renderer, "needs_checkpoint", False):
            raise ValueError(f"the {method!r} renderer takes no checkpoint")
        if not Path(checkpoint).is_file():
            raise ValueError(f"checkpoint file not found: {checkpoint}")
        ck = str(Path(checkpoint).resolve())
    elif getattr(renderer, "needs_checkpoint", False):
        default = getattr(renderer, "default_checkpoint", None)
        if default is None or not Path(default).is_file():
            raise ValueError(f"the {method!r} renderer needs a checkpoint (train one with `nucsynth train`)")
        ck = str(Path(default).resolve())
    if ck:
        ck_sha = _sha256(ck)
    bank = load_style_bank(styles)
    if domains is not None:
        k = _check_int("domains", domains, 1)
        if k > len(bank):
            raise ValueError(f"domains={k} needs at least {k} style tiles; {styles} holds {len(bank)}")
        from .io import read_image

        dom = stain_domains([read_image(t["file"]) for t in bank], k, seed=seed)
        for t, d in zip(bank, dom.tolist()):
            t["domain"] = int(d)
    else:
        for t in bank:
            t["domain"] = None
    sources, points = load_point_sources(points_from, size) if points_from is not None else ([], [])
    if mode == "process" and sources and not any(len(pts) >= 2 for pts, _ in points):
        raise ValueError("no point source holds 2 or more points: a point process cannot be fitted to them")
    cfg = {
        "seed": int(seed), "size": size, "method": method, "checkpoint": ck, "checkpoint_sha256": ck_sha,
        "device": device, "mode": mode, "process": process, "n_transforms": _check_int("n_transforms", n_transforms, 0),
        "domains": domains, "styles": bank, "sources": sources, "fits": [], "version": __version__,
    }
    return cfg, points  # the fits (mode "process") are made by generate (meanwhile its workers start)


#: Settings a resumed run must share with the run it continues (n may grow).
_SAME_ON_RESUME = ("seed", "size", "method", "checkpoint_sha256", "mode", "process", "n_transforms", "domains")


def _check_resume(old: dict | None, cfg: dict, out: Path) -> None:
    if old is None:
        raise ValueError(f"{out} holds a dataset that `generate` did not write (no 'generate' section in its manifest)")
    diff = [k for k in _SAME_ON_RESUME if json.dumps(old.get(k)) != json.dumps(cfg[k])]
    if [(t["sha256"], t["labels_sha256"], t["domain"]) for t in old.get("styles", [])] != \
            [(t["sha256"], t["labels_sha256"], t["domain"]) for t in cfg["styles"]]:
        diff.append("styles (files or their contents)")
    if [s["sha256"] for s in old.get("sources", [])] != [s["sha256"] for s in cfg["sources"]]:
        diff.append("points_from (files or their contents)")
    if diff:
        raise ValueError(f"cannot resume {out}: these settings differ from the run that wrote it: {', '.join(diff)}; "
                         "use the same settings, or write a new dataset")


def generate(
    n: int,
    styles,
    out,
    *,
    points_from=None,
    random_points: bool = False,
    library_transforms: bool = True,
    method: str = "classic",
    checkpoint=None,
    size=(256, 256),
    fmt: str = "png",
    seed: int = 0,
    workers: int | str = 1,
    domains: int | None = None,
    resume: bool = False,
    device: str = "auto",
    process: str = "cluster",
    n_transforms: int = 3,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    flush_every: float = 1.0,
) -> dict:
    """Generate a dataset of ``n`` synthetic (H&E image, instance labels) pairs.

    Parameters
    ----------
    n : int
        Number of pairs (ids ``syn_000000`` ... ``syn_{n-1}``, see :func:`pair_id`).
    styles : folder
        The style bank: reference H&E tiles, with their labels (passed to the renderer as ``style_labels``) in a
        ``labels/`` subfolder or as same-stem label files beside them (:func:`load_style_bank`).
    out : folder
        The dataset; it must not hold a dataset already unless ``resume`` (nothing is overwritten).
    points_from : folder, optional
        Label maps (their centroids) and/or napari points CSV files: the real layouts.
    random_points : bool
        Draw layouts from ``process`` fitted (:func:`~napari_nucsynth.points.fit_point_process`) to each layout of
        ``points_from``, else to the style tiles' labels, else the default MoNuSeg fit.
    library_transforms : bool
        With ``points_from`` and not ``random_points``: pass each layout through DAFF-GAN's point-library
        transforms (flips, rotations, affine, random cover, combination; :class:`~napari_nucsynth.points.
        PointLibrary`). False uses the real layouts as they are, cropped at random to ``size``.
    method, checkpoint, device : str, path, str
        The renderer (:func:`~napari_nucsynth.render.renderers`), its model (its sha256 is recorded) and device.
        Bit-for-bit reproduction is promised on the CPU.
    size : (int, int)
        Height and width of each pair.
    fmt : {"png", "hovernet", "coco", "cellpose", "stardist"}
        The layout (``docs/formats.md``).
    seed : int
        The run seed; pair ``i`` uses ``SeedSequence([seed, i])``, whatever the worker count.
    workers : int or "auto"
        Processes that render pairs (forked where that is safe, else spawned: :func:`_start_method`; the calling
        process writes the files and the manifest). With more than one, the workers also analyse the style tiles
        the disk cache does not hold yet, each tile once and before the pairs drawn in it, while the calling
        process fits the point processes. ``"auto"`` (:func:`auto_workers`): one for a short run or a learned
        renderer, else up to four, one per CPU core.
    domains : int, optional
        Cluster the style bank into this many stain/modality domains (:func:`~napari_nucsynth.stain.
        stain_domains`) and use them evenly: pair ``i`` takes a tile of domain ``i % domains``.
    resume : bool
        Continue an interrupted run of the same settings: the pairs its manifest lists are kept, files of pairs it
        does not list are removed, and the missing pairs are made.
    process, n_transforms :
        The point process of ``random_points``; the number of library transforms per layout.
    progress : callable, optional
        ``progress(done, n, what)`` after each pair (``done`` counts kept pairs too).
    should_stop : callable, optional
        Checked before each pair is written; True stops cleanly (the manifest lists what was written).
    flush_every : float
        Seconds between manifest writes (the manifest is always written at the end and when stopping).

    Returns
    -------
    dict
        The manifest (also ``out/manifest.json``); ``"complete"`` is True when all ``n`` pairs are there, and
        ``"generate"`` holds the run's settings.

    Raises
    ------
    ValueError
        Bad settings (with what to do), a resumed dataset whose settings differ, a renderer error.
    FileExistsError
        ``out`` holds a dataset (or other files) and ``resume`` is False.
    """
    from .io.export import MANIFEST

    if not (isinstance(workers, str) and workers == "auto"):
        workers = _check_int("workers", workers, 1)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file, not a folder")
    has_manifest = (out / MANIFEST).is_file()
    if not resume and out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise FileExistsError(f"{out} is not empty{' (it holds a dataset)' if has_manifest else ''}; pass resume=True "
                              "(--resume) to continue it, or choose a new folder")
    cfg, points_data = _config(n, styles, points_from=points_from, random_points=random_points,
                               library_transforms=library_transforms, method=method, checkpoint=checkpoint, size=size,
                               fmt=fmt, seed=seed, domains=domains, device=device, process=process,
                               n_transforms=n_transforms)
    listed: set[str] = set()
    if has_manifest and resume:
        from .io.export import read_manifest

        old = read_manifest(out)
        _check_resume(old.get("generate"), cfg, out)
        listed = {p["id"] for p in old.get("pairs", [])}
    if workers == "auto":
        workers = auto_workers(cfg, [i for i in range(int(n)) if pair_id(i) not in listed])
    pool = None
    try:
        if workers > 1:
            # the workers start, and analyse the new style tiles the pairs will draw, while this process fits the
            # point processes (in a thread; they need no fit: a pair's plan carries its process's parameters)
            pool = _Pool(cfg, points_data, workers)
            pool.prefetch(cfg, [i for i in range(int(n)) if pair_id(i) not in listed])
            if cfg["mode"] == "process":
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(1) as tx:
                    cfg["fits"] = pool.analyse_until(tx.submit(_fits, cfg["sources"], points_data, cfg["styles"]))
        elif cfg["mode"] == "process":
            cfg["fits"] = _fits(cfg["sources"], points_data, cfg["styles"])
        return _make_dataset(cfg, points_data, int(n), out, styles, points_from, fmt, resume, workers, pool,
                             progress, should_stop, flush_every)
    finally:
        if pool is not None:
            pool.close()


def _make_dataset(cfg, points_data, n, out, styles, points_from, fmt, resume, workers, pool, progress, should_stop,
                  flush_every) -> dict:
    """:func:`generate` once its settings (and fits) are made: the dataset's files and manifest."""
    from .io.export import PairAppender

    section = {**cfg, "n": n, "styles_dir": str(Path(styles).resolve()),
               "points_from": str(Path(points_from).resolve()) if points_from is not None else None, "format": fmt}
    app = PairAppender(out, fmt, resume=resume, extra={"generate": section})
    app.manifest["generate"] = {**app.manifest.get("generate", section), "n": n}
    app.remove_strays()
    todo = [i for i in range(n) if pair_id(i) not in app]
    done = n - len(todo)
    app.flush(complete=not todo)
    if not todo:
        return app.manifest
    stopped = False
    last = time.monotonic()

    def _add(index, image, labels, n_points, plan):
        app.add(pair_id(index), image, labels, None, {**plan, "n_points": n_points})

    def _written(index):
        nonlocal done, last
        done += 1
        if time.monotonic() - last >= flush_every:
            app.flush()
            last = time.monotonic()
        if progress is not None:
            progress(done, n, f"wrote {pair_id(index)}")

    def _write(index, image, labels, n_points, plan):
        _add(index, image, labels, n_points, plan)
        _written(index)

    try:
        if workers == 1:
            stopped = _run_in_process(cfg, points_data, todo, _add, _written, should_stop)
        else:
            stopped = pool.run(cfg, todo, _write, should_stop)
    finally:
        app.flush(complete=(not stopped) and all(pair_id(i) in app for i in range(n)))
    return app.manifest


def _run_in_process(cfg, points_data, todo, add, written, should_stop) -> bool:
    """Render ``todo`` in this process, each pair's files written by one writer thread while the next pair renders
    (image encoders release the GIL: on two cores the writes cost the run almost no time). ``add`` (the files and
    the manifest entry) runs in the thread, one pair at a time and in index order; ``written`` (manifest flushes,
    progress) runs here once the pair's files are complete, so the manifest is never written while a pair is being
    added. True when stopped (a stop asked for while a pair renders leaves that pair unwritten, as before the writer
    thread); a write's error is raised here, after which no later pair is written."""
    from concurrent.futures import ThreadPoolExecutor

    _init_worker(cfg, points_data)
    pending = None  # (index, future) of the pair being written

    def finish():
        nonlocal pending
        if pending is not None:
            index, fut = pending
            pending = None
            fut.result()
            written(index)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nucsynth-writer") as writer:
        try:
            for i in todo:
                if should_stop is not None and should_stop():
                    return True
                plan = _plan(cfg, i)
                _, image, labels, n_points = _work(plan)
                finish()
                if should_stop is not None and should_stop():  # asked while this pair rendered: not written
                    return True
                pending = (i, writer.submit(add, i, image, labels, n_points, plan))
            return False
        finally:
            finish()


class _Pool:
    """``workers`` processes (forked or spawned: :func:`_start_method`) that render pairs (one thread each), started
    before the run's point-process fits are made (their state is the run's settings without the fits, which no
    worker needs).

    The tasks are dealt by this process, a few at a time (``cap``), so that the workers are never idle and each
    style tile is analysed once, by one worker, before the pairs that draw it: a pair whose tile is analysed is
    sent at once (pairs in index order, at most ``window`` ahead of the last one written); else its tile's
    analysis; while that runs, the next tile not yet analysed; and only when none is left the pair itself (its
    worker then waits for the analysis: the disk cache's file lock). Results are written in index order."""

    _THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

    def __init__(self, cfg: dict, points_data, workers: int, executor: Any = None) -> None:
        """``executor``: tests pass one that runs the tasks in this process (its state set by
        :func:`_init_worker`); by default ``workers`` spawned processes."""
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self.stuck = False  # the executor waits forever for a result a killed worker was sending (_collect)
        self.cap = 2 * workers + 2
        self.window = 4 * workers
        self.inflight: dict[Any, tuple[str, int]] = {}
        self.state: dict[int, str] = {}  # style tile -> "new" | "running" | "done" (absent: nothing to analyse)
        self.order: list[int] = []  # the tiles to analyse, in the order the pairs first draw them
        self._env = {k: os.environ.get(k) for k in self._THREAD_VARS}
        for k, v in self._env.items():  # one thread per worker process (inherited at spawn)
            if v is None:
                os.environ[k] = "1"
        if executor is not None:
            self.ex = executor
            return
        start = _start_method()
        if start == "fork":
            _worker_imports()  # once, here: the forked workers inherit them
        self.ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(start),
                                      initializer=_init_pool_worker, initargs=(cfg, points_data, os.getpid()))
        for _ in range(workers):  # the pool starts a process per task submitted while none is idle
            self.ex.submit(_started)

    def prefetch(self, cfg: dict, indices) -> int:
        """Plan the analysis, in the workers, of the style tiles that pairs ``indices`` draw and that the disk
        cache does not hold yet (classic renderer; none without a disk cache, where the workers could not share
        an analysis); the first ones are sent at once. Returns the number of tiles to analyse."""
        from .presynthesis import is_analysed, style_cache_dir

        if cfg["method"] != "classic" or style_cache_dir() is None:
            return 0
        self.order = [j for j in _styles_needed(cfg, indices)
                      if not is_analysed(cfg["styles"][j]["sha256"], cfg["styles"][j]["labels_sha256"])]
        self.state = dict.fromkeys(self.order, "new")
        self._fill()
        return len(self.state)

    def _next_new(self) -> int | None:
        while self.order and self.state[self.order[0]] != "new":
            self.order.pop(0)
        return self.order[0] if self.order else None

    def _submit(self, kind: str, k: int, arg) -> None:
        fut = self.ex.submit(_work if kind == "pair" else _prefetch, arg)
        self.inflight[fut] = (kind, k)
        if kind == "style":
            self.state[k] = "running"

    def _fill(self, choose=None) -> None:
        while len(self.inflight) < self.cap:
            task = choose() if choose is not None else None
            if task is None:
                j = self._next_new()
                if j is None:
                    return
                task = ("style", j, j)
            self._submit(*task)

    def _collect(self, results: dict) -> None:
        """Wait for a task to finish (at least one must be running) and take in what finished."""
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        lost = 0
        while True:
            done, _ = wait(list(self.inflight), timeout=1.0, return_when=FIRST_COMPLETED)
            if done:
                break
            # a worker killed while it sent a result back leaves the executor waiting for the rest of that result
            # forever, without noticing the death: seen dead twice (a second apart), the pool is taken as broken
            lost = lost + 1 if self._dead_worker() else 0
            if lost >= 2:
                self.stuck = True
                raise BrokenProcessPool("a worker process died while it sent a result back")
        for fut in done:
            kind, k = self.inflight.pop(fut)
            if kind == "style":
                self.state[k] = "done"  # an error is the pair's to report
            else:
                results[k] = fut.result()

    def analyse_until(self, fut):
        """Keep the workers analysing style tiles until ``fut`` (work of this process, in a thread) is done, and
        return its result."""
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        while not fut.done():
            try:
                self._fill()
            except BrokenProcessPool:  # a worker died: run() says so (or stops, if this process was asked to)
                return fut.result()
            wait([fut, *self.inflight], return_when=FIRST_COMPLETED)
            for f in [f for f in self.inflight if f.done()]:
                self.state[self.inflight.pop(f)[1]] = "done"
        return fut.result()

    def run(self, cfg, todo, write, should_stop) -> bool:
        """Render ``todo``, writing results in index order; True when stopped."""
        plans = {i: _plan(cfg, i) for i in todo}
        results: dict[int, tuple] = {}
        pos = nxt = 0

        def choose():
            nonlocal nxt
            if nxt >= len(todo) or nxt - pos >= self.window:
                return None  # (then a tile not yet analysed, if any)
            i = todo[nxt]
            style = plans[i]["style"]["index"]
            st = self.state.get(style, "done")
            if st == "new":
                return ("style", style, style)
            if st == "running" and self._next_new() is not None:
                return None
            nxt += 1
            return ("pair", i, plans[i])

        from concurrent.futures.process import BrokenProcessPool

        try:
            while pos < len(todo):
                if should_stop is not None and should_stop():
                    return True
                self._fill(choose)
                i = todo[pos]
                if i not in results:
                    self._collect(results)
                    continue
                index, image, labels, n_points = results.pop(i)
                write(index, image, labels, n_points, plans[i])
                pos += 1
        except BrokenProcessPool as exc:
            self._kill_workers()
            if should_stop is not None and should_stop():
                return True  # a worker died while this process was asked to stop: the same stop
            raise ChildProcessError(f"a worker process ended abruptly ({exc}); the pairs written so far are kept: "
                                    "the same run with resume (--resume) continues it") from None
        return False

    def _processes(self) -> list:
        """The pool's worker processes (none for an executor of threads, as the tests pass)."""
        return list((getattr(self.ex, "_processes", None) or {}).values())

    def _dead_worker(self) -> bool:
        """Whether a process of the pool has ended (a worker ends only when the pool is shut down)."""
        return any(p.exitcode is not None for p in self._processes())

    def _kill_workers(self) -> None:
        """SIGKILL the pool's live processes: they ignore the SIGTERM with which the executor ends the others when
        one died, and it would wait for them forever."""
        import contextlib

        for p in self._processes():
            with contextlib.suppress(Exception):
                if p.is_alive():
                    p.kill()

    def close(self) -> None:
        try:
            if getattr(self.ex, "_broken", False) or self.stuck:
                self._kill_workers()
            # a stuck executor's thread never ends: not waited for (the CLI then ends its process at once: cli.run)
            self.ex.shutdown(wait=not self.stuck, cancel_futures=True)
        finally:
            for k, v in self._env.items():
                if v is None:
                    os.environ.pop(k, None)


# ----------------------------------------------------------------------------------------------------------------
# reading back, regenerating, verifying


def _entry(manifest: dict, pid: str) -> dict:
    for p in manifest["pairs"]:
        if p["id"] == pid:
            return p
    raise ValueError(f"no pair {pid!r} in the dataset ({len(manifest['pairs'])} pairs, e.g. "
                     f"{', '.join(p['id'] for p in manifest['pairs'][:3])})")


def read_pair(dataset, pid: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored (image RGB uint8, labels uint32) of pair ``pid`` of a dataset, in any export format."""
    from .io import read_image, read_labels
    from .io.export import read_manifest

    dataset = Path(dataset)
    manifest = read_manifest(dataset)
    e = _entry(manifest, pid)
    files = e["files"]
    if "npy" in files:
        arr = np.load(dataset / files["npy"], allow_pickle=False)
        return arr[..., :3].astype(np.uint8), arr[..., 3].astype(np.uint32)
    image = read_image(dataset / files["image"])[..., :3].astype(np.uint8)
    if "labels" in files:
        return image, read_labels(dataset / files["labels"])
    from .io import rle_decode  # COCO: the label map from the RLEs

    doc = json.loads((dataset / manifest.get("annotations", "annotations.json")).read_text())
    img = next(im for im in doc["images"] if im.get("nucsynth_id") == pid)
    labels = np.zeros((img["height"], img["width"]), dtype=np.uint32)
    for a in doc["annotations"]:
        if a["image_id"] == img["id"]:
            labels[rle_decode(a["segmentation"])] = a["instance_id"]
    return image, labels


def _config_from_manifest(gen: dict, need: dict | None = None) -> tuple[dict, list]:
    """The run settings stored in a manifest, with the files a pair needs checked against their sha256."""

    def check(path, sha, what):
        if path is None or sha is None:
            return
        if not Path(path).is_file():
            raise ValueError(f"{what} {path} is gone: it is needed to regenerate the pair")
        if _sha256(path) != sha:
            raise ValueError(f"{what} {path} changed since the dataset was written (sha256 differs)")

    check(gen.get("checkpoint"), gen.get("checkpoint_sha256"), "checkpoint")
    if need is not None:
        t = gen["styles"][need["style"]["index"]]
        check(t["file"], t["sha256"], "style tile")
        check(t["labels"], t["labels_sha256"], "style labels")
    points: list = []
    if gen["mode"] in ("real", "library"):
        use = range(len(gen["sources"]))
        if need is not None and gen["mode"] == "real":
            use = [need["points"]["index"]]
        points = [None] * len(gen["sources"])
        for j in use:
            src = gen["sources"][j]
            check(src["file"], src["sha256"], "point source")
            pts, cls, _, _ = _read_source(Path(src["file"]), gen["size"])
            points[j] = (pts, cls)
    return gen, points


def regenerate(dataset, pid: str, *, out=None, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Make pair ``pid`` of a generated dataset again from its manifest entry (bit for bit on the CPU).

    The style tile, its labels, the point sources and the checkpoint are read from where the run found them and
    checked against their recorded sha256. ``out`` (a file prefix) writes ``<out>_image.png`` and
    ``<out>_labels.tif``. Returns ``(image, labels)``.
    """
    from .io.export import read_manifest

    manifest = read_manifest(dataset)
    gen = manifest.get("generate")
    if not gen:
        raise ValueError(f"{dataset} was not written by `generate` (its manifest has no 'generate' section)")
    meta = _entry(manifest, pid)["meta"]
    cfg, points = _config_from_manifest(gen, meta)
    cfg = {**cfg, "device": device}
    _init_worker(cfg, points)
    image, labels, _ = _make(cfg, points, meta)
    if out is not None:
        import imageio.v3 as iio

        from .io import write_labels
        from .io._files import _atomic

        prefix = Path(out)
        _atomic(prefix.with_name(prefix.name + "_image.png"), lambda p: iio.imwrite(p, image, extension=".png"))
        write_labels(prefix.with_name(prefix.name + "_labels.tif"), labels)
    return image, labels


def verify(dataset, ids=None, *, device: str = "cpu") -> list[str]:
    """Regenerate pairs (all by default) and return the ids whose stored files differ from the regenerated pair."""
    from .io.export import read_manifest

    manifest = read_manifest(dataset)
    bad = []
    for pid in (ids if ids is not None else [p["id"] for p in manifest["pairs"]]):
        img, lab = regenerate(dataset, pid, device=device)
        simg, slab = read_pair(dataset, pid)
        if not (np.array_equal(img, simg) and np.array_equal(lab, slab)):
            bad.append(pid)
    return bad


# ----------------------------------------------------------------------------------------------------------------
# pairs in memory (for training runs), without a dataset folder


def synthetic_pairs(n: int, size: int, styles, *, style_labels=None, fit_labels=None, layouts: str = "process",
                    process: str = "cluster", point_sets=None, prior=None, own_style: bool = False,
                    method: str = "classic", checkpoint=None, device: str = "cpu", seed: int = 0,
                    options: dict | None = None, progress: Callable[[int, int, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` synthetic (image, labels) pairs of ``size`` x ``size`` in memory, rendered by ``method`` (the classic
    renderer by default).

    Parameters
    ----------
    n, size : int
        Number of pairs and their side in pixels.
    styles : sequence of (H, W, 3) arrays
        Reference H&E tiles; each pair is rendered in the style of one drawn at random (seeded).
    style_labels : sequence of label maps, optional
        The nuclei of each style tile (else the renderer detects them).
    fit_labels : label map or sequence of label maps, optional
        Real labels the masks' shape prior is fitted to (else the shipped MoNuSeg prior), and the layouts.
    layouts : {"process", "library", "mixed"}
        ``"process"``: layouts drawn from ``process`` (:func:`~napari_nucsynth.points.random_points`) fitted to
        a random one of ``fit_labels`` (else MoNuSeg's fit). ``"library"``: DAFF-GAN point-library augmentations
        (:class:`~napari_nucsynth.points.PointLibrary`) of the centroids of ``fit_labels`` (or of ``point_sets``;
        one of them is required), cut to ``size``. ``"mixed"``: even pairs ``"library"``, odd ones ``"process"``.
    point_sets : sequence of :class:`~napari_nucsynth.points.PointSet`, optional
        The library's layouts when no contour is at hand (a pathologist's clicks): used instead of the centroids
        of ``fit_labels``.
    prior : :class:`~napari_nucsynth.masks.ShapePrior`, optional
        The masks' shape prior (else fitted to ``fit_labels``, else the shipped MoNuSeg prior).
    own_style : bool
        Pair ``i`` takes its layout from library set ``k = i % len(sets)`` alone and is rendered in ``styles[k]``
        (each tile's clicks in that tile's own style; library layouts whatever ``layouts`` says); needs one style
        per set. Else the layout comes from the whole library and the style is drawn at random.
    method, checkpoint, device : str, path, str
        The renderer (:func:`napari_nucsynth.render.render`), its checkpoint (the shipped one when None) and
        device.
    options : dict, optional
        The renderer's own keywords (``render(..., options=...)``, e.g. ``{"edge_sigma": 0}`` for ``classic``),
        checked before any pair is made.
    seed : int
        Pair ``i`` uses ``SeedSequence([seed, i])`` for its layout, masks, style and render, whatever ``n``.
    progress, should_stop : callables, optional
        ``progress(i, n, msg)``; when ``should_stop()`` says so, the pairs done so far are returned.

    Returns
    -------
    images : list of (size, size, 3) uint8 arrays
    labels : list of (size, size) uint32 arrays, ids 1..N
    """
    from skimage.segmentation import relabel_sequential

    from .masks import ShapePrior, sample_masks
    from .points import (
        PointLibrary,
        PointSet,
        centroids,
        fit_point_process,
        random_points,
    )
    from .render import check_options, render

    if not len(styles):
        raise ValueError("synthetic pairs need at least one style image (an H&E tile)")
    options = check_options(method, options)
    if style_labels is not None and len(style_labels) == 0:
        style_labels = None
    if style_labels is not None and len(style_labels) != len(styles):
        raise ValueError(f"style_labels must give one label map (or None) per style: {len(style_labels)} for "
                         f"{len(styles)} styles")
    if layouts not in ("process", "library", "mixed"):
        raise ValueError(f"layouts must be 'process', 'library' or 'mixed', got {layouts!r}")
    if fit_labels is None:
        maps = []
    elif isinstance(fit_labels, np.ndarray) and fit_labels.ndim == 2:
        maps = [fit_labels]
    else:
        maps = list(fit_labels)
    maps = [m for m in maps if np.any(m)]
    sets = list(point_sets) if point_sets is not None else [PointSet(centroids(m), m.shape) for m in maps]
    if layouts != "process" and not sets:
        raise ValueError(f"layouts={layouts!r} needs fit_labels or point_sets: the real layouts that are augmented")
    if own_style and len(sets) != len(styles):
        raise ValueError(f"own_style needs one style per layout: {len(sets)} layouts for {len(styles)} styles")
    fits = {}
    if prior is None and maps:
        if progress:
            progress(0, n, "fitting the shape prior to the labels")
        prior = ShapePrior.fit_many(maps, seed=0)
    libraries = ([PointLibrary([s]) for s in sets] if own_style else [PointLibrary(sets)]) if sets else []
    images, labels = [], []
    for i in range(int(n)):
        if should_stop and should_stop():
            break
        s_layout, s_masks, s_style, s_render = (int(v) for v in np.random.SeedSequence([seed, i]).generate_state(4))
        k_own = i % len(sets) if own_style else None
        if layouts == "library" or (layouts == "mixed" and i % 2 == 0) or own_style:
            ps = libraries[k_own or 0].augment(s_layout)
            pts = ps.points[(ps.points[:, 0] < size - 0.5) & (ps.points[:, 1] < size - 0.5)]
        else:
            params = None
            if maps:
                k = int(np.random.default_rng(s_layout).integers(len(maps)))
                if k not in fits:
                    fits[k] = fit_point_process(maps[k], seed=0)
                params = fits[k]
            pts = random_points((size, size), process=process, params=params, seed=s_layout)
        lab = relabel_sequential(sample_masks(pts, (size, size), prior=prior, seed=s_masks))[0].astype(np.uint32)
        k = k_own if own_style else int(np.random.default_rng(s_style).integers(len(styles)))
        sl = style_labels[k] if style_labels is not None else None
        images.append(np.asarray(render(lab, styles[k], method=method, style_labels=sl, seed=s_render,
                                        checkpoint=checkpoint, device=device, options=options), dtype=np.uint8))
        labels.append(lab)
        if progress:
            progress(i + 1, n, f"synthetic pair {i + 1}/{n}")
    return images, labels
