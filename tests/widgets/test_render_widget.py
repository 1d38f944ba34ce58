"""Qt tests of the Render widget, on a 160 x 160 crop of the shipped MoNuSeg sample."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_nucsynth._sample_data import monuseg_crop
from napari_nucsynth._widgets.render import RenderWidget
from napari_nucsynth.devices import available_devices
from napari_nucsynth.render import _REGISTRY, render, renderers
from napari_nucsynth.stain import rgb_to_hed

N = 160
TIMEOUT = 20000  # ms; a 160 x 160 render takes well under a second


@pytest.fixture
def sample():
    (img, img_meta, _), (lab, _, _), _ = monuseg_crop()
    return img[:N, :N].copy(), lab[:N, :N].copy(), img_meta["name"]


@pytest.fixture
def setup(make_napari_viewer, sample):
    img, lab, _ = sample
    viewer = make_napari_viewer()
    image = viewer.add_image(img, name="H&E", rgb=True)
    labels = viewer.add_labels(lab, name="nuclei", scale=(0.5, 0.5), translate=(3, 4))
    widget = RenderWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Render")
    widget.labels_combo.value = labels
    widget.style_combo.value = image
    return viewer, image, labels, widget


def _wait_idle(widget, qtbot):
    qtbot.waitUntil(lambda: not widget.running and not widget._timer.isActive(), timeout=TIMEOUT)


def _render_layers(viewer):
    return [lyr for lyr in viewer.layers if lyr.name.startswith("render: ")]


def _empty_square(lab: np.ndarray, half: int = 6) -> tuple[slice, slice]:
    """A (2 half + 1)-pixel square of background at least 5 pixels from any nucleus and from the border."""
    dist = ndi.distance_transform_cdt(np.pad(lab == 0, 1), metric="chessboard")[1:-1, 1:-1]
    r, c = np.unravel_index(np.argmax(dist), dist.shape)
    assert dist[r, c] > half + 5, "the crop has no empty region big enough"
    return slice(r - half, r + half + 1), slice(c - half, c + half + 1)


def test_render_lands_as_a_layer_and_updates_in_place(setup, qtbot):
    viewer, image, labels, widget = setup
    viewer.layers.selection.active = labels
    widget.seed.value = 3
    widget.render_btn.clicked()  # the button the user presses
    assert widget.running and widget.render_btn.text == "Cancel"
    _wait_idle(widget, qtbot)
    assert widget.render_btn.text == "Render" and widget.progress.value == widget.progress.max
    out = viewer.layers["render: nuclei"]
    assert out.rgb and out.data.shape == (N, N, 3) and out.data.dtype == np.uint8
    assert np.array_equal(out.data, render(labels.data, image.data, seed=3))  # the renderer's output, as is
    assert np.allclose(out.scale, labels.scale) and np.allclose(out.translate, labels.translate)
    # placed directly above the tile it imitates, under the labels; the user's active layer is unchanged
    assert viewer.layers.index(out) == viewer.layers.index(image) + 1 < viewer.layers.index(labels)
    assert viewer.layers.selection.active is labels
    assert widget.status.value.startswith("Rendered 'render: nuclei'")
    # the output is not offered as a style
    assert out not in widget.style_combo.choices and widget.style_combo.value is image

    # render again (another seed): the same layer is updated, no second layer
    first = out.data.copy()
    widget.seed.value = 4
    widget.run()
    _wait_idle(widget, qtbot)
    assert _render_layers(viewer) == [out] and not np.array_equal(out.data, first)

    # the user deleted it: the next render adds a new one
    viewer.layers.remove(out)
    widget.run()
    _wait_idle(widget, qtbot)
    (again,) = _render_layers(viewer)
    assert again is not out and again.data.shape == (N, N, 3)


def test_live_mode_follows_labels_edits(setup, qtbot):
    viewer, image, labels, widget = setup
    widget.live.value = True  # checking live renders the current state
    qtbot.waitUntil(lambda: "render: nuclei" in viewer.layers, timeout=TIMEOUT)
    _wait_idle(widget, qtbot)
    out = viewer.layers["render: nuclei"]
    before = out.data.copy()
    rows, cols = _empty_square(labels.data)

    # a new square nucleus, written as the Points -> Masks widget writes (data_setitem, one undo step)
    new_id = int(labels.data.max()) + 1
    rr, cc = np.mgrid[rows, cols]
    t0 = time.perf_counter()
    with labels.block_history():
        labels.data_setitem((rr.ravel(), cc.ravel()), new_id)
    qtbot.waitUntil(lambda: not np.array_equal(out.data, before), timeout=TIMEOUT)
    latency = time.perf_counter() - t0
    _wait_idle(widget, qtbot)
    assert latency < 5.0  # debounce 150 ms + a ~0.1 s render; generous for a loaded CI machine
    h_before = rgb_to_hed(before)[rows, cols, 0].mean()
    h_after = rgb_to_hed(out.data)[rows, cols, 0].mean()
    assert h_after > h_before + 0.05, (h_before, h_after)  # the empty background became a haematoxylin nucleus
    assert np.array_equal(out.data, render(labels.data, image.data, seed=0))

    # undo (napari emits only set_data) is followed too
    labels.undo()
    qtbot.waitUntil(lambda: np.array_equal(out.data, before), timeout=TIMEOUT)

    # two quick edits, the second while the first is debounced or rendering: the latest state wins
    labels.data_setitem((rr.ravel(), cc.ravel()), new_id)
    qtbot.wait(100)
    labels.data = np.where(labels.data == 1, 0, labels.data).astype(labels.data.dtype)  # drop nucleus 1
    qtbot.wait(50)
    _wait_idle(widget, qtbot)
    assert np.array_equal(out.data, render(labels.data, image.data, seed=0))
    assert _render_layers(viewer) == [out]

    # a display change (refresh, visibility) emits set_data but renders nothing
    n_renders = widget.status.value
    labels.visible = False
    labels.visible = True
    qtbot.wait(400)
    assert not widget.running and widget.status.value == n_renders

    # unchecked: edits no longer render
    widget.live.value = False
    settled = out.data.copy()
    labels.data_setitem((rr.ravel(), cc.ravel()), 0)
    qtbot.wait(400)
    assert not widget.running and np.array_equal(out.data, settled)


def test_live_follows_the_chosen_layer_and_its_removal(setup, qtbot):
    viewer, _, labels, widget = setup
    widget.live.value = True
    _wait_idle(widget, qtbot)
    other = viewer.add_labels(np.zeros((N, N), np.uint32), name="other")
    assert widget.labels_combo.value is labels  # a new layer does not steal the selection
    widget.labels_combo.value = other  # choosing another layer follows it (and renders it)
    qtbot.waitUntil(lambda: "render: other" in viewer.layers, timeout=TIMEOUT)
    _wait_idle(widget, qtbot)
    assert widget._live_layer is other
    out = viewer.layers["render: nuclei"]
    kept = out.data.copy()
    labels.data_setitem((np.array([5]), np.array([5])), 999)  # the old layer is no longer followed
    qtbot.wait(400)
    assert np.array_equal(out.data, kept) and not widget.running
    viewer.layers.remove(other)
    assert widget._live_layer is not other


def test_bad_input_is_a_message(setup, qtbot):
    viewer, _, labels, widget = setup
    two = viewer.add_image(np.zeros((N, N, 2), np.uint8), name="two channels")
    widget.style_combo.value = two
    widget.run()
    _wait_idle(widget, qtbot)
    assert "Cannot render" in widget.status.value and "RGB image" in widget.status.value
    white = viewer.add_image(np.full((N, N, 3), 245, np.uint8), name="white", rgb=True)
    widget.style_combo.value = white
    widget.run()
    _wait_idle(widget, qtbot)
    assert "no detectable nuclei" in widget.status.value
    assert not _render_layers(viewer) and widget.render_btn.text == "Render" and widget.render_btn.enabled
    # nothing chosen: a message, no worker
    viewer.layers.remove(labels)
    assert widget.labels_combo.value is None
    widget.run()
    assert not widget.running and "Choose a Labels layer" in widget.status.value


def test_empty_labels_render_background(setup, qtbot):
    viewer, _, _, widget = setup
    empty = viewer.add_labels(np.zeros((N, N), np.uint32), name="empty")
    widget.labels_combo.value = empty
    widget.run()
    _wait_idle(widget, qtbot)
    out = viewer.layers["render: empty"].data
    assert out.shape == (N, N, 3) and out.std() > 1  # the reference's background texture


def test_dropdowns_list_the_registry_and_devices(setup):
    viewer, image, labels, widget = setup
    assert list(widget.method.choices) == renderers() and widget.method.value == "classic"
    assert list(widget.device.choices) == available_devices() and widget.device.value == "auto"
    assert widget.style_labels_combo.choices == (None, labels)  # "(detect)" first
    assert widget.style_labels_combo.value is None
    grey = viewer.add_image(np.zeros((N, N), np.uint8), name="grey")
    assert widget.style_combo.choices == (image, grey)  # RGB layers first, any Image accepted
    assert widget.style_combo.value is image and widget.labels_combo.value is labels
    viewer.layers.remove(grey)
    assert widget.style_combo.choices == (image,)


class _SlowRenderer:
    """A renderer that takes its time and honours should_stop, to test cancellation."""

    name = "slow (test)"
    description = "test only"
    needs_checkpoint = False

    def __call__(self, labels, style, *, style_labels=None, seed=None, device="auto", checkpoint=None,
                 progress=None, should_stop=None):
        for i in range(100):
            if should_stop and should_stop():
                raise RuntimeError("stopped")
            if progress:
                progress(i, 100, "working")
            time.sleep(0.01)
        return np.zeros((*np.shape(labels), 3), np.uint8)


def test_cancel_stops_the_worker(make_napari_viewer, qtbot, sample, monkeypatch):
    monkeypatch.setitem(_REGISTRY, "slow (test)", _SlowRenderer)
    img, lab, _ = sample
    viewer = make_napari_viewer()
    viewer.add_image(img, name="H&E", rgb=True)
    viewer.add_labels(lab, name="nuclei")
    widget = RenderWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Render")
    widget.method.value = "slow (test)"
    widget.render_btn.clicked()
    qtbot.waitUntil(lambda: widget.progress.value >= 3, timeout=TIMEOUT)  # progress reaches the UI thread
    assert widget.progress.max == 100 and "working" in widget.status.value
    widget.render_btn.clicked()  # the button now reads Cancel
    assert widget.render_btn.text == "Cancelling..."
    t0 = time.perf_counter()
    _wait_idle(widget, qtbot)
    assert time.perf_counter() - t0 < 0.5  # stopped at the next check, not after the 1 s the render takes
    assert widget.status.value == "Cancelled." and not _render_layers(viewer)
    assert widget.render_btn.text == "Render" and widget.render_btn.enabled
    # closing the widget cancels a running render too
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=TIMEOUT)
    job, worker = widget._job, widget._worker
    viewer.window.remove_dock_widget(widget.native)  # the dock's close button
    assert job.cancelled and not widget.live.value
    qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT)
    assert not _render_layers(viewer)


def test_removing_the_labels_cancels_their_render(make_napari_viewer, qtbot, sample, monkeypatch):
    monkeypatch.setitem(_REGISTRY, "slow (test)", _SlowRenderer)
    img, lab, _ = sample
    viewer = make_napari_viewer()
    viewer.add_image(img, name="H&E", rgb=True)
    labels = viewer.add_labels(lab, name="nuclei")
    widget = RenderWidget(viewer)
    widget.method.value = "slow (test)"
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=TIMEOUT)
    viewer.layers.remove(labels)
    t0 = time.perf_counter()
    _wait_idle(widget, qtbot)
    assert time.perf_counter() - t0 < 0.5
    assert not _render_layers(viewer) and "was removed" in widget.status.value


def test_widget_opens_from_the_plugin_manifest(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-nucsynth", "monuseg")
    _, dock = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Render")
    widget = dock._magic_widget
    assert isinstance(widget, RenderWidget)
    assert widget.style_combo.value is viewer.layers["H&E (MoNuSeg crop)"]
    assert widget.labels_combo.value is viewer.layers["nuclei (MoNuSeg labels)"]
    widget.run()
    _wait_idle(widget, qtbot)
    assert viewer.layers["render: nuclei (MoNuSeg labels)"].data.shape == (400, 400, 3)


def test_a_clicked_point_appears_in_the_live_render(make_napari_viewer, qtbot, sample):
    """The issue's scenario: Points -> Masks and Render (live) docked together; a click adds a nucleus to the image."""
    from napari_nucsynth._widgets.points_to_masks import PointsToMasksWidget
    from napari_nucsynth.points import centroids

    img, lab, _ = sample
    viewer = make_napari_viewer()
    viewer.add_image(img, name="H&E", rgb=True)
    points = viewer.add_points(centroids(lab), name="clicks")
    p2m = PointsToMasksWidget(viewer)
    viewer.window.add_dock_widget(p2m, name="Points to masks")
    p2m.points_combo.value = points
    masks = viewer.layers["clicks masks"]
    widget = RenderWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Render")
    widget.labels_combo.value = masks
    widget.live.value = True
    qtbot.waitUntil(lambda: "render: clicks masks" in viewer.layers, timeout=TIMEOUT)
    _wait_idle(widget, qtbot)
    out = viewer.layers["render: clicks masks"]
    before = out.data.copy()
    rows, cols = _empty_square(masks.data)
    centre = ((rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2)
    t0 = time.perf_counter()
    points.add([centre])  # what a click in add mode does
    assert masks.data[centre] == len(points.data)
    qtbot.waitUntil(lambda: not np.array_equal(out.data, before), timeout=TIMEOUT)
    latency = time.perf_counter() - t0
    _wait_idle(widget, qtbot)
    assert latency < 5.0
    nucleus = masks.data == len(points.data)
    assert rgb_to_hed(out.data)[nucleus, 0].mean() > rgb_to_hed(before)[nucleus, 0].mean() + 0.05
    assert viewer.layers.selection.active is points  # the user can go on clicking


def test_prefers_the_masks_made_from_the_clicks(make_napari_viewer):
    """Issue 20: after Points to masks, Render opens on the masks just made, not on the sample's ground truth."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-nucsynth", "monuseg")
    viewer.window.add_plugin_dock_widget("napari-nucsynth", "Points to masks")
    masks = viewer.layers["centroids masks"]
    _, dock = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Render")
    widget = dock._magic_widget
    assert widget.labels_combo.value is masks
    assert viewer.layers["nuclei (MoNuSeg labels)"] in widget.labels_combo.choices  # still there to choose


def test_output_marks_are_the_shared_ones():
    """The Render widget's marks are the ones the other widgets recognise its outputs by."""
    from napari_nucsynth._widgets import _outputs, render

    assert (render._MARK, render._GALLERY) == (_outputs.RENDER, _outputs.GALLERY)


class _LearnedRenderer:
    """A learned renderer stand-in: needs a checkpoint, paints the image with the checkpoint's step as its grey."""

    name = "learned (test)"
    description = "test only"
    needs_checkpoint = True
    default_checkpoint = None

    def __call__(self, labels, style, *, style_labels=None, seed=None, device="auto", checkpoint=None,
                 progress=None, should_stop=None):
        from napari_nucsynth.models import load_checkpoint

        if checkpoint is None:
            raise ValueError("learned (test) needs a trained model")
        step = load_checkpoint(checkpoint, kind="learned (test)")["step"]
        return np.full((*labels.shape, 3), step, np.uint8)


def test_learned_renderer_lists_saved_checkpoints_and_says_when_it_needs_training(setup, qtbot, monkeypatch,
                                                                                  tmp_path):
    from napari_nucsynth.models import save_checkpoint

    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path))
    monkeypatch.setitem(_REGISTRY, "learned (test)", _LearnedRenderer)
    widget = setup[-1]
    widget.method.reset_choices()
    assert not widget.checkpoint.enabled and not widget.browse.enabled  # classic: no model
    widget.method.value = "learned (test)"
    assert widget.checkpoint.enabled and widget.checkpoint.choices == (None,)
    assert "needs a trained model" in widget.status.value and "nucsynth train --model learned (test)" in \
        widget.status.value
    assert not widget.train_model_btn.native.isHidden()  # "Train a model..." is offered
    widget.train_model_btn.changed.emit(None)
    assert "not among its models" in widget.status.value  # a test renderer the Train widget cannot train
    widget.run()  # "(default)" has no model: the renderer's message lands in the status line
    _wait_idle(widget, qtbot)
    assert widget.status.value.startswith("Cannot render:")

    ck = save_checkpoint(tmp_path / "mine.pt", kind="learned (test)", config={}, state_dict={}, step=77)
    save_checkpoint(tmp_path / "other.pt", kind="hovernet", config={}, state_dict={}, step=1)  # another kind
    widget._reset()  # napari refreshes the choices on every layer change
    assert widget.checkpoint.choices == (None, ck)
    assert widget.train_model_btn.native.isHidden()  # a model exists now
    widget.checkpoint.value = ck
    widget.run()
    _wait_idle(widget, qtbot)
    assert widget.result is not None and int(widget.result[0, 0, 0]) == 77
    widget.method.value = "classic"
    assert not widget.checkpoint.enabled and widget.checkpoint.value is None


