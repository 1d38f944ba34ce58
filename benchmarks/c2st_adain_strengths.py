"""C2ST of adain's renders at several refinement strengths on the held-out tiles, with many C2ST seeds; prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/c2st_adain_strengths.py [--checkpoint CKPT] [--strengths 0 0.5 1] [--seeds 10]

The renders are ``bench_generators.py``'s (each held-out tile's real masks in the style of the next two held-out
tiles, seeds ``seed + j``); strength 0 is the classic render itself (tested bit for bit), so it is the classic
row. ``bench_generators.py`` runs three C2ST seeds, whose accuracies for one set of renders spread by up to 0.2
here; this script measures only the realism (C2ST, ``napari_nucsynth.metrics.c2st``) but with ``--seeds`` seeds
(0..N-1, the same for every strength), and reports mean, standard deviation and standard error, so the difference
between strengths can be read against its noise. Mask fidelity does not need it (one segmentation per render).
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
from _data import SEGMENT_HELDOUT, load_image, load_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="adain checkpoint (default: the shipped one)")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="the renders' base seed (bench_generators.py's --seed)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from napari_nucsynth.metrics import c2st
    from napari_nucsynth.render import get_renderer

    t0 = time.perf_counter()
    tiles = list(SEGMENT_HELDOUT)
    reals = {t: load_image(t) for t in tiles}
    labs = {t: load_labels(t) for t in tiles}
    jobs = [(t, tiles[(i + k) % len(tiles)]) for i, t in enumerate(tiles) for k in (1, 2)]
    groups = [tiles.index(t) for t, _ in jobs]
    adain = get_renderer("adain")
    rows = []
    for s in args.strengths:
        fakes = [adain(labs[t], reals[r], style_labels=labs[r], seed=args.seed + j, device="cpu",
                       checkpoint=args.checkpoint, strength=s) for j, (t, r) in enumerate(jobs)]
        accs = [c2st([reals[t] for t in tiles], fakes, seed=k, real_groups=list(range(len(tiles))),
                     fake_groups=groups).accuracy for k in range(args.seeds)]
        rows.append({"strength": s, "c2st_mean": float(np.mean(accs)), "c2st_sd": float(np.std(accs, ddof=1)),
                     "c2st_se": float(np.std(accs, ddof=1) / np.sqrt(len(accs))),
                     "c2st_accuracies": [round(float(a), 4) for a in accs]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "adain C2ST by refinement strength (held-out tiles)", "tiles": tiles,
                      "renders_per_strength": len(jobs), "c2st_seeds": args.seeds,
                      "checkpoint": args.checkpoint or "shipped", "rows": rows,
                      "seconds": round(time.perf_counter() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
