"""How much of a tile's nucleus sizes its centroids can tell: the limit behind daff's area target (issue 21).

    python benchmarks/bench_area_limits.py [--draws 20] [--seed 0]

Issue 21 asks for masks at a held-out tile's real centroids whose nucleus-area distribution matches the tile's
real one (two-sample KS <= 0.15). Every points -> masks model draws each nucleus's area from what the points show.
This benchmark measures, on the 6 held-out tiles of the benchmark split (``_data.SEGMENT_HELDOUT``; the models
fitted on the other 24), how far three area models get, each drawing ``log(area) = prediction + Normal(0, sigma)``
at every real centroid (areas as drawn, before rasterisation; the KS of each tile averaged over ``--draws``
draws):

* ``prior``: the shape prior's area model (``masks.ShapePrior``: the nucleus's nearest-neighbour distance and
  the tile's packing, a hierarchical linear fit), fitted on the 24 tiles;
* ``ridge``: a ridge regression on 19 features of each point and its tile (log distances to the 6 nearest
  neighbours, point counts within 16-64 px, the tile's nearest-neighbour percentiles, count and mean counts),
  its penalty chosen by leave-one-tile-out cross-validation on the 24 tiles (the held-out tiles choose nothing);
* ``oracle_tile_mean``: the prior's draws shifted so that their mean equals the tile's *real* mean log area.
  It uses the answer and is not a model: it says what a model that knew each tile's typical nucleus size would
  reach, so that the gap between it and the others is the part no model can close without that knowledge.

Also reported: how well the tile's mean log area is predicted from its points (leave-one-tile-out RMSE over the
24 tiles, with the prior's packing feature alone and with all tile features), beside the spread of the tile means.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from scipy.stats import ks_2samp

sys.path.insert(0, str(Path(__file__).parent))
from _data import SEGMENT_HELDOUT, load_labels, organ, tile_ids  # noqa: E402

from napari_nucsynth import masks as M  # noqa: E402

RADII = (16, 24, 32, 48, 64)
LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
TARGET = 0.15


def _point_features(table: dict) -> np.ndarray:
    """Per point: log distances to the 6 nearest neighbours and log(1 + count) within each radius; then the
    tile's features (log NN percentiles 10-90, log count, mean of the counts) repeated on every point."""
    pts = table["points"]
    tree = cKDTree(pts)
    d, _ = tree.query(pts, k=7)
    log_nn = np.log(np.maximum(d[:, 1:], 0.5))
    counts = np.stack([np.array([len(x) for x in tree.query_ball_point(pts, r)]) for r in RADII], 1)
    counts = np.log1p(counts)
    tile = np.r_[np.percentile(log_nn[:, 0], [10, 25, 50, 75, 90]), np.log(len(pts)), counts.mean(0)]
    return np.c_[log_nn, counts, np.repeat(tile[None], len(pts), 0)]


def _tile_features(table: dict) -> np.ndarray:
    return _point_features(table)[0, 11:]


class _Ridge:
    def __init__(self, X: np.ndarray, y: np.ndarray, lam: float):
        self.mu, self.sd = X.mean(0), X.std(0) + 1e-9
        Z = (X - self.mu) / self.sd
        self.b = float(y.mean())
        self.w = np.linalg.solve(Z.T @ Z + lam * np.eye(Z.shape[1]), Z.T @ (y - self.b))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mu) / self.sd @ self.w + self.b


def _within_sd(resid: list[np.ndarray]) -> float:
    return float(np.sqrt(np.mean(np.concatenate([(r - r.mean()) ** 2 for r in resid]))))


