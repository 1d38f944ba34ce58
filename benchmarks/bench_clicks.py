"""Click-to-mask benchmark (issue 18) on the 6 held-out MoNuSeg tiles; prints one JSON object.

    OMP_NUM_THREADS=1 python benchmarks/bench_clicks.py [--threads 2] [--edits 200] [--no-loo]
        [--nuclick CKPT] [--methods nuclick,hovernet] [--no-prior]

Every true nucleus of each held-out tile (``_data.SEGMENT_HELDOUT``) is clicked at its centroid
(:func:`napari_nucsynth.points.centroids`), and the masks fitted to the clicks are scored against the annotated
contours (AJI and PQ, :mod:`napari_nucsynth.metrics`, mean over the 6 tiles):

- every fitting method (:func:`napari_nucsynth.annotate.fit_methods`) that can run here (``nuclick`` with
  ``--nuclick CKPT``, or its shipped checkpoint; ``--methods`` picks some), and as the baseline the shape prior alone
  (``sample_masks``, the image ignored); for reference, the shipped hovernet with no clicks at all, and issue
  18's first try (``hovernet_one_pixel_markers``: the clicks as one-pixel markers of a plain watershed on the same
  foreground and energy, no snapping, compactness or fallback);
- the same with each click moved by N(0, 2 px) in each axis (seeded), as a hand would;
- the image pass (the method's one-time pass, :func:`napari_nucsynth.annotate.image_maps`, cache emptied first):
  seconds per tile (the tiles are 1000 x 1000), median over the tiles, with ``--threads`` torch threads; the
  first tile's pass loads the model and is left out of the median;
- the full fit of every click of a tile (``MaskFitter.reset``, the maps made): seconds, median over the tiles
  (for ``nuclick`` every click's patch through the network);
- per-click latency of :class:`napari_nucsynth.annotate.MaskFitter`: each tile's clicks but ``--edits / 2`` are
  fitted, then ``--edits`` edits alternate adding one of the remaining clicks (jittered) and moving a random
  point by N(0, 3 px); milliseconds, median and 95th percentile over all edits of all tiles (and of deletions),
  wall time and (``cpu_*``) the process's CPU time, which a machine shared with other jobs does not inflate;
  and (``click_ms_dense``, unless ``--dense 0``) the same among 1000 random hard-core clicks on the first tile;
- ``ShapePrior.from_image``: a prior fitted to the nuclei the default segmenter finds in each tile samples masks
  at the tile's true centroids; two-sample KS statistic of their areas against the annotated nuclei's, beside the
  default prior's and (unless ``--no-loo``) a prior fitted on the other 29 tiles' annotations (leave-one-out),
  and (``segmenter_nuclei``) the KS of the segmenter's own nuclei, which the prior is fitted to, against the
  annotated ones: how far the prior's input already is from the annotations; ``--no-prior`` skips it.

Caveat: the shipped hovernet model and the default shape prior were fitted on all 30 MoNuSeg training tiles, the
6 held-out ones included; their figures here are optimistic (the fitting methods' own parameters were chosen on
the other 24 tiles only).
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

import numpy as np  # noqa: E402
from _data import SEGMENT_HELDOUT, load_image, load_labels, organ, tile_ids  # noqa: E402

TARGETS = {"aji_true_clicks": 0.80, "pq_true_clicks": 0.75, "aji_jittered_clicks": 0.77, "image_pass_s": 5.0,
           "click_ms_median": 50.0, "ks_area_from_image": 0.10}


def _score(lab, pred) -> dict:
    from napari_nucsynth.metrics import aji, pq

    return {"aji": round(float(aji(lab, pred)), 4), "pq": round(float(pq(lab, pred)[2]), 4)}


def _mean(rows: list[dict], key: str) -> dict:
    return {k: round(float(np.mean([r[key][k] for r in rows])), 4) for k in ("aji", "pq")}


def _latency(maps, clicks: np.ndarray, edits: int, rng) -> dict[str, list[float]]:
    """Seconds per edit (wall, and as ``cpu_*`` the process's CPU time: on a machine shared with other jobs the
    wall time measures the share it got, the CPU time the work)."""
    from napari_nucsynth.annotate import MaskFitter

    n_add = min(edits // 2, len(clicks) // 2)
    fitter = MaskFitter(maps, seed=0)
    fitter.reset(clicks[: len(clicks) - n_add])
    out = {"add": [], "move": [], "remove": [], "cpu_add": [], "cpu_move": [], "cpu_remove": []}

    def timed(kind, fn, *a):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(*a)
        out[kind].append(time.perf_counter() - t0)
        out["cpu_" + kind].append(time.process_time() - c0)

    for k in range(edits):
        if k % 2 == 0 and k // 2 < n_add:
            timed("add", fitter.add, clicks[len(clicks) - n_add + k // 2] + rng.normal(0, 2, 2))
        else:
            i = int(rng.integers(len(fitter.points)))
            timed("move", fitter.move, i, fitter.points[i] + rng.normal(0, 3, 2))
    for _ in range(10):
        timed("remove", fitter.remove, int(rng.integers(len(fitter.points))))
    return out


def _one_pixel(maps, pts: np.ndarray) -> np.ndarray:
    """Issue 18's first try: each click one marker pixel of a plain watershed of the energy in the foreground."""
    from skimage.segmentation import watershed

    h, w = maps.shape
    r = np.floor(pts + 0.5).astype(int)
    ok = np.flatnonzero((r[:, 0] >= 0) & (r[:, 0] < h) & (r[:, 1] >= 0) & (r[:, 1] < w))[::-1]  # earlier wins
    markers = np.zeros(maps.shape, np.int32)
    markers[r[ok, 0], r[ok, 1]] = ok + 1
    return watershed(maps.energy, markers=markers, mask=maps.foreground).astype(np.uint32)