# ---- style exploration: the Style position slider and the gallery ---------------------------------------------


def _wait_all_idle(widget, qtbot):
    qtbot.waitUntil(lambda: not widget.running and not widget._timer.isActive()
                    and not widget._position_timer.isActive(), timeout=TIMEOUT)


@pytest.fixture
def second_style(setup):
    """A second H&E reference: another crop of the sample tile."""
    viewer = setup[0]
    (img, _, _), _, _ = monuseg_crop()
    return viewer.add_image(img[-N:, -N:].copy(), name="H&E 2", rgb=True)


def test_style_slider_shows_only_for_methods_that_blend_styles(setup, second_style, monkeypatch, tmp_path,
                                                               tiny_sian_checkpoint, qtbot):
    from napari_nucsynth.render import interpolate

    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path))
    viewer, image, labels, widget = setup
    assert widget.method.value == "classic"
    assert widget.style_b.native.isHidden() and widget.position.native.isHidden()
    ck = tmp_path / "tiny.pt"
    ck.write_bytes(tiny_sian_checkpoint.read_bytes())
    widget._reset()
    widget.method.value = "sian"
    assert not widget.style_b.native.isHidden() and not widget.position.native.isHidden()
    assert widget.style_b.value is second_style  # the other reference, not the main style again
    widget.checkpoint.value = ck
    widget.position.value = 0.5  # what dragging the slider does: a render after the debounce wait
    qtbot.waitUntil(lambda: "render: nuclei" in viewer.layers, timeout=TIMEOUT)
    _wait_all_idle(widget, qtbot)
    out = viewer.layers["render: nuclei"]
    kw = dict(method="sian", checkpoint=ck, seed=0, device=widget.device.value)
    assert np.array_equal(out.data, interpolate(labels.data, image.data, second_style.data, 0.5, **kw))
    assert "0.50 of the way from H&E to H&E 2" in widget.status.value
    widget.position.value = 1.0
    qtbot.waitUntil(lambda: widget.status.value.startswith("Rendered") and "1.00 of the way" in widget.status.value,
                    timeout=TIMEOUT)
    assert np.array_equal(out.data, render(labels.data, second_style.data, **kw))
    assert _render_layers(viewer) == [out]  # the same output layer, updated in place
    widget.method.value = "classic"
    assert widget.style_b.native.isHidden() and widget._style_position() is None  # the slider no longer applies


