"""Review of a dataset's (image, labels) pairs: the queue, the loader and the persistent review state (Qt-free).

A *dataset* is a folder written by :func:`~.export.export_pairs` (or ``nucsynth generate``), described by its
``manifest.json``, or a plain folder of image + label files (paired by stem, as :func:`~.formats.read_pair_folder`
pairs them). :func:`build_queue` turns either into a list of entries ``{"id", "files": {...}}`` (the manifest's
own entries, or entries made from the files found); :func:`load_pair` reads one entry's image and labels.

The review state lives beside the data, in ``<dataset>/review.json``::

    {"format": "nucsynth-review", "format_version": 1, "source": "manifest" | "folder", "updated": "...",
     "pairs": {"<id>": {"decision": "accepted" | "rejected" | "skipped" | null, "time": "...",
                        "edited": true, "labels": "reviewed/<id>.tif",
                        "types_edited": true, "types": "reviewed/types/<id>.tif"}}}

Corrected labels are stored as uint32 TIFF in ``<dataset>/reviewed/<id>.tif`` and corrected type maps (datasets
with classes) as uint16 TIFF in ``<dataset>/reviewed/types/<id>.tif``; the dataset's own files are never
modified. Every write is atomic (temporary file, then ``os.replace``). "Skipped" pairs count as undecided: the
review resumes at the first pair that is neither accepted nor rejected. See ``docs/review.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._files import _atomic, read_labels, write_labels
from .export import COCO_JSON, MANIFEST, _safe_id, _types_u16, read_manifest
from .formats import (
    Sample,
    _hovernet_array,
    _read_rgb,
    _to_types,
    _to_uint32,
    coco_masks,
    pair_files,
)

__all__ = [
    "DECISIONS",
    "REVIEW_DIR",
    "REVIEW_FILE",
    "AcceptedPairs",
    "build_queue",
    "class_names",
    "counts",
    "first_undecided",
    "instance_types",
    "is_decided",
    "load_pair",
    "load_review_labels",
    "load_review_types",
    "load_sample",
    "new_state",
    "next_undecided",
    "read_review",
    "record",
    "scan_pair_folder",
    "write_review",
]

REVIEW_FILE = "review.json"
REVIEW_DIR = "reviewed"
REVIEW_TYPES_DIR = "reviewed/types"
REVIEW_FORMAT = "nucsynth-review"
DECISIONS = ("accepted", "rejected", "skipped")
_FINAL = ("accepted", "rejected")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------------
# the queue


def scan_pair_folder(folder) -> list[dict]:
    """Entries ``{"id", "files": {"image", "labels"}}`` of a plain folder of pairs, without reading any pixel.

    Pairs as :func:`~.formats.read_pair_folder` does: ``folder/images`` with ``folder/labels`` or
    ``folder/masks``, or one folder of ``<stem>_img.*``/``<stem>.*`` images and ``<stem>_masks.*`` (``_mask``,
    ``_labels``, ``_label``, ``_inst``, ``_seg``) label maps. Paths are relative to ``folder``. A label map
    without an image has no ``"image"`` file; images without a label map are left out.
    """
    root = Path(folder)
    try:
        labs, imgs, _, _ = pair_files(root)
    except ValueError as exc:
        if not root.is_dir():
            raise
        raise ValueError(
            f"{exc}: open a dataset with a manifest.json, a folder with images/ and labels/ (or masks/), or one "
            "folder of <name>_img.png + <name>_masks.tif files"
        ) from None
    out = []
    for stem, lp in sorted(labs.items()):
        files = {"labels": lp.relative_to(root).as_posix()}
        if stem in imgs:
            files["image"] = imgs[stem].relative_to(root).as_posix()
        out.append({"id": stem, "files": files})
    return out


def build_queue(dataset) -> tuple[list[dict], str]:
    """The review queue of a dataset folder: ``(entries, source)``.

    With a ``manifest.json`` the entries are the manifest's pairs, in its order (``source="manifest"``; for COCO
    exports each entry gets ``"annotations"``, the JSON holding its masks); otherwise the folder is scanned with
    :func:`scan_pair_folder` (``source="folder"``). Ids must be unique.
    """
    root = Path(dataset)
    if not root.is_dir():
        raise ValueError(f"dataset folder not found: {root}")
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        fmt = manifest.get("format")
        entries = []
        for p in manifest["pairs"]:
            e = dict(p)
            e["files"] = dict(p.get("files") or {})
            if fmt == "coco" or ("labels" not in e["files"] and "npy" not in e["files"]):
                e.setdefault("annotations", manifest.get("annotations", COCO_JSON))
            entries.append(e)
        source = "manifest"
    else:
        entries, source = scan_pair_folder(root), "folder"
    seen: set[str] = set()
    for e in entries:
        pid = str(e["id"])
        if pid in seen:
            raise ValueError(f"pair id {pid!r} appears twice in {root}: ids must be unique")
        seen.add(pid)
    return entries, source


# ----------------------------------------------------------------------------------------------------------------
# loading one pair


_COCO_CACHE: dict[str, tuple[int, dict]] = {}


def _coco_doc(path: Path) -> dict:
    """The parsed COCO JSON with annotations grouped by image, cached by path and modification time."""
    if not path.is_file():
        raise ValueError(f"COCO annotations not found: {path}")
    mtime = path.stat().st_mtime_ns
    hit = _COCO_CACHE.get(str(path))
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name} is not valid JSON ({e})") from None
    by_image: dict[Any, list[dict]] = {}
    for ann in doc.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    images = {}
    for im in doc.get("images", []):
        images[str(im.get("nucsynth_id", Path(im["file_name"]).stem))] = im
    parsed = {"images": images, "by_image": by_image}
    _COCO_CACHE.clear()  # one document at a time
    _COCO_CACHE[str(path)] = (mtime, parsed)
    return parsed


def _coco_labels(path: Path, pid: str, typed: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels of pair ``pid`` from a COCO JSON, with its ``category_id`` painted per pixel when ``typed``."""
    doc = _coco_doc(path)
    im = doc["images"].get(pid)
    if im is None:
        raise ValueError(f"{path.name} has no image for pair {pid!r}")
    labels, types = coco_masks(doc["by_image"].get(im["id"], []), int(im["height"]), int(im["width"]), path.name)
    return labels, (types if typed else None)


