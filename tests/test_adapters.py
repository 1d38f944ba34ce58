"""The StarDist and Cellpose adapters, without either package: they are optional extras, never test dependencies.

Fake ``stardist``/``csbdeep``/``tensorflow`` and ``cellpose`` modules (with a ``__spec__``, so that
``importlib.util.find_spec`` sees them) are put into ``sys.modules`` and the adapters module is reloaded into a
registry of this test's own. The fakes record what they are given and label the dark (or, for one-channel input,
bright) discs of a synthetic H&E image, so the tests check the documented input rule, the parameters passed on,
the conversion of the output to contiguous uint32 labels, the mapping of a failed download to a ``ValueError``, and
cancellation.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.metadata
import json
import sys
import types
import urllib.error
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
from scipy import ndimage as ndi

import napari_nucsynth.segment as seg
from napari_nucsynth.segment import adapters
from napari_nucsynth.stain import rgb_to_hed

EXTRAS = ("stardist", "csbdeep", "tensorflow", "cellpose")
BACKGROUND, NUCLEUS = (236, 196, 222), (78, 42, 122)  # pink eosin, dark purple haematoxylin


def _he(shape=(96, 128), centres=((20, 24, 8), (24, 70, 7), (64, 40, 9), (70, 100, 8))):
    """A synthetic H&E image with dark discs on a pink background, plus seeded noise (so that different channel
    transforms normalise differently), and the discs' mask."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for r, c, rad in centres:
        mask |= (yy - r) ** 2 + (xx - c) ** 2 <= rad**2
    img = np.empty((*shape, 3), np.int64)
    img[:] = BACKGROUND
    img[mask] = NUCLEUS
    img += np.random.default_rng(0).integers(-12, 13, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _dark(x: np.ndarray) -> np.ndarray:
    """Pixels below the middle of the range of ``x``'s channel mean (the fakes' segmentation of RGB input)."""
    m = x.mean(axis=-1)
    return m < (m.min() + m.max()) / 2


def _bright(x: np.ndarray) -> np.ndarray:
    """Pixels above the middle of the range of ``x`` (the fakes' segmentation of one-channel input)."""
    return x > (x.min() + x.max()) / 2


def _expected(mask: np.ndarray) -> np.ndarray:
    return ndi.label(mask)[0].astype(np.uint32)


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__path__ = []
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


@pytest.fixture
def registry(monkeypatch):
    """A registry of this test's own holding the built-in segmenters but not the adapters; ``reload()`` re-imports
    the adapters module into it (after fakes were injected). The adapters' model cache is emptied after the test."""
    seg.segmenters()  # the built-in modules are imported and registered
    reg = {k: v for k, v in seg._REGISTRY.items() if k not in ("stardist", "cellpose")}
    monkeypatch.setattr(seg, "_REGISTRY", reg)

    def reload():
        importlib.reload(adapters)
        return reg

    yield reload
    adapters._MODELS.clear()


# ----------------------------------------------------------------------------------------------------------------
# packages missing


def test_missing_packages_not_listed(monkeypatch, registry):
    for name in EXTRAS:
        monkeypatch.setitem(sys.modules, name, None)  # find_spec then returns None, whatever is installed
    registry()
    names = seg.segmenters()
    assert "stardist" not in names and "cellpose" not in names
    assert "watershed" in names
    img, _ = _he()
    with pytest.raises(ValueError, match=r"unknown segmentation method 'stardist'; available: .*watershed"):
        seg.segment(img, method="stardist")
    with pytest.raises(ValueError, match=r"available: .*watershed"):
        seg.segment(img, method="cellpose")


def test_stardist_needs_tensorflow_too(monkeypatch, registry):
    _install_stardist(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    assert "stardist" not in registry()


def test_module_spec_without_spec_is_not_importable(monkeypatch):
    mod = types.ModuleType("cellpose")  # __spec__ None: find_spec raises ValueError
    monkeypatch.setitem(sys.modules, "cellpose", mod)
    assert not adapters._importable("cellpose")


# ----------------------------------------------------------------------------------------------------------------
# StarDist


class FakeStarDist2D:
    """Records its construction and inputs; labels the dark discs (RGB) or bright ones (one channel) of a
    normalised image, with ids multiplied by 7 (not contiguous) in int32."""

    instances: ClassVar[list] = []
    offline = False
    n_channel_in = 3

    def __init__(self, config, name=None, basedir="."):
        self.args = (config, name, basedir)
        n_in = self.n_channel_in
        if basedir is not None and name is not None:
            cfg = Path(basedir) / name / "config.json"
            if cfg.is_file():
                n_in = json.loads(cfg.read_text()).get("n_channel_in", n_in)
        self.config = SimpleNamespace(n_channel_in=n_in, axes="YXC")
        self.calls: list = []
        FakeStarDist2D.instances.append(self)

    @classmethod
    def from_pretrained(cls, name_or_alias=None):
        if cls.offline:
            raise Exception(  # what Keras' get_file raises  # noqa: TRY002
                "URL fetch failure on https://github.com/stardist/stardist-models/releases/download/v0.1/"
                "python_2D_versatile_he.zip: None -- [Errno -3] Temporary failure in name resolution")
        if name_or_alias != "2D_versatile_he":
            return None
        return cls(None, name=name_or_alias, basedir="/cache/StarDist2D")

    def _labels(self, img):
        fg = _dark(img) if img.ndim == 3 else _bright(img)
        return (ndi.label(fg)[0] * 7).astype(np.int32)

    def _predict_instances_generator(self, img, axes=None, normalizer=None, prob_thresh=None, nms_thresh=None,
                                     n_tiles=None, show_tile_progress=True, **kwargs):
        self.calls.append({"img": img, "prob_thresh": prob_thresh, "nms_thresh": nms_thresh, "n_tiles": n_tiles,
                           "show_tile_progress": show_tile_progress, **kwargs})
        yield "predict"
        n = int(np.prod(n_tiles)) if n_tiles is not None else 1
        for _ in range(n if n > 1 else 0):
            yield "tile"
        yield "nms"
        yield self._labels(img), {"points": np.zeros((0, 2))}

    def predict_instances(self, img, **kwargs):
        r = None
        for r in self._predict_instances_generator(img, **kwargs):
            pass
        return r


class FakeStarDistNoGenerator(FakeStarDist2D):
    _predict_instances_generator = None  # an old stardist: predict_instances only

    def predict_instances(self, img, **kwargs):
        self.calls.append({"img": img, **kwargs})
        return self._labels(img), {}


def _fake_normalize(x, pmin=3, pmax=99.8, axis=None, clip=False, eps=1e-20, dtype=np.float32):
    """csbdeep.utils.normalize (the same formula), recording its arguments."""
    _fake_normalize.calls.append((pmin, pmax, axis))
    mi = np.percentile(x, pmin, axis=axis, keepdims=True)
    ma = np.percentile(x, pmax, axis=axis, keepdims=True)
    return ((x.astype(dtype) - mi) / (ma - mi + eps)).astype(dtype)


def _install_stardist(monkeypatch, cls=FakeStarDist2D):
    FakeStarDist2D.instances = []
    FakeStarDist2D.offline = False
    _fake_normalize.calls = []
    tf_devices: list = []

    def device(name):
        tf_devices.append(name)
        return contextlib.nullcontext()

    models = _module("stardist.models", StarDist2D=cls)
    utils = _module("csbdeep.utils", normalize=_fake_normalize)
    mods = {"stardist": _module("stardist", models=models), "stardist.models": models,
            "csbdeep": _module("csbdeep", utils=utils), "csbdeep.utils": utils,
            "tensorflow": _module("tensorflow", device=device)}
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return tf_devices


@pytest.fixture
def stardist(monkeypatch, registry):
    tf_devices = _install_stardist(monkeypatch)
    reg = registry()
    assert "stardist" in reg
    return SimpleNamespace(tf_devices=tf_devices)


def test_stardist_registered_and_described(stardist):
    assert "stardist" in seg.segmenters()
    s = seg.get_segmenter("stardist")
    assert s.name == "stardist" and s.needs_checkpoint and s.description
    assert set(s.params) == {"prob_thresh", "nms_thresh"}
    assert all(len(v) == 3 and v[1] <= v[0] <= v[2] for v in s.params.values())


def test_stardist_pretrained_input_and_output(stardist):
    img, mask = _he()
    steps = []
    lab = seg.segment(img, method="stardist", progress=lambda d, t, w: steps.append((d, t, w)))
    assert lab.dtype == np.uint32 and lab.shape == img.shape[:2]
    np.testing.assert_array_equal(lab, _expected(mask))  # ids 1..N, not the fake's multiples of 7
    (model,) = FakeStarDist2D.instances
    assert model.args == (None, "2D_versatile_he", "/cache/StarDist2D")
    (call,) = model.calls
    # StarDist's H&E example: RGB, percentiles 1 and 99.8 over all axes, float32
    assert _fake_normalize.calls == [(1, 99.8, (0, 1, 2))]
    x = call["img"]
    assert x.shape == img.shape and x.dtype == np.float32
    lo, hi = np.percentile(img, 1), np.percentile(img, 99.8)
    np.testing.assert_allclose(x, (img - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    assert call["prob_thresh"] is None and call["nms_thresh"] is None  # the model's own
    assert call["n_tiles"] == (1, 1, 1) and call["show_tile_progress"] is False
    assert steps[-1][0] == steps[-1][1]
    assert stardist.tf_devices == []  # "auto": TensorFlow's own placement


def test_stardist_params_device_and_model_cache(stardist):
    img, mask = _he()
    seg.segment(img, method="stardist", device="cpu", prob_thresh=0.6, nms_thresh=0.2)
    lab = seg.segment(img, method="stardist", device="cpu", prob_thresh=0.0, nms_thresh=None)
    np.testing.assert_array_equal(lab, _expected(mask))
    (model,) = FakeStarDist2D.instances  # loaded once
    assert [(c["prob_thresh"], c["nms_thresh"]) for c in model.calls] == [(0.6, 0.2), (None, None)]
    assert stardist.tf_devices == ["/CPU:0", "/CPU:0"]
    with pytest.raises(ValueError, match="unknown stardist parameter"):
        seg.segment(img, method="stardist", diameter=20)
    with pytest.raises(ValueError, match=r"prob_thresh must be in \[0, 1\]"):
        seg.segment(img, method="stardist", prob_thresh=1.5)


def test_stardist_large_image_uses_n_tiles(stardist):
    img, mask = _he(shape=(1100, 200), centres=((100, 50, 8), (600, 120, 9), (1050, 60, 7)))
    steps = []
    lab = seg.segment(img, method="stardist", progress=lambda d, t, w: steps.append((d, t, w)))
    np.testing.assert_array_equal(lab, _expected(mask))
    (call,) = FakeStarDist2D.instances[0].calls
    assert call["n_tiles"] == (2, 1, 1)
    assert any("tiles" in w for _, _, w in steps) and any("suppression" in w for _, _, w in steps)
    assert steps[-1] == (3, 3, "StarDist: done")


def test_stardist_model_folder(stardist, tmp_path):
    folder = tmp_path / "he_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_channel_in": 3}))
    img, mask = _he()
    lab = seg.segment(img, method="stardist", checkpoint=folder)
    np.testing.assert_array_equal(lab, _expected(mask))
    assert FakeStarDist2D.instances[0].args == (None, "he_model", str(tmp_path))
    with pytest.raises(ValueError, match="not a folder"):
        seg.segment(img, method="stardist", checkpoint=tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        seg.segment(img, method="stardist", checkpoint=tmp_path / "empty")


def test_stardist_single_channel_model_gets_haematoxylin(stardist, tmp_path):
    folder = tmp_path / "fluo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_channel_in": 1}))
    img, mask = _he()
    lab = seg.segment(img, method="stardist", checkpoint=folder)
    np.testing.assert_array_equal(lab, _expected(mask))
    (call,) = FakeStarDist2D.instances[0].calls
    h = rgb_to_hed(img)[..., 0]
    lo, hi = np.percentile(h, 1), np.percentile(h, 99.8)
    assert call["img"].shape == img.shape[:2] and call["n_tiles"] == (1, 1)
    np.testing.assert_allclose(call["img"], (h - lo) / (hi - lo), rtol=1e-4, atol=1e-5)
    assert _fake_normalize.calls == [(1, 99.8, (0, 1))]


