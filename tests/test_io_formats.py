"""Dataset export formats and readers (io.export, io.formats) and the npe2 reader/writer glue."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_nucsynth.io import (
    FORMATS,
    export_pairs,
    find_pannuke_pair,
    read_aperio_xml,
    read_coco,
    read_dsb,
    read_hovernet_mat,
    read_hovernet_npy,
    read_manifest,
    read_pair_folder,
    read_pannuke,
    rle_decode,
    rle_encode,
    write_manifest,
)


def _pair(big: int = 70000, seed: int = 0):
    """A 48 x 64 pair with ids 5, 300 and ``big`` (a touching pair included) and a type map."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    lab = np.zeros((48, 64), np.uint32)
    lab[2:10, 3:9] = big
    lab[20:30, 20:40] = 300
    lab[20:30, 40:44] = 5  # touches 300
    lab[40:45, 50:64] = 7  # on the right border
    types = np.zeros_like(lab, dtype=np.int32)
    types[lab == big] = 2
    types[lab == 300] = 1
    types[lab == 5] = 3
    types[lab == 7] = 1
    return img, lab, types


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ RLE


def test_rle_matches_pycocotools():
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (5, 7), (37, 23), (100, 3)]:
        for p in (0.0, 0.02, 0.5, 1.0):
            m = rng.random(shape) < p
            ours = rle_encode(m)
            theirs = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            assert ours["counts"] == theirs["counts"].decode() and ours["size"] == list(theirs["size"])
            assert np.array_equal(rle_decode(ours), m) and np.array_equal(rle_decode(theirs), m)


# ------------------------------------------------------------------------------------------------ export round trips


@pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_round_trip(tmp_path, fmt):
    import imageio.v3 as iio
    import tifffile

    big = 60000 if fmt == "png" else 70000  # 16-bit PNG holds up to 65,535
    img, lab, types = _pair(big)
    pairs = [("t0", img, lab, types, {"seed": np.int64(3)}), ("t1", img[::-1].copy(), lab[::-1].copy(), types[::-1].copy(), {})]
    man = export_pairs(pairs, tmp_path, fmt)
    assert man["complete"] and [p["id"] for p in man["pairs"]] == ["t0", "t1"]
    assert man["pairs"][0]["max_id"] == big and man["pairs"][0]["n_instances"] == 4
    assert read_manifest(tmp_path) == json.loads(json.dumps(man))
    assert not [f for f in _files(tmp_path) if ".tmp" in f]
    for entry, (pid, im, lb, tp, _) in zip(man["pairs"], pairs):
        files = {k: tmp_path / v for k, v in entry["files"].items()}
        if fmt == "hovernet":
            arr = np.load(files["npy"])
            assert arr.dtype == np.int32 and arr.shape == (48, 64, 5)
            assert np.array_equal(arr[..., :3], im) and np.array_equal(arr[..., 3], lb) and np.array_equal(arr[..., 4], tp)
            s = read_hovernet_npy(files["npy"])
        elif fmt == "coco":
            continue  # checked below with pycocotools
        else:
            if fmt == "stardist":
                back_img, back_lab = tifffile.imread(files["image"]), tifffile.imread(files["labels"])
                assert back_lab.dtype == np.uint32
            elif fmt == "cellpose":
                back_img, back_lab = iio.imread(files["image"]), tifffile.imread(files["labels"])
                assert back_lab.dtype == np.uint32 and files["labels"].name.endswith("_masks.tif")
            else:
                back_img, back_lab = iio.imread(files["image"]), iio.imread(files["labels"])
                assert back_lab.dtype == np.uint16
            assert np.array_equal(back_img, im) and np.array_equal(back_lab, lb)
            s = {x.name: x for x in read_pair_folder(tmp_path)}[pid]
            assert s.labels.dtype == np.uint32 and np.array_equal(s.types, tp)
            reader = tifffile.imread if files["types"].suffix == ".tif" else iio.imread
            assert np.array_equal(reader(files["types"]), tp)
        assert np.array_equal(s.image, im) and np.array_equal(s.labels, lb)
    if fmt == "coco":
        _check_coco(tmp_path, pairs)


