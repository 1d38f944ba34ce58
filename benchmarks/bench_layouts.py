"""Realism of random nucleus layouts against the real centroids of the MoNuSeg training tiles.

    python benchmarks/bench_layouts.py [--realisations 5] [--seed 0]
    python benchmarks/bench_layouts.py --write-default   # refit src/napari_nucsynth/data/default_point_process.json

Per tile: fit :func:`napari_nucsynth.points.fit_point_process` on the tile's label map, draw ``realisations``
layouts of each process (``n`` drawn from the fitted intensity, as ``random_points`` does by default), pool them,
and compare with the tile's real centroids by the two-sample Kolmogorov-Smirnov statistic of

* nearest-neighbour distances, and
* counts of points in sliding 256 x 256 windows (stride 64, last window aligned with the border: 13 x 13 = 169
  windows per 1000 x 1000 tile).

Also reported: the same with ``n`` fixed to the tile's count, and a noise floor: the KS statistic of the cluster
model's pooled realisations against one more independent realisation of the same fitted model (what a perfect
model would score, since the real tile is a single realisation with strongly overlapping windows).

Prints one JSON object: metric definitions, per-process medians over the tiles, per-tile values, timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import ks_2samp

sys.path.insert(0, str(Path(__file__).parent))
from _data import REPO, load_labels, monuseg_dir, tile_ids  # noqa: E402

from napari_nucsynth.points import (  # noqa: E402
    PROCESSES,
    PointProcessParams,
    centroids,
    fit_point_process,
    nearest_neighbour_distances,
    random_points,
    window_counts,
)

WINDOW, STRIDE, TARGET = 256, 64, 0.15
DEFAULT_OUT = REPO / "src" / "napari_nucsynth" / "data" / "default_point_process.json"


def _ks(model_layouts: list[np.ndarray], real: np.ndarray, shape) -> tuple[float, float]:
    nn_m = np.concatenate([nearest_neighbour_distances(p) for p in model_layouts])
    wc_m = np.concatenate([window_counts(p, shape, WINDOW, STRIDE) for p in model_layouts])
    ks_nn = ks_2samp(nn_m, nearest_neighbour_distances(real)).statistic
    ks_wc = ks_2samp(wc_m, window_counts(real, shape, WINDOW, STRIDE)).statistic
    return round(float(ks_nn), 4), round(float(ks_wc), 4)


def layout_realism(root: Path | None = None, realisations: int = 5, seed: int = 0) -> dict:
    """Per-tile fit, ``realisations`` draws per process, KS statistics against the real centroids.

    Returns
    -------
    dict
        ``metric`` (definitions), ``median`` / ``median_n_fixed`` / ``noise_floor_median`` (per process:
        ``ks_nn``, ``ks_counts``), ``meets_target``, ``per_tile``, ``seconds``.
    """
    root = Path(root) if root is not None else monuseg_dir()
    tiles = tile_ids(root)
    t_start = time.perf_counter()
    per_tile: dict[str, dict] = {}
    fit_s, draw_s, n_draws = 0.0, 0.0, 0
    for ti, tile in enumerate(tiles):
        labels = load_labels(tile, root)
        shape = labels.shape
        real = centroids(labels)
        t0 = time.perf_counter()
        params = fit_point_process(labels)
        fit_s += time.perf_counter() - t0
        row: dict = {"n": len(real), "params": {k: v for k, v in params.to_dict().items() if k != "source"}}
        for pi, process in enumerate(PROCESSES):
            rng = np.random.default_rng([seed, ti, pi])
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a short layout would bias the benchmark
                drawn = [random_points(shape, process=process, params=params, seed=rng) for _ in range(realisations)]
                fixed = [
                    random_points(shape, process=process, params=params, n=len(real), seed=rng)
                    for _ in range(realisations)
                ]
                extra = random_points(shape, process=process, params=params, seed=rng)
            draw_s += time.perf_counter() - t0
            n_draws += 2 * realisations + 1
            ks_nn, ks_wc = _ks(drawn, real, shape)
            fx_nn, fx_wc = _ks(fixed, real, shape)
            fl_nn, fl_wc = _ks(drawn, extra, shape)
            row[process] = {
                "ks_nn": ks_nn,
                "ks_counts": ks_wc,
                "n_fixed": {"ks_nn": fx_nn, "ks_counts": fx_wc},
                "noise_floor": {"ks_nn": fl_nn, "ks_counts": fl_wc},
            }
        per_tile[tile] = row

    def med(get) -> dict:
        return {
            p: {
                k: round(float(np.median([get(r[p])[k] for r in per_tile.values()])), 4)
                for k in ("ks_nn", "ks_counts")
            }
            for p in PROCESSES
        }

    median = med(lambda r: r)
    return {
        "benchmark": "layout_realism",
        "data": f"MoNuSeg 2018 training tiles ({len(tiles)})",
        "metric": {
            "ks_nn": "two-sample Kolmogorov-Smirnov statistic (scipy.stats.ks_2samp) between the nearest-neighbour "
            "distances of the pooled random layouts and of the tile's real centroids",
            "ks_counts": f"the same for the number of points in sliding {WINDOW}x{WINDOW} windows, stride {STRIDE} "
            "(last window aligned with the border; 169 windows per 1000x1000 tile)",
            "protocol": f"per tile: fit_point_process(labels); {realisations} layouts per process with n drawn "
            "from the fitted intensity (random_points default), pooled; median over tiles",
            "median_n_fixed": "the same with n fixed to the tile's nucleus count",
            "noise_floor_median": "KS of the pooled layouts against one more independent layout of the same fitted "
            "model with n drawn: the score of a perfect model",
            "target": f"median <= {TARGET} for the fitted (cluster) process",
        },
        "realisations": realisations,
        "seed": seed,
        "median": median,
        "median_n_fixed": med(lambda r: r["n_fixed"]),
        "noise_floor_median": med(lambda r: r["noise_floor"]),
        "meets_target": {p: bool(max(v.values()) <= TARGET) for p, v in median.items()},
        "seconds": {
            "total": round(time.perf_counter() - t_start, 2),
            "fit_per_tile": round(fit_s / len(tiles), 3),
            "random_points_ms_per_layout": round(1e3 * draw_s / max(n_draws, 1), 2),
        },
        "per_tile": per_tile,
    }


def fit_default(root: Path | None = None) -> PointProcessParams:
    """The package default: per-tile fits pooled as documented in ``default_point_process``.

    Intensity = all nuclei / all pixels; min_distance = median over tiles; cluster_sigma = median over the tiles
    found clustered; mean cluster size = median over all tiles (unclustered tiles count as 0.01, the fit's
    "no clustering" value), parent_intensity = intensity / that.
    """
    root = Path(root) if root is not None else monuseg_dir()
    tiles = tile_ids(root)
    fits, n_total, area = [], 0, 0
    for tile in tiles:
        labels = load_labels(tile, root)
        fits.append(fit_point_process(labels))
        n_total += len(centroids(labels))
        area += labels.size
    lam = n_total / area
    clustered = [f for f in fits if f.clustered]
    sigma = float(np.median([f.cluster_sigma for f in clustered])) if clustered else 50.0
    size = float(np.median([f.mean_cluster_size for f in fits]))
    return PointProcessParams(
        intensity=lam,
        min_distance=float(np.median([f.min_distance for f in fits])),
        cluster_sigma=sigma,
        parent_intensity=lam / size,
        source=f"MoNuSeg 2018 training tiles ({len(tiles)}; {len(clustered)} clustered), Kumar et al. IEEE TMI "
        "2017/2020, CC BY-NC-SA 4.0; python benchmarks/bench_layouts.py --write-default",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realisations", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-default", action="store_true", help="refit and write the package's default parameters")
    args = ap.parse_args()
    if args.write_default:
        t0 = time.perf_counter()
        params = fit_default()
        params.save(DEFAULT_OUT)
        print(json.dumps({"out": str(DEFAULT_OUT), **params.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}))
        return
    print(json.dumps(layout_realism(realisations=args.realisations, seed=args.seed)))


if __name__ == "__main__":
    main()