def test_stardist_offline_download(stardist):
    FakeStarDist2D.offline = True
    img, _ = _he()
    with pytest.raises(ValueError, match=r"(?s)could not download.*network access.*checkpoint") as info:
        seg.segment(img, method="stardist")
    assert "stardist-models" in str(info.value) and "Temporary failure" in str(info.value)


def test_stardist_cancel(stardist):
    img, _ = _he()
    with pytest.raises(InterruptedError):
        seg.segment(img, method="stardist", should_stop=lambda: True)
    assert FakeStarDist2D.instances == []  # stopped before the model was loaded
    answers = iter([False, False, False, True])  # stops inside StarDist's prediction
    with pytest.raises(InterruptedError):
        seg.segment(img, method="stardist", should_stop=lambda: next(answers, True))
    assert len(FakeStarDist2D.instances[0].calls) == 1


def test_stardist_tta(stardist):
    img, mask = _he()
    steps = []
    lab = seg.segment(img, method="stardist", tta=True, progress=lambda d, t, w: steps.append((d, t, w)))
    np.testing.assert_array_equal(lab > 0, mask)
    assert lab.max() == _expected(mask).max() and lab.dtype == np.uint32
    assert len(FakeStarDist2D.instances[0].calls) == 8
    assert steps[-1] == (8, 8, "test-time augmentation")


