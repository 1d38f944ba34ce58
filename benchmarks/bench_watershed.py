"""The classical watershed segmenter on the 30 MoNuSeg training tiles: prints one JSON object.

    OMP_NUM_THREADS=1 python benchmarks/bench_watershed.py [--grid] [--tta] [--jobs 2]

Mean AJI, AJI+, PQ, DQ, SQ and Dice over the 30 tiles (project metrics, HoVer-Net's conventions) for the default
parameters, and seconds per 1000 x 1000 tile (median over the tiles, one process). ``--grid`` also evaluates the
handful of parameter combinations the defaults were picked from (by mean AJI) and lists them best first. The
watershed has no training, so these tiles are not a held-out test: they are where the four defaults were chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from _data import load_image, load_labels, tile_ids

KEYS = ("aji", "aji_plus", "pq", "dq", "sq", "dice")

#: The combinations tried beside the defaults: each parameter moved one step either side of its default.
GRID = [
    {"sigma": 0.5}, {"sigma": 1.5},
    {"threshold_scale": 1.0}, {"threshold_scale": 1.2},
    {"min_area": 30}, {"min_area": 80},
    {"min_distance": 5}, {"min_distance": 9},
]


def _run(args):
    tile, params, tta = args
    from napari_nucsynth.metrics import instance_metrics
    from napari_nucsynth.segment import segment

    img, truth = load_image(tile), load_labels(tile)
    t0 = time.perf_counter()
    pred = segment(img, method="watershed", tta=tta, **params)
    dt = time.perf_counter() - t0
    m = instance_metrics(truth, pred)
    return tile, {k: m[k] for k in KEYS}, dt, int(pred.max())


def evaluate(params: dict, tiles: list[str], jobs: int, tta: bool = False) -> dict:
    with ProcessPoolExecutor(jobs) as ex:
        res = list(ex.map(_run, [(t, params, tta) for t in tiles]))
    out = {k: float(np.mean([r[1][k] for r in res])) for k in KEYS}
    out["s_per_tile"] = float(np.median([r[2] for r in res]))
    out["nuclei_per_tile"] = float(np.mean([r[3] for r in res]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", action="store_true", help="also evaluate the parameter combinations of GRID")
    ap.add_argument("--tta", action="store_true", help="also evaluate the defaults with test-time augmentation")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (timings are per process)")
    args = ap.parse_args()

    from napari_nucsynth.segment.watershed import WatershedSegmenter

    defaults = {k: v[0] for k, v in WatershedSegmenter.params.items()}
    tiles = tile_ids()
    truth_n = float(np.mean([np.unique(load_labels(t)).size - 1 for t in tiles]))
    result = {"benchmark": "watershed", "tiles": len(tiles), "true_nuclei_per_tile": truth_n, "defaults": defaults,
              "jobs": args.jobs, "mean": evaluate({}, tiles, args.jobs)}
    if args.tta:
        result["tta"] = evaluate({}, tiles, args.jobs, tta=True)
    if args.grid:
        rows = [{"params": defaults, **result["mean"]}]
        rows += [{"params": {**defaults, **g}, **evaluate(g, tiles, args.jobs)} for g in GRID]
        result["grid"] = sorted(rows, key=lambda r: -r["aji"])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
