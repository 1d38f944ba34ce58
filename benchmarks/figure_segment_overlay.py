"""Outlines of the annotated nuclei (green) and a segmenter's nuclei (magenta; yellow where both lie) on a crop of
a held-out MoNuSeg tile, for docs/benchmarks.md; prints JSON with the figure's path and the tile's counts.

    OMP_NUM_THREADS=1 python benchmarks/figure_segment_overlay.py --hovernet bench-out/hovernet_bench_ft.pt \
        --tile TCGA-A7-A13E-01Z-00-DX1 --out docs/images/segment_heldout_breast.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from _data import SEGMENT_HELDOUT, load_image, load_labels, organ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hovernet", required=True, help="checkpoint trained on the 24 bench tiles")
    ap.add_argument("--tile", default=SEGMENT_HELDOUT[0], choices=SEGMENT_HELDOUT)
    ap.add_argument("--crop", type=int, nargs=3, default=(300, 300, 300), metavar=("Y", "X", "SIZE"))
    ap.add_argument("--zoom", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from skimage.io import imsave
    from skimage.segmentation import find_boundaries

    from napari_nucsynth.segment import segment

    img, lab = load_image(args.tile), load_labels(args.tile)
    pred = segment(img, method="hovernet", checkpoint=args.hovernet, device="cpu")
    y, x, n = args.crop
    crop = img[y:y + n, x:x + n].copy()
    bt, bp = find_boundaries(lab[y:y + n, x:x + n]), find_boundaries(pred[y:y + n, x:x + n])
    crop[bt], crop[bp], crop[bt & bp] = (0, 255, 0), (255, 0, 255), (255, 255, 0)
    crop = np.repeat(np.repeat(crop, args.zoom, 0), args.zoom, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    imsave(args.out, crop, check_contrast=False)
    no_overlap = np.setdiff1d(pred[pred > 0], pred[lab > 0])
    print(json.dumps({"figure": args.out, "tile": args.tile, "organ": organ(args.tile), "crop": [y, x, n],
                      "n_true": int(len(np.unique(lab)) - 1), "n_pred": int(pred.max()),
                      "n_pred_no_overlap": len(no_overlap)}))


if __name__ == "__main__":
    main()