def test_stardist_without_generator(monkeypatch, registry):
    _install_stardist(monkeypatch, FakeStarDistNoGenerator)
    registry()
    img, mask = _he()
    np.testing.assert_array_equal(seg.segment(img, method="stardist"), _expected(mask))
    assert FakeStarDist2D.instances[0].calls[0]["n_tiles"] == (1, 1, 1)


def test_stardist_input_rule(stardist):
    img, mask = _he()
    lab = seg.segment(img.astype(np.float32) / 255.0, method="stardist")  # float in [0, 1] is converted
    np.testing.assert_array_equal(lab, _expected(mask))
    with pytest.raises(ValueError, match="image must be uint8"):
        seg.segment(img.astype(np.int64), method="stardist")


# ----------------------------------------------------------------------------------------------------------------
# Cellpose


def _install_cellpose(monkeypatch, version: str):
    """A fake cellpose of major version 3 or 4; returns a namespace recording what it was given."""
    rec = SimpleNamespace(init=[], eval=[], size=[], offline=False, size_offline=False, estimate=19.0, size_files=[])
    major = int(version.split(".")[0])

    class CellposeModel:
        def __init__(self, **kwargs):
            if rec.offline:
                raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
            rec.init.append(kwargs)

        def eval(self, x, **kwargs):
            rec.eval.append({"x": x, **kwargs})
            fg = _bright(x) if x.ndim == 2 else _dark(x)  # v3: nuclei bright; v4: RGB, nuclei dark
            masks = (ndi.label(fg)[0] * 5).astype(np.uint16)
            return masks, [None], np.zeros(256)

    class SizeModel:
        def __init__(self, cp_model, device=None, pretrained_size=None):
            rec.size.append({"pretrained_size": pretrained_size})

        def eval(self, x, **kwargs):
            rec.size[-1].update({"x": x, **kwargs})
            return rec.estimate, rec.estimate

    def size_model_path(model_type):
        if rec.offline or rec.size_offline:
            raise urllib.error.URLError("offline")
        rec.size_files.append(model_type)
        return f"/cache/size_{model_type}torch_0.npy"

    attrs = {"CellposeModel": CellposeModel, "MODEL_DIR": Path("/home/user/.cellpose/models")}
    if major < 4:
        attrs.update(MODEL_NAMES=["cyto3", "nuclei", "cyto2", "cyto"], SizeModel=SizeModel,
                     size_model_path=size_model_path)
    else:
        attrs.update(MODEL_NAMES=["cpsam_v2", "cpdino", "cpsam"])
    models = _module("cellpose.models", **attrs)
    monkeypatch.setitem(sys.modules, "cellpose", _module("cellpose", version=version, models=models))
    monkeypatch.setitem(sys.modules, "cellpose.models", models)
    return rec


