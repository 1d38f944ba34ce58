"""Instance segmentation metrics as the field computes them (HoVer-Net's conventions).

Every metric takes ``(true, pred)`` instance label maps (0 = background, any integer dtype, any ids) of the same
shape. They all derive from one intersection table built in a single pass over the pixels
(:func:`overlaps`), so computing all of them for a 1000 x 1000 tile with 700 nuclei takes milliseconds.

Conventions (Graham et al., HoVer-Net, ``compute_stats.py``), kept exactly, epsilons included:

- ids are relabelled to ``1..N`` in ascending order first (this only decides ties);
- **AJI**: each true nucleus takes the prediction with the largest ``inter / (union + 1e-6)`` (the smallest
  relabelled id on ties; predictions may be reused); AJI = sum of those intersections / (sum of those unions +
  areas of true nuclei that overlap nothing + areas of predictions never chosen);
- **AJI+**: as AJI, but pairs are one-to-one with the largest total IoU (Hungarian assignment), pairs with
  IoU > 0 only;
- **PQ** = DQ x SQ: pairs with IoU strictly above 0.5 (unique by construction); DQ = TP / (TP + FP/2 + FN/2),
  SQ = sum of the pairs' IoU / (TP + 1e-6);
- **Dice** (binary foreground), **Dice 2** (HoVer-Net's ensemble Dice: 2 sum inter / sum (|T| + |P|) over all
  overlapping pairs), **object F1** (2 TP / (2 TP + FP + FN) with one-to-one matches at IoU > 0.5, which equals DQ),
  **pixel F1** (foreground pixels: 2 TP / (2 TP + FP + FN), which equals binary Dice).

Empty cases, never an error: when both maps are empty every metric is 1.0 (the prediction is perfect); when exactly
one is empty every metric is 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .._checks import as_labels

__all__ = [
    "METRICS",
    "Overlaps",
    "overlaps",
    "aji",
    "aji_plus",
    "pq",
    "dice",
    "dice2",
    "object_f1",
    "pixel_f1",
    "Matching",
    "match",
    "instance_metrics",
    "Evaluation",
    "evaluate",
    "ERROR_CLASSES",
    "error_map",
]

#: The keys of :func:`instance_metrics`, in the order tables show them.
METRICS = ("aji", "aji_plus", "dice", "dice2", "dq", "sq", "pq", "object_f1", "pixel_f1")

_EPS = 1.0e-6  # HoVer-Net's


# ----------------------------------------------------------------------------------------------------------------
# The shared intersection table
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Overlaps:
    """Everything the metrics need, from one pass over the pixels.

    Attributes
    ----------
    true_ids, pred_ids : (Nt,), (Np,) arrays
        The ids present in each map, ascending (position ``i`` is relabelled id ``i + 1``).
    true_area, pred_area : (Nt,), (Np,) int64
        Pixel counts.
    ti, pj : (K,) int64
        Indices (into ``true_ids`` / ``pred_ids``) of every overlapping pair, sorted by ``ti`` then ``pj``.
    inter : (K,) int64
        The pairs' intersections.
    fg_true, fg_pred, fg_both : int
        Foreground pixel counts of each map and of their overlap.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    true_area: np.ndarray
    pred_area: np.ndarray
    ti: np.ndarray
    pj: np.ndarray
    inter: np.ndarray
    fg_true: int
    fg_pred: int
    fg_both: int

    @property
    def union(self) -> np.ndarray:
        return self.true_area[self.ti] + self.pred_area[self.pj] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """IoU of each overlapping pair, ``inter / union`` (no epsilon: unions of overlapping pairs are >= 1)."""
        return self.inter / self.union

    @property
    def empty_case(self) -> float | None:
        """1.0 when both maps are empty, 0.0 when exactly one is, else None."""
        nt, np_ = self.true_ids.size, self.pred_ids.size
        if nt == 0 and np_ == 0:
            return 1.0
        if nt == 0 or np_ == 0:
            return 0.0
        return None