class _SlowBlend:
    """A renderer that can blend styles, slowly: the image's grey level is 100 t."""

    name = "slow blend (test)"
    description = "test only"
    needs_checkpoint = False
    calls: list = []

    def __call__(self, labels, style, **kw):
        return self.interpolate(labels, style, style, 0.0, **kw)

    def interpolate(self, labels, style_a, style_b, t, *, seed=None, device="auto", checkpoint=None,
                    progress=None, should_stop=None, style_labels=None):
        for i in range(30):
            if should_stop and should_stop():
                raise InterruptedError
            if progress:
                progress(i, 30, "blending")
            time.sleep(0.01)
        _SlowBlend.calls.append(t)
        return np.full((*np.shape(labels), 3), round(100 * t), np.uint8)


def test_a_newer_style_position_supersedes_the_render_in_flight(setup, second_style, monkeypatch, qtbot):
    monkeypatch.setitem(_REGISTRY, "slow blend (test)", _SlowBlend)
    monkeypatch.setattr(_SlowBlend, "calls", [])
    viewer, _, _, widget = setup
    widget.method.reset_choices()
    widget.method.value = "slow blend (test)"  # a registered renderer joins by giving an interpolate method
    assert not widget.position.native.isHidden()
    widget.position.value = 0.3
    qtbot.waitUntil(lambda: widget.running, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: widget.progress.value >= 2, timeout=TIMEOUT)
    widget.position.value = 0.8  # while 0.3 renders
    _wait_all_idle(widget, qtbot)
    assert _SlowBlend.calls == [0.8]  # 0.3 was cancelled before it finished; only the newest position rendered
    assert int(viewer.layers["render: nuclei"].data[0, 0, 0]) == 80
    assert widget.status.value.startswith("Rendered") and widget.render_btn.text == "Render"