def load_sample(dataset, entry: dict) -> Sample:
    """Read one queue entry from the dataset's own files: a :class:`~.formats.Sample` with the image (RGB uint8
    or None), labels (uint32) and type map (int32, or None where the pair has no classes).

    ``entry["files"]`` gives paths relative to ``dataset``: ``image`` + ``labels`` (png, stardist, cellpose exports
    and plain folders; a ``types`` file where the export had type maps), ``npy`` (HoVer-Net stacks: the type
    channel counts as classes when the manifest says ``has_types``, or, for a stack without that field, when the
    channel is not just the foreground) or ``image`` with the masks in the COCO JSON named by
    ``entry["annotations"]`` (default ``annotations.json``; ``category_id`` is the class when ``has_types``).
    Fields a newer writer adds are ignored.
    """
    root = Path(dataset)
    if not isinstance(entry, dict) or "id" not in entry:
        raise ValueError("entry must be a dict with an 'id' and 'files', as in manifest.json")
    pid = str(entry["id"])
    files = entry.get("files") or {}
    has_types = entry.get("has_types")
    if "npy" in files:
        path = root / files["npy"]
        if not path.is_file():
            raise ValueError(f"pair {pid}: file not found: {path}")
        s = _hovernet_array(np.load(path, allow_pickle=False), pid, str(path))
        types = s.types
        if types is not None and (has_types is False or (has_types is None and np.array_equal(types, s.labels > 0))):
            types = None  # the writer's foreground channel of an untyped pair, not classes
        return Sample(pid, s.image, s.labels, types, {"source": str(path)})
    image = None
    if files.get("image"):
        ip = root / files["image"]
        if not ip.is_file():
            raise ValueError(f"pair {pid}: image file not found: {ip}")
        image = _read_rgb(ip)
    types = None
    if files.get("labels"):
        labels = read_labels(root / files["labels"])
        if files.get("types"):
            tp = root / files["types"]
            if not tp.is_file():
                raise ValueError(f"pair {pid}: type map not found: {tp}")
            types = _to_types(read_labels(tp), f"type map of pair {pid}")
            if types.shape != labels.shape:
                raise ValueError(f"pair {pid}: type map {types.shape} and labels {labels.shape} differ in shape")
    else:
        labels, types = _coco_labels(root / entry.get("annotations", COCO_JSON), pid, typed=bool(has_types))
    if image is not None and image.shape[:2] != labels.shape:
        raise ValueError(f"pair {pid}: image {image.shape[:2]} and labels {labels.shape} differ in shape")
    return Sample(pid, image, labels, types, {"source": str(root)})


