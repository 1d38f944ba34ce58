"""The package as napari and a user see it: the manifest, the sample data, the import rules, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_manifest_validates():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("napari-nucsynth")
    pm.validate_imports()
    assert pm.name == "napari-nucsynth"
    assert {w.display_name for w in pm.contributions.widgets} >= {"Points to masks"}


def test_npe2_validate_command():
    npe2 = Path(sys.executable).with_name("npe2")
    out = subprocess.run([str(npe2), "validate", "napari-nucsynth"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_one_manifest():
    """The top-level napari.yaml is the packaged one (a link), so editable and wheel installs read the same file."""
    top = REPO / "napari.yaml"
    packaged = REPO / "src" / "napari_nucsynth" / "napari.yaml"
    assert top.is_symlink() and top.resolve() == packaged.resolve()
    import napari_nucsynth

    assert (Path(napari_nucsynth.__file__).parent / "napari.yaml").resolve() == packaged.resolve()


def test_sample_data():
    from napari_nucsynth._sample_data import monuseg_crop

    (img, _, k1), (lab, _, k2), (pts, meta, k3) = monuseg_crop()
    assert (k1, k2, k3) == ("image", "labels", "points")
    assert img.dtype == np.uint8 and img.shape == (400, 400, 3)
    assert lab.dtype == np.uint32 and lab.shape == (400, 400)
    assert len(pts) == len(np.unique(lab)) - 1
    assert np.all(lab[tuple(np.floor(pts + 0.5).astype(int).T)] > 0)
    assert len(meta["features"]["class"]) == len(pts)
    assert "CC BY-NC-SA" in meta["metadata"]["source"]


CORE = ["napari_nucsynth", "napari_nucsynth.masks", "napari_nucsynth.points", "napari_nucsynth.io",
        "napari_nucsynth.metrics", "napari_nucsynth.stain", "napari_nucsynth.render", "napari_nucsynth.devices",
        "napari_nucsynth.cli", "napari_nucsynth._checks", "napari_nucsynth.segment", "napari_nucsynth.models",
        "napari_nucsynth.train"]


def test_core_modules_import_no_qt_napari_or_torch():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        # listing the methods imports every registered renderer and segmenter module (the widgets do it at start)
        + "napari_nucsynth.render.renderers(); napari_nucsynth.segment.segmenters()\n"
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui', 'torch', 'vispy'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_builtin_model_kind_loads_its_own_module_only():
    """``get_model("sian")`` imports the sian module, not every kind's (torchvision, which maskrcnn imports, is
    seconds of a command's start); listing the kinds, or asking for an unknown one, loads them all."""
    code = (
        "import sys\n"
        "from napari_nucsynth.models import _BUILTIN, get_model\n"
        "get_model('sian')\n"
        "print(sorted(k for k in _BUILTIN if f'napari_nucsynth.models.{k}' in sys.modules))\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["['sian']", "False"]
    from napari_nucsynth.models import get_model, model_kinds

    kinds = ["adain", "daff", "drit", "hovernet", "maskrcnn", "nuclick", "pix2pixhd", "points2image", "sian"]
    assert set(kinds) <= set(model_kinds())
    with pytest.raises(ValueError, match=f"unknown model kind 'nope'; trainable kinds: {', '.join(model_kinds())}$"):
        get_model("nope")


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "napari_nucsynth.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.skipif(not __import__("os").environ.get("DISPLAY"), reason="needs an X display (pytest-xvfb)")
def test_torch_models_load_after_the_viewer_exists():
    """A fresh process, as a user's napari: the viewer (and its OpenGL, Mesa's llvmpipe under Xvfb) first, then a
    widget, then torchvision (what hovernet and maskrcnn import). Without the widgets' triton guard this is a
    segmentation fault on machines without a GPU driver."""
    script = (
        "import numpy as np, napari\n"
        "v = napari.Viewer(show=True)\n"
        "v.add_image(np.zeros((8, 8)))\n"
        "from napari_nucsynth._widgets.segment import SegmentWidget\n"
        "w = SegmentWidget(v)\n"
        "import torch, torchvision\n"
        "print(tuple(torchvision.models.resnet18().eval()(torch.zeros(1, 3, 64, 64)).shape))\n"
        "v.close()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert "(1, 1000)" in r.stdout


def test_cli_sample_masks_and_random_points(tmp_path, monuseg_dir):
    from napari_nucsynth.io import read_labels, read_points_csv

    like = monuseg_dir / "labels" / "TCGA-18-5592-01Z-00-DX1.png"  # a whole tile's labels
    out = _cli("random-points", "--like", str(like), "--out", str(tmp_path / "p.csv"), "--seed", "1")
    assert out.returncode == 0, out.stderr
    pts, _ = read_points_csv(tmp_path / "p.csv")
    assert 300 < len(pts) < 900  # the tile has 480 nuclei
    for ext in (".tif", ".png", ".npy"):
        target = tmp_path / f"l{ext}"
        out = _cli("sample-masks", "--points", str(tmp_path / "p.csv"), "--shape", "1000", "1000",
                   "--out", str(target), "--seed", "2")
        assert out.returncode == 0, out.stderr
        lab = read_labels(target)
        assert lab.dtype == np.uint32 and lab.shape == (1000, 1000) and lab.max() == len(pts)
    assert np.array_equal(read_labels(tmp_path / "l.tif"), read_labels(tmp_path / "l.npy"))
    import tifffile

    assert tifffile.imread(tmp_path / "l.tif").dtype == np.uint32


def test_cli_prior_from_labels(tmp_path, monuseg_dir):
    from napari_nucsynth.io import write_points_csv

    write_points_csv(tmp_path / "p.csv", [[10.0, 10.0], [40.0, 40.0]], classes=[0, 1])
    like = monuseg_dir / "labels" / "TCGA-18-5592-01Z-00-DX1.png"
    out = _cli("sample-masks", "--points", str(tmp_path / "p.csv"), "--shape", "64", "64",
               "--out", str(tmp_path / "l.tif"), "--prior", str(like), "--seed", "0")
    assert out.returncode == 0, out.stderr


def test_cli_errors_are_messages(tmp_path):
    (tmp_path / "p.csv").write_text("index,axis-0,axis-1\n0,nan,3\n")
    out = _cli("sample-masks", "--points", str(tmp_path / "p.csv"), "--shape", "10", "10", "--out", str(tmp_path / "l.tif"))
    assert out.returncode == 2 and "NaN" in out.stderr and "Traceback" not in out.stderr
    out = _cli("sample-masks", "--points", str(tmp_path / "missing.csv"), "--shape", "10", "10", "--out", "x.tif")
    assert out.returncode == 2 and "not found" in out.stderr
    out = _cli("sample-masks", "--points", str(tmp_path / "p.csv"), "--shape", "10", "10", "--out", str(tmp_path / "l.jpg"))
    assert out.returncode == 2


def test_io_round_trips(tmp_path):
    from napari_nucsynth.io import read_labels, read_points_csv, write_labels, write_points_csv

    lab = np.zeros((20, 30), np.uint32)
    lab[3:6, 4:9] = 70000
    for ext in (".tif", ".npy"):
        write_labels(tmp_path / f"a{ext}", lab)
        assert np.array_equal(read_labels(tmp_path / f"a{ext}"), lab)
    with pytest.raises(ValueError, match="16-bit"):
        write_labels(tmp_path / "a.png", lab)
    pts = np.array([[1.5, 2.25], [100.0, 3.0]])
    write_points_csv(tmp_path / "p.csv", pts, classes=[2, 5])
    back, cls = read_points_csv(tmp_path / "p.csv")
    assert np.array_equal(back, pts) and cls.tolist() == [2, 5]
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_cli_evaluate_folders_and_json(tmp_path):
    import json

    from napari_nucsynth.io import write_labels

    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    a = np.zeros((20, 20), np.uint32)
    a[2:8, 2:8] = 1
    a[10:16, 10:16] = 2
    write_labels(tmp_path / "t" / "x.png", a)
    write_labels(tmp_path / "p" / "x.tif", a)  # a perfect prediction, another format
    b = a.copy()
    b[b == 2] = 0  # one nucleus missed
    write_labels(tmp_path / "t" / "y.npy", a)
    write_labels(tmp_path / "p" / "y.npy", b)
    out = _cli("evaluate", "--truth", str(tmp_path / "t"), "--pred", str(tmp_path / "p"), "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["n_images"] == 2
    assert set(d) >= {"aji", "aji_plus", "dice", "dice2", "dq", "sq", "pq", "object_f1", "pixel_f1"}
    # y: DQ = 1 / (1 + 0.5) = 2/3; mean over the two images = (1 + 2/3) / 2
    assert abs(d["dq"] - (1 + 2 / 3) / 2) < 1e-9
    out = _cli("evaluate", "--truth", str(tmp_path / "t"), "--pred", str(tmp_path / "p"))
    assert out.returncode == 0 and "pooled" in out.stdout and "x" in out.stdout
    out = _cli("evaluate", "--truth", str(tmp_path / "t"), "--pred", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "not found" in out.stderr


def test_cli_render(tmp_path, monuseg_dir):
    import imageio.v3 as iio

    from napari_nucsynth.io import read_labels, write_labels

    lab = read_labels(monuseg_dir / "labels" / "TCGA-38-6178-01Z-00-DX1.png")[:128, :160]
    write_labels(tmp_path / "l.tif", lab)
    style = monuseg_dir / "images" / "TCGA-A7-A13F-01Z-00-DX1.png"
    out = _cli("render", "--labels", str(tmp_path / "l.tif"), "--style", str(style), "--seed", "3",
               "--out", str(tmp_path / "o.png"))
    assert out.returncode == 0, out.stderr
    img = iio.imread(tmp_path / "o.png")
    assert img.shape == (128, 160, 3) and img.dtype == np.uint8
    out = _cli("render", "--labels", str(tmp_path / "l.tif"), "--style", str(style), "--seed", "3",
               "--out", str(tmp_path / "o2.png"))
    assert np.array_equal(iio.imread(tmp_path / "o2.png"), img)
    blank = tmp_path / "blank.png"
    iio.imwrite(blank, np.full((64, 64, 3), 245, np.uint8))
    out = _cli("render", "--labels", str(tmp_path / "l.tif"), "--style", str(blank), "--out", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "no detectable nuclei" in out.stderr
