"""Liu et al.'s multi-modality transfer wired into training (``train(augment="modality")``), segmentation
(``segment(tta="modality")``) and the CLI (issue 21, part 3)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nucsynth import stain

# A pale tile and a dark one (mean optical densities about (0.14, 0.28, 0.18) and (0.20, 0.54, 0.32)).
PALE, DARK, THIRD = "TCGA-21-5784-01Z-00-DX1", "TCGA-HE-7130-01Z-00-DX1", "TCGA-A7-A13F-01Z-00-DX1"
TINY = {"backbone": "resnet18", "width": 8, "pretrained": None}
_DIHEDRAL = [lambda a, k=k, f=f: (np.rot90(a, k)[:, ::-1] if f else np.rot90(a, k)) for k in range(4) for f in (0, 1)]
_INVERSE = [lambda a, k=k, f=f: np.rot90(a[:, ::-1] if f else a, -k) for k in range(4) for f in (0, 1)]


@pytest.fixture(scope="module")
def tiles(load_tile):
    return {s: load_tile(s) for s in (PALE, DARK, THIRD)}


def _window(lab_crop: np.ndarray, width: int):
    """Where a crop of a position-coded label map (id = row * width + col + 1) came from: (row, col, transform)."""
    for t, inv in enumerate(_INVERSE):
        w = inv(lab_crop).astype(np.int64) - 1
        r0, c0 = divmod(int(w[0, 0]), width)
        rr, cc = np.mgrid[: w.shape[0], : w.shape[1]]
        if np.array_equal(w, (r0 + rr) * width + c0 + cc):
            return r0, c0, t
    return None


def _angle(image, ref) -> float:
    """Mean angle (radians) between an image's Macenko H and E vectors and a reference's."""
    cos = (stain.macenko_stains(image).vectors * ref.stains.vectors).sum(0)
    return float(np.arccos(np.clip(cos, -1, 1)).mean())


def test_modality_crops_are_seeded_keep_their_labels_and_take_the_references_colours(tiles, monkeypatch):
    import napari_nucsynth.train as tr

    img, _ = tiles[PALE]
    img = img[:160, :160]
    lab = (np.arange(160 * 160, dtype=np.uint32) + 1).reshape(160, 160)  # every pixel its own id: positions
    refs = [stain.stain_reference(tiles[DARK][0])]

    def crops(seed, n=8, mode="modality"):
        rng = np.random.default_rng(seed)
        return [tr._augment(img, lab, 64, rng, mode, references=refs) for _ in range(n)]

    a, b, c = crops(0), crops(0), crops(1)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))  # seeded
    assert not all(np.array_equal(x[0], y[0]) for x, y in zip(a, c))
    monkeypatch.setattr(tr, "MODALITY_P", 1.0)  # every crop restained
    moved = []
    for im, lb in crops(3):
        assert im.dtype == np.uint8 and im.shape == (64, 64, 3) and lb.dtype == np.uint32
        where = _window(lb, 160)  # the labels are a window of the input, turned: only geometry, no relabelling
        assert where is not None
        r0, c0, t = where
        orig = _DIHEDRAL[t](img[r0 : r0 + 64, c0 : c0 + 64])
        # the image is that same window (its structure), in other colours: closer to the reference's
        g_out, g_orig = im.astype(float).sum(-1).ravel(), orig.astype(float).sum(-1).ravel()
        assert np.corrcoef(g_out, g_orig)[0, 1] > 0.9
        moved.append((stain.od_distance(im, tiles[DARK][0]), stain.od_distance(orig, tiles[DARK][0]),
                      _angle(im, refs[0]), _angle(orig, refs[0])))
    od_after, od_before, angle_after, angle_before = np.mean(moved, axis=0)
    assert od_after < 0.85 * od_before  # (Macenko moves the mean optical density only partly)
    assert angle_after < 0.5 * angle_before  # the crops' stain vectors become the reference's
    with pytest.raises(ValueError, match="needs references"):
        tr._augment(img, lab, 64, np.random.default_rng(0), "modality")


def _pairs(tiles, size=128):
    names = [PALE, DARK, THIRD]
    return [tiles[n][0][:size, :size] for n in names], [tiles[n][1][:size, :size] for n in names]


def test_train_modality_is_reproducible_recorded_restains_to_other_images_and_resumes(tiles, tmp_path,
                                                                                        monkeypatch):
    import torch

    import napari_nucsynth.train as tr
    from napari_nucsynth.models import load_checkpoint

    imgs, labs = _pairs(tiles)
    seen = []
    real = stain.modality_augment

    def spy(image, rng, references, **kw):
        seen.append(references)
        return real(image, rng, references, **kw)

    calls = []
    real_augment = tr._augment

    def spy_augment(img, lab, crop, rng, mode="basic", references=None):
        calls.append((img, references))
        return real_augment(img, lab, crop, rng, mode, references=references)

    monkeypatch.setattr(stain, "modality_augment", spy)
    monkeypatch.setattr(tr, "_augment", spy_augment)
    kw = {"batch_size": 2, "crop": 64, "val_fraction": 0, "config": TINY, "seed": 4, "device": "cpu"}
    full = tr.train("hovernet", imgs, labs, steps=3, out=tmp_path / "full.pt", augment="modality", **kw)
    ck = load_checkpoint(full.path, kind="hovernet")
    assert ck["train_data"]["augment"] == "modality" and ck["train_data"]["modality"]["method"] == "macenko"
    assert 0 < len(seen) <= 6  # about half of the 6 crops were restained
    # each crop's references are the other training images' (never its own), computed once per run
    for img, refs in calls:
        assert len(refs) == 2 and all(isinstance(r, stain.StainReference) for r in refs)
        assert not any(r.image.shape == img.shape and np.array_equal(r.image, img) for r in refs)
    ids = {id(r) for _, refs in calls for r in refs}
    assert len(ids) == 3

    again = tr.train("hovernet", imgs, labs, steps=3, out=tmp_path / "again.pt", augment="modality", **kw)
    events = []
    part = tr.train("hovernet", imgs, labs, steps=3, out=tmp_path / "part.pt", augment="modality",
                    on_update=events.append, should_stop=lambda: sum(e.kind == "step" for e in events) >= 2, **kw)
    assert part.step == 2
    resumed = tr.train("hovernet", imgs, labs, steps=3, out=tmp_path / "part.pt", resume=part.path,
                       **{k: v for k, v in kw.items() if k != "config"})  # augment: the checkpoint's
    a, b, c = (load_checkpoint(r.path)["state_dict"] for r in (full, again, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.allclose(a[k].float(), c[k].float(), atol=1e-5) for k in a)
    assert load_checkpoint(resumed.path)["train_data"]["augment"] == "modality"
    with pytest.raises(ValueError, match="drit's stain domains"):
        tr.train("drit", imgs, labs, steps=1, out=tmp_path / "d.pt", augment="modality", device="cpu")


def test_modality_drit_restains_crops_by_the_shipped_model_to_other_training_images_styles(tiles, tmp_path,
                                                                                             monkeypatch):
    import torch

    import napari_nucsynth.train as tr
    from napari_nucsynth.models import drit, load_checkpoint

    imgs, labs = _pairs(tiles)
    refs = tr._modality_references(imgs, range(3), mode="modality-drit")
    assert all(isinstance(r, tr.DritModality) and r.style.shape == (int(r.model.config["style_dim"]),)
               for r in refs.values())
    assert not np.allclose(refs[0].style, refs[1].style)  # a pale tile's style is not a dark one's
    # a restained crop: the same window and labels, colours moved towards the reference tile's
    monkeypatch.setattr(tr, "MODALITY_P", 1.0)
    lab = (np.arange(128 * 128, dtype=np.uint32) + 1).reshape(128, 128)
    im, lb = tr._augment(imgs[0], lab, 64, np.random.default_rng(0), "modality-drit", references=[refs[1]])
    r0, c0, t = _window(lb, 128)
    orig = _DIHEDRAL[t](imgs[0][r0 : r0 + 64, c0 : c0 + 64])
    assert stain.od_distance(im, imgs[1]) < stain.od_distance(orig, imgs[1])
    assert np.corrcoef(im.astype(float).sum(-1).ravel(), orig.astype(float).sum(-1).ravel())[0, 1] > 0.8
    monkeypatch.setattr(tr, "MODALITY_P", 0.5)

    calls = []
    real = tr.DritModality.restain
    monkeypatch.setattr(tr.DritModality, "restain", lambda self, img: calls.append(id(self)) or real(self, img))
    kw = {"batch_size": 2, "crop": 64, "val_fraction": 0, "config": TINY, "seed": 4, "device": "cpu"}
    a = tr.train("hovernet", imgs, labs, steps=2, out=tmp_path / "a.pt", augment="modality-drit", **kw)
    n = len(calls)
    b = tr.train("hovernet", imgs, labs, steps=2, out=tmp_path / "b.pt", augment="modality-drit", **kw)
    assert 0 < n <= 4 and len(calls) == 2 * n  # about half the 4 crops, the same ones again
    ck = load_checkpoint(a.path, kind="hovernet")
    rec = ck["train_data"]["modality"]
    assert ck["train_data"]["augment"] == "modality-drit" and rec["method"] == "drit"
    assert rec["checkpoint"] == drit.default_checkpoint().name
    sa, sb = ck["state_dict"], load_checkpoint(b.path)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # seeded: the same crops, the same weights
    with pytest.raises(ValueError, match="drit's stain domains"):
        tr.train("drit", imgs, labs, steps=1, out=tmp_path / "d.pt", augment="modality-drit", device="cpu")
    with pytest.raises(ValueError, match="needs references"):
        tr._augment(imgs[0], labs[0], 64, np.random.default_rng(0), "modality-drit")


@pytest.fixture(scope="module")
def crop(tiles):
    return tiles[DARK][0][:96, :96]


def test_segment_modality_tta_is_the_mean_of_the_restained_maps(crop, tiles):
    from napari_nucsynth.segment import get_segmenter, segment

    plain = segment(crop, method="hovernet", device="cpu")
    # restaining a tile to its own stains gives it back exactly (Macenko with the residual kept), so the mean
    # of its maps and its own maps is its maps
    assert np.array_equal(stain.transfer(crop, crop, method="macenko"), crop)
    assert np.array_equal(segment(crop, method="hovernet", device="cpu", tta="modality", tta_references=[crop]),
                          plain)
    # another modality: postprocess(mean(maps of the tile, maps of the tile restained to it)), exactly
    ref = tiles[PALE][0]
    seg = get_segmenter("hovernet")
    mean = (seg.predict_maps(crop, device="cpu").astype(np.float64)
            + seg.predict_maps(stain.transfer(crop, ref, method="macenko"), device="cpu")) / 2
    out = segment(crop, method="hovernet", device="cpu", tta="modality", tta_references=ref)
    assert out.dtype == np.uint32 and out.shape == crop.shape[:2]
    assert np.array_equal(out, seg.postprocess(mean.astype(np.float32)))
    assert not np.array_equal(out, plain)
    assert set(np.unique(out)) == set(range(int(out.max()) + 1))
    steps = []
    segment(crop, method="hovernet", device="cpu", tta="modality", tta_references=[ref, crop],
            progress=lambda *a: steps.append(a))
    assert steps[-1] == (3, 3, "modality test-time augmentation")  # the image and its two copies
    with pytest.raises(ValueError, match="needs tta_references"):  # no built-in default
        segment(crop, method="hovernet", device="cpu", tta="modality")


def test_segment_modality_drit_tta_restains_by_drit_to_its_domains_or_the_references(crop, tiles):
    from napari_nucsynth.models import drit, load_checkpoint
    from napari_nucsynth.segment import get_segmenter, segment

    seg = get_segmenter("hovernet")
    n = len(load_checkpoint(drit.default_checkpoint(), kind="drit")["config"]["domain_styles"])
    steps = []
    out = segment(crop, method="hovernet", device="cpu", tta="modality-drit", progress=lambda *a: steps.append(a))
    assert steps[-1] == (n + 1, n + 1, "modality test-time augmentation")  # the image and one copy per domain
    maps = [seg.predict_maps(crop, device="cpu")] + [
        seg.predict_maps(stain.transfer(crop, k, method="drit", device="cpu"), device="cpu") for k in range(n)]
    mean = (np.sum([m.astype(np.float64) for m in maps], 0) / len(maps)).astype(np.float32)
    assert np.array_equal(out, seg.postprocess(mean))
    assert not np.array_equal(out, segment(crop, method="hovernet", device="cpu"))
    # references: images (restained to each by drit) or domain indices
    ref = tiles[PALE][0][:128, :128]
    one = segment(crop, method="hovernet", device="cpu", tta="modality-drit", tta_references=ref)
    mean = (maps[0].astype(np.float64) + seg.predict_maps(stain.transfer(crop, ref, method="drit", device="cpu"),
                                                          device="cpu")) / 2
    assert np.array_equal(one, seg.postprocess(mean.astype(np.float32)))
    assert np.array_equal(segment(crop, method="hovernet", device="cpu", tta="modality-drit", tta_references=[0]),
                          seg.postprocess(((maps[0].astype(np.float64) + maps[1]) / 2).astype(np.float32)))
    with pytest.raises(ValueError, match="methods that support it: hovernet"):
        segment(crop, method="watershed", tta="modality-drit")
    with pytest.raises(ValueError, match="reference domain must be in"):
        segment(crop, method="hovernet", device="cpu", tta="modality-drit", tta_references=[n])


def test_tta_modes_and_their_errors(crop):
    from napari_nucsynth.segment import modality_tta_methods, predict_maps, segment, tta_mode

    assert [tta_mode(t) for t in (False, None, "none", True, "flips", "modality")] == [
        None, None, None, "flips", "flips", "modality"]
    assert "hovernet" in modality_tta_methods() and "watershed" not in modality_tta_methods()
    assert np.array_equal(segment(crop, tta=True), segment(crop, tta="flips"))
    with pytest.raises(ValueError, match="watershed method has none; methods that support it: hovernet"):
        segment(crop, method="watershed", tta="modality")
    with pytest.raises(ValueError, match="no dense maps"):
        predict_maps(crop, method="watershed")
    for bad in ("yes", 1, "Modality"):
        with pytest.raises(ValueError, match="tta must be"):
            segment(crop, tta=bad)
    with pytest.raises(ValueError, match="tta_references are the stain modalities"):
        segment(crop, tta=True, tta_references=[crop])
    with pytest.raises(ValueError, match="too few stained pixels"):  # a reference without tissue
        segment(crop, method="hovernet", device="cpu", tta="modality",
                tta_references=[np.full((32, 32, 3), 250, np.uint8)])
    # an image without tissue has no stains to change: its maps alone, no error
    blank = np.full((64, 64, 3), 245, np.uint8)
    assert np.array_equal(segment(blank, method="hovernet", device="cpu", tta="modality", tta_references=[crop]),
                          segment(blank, method="hovernet", device="cpu"))


def test_cli_segment_tta_modality_and_train_augment_modality(crop, tiles, tmp_path, capsys):
    from napari_nucsynth.cli import main
    from napari_nucsynth.io import read_labels, write_image, write_labels
    from napari_nucsynth.models import load_checkpoint
    from napari_nucsynth.segment import segment

    write_image(tmp_path / "img.png", crop)
    write_image(tmp_path / "ref.png", tiles[PALE][0])
    base = ["segment", "--image", str(tmp_path / "img.png"), "--device", "cpu"]
    assert main([*base, "--method", "hovernet", "--tta", "modality", "--tta-reference", str(tmp_path / "ref.png"),
                 "--out", str(tmp_path / "m.tif")]) == 0
    assert "tta modality" in capsys.readouterr().out
    assert np.array_equal(read_labels(tmp_path / "m.tif"), segment(crop, method="hovernet", device="cpu",
                                                                   tta="modality", tta_references=tiles[PALE][0]))
    assert main([*base, "--method", "hovernet", "--tta", "modality-drit", "--out", str(tmp_path / "d.tif")]) == 0
    assert "tta modality-drit" in capsys.readouterr().out  # no reference needed: the drit model's domains
    assert np.array_equal(read_labels(tmp_path / "d.tif"), segment(crop, method="hovernet", device="cpu",
                                                                   tta="modality-drit"))
    assert main([*base, "--tta", "--out", str(tmp_path / "f.png")]) == 0  # a bare --tta is still flips
    assert np.array_equal(read_labels(tmp_path / "f.png"), segment(crop, tta=True))
    for extra, msg in ((["--tta", "modality"], "--tta modality averages dense network maps"),
                       (["--tta-reference", str(tmp_path / "ref.png")], "--tta-reference"),
                       (["--method", "hovernet", "--tta", "modality"], "needs --tta-reference")):
        assert main([*base, *extra, "--out", str(tmp_path / "x.tif")]) == 2
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "x.tif").exists()

    imgs, labs = _pairs(tiles, 96)
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    for i, (im, lb) in enumerate(zip(imgs, labs)):
        write_image(tmp_path / "images" / f"t{i}.png", im)
        write_labels(tmp_path / "labels" / f"t{i}.png", lb)
    import json

    assert main(["train", "--model", "hovernet", "--images", str(tmp_path / "images"), "--labels",
                 str(tmp_path / "labels"), "--steps", "1", "--out", str(tmp_path / "m.pt"), "--crop", "64",
                 "--batch-size", "2", "--device", "cpu", "--val-fraction", "0", "--config", json.dumps(TINY),
                 "--augment", "modality"]) == 0
    assert load_checkpoint(tmp_path / "m.pt", kind="hovernet")["train_data"]["augment"] == "modality"


def test_shipped_drit_path_is_the_models():
    from napari_nucsynth.models import drit

    assert stain.shipped_drit_checkpoint() == drit.default_checkpoint()
