"""Choose HoVer-Net's post-processing defaults on training tiles (never on the benchmark's held-out ones).

    OMP_NUM_THREADS=1 python benchmarks/tune_hovernet_post.py --checkpoint bench-out/hovernet_bench.pt

The network's maps are predicted once per tile (one training tile per organ, from the 24 ``--split bench``
tiles); ``postprocess`` then runs over a grid of ``np_threshold`` x ``edge_threshold`` x ``min_area``. Prints
the mean AJI and PQ of every setting, best first, as JSON. The model has seen these tiles, so the absolute figures
are optimistic; only the ranking of post-processing settings is used.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from _data import SEGMENT_HELDOUT, load_image, load_labels, organ, tile_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    args = ap.parse_args()
    from napari_nucsynth.metrics import instance_metrics
    from napari_nucsynth.segment import get_segmenter

    seen, tiles = set(), []
    for t in tile_ids():
        if t not in SEGMENT_HELDOUT and organ(t) not in seen:
            seen.add(organ(t))
            tiles.append(t)
    seg = get_segmenter("hovernet")
    maps = [(seg.predict_maps(load_image(t), checkpoint=args.checkpoint, device="cpu"), load_labels(t)) for t in tiles]
    rows = []
    for npt, edge, area in itertools.product((0.4, 0.5, 0.6), (0.3, 0.4, 0.5, 0.6), (10, 30)):
        ms = [instance_metrics(lab, seg.postprocess(m, np_threshold=npt, edge_threshold=edge, min_area=area))
              for m, lab in maps]
        rows.append({"np_threshold": npt, "edge_threshold": edge, "min_area": area,
                     "aji": float(np.mean([m["aji"] for m in ms])), "pq": float(np.mean([m["pq"] for m in ms]))})
    rows.sort(key=lambda r: -(r["aji"] + r["pq"]))
    print(json.dumps({"tiles": tiles, "settings": rows}, indent=1))


if __name__ == "__main__":
    main()
