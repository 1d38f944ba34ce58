"""The HoVer-Net model, its post-processing, the training loop and the checkpoint format (small models, small crops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny import HOVERNET, assert_channels_last_inference

from napari_nucsynth.masks import hv_maps
from napari_nucsynth.metrics import aji
from napari_nucsynth.models import (
    get_model,
    list_checkpoints,
    load_checkpoint,
    model_kinds,
    save_checkpoint,
)
from napari_nucsynth.models.hovernet import postprocess, sobel21

TILE = "TCGA-A7-A13F-01Z-00-DX1"
TINY = HOVERNET


def _touching_nuclei() -> np.ndarray:
    """Two rows of touching discs (pairs share a boundary), and a lone one."""
    lab = np.zeros((96, 96), np.uint32)
    yy, xx = np.mgrid[:96, :96]
    centres = [(24, 20), (24, 38), (24, 56), (60, 28), (60, 45), (80, 80)]
    for i, (r, c) in enumerate(centres, 1):
        disc = (yy - r) ** 2 + (xx - c) ** 2 <= 10**2
        lab[disc & (lab == 0)] = i
    return lab


def test_postprocess_recovers_touching_nuclei_from_perfect_maps():
    lab = _touching_nuclei()
    out = postprocess((lab > 0).astype(np.float32), hv_maps(lab))
    assert out.dtype == np.uint32 and out.shape == lab.shape
    assert out.max() == lab.max()  # touching discs are split, none merged, none lost
    assert aji(lab, out) > 0.9


def test_postprocess_empty_and_thresholds():
    z = np.zeros((40, 40), np.float32)
    assert not postprocess(z, np.zeros((2, 40, 40), np.float32)).any()
    lab = _touching_nuclei()
    # below the nuclear-pixel threshold everything is background
    assert not postprocess(np.full(lab.shape, 0.3, np.float32) * (lab > 0), hv_maps(lab), np_threshold=0.5).any()


def test_sobel21_sign_and_axis():
    ramp = np.tile(np.arange(50, dtype=np.float64), (40, 1))  # increases along columns
    gx, gy = sobel21(ramp, axis=1), sobel21(ramp, axis=0)
    assert (gx[10:-10, 15:-15] > 0).all()
    assert np.abs(gy[10:-10, 15:-15]).max() < 1e-6 * np.abs(gx).max()


def test_model_shapes_and_loss_terms():
    spec = get_model("hovernet")
    model = spec.build(TINY)
    x = torch.rand(2, 3, 64, 80)
    out = model(x)
    assert out.shape == (2, 4, 64, 80)
    assert out[:, 2:].abs().max() <= 1
    lab = _touching_nuclei()[:64, :80]
    t = spec.targets(None, lab)
    batch = {"image": x, "np": torch.from_numpy(np.stack([t["np"]] * 2)), "hv": torch.from_numpy(np.stack([t["hv"]] * 2))}
    total, logs = spec.loss(model, batch)
    assert torch.isfinite(total)
    assert set(logs) == {"loss", "np_ce", "np_dice", "hv_mse", "hv_msge"}
    total.backward()


def test_cpu_inference_takes_the_channels_last_path_and_computes_the_same_maps():
    """Inference on the CPU runs on channels-last input (faster in oneDNN); the maps are those of the plain
    layout that training uses, and contiguous."""
    model = get_model("hovernet").build(TINY).eval()
    x = torch.rand(2, 3, 48, 64)
    assert_channels_last_inference(model, x)


def test_checkpoint_round_trip_and_errors(tmp_path):
    spec = get_model("hovernet")
    model = spec.build(TINY)
    p = save_checkpoint(tmp_path / "m.pt", kind="hovernet", config=TINY, state_dict=model.state_dict(), step=3,
                        metrics={"aji": 0.5})
    ck = load_checkpoint(p, kind="hovernet")
    assert ck["format"] == 1 and ck["step"] == 3 and ck["metrics"]["aji"] == 0.5 and ck["version"]
    assert {"config", "state_dict", "train_data", "created"} <= set(ck)
    with pytest.raises(ValueError, match="not a 'maskrcnn'"):
        load_checkpoint(p, kind="maskrcnn")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a napari-nucsynth checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    assert list_checkpoints("hovernet", folders=[tmp_path]) == [p]
    assert "hovernet" in model_kinds()


def test_train_two_steps_then_resume(load_tile, tmp_path):
    from napari_nucsynth.train import train

    img, lab = load_tile(TILE)
    imgs, labs = [img[:200, :200], img[200:400, :200]], [lab[:200, :200], lab[200:400, :200]]
    events = []
    # a 3-step run stopped after step 2 ...
    res = train("hovernet", imgs, labs, steps=3, out=tmp_path / "a.pt", config=TINY, batch_size=2, crop=64,
                val_fraction=0, seed=1, on_update=events.append,
                should_stop=lambda: sum(e.kind == "step" for e in events) >= 2)
    assert res.step == 2 and res.stopped and res.path.exists()
    assert [e.step for e in events if e.kind == "step"] == [1, 2]
    ck = load_checkpoint(res.path, kind="hovernet")
    assert ck["step"] == 2 and "optimizer" in ck and "rng" in ck
    # ... and resumed (with the saved config) ends where an uninterrupted run ends: same data, same random state
    res2 = train("hovernet", imgs, labs, steps=3, out=tmp_path / "b.pt", resume=res.path, batch_size=2, crop=64,
                 val_fraction=0)
    assert res2.step == 3 and not res2.stopped
    assert load_checkpoint(res2.path)["config"]["width"] == 8
    full = train("hovernet", imgs, labs, steps=3, out=tmp_path / "c.pt", config=TINY, batch_size=2, crop=64,
                 val_fraction=0, seed=1)
    a, b = load_checkpoint(full.path)["state_dict"], load_checkpoint(res2.path)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_strong_augmentation_keeps_image_and_labels_aligned():
    """Scale, blur and colour jitter move image and labels together: a dark-nuclei image stays dark exactly where
    the transformed labels are, the scale changes nucleus sizes, and a seed repeats the sample."""
    from napari_nucsynth.train import _augment

    lab = np.zeros((300, 300), np.uint32)
    yy, xx = np.mgrid[:300, :300]
    for i, (r, c) in enumerate([(r, c) for r in range(20, 300, 40) for c in range(20, 300, 40)], 1):
        lab[(yy - r) ** 2 + ((xx - c) / 1.5) ** 2 <= 9**2] = i
    img = np.where(lab[..., None] > 0, np.uint8(60), np.uint8(220)).repeat(3, axis=2)
    img[..., 0] += 10  # not grey: hue and saturation changes act on it
    sizes = []
    for seed in range(12):
        im, lb = _augment(img, lab, 96, np.random.default_rng(seed), "strong")
        assert im.shape == (96, 96, 3) and im.dtype == np.uint8 and lb.shape == (96, 96) and lb.dtype == lab.dtype
        dark = im.mean(axis=2) < (im.mean(axis=2).min() + im.mean(axis=2).max()) / 2
        inter, union = np.sum(dark & (lb > 0)), np.sum(dark | (lb > 0))
        assert inter / union > 0.85, (seed, inter / union)
        counts = np.unique(lb[lb > 0], return_counts=True)[1]
        sizes.append(counts.max())  # a whole nucleus (cut ones are smaller)
        im2, lb2 = _augment(img, lab, 96, np.random.default_rng(seed), "strong")
        assert np.array_equal(im, im2) and np.array_equal(lb, lb2)
    assert max(sizes) / min(sizes) > 1.3  # scale 0.8-1.25 changes areas by up to 1.56x
    basic = [_augment(img, lab, 96, np.random.default_rng(s))[1] for s in range(4)]
    assert {np.unique(b[b > 0], return_counts=True)[1].max() for b in basic} == {np.sum(lab == 1)}  # no scaling
    with pytest.raises(ValueError, match="augment must be one of"):
        _augment(img, lab, 96, np.random.default_rng(0), "heavy")


def test_resume_continues_the_runs_augmentation(load_tile, tmp_path):
    """augment="strong" is recorded; a resume that does not name it continues with it, ending like a full run."""
    from napari_nucsynth.train import train

    img, lab = load_tile(TILE)
    imgs, labs = [img[:200, :200]], [lab[:200, :200]]
    kw = {"batch_size": 2, "crop": 64, "val_fraction": 0}
    events = []
    part = train("hovernet", imgs, labs, steps=3, out=tmp_path / "a.pt", config=TINY, seed=2, augment="strong",
                 on_update=events.append, should_stop=lambda: sum(e.kind == "step" for e in events) >= 2, **kw)
    assert part.step == 2 and load_checkpoint(part.path)["train_data"]["augment"] == "strong"
    res = train("hovernet", imgs, labs, steps=3, out=tmp_path / "b.pt", resume=part.path, **kw)
    full = train("hovernet", imgs, labs, steps=3, out=tmp_path / "c.pt", config=TINY, seed=2, augment="strong", **kw)
    basic = train("hovernet", imgs, labs, steps=3, out=tmp_path / "d.pt", config=TINY, seed=2, **kw)
    a, b, c = (load_checkpoint(r.path)["state_dict"] for r in (full, res, basic))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert not all(torch.allclose(a[k].float(), c[k].float(), atol=1e-5) for k in a)
    assert load_checkpoint(basic.path)["train_data"]["augment"] == "basic"
    with pytest.raises(ValueError, match="augment must be one of"):
        train("hovernet", imgs, labs, steps=1, out=tmp_path / "x.pt", augment="heavy", **kw)


def test_train_stops_and_saves(load_tile, tmp_path):
    from napari_nucsynth.train import train

    img, lab = load_tile(TILE)
    calls = []
    res = train("hovernet", [img[:128, :128]], [lab[:128, :128]], steps=50, out=tmp_path / "s.pt", config=TINY,
                batch_size=1, crop=64, val_fraction=0, should_stop=lambda: len(calls) >= 2,
                progress=lambda i, n, msg: calls.append(i))
    assert res.stopped and res.step == 2 and load_checkpoint(res.path)["step"] == 2


def test_train_bad_input(tmp_path):
    from napari_nucsynth.train import train

    with pytest.raises(ValueError, match="as many label maps"):
        train("hovernet", [np.zeros((64, 64, 3), np.uint8)], [], steps=1, out=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unknown model kind"):
        train("nope", [np.zeros((64, 64, 3), np.uint8)], [np.zeros((64, 64), np.uint32)], steps=1,
              out=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="steps"):
        train("hovernet", [np.zeros((64, 64, 3), np.uint8)], [np.zeros((64, 64), np.uint32)], steps=0,
              out=tmp_path / "x.pt")
    for bad in ({"eval_every": -1}, {"save_every": 2.5}, {"preview_every": None}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a whole number of steps"):
            train("hovernet", [np.zeros((64, 64, 3), np.uint8)], [np.zeros((64, 64), np.uint32)], steps=1,
                  out=tmp_path / "x.pt", **bad)
    assert not (tmp_path / "x.pt").exists()


def test_cli_train_then_segment(load_tile, tmp_path, capsys):
    """nucsynth train writes a checkpoint that nucsynth segment --method hovernet uses; resume continues it."""
    import imageio.v3 as iio

    from napari_nucsynth.cli import main
    from napari_nucsynth.io import read_labels, write_labels

    img, lab = load_tile(TILE)
    (tmp_path / "im").mkdir()
    (tmp_path / "lb").mkdir()
    for i in range(2):
        iio.imwrite(tmp_path / "im" / f"t{i}.png", img[i * 96 : i * 96 + 96, :96])
        write_labels(tmp_path / "lb" / f"t{i}.png", lab[i * 96 : i * 96 + 96, :96])
    ck = tmp_path / "m.pt"
    args = ["train", "--model", "hovernet", "--images", str(tmp_path / "im"), "--labels", str(tmp_path / "lb"),
            "--batch-size", "1", "--crop", "64", "--val-fraction", "0.5"]
    assert main([*args, "--steps", "1", "--out", str(ck)]) == 0
    assert "wrote" in capsys.readouterr().out and load_checkpoint(ck)["step"] == 1
    assert main([*args, "--steps", "2", "--resume", str(ck), "--out", str(ck)]) == 0
    assert load_checkpoint(ck)["step"] == 2
    assert main(["segment", "--image", str(tmp_path / "im" / "t0.png"), "--method", "hovernet", "--checkpoint",
                 str(ck), "--out", str(tmp_path / "seg.tif")]) == 0
    seg = read_labels(tmp_path / "seg.tif")
    assert seg.shape == (96, 96) and seg.dtype == np.uint32
    assert main(["train", "--model", "nope", "--images", str(tmp_path / "im"), "--labels", str(tmp_path / "lb"),
                 "--steps", "1", "--out", str(ck)]) == 2
    assert "unknown model kind" in capsys.readouterr().err