def load_pair(dataset, entry: dict) -> tuple[np.ndarray | None, np.ndarray]:
    """Read one queue entry: ``(image RGB uint8 or None, labels uint32)`` (:func:`load_sample` without classes)."""
    s = load_sample(dataset, entry)
    return s.image, s.labels


def instance_types(labels, types) -> tuple[np.ndarray, int]:
    """Make a type map agree with an instance map: each instance takes the most common non-zero class under it.

    After an edit (a nucleus split, merged, grown or drawn anew) the per-pixel classes no longer follow the
    instances; this gives every pixel of an instance its instance's class (ties go to the smaller class id) and
    background 0. An instance with no classed pixel under it (one drawn on background) gets 0.

    Returns ``(type map int32, number of instances left without a class)``.
    """
    lab = np.asarray(labels)
    t = np.asarray(types)
    if lab.shape != t.shape:
        raise ValueError(f"type map {t.shape} and labels {lab.shape} differ in shape")
    ids, inv = np.unique(lab, return_inverse=True)
    inv = inv.reshape(-1)
    tf = t.reshape(-1).astype(np.int64)
    cls = np.zeros(ids.size, dtype=np.int64)
    m = (tf > 0) & (lab.reshape(-1) > 0)
    if m.any():
        k = int(tf.max()) + 1
        keys, n = np.unique(inv[m].astype(np.int64) * k + tf[m], return_counts=True)
        inst, c = keys // k, keys % k
        order = np.lexsort((c, -n, inst))  # per instance: most pixels first, then the smaller class
        first = np.ones(order.size, dtype=bool)
        first[1:] = inst[order][1:] != inst[order][:-1]
        cls[inst[order][first]] = c[order][first]
    if ids.size and ids[0] == 0:
        cls[0] = 0
    out = cls[inv].reshape(lab.shape).astype(np.int32)
    untyped = int(np.count_nonzero((ids > 0) & (cls == 0)))
    return out, untyped


# ----------------------------------------------------------------------------------------------------------------
# review state


def new_state(source: str = "manifest") -> dict:
    """An empty review state."""
    return {"format": REVIEW_FORMAT, "format_version": 1, "source": source, "updated": _now(), "pairs": {}}


def read_review(dataset, source: str = "manifest") -> dict:
    """The review state of ``dataset`` (``review.json``), or a new empty one when there is none.

    Raises ``ValueError`` when the file exists but is not a review state.
    """
    path = Path(dataset) / REVIEW_FILE
    if not path.is_file():
        return new_state(source)
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away to start the review afresh") from None
    if not isinstance(state, dict) or not isinstance(state.get("pairs"), dict):
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError (GUIDE)
            f"{path} is not a nucsynth review state (needs a 'pairs' dict)"
        )
    for pid, rec in state["pairs"].items():
        if not isinstance(rec, dict) or rec.get("decision") not in (*DECISIONS, None):
            raise ValueError(f"{path}: pair {pid!r} has no valid decision (one of {', '.join(DECISIONS)} or null)")
    return state