def _check_coco(d: Path, pairs):
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    coco = COCO(str(d / "annotations.json"))
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"type_1", "type_2", "type_3"}
    for im_info, (pid, img, lab, types, _) in zip(coco.loadImgs(coco.getImgIds()), pairs):
        assert im_info["file_name"] == f"{pid}.png" and (im_info["height"], im_info["width"]) == lab.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[im_info["id"]]))
        assert sorted(a["instance_id"] for a in anns) == sorted(int(i) for i in np.unique(lab) if i)
        for a in anns:
            m = lab == a["instance_id"]
            assert np.array_equal(coco.annToMask(a).astype(bool), m)
            assert a["area"] == m.sum() == int(mask_util.area(a["segmentation"]))
            assert a["bbox"] == mask_util.toBbox(a["segmentation"]).tolist() and a["iscrowd"] == 0
            assert a["category_id"] == int(types[m][0])
    back = read_coco(d / "annotations.json")
    for s, (pid, img, lab, types, _) in zip(back, pairs):
        assert s.name == pid and np.array_equal(s.labels, lab) and np.array_equal(s.image, img)
        assert np.array_equal(s.types, types)


def test_coco_without_types_is_one_nucleus_category(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    img, lab, _ = _pair()
    export_pairs([("a", img, lab, None, {})], tmp_path, "coco")
    coco = COCO(str(tmp_path / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["nucleus"]
    assert len(coco.getAnnIds(catIds=[1])) == 4
    with pytest.raises(ValueError, match="type map"):
        export_pairs([("a", img, lab, None, {}), ("b", img, lab, lab.astype(int) > 0, {})], tmp_path / "mix", "coco")


def test_hovernet_without_types_and_above_int32(tmp_path):
    img, lab, _ = _pair()
    export_pairs([("a", img, lab, None, {})], tmp_path, "hovernet")
    arr = np.load(tmp_path / "a.npy")
    assert np.array_equal(arr[..., 4], (lab > 0).astype(np.int32))  # no types: one class, "nucleus"
    lab2 = lab.copy()
    lab2[0, 0] = 2**31
    with pytest.raises(ValueError, match="int32"):
        export_pairs([("b", img, lab2, None, {})], tmp_path / "x", "hovernet")
    assert not (tmp_path / "x" / "b.npy").exists()


def test_png_refuses_ids_above_65535(tmp_path):
    img, lab, _ = _pair(70000)
    with pytest.raises(ValueError, match=r"16-bit PNG.*(stardist|cellpose)"):
        export_pairs([("a", img, lab, None, {})], tmp_path, "png")
    assert _files(tmp_path) == []  # nothing of the refused pair, no manifest


# ------------------------------------------------------------------------------------------------ safety


def test_no_silent_overwrite(tmp_path):
    img, lab, types = _pair()
    export_pairs([("a", img, lab, types, {})], tmp_path, "stardist")
    before = (tmp_path / "masks" / "a.tif").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_pairs([("a", img, lab * 0, None, {})], tmp_path, "stardist")
    assert (tmp_path / "masks" / "a.tif").read_bytes() == before
    # a stray file of the same name without any manifest is not replaced either
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a_masks.tif").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        export_pairs([("a", img, lab, None, {})], tmp_path / "other", "cellpose")
    assert (tmp_path / "other" / "a_masks.tif").read_bytes() == b"precious"
    assert not (tmp_path / "other" / "a_img.png").exists()
    man = export_pairs([("a", img, lab * 0, None, {})], tmp_path, "stardist", overwrite=True)
    assert man["pairs"][0]["n_instances"] == 0
    with pytest.raises(FileExistsError):
        write_manifest(tmp_path, man, overwrite=False)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import tifffile

    def broken(path, *a, **k):
        Path(path).write_bytes(b"half a tiff")
        raise OSError("disk full")

    img, lab, _ = _pair()
    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        export_pairs([("a", img, lab, None, {})], tmp_path, "cellpose")
    assert _files(tmp_path) == []  # neither the half mask, its temporary, nor the pair's image
    with pytest.raises(OSError):
        export_pairs([("a", img, lab, None, {})], tmp_path / "s", "stardist")
    assert _files(tmp_path / "s") == []


def test_ids_stop_progress_and_manifest(tmp_path):
    img, lab, _ = _pair()
    with pytest.raises(ValueError, match="file name"):
        export_pairs([("../a", img, lab, None, {})], tmp_path / "bad", "png")
    with pytest.raises(ValueError, match="twice"):
        export_pairs([("a", img, lab % 1000, None, {}), ("a", img, lab % 1000, None, {})], tmp_path / "dup", "png")
    with pytest.raises(ValueError, match="fmt"):
        export_pairs([], tmp_path, "tiff")
    calls = []

    def gen():
        for i in range(5):
            yield f"p{i}", img, lab, None, {"i": i}

    man = export_pairs(gen(), tmp_path / "stop", "hovernet", progress=lambda *a: calls.append(a),
                       should_stop=lambda: len(calls) >= 2)
    assert not man["complete"] and [p["id"] for p in man["pairs"]] == ["p0", "p1"]
    assert calls == [(1, 0, "exported p0"), (2, 0, "exported p1")]
    assert read_manifest(tmp_path / "stop")["pairs"][1]["meta"] == {"i": 1}
    with pytest.raises(ValueError, match="pairs"):
        write_manifest(tmp_path / "m", {"pairs": [{"no_id": 1}]})
    with pytest.raises(ValueError, match="no manifest"):
        read_manifest(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------ readers


def _iou_figures(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(foreground pixel agreement, mean best IoU of each instance of b)."""
    from scipy import sparse

    n, m = int(a.max()) + 1, int(b.max()) + 1
    c = sparse.coo_matrix((np.ones(a.size), (a.ravel().astype(np.int64), b.ravel().astype(np.int64))),
                          shape=(n, m)).toarray()
    inter = c[1:, 1:]
    union = c.sum(1)[1:, None] + c.sum(0)[None, 1:] - inter
    iou = inter / np.maximum(union, 1)
    present = c.sum(0)[1:] > 0
    return float(((a > 0) == (b > 0)).mean()), float(iou.max(0)[present].mean())


@pytest.mark.parametrize("stem", ["TCGA-21-5784-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1"])
def test_xml_reader_on_monuseg(monuseg_dir, load_tile, stem):
    xml = monuseg_dir / "annotations_xml" / f"{stem}.xml"
    if not xml.is_file():
        pytest.skip(f"{xml.name} not in the data folder")
    s = read_aperio_xml(xml)
    img, lab = load_tile(stem)
    assert s.labels.dtype == np.uint32 and s.labels.shape == lab.shape and np.array_equal(s.image, img)
    assert s.meta["image_path"].endswith(f"images/{stem}.png") and s.types is None
    n_true = len(np.unique(lab)) - 1
    assert abs(int(s.labels.max()) - n_true) <= 1 and len(s.meta["region_ids"]) == s.labels.max()
    agree, miou = _iou_figures(s.labels, lab)
    assert agree > 0.99 and miou > 0.95, (agree, miou)  # the label maps follow the challenge's 1-based polygons
    corner = read_aperio_xml(xml, origin="corner", find_image=False, shape=lab.shape)
    assert _iou_figures(corner.labels, lab)[1] < miou


def _write_xml(path: Path, groups: dict[str, list[list[tuple[float, float]]]]) -> None:
    parts = ['<Annotations MicronsPerPixel="0.25">']
    rid = 10
    for a, (name, polys) in enumerate(groups.items(), start=1):
        parts.append(f'<Annotation Id="{a}"><Attributes><Attribute Name="{name}" Id="0" Value=""/></Attributes>'
                     '<Regions><RegionAttributeHeaders/>')
        for poly in polys:
            verts = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in poly)
            parts.append(f'<Region Id="{rid}"><Attributes/><Vertices>{verts}</Vertices></Region>')
            rid += 1
        parts.append("</Regions></Annotation>")
    parts.append("</Annotations>")
    path.write_text("".join(parts))


def test_xml_reader_synthetic(tmp_path):
    sq = lambda x0, y0, s: [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    _write_xml(tmp_path / "a.xml", {"nuclei": [sq(2, 2, 6), sq(5, 5, 6), [(1, 1), (2, 2)], sq(20, 3, 4)]})
    s = read_aperio_xml(tmp_path / "a.xml", origin="center")
    assert s.image is None and s.labels.shape == (12, 25) and s.labels.max() == 3
    assert s.meta["skipped_regions"] == 1 and s.meta["region_ids"] == ["10", "11", "13"]
    assert s.labels[2, 2] == 1 and s.labels[6, 6] == 1 and s.labels[10 - 3, 10] == 2 and s.labels[4, 21] == 3
    later = read_aperio_xml(tmp_path / "a.xml", origin="center", overlap="later")
    assert later.labels[6, 6] == 2
    img = np.zeros((30, 40, 3), np.uint8)
    s = read_aperio_xml(tmp_path / "a.xml", image=img)
    assert s.labels.shape == (30, 40) and s.labels[1, 1] == 1  # 1-based vertices: (2, 2) is pixel (1, 1)
    _write_xml(tmp_path / "m.xml", {"Epithelial": [sq(2, 2, 4)], "Lymphocyte": [sq(10, 10, 4)]})
    m = read_aperio_xml(tmp_path / "m.xml", shape=(20, 20))
    assert m.types[2, 2] == 1 and m.types[11, 11] == 2 and m.meta["class_names"] == {1: "Epithelial", 2: "Lymphocyte"}
    (tmp_path / "bad.xml").write_text("<svg><rect/></svg>")
    with pytest.raises(ValueError, match="Aperio"):
        read_aperio_xml(tmp_path / "bad.xml")


def test_hovernet_mat_and_npy(tmp_path):
    import imageio.v3 as iio
    from scipy.io import savemat

    img, lab, types = _pair()
    (tmp_path / "Labels").mkdir()
    (tmp_path / "Images").mkdir()
    iio.imwrite(tmp_path / "Images" / "c1.png", img)
    cen = np.array([[5.5, 5.5], [29.5, 24.5]])  # (x, y)
    savemat(tmp_path / "Labels" / "c1.mat", {"inst_map": lab.astype(np.float64), "type_map": types.astype(np.float64),
                                             "inst_type": np.array([[1.0], [2.0]]), "inst_centroid": cen})
    s = read_hovernet_mat(tmp_path / "Labels" / "c1.mat")
    assert s.labels.dtype == np.uint32 and np.array_equal(s.labels, lab) and np.array_equal(s.types, types)
    assert np.array_equal(s.image, img) and s.meta["inst_type"] == [1, 2]
    assert np.array_equal(s.meta["centroids"], cen[:, ::-1])
    savemat(tmp_path / "x.mat", {"something": np.zeros(3)})
    with pytest.raises(ValueError, match="inst_map"):
        read_hovernet_mat(tmp_path / "x.mat")
    np.save(tmp_path / "p4.npy", np.dstack([img.astype(np.int32), lab.astype(np.int32)]))
    s4 = read_hovernet_npy(tmp_path / "p4.npy")
    assert s4.types is None and np.array_equal(s4.labels, lab) and np.array_equal(s4.image, img)
    np.save(tmp_path / "p5.npy", np.dstack([img, lab, types]).astype(np.float64))
    s5 = read_hovernet_npy(tmp_path / "p5.npy")
    assert np.array_equal(s5.types, types) and s5.image.dtype == np.uint8
    np.save(tmp_path / "p3.npy", img)
    with pytest.raises(ValueError, match="H x W x 5"):
        read_hovernet_npy(tmp_path / "p3.npy")


def _pannuke_fold(root: Path, n: int = 3):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float64)  # PanNuke ships float64 in 0..255
    masks = np.zeros((n, 32, 32, 6), np.float64)
    masks[:, 2:8, 2:8, 0] = 4  # neoplastic nucleus id 4
    masks[:, 10:16, 10:16, 2] = 4  # connective nucleus with the same id 4: must stay a separate nucleus
    masks[:, 20:30, 20:25, 4] = 9  # epithelial
    masks[1, 20:30, 20:25, 4] = 0
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)
    (root / "images" / "fold1").mkdir(parents=True)
    (root / "masks" / "fold1").mkdir(parents=True)
    np.save(root / "images" / "fold1" / "images.npy", images)
    np.save(root / "images" / "fold1" / "types.npy", np.array(["Breast", "Colon", "Lung"]))
    np.save(root / "masks" / "fold1" / "masks.npy", masks)
    return images, masks


def test_pannuke(tmp_path):
    images, masks = _pannuke_fold(tmp_path / "Fold 1")
    im_p, ma_p = find_pannuke_pair(tmp_path / "Fold 1" / "images" / "fold1" / "images.npy")
    assert ma_p == tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy"
    assert find_pannuke_pair(ma_p) == (im_p, ma_p)
    samples = read_pannuke(im_p, ma_p, im_p.with_name("types.npy"))
    assert len(samples) == 3 and samples[0].meta["tissue"] == "Breast"
    s = samples[0]
    assert s.image.dtype == np.uint8 and np.array_equal(s.image, images[0].astype(np.uint8))
    assert s.labels.dtype == np.uint32 and s.labels.max() == 3
    assert s.labels[3, 3] != s.labels[12, 12]  # same PanNuke id, different class: two nuclei
    assert s.types[3, 3] == 1 and s.types[12, 12] == 3 and s.types[25, 22] == 5 and s.types[0, 0] == 0
    assert s.meta["pannuke_ids"] == [4, 4, 9]
    assert read_pannuke(None, masks, indices=[1])[0].labels.max() == 2
    with pytest.raises(ValueError, match="x 6"):
        read_pannuke(None, masks[..., :5])


def test_dsb(tmp_path):
    import imageio.v3 as iio

    img, lab, _ = _pair()
    for sid in ("s1", "s2"):
        (tmp_path / sid / "images").mkdir(parents=True)
        (tmp_path / sid / "masks").mkdir()
        rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
        iio.imwrite(tmp_path / sid / "images" / f"{sid}.png", rgba)
        for k, i in enumerate(np.unique(lab)[1:]):
            iio.imwrite(tmp_path / sid / "masks" / f"m{k}.png", ((lab == i) * 255).astype(np.uint8))
    samples = read_dsb(tmp_path)
    assert [s.name for s in samples] == ["s1", "s2"]
    s = samples[0]
    assert np.array_equal(s.image, img) and s.labels.dtype == np.uint32 and s.labels.max() == 4
    from skimage.segmentation import relabel_sequential

    assert np.array_equal(s.labels, relabel_sequential(lab)[0])  # sorted mask files, ids in that order
    assert len(read_dsb(tmp_path / "s2")) == 1


# ------------------------------------------------------------------------------------------------ npe2 glue


def test_npe2_readers(tmp_path, monuseg_dir):
    from napari_nucsynth import _reader

    xml = next(iter(sorted((monuseg_dir / "annotations_xml").glob("*.xml"))), None)
    if xml is not None:
        layers = _reader.get_xml_reader(str(xml))(str(xml))
        assert [t for *_, t in layers] == ["image", "labels"] and layers[1][0].dtype == np.uint32
        assert layers[0][1]["rgb"] is True
    (tmp_path / "other.xml").write_text("<svg/>")
    assert _reader.get_xml_reader(str(tmp_path / "other.xml")) is None
    img, lab, types = _pair()
    np.save(tmp_path / "p.npy", np.dstack([img, lab, types]).astype(np.int32))
    np.save(tmp_path / "plain.npy", lab)
    assert _reader.get_hovernet_reader(str(tmp_path / "plain.npy")) is None
    layers = _reader.get_hovernet_reader(str(tmp_path / "p.npy"))(str(tmp_path / "p.npy"))
    assert [t for *_, t in layers] == ["image", "labels", "labels"] and np.array_equal(layers[1][0], lab)
    assert _reader.get_pannuke_reader(str(tmp_path / "p.npy")) is None
    _pannuke_fold(tmp_path / "f")
    path = str(tmp_path / "f" / "masks" / "fold1" / "masks.npy")
    layers = _reader.get_pannuke_reader(path)(path)
    assert [t for *_, t in layers] == ["image", "labels", "labels"]
    assert layers[0][0].shape == (3, 32, 32, 3)
    assert layers[1][0].dtype == np.uint32 and layers[1][0].shape == (3, 32, 32)


def test_npe2_writers(tmp_path):
    import tifffile

    from napari_nucsynth import _writer
    from napari_nucsynth.io import read_points_csv

    lab = np.zeros((10, 12), np.int64)
    lab[2:4, 2:4] = 70000
    out = _writer.write_labels_tif(str(tmp_path / "l"), lab, {})
    assert out == [str(tmp_path / "l.tif")]
    back = tifffile.imread(out[0])
    assert back.dtype == np.uint32 and np.array_equal(back, lab)
    stack = np.stack([lab, lab * 0 + 3])
    back = tifffile.imread(_writer.write_labels_tif(str(tmp_path / "s.tif"), stack, {})[0])
    assert back.dtype == np.uint32 and np.array_equal(back, stack)
    with pytest.raises(ValueError, match="non-negative"):
        _writer.write_labels_tif(str(tmp_path / "n.tif"), lab - 1, {})
    pts = np.array([[1.5, 2.0], [3.0, 4.25]])
    out = _writer.write_points_csv(str(tmp_path / "p.csv"), pts, {"features": {"class": np.array([2, 0])}})
    got, cls = read_points_csv(out[0])
    assert np.array_equal(got, pts) and cls.tolist() == [2, 0]
    with pytest.raises(ValueError, match="2-D points"):
        _writer.write_points_csv(str(tmp_path / "q.csv"), np.zeros((2, 3)), {})
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