def _ms(values: list[float]) -> dict:
    v = 1e3 * np.asarray(values)
    return {"median": round(float(np.median(v)), 2), "p95": round(float(np.percentile(v, 95)), 2),
            "max": round(float(v.max()), 2), "n": int(v.size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the image pass (default 2)")
    ap.add_argument("--edits", type=int, default=200, help="edits per tile for the click latency")
    ap.add_argument("--jitter", type=float, default=2.0, help="click jitter, px (N(0, jitter) per axis)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-loo", action="store_true", help="skip the leave-one-out prior (6 fits of 29 tiles)")
    ap.add_argument("--no-prior", action="store_true", help="skip ShapePrior.from_image's KS")
    ap.add_argument("--prior-seeds", type=int, default=1, help="draw the priors' masks with this many seeds (from "
                    "--seed on; the segmentation is made once) and report the spread of the median KS")
    ap.add_argument("--nuclick", metavar="CKPT", help="evaluate the nuclick method with this checkpoint")
    ap.add_argument("--nuclick-params", metavar="JSON", default="{}",
                    help="the nuclick method's parameters, e.g. '{\"tta\": 4}'")
    ap.add_argument("--dense", type=int, default=1000, metavar="N",
                    help="also time edits among N random (hard-core) clicks on the first tile (issue 18's latency "
                    "target: 1000 nuclei on a 1000 x 1000 image); 0: skip")
    ap.add_argument("--methods", help="comma-separated fitting methods to evaluate (default: all that can run)")
    args = ap.parse_args()

    import torch
    from scipy.stats import ks_2samp

    torch.set_num_threads(args.threads)
    from napari_nucsynth.annotate import MaskFitter, clear_cache, fit_methods, get_fit_method, image_maps
    from napari_nucsynth.masks import ShapePrior, sample_masks
    from napari_nucsynth.points import centroids
    from napari_nucsynth.segment import get_segmenter

    rng = np.random.default_rng(args.seed)
    load0 = os.getloadavg()
    tiles = list(SEGMENT_HELDOUT)
    data = []
    for t in tiles:
        lab = load_labels(t)
        pts = centroids(lab)
        data.append((t, load_image(t), lab, pts, pts + rng.normal(0, args.jitter, pts.shape)))

    ckpts = {"nuclick": args.nuclick} if args.nuclick else {}
    nuclick_params = json.loads(args.nuclick_params)
    methods = [m for m in fit_methods() if get_fit_method(m, ckpts.get(m)).available(ckpts.get(m))]
    if args.methods:
        wanted = args.methods.split(",")
        missing = [m for m in wanted if m not in methods]
        if missing:
            raise SystemExit(f"--methods: {', '.join(missing)} cannot run here (available: {', '.join(methods)}; "
                             "nuclick needs --nuclick CKPT)")
        methods = wanted
    rows = {m: [] for m in ["shape_prior", *methods, "hovernet_no_clicks", "hovernet_one_pixel_markers"]}
    fits = {m: [] for m in methods}
    passes = {m: [] for m in methods}
    lat = {m: {k: [] for k in ("add", "move", "remove", "cpu_add", "cpu_move", "cpu_remove")} for m in methods}
    for t, img, lab, pts, jit in data:
        rows["shape_prior"].append({"tile": t, "true": _score(lab, sample_masks(pts, lab.shape, seed=args.seed)),
                                    "jittered": _score(lab, sample_masks(jit, lab.shape, seed=args.seed))})
        for m in methods:
            clear_cache()
            t0 = time.perf_counter()
            maps = image_maps(img, method=m, checkpoint=ckpts.get(m), device=args.device,
                              **(nuclick_params if m == "nuclick" else {}))
            passes[m].append(time.perf_counter() - t0)
            fitter = MaskFitter(maps, seed=args.seed)
            t0 = time.perf_counter()
            fitted = fitter.reset(pts)
            fits[m].append(time.perf_counter() - t0)
            true = _score(lab, fitted)
            n_fallback = int(fitter.fallback.sum())
            rows[m].append({"tile": t, "organ": organ(t), "true": true, "jittered": _score(lab, fitter.reset(jit)),
                            "n_nuclei": len(pts), "clicks_on_background": n_fallback,
                            "image_pass_s": round(passes[m][-1], 2), "fit_all_s": round(fits[m][-1], 2)})
            for k, v in _latency(maps, pts, args.edits, rng).items():
                lat[m][k] += v
            if m == "hovernet":
                rows["hovernet_one_pixel_markers"].append(
                    {"tile": t, "true": _score(lab, _one_pixel(maps, pts)), "jittered": _score(lab, _one_pixel(maps, jit))})
        if "hovernet" in methods:
            seg = get_segmenter("hovernet")
            no_clicks = seg.postprocess(seg.predict_maps(img, device=args.device))
            rows["hovernet_no_clicks"].append({"tile": t, "true": _score(lab, no_clicks)})
        print(f"{t} done", file=sys.stderr, flush=True)

    dense = {}
    if args.dense:
        from napari_nucsynth.points import random_points

        t, img = data[0][0], data[0][1]
        pts = random_points(img.shape[:2], n=args.dense + args.edits // 2, process="hardcore", seed=args.seed)
        for m in methods:
            maps = image_maps(img, method=m, checkpoint=ckpts.get(m), device=args.device,
                              **(nuclick_params if m == "nuclick" else {}))
            v = _latency(maps, pts, args.edits, np.random.default_rng(args.seed))
            dense[m] = {"tile": t, "clicks": len(pts) - args.edits // 2,
                        "add_or_move": _ms(v["add"] + v["move"]), "cpu_add_or_move": _ms(v["cpu_add"] + v["cpu_move"])}
    out = {
        "benchmark": "clicks",
        "held_out": {t: organ(t) for t in tiles},
        "note": "the shipped hovernet and the default shape prior were fitted on all 30 MoNuSeg tiles, these 6 "
                "included (optimistic); the fitting methods' parameters were chosen on the other 24 tiles",
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "device": args.device,
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "loadavg_before": [round(v, 2) for v in load0]},
        "jitter_px": args.jitter,
        "targets": TARGETS,
        "methods": {},
    }
    if ckpts:
        out["checkpoints"] = ckpts
    if nuclick_params:
        out["nuclick_params"] = nuclick_params
    for m, r in rows.items():
        if not r:
            continue
        entry = {"true_clicks": _mean(r, "true")}
        if "jittered" in r[0]:
            entry["jittered_clicks"] = _mean(r, "jittered")
        if m in passes:
            entry["image_pass_s_median"] = round(float(np.median(passes[m][1:] or passes[m])), 2)
            entry["fit_all_s_median"] = round(float(np.median(fits[m][1:] or fits[m])), 2)
            entry["click_ms"] = {k: _ms(v) for k, v in lat[m].items() if v}
            entry["click_ms"]["add_or_move"] = _ms(lat[m]["add"] + lat[m]["move"])
            entry["click_ms"]["cpu_add_or_move"] = _ms(lat[m]["cpu_add"] + lat[m]["cpu_move"])
            if m in dense:
                entry["click_ms_dense"] = dense[m]
        entry["per_tile"] = r
        out["methods"][m] = entry

    if args.no_prior:
        out["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
        print(json.dumps(out, indent=1))
        return
    # ShapePrior.from_image: nucleus-area KS against the tile's annotated nuclei
    from skimage.measure import regionprops_table

    def areas(lab):
        return regionprops_table(lab.astype(np.int64), properties=("area",))["area"]

    from napari_nucsynth.segment import segment

    default = ShapePrior.default()
    others = None if args.no_loo else {t: load_labels(t) for t in tile_ids()}
    found = {t: segment(img, method="hovernet", device=args.device) for t, img, *_ in data}  # what from_image fits
    by_seed = {}
    for seed in range(args.seed, args.seed + args.prior_seeds):
        ks = []
        for t, img, lab, pts, _ in data:
            real = areas(lab)
            # the bound: the segmenter's own nuclei, which the prior is fitted to, against the annotations
            row = {"tile": t, "segmenter_nuclei": round(float(ks_2samp(areas(found[t]), real).statistic), 4)}
            priors = {"from_image": ShapePrior.from_image(img, segmenter=lambda _im, _t=t: found[_t], seed=seed),
                      "default": default}
            if others is not None:
                priors["leave_one_out"] = ShapePrior.fit_many([v for k, v in others.items() if k != t], seed=seed)
            for name, prior in priors.items():
                syn = areas(sample_masks(pts, lab.shape, prior=prior, seed=seed))
                row[name] = round(float(ks_2samp(syn, real).statistic), 4)
            ks.append(row)
        by_seed[seed] = {"median": {k: round(float(np.median([r[k] for r in ks])), 4) for k in ks[0] if k != "tile"},
                         "per_tile": ks}
    first = by_seed[args.seed]
    out["prior_from_image_ks_area"] = {"median": first["median"], "per_tile": first["per_tile"]}
    if args.prior_seeds > 1:  # the same, drawn again: how much of the figure is the draw
        meds = {k: [b["median"][k] for b in by_seed.values()] for k in first["median"]}
        out["prior_from_image_ks_area"]["over_seeds"] = {
            "seeds": list(by_seed), "median_per_seed": meds,
            "mean_of_medians": {k: round(float(np.mean(v)), 4) for k, v in meds.items()}}
    out["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