def write_review(dataset, state: dict) -> Path:
    """Write ``state`` to ``dataset/review.json`` atomically (temporary file, then ``os.replace``)."""
    if not isinstance(state, dict) or not isinstance(state.get("pairs"), dict):
        raise ValueError("state must be a dict with a 'pairs' dict (see new_state)")  # noqa: TRY004
    state["updated"] = _now()
    text = json.dumps(state, indent=1, sort_keys=False) + "\n"
    path = Path(dataset) / REVIEW_FILE

    def _write(p):
        Path(p).write_text(text)

    _atomic(path, _write)
    return path


def record(dataset, state: dict, pid, decision: str | None, labels=None, *, original=None, types=None,
           original_types=None) -> dict:
    """Record a decision (and corrected labels or classes) for pair ``pid``, then write ``review.json``.

    Parameters
    ----------
    decision : {"accepted", "rejected", "skipped"} or None
        None keeps the pair's decision (e.g. an edit saved when leaving a pair without deciding).
    labels : array, optional
        The labels as reviewed. When given and different from ``original`` (or when ``original`` is None), they
        are written to ``reviewed/<id>.tif`` (uint32, atomic) and the pair is marked ``"edited"``; when equal to
        ``original`` an earlier correction is dropped (its file removed).
    original : array, optional
        The dataset's own labels of the pair.
    types, original_types : array, optional
        The same for the pair's type map (datasets with classes): ``reviewed/types/<id>.tif`` (uint16) and
        ``"types_edited"``.

    Returns the updated state (also modified in place).
    """
    if decision is not None and decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)} or None, got {decision!r}")
    pid = _safe_id(pid)
    rec = dict(state["pairs"].get(pid) or {"decision": None})
    if decision is not None:
        rec["decision"] = decision
    rec["time"] = _now()
    root = Path(dataset)
    if labels is not None:
        lab = _to_uint32(labels, f"labels of pair {pid}")
        _store(root, rec, "edited", "labels", f"{REVIEW_DIR}/{pid}.tif", lab, original)
    if types is not None:
        t16 = _types_u16(_to_types(types, f"type map of pair {pid}"), pid)
        _store(root, rec, "types_edited", "types", f"{REVIEW_TYPES_DIR}/{pid}.tif", t16, original_types)
    state["pairs"][pid] = rec
    write_review(root, state)
    return state


def _store(root: Path, rec: dict, flag: str, key: str, rel: str, arr: np.ndarray, original) -> None:
    """Write a correction (or drop an earlier one when ``arr`` equals ``original``) and note it in ``rec``."""
    if original is not None and np.array_equal(arr, np.asarray(original)):
        if rec.pop(flag, None):
            (root / rel).unlink(missing_ok=True)
        rec.pop(key, None)
    else:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_labels(root / rel, arr)
        rec[flag], rec[key] = True, rel


def load_review_labels(dataset, state: dict, pid) -> np.ndarray | None:
    """The corrected labels of ``pid`` (``reviewed/<id>.tif``), or None when the pair was not edited."""
    return _load_correction(dataset, state, pid, "edited", "labels")


def load_review_types(dataset, state: dict, pid) -> np.ndarray | None:
    """The corrected type map of ``pid`` (``reviewed/types/<id>.tif``, int32), or None when its classes were not
    edited."""
    t = _load_correction(dataset, state, pid, "types_edited", "types")
    return None if t is None else t.astype(np.int32)


def _load_correction(dataset, state: dict, pid, flag: str, key: str) -> np.ndarray | None:
    rec = state["pairs"].get(str(pid)) or {}
    if not rec.get(flag) or not rec.get(key):
        return None
    path = Path(dataset) / rec[key]
    if not path.is_file():
        raise ValueError(f"review.json lists corrected {key} for {pid} at {path}, but the file is missing")
    return read_labels(path)


