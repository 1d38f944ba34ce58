"""Qt tests of the stain/modality transfer in the viewer: the Restain widget, the Segment widget's modality TTA and
the Train widget's augmentation list (issue 21, part 3)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nucsynth import stain

PLUGIN = "napari-nucsynth"
TIMEOUT = 30000  # ms
PALE, DARK = "TCGA-21-5784-01Z-00-DX1", "TCGA-HE-7130-01Z-00-DX1"


@pytest.fixture
def no_models(monkeypatch, tmp_path):
    """No saved checkpoints (an empty models folder) and no shipped drit model."""
    import napari_nucsynth._widgets.restain as rw

    monkeypatch.setenv("NUCSYNTH_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(rw, "shipped_drit_checkpoint", lambda: tmp_path / "absent" / "drit_monuseg.pt")
    return tmp_path


@pytest.fixture
def restain(no_models, make_napari_viewer, load_tile):
    viewer = make_napari_viewer()
    a = viewer.add_image(load_tile(PALE)[0][:96, :80], name="pale", rgb=True, scale=(0.5, 0.5), translate=(3, 4))
    b = viewer.add_image(load_tile(DARK)[0][:64, :64], name="dark", rgb=True)
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, "Restain")
    return viewer, a, b, dock._magic_widget


def _shown(w) -> bool:
    """Whether a control is set to show (``.visible`` is also False while the viewer's window is not shown)."""
    return not w.native.isHidden()


def _wait_idle(widget, qtbot):
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT)


def test_restain_adds_the_transfer_as_a_layer_above_the_image(restain, qtbot, popups):
    viewer, pale, dark, widget = restain
    assert list(widget.method.choices) == ["macenko", "reinhard"]  # no drit model: drit not offered
    assert not _shown(widget.checkpoint)
    widget.image_combo.value, widget.reference_combo.value = pale, dark
    for method in ("macenko", "reinhard"):
        widget.method.value = method
        widget.run()
        _wait_idle(widget, qtbot)
        name = f"restained: pale ({method} to dark)"
        assert name in viewer.layers, widget.status.value
        out = viewer.layers[name]
        assert out.rgb and out.data.dtype == np.uint8 and out.data.shape == pale.data.shape
        assert np.array_equal(out.data, stain.transfer(pale.data, dark.data, method=method))
        assert not np.array_equal(out.data, pale.data)
        assert np.allclose(out.scale, pale.scale) and np.allclose(out.translate, pale.translate)
        assert viewer.layers.index(out) == viewer.layers.index(pale) + 1  # just above the tile it restains
        assert out.metadata["nucsynth_restain_of"] == "pale" and out.metadata["method"] == method
    n = len(viewer.layers)
    widget.run()  # the same settings again: the layer is updated, not duplicated
    _wait_idle(widget, qtbot)
    assert len(viewer.layers) == n and "restained: pale (reinhard to dark)" in widget.status.value
    assert not popups


def test_bad_reference_is_a_status_line_not_a_layer(restain, qtbot, popups):
    viewer, pale, _, widget = restain
    white = viewer.add_image(np.full((40, 40, 3), 250, np.uint8), name="white", rgb=True)
    widget.image_combo.value, widget.reference_combo.value, widget.method.value = pale, white, "macenko"
    n = len(viewer.layers)
    widget.run()
    _wait_idle(widget, qtbot)
    assert widget.status.value.startswith("Cannot restain: reference")
    assert "stained pixels" in widget.status.value and len(viewer.layers) == n
    assert widget.restain_btn.text == "Restain" and not popups


def test_drit_is_listed_once_a_model_exists(restain, no_models, monkeypatch):
    import napari_nucsynth._widgets.restain as rw

    _, _, _, widget = restain
    picked = no_models / "mine.pt"
    picked.write_bytes(b"a checkpoint")
    widget.browse.value = picked  # a picked model lists drit and chooses it
    assert "drit" in widget.method.choices and widget.method.value == "drit"
    assert _shown(widget.checkpoint) and widget.checkpoint.value == picked.resolve()
    widget.method.value = "macenko"
    assert not _shown(widget.checkpoint) and _shown(widget.browse)

    shipped = no_models / "shipped.pt"
    shipped.write_bytes(b"x")
    monkeypatch.setattr(rw, "shipped_drit_checkpoint", lambda: shipped)
    fresh = rw.RestainWidget(restain[0])
    assert list(fresh.method.choices) == ["macenko", "reinhard", "drit"]


