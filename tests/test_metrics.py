"""Tests of the instance metrics (HoVer-Net's conventions, GUIDE section 6).

Small maps with values computed by hand (in the comments), the empty cases, dtypes and ids, properties checked
with hypothesis, and agreement with ``benchmarks/_reference_metrics.py`` (a slow per-instance transcription of
HoVer-Net's evaluation code) on random maps and on a real MoNuSeg tile against a perturbed copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_nucsynth import metrics as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _reference_metrics as ref
from bench_metrics import perturb

KEYS = ("aji", "aji_plus", "dice", "dice2", "dq", "sq", "pq", "object_f1", "pixel_f1")
#: Metrics that cannot depend on which id a nucleus carries (AJI / AJI+ break exact ties by id).
ID_FREE = ("dice", "dice2", "dq", "sq", "pq", "object_f1", "pixel_f1")
SYMMETRIC = ("dice", "dice2", "dq", "sq", "pq", "object_f1", "pixel_f1")
EPS = 1e-6


def values(true, pred) -> dict[str, float]:
    """Every metric through the public per-metric functions."""
    dq, sq, pq = M.pq(true, pred)
    return {
        "aji": M.aji(true, pred),
        "aji_plus": M.aji_plus(true, pred),
        "dice": M.dice(true, pred),
        "dice2": M.dice2(true, pred),
        "dq": dq,
        "sq": sq,
        "pq": pq,
        "object_f1": M.object_f1(true, pred),
        "pixel_f1": M.pixel_f1(true, pred),
    }


def assert_values(got: dict, want: dict, tol: float = 1e-12):
    bad = {k: (got[k], want[k]) for k in want if not abs(float(got[k]) - float(want[k])) <= tol}
    assert not bad, f"metric: (got, expected) {bad}"


# ------------------------------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------------------------------
# Case A, 1 x 10: T1 = cols 0-3 (4 px), T2 = cols 6-8 (3 px); P1 = cols 1-4 (4 px), P2 = cols 7-9 (3 px).
#   T1&P1 = cols 1-3 = 3, union 4+4-3 = 5, IoU 0.6      T2&P2 = cols 7-8 = 2, union 3+3-2 = 4, IoU 0.5 (not > 0.5)
#   AJI = AJI+ = (3+2)/(5+4) = 5/9;  PQ: TP 1 (0.6), FP 1, FN 1 -> DQ = 1/(1+0.5+0.5) = 0.5, SQ = 0.6/(1+1e-6)
#   Dice: 2*5/(7+7) = 5/7;  Dice 2: 2*(3+2)/((4+4)+(3+3)) = 5/7;  object F1 = 2/(2+1+1) = 0.5;  pixel F1 = 5/7
CASE_A_TRUE = np.array([[1, 1, 1, 1, 0, 0, 2, 2, 2, 0]])
CASE_A_PRED = np.array([[0, 1, 1, 1, 1, 0, 0, 2, 2, 2]])
CASE_A = {"aji": 5 / 9, "aji_plus": 5 / 9, "dice": 5 / 7, "dice2": 5 / 7, "dq": 0.5, "sq": 0.6 / (1 + EPS),
          "pq": 0.5 * 0.6 / (1 + EPS), "object_f1": 0.5, "pixel_f1": 5 / 7}

# Case B, 4 x 6, a merge, a partial split, a miss and a false positive; non-contiguous pred ids 5, 7, 9.
#   T1 = rows 0-1 x cols 0-2 (6), T2 = rows 0-1 x cols 3-5 (6), T3 = row 3 x cols 0-1 (2)
#   P5 = rows 0-1 x cols 0-4 (10), P7 = col 5 x rows 1-2 (2), P9 = row 3 x cols 4-5 (2)
#   T1&P5 = 6, union 10, IoU 0.6;  T2&P5 = 4, union 12, IoU 1/3;  T2&P7 = 1, union 7, IoU 1/7;  T3, P9 overlap nothing
#   AJI: T1->P5, T2->P5 (1/3 > 1/7); inter 6+4 = 10; union 10+12 + T3 2 + P7 2 + P9 2 = 28 -> 10/28 = 5/14
#   AJI+: one-to-one, max total IoU: T1-P5 + T2-P7 (0.6+1/7) beats T2-P5 alone (1/3): inter 7, union 10+7+2+2 = 21
#   PQ: TP 1 (T1-P5, 0.6), FN 2 (T2, T3), FP 2 (P7, P9): DQ = 1/3, SQ = 0.6/(1+1e-6)
#   Dice: fg 14 and 14, overlap 10+1 = 11 -> 22/28 = 11/14;  Dice 2: 2*(6+4+1)/((6+10)+(6+10)+(6+2)) = 22/40
CASE_B_TRUE = np.array(
    [
        [1, 1, 1, 2, 2, 2],
        [1, 1, 1, 2, 2, 2],
        [0, 0, 0, 0, 0, 0],
        [3, 3, 0, 0, 0, 0],
    ]
)
CASE_B_PRED = np.array(
    [
        [5, 5, 5, 5, 5, 0],
        [5, 5, 5, 5, 5, 7],
        [0, 0, 0, 0, 0, 7],
        [0, 0, 0, 0, 9, 9],
    ]
)
CASE_B = {"aji": 5 / 14, "aji_plus": 1 / 3, "dice": 11 / 14, "dice2": 22 / 40, "dq": 1 / 3, "sq": 0.6 / (1 + EPS),
          "pq": 0.6 / (1 + EPS) / 3, "object_f1": 1 / 3, "pixel_f1": 11 / 14}

# Case C, 3 x 6, HoVer-Net's epsilon decides an exact IoU tie. T1 = rows 0-1 x cols 0-2 (6 px).
#   P2 = (0,0), (1,0): inter 2, union 6, IoU 1/3.  P4 = (0,1) (0,2) (1,1) inside + (0,3) (1,3) (2,3): inter 3, union 9.
#   inter/(union+1e-6): 2/(6+1e-6) < 3/(9+1e-6), so T1 takes P4 (not P2, the smaller id):
#   AJI = 3/(9 + P2's 2) = 3/11 (P2 would give 2/(6 + 6) = 1/6); AJI+ likewise (HoVer-Net builds its assignment on
#   the same inter/(union+1e-6) matrix). No IoU > 0.5: DQ = SQ = PQ = 0.
#   Dice: fg 6 and 8, overlap 5 -> 10/14;  Dice 2: 2*(2+3)/((6+2)+(6+6)) = 0.5
CASE_C_TRUE = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
CASE_C_PRED = np.array([[2, 4, 4, 4, 0, 0], [2, 4, 0, 4, 0, 0], [0, 0, 0, 4, 0, 0]])
CASE_C = {"aji": 3 / 11, "aji_plus": 3 / 11, "dice": 5 / 7, "dice2": 0.5, "dq": 0.0, "sq": 0.0, "pq": 0.0,
          "object_f1": 0.0, "pixel_f1": 5 / 7}

# Case D, 1 x 10, an exact tie (same inter and union) goes to the smallest id.
#   T1 = cols 1-4 (4), T2 = cols 5-6 (2).  Pa = cols 0-1 (2): T1&Pa = 1, union 5.  Pb = cols 4-5 (2): T1&Pb = 1,
#   union 5; T2&Pb = 1, union 3.  T1 ties between Pa and Pb; T2 takes Pb.
#   Pb id < Pa id: T1 -> Pb: inter 1+1, union 5+3 + Pa's 2 -> AJI = 2/10.  Pa id < Pb id: T1 -> Pa -> 2/8.
#   AJI+ either way: T1-Pa + T2-Pb (0.2 + 1/3) -> 2/8.  No IoU > 0.5.  Dice: fg 6, 4, overlap 3 -> 0.6.
#   Dice 2: 2*(1+1+1)/((4+2)+(4+2)+(2+2)) = 6/16
CASE_D_TRUE = np.array([[0, 1, 1, 1, 1, 2, 2, 0, 0, 0]])
CASE_D_PRED_B_FIRST = np.array([[7, 7, 0, 0, 3, 3, 0, 0, 0, 0]])  # Pb = 3, Pa = 7
CASE_D_PRED_A_FIRST = np.array([[3, 3, 0, 0, 7, 7, 0, 0, 0, 0]])  # Pa = 3, Pb = 7
CASE_D = {"aji_plus": 0.25, "dice": 0.6, "dice2": 6 / 16, "dq": 0.0, "sq": 0.0, "pq": 0.0, "object_f1": 0.0,
          "pixel_f1": 0.6}


@pytest.mark.parametrize(
    "true, pred, want",
    [(CASE_A_TRUE, CASE_A_PRED, CASE_A), (CASE_B_TRUE, CASE_B_PRED, CASE_B), (CASE_C_TRUE, CASE_C_PRED, CASE_C)],
    ids=["A-1x10", "B-4x6", "C-epsilon-tie"],
)
def test_hand_computed_cases(true, pred, want):
    assert_values(values(true, pred), want)
    assert_values(ref.all_metrics(true, pred), want)  # the reference is held to the same hand values


def test_exact_aji_tie_goes_to_the_smallest_id():
    assert M.aji(CASE_D_TRUE, CASE_D_PRED_B_FIRST) == pytest.approx(0.2, abs=1e-12)
    assert M.aji(CASE_D_TRUE, CASE_D_PRED_A_FIRST) == pytest.approx(0.25, abs=1e-12)
    for pred in (CASE_D_PRED_B_FIRST, CASE_D_PRED_A_FIRST):
        assert_values(values(CASE_D_TRUE, pred), CASE_D)
    assert ref.aji(CASE_D_TRUE, CASE_D_PRED_B_FIRST) == pytest.approx(0.2, abs=1e-12)
    assert ref.aji(CASE_D_TRUE, CASE_D_PRED_A_FIRST) == pytest.approx(0.25, abs=1e-12)


def test_no_overlap_follows_the_formulas():
    true = np.array([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 2, 2]])
    pred = np.array([[0, 0, 4, 4, 0, 0], [0, 0, 0, 0, 0, 0]])
    # AJI: nothing paired, inter 0 / (4 + 2) = 0; DQ = 0/(0+1+0.5*2) = 0; SQ = 0/(0+1e-6) = 0; Dice 2: no pair -> 0
    assert_values(values(true, pred), {k: 0.0 for k in KEYS})


# ------------------------------------------------------------------------------------------------------------------
# Empty cases, shapes, dtypes, ids
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 6), (1, 1), (0, 0)])
def test_both_empty_is_perfect(shape):
    z = np.zeros(shape, dtype=np.uint32)
    assert_values(values(z, z), {k: 1.0 for k in KEYS})
    assert tuple(M.pq(z, z)) == (1.0, 1.0, 1.0)
    m = M.match(z, z)
    assert len(m.true_ids) == len(m.pred_ids) == len(m.false_negatives) == len(m.false_positives) == 0


@pytest.mark.parametrize("side", ["true", "pred"])
def test_one_empty_is_zero(side):
    z = np.zeros_like(CASE_B_TRUE)
    true, pred = (z, CASE_B_PRED) if side == "true" else (CASE_B_TRUE, z)
    assert_values(values(true, pred), {k: 0.0 for k in KEYS})
    m = M.match(true, pred)
    assert len(m.true_ids) == 0
    assert sorted(m.false_negatives.tolist()) == sorted(int(i) for i in np.unique(true) if i)
    assert sorted(m.false_positives.tolist()) == sorted(int(i) for i in np.unique(pred) if i)


@pytest.mark.parametrize("fn", ["aji", "aji_plus", "pq", "dice", "dice2", "object_f1", "pixel_f1", "match"])
def test_different_shapes_raise(fn):
    with pytest.raises(ValueError):
        getattr(M, fn)(np.zeros((4, 6), np.uint32), np.zeros((6, 4), np.uint32))
    with pytest.raises(ValueError):
        getattr(M, fn)(CASE_B_TRUE, CASE_B_PRED[:, :5])


def test_evaluate_raises_on_a_pair_of_different_shapes():
    with pytest.raises(ValueError):
        M.evaluate([CASE_A_TRUE, CASE_B_TRUE], [CASE_A_PRED, CASE_B_PRED[:3]])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.uint64])
def test_any_integer_dtype_gives_identical_values(dtype):
    got = values(CASE_B_TRUE.astype(dtype), CASE_B_PRED.astype(dtype))
    assert got == values(CASE_B_TRUE.astype(np.int64), CASE_B_PRED.astype(np.int64))
    assert_values(got, CASE_B)


@pytest.mark.parametrize("dtype", [np.uint32, np.int64, np.uint64])
def test_non_contiguous_and_huge_ids_give_identical_values(dtype):
    # order-preserving renumbering (ties, broken by id order, are kept), to sparse and to very large ids
    pmap = {5: 1_000_003, 7: 1_000_004, 9: 2**31 - 1}
    for tmap in ({1: 10, 2: 20, 3: 4000}, {1: 2**31 - 3, 2: 2**31 - 2, 3: 2**31 - 1}):
        true, pred = np.zeros(CASE_B_TRUE.shape, dtype), np.zeros(CASE_B_PRED.shape, dtype)
        for old, new in tmap.items():
            true[CASE_B_TRUE == old] = new
        for old, new in pmap.items():
            pred[CASE_B_PRED == old] = new
        assert_values(values(true, pred), CASE_B)


# ------------------------------------------------------------------------------------------------------------------
# match() and evaluate()
# ------------------------------------------------------------------------------------------------------------------
def test_match_hand_computed():
    m = M.match(CASE_B_TRUE, CASE_B_PRED)
    assert m.true_ids.tolist() == [1] and m.pred_ids.tolist() == [5]
    assert np.allclose(m.iou, [0.6], atol=1e-12)
    assert sorted(m.false_negatives.tolist()) == [2, 3]
    assert sorted(m.false_positives.tolist()) == [7, 9]
    m = M.match(CASE_B_TRUE, CASE_B_PRED, iou_threshold=0.7)  # 0.6 no longer matches
    assert len(m.true_ids) == 0
    assert sorted(m.false_negatives.tolist()) == [1, 2, 3] and sorted(m.false_positives.tolist()) == [5, 7, 9]
    m = M.match(CASE_A_TRUE, CASE_A_PRED)  # IoU exactly 0.5 is not a match
    assert m.true_ids.tolist() == [1] and m.pred_ids.tolist() == [1]
    assert m.false_negatives.tolist() == [2] and m.false_positives.tolist() == [2]


def test_evaluate_mean_and_pooled_by_hand():
    ev = M.evaluate([CASE_A_TRUE, CASE_B_TRUE], [CASE_A_PRED, CASE_B_PRED])
    assert len(ev.per_image) == 2
    assert_values(ev.per_image[0], CASE_A)
    assert_values(ev.per_image[1], CASE_B)
    assert_values(ev.mean, {k: (CASE_A[k] + CASE_B[k]) / 2 for k in KEYS})
    # pooled over both images, from summed counts:
    #   AJI (5+10)/(9+28) = 15/37; AJI+ (5+7)/(9+21) = 0.4; TP 1+1, FP 1+2, FN 1+2: DQ = 2/(2+1.5+1.5) = 0.4,
    #   object F1 = 4/(4+3+3) = 0.4; SQ = (0.6+0.6)/(2+1e-6); Dice = pixel F1 = 2*(5+11)/(14+28) = 16/21;
    #   Dice 2 = 2*(5+11)/(14+40) = 16/27
    sq = 1.2 / (2 + EPS)
    assert_values(ev.pooled, {"aji": 15 / 37, "aji_plus": 0.4, "dq": 0.4, "sq": sq, "pq": 0.4 * sq,
                              "object_f1": 0.4, "dice": 16 / 21, "pixel_f1": 16 / 21, "dice2": 16 / 27})
    table = ev.table()
    assert isinstance(table, str)
    assert all(k in table for k in KEYS)
    assert f"{15 / 37:.4f}" in table and f"{(5 / 9 + 5 / 14) / 2:.4f}" in table


# ------------------------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------------------------------
@st.composite
def label_pairs(draw, max_id: int = 6):
    """(true, pred) of one shape: blocky maps (block 1-3 px) with a prediction that is a noisy copy, a shifted
    copy, or independent, so that IoUs above and below 0.5, merges, splits and ties all occur."""
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    k = draw(st.integers(1, 3))
    ids = st.integers(0, max_id)
    t = draw(hnp.arrays(np.int64, (h, w), elements=ids))
    mode = draw(st.sampled_from(["noisy", "shifted", "independent"]))
    block = np.ones((k, k), dtype=np.int64)
    true = np.kron(t, block)
    if mode == "independent":
        pred = np.kron(draw(hnp.arrays(np.int64, (h, w), elements=ids)), block)
    else:
        pred = true.copy()
        if mode == "shifted":
            pred = np.roll(pred, draw(st.integers(-2, 2)), axis=draw(st.integers(0, 1)))
        flip = draw(hnp.arrays(np.bool_, true.shape))
        noise = draw(hnp.arrays(np.int64, true.shape, elements=ids))
        pred[flip] = noise[flip]
    return true, pred


def _relabel(lab: np.ndarray, new_ids: list[int], dtype=np.int64) -> np.ndarray:
    old = [int(i) for i in np.unique(lab) if i != 0]
    lut = {o: n for o, n in zip(old, new_ids)}
    out = np.zeros(lab.shape, dtype=dtype)
    for o, n in lut.items():
        out[lab == o] = n
    return out


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(label_pairs())
def test_agrees_with_the_reference_on_random_maps(pair):
    true, pred = pair
    assert_values(values(true, pred), ref.all_metrics(true, pred), tol=1e-6)


@SETTINGS
@given(label_pairs())
def test_a_map_against_itself_is_perfect(pair):
    true, _ = pair
    n = len(np.unique(true[true > 0]))
    sq = 1.0 if n == 0 else n / (n + EPS)  # HoVer-Net's epsilon: SQ = n / (n + 1e-6)
    assert_values(values(true, true), {**{k: 1.0 for k in KEYS}, "sq": sq, "pq": sq})


@SETTINGS
@given(label_pairs(), st.data())
def test_invariant_to_relabelling(pair, data):
    true, pred = pair
    want = values(true, pred)
    nt, np_ = len(np.unique(true[true > 0])), len(np.unique(pred[pred > 0]))
    new = st.lists(st.integers(1, 2**31 - 1), min_size=max(nt, np_), max_size=max(nt, np_), unique=True)
    ids_t, ids_p = data.draw(new), data.draw(new)
    # any permutation to arbitrary ids, in either map: every metric that cannot see ids
    t2, p2 = _relabel(true, ids_t[:nt]), _relabel(pred, ids_p[:np_], np.uint32)
    for t, p in ((t2, pred), (true, p2), (t2, p2)):
        got = values(t, p)
        assert_values({k: got[k] for k in ID_FREE}, {k: want[k] for k in ID_FREE}, tol=1e-12)
    # order-preserving renumbering: every metric, AJI and AJI+ included (their exact ties follow id order)
    t3, p3 = _relabel(true, sorted(ids_t[:nt])), _relabel(pred, sorted(ids_p[:np_]), np.uint32)
    assert_values(values(t3, p3), want, tol=1e-12)


@SETTINGS
@given(label_pairs())
def test_symmetric_metrics(pair):
    true, pred = pair
    a, b = values(true, pred), values(pred, true)
    assert_values({k: a[k] for k in SYMMETRIC}, {k: b[k] for k in SYMMETRIC}, tol=1e-12)


@SETTINGS
@given(label_pairs())
def test_match_is_consistent_with_pq(pair):
    true, pred = pair
    m = M.match(true, pred)
    tp, fp, fn = len(m.true_ids), len(m.false_positives), len(m.false_negatives)
    t_ids = {int(i) for i in np.unique(true) if i}
    p_ids = {int(i) for i in np.unique(pred) if i}
    # a partition of the ids, one-to-one
    assert len(set(m.true_ids.tolist())) == tp == len(set(m.pred_ids.tolist()))
    assert set(m.true_ids.tolist()) | set(m.false_negatives.tolist()) == t_ids and tp + fn == len(t_ids)
    assert set(m.pred_ids.tolist()) | set(m.false_positives.tolist()) == p_ids and tp + fp == len(p_ids)
    assert np.all(np.asarray(m.iou) > 0.5)
    # the same pairs as the reference, and PQ's numbers from the counts
    pairs, fns, fps = ref.match_pairs(true, pred)
    assert sorted(zip(m.true_ids.tolist(), m.pred_ids.tolist())) == pairs
    assert sorted(m.false_negatives.tolist()) == fns and sorted(m.false_positives.tolist()) == fps
    dq, sq, _ = M.pq(true, pred)
    if t_ids or p_ids:
        assert dq == pytest.approx(tp / (tp + 0.5 * fp + 0.5 * fn), abs=1e-12)
        assert sq == pytest.approx(float(np.sum(m.iou)) / (tp + EPS), abs=1e-12)
        assert M.object_f1(true, pred) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# A real tile
# ------------------------------------------------------------------------------------------------------------------
def test_agrees_with_the_reference_on_a_real_tile(monuseg_tiles, load_tile):
    stem = "TCGA-CH-5767-01Z-00-DX1"  # the tile with the fewest nuclei (294): the reference takes ~1 s on it
    stem = stem if stem in monuseg_tiles else monuseg_tiles[0]
    _, true = load_tile(stem)
    pred = perturb(true, seed=0)
    got, want = values(true, pred), ref.all_metrics(true, pred)
    assert_values(got, want, tol=1e-6)
    assert 0.5 < want["aji"] < 0.95 and 0.5 < want["pq"] < 0.95  # the perturbation is neither trivial nor total
    assert M.match(true, pred).true_ids.size == round(want["dq"] * (  # DQ = TP / ((n_true + n_pred) / 2)
        len(np.unique(true[true > 0])) + len(np.unique(pred[pred > 0]))) / 2)