def _dense_index(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids present ascending, per-pixel index 0 = background / 1..N, areas) without sorting the pixels."""
    flat = lab.ravel()
    top = int(flat.max()) if flat.size else 0
    if top < 4 * flat.size + 1024:  # a lookup table: one bincount, no sort
        if flat.dtype.itemsize > 4 or flat.dtype.kind == "i":
            flat = flat.astype(np.intp, copy=False)  # bincount takes what casts safely to intp
        counts = np.bincount(flat, minlength=top + 1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids, lut[flat], counts[ids].astype(np.int64)
    ids, inv = np.unique(flat, return_inverse=True)
    if ids.size and ids[0] == 0:
        ids = ids[1:]
    else:
        inv = inv + 1
    areas = np.bincount(inv, minlength=ids.size + 1)[1:].astype(np.int64)
    return ids, inv.astype(np.int64), areas


def _as_pair(true, pred) -> tuple[np.ndarray, np.ndarray]:
    t = as_labels(true, "true")
    p = as_labels(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"true and pred must have the same shape, got {t.shape} and {p.shape}")
    if t.dtype.kind == "i":
        t = t.astype(np.int64, copy=False)
    if p.dtype.kind == "i":
        p = p.astype(np.int64, copy=False)
    return t, p


def overlaps(true, pred) -> Overlaps:
    """Build the intersection table of two instance label maps (see :class:`Overlaps`)."""
    if isinstance(true, Overlaps):
        return true
    t, p = _as_pair(true, pred)
    tid, tix, tarea = _dense_index(t)
    pid, pix, parea = _dense_index(p)
    nt, npd = tid.size, pid.size
    both = (tix > 0) & (pix > 0)
    tb, pb = tix[both] - 1, pix[both] - 1
    if nt * npd <= 1 << 24:  # dense table by bincount: no sort
        table = np.bincount(tb * npd + pb, minlength=nt * npd)
        k = np.flatnonzero(table)
        ti, pj, inter = k // max(npd, 1), k % max(npd, 1), table[k]
    else:  # very many instances: sort the overlapping pixels' pair keys instead
        keys, inter = np.unique(tb * npd + pb, return_counts=True)
        ti, pj = keys // npd, keys % npd
    fg_both = int(both.sum())
    return Overlaps(
        true_ids=tid,
        pred_ids=pid,
        true_area=tarea,
        pred_area=parea,
        ti=ti.astype(np.int64),
        pj=pj.astype(np.int64),
        inter=inter.astype(np.int64),
        fg_true=int(tarea.sum()),
        fg_pred=int(parea.sum()),
        fg_both=fg_both,
    )


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
def _aji_sums(o: Overlaps) -> tuple[float, float]:
    """AJI's (intersection, union) sums."""
    if o.ti.size == 0:
        return 0.0, float(o.fg_true + o.fg_pred)
    union = o.union
    score = o.inter / (union + _EPS)
    # per true nucleus, the best prediction: sort by (ti, -score, pj) and take the first of each ti
    order = np.lexsort((o.pj, -score, o.ti))
    first = order[np.r_[True, o.ti[order][1:] != o.ti[order][:-1]]]
    inter_sum = float(o.inter[first].sum())
    union_sum = float(union[first].sum())
    paired_t = np.zeros(o.true_ids.size, bool)
    paired_t[o.ti[first]] = True
    paired_p = np.zeros(o.pred_ids.size, bool)
    paired_p[o.pj[first]] = True
    union_sum += float(o.true_area[~paired_t].sum() + o.pred_area[~paired_p].sum())
    return inter_sum, union_sum


