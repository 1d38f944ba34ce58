"""Benchmark of the classic renderer on the MoNuSeg training tiles; prints one JSON object.

    python benchmarks/bench_render.py [--pairs N] [--seed S] [--figure docs/images/render_side_by_side.png]

Tile i's real label map is rendered in the style of tile i+1 (with the style tile's labels), for N pairs.

- speed: seconds per 1000 x 1000 render on one thread (target <= 1 s): "cold" is the first render in a new
  style (the reference's analysis included: nuclei, texture field, inpainted background), best of 2 with the
  renderer's reference cache cleared; "warm" is a further render in the same style (what live mode re-renders
  cost), best of 2.
- mask alignment: Otsu threshold of the haematoxylin channel of the render vs the input labels' foreground,
  pixel F1 (target >= 0.85), beside the same measure on the real tile i with its own labels, and on the style
  tile with its labels (a pale-nucleus style gives a low figure to its renders too: their correlation is printed).
- stain match: mean optical density of nuclei and of background in each HED channel, render vs style tile;
  the largest relative difference (target <= 10 %).
- realism: C2ST (napari_nucsynth.metrics.c2st) of rendered against real tiles (the real tiles i), grouped by
  tile; held-out accuracy, 0.5 = indistinguishable, over --c2st-seeds seeds (mean, min, max: one run's figure
  moves by more than its binomial interval). The classic renderer's figure is the baseline.
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
from _data import REPO, load_image, load_labels, tile_ids

from napari_nucsynth import presynthesis
from napari_nucsynth.metrics import pixel_f1
from napari_nucsynth.render import render
from napari_nucsynth.stain import rgb_to_hed


def otsu_h(image) -> np.ndarray:
    from skimage.filters import threshold_otsu

    h = rgb_to_hed(image)[..., 0]
    return (h > threshold_otsu(h)).astype(np.uint8)


def stain_means(image, labels) -> np.ndarray:
    hed = rgb_to_hed(image)
    fg = labels > 0
    return np.stack([hed[fg].mean(0), hed[~fg].mean(0)])  # (nuclei, background) x (H, E, D)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--c2st-seeds", type=int, default=5, help="C2ST repeats (seeds seed .. seed+N-1)")
    ap.add_argument("--figure", default=str(REPO / "docs" / "images" / "render_side_by_side.png"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    tiles = tile_ids()
    n = min(args.pairs, len(tiles))
    rows, reals, fakes = [], [], []
    warm = load_labels(tiles[0])
    render(warm, load_image(tiles[1]), seed=0)  # imports and caches
    for i in range(n):
        t, s = tiles[i], tiles[(i + 1) % len(tiles)]
        lab, real = load_labels(t), load_image(t)
        style, style_lab = load_image(s), load_labels(s)
        cold, warm = [], []
        for r in range(2):
            presynthesis._CACHE.clear()
            t0 = time.perf_counter()
            out = render(lab, style, style_labels=style_lab, seed=args.seed)
            cold.append(time.perf_counter() - t0)
        for r in range(2):
            t0 = time.perf_counter()
            render(lab, style, style_labels=style_lab, seed=args.seed + 1 + r)
            warm.append(time.perf_counter() - t0)
        sm_out, sm_ref = stain_means(out, lab), stain_means(style, style_lab)
        rel = np.abs(sm_out - sm_ref) / np.maximum(np.abs(sm_ref), 1e-6)
        rows.append({
            "tile": t, "style": s, "cold_s": min(cold), "warm_s": min(warm),
            "pixel_f1_render": pixel_f1((lab > 0).astype(np.uint8), otsu_h(out)),
            "pixel_f1_real": pixel_f1((lab > 0).astype(np.uint8), otsu_h(real)),
            "pixel_f1_style": pixel_f1((style_lab > 0).astype(np.uint8), otsu_h(style)),
            "stain_rel_diff_max": float(rel[:, :2].max()),  # H and E (DAB is ~0 in H&E)
            "stain_rel_diff": rel.round(4).tolist(),
        })
        reals.append(real)
        fakes.append(out)
    from napari_nucsynth.metrics import c2st

    groups = list(range(n))
    # the classifier's own training varies: report C2ST over several seeds (split and initialisation)
    runs = [c2st(reals, fakes, seed=args.seed + k, real_groups=groups, fake_groups=groups) for k in range(args.c2st_seeds)]
    accs = [r.accuracy for r in runs]
    # figure: real | render for the first two pairs (400 x 400 crops)
    import imageio.v3 as iio

    gap = np.full((400, 8, 3), 255, np.uint8)
    strips = [np.concatenate([load_image(tiles[(i + 1) % len(tiles)])[:400, :400], gap, reals[i][:400, :400], gap,
                              fakes[i][:400, :400]], 1) for i in range(min(2, n))]
    fig = np.concatenate([s for pair in zip(strips, [np.full((8, strips[0].shape[1], 3), 255, np.uint8)] * len(strips))
                          for s in pair][:-1], 0)
    iio.imwrite(args.figure, fig)

    def med(k):
        return float(np.median([r[k] for r in rows]))

    print(json.dumps({
        "benchmark": "render (classic)", "pairs": n,
        "speed": {"median_cold_s": med("cold_s"), "worst_cold_s": float(max(r["cold_s"] for r in rows)),
                  "median_warm_s": med("warm_s"), "target_s": 1.0},
        "mask_alignment": {"median_pixel_f1_render": med("pixel_f1_render"),
                           "median_pixel_f1_real": med("pixel_f1_real"),
                           "worst_pixel_f1_render": float(min(r["pixel_f1_render"] for r in rows)),
                           "corr_render_vs_style_own": float(np.corrcoef([r["pixel_f1_render"] for r in rows],
                                                                         [r["pixel_f1_style"] for r in rows])[0, 1]),
                           "target": 0.85},
        "stain_match": {"median_max_rel_diff_HE": med("stain_rel_diff_max"),
                        "worst_max_rel_diff_HE": float(max(r["stain_rel_diff_max"] for r in rows)),
                        "target": 0.10},
        "realism_c2st": {"accuracy_mean": float(np.mean(accs)), "accuracy_min": min(accs), "accuracy_max": max(accs),
                         "accuracies": accs, "p_values": [r.p_value for r in runs], "n_test": runs[0].n_test,
                         "extractor": "none (a CNN trained from scratch)"},
        "figure": str(Path(args.figure).relative_to(REPO)) if Path(args.figure).is_relative_to(REPO) else args.figure,
        "figure_columns": "style tile | real tile | render of the real tile's labels in the style",
        "per_pair": rows, "seconds": round(time.perf_counter() - t_start, 1),
    }, indent=1))


if __name__ == "__main__":
    main()
