"""Qt tests of the Train widget: a tiny HoVer-Net on a small synthetic tile (crop 64, batch 1), a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _tiny import HOVERNET

from napari_nucsynth._widgets.segment import SegmentWidget
from napari_nucsynth._widgets.train import (
    JOINT,
    TrainWidget,
    joint_available,
)
from napari_nucsynth.devices import available_devices
from napari_nucsynth.generate import synthetic_pairs
from napari_nucsynth.models import load_checkpoint, model_kinds
from napari_nucsynth.train import TrainResult, TrainUpdate

TIMEOUT = 30000  # ms
TINY = HOVERNET


def _tile(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark discs (nuclei) on a pink background, and their instance labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    lab = np.zeros((n, n), np.uint32)
    for i, (r, c) in enumerate(rng.integers(8, n - 8, (14, 2)), 1):
        lab[((yy - r) ** 2 + (xx - c) ** 2 <= 36) & (lab == 0)] = i
    img = np.empty((n, n, 3), np.uint8)
    img[:] = (235, 200, 220)
    img[lab > 0] = (80, 50, 140)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img, lab


@pytest.fixture
def setup(make_napari_viewer, monkeypatch, tmp_path):
    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path / "models"))
    viewer = make_napari_viewer()
    img, lab = _tile()
    image = viewer.add_image(img, name="H&E", rgb=True)
    labels = viewer.add_labels(lab, name="nuclei")
    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    widget.model.value = "hovernet"
    widget.config.value = json.dumps(TINY)
    widget.steps.value = 400
    widget.batch.value = 1
    widget.crop.value = 64
    widget.device.value = "cpu"
    widget.val_fraction.value = 0.0
    widget.save_every.value = 1000
    return viewer, image, labels, widget


def _hidden(w) -> bool:
    return w.native.isHidden()  # `visible` is False for every widget of a viewer that is not shown


def _wait_idle(widget, qtbot):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def _wait_step(widget, qtbot, n: int):
    qtbot.waitUntil(lambda: widget._job is not None and widget._job.step >= n, timeout=TIMEOUT)


def test_dropdowns_list_the_registry_and_pairs(setup):
    viewer, image, labels, widget = setup
    kinds = model_kinds() + ([JOINT] if joint_available() else [])
    assert list(widget.model.choices) == kinds
    assert {"hovernet", "maskrcnn", "adain", "sian"} <= set(kinds)
    assert list(widget.device.choices) == available_devices()
    assert widget.pairs.value == [(image, labels)]  # the one pair of the same size, chosen by default
    viewer.add_labels(np.zeros((50, 50), np.uint32), name="other size")
    assert len(widget.pairs.choices) == 1  # only layers of the same height and width pair up
    assert _hidden(widget.generator) and not _hidden(widget.config)
    widget.source.value = "folder"
    assert not _hidden(widget.images_dir) and _hidden(widget.pairs) and _hidden(widget.styles)


def test_start_stop_resume_cycle(setup, qtbot, tmp_path):
    viewer, _, _, widget = setup
    segment = SegmentWidget(viewer)  # open before the run: it must list the checkpoint once saved
    viewer.window.add_dock_widget(segment, name="Segment")
    segment.method.value = "hovernet"
    assert list(segment.checkpoint.choices) == [None]
    widget.start_btn.native.click()
    assert widget.running and widget.start_btn.text == "Stop"
    _wait_step(widget, qtbot, 3)
    qtbot.waitUntil(lambda: widget.plot.points >= 3, timeout=TIMEOUT)  # the loss plot gets the steps
    assert {"loss"} <= set(widget.plot.series)
    qtbot.waitUntil(lambda: "steps/s" in widget.live_text and "left" in widget.live_text, timeout=TIMEOUT)
    # the status line says it too, from the first measured steps (issue 20: it said "starting" for the whole run)
    qtbot.waitUntil(lambda: "steps/s" in widget.status.value and "left." in widget.status.value, timeout=TIMEOUT)
    assert widget.status.value.startswith("Training hovernet: step ")
    widget.plot.grab()  # paints (also when the viewer is hidden)
    assert widget.plot.redraws >= 1
    widget.start_btn.native.click()  # the button reads Stop
    _wait_idle(widget, qtbot)
    res = widget.result
    assert isinstance(res, TrainResult) and res.stopped and 3 <= res.step < 400
    assert res.path.parent == tmp_path / "models" and res.path.name.startswith("hovernet-")
    assert load_checkpoint(res.path, kind="hovernet")["step"] == res.step
    assert "stopped" in widget.status.value and widget.start_btn.text == "Start"
    assert res.path in segment.checkpoint.choices  # listed at once for the Segment widget
    # resume the last run: it continues in the same file up to the new step count
    assert widget.resume.choices[1] == res.path
    widget.resume.value = res.path
    widget.steps.value = res.step + 2
    widget.augment.value = "strong"  # ignored: a resumed run keeps its own augmentation
    xs = widget.plot.series["loss"][0]
    n_points = len(xs)
    widget.start()
    _wait_idle(widget, qtbot)
    res2 = widget.result
    assert not res2.stopped and res2.step == res.step + 2 and res2.path == res.path
    assert len(xs) == n_points + 2 and xs[-1] == res2.step  # the plot continues the curve
    assert load_checkpoint(res.path)["step"] == res.step + 2 and "finished" in widget.status.value
    assert load_checkpoint(res.path)["train_data"]["augment"] == "basic"


def test_start_from_a_saved_or_shipped_model(setup, qtbot, tmp_path):
    from napari_nucsynth.models import save_checkpoint
    from napari_nucsynth.train import shipped_checkpoint

    viewer, _, _, widget = setup
    tiny = {**TINY, "width": 4}
    base = save_checkpoint(tmp_path / "models" / "base.pt", kind="hovernet", config=tiny,
                           state_dict=_tiny_state(tiny), step=50)
    viewer.add_points(np.zeros((0, 2)))  # any layer change refreshes the dropdowns
    shipped = shipped_checkpoint("hovernet")
    assert list(widget.init.choices) == [None, *([shipped] if shipped else []), base]
    widget.init.value = base
    widget.config.value = ""  # the starting checkpoint's configuration is used
    widget.steps.value = 2
    widget.augment.value = "strong"
    widget.start()
    _wait_idle(widget, qtbot)
    res = widget.result
    ck = load_checkpoint(res.path, kind="hovernet")
    assert res.step == 2 and ck["step"] == 2  # a new run from base's weights, not its continuation
    assert ck["config"]["width"] == 4 and ck["train_data"]["init"] == str(base)
    assert ck["train_data"]["augment"] == "strong"
    widget.model.value = JOINT if JOINT in widget.model.choices else "sian"
    if widget.model.value == JOINT:
        assert _hidden(widget.init) and _hidden(widget.augment)


def _tiny_state(cfg):
    import torch

    from napari_nucsynth.models import get_model

    torch.manual_seed(0)
    return get_model("hovernet").build(cfg).state_dict()


def test_pause_blocks_and_resume_continues(setup, qtbot):
    _, _, _, widget = setup
    widget.start()
    _wait_step(widget, qtbot, 1)
    widget.pause_btn.native.click()
    assert widget.paused and widget.pause_btn.text == "Resume"
    qtbot.wait(400)  # the step in flight ends; then the thread waits
    widget._drain()
    step = widget._job.step
    qtbot.wait(600)
    widget._drain()
    assert widget._job.step == step and widget.running  # no progress while paused
    widget.pause_btn.native.click()
    assert not widget.paused and widget.pause_btn.text == "Pause"
    _wait_step(widget, qtbot, step + 2)
    # Stop while paused still stops, and saves
    widget.pause()
    widget.stop()
    _wait_idle(widget, qtbot)
    assert widget.result.stopped and load_checkpoint(widget.result.path)["step"] == widget.result.step


def test_closing_the_widget_stops_and_saves(setup, qtbot):
    viewer, _, _, widget = setup
    widget.start()
    _wait_step(widget, qtbot, 1)
    worker = widget._worker
    viewer.window.remove_dock_widget(widget.native)  # the dock's close button
    assert widget._job.stop
    qtbot.waitUntil(lambda: not worker.is_running, timeout=TIMEOUT)
    _wait_idle(widget, qtbot)
    assert widget.result.stopped and widget.result.path.is_file()
    assert "closed" in widget.status.value


def test_bad_input_is_a_message(setup, qtbot, tmp_path):
    _, _, _, widget = setup
    widget.source.value = "folder"
    widget.images_dir.value = tmp_path / "nope"
    widget.labels_dir.value = tmp_path
    widget.start()
    assert not widget.running and "does not exist" in widget.status.value
    (tmp_path / "imgs").mkdir()
    widget.images_dir.value = tmp_path / "imgs"  # exists, but holds no pairs: the loader says so
    widget.start()
    _wait_idle(widget, qtbot)
    assert widget.status.value.startswith("Cannot train:") and "no image" in widget.status.value
    assert widget.start_btn.text == "Start" and widget.start_btn.enabled
    widget.source.value = "layers"
    widget.lr.value = "fast"
    widget.start()
    assert not widget.running and "Learning rate" in widget.status.value
    widget.lr.value = ""
    widget.config.value = "{width: 8"
    widget.start()
    assert not widget.running and "JSON" in widget.status.value


def test_error_in_training_is_the_status_line_and_the_checkpoint_kept(setup, qtbot, monkeypatch, popups):
    import napari_nucsynth.train as train_mod

    def broken(kind, images, labels, *, steps, out, on_update=None, **kw):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"saved")
        on_update(TrainUpdate("step", 1, steps, losses={"loss": 1.0}))
        on_update(TrainUpdate("checkpoint", 1, steps, path=str(out)))
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(train_mod, "train", broken)
    widget = setup[3]
    widget.start()
    _wait_idle(widget, qtbot)
    assert popups == []  # issue 20: once, in the status line (the traceback goes to the log), not a pop-up too
    assert widget.status.value.startswith("Training hovernet failed: RuntimeError: CUDA error: out of memory")
    assert "is kept" in widget.status.value
    assert widget.start_btn.text == "Start"


def test_synthetic_pairs_are_generated_then_trained(setup, qtbot):
    _, image, labels, widget = setup
    imgs, labs = synthetic_pairs(2, 64, [image.data], fit_labels=labels.data, seed=0)
    assert len(imgs) == 2 and imgs[0].shape == (64, 64, 3) and labs[0].dtype == np.uint32 and labs[0].max() > 0
    widget.source.value = "synthetic"
    assert widget.styles.value == [image]
    widget.n_synth.value, widget.synth_size.value, widget.steps.value = 2, 64, 2
    widget.start()
    assert "synthesising 2 pairs" in widget.status.value
    _wait_idle(widget, qtbot)
    res = widget.result
    assert res is not None and res.step == 2 and not res.stopped, widget.status.value
    assert load_checkpoint(res.path)["train_data"]["source"] == "synthetic"


def test_mix_in_synthetic_pairs_recipe_b(setup, qtbot):
    """*Mix in synthetic* (segmenters, real data): the real pairs plus N synthetic pairs made from them, recorded in
    the checkpoint; hidden for generators, the joint loop and the synthetic source."""
    _, image, labels, widget = setup
    assert not _hidden(widget.mix) and _hidden(widget.mix_renderer)  # the renderer shows once N > 0
    widget.mix.value = 2
    assert not _hidden(widget.mix_renderer)
    from napari_nucsynth.render import renderers

    # every registered renderer can make the mixed-in pairs (all ship a model), not a hand-kept list
    assert list(widget.mix_renderer.choices) == renderers() and "pix2pixhd" in renderers()
    widget.model.value = "sian"
    assert _hidden(widget.mix) and _hidden(widget.mix_renderer)
    widget.model.value = "hovernet"
    widget.source.value = "synthetic"
    assert _hidden(widget.mix)
    widget.source.value = "layers"
    widget.steps.value = 2
    widget.start()
    _wait_idle(widget, qtbot)
    res = widget.result
    assert res is not None and res.step == 2 and not res.stopped, widget.status.value
    data = load_checkpoint(res.path)["train_data"]
    assert data["synthetic_pairs"]["n"] == 2 and data["synthetic_pairs"]["renderer"] == "classic"
    assert data["mixed_synthetic"]["n"] == 2 and data["source"] == "layers"


def test_generator_preview_layer(setup, qtbot):
    viewer, _, _, widget = setup
    widget.model.value = "adain"
    widget.config.value = json.dumps({"width": 0.125, "pretrained": "random"})  # as tests/test_adain.py
    widget.steps.value, widget.preview_every.value = 2, 1
    widget.start()
    _wait_idle(widget, qtbot)
    assert widget.result is not None and widget.result.step == 2, widget.status.value
    layer = viewer.layers["train preview: adain"]
    assert layer.rgb and layer.data.dtype == np.uint8 and layer.metadata["step"] == 2
    assert widget.pairs.choices == ((setup[1], setup[2]),)  # the preview is never offered as training data



def test_joint_is_listed_when_installed(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """With a (fake) ``napari_nucsynth.train.joint`` installed, "joint" is a choice with generator and segmenter
    dropdowns, and Start calls ``train_joint`` with them."""
    import importlib.machinery
    import sys
    import types

    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path))
    calls = []

    def train_joint(generator, segmenter, images, labels, *, steps, out, on_update=None, should_stop=None, **kw):
        calls.append((generator, segmenter, kw["adversarial"], len(images)))
        on_update(TrainUpdate("step", 1, steps, losses={"loss": 1.0, "adv": 0.5}))
        on_update(TrainUpdate("preview", 1, steps, image=np.zeros((8, 8, 3), np.uint8)))
        return TrainResult(path=out, step=1, stopped=False, metrics={}, seconds=0.1)

    fake = types.ModuleType("napari_nucsynth.train.joint")
    fake.__spec__ = importlib.machinery.ModuleSpec("napari_nucsynth.train.joint", None)
    fake.train_joint = train_joint
    fake.GENERATORS, fake.SEGMENTERS = ("adain", "sian"), ("hovernet", "maskrcnn")
    monkeypatch.setitem(sys.modules, "napari_nucsynth.train.joint", fake)
    assert joint_available()
    viewer = make_napari_viewer()
    img, lab = _tile()
    viewer.add_image(img, name="H&E", rgb=True)
    viewer.add_labels(lab, name="nuclei")
    widget = TrainWidget(viewer)
    assert JOINT in widget.model.choices
    widget.model.value = JOINT
    assert not _hidden(widget.generator) and not _hidden(widget.segmenter) and _hidden(widget.config)
    # what the joint loop trains (not nuclick, pix2pixhd, points2image)
    assert list(widget.generator.choices) == ["adain", "sian"]
    assert list(widget.segmenter.choices) == ["hovernet", "maskrcnn"]
    widget.generator.value, widget.segmenter.value, widget.adversarial.value = "sian", "hovernet", "acgan"
    widget.steps.value = 1
    widget.start()
    _wait_idle(widget, qtbot)
    assert calls == [("sian", "hovernet", "acgan", 1)]
    assert widget.result.path.name.startswith("joint-") and "train preview: joint" in viewer.layers


def test_default_pairs_leave_out_the_plugins_outputs(setup):
    """Issue 20: Start must not train on a prediction or an error overlay because they were preselected."""
    from napari_nucsynth._widgets._outputs import ERRORS, MASKS, SEGMENTATION, output_name

    viewer, image, labels, widget = setup
    shape = labels.data.shape
    seg = viewer.add_labels(np.zeros(shape, np.uint32), name=output_name(SEGMENTATION, "H&E (hovernet)"),
                            metadata={SEGMENTATION: "H&E"})
    errors = viewer.add_labels(np.zeros(shape, np.uint32), name="errors: something")  # marked by its name only
    masks = viewer.add_labels(np.zeros(shape, np.uint32), name="clicks masks", metadata={MASKS: "clicks"})
    widget.pairs.value = []
    widget._reset()
    assert widget.pairs.value == [(image, labels)]
    offered = {lab for _, lab in widget.pairs.choices}
    assert seg in offered and masks in offered  # still there to choose on purpose (pseudo-labels, clicked masks)
    assert errors not in offered and errors not in widget.fit_to.choices  # TP/FP/FN classes are not nuclei
    assert ERRORS not in errors.metadata


def test_presets_set_the_length_of_the_run(setup):
    from napari_nucsynth._widgets.train import CUSTOM, PRESETS, QUICK, STANDARD

    _, _, _, widget = setup
    assert widget.preset.value == CUSTOM  # the fixture set steps, crop and batch by hand
    widget.preset.value = QUICK
    assert (widget.steps.value, widget.crop.value, widget.batch.value) == (300, 128, 4)
    assert widget.preset.value == QUICK
    widget.crop.value = 96  # a field edited by hand: the run is no longer the preset
    assert widget.preset.value == CUSTOM and widget.steps.value == 300
    widget.preset.value = STANDARD
    assert all(getattr(widget, k).value == v for k, v in PRESETS[STANDARD].items())


def test_the_cost_on_a_cpu_is_said_before_start(setup):
    from napari_nucsynth._widgets.train import QUICK, STANDARD

    _, _, _, widget = setup
    widget.status.value = "Training finished at step 12/12 in 0:03; saved x.pt."
    widget.preset.value = STANDARD
    widget.device.value = "cpu"
    text = widget.status.value
    assert text.startswith("On the CPU, 1000 steps of 256-px crops (batch 4) take about 28 min to 2.8 h"), text
    assert QUICK in text and "time left is shown" in text
    widget.preset.value = QUICK  # short enough: the hint goes
    assert widget.status.value == ""


def test_the_plugin_manifest_docks_it_in_a_scroll_area(make_napari_viewer):
    from napari_nucsynth._widgets._dock import ScrollDock

    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("napari-nucsynth", "Train")
    assert isinstance(dock, ScrollDock) and isinstance(dock._magic_widget, TrainWidget)
    widget = dock._magic_widget
    assert widget.preset.value == "Standard (1000 steps)" and widget.steps.value == 1000
