"""Regenerate the small real MoNuSeg fixture in ``tests/data/monuseg`` from the full training tiles.

    python tests/data/make_fixture.py [--data ../shared/data/monuseg/train]

The tests read these crops (``tests/conftest.py``: ``monuseg_dir``, ``load_tile``, ``monuseg_tiles``), so they run
wherever the repository is cloned; the benchmarks keep reading the full tiles (``$NUCSYNTH_DATA`` or
``../shared/data/monuseg/train``). Each crop below names the tests that read it and why it has its size: the tests
index into the crop with the coordinates they used on the full tile (every crop but ``HE-7130`` starts at the tile's
top-left corner), so the pixels they see are the ones they saw before.

What is written, in the MoNuSeg folder layout (``images/``, ``labels/``, ``annotations_xml/``):

- ``images/<id>.png``: the RGB crop (lossless PNG, the tile's pixels unchanged);
- ``labels/<id>.png``: the same crop of the instance labels, 16-bit PNG, the tile's own ids (not renumbered);
  three tiles ship labels only (the tests that read them use no image), two of them whole;
- ``annotations_xml/<id>.xml``: the challenge's Aperio XML reduced to the regions that have pixels in the crop;
  each kept polygon is the same polygon (vertices lying exactly on the straight segment between their neighbours
  are dropped, checked with exact arithmetic; numbers written without trailing zeros; region attributes other
  than ``Id`` dropped), and the script checks that ``read_aperio_xml`` gives the same label map from it as from
  the whole file;
- ``crops.json``: where each crop lies in its tile and the sha256 of the files it was cut from.

The tile ``TCGA-49-4488-01Z-00-DX1`` is not here: ``load_tile`` serves it from the package's own sample data
(``src/napari_nucsynth/data/monuseg_crop_*.png``, rows 500-899 and columns 100-499 of that tile).
Licence and attribution: ``tests/data/ATTRIBUTION.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import xml.etree.ElementTree as ET
from fractions import Fraction
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = HERE / "monuseg"

#: stem -> (rows, cols, what ships, who reads it). ``rows``/``cols`` None: the whole tile.
CROPS: dict[str, tuple] = {
    "TCGA-A7-A13F-01Z-00-DX1": (
        (0, 400), (0, 400), "image+labels",
        "test_segment (watershed quality and TTA on [:400, :400], the crop fixture [144:400, 144:400], tiling on "
        "[16:400, 16:400] and [:300, :300]), test_hovernet ([:400, :200]), test_sian, test_distributed and "
        "crop_pair_dirs ([:256, :128]), test_stain's second stain ([:300, :300]), test_image_metrics, test_generate",
    ),
    "TCGA-HE-7130-01Z-00-DX1": (
        (640, 768), (640, 768), "image+labels",
        "test_maskrcnn: a dense 128-px crop (about 90 nuclei)",
    ),
    "TCGA-21-5784-01Z-00-DX1": (
        (0, 192), (0, 192), "image+labels+xml",
        "test_io_formats (the Aperio XML reader against the challenge's label map: mean matched IoU 0.968 here, "
        "0.974 on the whole tile; at 160 px a 28-px sliver of a nucleus cut by the crop pulls the mean of 12 "
        "nuclei to 0.944), test_image_metrics, test_generate",
    ),
    "TCGA-B0-5698-01Z-00-DX1": (
        (0, 160), (0, 160), "image+labels+xml",
        "test_io_formats (a second XML tile), test_image_metrics, test_generate",
    ),
    "TCGA-18-5592-01Z-00-DX1": (
        None, None, "labels",
        "whole-tile statistics: test_masks (shape prior and mask sampler against 480 real nuclei), test_points "
        "(centroids, point-process fit, point library), test_plugin (random-points --like, --prior)",
    ),
    "TCGA-CH-5767-01Z-00-DX1": (
        None, None, "labels",
        "test_metrics: agreement with HoVer-Net's reference code on a whole tile (the one with fewest nuclei)",
    ),
    "TCGA-38-6178-01Z-00-DX1": (
        (0, 200), (0, 300), "labels",
        "test_render and test_plugin: a real target label map",
    ),
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_dir(arg: str | None) -> Path:
    env = os.environ.get("NUCSYNTH_DATA")
    for cand in [Path(p) for p in (arg, env) if p] + [REPO.parent / "shared" / "data" / "monuseg" / "train"]:
        if (cand / "labels").is_dir():
            return cand
    sys.exit("MoNuSeg training tiles not found: pass --data or set NUCSYNTH_DATA")


def _png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", optimize=True)
    path.write_bytes(buf.getvalue())


def _on_segment(a, b, c) -> bool:
    """True if ``b`` lies strictly inside the straight segment from ``a`` to ``c`` (exact arithmetic)."""
    cross = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    return cross == 0 and (b[0] - a[0]) * (c[0] - b[0]) + (b[1] - a[1]) * (c[1] - b[1]) > 0


def _reduce_vertices(reg, xy) -> tuple[int, int]:
    """Drop the vertices of region ``reg`` that lie on the segment between their kept neighbours."""
    vertices = reg.find("Vertices")
    verts = list(vertices)
    kept = [0]
    for i in range(1, len(xy)):
        if not _on_segment(xy[kept[-1]], xy[i], xy[(i + 1) % len(xy)]):
            kept.append(i)
    keep_set = set(kept)
    for i, v in enumerate(verts):
        if i not in keep_set:
            vertices.remove(v)
    return len(verts), len(kept)


def _write_regions(root, regions: dict, originals: dict, exact: set, dst: Path) -> None:
    """Write ``root`` with each region's vertices reduced, except the regions in ``exact`` (all kept)."""
    for rid, reg in regions.items():
        vertices = reg.find("Vertices")
        for v in list(vertices):
            vertices.remove(v)
        for x, y in originals[rid]:
            ET.SubElement(vertices, "Vertex", X=repr(float(x)), Y=repr(float(y)))
        if rid not in exact:
            _reduce_vertices(reg, [(Fraction(x), Fraction(y)) for x, y in originals[rid]])
    ET.ElementTree(root).write(dst, encoding="utf-8", xml_declaration=False)