@pytest.fixture(params=["3.1.1.2", "4.0.6"])
def cellpose(request, monkeypatch, registry):
    rec = _install_cellpose(monkeypatch, request.param)
    rec.major = int(request.param[0])
    assert "cellpose" in registry()
    return rec


def _cellpose_input(img: np.ndarray, major: int) -> np.ndarray:
    """The documented input: v3 the haematoxylin density, v4 RGB; each channel 0 at its 1st, 1 at its 99th
    percentile over the whole image."""
    x = rgb_to_hed(img)[..., :1] if major < 4 else img.astype(np.float32)
    lo, hi = np.percentile(x.reshape(-1, x.shape[2]), [1, 99], axis=0)
    out = (x - lo) / (hi - lo)
    return out[..., 0] if major < 4 else out


def test_cellpose_registered_and_described(cellpose):
    s = seg.get_segmenter("cellpose")
    assert s.name == "cellpose" and s.needs_checkpoint and s.description
    assert s.params["diameter"][0] == 22.0 and s.params["flow_threshold"][0] == 0.4
    assert s.params["cellprob_threshold"][0] == 0.0
    assert all(len(v) == 3 and v[1] <= v[0] <= v[2] for v in s.params.values())


def test_cellpose_default_model_input_and_output(cellpose):
    img, mask = _he()
    lab = seg.segment(img, method="cellpose", device="cpu")
    assert lab.dtype == np.uint32 and lab.shape == img.shape[:2]
    np.testing.assert_array_equal(lab, _expected(mask))
    (init,) = cellpose.init
    assert init["gpu"] is False and str(init["device"]) == "cpu"
    (call,) = cellpose.eval
    x = call.pop("x")
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, _cellpose_input(img, cellpose.major), rtol=1e-4, atol=1e-5)
    expected = {"diameter": 22.0, "flow_threshold": 0.4, "cellprob_threshold": 0.0, "normalize": False}
    if cellpose.major < 4:
        assert init.get("model_type") == "nuclei" and "pretrained_model" not in init
        assert x.shape == img.shape[:2]
        assert call == {**expected, "channels": [0, 0]}
    else:
        assert "pretrained_model" not in init and "model_type" not in init  # the package's own default
        assert x.shape == img.shape
        assert call == {**expected, "channel_axis": 2}