def run(draws: int = 20, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    held = list(SEGMENT_HELDOUT)
    train = [t for t in tile_ids() if t not in held]
    tabs = {t: M._nucleus_table(load_labels(t), None) for t in train + held}
    feats = {t: _point_features(tabs[t]) for t in tabs}
    log_area = {t: np.log(tabs[t]["area"]) for t in tabs}

    # the prior's area model, fitted on the 24 tiles
    cp = M._fit_class([tabs[t] for t in train], None)

    def prior_mean(t: str) -> np.ndarray:
        tb = tabs[t]
        g = M._global_g(tb["log_nn"], cp.g_ref)
        return cp.mean_log_area(np.nan_to_num(tb["log_nn"], nan=cp.g_ref), g)

    # ridge: penalty by leave-one-tile-out on the 24 training tiles
    def fit_ridge(tiles: list[str], lam: float) -> _Ridge:
        return _Ridge(np.concatenate([feats[t] for t in tiles]), np.concatenate([log_area[t] for t in tiles]), lam)

    cv = {}
    for lam in LAMBDAS:
        err = []
        for t in train:
            f = fit_ridge([u for u in train if u != t], lam)
            err.append(np.mean(f(feats[t])) - np.mean(log_area[t]))
        cv[lam] = float(np.sqrt(np.mean(np.square(err))))
    lam = min(cv, key=cv.get)
    ridge = fit_ridge(train, lam)
    ridge_sigma = _within_sd([log_area[t] - ridge(feats[t]) for t in train])

    rng = np.random.default_rng(seed)
    models = {
        "prior": (prior_mean, cp.sigma, False),
        "ridge": (lambda t: ridge(feats[t]), ridge_sigma, False),
        "oracle_tile_mean": (prior_mean, cp.sigma, True),
    }
    per_tile: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    for name, (mean_fn, sigma, oracle) in models.items():
        ks_tiles = []
        for t in held:
            mu = mean_fn(t)
            real = log_area[t]
            ks = []
            for _ in range(draws):
                la = mu + rng.normal(0.0, sigma, len(mu))
                if oracle:
                    la = la - la.mean() + real.mean()
                ks.append(ks_2samp(la, real).statistic)
            ks_tiles.append(float(np.mean(ks)))
            per_tile.setdefault(t, {"organ": organ(t), "n": int(len(real))})[name] = round(ks_tiles[-1], 4)
        summary[name] = {
            "median_ks": round(float(np.median(ks_tiles)), 4),
            "mean_ks": round(float(np.mean(ks_tiles)), 4),
            "sigma": round(float(sigma), 4),
            "meets_target": bool(np.median(ks_tiles) <= TARGET),
        }

    # the tile's typical size from its points: leave-one-tile-out on the 24 tiles
    y = np.array([log_area[t].mean() for t in train])
    X = np.array([_tile_features(tabs[t]) for t in train])
    tile_level = {"sd_of_tile_means": round(float(y.std()), 4)}
    for name, cols in (("packing_g10", [0]), ("all_tile_features", list(range(X.shape[1])))):
        best = None
        for lam_t in LAMBDAS[:4]:
            err = []
            for i in range(len(train)):
                keep = np.arange(len(train)) != i
                err.append(_Ridge(X[keep][:, cols], y[keep], lam_t)(X[i : i + 1, cols])[0] - y[i])
            rmse = float(np.sqrt(np.mean(np.square(err))))
            best = rmse if best is None else min(best, rmse)
        tile_level[f"loo_rmse_{name}"] = round(best, 4)

    return {
        "benchmark": "area_limits",
        "what": "KS of drawn nucleus areas vs the real ones at a held-out tile's real centroids (areas as drawn, "
        "before rasterisation), per tile averaged over draws; models fitted on the 24 other tiles",
        "target_median_ks": TARGET,
        "draws": draws,
        "seed": seed,
        "ridge_lambda": lam,
        "ridge_cv_rmse_tile_mean": {str(k): round(v, 4) for k, v in cv.items()},
        "summary": summary,
        "tile_mean_log_area_from_points": tile_level,
        "per_tile": per_tile,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(json.dumps(run(a.draws, a.seed), indent=1))


if __name__ == "__main__":
    main()
