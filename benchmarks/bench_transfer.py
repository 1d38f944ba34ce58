"""Stain/modality transfer benchmark (issue 21, Liu et al.): tile A restained to tile B's modality; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/bench_transfer.py                       # reinhard and macenko
    OMP_NUM_THREADS=1 python benchmarks/bench_transfer.py --drit bench-out/drit_bench.pt
    OMP_NUM_THREADS=1 python benchmarks/bench_transfer.py --crop 0 --segmenter bench-out/hovernet_bench_ft.pt

Pairs: every ordered pair (A, B), A != B, of the 6 held-out tiles ``_data.SEGMENT_HELDOUT`` (one per organ, never
seen by ``train_drit.py --split bench``), the centre ``--crop`` x ``--crop`` of each (0: whole tiles); ``--pairs N``
keeps the first N. For each method, ``stain.transfer(A, B, method)`` and:

- **content**: the segmenter's AJI against A's true labels on the result and on A itself; the target is
  ``aji_ratio`` (mean AJI on the results over mean AJI on the sources) >= 0.9;
- **modality**: ``od_ratio`` = distance between the mean optical densities (``stain.od_distance``: RGB optical
  density ``-log10((I + 1) / 256)`` averaged over every pixel) of the result and B, over that of A and B; the
  target is a mean <= 0.5.

``none`` (the untouched A) is the baseline row (ratios 1 by construction). The segmenter is the shipped hovernet
model unless ``--segmenter`` names another checkpoint; the shipped one was fine-tuned on all 30 training tiles,
held-out ones included (``leak`` in the output lists them), which flatters both AJIs alike, not their ratio.
Transfer times are per pair, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from _data import SEGMENT_HELDOUT, load_image, load_labels, organ


def _center(a: np.ndarray, size: int) -> np.ndarray:
    if not size:
        return a
    H, W = a.shape[:2]
    r, c = max(0, (H - size) // 2), max(0, (W - size) // 2)
    return a[r : r + size, c : c + size]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drit", help="a drit checkpoint: also benchmark method='drit'")
    ap.add_argument("--methods", default="reinhard,macenko", help="comma-separated methods besides drit")
    ap.add_argument("--segmenter", help="hovernet checkpoint (default: the shipped model)")
    ap.add_argument("--crop", type=int, default=512, help="centre crop of every tile (0: whole tiles)")
    ap.add_argument("--pairs", type=int, default=0, help="keep the first N ordered pairs (0: all 30)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from napari_nucsynth.metrics import aji
    from napari_nucsynth.models import load_checkpoint
    from napari_nucsynth.segment import segment
    from napari_nucsynth.segment.hovernet import default_checkpoint
    from napari_nucsynth.stain import od_distance, stain_reference, transfer

    t0 = time.perf_counter()
    methods = [m for m in args.methods.split(",") if m] + (["drit"] if args.drit else [])
    seg_ckpt = Path(args.segmenter) if args.segmenter else default_checkpoint()
    seg_info = load_checkpoint(seg_ckpt, kind="hovernet")["train_data"]
    tiles = list(SEGMENT_HELDOUT)
    imgs = {t: _center(load_image(t), args.crop) for t in tiles}
    labs = {t: _center(load_labels(t), args.crop) for t in tiles}
    refs = {t: stain_reference(imgs[t]) for t in tiles}
    pairs = [(a, b) for a in tiles for b in tiles if a != b]
    if args.pairs:
        pairs = pairs[: args.pairs]

    def run_seg(img):
        return segment(img, method="hovernet", checkpoint=seg_ckpt, device=args.device)

    aji_src = {t: float(aji(labs[t], run_seg(imgs[t]))) for t in {a for a, _ in pairs}}
    rows: dict[str, list[dict]] = {m: [] for m in ["none", *methods]}
    for a, b in pairs:
        d_ab = od_distance(imgs[a], imgs[b])
        rows["none"].append({"a": a, "b": b, "aji_src": aji_src[a], "aji": aji_src[a], "od_ratio": 1.0,
                             "seconds": 0.0})
        for m in methods:
            ts = time.perf_counter()
            out = transfer(imgs[a], refs[b], method=m, checkpoint=args.drit if m == "drit" else None,
                           device=args.device)
            dt = time.perf_counter() - ts
            rows[m].append({"a": a, "b": b, "aji_src": aji_src[a], "aji": float(aji(labs[a], run_seg(out))),
                            "od_ratio": od_distance(out, imgs[b]) / max(d_ab, 1e-12), "seconds": dt})

    summary = {}
    for m, rs in rows.items():
        a_res, a_src = np.mean([r["aji"] for r in rs]), np.mean([r["aji_src"] for r in rs])
        od = np.array([r["od_ratio"] for r in rs])
        summary[m] = {
            "aji_result": round(float(a_res), 4), "aji_source": round(float(a_src), 4),
            "aji_ratio": round(float(a_res / max(a_src, 1e-12)), 4),
            "aji_ratio_min_pair": round(float(min(r["aji"] / max(r["aji_src"], 1e-12) for r in rs)), 4),
            "od_ratio_mean": round(float(od.mean()), 4), "od_ratio_median": round(float(np.median(od)), 4),
            "od_ratio_max": round(float(od.max()), 4), "pairs_od_ratio_le_0.5": int(np.sum(od <= 0.5)),
            "meets_aji_target": bool(a_res >= 0.9 * a_src), "meets_od_target": bool(od.mean() <= 0.5),
            "transfer_s_per_pair": round(float(np.mean([r["seconds"] for r in rs])), 4),
        }
    result = {
        "benchmark": "stain transfer", "crop": args.crop, "n_pairs": len(pairs),
        "held_out": {t: organ(t) for t in tiles}, "threads": 1, "device": args.device,
        "segmenter": {"checkpoint": str(seg_ckpt),
                      "leak": sorted(set(seg_info.get("tiles", seg_info.get("images", []))) & set(tiles))},
        "drit_checkpoint": args.drit, "targets": {"aji_ratio": ">= 0.9", "od_ratio_mean": "<= 0.5"},
        "methods": summary,
        "per_pair": {m: [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rs]
                     for m, rs in rows.items() if m != "none"},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.drit:
        ck = load_checkpoint(args.drit, kind="drit")
        result["drit"] = {"step": ck["step"], "leak": sorted(set(ck["train_data"].get("tiles", [])) & set(tiles))}
    text = json.dumps(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