def _style_folder(path, img):
    import imageio.v3 as iio

    path.mkdir()
    iio.imwrite(path / "tile_b.png", img[-N:, -N:])
    iio.imwrite(path / "tile_a.png", img[:N, :N])
    (path / "broken.png").write_bytes(b"not an image")
    return path


def test_gallery_adds_a_layer_of_every_style_with_names(setup, qtbot, tmp_path):
    from napari_nucsynth.render import gallery

    viewer, image, labels, widget = setup
    (img, _, _), _, _ = monuseg_crop()
    folder = _style_folder(tmp_path / "tiles", img)
    widget.seed.value = 2
    viewer.layers.selection.active = labels
    widget.make_gallery(folder)  # what the Gallery... button does once a folder is picked
    assert widget.running and widget.gallery_btn.text == "Cancel gallery"
    qtbot.waitUntil(lambda: "gallery: nuclei" in viewer.layers, timeout=TIMEOUT)
    _wait_all_idle(widget, qtbot)
    out = viewer.layers["gallery: nuclei"]
    expected = gallery(labels.data, folder, seed=2)
    assert out.rgb and np.array_equal(out.data, expected.grid) and out.data.shape[:2] == (N, 2 * N + 4)
    assert out.metadata["names"] == ["tile_a", "tile_b"] and out.metadata["skipped"][0][0] == "broken.png"
    names = viewer.layers["gallery names: nuclei"]
    assert list(names.features["name"]) == ["tile_a", "tile_b"] and len(names.data) == 2
    assert "2 styles from tiles" in widget.status.value and "Skipped 1: broken.png" in widget.status.value
    # beside the labels, at their scale; not offered as a style; the user's active layer unchanged
    assert np.allclose(out.scale, labels.scale) and out.translate[1] > labels.translate[1] + N * labels.scale[1]
    assert out not in widget.style_combo.choices and out not in widget.style_b.choices
    assert viewer.layers.selection.active is labels
    assert widget.gallery_btn.text == "Gallery..." and widget.render_btn.text == "Render"
    # again (another seed): the same layers are updated, none added
    n_layers = len(viewer.layers)
    widget.seed.value = 3
    widget.make_gallery(folder)
    _wait_all_idle(widget, qtbot)
    assert len(viewer.layers) == n_layers and np.array_equal(out.data, gallery(labels.data, folder, seed=3).grid)


