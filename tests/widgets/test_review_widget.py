"""Qt tests of the Review widget on tiny datasets written with export_pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_nucsynth._widgets.review import (
    LABELS_NAME,
    SHORTCUTS,
    TYPES_NAME,
    ReviewWidget,
)
from napari_nucsynth.io import export_pairs, read_pair_folder
from napari_nucsynth.io.review import REVIEW_FILE, build_queue, load_sample

TIMEOUT = 20000  # ms
N = 4


def _pairs(n: int = N):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        lab = np.zeros((24, 32), np.uint32)
        lab[2:8, 3:9] = 1
        lab[10:20, 10 + i:20 + i] = 2
        out.append((f"p{i}", rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), lab, None, {"i": i}))
    return out


@pytest.fixture(params=["png", "stardist"])
def dataset(request, tmp_path):
    d = tmp_path / f"ds_{request.param}"
    export_pairs(_pairs(), d, request.param)
    return d


def _widget(make_napari_viewer, folder):
    viewer = make_napari_viewer()
    w = ReviewWidget(viewer)
    viewer.window.add_dock_widget(w, name="Review")
    assert w.open(folder), w.status.value
    return viewer, w


def _press(viewer, key):
    viewer.window._qt_viewer._key_map_handler.press_key(key)
    viewer.window._qt_viewer._key_map_handler.release_key(key)


def _state(folder):
    return json.loads((folder / REVIEW_FILE).read_text())


def test_buttons_keys_counter_and_persistence(make_napari_viewer, dataset):
    viewer, w = _widget(make_napari_viewer, dataset)
    assert w.current_id == "p0"
    assert viewer.layers[LABELS_NAME].data.dtype == np.uint32
    assert viewer.layers.selection.active is viewer.layers[LABELS_NAME]
    assert "remaining 4" in w.counter.value
    w.accept_btn.changed.emit(None)
    assert w.current_id == "p1"
    assert _state(dataset)["pairs"]["p0"]["decision"] == "accepted"
    _press(viewer, "Shift-R")  # keys pass the Labels layer's own keymap (it is the active layer)
    assert w.current_id == "p2"
    assert _state(dataset)["pairs"]["p1"]["decision"] == "rejected"
    _press(viewer, "Shift-S")
    assert w.current_id == "p3"
    assert _state(dataset)["pairs"]["p2"]["decision"] == "skipped"
    _press(viewer, "Shift-B")
    assert w.current_id == "p2"
    w.skip_btn.changed.emit(None)
    _press(viewer, "Shift-A")  # p3 accepted; the next undecided wraps round to the skipped p2
    assert w.current_id == "p2"
    assert "accepted 2 · rejected 1 · remaining 1" in w.counter.value
    assert all("time" in r for r in _state(dataset)["pairs"].values())


def test_edit_undo_persist_reopen_and_export(make_napari_viewer, qtbot, dataset, tmp_path):
    viewer, w = _widget(make_napari_viewer, dataset)
    layer = viewer.layers[LABELS_NAME]
    original = np.array(layer.data)
    with layer.block_history():
        layer.data_setitem((np.array([20, 21]), np.array([28, 29])), 7)
    assert layer.data[20, 28] == 7
    layer.undo()  # one user action is one undo step
    assert np.array_equal(layer.data, original)
    with layer.block_history():
        layer.data_setitem((np.array([20, 21, 22]), np.array([28, 29, 30])), 7)
    edited = np.array(layer.data)
    w.accept()
    assert w.current_id == "p1"
    assert not layer._undo_history  # loading the next pair does not leave the previous pair's edits undoable
    rec = _state(dataset)["pairs"]["p0"]
    assert rec["edited"] and rec["labels"] == "reviewed/p0.tif"
    import tifffile

    saved = tifffile.imread(dataset / rec["labels"])
    assert saved.dtype == np.uint32 and np.array_equal(saved, edited)
    w.reject()
    # an unsaved edit of the shown pair (p2) is saved when the widget closes
    with layer.block_history():
        layer.data_setitem((np.array([0]), np.array([0])), 9)
    viewer.window.remove_dock_widget(w.native)  # the dock's close button
    assert not any(k in viewer.keymap for k in SHORTCUTS)  # unbound on close
    assert _state(dataset)["pairs"]["p2"]["edited"]

    w2 = ReviewWidget(viewer)
    viewer.window.add_dock_widget(w2, name="Review")
    assert w2.open(dataset)
    assert w2.current_id == "p2"  # the first undecided pair
    assert viewer.layers[LABELS_NAME].data[0, 0] == 9  # its saved correction is restored
    assert "accepted 1 · rejected 1 · remaining 2" in w2.counter.value
    w2.back()
    w2.back()
    assert w2.current_id == "p0"
    assert np.array_equal(viewer.layers[LABELS_NAME].data, edited)

    out = tmp_path / "export"
    w2.out.value = out
    w2.fmt.value = "stardist"
    w2.export_btn.changed.emit(None)
    assert w2.exporting
    qtbot.waitUntil(lambda: not w2.exporting, timeout=TIMEOUT)
    assert not w2.exporting, w2.status.value
    assert "Exported 1" in w2.status.value
    back = read_pair_folder(out)
    assert [s.name for s in back] == ["p0"]
    assert np.array_equal(back[0].labels, edited)  # the corrected labels were exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pairs"][0]["meta"]["review"]["edited"] is True


def test_plain_folder_import_and_export_guard(make_napari_viewer, tmp_path):
    folder = tmp_path / "plain"
    export_pairs(_pairs(2), folder, "cellpose")
    (folder / "manifest.json").unlink()
    _viewer, w = _widget(make_napari_viewer, folder)
    assert "no manifest" in w.status.value and w.current_id == "p0"
    w.accept()
    assert (folder / REVIEW_FILE).is_file()
    w.out.value = folder  # never export over the dataset under review
    w.export()
    assert not w.exporting and "another folder" in w.status.value
    assert not w.open(tmp_path / "nothing")
    assert "Cannot open" in w.status.value


def test_classes_are_shown_edited_and_exported(make_napari_viewer, qtbot, tmp_path):
    typed = []
    for pid, img, lab, _, meta in _pairs(2):
        typed.append((pid, img, lab, np.where(lab == 1, 2, np.where(lab > 0, 1, 0)).astype(np.int32), meta))
    ds = tmp_path / "typed"
    export_pairs(typed, ds, "hovernet", class_names={1: "epithelial", 2: "lymphocyte"})
    viewer, w = _widget(make_napari_viewer, ds)
    types_layer = viewer.layers[TYPES_NAME]
    assert np.array_equal(types_layer.data, typed[0][3])
    assert viewer.layers.index(types_layer) < viewer.layers.index(LABELS_NAME)  # instance outlines on top
    assert viewer.layers.selection.active is viewer.layers[LABELS_NAME]
    # re-class nucleus 2 (types layer) and paint a new nucleus on background without a class
    with types_layer.block_history():
        types_layer.data_setitem(np.nonzero(typed[0][2] == 2), 2)
    labels_layer = viewer.layers[LABELS_NAME]
    with labels_layer.block_history():
        labels_layer.data_setitem((np.array([22, 22, 23]), np.array([0, 1, 0])), 5)
    w.accept()
    assert "1 nuclei have no class" in w.status.value
    rec = _state(ds)["pairs"]["p0"]
    assert rec["edited"] and rec["types_edited"] and rec["types"] == "reviewed/types/p0.tif"
    w.accept()  # p1 unedited

    out = tmp_path / "export"
    w.out.value = out
    w.fmt.value = "coco"
    w.export()
    qtbot.waitUntil(lambda: not w.exporting, timeout=TIMEOUT)
    assert "Exported 2" in w.status.value, w.status.value
    queue, _ = build_queue(out)
    back = {e["id"]: load_sample(out, e) for e in queue}
    lab0 = back["p0"].labels
    assert (back["p0"].types[lab0 == 2] == 2).all() and (back["p0"].types[lab0 == 5] == 0).all()
    assert np.array_equal(back["p1"].types, typed[1][3])
    cats = {c["id"]: c["name"] for c in json.loads((out / "annotations.json").read_text())["categories"]}
    assert cats[1] == "epithelial" and cats[2] == "lymphocyte"


def test_undo_stays_within_the_pair_without_private_napari(make_napari_viewer, dataset, recwarn):
    """Through the Plugins menu the widget gets napari's proxied viewer, which warns (FutureWarning) at every
    private attribute: loading a pair must use none, and still leave nothing of the previous pair to undo."""
    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Review")
    w = dock._magic_widget
    assert w.open(dataset), w.status.value
    layer = viewer.layers[LABELS_NAME]
    layer.mode = "paint"
    with layer.block_history():
        layer.data_setitem((np.array([20]), np.array([28])), 7)
    w.accept()
    shown = np.array(layer.data)
    layer.undo()  # nothing to undo: the edit belonged to p0
    assert w.current_id == "p1" and np.array_equal(layer.data, shown)
    assert layer.mode == "paint" and layer.editable  # the user's tool is kept
    with layer.block_history():  # and p1's own edits undo as before
        layer.data_setitem((np.array([0]), np.array([0])), 5)
    layer.undo()
    assert np.array_equal(layer.data, shown)
    private = [str(x.message) for x in recwarn if "Private attribute" in str(x.message)]
    assert not private, private


def test_export_errors_name_the_checkbox_and_are_not_popups(make_napari_viewer, qtbot, dataset, tmp_path, popups,
                                                           monkeypatch):
    viewer, w = _widget(make_napari_viewer, dataset)
    w.accept()
    w.out.value = tmp_path / "export"
    for _ in range(2):  # the second export meets the first one's files
        w.export()
        qtbot.waitUntil(lambda: not w.exporting, timeout=TIMEOUT)
    assert w.status.value.startswith("Cannot export: ") and "exists" in w.status.value
    assert f"Tick '{w.overwrite.text}'" in w.status.value and "overwrite=True" not in w.status.value
    w.overwrite.value = True
    w.export()
    qtbot.waitUntil(lambda: not w.exporting, timeout=TIMEOUT)
    assert "Exported 1" in w.status.value

    import napari_nucsynth._widgets.review as review

    def broken(*a, **k):
        raise KeyError("pairs")

    monkeypatch.setattr(review, "export_pairs", broken)
    w.export()
    qtbot.waitUntil(lambda: not w.exporting, timeout=TIMEOUT)
    assert w.status.value == "Export failed: KeyError: 'pairs'" and popups == []
