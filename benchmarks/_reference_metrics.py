"""A deliberately plain reference implementation of the instance metrics, for benchmarks and tests.

It follows the structure of HoVer-Net's own evaluation code (``compute_stats.py`` / ``stats_utils.py``:
``remap_label``, ``get_fast_aji``, ``get_fast_aji_plus``, ``get_fast_pq``, ``get_dice_1``, ``get_fast_dice_2``)
rather than anything in :mod:`napari_nucsynth.metrics`: ids are remapped to ``1..N`` in ascending order, every
nucleus gets a full-size boolean mask, intersections and unions come from loops over the nuclei, and AJI+ solves
one dense assignment (:func:`scipy.optimize.linear_sum_assignment`) on the whole ``-IoU`` matrix. It is slow (a few
seconds for a 1000 x 1000 tile) and meant to be obviously right, not fast.

HoVer-Net's conventions are kept, epsilons included:

- AJI: each true nucleus takes the prediction with the largest ``inter / (union + 1e-6)`` (``argmax``: the smallest
  remapped id on exact ties; predictions may be reused); true nuclei whose best score is 0 stay unpaired.
- AJI+: the assignment maximises the total of ``inter / (union + 1e-6)``; assigned pairs with score 0 are dropped.
- AJI and AJI+ add the areas of unpaired true nuclei and of unpaired predictions to the union.
- PQ: pairs with IoU (no epsilon) strictly above 0.5; DQ = TP / (TP + FP/2 + FN/2); SQ = sum IoU / (TP + 1e-6).
- Dice: binary foreground Dice; Dice 2: 2 sum inter / sum (|T| + |P|) over every overlapping pair.

Added here (HoVer-Net divides by zero or fails on these): when both maps hold no nucleus every metric is 1.0; when
exactly one does, every metric is 0.0; Dice 2 with nuclei on both sides but no overlap at all is 0.0. Object F1 is
2 TP / (2 TP + FP + FN) with PQ's pairs; pixel F1 is 2 TP / (2 TP + FP + FN) over foreground pixels.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

EPS = 1.0e-6  # HoVer-Net's epsilon
KEYS = ("aji", "aji_plus", "dice", "dice2", "dq", "sq", "pq", "object_f1", "pixel_f1")


# ------------------------------------------------------------------------------------------------------------------
# Preparation
# ------------------------------------------------------------------------------------------------------------------
def remap_label(labels: np.ndarray) -> np.ndarray:
    """Ids renumbered to ``1..N`` in ascending order of the original ids (0 stays background)."""
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.int64)
    ids = [int(i) for i in np.unique(labels) if i != 0]
    for new_id, old_id in enumerate(ids, start=1):
        out[labels == old_id] = new_id
    return out


def _prepare(true, pred) -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(true)
    pred = np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"true and pred differ in shape: {true.shape} vs {pred.shape}")
    return remap_label(true), remap_label(pred)


def _count(labels: np.ndarray) -> int:
    return int(labels.max()) if labels.size else 0  # labels are remapped: the largest id is the count


def pairwise_tables(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``(n_true, n_pred)`` tables of intersections and unions (zero where two nuclei do not overlap).

    ``true`` and ``pred`` must already be remapped. One boolean mask per nucleus, computed when needed (a tile holds
    up to ~2,000 nuclei of a million pixels each, too many to keep at once).
    """
    n_true, n_pred = _count(true), _count(pred)
    inter = np.zeros((n_true, n_pred), dtype=np.float64)
    union = np.zeros((n_true, n_pred), dtype=np.float64)
    for t in range(1, n_true + 1):
        t_mask = true == t
        t_area = int(t_mask.sum())
        for p in np.unique(pred[t_mask]):
            p = int(p)
            if p == 0:
                continue
            p_mask = pred == p
            i = int(np.logical_and(t_mask, p_mask).sum())
            inter[t - 1, p - 1] = i
            union[t - 1, p - 1] = t_area + int(p_mask.sum()) - i
    return inter, union


def _areas(labels: np.ndarray) -> list[int]:
    """Areas of nuclei ``1..N`` (remapped map), one mask at a time."""
    return [int((labels == i).sum()) for i in range(1, _count(labels) + 1)]


def _empty_case(true: np.ndarray, pred: np.ndarray) -> float | None:
    n_true, n_pred = _count(true), _count(pred)
    if n_true == 0 and n_pred == 0:
        return 1.0
    if n_true == 0 or n_pred == 0:
        return 0.0
    return None


# ------------------------------------------------------------------------------------------------------------------
# Metrics on prepared (remapped) maps with their tables
# ------------------------------------------------------------------------------------------------------------------
def _aji(true, pred, inter, union) -> float:
    score = inter / (union + EPS)
    best_pred = np.argmax(score, axis=1)  # first maximum: smallest remapped pred id on ties
    best_score = np.max(score, axis=1)
    paired_true = np.nonzero(best_score > 0.0)[0]
    paired_pred = best_pred[paired_true]
    total_inter = float(inter[paired_true, paired_pred].sum())
    total_union = float(union[paired_true, paired_pred].sum())
    t_areas, p_areas = _areas(true), _areas(pred)
    paired_true_ids = set((paired_true + 1).tolist())
    paired_pred_ids = set((paired_pred + 1).tolist())
    for t in range(1, len(t_areas) + 1):
        if t not in paired_true_ids:
            total_union += t_areas[t - 1]
    for p in range(1, len(p_areas) + 1):
        if p not in paired_pred_ids:
            total_union += p_areas[p - 1]
    return total_inter / total_union