def aji(true, pred=None) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017) as HoVer-Net computes it (``get_fast_aji``).

    ``true`` may also be a precomputed :class:`Overlaps` (then ``pred`` is ignored). Both maps empty: 1.0;
    exactly one empty: 0.0.
    """
    o = overlaps(true, pred)
    if o.empty_case is not None:
        return o.empty_case
    inter, union = _aji_sums(o)
    return inter / union


def _one_to_one_max_iou(o: Overlaps) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the pair arrays of a one-to-one assignment maximising total IoU (Hungarian on HoVer-Net's
    ``inter / (union + 1e-6)``), IoU > 0 only.

    The overlap graph falls apart into small connected components; pairs alone in theirs are taken as they are,
    and the assignment is solved per remaining component (the same optimum as one assignment on the full
    matrix, at a fraction of the cost).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nt, npd = o.true_ids.size, o.pred_ids.size
    k = o.ti.size
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    iou = o.iou
    # HoVer-Net assigns on inter / (union + 1e-6): among equal IoUs the larger pair wins
    score = o.inter / (o.union + _EPS)
    deg_t = np.bincount(o.ti, minlength=nt)
    deg_p = np.bincount(o.pj, minlength=npd)
    simple = (deg_t[o.ti] == 1) & (deg_p[o.pj] == 1)
    chosen = [np.flatnonzero(simple)]
    rest = np.flatnonzero(~simple)
    if rest.size:
        graph = coo_matrix((np.ones(rest.size), (o.ti[rest], nt + o.pj[rest])), shape=(nt + npd, nt + npd))
        _, comp = connected_components(graph, directed=False)
        cid = comp[o.ti[rest]]
        order = np.argsort(cid, kind="stable")
        rest, cid = rest[order], cid[order]
        bounds = np.flatnonzero(np.r_[True, cid[1:] != cid[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            edges = rest[a:b]
            rows, ri = np.unique(o.ti[edges], return_inverse=True)
            cols, ci = np.unique(o.pj[edges], return_inverse=True)
            m = np.zeros((rows.size, cols.size))
            m[ri, ci] = score[edges]
            edge_at = np.full((rows.size, cols.size), -1, np.int64)
            edge_at[ri, ci] = edges
            r, c = linear_sum_assignment(-m)
            e = edge_at[r, c]
            chosen.append(e[e >= 0])
    sel = np.concatenate(chosen)
    return sel, iou[sel]


def aji_plus(true, pred=None) -> float:
    """AJI+ (Graham et al. 2019): AJI with one-to-one pairs of maximum total IoU (``get_fast_aji_plus``)."""
    o = overlaps(true, pred)
    if o.empty_case is not None:
        return o.empty_case
    sel, _ = _one_to_one_max_iou(o)
    inter = float(o.inter[sel].sum())
    union = float(o.union[sel].sum())
    paired_t = np.zeros(o.true_ids.size, bool)
    paired_t[o.ti[sel]] = True
    paired_p = np.zeros(o.pred_ids.size, bool)
    paired_p[o.pj[sel]] = True
    union += float(o.true_area[~paired_t].sum() + o.pred_area[~paired_p].sum())
    return inter / union


def _matches(o: Overlaps, threshold: float = 0.5) -> np.ndarray:
    """Indices into the pair arrays of the pairs with IoU strictly above ``threshold`` (>= 0.5: unique)."""
    if threshold < 0.5:
        raise ValueError(f"iou_threshold must be at least 0.5 for unique matches, got {threshold}")
    return np.flatnonzero(o.iou > threshold) if o.ti.size else np.zeros(0, np.int64)


def pq(true, pred=None) -> tuple[float, float, float]:
    """Panoptic quality (Kirillov et al.) as HoVer-Net computes it (``get_fast_pq``, IoU > 0.5).

    Returns ``(DQ, SQ, PQ)``. Both maps empty: (1, 1, 1); exactly one empty: (0, 0, 0).
    """
    o = overlaps(true, pred)
    if o.empty_case is not None:
        e = o.empty_case
        return e, e, e
    sel = _matches(o)
    tp = sel.size
    fp = o.pred_ids.size - tp
    fn = o.true_ids.size - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(o.iou[sel].sum()) / (tp + _EPS)
    return dq, sq, dq * sq


def dice(true, pred=None) -> float:
    """Binary Dice of the foregrounds (HoVer-Net's ``get_dice_1``). Both empty: 1.0."""
    o = overlaps(true, pred)
    denom = o.fg_true + o.fg_pred
    return 1.0 if denom == 0 else 2.0 * o.fg_both / denom


def dice2(true, pred=None) -> float:
    """HoVer-Net's ensemble Dice (``get_fast_dice_2``): 2 sum inter / sum (|T| + |P|) over all overlapping pairs.

    Both maps empty: 1.0; exactly one empty, or no overlap at all: 0.0.
    """
    o = overlaps(true, pred)
    if o.empty_case is not None:
        return o.empty_case
    if o.ti.size == 0:
        return 0.0
    total = float((o.true_area[o.ti] + o.pred_area[o.pj]).sum())
    return 2.0 * float(o.inter.sum()) / total


def object_f1(true, pred=None) -> float:
    """Object-level F1 with one-to-one matches at IoU > 0.5: 2 TP / (2 TP + FP + FN) (equal to DQ)."""
    o = overlaps(true, pred)
    if o.empty_case is not None:
        return o.empty_case
    tp = _matches(o).size
    fp = o.pred_ids.size - tp
    fn = o.true_ids.size - tp
    return 2.0 * tp / (2.0 * tp + fp + fn)


def pixel_f1(true, pred=None) -> float:
    """Pixel-level F1 of the foregrounds, 2 TP / (2 TP + FP + FN) (equal to binary Dice). Both empty: 1.0."""
    o = overlaps(true, pred)
    tp = o.fg_both
    fp = o.fg_pred - tp
    fn = o.fg_true - tp
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


def instance_metrics(true, pred=None) -> dict[str, float]:
    """All instance metrics of one image from one intersection table, keyed as :data:`METRICS`."""
    o = overlaps(true, pred)
    dq, sq, p = pq(o)
    return {
        "aji": aji(o),
        "aji_plus": aji_plus(o),
        "dice": dice(o),
        "dice2": dice2(o),
        "dq": dq,
        "sq": sq,
        "pq": p,
        "object_f1": object_f1(o),
        "pixel_f1": pixel_f1(o),
    }


# ----------------------------------------------------------------------------------------------------------------
# Matching (for error overlays)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Matching:
    """One-to-one matches at IoU above a threshold, in the maps' own ids.

    ``true_ids[i]`` and ``pred_ids[i]`` are a matched pair (a true positive) with IoU ``iou[i]``;
    ``false_negatives`` are true nuclei left unmatched (missed), ``false_positives`` predicted nuclei left
    unmatched.
    """

    true_ids: np.ndarray
    pred_ids: np.ndarray
    iou: np.ndarray
    false_negatives: np.ndarray
    false_positives: np.ndarray

    @property
    def tp(self) -> int:
        return int(self.true_ids.size)

    @property
    def fp(self) -> int:
        return int(self.false_positives.size)

    @property
    def fn(self) -> int:
        return int(self.false_negatives.size)


def match(true, pred, iou_threshold: float = 0.5) -> Matching:
    """Match true and predicted nuclei one-to-one at IoU strictly above ``iou_threshold`` (>= 0.5, so each
    nucleus has at most one partner)."""
    o = overlaps(true, pred)
    sel = _matches(o, iou_threshold)
    mt = np.zeros(o.true_ids.size, bool)
    mt[o.ti[sel]] = True
    mp = np.zeros(o.pred_ids.size, bool)
    mp[o.pj[sel]] = True
    return Matching(
        true_ids=o.true_ids[o.ti[sel]],
        pred_ids=o.pred_ids[o.pj[sel]],
        iou=o.iou[sel] if sel.size else np.zeros(0),
        false_negatives=o.true_ids[~mt],
        false_positives=o.pred_ids[~mp],
    )


# ----------------------------------------------------------------------------------------------------------------
# Many images
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Per-image metrics, their mean over images (as HoVer-Net reports) and the values pooled over all images.

    Pooled: AJI and AJI+ from the summed intersections and unions, DQ / PQ / object F1 from the summed TP, FP, FN
    (SQ from all matched IoUs), Dice, Dice 2 and pixel F1 from the summed pixel counts.
    """

    names: list[str]
    per_image: list[dict[str, float]]
    mean: dict[str, float]
    pooled: dict[str, float]
    counts: list[dict[str, int]] = field(default_factory=list)

    def table(self, digits: int = 4) -> str:
        """A plain-text table: one row per image, then the mean over images and the pooled values."""
        head = ["image"] + list(METRICS)
        rows = [[n] + [f"{d[k]:.{digits}f}" for k in METRICS] for n, d in zip(self.names, self.per_image)]
        rows.append(["mean"] + [f"{self.mean[k]:.{digits}f}" for k in METRICS])
        rows.append(["pooled"] + [f"{self.pooled[k]:.{digits}f}" for k in METRICS])
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

        def fmt(r):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        sep = "-" * len(fmt(head))
        body = [fmt(r) for r in rows]
        return "\n".join([fmt(head), sep, *body[:-2], sep, *body[-2:]])

    def to_dict(self) -> dict:
        return {
            **{k: self.mean[k] for k in METRICS},
            "n_images": len(self.per_image),
            "pooled": dict(self.pooled),
            "per_image": [{"image": n, **d} for n, d in zip(self.names, self.per_image)],
        }


def evaluate(
    trues: Sequence | Iterable,
    preds: Sequence | Iterable,
    names: Sequence[str] | None = None,
    *,
    progress=None,
    should_stop=None,
) -> Evaluation:
    """Evaluate pairs of instance label maps.

    Parameters
    ----------
    trues, preds : sequences of (H, W) integer arrays
        Ground truth and prediction, pairwise (shapes may differ between pairs, not within one).
    names : sequence of str, optional
        Image names for the table (default ``0, 1, ...``).
    progress : callable(done, total, message), optional
    should_stop : callable() -> bool, optional
        Checked between images; when it returns True the evaluation stops with the images done so far.

    Raises
    ------
    ValueError
        If the sequences differ in length, are empty, or a pair differs in shape.
    """
    trues, preds = list(trues), list(preds)
    if len(trues) != len(preds):
        raise ValueError(f"got {len(trues)} ground-truth maps and {len(preds)} predictions")
    if not trues:
        raise ValueError("nothing to evaluate: no label maps given")
    names = [str(i) for i in range(len(trues))] if names is None else [str(n) for n in names]
    per, counts = [], []
    sums = {"aji_i": 0.0, "aji_u": 0.0, "ajip_i": 0.0, "ajip_u": 0.0, "tp": 0, "fp": 0, "fn": 0, "iou": 0.0,
            "fg_t": 0, "fg_p": 0, "fg_b": 0, "d2_i": 0.0, "d2_t": 0.0}
    for i, (t, p) in enumerate(zip(trues, preds)):
        if should_stop is not None and should_stop():
            names = names[: len(per)]
            break
        try:
            o = overlaps(t, p)
        except ValueError as e:
            raise ValueError(f"image {names[i]}: {e}") from None
        per.append(instance_metrics(o))
        sel = _matches(o)
        tp = sel.size
        c = {"tp": tp, "fp": o.pred_ids.size - tp, "fn": o.true_ids.size - tp}
        counts.append(c)
        ai, au = _aji_sums(o)
        s, _ = _one_to_one_max_iou(o)
        pu = float(o.union[s].sum()) if s.size else 0.0
        paired_t = np.zeros(o.true_ids.size, bool)
        paired_t[o.ti[s]] = True
        paired_p = np.zeros(o.pred_ids.size, bool)
        paired_p[o.pj[s]] = True
        sums["aji_i"] += ai
        sums["aji_u"] += au
        sums["ajip_i"] += float(o.inter[s].sum()) if s.size else 0.0
        sums["ajip_u"] += pu + float(o.true_area[~paired_t].sum() + o.pred_area[~paired_p].sum())
        sums["tp"] += c["tp"]
        sums["fp"] += c["fp"]
        sums["fn"] += c["fn"]
        sums["iou"] += float(o.iou[sel].sum()) if tp else 0.0
        sums["fg_t"] += o.fg_true
        sums["fg_p"] += o.fg_pred
        sums["fg_b"] += o.fg_both
        if o.ti.size:
            sums["d2_i"] += float(o.inter.sum())
            sums["d2_t"] += float((o.true_area[o.ti] + o.pred_area[o.pj]).sum())
        if progress is not None:
            progress(i + 1, len(trues), f"evaluated {names[i]}")
    mean = {k: float(np.mean([d[k] for d in per])) if per else float("nan") for k in METRICS}
    pooled = _pooled(sums)
    return Evaluation(names=names[: len(per)], per_image=per, mean=mean, pooled=pooled, counts=counts)


def _pooled(s: dict) -> dict[str, float]:
    def ratio(a, b, empty=1.0):
        return empty if b == 0 else a / b

    tp, fp, fn = s["tp"], s["fp"], s["fn"]
    any_nuclei = (tp + fp + fn) > 0
    dq = ratio(tp, tp + 0.5 * fp + 0.5 * fn) if any_nuclei else 1.0
    sq = s["iou"] / (tp + _EPS) if any_nuclei else 1.0
    return {
        "aji": ratio(s["aji_i"], s["aji_u"]),
        "aji_plus": ratio(s["ajip_i"], s["ajip_u"]),
        "dice": ratio(2.0 * s["fg_b"], s["fg_t"] + s["fg_p"]),
        "dice2": ratio(2.0 * s["d2_i"], s["d2_t"], empty=1.0 if s["fg_t"] + s["fg_p"] == 0 else 0.0),
        "dq": dq,
        "sq": sq,
        "pq": dq * sq,
        "object_f1": ratio(2.0 * tp, 2.0 * tp + fp + fn),
        "pixel_f1": ratio(2.0 * s["fg_b"], s["fg_t"] + s["fg_p"]),
    }


#: Values of :func:`error_map`.
ERROR_CLASSES = {0: "background", 1: "true positive", 2: "false positive", 3: "false negative"}


def error_map(true, pred, iou_threshold: float = 0.5) -> np.ndarray:
    """An error map for overlays: 1 on matched predicted nuclei (true positives), 2 on unmatched predictions
    (false positives: predicted, not true), 3 on unmatched true nuclei where nothing is predicted (false
    negatives: true, missed); 0 elsewhere. uint8, the maps' shape. Matches as :func:`match`."""
    t, p = _as_pair(true, pred)
    m = match(t, p, iou_threshold)
    out = np.zeros(t.shape, dtype=np.uint8)
    out[np.isin(t, m.false_negatives) & (p == 0)] = 3
    out[np.isin(p, m.pred_ids)] = 1
    out[np.isin(p, m.false_positives)] = 2
    return out
