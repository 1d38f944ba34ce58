"""Batch generation: reproducibility, worker independence, resume, domain balance, errors (napari_nucsynth.generate)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_nucsynth.generate import (
    generate,
    pair_id,
    read_pair,
    regenerate,
    synthetic_pairs,
    verify,
)
from napari_nucsynth.io import (
    read_image,
    read_labels,
    read_manifest,
    write_labels,
    write_manifest,
)
from napari_nucsynth.stain import clahe, stain_domains

SIZE = (128, 128)


@pytest.fixture(scope="module")
def bank(tmp_path_factory, monuseg_tiles, load_tile) -> Path:
    """Four 160 x 160 crops of MoNuSeg tiles (and their labels in labels/) in a temporary folder."""
    import imageio.v3 as iio

    root = tmp_path_factory.mktemp("bank")
    (root / "labels").mkdir()
    tiles = [(t, *load_tile(t)) for t in monuseg_tiles]
    tiles = [(t, img, lab) for t, img, lab in tiles if img is not None and min(img.shape[:2]) >= 160][:4]
    assert len(tiles) == 4
    for stem, img, lab in tiles:
        iio.imwrite(root / f"{stem}.png", img[:160, :160, :3])
        write_labels(root / "labels" / f"{stem}.tif", lab[:160, :160])
    return root


def _pairs(ds):
    m = read_manifest(ds)
    return {p["id"]: read_pair(ds, p["id"]) for p in m["pairs"]}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1])
                                        for k in a)


def test_regenerate_reproduces_pairs_bit_for_bit(bank, tmp_path):
    m = generate(3, bank, tmp_path / "ds", random_points=True, size=SIZE, seed=5)
    assert m["complete"] and [p["id"] for p in m["pairs"]] == [pair_id(i) for i in range(3)]
    meta = m["pairs"][0]["meta"]
    for key in ("index", "seed", "run_seed", "points", "style", "domain", "renderer", "checkpoint_sha256", "params",
                "nucsynth_version"):
        assert key in meta
    assert meta["points"]["source"] == "process" and "intensity" in meta["points"]["params"]
    assert len(meta["style"]["sha256"]) == 64
    assert verify(tmp_path / "ds") == []
    img, lab = regenerate(tmp_path / "ds", "syn_000002", out=tmp_path / "again")
    simg, slab = read_pair(tmp_path / "ds", "syn_000002")
    assert np.array_equal(img, simg) and np.array_equal(lab, slab) and lab.dtype == np.uint32
    assert np.array_equal(read_labels(tmp_path / "again_labels.tif"), slab)
    assert np.array_equal(read_image(tmp_path / "again_image.png"), simg)
    # pairs differ from each other (per-pair seeds)
    assert not np.array_equal(read_pair(tmp_path / "ds", "syn_000000")[1], read_pair(tmp_path / "ds", "syn_000001")[1])


def test_two_workers_equal_one(bank, tmp_path):
    kw = {"points_from": bank / "labels", "size": SIZE, "seed": 2, "fmt": "stardist"}
    m1 = generate(4, bank, tmp_path / "w1", workers=1, **kw)
    m2 = generate(4, bank, tmp_path / "w2", workers=2, **kw)
    assert m1["complete"] and m2["complete"]
    assert [p["meta"] for p in m1["pairs"]] == [p["meta"] for p in m2["pairs"]]
    assert m1["pairs"][0]["meta"]["points"]["source"] == "library"
    assert _same(_pairs(tmp_path / "w1"), _pairs(tmp_path / "w2"))


def test_real_layouts_record_their_crop(bank, tmp_path):
    m = generate(2, bank, tmp_path / "ds", points_from=bank / "labels", library_transforms=False, size=SIZE,
                 fmt="hovernet")
    pts = m["pairs"][0]["meta"]["points"]
    assert pts["source"] == "labels" and pts["file"].endswith(".tif") and len(pts["crop"]) == 4
    assert pts["crop"][2:] == list(SIZE) and 0 <= pts["crop"][0] <= 160 - 128
    assert verify(tmp_path / "ds") == []


def test_resume_after_stop_and_after_lost_manifest_entry(bank, tmp_path):
    kw = {"random_points": True, "size": SIZE, "seed": 9, "fmt": "coco"}
    ref = tmp_path / "ref"
    generate(4, bank, ref, **kw)
    # 1. stopped by should_stop after two pairs
    calls = []
    ds = tmp_path / "ds"
    m = generate(4, bank, ds, should_stop=lambda: len(calls) >= 2, progress=lambda d, t, w: calls.append(d), **kw)
    assert not m["complete"] and len(m["pairs"]) == 2
    with pytest.raises(FileExistsError, match="resume"):
        generate(4, bank, ds, **kw)
    with pytest.raises(ValueError, match="seed"):
        generate(4, bank, ds, resume=True, **{**kw, "seed": 10})
    m = generate(4, bank, ds, resume=True, **kw)
    assert m["complete"] and len(m["pairs"]) == 4
    assert _same(_pairs(ds), _pairs(ref))
    # 2. killed between writing a pair's files and listing it: drop the last entry, leave its files (and a temp file)
    man = read_manifest(ds)
    last = man["pairs"].pop()
    man["complete"] = False
    write_manifest(ds, man)
    stray = ds / last["files"]["image"]
    assert stray.is_file()
    (ds / "images" / ".syn_000009.png.tmp123.png").write_bytes(b"half")
    m = generate(4, bank, ds, resume=True, **kw)
    assert m["complete"] and len(m["pairs"]) == 4 and not list((ds / "images").glob(".*"))
    doc = json.loads((ds / "annotations.json").read_text())
    assert sorted(im["nucsynth_id"] for im in doc["images"]) == [pair_id(i) for i in range(4)]
    assert _same(_pairs(ds), _pairs(ref))
    assert verify(ds, [last["id"]]) == []
    # 3. resuming a complete dataset does nothing; a larger n extends it
    assert generate(4, bank, ds, resume=True, **kw)["complete"]
    m = generate(5, bank, ds, resume=True, **kw)
    assert m["complete"] and len(m["pairs"]) == 5


def test_domains_balance_sampling(bank, tmp_path):
    rng = np.random.default_rng(0)
    pink = [np.clip(rng.normal([230, 150, 200], 8, (40, 40, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    blue = [np.clip(rng.normal([90, 80, 170], 8, (40, 40, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    dom = stain_domains(pink + blue, 2, seed=0)
    assert dom.tolist() == [0, 0, 0, 1, 1, 1]
    assert clahe(pink[0]).dtype == np.uint8 and clahe(pink[0]).shape == (40, 40, 3)
    m = generate(6, bank, tmp_path / "ds", random_points=True, size=SIZE, domains=2, seed=1, fmt="cellpose")
    styles = m["generate"]["styles"]
    assert sorted({t["domain"] for t in styles}) == [0, 1]
    domains = [p["meta"]["domain"] for p in m["pairs"]]
    assert domains.count(0) == domains.count(1) == 3
    for p in m["pairs"]:
        assert styles[p["meta"]["style"]["index"]]["domain"] == p["meta"]["domain"]


def test_bad_inputs_give_clear_errors(bank, tmp_path):
    ok = {"random_points": True, "size": SIZE}
    with pytest.raises(ValueError, match="n must be"):
        generate(0, bank, tmp_path / "a", **ok)
    with pytest.raises(ValueError, match="styles must be a folder"):
        generate(2, tmp_path / "missing", tmp_path / "a", **ok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no reference image"):
        generate(2, tmp_path / "empty", tmp_path / "a", **ok)
    with pytest.raises(ValueError, match="points_from"):
        generate(2, bank, tmp_path / "a", size=SIZE)
    with pytest.raises(ValueError, match="fmt must be"):
        generate(2, bank, tmp_path / "a", fmt="jpeg", **ok)
    with pytest.raises(ValueError, match="unknown render method"):
        generate(2, bank, tmp_path / "a", method="nope", **ok)
    with pytest.raises(ValueError, match="domains=9"):
        generate(2, bank, tmp_path / "a", domains=9, **ok)
    with pytest.raises(ValueError, match="takes no checkpoint"):
        generate(2, bank, tmp_path / "a", checkpoint=bank / "labels", **ok)
    assert not (tmp_path / "a").exists()  # nothing created by refused settings
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(2, bank, tmp_path / "full", **ok)
    ds = tmp_path / "ds"
    generate(1, bank, ds, **ok)
    with pytest.raises(ValueError, match="no pair"):
        regenerate(ds, "syn_999999")
    # a style tile changed since: refused, not silently different
    import shutil

    tile = Path(read_manifest(ds)["pairs"][0]["meta"]["style"]["file"])
    copy = tmp_path / "bank2"
    shutil.copytree(bank, copy)
    m = read_manifest(ds)
    for t in m["generate"]["styles"]:
        t["file"] = str(copy / Path(t["file"]).name)
    write_manifest(ds, m)
    (copy / tile.name).write_bytes(b"changed")
    with pytest.raises(ValueError, match="changed since"):
        regenerate(ds, "syn_000000")


def test_cli_generate_and_regenerate(bank, tmp_path, capsys):
    from napari_nucsynth.cli import main

    out = tmp_path / "ds"
    argv = ["generate", "--n", "2", "--styles", str(bank), "--out", str(out), "--random-points", "--size", "128",
            "128", "--format", "png"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert main(["regenerate", str(out), "syn_000001"]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["generate", "--n", "2", "--styles", str(bank), "--out", str(tmp_path / "b")]) == 2
    assert "points_from" in capsys.readouterr().err


def test_synthetic_pairs_in_memory(bank):
    imgs = [read_image(f)[..., :3] for f in sorted(bank.glob("*.png"))[:2]]
    labs = [read_labels(bank / "labels" / (f.stem + ".tif")) for f in sorted(bank.glob("*.png"))[:2]]
    for layouts in ("library", "process"):
        a_img, a_lab = synthetic_pairs(3, 96, imgs, style_labels=labs, fit_labels=labs, layouts=layouts, seed=4)
        assert len(a_img) == 3 and a_img[0].shape == (96, 96, 3) and a_img[0].dtype == np.uint8
        assert a_lab[0].dtype == np.uint32 and a_lab[0].max() > 0
        assert np.array_equal(np.unique(a_lab[0]), np.arange(a_lab[0].max() + 1))  # ids 1..N
        # pair i depends on (seed, i) alone: the first two of a shorter run are the same pairs
        b_img, b_lab = synthetic_pairs(2, 96, imgs, style_labels=labs, fit_labels=labs, layouts=layouts, seed=4)
        assert all(np.array_equal(x, y) for x, y in zip(a_img, b_img))
        assert all(np.array_equal(x, y) for x, y in zip(a_lab, b_lab))
        c_img, _ = synthetic_pairs(1, 96, imgs, style_labels=labs, fit_labels=labs, layouts=layouts, seed=5)
        assert not np.array_equal(c_img[0], a_img[0])
    stops = iter([False, True])
    done, _ = synthetic_pairs(3, 64, imgs, seed=0, should_stop=lambda: next(stops))
    assert len(done) == 1
    with pytest.raises(ValueError, match="needs fit_labels"):
        synthetic_pairs(1, 64, imgs, layouts="library")
    with pytest.raises(ValueError, match="at least one style"):
        synthetic_pairs(1, 64, [])
    with pytest.raises(ValueError, match="one label map"):
        synthetic_pairs(1, 64, imgs, style_labels=labs[:1])
    # the renderer's options reach it (the same layout and masks, hard-edged nuclei), and are checked first
    hard, hard_lab = synthetic_pairs(1, 96, imgs, style_labels=labs, fit_labels=labs, layouts="process", seed=4,
                                     options={"edge_sigma": 0})  # a_img, a_lab: the loop's last ("process")
    assert np.array_equal(hard_lab[0], a_lab[0]) and not np.array_equal(hard[0], a_img[0])
    with pytest.raises(ValueError, match="takes no option 'strength'"):
        synthetic_pairs(1, 96, imgs, options={"strength": 1})


def test_synthetic_pairs_from_clicks_in_their_own_style(bank):
    """Arm C of the headline (points only): layouts from point sets (no contour), an explicit shape prior, pair i
    from set i mod k rendered in style i mod k; layouts="mixed" alternates library and process layouts."""
    from napari_nucsynth.masks import ShapePrior
    from napari_nucsynth.points import PointSet, centroids

    files = sorted(bank.glob("*.png"))[:2]
    imgs = [read_image(f)[..., :3] for f in files]
    labs = [read_labels(bank / "labels" / (f.stem + ".tif")) for f in files]
    # two styles far apart in colour: a tile and its channel-swapped twin
    styles = [imgs[0], np.ascontiguousarray(imgs[0][..., ::-1])]
    sets = [PointSet(centroids(lab), lab.shape) for lab in labs]
    prior = ShapePrior.default()
    out_img, out_lab = synthetic_pairs(4, 160, styles, point_sets=sets, prior=prior, own_style=True,
                                       layouts="library", seed=3)
    for i, (im, lab) in enumerate(zip(out_img, out_lab)):
        assert lab.max() > 0
        bg = im[lab == 0].reshape(-1, 3).mean(0)
        own = styles[i % 2].reshape(-1, 3).mean(0)
        assert np.sign(bg[0] - bg[2]) == np.sign(own[0] - own[2]) != 0, f"pair {i} is not in its own tile's style"
    with pytest.raises(ValueError, match="one style per layout"):
        synthetic_pairs(1, 64, styles[:1], point_sets=sets, own_style=True)
    mixed, _ = synthetic_pairs(2, 96, imgs, style_labels=labs, fit_labels=labs, layouts="mixed", seed=4)
    lib, _ = synthetic_pairs(1, 96, imgs, style_labels=labs, fit_labels=labs, layouts="library", seed=4)
    proc, _ = synthetic_pairs(2, 96, imgs, style_labels=labs, fit_labels=labs, layouts="process", seed=4)
    assert np.array_equal(mixed[0], lib[0]) and np.array_equal(mixed[1], proc[1])
    with pytest.raises(ValueError, match="'mixed'"):
        synthetic_pairs(1, 64, imgs, layouts="grid")


def test_a_failed_write_stops_the_run_and_keeps_the_pairs_before_it(bank, tmp_path, monkeypatch):
    """The one-process run writes each pair in a writer thread while the next renders: a write that fails (a full
    disk) is raised by generate, the pairs before it stay listed and readable, none after it is written, and a
    resumed run completes the dataset as a straight one."""
    from napari_nucsynth.io import export

    kw = {"random_points": True, "size": SIZE, "seed": 3}
    ref = tmp_path / "ref"
    generate(5, bank, ref, **kw)
    real_add, calls = export.PairAppender.add, []

    def add(self, pid, *args, **kwargs):
        calls.append(pid)
        if pid == pair_id(2):
            raise OSError(28, "No space left on device")
        return real_add(self, pid, *args, **kwargs)

    monkeypatch.setattr(export.PairAppender, "add", add)
    ds = tmp_path / "ds"
    with pytest.raises(OSError, match="No space"):
        generate(5, bank, ds, **kw)
    assert calls == [pair_id(i) for i in range(3)]  # nothing submitted after the failed write
    m = read_manifest(ds)
    assert not m["complete"] and [p["id"] for p in m["pairs"]] == [pair_id(0), pair_id(1)]
    monkeypatch.setattr(export.PairAppender, "add", real_add)
    m = generate(5, bank, ds, resume=True, **kw)
    assert m["complete"] and _same(_pairs(ds), _pairs(ref))