def test_gallery_cancel_and_bad_folder(setup, qtbot, tmp_path, monkeypatch):
    monkeypatch.setitem(_REGISTRY, "slow (test)", _SlowRenderer)
    viewer, _, _, widget = setup
    (img, _, _), _, _ = monuseg_crop()
    folder = _style_folder(tmp_path / "tiles", img)
    widget.method.reset_choices()
    widget.method.value = "slow (test)"
    assert widget.position.native.isHidden()
    widget.make_gallery(folder)
    qtbot.waitUntil(lambda: widget.progress.value >= 1 or "Gallery of" in widget.status.value, timeout=TIMEOUT)
    widget.gallery_btn.clicked()  # the button reads Cancel gallery
    _wait_all_idle(widget, qtbot)
    assert widget.status.value == "Cancelled." and "gallery: nuclei" not in viewer.layers
    assert widget.gallery_btn.text == "Gallery..."
    empty = tmp_path / "empty"
    empty.mkdir()
    widget.method.value = "classic"
    widget.make_gallery(empty)
    _wait_all_idle(widget, qtbot)
    assert widget.status.value.startswith("Cannot render:") and "is empty" in widget.status.value


def test_refinement_slider_shows_for_adain_and_sets_its_strength(setup, qtbot):
    """adain's Refinement slider: hidden for other methods, set to the model's own default when adain is chosen, and
    what it says is what the render uses (0 = the classic render exactly)."""
    from napari_nucsynth.render.adain import model_info

    viewer, image, labels, widget = setup
    assert widget.method.value == "classic" and widget.strength.native.isHidden()
    widget.method.value = "adain"  # the shipped model
    assert not widget.strength.native.isHidden()
    assert widget.strength.value == pytest.approx(model_info()["config"].get("strength", 1.0))
    widget.seed.value = 2
    widget.strength.value = 0.0
    widget.run()
    _wait_idle(widget, qtbot)
    out = viewer.layers["render: nuclei"]
    assert np.array_equal(out.data, render(labels.data, image.data, seed=2))  # the classic render itself
    widget.strength.value = 0.5
    widget.run()
    _wait_idle(widget, qtbot)
    expected = render(labels.data, image.data, method="adain", seed=2, device=widget.device.value,
                      options={"strength": 0.5})
    assert np.array_equal(out.data, expected) and not np.array_equal(out.data, render(labels.data, image.data, seed=2))
    widget.method.value = "classic"
    assert widget.strength.native.isHidden() and widget._options() == {}
