"""Fit the default shape prior on the MoNuSeg training tiles and write it into the package.

    python benchmarks/fit_default_prior.py [--out src/napari_nucsynth/data/default_shape_prior.json]

Prints one JSON object: the fitted numbers, the tiles used and the time taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _data import REPO, load_labels, tile_ids  # noqa: E402

from napari_nucsynth.masks import ShapePrior  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(REPO / "src/napari_nucsynth/data/default_shape_prior.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tiles = tile_ids()
    t0 = time.perf_counter()
    prior = ShapePrior.fit_many(
        [load_labels(t) for t in tiles],
        seed=args.seed,
        source=f"MoNuSeg 2018 training tiles ({len(tiles)}), Kumar et al. IEEE TMI 2017/2020, CC BY-NC-SA 4.0; "
        f"python benchmarks/fit_default_prior.py --seed {args.seed}",
    )
    prior.save(args.out)
    p = prior.pooled
    print(json.dumps({
        "out": args.out, "tiles": len(tiles), "seconds": round(time.perf_counter() - t0, 2),
        "intercept": p.intercept, "slope_local": p.slope_local, "slope_global": p.slope_global,
        "sigma": p.sigma, "irregularity": p.irregularity,
    }, indent=1))


if __name__ == "__main__":
    main()