def test_drit_strength_slider_follows_the_model_and_reaches_the_transfer(restain, no_models, qtbot, popups,
                                                                         monkeypatch):
    import napari_nucsynth._widgets.restain as rw
    from napari_nucsynth.models import drit, save_checkpoint

    viewer, pale, dark, widget = restain
    assert not _shown(widget.strength)  # macenko: no strength
    model = drit.build({"n_domains": 2, "ngf": 4, "n_down": 1, "n_res": 1, "mlp_dim": 8, "style_dim": 4, "nef": 4,
                        "enc_layers": 2, "ncf": 8, "ndf": 8, "d_layers": 2, "num_d": 1, "amp": "none",
                        "strength": 0.6})
    ck = no_models / "half.pt"
    save_checkpoint(ck, kind="drit", config=model.config, state_dict=model.state_dict(), step=0)
    widget.browse.value = ck  # lists drit and chooses it: the slider shows the model's own strength
    assert widget.method.value == "drit" and _shown(widget.strength)
    assert widget.strength.value == pytest.approx(0.6)
    seen = {}

    def fake_transfer(image, reference, **kw):
        seen.update(kw)
        return image

    monkeypatch.setattr(rw, "transfer", fake_transfer)
    widget.strength.value = 0.25
    widget.image_combo.value, widget.reference_combo.value = pale, dark
    widget.run()
    _wait_idle(widget, qtbot)
    assert seen["method"] == "drit" and seen["strength"] == pytest.approx(0.25) and seen["checkpoint"] == ck.resolve()
    widget.method.value = "macenko"
    assert not _shown(widget.strength)
    seen.clear()
    widget.run()
    _wait_idle(widget, qtbot)
    assert seen["method"] == "macenko" and "strength" not in seen  # the classical methods restain fully
    assert not popups


def test_segment_widget_modality_tta(make_napari_viewer, load_tile, qtbot, popups):
    from napari_nucsynth._widgets.segment import SegmentWidget
    from napari_nucsynth.segment import segment

    viewer = make_napari_viewer()
    img, ref = load_tile(DARK)[0][:64, :64], load_tile(PALE)[0]
    tile = viewer.add_image(img, name="tile", rgb=True)
    viewer.add_image(ref, name="ref", rgb=True)
    widget = SegmentWidget(viewer)
    widget.method.value, widget.device.value = "hovernet", "cpu"
    assert not _shown(widget.tta_refs)
    widget.tta.value = "modality"
    assert _shown(widget.tta_refs)
    widget.image_combo.value = tile
    widget.run()  # no reference chosen
    assert "choose at least one in TTA references" in widget.status.value and not widget.running
    widget.tta_refs.value = [viewer.layers["ref"]]
    widget.run()
    _wait_idle(widget, qtbot)
    out = viewer.layers["segmentation: tile (hovernet)"].data
    assert np.array_equal(out, segment(img, method="hovernet", device="cpu", tta="modality", tta_references=[ref]))
    assert widget._cache is not None and widget._cache[0][-2] == "modality"  # the mean maps are cached
    widget.tta.value = "modality-drit"  # no reference needed: drit's own stain domains
    assert _shown(widget.tta_refs)
    widget.tta_refs.value = []
    widget.run()
    _wait_idle(widget, qtbot)
    assert np.array_equal(viewer.layers["segmentation: tile (hovernet)"].data,
                          segment(img, method="hovernet", device="cpu", tta="modality-drit"))
    assert widget._cache[0][-2] == "modality-drit"

    widget.method.value = "watershed"
    widget.run()
    assert "Cannot segment: modality test-time augmentation" in widget.status.value
    assert "hovernet" in widget.status.value and not widget.running and not popups


def test_train_widget_offers_modality(make_napari_viewer):
    from napari_nucsynth._widgets.train import TrainWidget

    widget = TrainWidget(make_napari_viewer())
    assert "modality" in widget.augment.choices and "modality-drit" in widget.augment.choices


def test_a_wrapped_status_line_gets_the_height_of_all_its_lines(qtbot, no_models, make_napari_viewer):
    from napari_nucsynth._widgets import _dock

    dock = _dock.RestainDock(make_napari_viewer())  # the dock napari shows, as a window of its own here
    qtbot.addWidget(dock)
    dock.resize(330, 600)
    dock.show()
    widget = dock._magic_widget
    for text in ("Restaining colon to prostate with drit...", "Restaining colon (drit): translating",
                 "'restained: colon (drit to prostate)': 512 x 512 (drit, 1.10 s)."):  # as a run sets them
        widget.status.value = text
        qtbot.wait(50)
    n = widget.status.native
    assert n.heightForWidth(n.width()) > n.fontMetrics().lineSpacing() * 2  # several lines at this width
    assert n.height() >= n.heightForWidth(n.width())  # all of them shown, none clipped