def test_cellpose_params_and_model_cache(cellpose):
    img, mask = _he()
    lab = seg.segment(img, method="cellpose", device="cpu", diameter=30, flow_threshold=0.8, cellprob_threshold=-1)
    np.testing.assert_array_equal(lab, _expected(mask))
    seg.segment(img, method="cellpose", device="cpu")
    assert len(cellpose.init) == 1  # the model is kept
    assert [(c["diameter"], c["flow_threshold"], c["cellprob_threshold"]) for c in cellpose.eval] == [
        (30.0, 0.8, -1.0), (22.0, 0.4, 0.0)]
    with pytest.raises(ValueError, match="unknown cellpose parameter"):
        seg.segment(img, method="cellpose", prob_thresh=0.5)
    with pytest.raises(ValueError, match="diameter must be >= 0"):
        seg.segment(img, method="cellpose", diameter=-3)
    with pytest.raises(ValueError, match="flow_threshold must be >= 0"):
        seg.segment(img, method="cellpose", flow_threshold=-0.1)


def test_cellpose_diameter_zero(cellpose):
    img, mask = _he()
    lab = seg.segment(img, method="cellpose", device="cpu", diameter=0)
    np.testing.assert_array_equal(lab, _expected(mask))
    if cellpose.major < 4:  # estimated by the nuclei model's size model, then used
        (size,) = cellpose.size
        assert cellpose.size_files == ["nuclei"] and size["pretrained_size"] == "/cache/size_nucleitorch_0.npy"
        assert size["channels"] == [0, 0] and size["normalize"] is False
        np.testing.assert_allclose(size["x"], _cellpose_input(img, 3), rtol=1e-4, atol=1e-5)
        assert cellpose.eval[0]["diameter"] == 19.0
    else:  # cellpose 4 has no size model: the image's own scale
        assert cellpose.eval[0]["diameter"] is None


def test_cellpose_checkpoint_file_and_name(cellpose, tmp_path):
    img, mask = _he()
    ckpt = tmp_path / "my_cellpose_model"
    ckpt.write_bytes(b"weights")
    np.testing.assert_array_equal(seg.segment(img, method="cellpose", checkpoint=ckpt), _expected(mask))
    assert cellpose.init[-1]["pretrained_model"] == str(ckpt)
    name = "cyto3" if cellpose.major < 4 else "cpsam"
    seg.segment(img, method="cellpose", checkpoint=name)
    assert cellpose.init[-1].get("model_type" if cellpose.major < 4 else "pretrained_model") == name
    with pytest.raises(ValueError, match="neither a model file nor a built-in model"):
        seg.segment(img, method="cellpose", checkpoint=tmp_path / "missing")