def class_names(dataset) -> dict[int, str]:
    """Class id -> name from the dataset's manifest (``class_names``); empty without a manifest or names."""
    root = Path(dataset)
    if not (root / MANIFEST).is_file():
        return {}
    names = read_manifest(root).get("class_names") or {}
    return {int(k): str(v) for k, v in names.items()}


def decision(state: dict, pid) -> str | None:
    """The recorded decision of ``pid`` (None when none)."""
    return (state["pairs"].get(str(pid)) or {}).get("decision")


def is_decided(state: dict, pid) -> bool:
    """Accepted or rejected (skipped pairs count as undecided)."""
    return decision(state, pid) in _FINAL


def first_undecided(queue: list[dict], state: dict) -> int | None:
    """Index of the first entry neither accepted nor rejected; None when every pair is decided."""
    return next((i for i, e in enumerate(queue) if not is_decided(state, e["id"])), None)


def next_undecided(queue: list[dict], state: dict, after: int) -> int | None:
    """The next undecided index after ``after`` (wrapping round; ``after`` itself last); None when none."""
    n = len(queue)
    for k in range(1, n + 1):
        i = (after + k) % n
        if not is_decided(state, queue[i]["id"]):
            return i
    return None


def counts(queue: list[dict], state: dict) -> dict[str, int]:
    """``{"accepted", "rejected", "skipped", "remaining", "edited", "total"}`` over the queue's pairs."""
    out = {"accepted": 0, "rejected": 0, "skipped": 0, "edited": 0, "total": len(queue)}
    for e in queue:
        rec = state["pairs"].get(str(e["id"])) or {}
        if rec.get("decision") in DECISIONS:
            out[rec["decision"]] += 1
        out["edited"] += bool(rec.get("edited") or rec.get("types_edited"))
    out["remaining"] = out["total"] - out["accepted"] - out["rejected"]
    return out


class AcceptedPairs:
    """The accepted pairs of a review, for :func:`~.export.export_pairs`: ``(id, image, labels, types, meta)``.

    Has a length (so the export reports ``done / total``) and reads one pair at a time; labels are the corrected
    ones where the pair was edited. Pairs with classes keep them: the corrected type map where the classes were
    edited, the dataset's otherwise, made to agree with the final instances by :func:`instance_types` whenever
    anything was edited (so a split, merged or grown nucleus keeps one class). ``types`` is None for pairs
    without classes. ``meta`` holds the manifest's ``meta`` of the pair and ``"review"``: decision time, whether
    it was edited, the source, and ``"untyped"`` (instances left without a class) for pairs with classes.
    :attr:`class_names` are the dataset manifest's, for ``export_pairs(class_names=...)``.
    """

    def __init__(self, dataset, queue: list[dict], state: dict):
        self.dataset = Path(dataset)
        self.state = json.loads(json.dumps(state))  # a snapshot: later decisions do not change this export
        self.entries = [e for e in queue if decision(self.state, e["id"]) == "accepted"]
        self.class_names = class_names(self.dataset)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple]:
        for e in self.entries:
            pid = str(e["id"])
            s = load_sample(self.dataset, e)
            if s.image is None:
                raise ValueError(f"pair {pid} has no image in {self.dataset}: it cannot be exported")
            edited = load_review_labels(self.dataset, self.state, pid)
            edited_types = load_review_types(self.dataset, self.state, pid)
            labels = s.labels if edited is None else edited
            types = s.types if edited_types is None else edited_types
            rec = self.state["pairs"][pid]
            meta = dict(e.get("meta") or {})
            review = {"decision": "accepted", "time": rec.get("time"), "edited": edited is not None,
                      "source": str(self.dataset)}
            if types is not None:
                if types.shape != labels.shape:
                    raise ValueError(f"pair {pid}: type map {types.shape} and labels {labels.shape} differ in shape")
                untyped = 0
                if edited is not None or edited_types is not None:
                    types, untyped = instance_types(labels, types)
                review["types_edited"] = edited_types is not None
                review["untyped"] = untyped
            meta["review"] = review
            yield pid, s.image, labels, types, meta