def _crop_xml(src: Path, dst: Path, image: np.ndarray, rows, cols) -> dict:
    """Write the regions of ``src`` that have pixels in the crop, with fewer vertices where that changes no pixel;
    check that the reader gives the same labels from it as from the whole file."""
    from napari_nucsynth.io import read_aperio_xml

    assert rows[0] == 0 and cols[0] == 0, "XML crops keep the tile's coordinates: start them at the corner"
    full = read_aperio_xml(src, find_image=False, shape=(1000, 1000))
    region = full.labels[rows[0] : rows[1], cols[0] : cols[1]]
    keep = {full.meta["region_ids"][int(i) - 1] for i in np.unique(region) if i}
    root = ET.parse(src).getroot()
    regions, originals = {}, {}
    for group in root.iter("Regions"):
        for reg in list(group.findall("Region")):
            if reg.get("Id") not in keep:
                group.remove(reg)
                continue
            for k in [k for k in reg.attrib if k != "Id"]:
                del reg.attrib[k]
            regions[reg.get("Id")] = reg
            originals[reg.get("Id")] = [(v.get("X"), v.get("Y")) for v in reg.iter("Vertex")]
    for el in root.iter():
        if el.tail is not None and not el.tail.strip():
            el.tail = None
        if el.text is not None and not el.text.strip():
            el.text = None
    exact: set = set()
    while True:  # a vertex on an edge can still move a pixel whose centre lies exactly on that edge: keep those
        _write_regions(root, regions, originals, exact, dst)
        small = read_aperio_xml(dst, image=image)
        ids = [full.meta["region_ids"].index(r) + 1 for r in small.meta["region_ids"]]
        expect = np.zeros_like(region)
        for new, old in enumerate(ids, start=1):
            expect[region == old] = new
        bad = expect != small.labels
        if not bad.any():
            break
        culprits = {small.meta["region_ids"][int(i) - 1] for i in np.r_[expect[bad], small.labels[bad]] if i}
        assert culprits - exact, f"{dst.name}: the reduced XML rasterises differently"
        exact |= culprits
    n_in = sum(len(v) for v in originals.values())
    n_out = sum(1 for _ in root.iter("Vertex"))
    return {"regions": len(keep), "vertices": [n_in, n_out], "regions_with_every_vertex": sorted(exact)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="the MoNuSeg training folder (images/, labels/, annotations_xml/)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from napari_nucsynth.io import read_image, read_labels

    data = _data_dir(args.data)
    for sub in ("images", "labels", "annotations_xml"):
        (OUT / sub).mkdir(parents=True, exist_ok=True)
        for old in (OUT / sub).iterdir():
            old.unlink()
    index = {}
    for stem, (rows, cols, what, why) in CROPS.items():
        lab_src = data / "labels" / f"{stem}.png"
        lab = read_labels(lab_src)
        rows = rows or (0, lab.shape[0])
        cols = cols or (0, lab.shape[1])
        entry = {"rows": list(rows), "cols": list(cols), "ships": what, "read_by": why,
                 "labels_sha256": _sha256(lab_src)}
        lab_crop = lab[rows[0] : rows[1], cols[0] : cols[1]]
        assert lab_crop.max() < 1 << 16
        _png(OUT / "labels" / f"{stem}.png", np.ascontiguousarray(lab_crop, dtype=np.uint16))  # 16-bit PNG
        back = read_labels(OUT / "labels" / f"{stem}.png")
        assert back.dtype == np.uint32 and np.array_equal(back, lab_crop)
        if "image" in what:
            img_src = data / "images" / f"{stem}.png"
            img = read_image(img_src)[..., :3]
            crop = np.ascontiguousarray(img[rows[0] : rows[1], cols[0] : cols[1]])
            _png(OUT / "images" / f"{stem}.png", crop)
            assert np.array_equal(read_image(OUT / "images" / f"{stem}.png"), crop)
            entry["image_sha256"] = _sha256(img_src)
        if "xml" in what:
            xml_src = data / "annotations_xml" / f"{stem}.xml"
            entry["xml_sha256"] = _sha256(xml_src)
            entry["xml"] = _crop_xml(xml_src, OUT / "annotations_xml" / f"{stem}.xml", crop, rows, cols)
        index[stem] = entry
    (OUT / "crops.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(json.dumps({"out": str(OUT), "files": sum(1 for p in OUT.rglob("*") if p.is_file()),
                      "bytes": total}, indent=1))


if __name__ == "__main__":
    main()