def test_cellpose_checkpoint_size_model(cellpose, tmp_path):
    if cellpose.major >= 4:
        pytest.skip("cellpose 4 has no size models")
    img, _ = _he()
    ckpt = tmp_path / "model"
    ckpt.write_bytes(b"weights")
    seg.segment(img, method="cellpose", checkpoint=ckpt, diameter=0)
    assert cellpose.size == [] and cellpose.eval[-1]["diameter"] is None  # no size file: the model's own diameter
    Path(f"{ckpt}_size.npy").write_bytes(b"size")
    seg.segment(img, method="cellpose", checkpoint=ckpt, diameter=0)
    assert cellpose.size[-1]["pretrained_size"] == f"{ckpt}_size.npy" and cellpose.eval[-1]["diameter"] == 19.0


def test_cellpose_offline_download(cellpose):
    cellpose.offline = True
    img, _ = _he()
    with pytest.raises(ValueError, match=r"(?s)could not download.*offline.*\.cellpose.*checkpoint") as info:
        seg.segment(img, method="cellpose")
    assert "URLError" in str(info.value)


def test_cellpose_size_model_offline(cellpose):
    if cellpose.major >= 4:
        pytest.skip("cellpose 4 has no size models")
    cellpose.size_offline = True  # the nuclei model is cached, its size model is not
    img, _ = _he()
    with pytest.raises(ValueError, match=r"(?s)could not download the size model of 'nuclei'.*diameter=0.*offline"):
        seg.segment(img, method="cellpose", diameter=0)
    assert len(seg.segment(img, method="cellpose", diameter=22)) == img.shape[0]  # a given diameter needs none


def test_cellpose_cancel(cellpose):
    img, _ = _he()
    with pytest.raises(InterruptedError):
        seg.segment(img, method="cellpose", should_stop=lambda: True)
    assert cellpose.init == []  # stopped before the model was loaded
    n = {"calls": 0}

    def stop_after_eval():
        n["calls"] += 1
        return len(cellpose.eval) > 0  # turns True once cellpose has run

    with pytest.raises(InterruptedError):
        seg.segment(img, method="cellpose", should_stop=stop_after_eval)
    assert len(cellpose.eval) == 1


def test_cellpose_tta(cellpose):
    img, mask = _he()
    lab = seg.segment(img, method="cellpose", tta=True)
    np.testing.assert_array_equal(lab > 0, mask)
    assert lab.max() == _expected(mask).max()
    assert len(cellpose.eval) == 8


def test_cellpose_large_image_tiles_share_one_normalisation(cellpose):
    # taller than one tile: two tiles, both given the whole image's normalisation (nuclei cut by a tile's edge are
    # taken whole from the other tile)
    img, mask = _he(shape=(2300, 48), centres=tuple((r, 24, 9) for r in range(100, 2300, 180)))
    lab = seg.segment(img, method="cellpose")
    np.testing.assert_array_equal(lab, _expected(mask))
    assert len(cellpose.eval) == 2
    ref = _cellpose_input(img, cellpose.major)
    for call, (r0, r1) in zip(cellpose.eval, [(0, 2048), (2300 - 2048, 2300)]):
        np.testing.assert_allclose(call["x"], ref[r0:r1], rtol=1e-4, atol=1e-5)


def test_cellpose_version_detection(monkeypatch):
    models3 = SimpleNamespace(MODEL_NAMES=["cyto3", "nuclei"])
    models4 = SimpleNamespace(MODEL_NAMES=["cpsam"])
    assert adapters._cellpose_major(SimpleNamespace(version="3.1.1.2"), models4) == 3
    assert adapters._cellpose_major(SimpleNamespace(version="4.0.6"), models3) == 4

    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    # an unreadable version ("unknown" without package metadata): the built-in model names decide
    assert adapters._cellpose_major(SimpleNamespace(version="unknown"), models3) == 3
    assert adapters._cellpose_major(SimpleNamespace(version="unknown"), models4) == 4