def _aji_plus(true, pred, inter, union) -> float:
    score = inter / (union + EPS)
    rows, cols = linear_sum_assignment(-score)
    keep = score[rows, cols] > 0.0
    rows, cols = rows[keep], cols[keep]
    total_inter = float(inter[rows, cols].sum())
    total_union = float(union[rows, cols].sum())
    t_areas, p_areas = _areas(true), _areas(pred)
    paired_true_ids = set((rows + 1).tolist())
    paired_pred_ids = set((cols + 1).tolist())
    for t in range(1, len(t_areas) + 1):
        if t not in paired_true_ids:
            total_union += t_areas[t - 1]
    for p in range(1, len(p_areas) + 1):
        if p not in paired_pred_ids:
            total_union += p_areas[p - 1]
    return total_inter / total_union


def _pq_pairs(inter, union) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remapped (0-based) true / pred indices and IoU of the pairs with IoU strictly above 0.5."""
    iou = np.zeros_like(inter)
    overlapping = union > 0
    iou[overlapping] = inter[overlapping] / union[overlapping]
    iou[iou <= 0.5] = 0.0
    rows, cols = np.nonzero(iou)  # unique by construction: IoU > 0.5 leaves each nucleus at most one partner
    return rows, cols, iou[rows, cols]


def _pq(true, pred, inter, union) -> tuple[float, float, float]:
    rows, _, ious = _pq_pairs(inter, union)
    tp = len(rows)
    fp = _count(pred) - tp
    fn = _count(true) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(ious.sum()) / (tp + EPS)
    return dq, sq, dq * sq


def _object_f1(true, pred, inter, union) -> float:
    rows, _, _ = _pq_pairs(inter, union)
    tp = len(rows)
    fp = _count(pred) - tp
    fn = _count(true) - tp
    return 2.0 * tp / (2.0 * tp + fp + fn)


def _dice2(true, pred) -> float:
    total_inter = 0
    total_size = 0
    for t in range(1, _count(true) + 1):
        t_mask = true == t
        for p in np.unique(pred[t_mask]):
            if p == 0:
                continue
            p_mask = pred == p
            total_inter += int(np.logical_and(t_mask, p_mask).sum())
            total_size += int(t_mask.sum()) + int(p_mask.sum())
    if total_size == 0:
        return 0.0
    return 2.0 * total_inter / total_size


def _dice1(true, pred) -> float:
    t = (true > 0).astype(np.int64)
    p = (pred > 0).astype(np.int64)
    return 2.0 * float((t * p).sum()) / float((t + p).sum())


def _pixel_f1(true, pred) -> float:
    t = true > 0
    p = pred > 0
    tp = int(np.sum(t & p))
    fp = int(np.sum(~t & p))
    fn = int(np.sum(t & ~p))
    return 2.0 * tp / (2.0 * tp + fp + fn)


# ------------------------------------------------------------------------------------------------------------------
# Public functions, one per metric, each from scratch (as HoVer-Net's are)
# ------------------------------------------------------------------------------------------------------------------
def aji(true, pred) -> float:
    t, p = _prepare(true, pred)
    empty = _empty_case(t, p)
    return empty if empty is not None else _aji(t, p, *pairwise_tables(t, p))


def aji_plus(true, pred) -> float:
    t, p = _prepare(true, pred)
    empty = _empty_case(t, p)
    return empty if empty is not None else _aji_plus(t, p, *pairwise_tables(t, p))


def pq(true, pred) -> tuple[float, float, float]:
    t, p = _prepare(true, pred)
    empty = _empty_case(t, p)
    return (empty, empty, empty) if empty is not None else _pq(t, p, *pairwise_tables(t, p))


def dice(true, pred) -> float:
    t, p = _prepare(true, pred)
    empty = _empty_case(t, p)
    return empty if empty is not None else _dice1(t, p)


def dice2(true, pred) -> float:
    t, p = _prepare(true, pred)
    empty = _empty_case(t, p)
    return empty if empty is not None else _dice2(t, p)


def object_f1(true, pred) -> float:
    t, p = _prepare(true, pred)
    empty = _empty_case(t, p)
    return empty if empty is not None else _object_f1(t, p, *pairwise_tables(t, p))


def pixel_f1(true, pred) -> float:
    t, p = _prepare(true, pred)
    empty = _empty_case(t, p)
    return empty if empty is not None else _pixel_f1(t, p)


def match_pairs(true, pred) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """PQ's pairs in the maps' original ids: ``(pairs, unmatched true ids, unmatched pred ids)``, sorted."""
    true, pred = np.asarray(true), np.asarray(pred)
    t_ids = [int(i) for i in np.unique(true) if i != 0]
    p_ids = [int(i) for i in np.unique(pred) if i != 0]
    t, p = _prepare(true, pred)
    rows, cols, _ = _pq_pairs(*pairwise_tables(t, p))
    pairs = sorted((t_ids[r], p_ids[c]) for r, c in zip(rows, cols))
    matched_t = {a for a, _ in pairs}
    matched_p = {b for _, b in pairs}
    return pairs, [i for i in t_ids if i not in matched_t], [i for i in p_ids if i not in matched_p]


def all_metrics(true, pred) -> dict[str, float]:
    """Every metric keyed as :data:`KEYS`; the intersection tables are built once and shared."""
    t, p = _prepare(true, pred)
    empty = _empty_case(t, p)
    if empty is not None:
        return {k: empty for k in KEYS}
    inter, union = pairwise_tables(t, p)
    dq, sq, pq_ = _pq(t, p, inter, union)
    return {
        "aji": _aji(t, p, inter, union),
        "aji_plus": _aji_plus(t, p, inter, union),
        "dice": _dice1(t, p),
        "dice2": _dice2(t, p),
        "dq": dq,
        "sq": sq,
        "pq": pq_,
        "object_f1": _object_f1(t, p, inter, union),
        "pixel_f1": _pixel_f1(t, p),
    }
