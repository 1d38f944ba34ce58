"""Qt-free tests of the review queue, loader and state (napari_nucsynth.io.review)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_nucsynth.io import FORMATS, export_pairs, read_pair_folder, write_labels
from napari_nucsynth.io.review import (
    REVIEW_FILE,
    AcceptedPairs,
    build_queue,
    counts,
    first_undecided,
    instance_types,
    load_pair,
    load_review_labels,
    load_review_types,
    load_sample,
    next_undecided,
    read_review,
    record,
    scan_pair_folder,
)


def _pairs(n=3):
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        lab = np.zeros((20, 28), np.uint32)
        lab[1:6, 2:9] = 3
        lab[8:18, 9 + i:19 + i] = 70_000 if i == 2 else 5  # a uint32-only id in one pair
        out.append((f"t{i}", rng.integers(0, 255, (20, 28, 3), dtype=np.uint8), lab, None, {"seed": i}))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_pair_every_format(tmp_path, fmt):
    pairs = _pairs()
    if fmt == "png":  # 16-bit PNG refuses ids above 65,535
        pairs = [(p, i, np.where(lab > 65535, 9, lab).astype(np.uint32), t, m) for p, i, lab, t, m in pairs]
    export_pairs(pairs, tmp_path, fmt)
    queue, source = build_queue(tmp_path)
    assert source == "manifest" and [e["id"] for e in queue] == ["t0", "t1", "t2"]
    for e, (_, img, lab, _, _) in zip(queue, pairs):
        image, labels = load_pair(tmp_path, e)
        assert labels.dtype == np.uint32
        assert np.array_equal(image, img) and np.array_equal(labels, lab)


def test_extra_manifest_fields_are_ignored(tmp_path):
    export_pairs(_pairs(1), tmp_path, "stardist")
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["generator"] = {"method": "classic"}
    m["pairs"][0]["files"]["points"] = "points/t0.csv"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    queue, _ = build_queue(tmp_path)
    image, labels = load_pair(tmp_path, queue[0])
    assert image.shape == (20, 28, 3) and labels.shape == (20, 28)


@pytest.mark.parametrize("fmt", ["cellpose", "stardist", "png"])
def test_plain_folder_queue(tmp_path, fmt):
    pairs = _pairs()
    export_pairs(pairs, tmp_path, fmt if fmt != "png" else "stardist")
    (tmp_path / "manifest.json").unlink()
    queue, source = build_queue(tmp_path)
    assert source == "folder"
    assert [e["id"] for e in queue] == [s.name for s in read_pair_folder(tmp_path)]
    _, labels = load_pair(tmp_path, queue[2])
    assert int(labels.max()) == 70_000


def test_plain_folder_label_only_and_errors(tmp_path):
    write_labels(tmp_path / "a_masks.tif", np.ones((4, 4), np.uint32))
    q = scan_pair_folder(tmp_path)
    assert q == [{"id": "a", "files": {"labels": "a_masks.tif"}}]
    image, labels = load_pair(tmp_path, q[0])
    assert image is None and labels.shape == (4, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no label maps"):
        build_queue(empty)
    with pytest.raises(ValueError, match="not found"):
        build_queue(tmp_path / "missing")
    with pytest.raises(ValueError, match="not found"):
        load_pair(tmp_path, {"id": "b", "files": {"image": "b.png", "labels": "b.tif"}})


def test_state_roundtrip_decisions_and_edits(tmp_path):
    pairs = _pairs()
    export_pairs(pairs, tmp_path, "stardist")
    queue, source = build_queue(tmp_path)
    state = read_review(tmp_path, source)
    assert state["pairs"] == {} and first_undecided(queue, state) == 0
    original = pairs[0][2]
    edited = original.copy()
    edited[0, 0] = 99
    record(tmp_path, state, "t0", "accepted", edited, original=original)
    record(tmp_path, state, "t1", "skipped")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files
    again = read_review(tmp_path)
    assert again["pairs"]["t0"]["decision"] == "accepted" and again["pairs"]["t0"]["edited"]
    assert again["pairs"]["t1"]["decision"] == "skipped" and "time" in again["pairs"]["t1"]
    back = load_review_labels(tmp_path, again, "t0")
    assert back.dtype == np.uint32 and np.array_equal(back, edited)
    assert load_review_labels(tmp_path, again, "t1") is None
    assert first_undecided(queue, again) == 1  # skipped counts as undecided
    assert next_undecided(queue, again, 1) == 2 and next_undecided(queue, again, 2) == 1
    c = counts(queue, again)
    assert (c["accepted"], c["rejected"], c["skipped"], c["remaining"], c["edited"]) == (1, 0, 1, 2, 1)
    # undoing the edit (labels equal to the original again) drops the correction
    record(tmp_path, again, "t0", None, original, original=original)
    assert not again["pairs"]["t0"].get("edited") and not (tmp_path / "reviewed" / "t0.tif").exists()
    assert again["pairs"]["t0"]["decision"] == "accepted"
    record(tmp_path, again, "t1", "rejected")
    record(tmp_path, again, "t2", "accepted")
    assert first_undecided(queue, again) is None and next_undecided(queue, again, 0) is None


def test_accepted_pairs_export_roundtrip(tmp_path):
    pairs = _pairs()
    ds, out = tmp_path / "ds", tmp_path / "out"
    export_pairs(pairs, ds, "cellpose")
    queue, _ = build_queue(ds)
    state = read_review(ds)
    fixed = pairs[2][2].copy()
    fixed[fixed == 3] = 0
    record(ds, state, "t2", "accepted", fixed, original=pairs[2][2])
    record(ds, state, "t0", "accepted")
    record(ds, state, "t1", "rejected")
    acc = AcceptedPairs(ds, queue, state)
    assert len(acc) == 2
    manifest = export_pairs(acc, out, "stardist")
    assert [p["id"] for p in manifest["pairs"]] == ["t0", "t2"]
    assert manifest["pairs"][1]["meta"]["review"]["edited"] is True
    assert manifest["pairs"][1]["meta"]["seed"] == 2
    back = {s.name: s for s in read_pair_folder(out)}
    assert np.array_equal(back["t2"].labels, fixed) and np.array_equal(back["t0"].labels, pairs[0][2])
    assert np.array_equal(back["t2"].image, pairs[2][1])


def test_bad_state_and_decision(tmp_path):
    (tmp_path / REVIEW_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_review(tmp_path)
    (tmp_path / REVIEW_FILE).write_text(json.dumps({"pairs": {"a": {"decision": "maybe"}}}))
    with pytest.raises(ValueError, match="valid decision"):
        read_review(tmp_path)
    (tmp_path / REVIEW_FILE).unlink()
    state = read_review(tmp_path)
    with pytest.raises(ValueError, match="decision must be"):
        record(tmp_path, state, "a", "maybe")
    with pytest.raises(ValueError, match="file name"):
        record(tmp_path, state, "../x", "accepted")


def _typed_pairs(n=2):
    out = []
    for pid, img, lab, _, meta in _pairs(n):
        lab = np.where(lab > 65535, 9, lab).astype(np.uint32)
        types = np.zeros(lab.shape, np.int32)
        types[lab == 3] = 2
        types[(lab != 3) & (lab > 0)] = 1
        out.append((pid, img, lab, types, meta))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_sample_reads_classes_in_every_format(tmp_path, fmt):
    typed = _typed_pairs()
    export_pairs(typed, tmp_path / "typed", fmt, class_names={1: "epithelial", 2: "lymphocyte"})
    export_pairs([(p, i, lab, None, m) for p, i, lab, _, m in _typed_pairs(1)], tmp_path / "plain", fmt)
    queue, _ = build_queue(tmp_path / "typed")
    for e, (_, _, lab, types, _) in zip(queue, typed):
        s = load_sample(tmp_path / "typed", e)
        assert np.array_equal(s.labels, lab) and s.types is not None and np.array_equal(s.types, types)
    q2, _ = build_queue(tmp_path / "plain")
    assert load_sample(tmp_path / "plain", q2[0]).types is None  # no classes: none invented (nor hovernet's fg)


def test_instance_types_follow_edited_instances():
    lab = np.zeros((6, 8), np.uint32)
    lab[0:3, 0:4], lab[3:6, 4:8], lab[0:2, 6:8] = 1, 2, 3
    types = np.zeros_like(lab, dtype=np.int32)
    types[0:3, 0:4] = 5
    types[0, 0] = 1  # a minority of instance 1's pixels
    types[3:6, 4:8] = 2
    types[5, 4:8] = 0  # unclassed pixels do not vote
    # nucleus 2 grown into background, nucleus 3 drawn on background, nucleus 1 split in two
    edited = lab.copy()
    edited[2, 4:8] = 2
    edited[0:3, 2:4] = 7
    out, untyped = instance_types(edited, types)
    assert out.dtype == np.int32 and untyped == 1
    assert (out[edited == 1] == 5).all() and (out[edited == 7] == 5).all()
    assert (out[edited == 2] == 2).all() and (out[edited == 3] == 0).all() and (out[edited == 0] == 0).all()
    tie = np.array([[1, 1]], np.uint32), np.array([[4, 3]], np.int32)
    assert instance_types(*tie)[0].tolist() == [[3, 3]]  # a tie goes to the smaller class
    with pytest.raises(ValueError, match="differ in shape"):
        instance_types(lab, types[:2])


def test_edited_classes_persist_and_export(tmp_path):
    typed = _typed_pairs()
    ds, out = tmp_path / "ds", tmp_path / "out"
    export_pairs(typed, ds, "hovernet", class_names={1: "epithelial", 2: "lymphocyte"})
    queue, _ = build_queue(ds)
    state = read_review(ds)
    pid, _, lab, types, _ = typed[0]
    # t0: one nucleus re-classed (types edited), one new nucleus painted on background without a class
    new_types = types.copy()
    new_types[lab == 3] = 1
    new_lab = lab.copy()
    new_lab[15:19, 0:4] = 11
    record(ds, state, pid, "accepted", new_lab, original=lab, types=new_types, original_types=types)
    rec = read_review(ds)["pairs"][pid]
    assert rec["types_edited"] and rec["types"] == "reviewed/types/t0.tif"
    assert np.array_equal(load_review_types(ds, state, pid), new_types)
    # t1: classes untouched (equal to the dataset's): no correction file
    record(ds, state, "t1", "accepted", None, types=typed[1][3], original_types=typed[1][3])
    assert load_review_types(ds, state, "t1") is None and not (ds / "reviewed/types/t1.tif").exists()
    acc = AcceptedPairs(ds, queue, state)
    assert acc.class_names == {1: "epithelial", 2: "lymphocyte"}
    manifest = export_pairs(acc, out, "coco", class_names=acc.class_names)
    assert [p["has_types"] for p in manifest["pairs"]] == [True, True]
    assert manifest["pairs"][0]["meta"]["review"]["untyped"] == 1
    q_out, _ = build_queue(out)
    back = {e["id"]: load_sample(out, e) for e in q_out}
    assert np.array_equal(back["t0"].labels, new_lab)
    assert (back["t0"].types[new_lab == 3] == 1).all() and (back["t0"].types[new_lab == 11] == 0).all()
    assert np.array_equal(back["t1"].types, typed[1][3])
    cats = json.loads((out / "annotations.json").read_text())["categories"]
    assert {c["id"]: c["name"] for c in cats}[2] == "lymphocyte"
