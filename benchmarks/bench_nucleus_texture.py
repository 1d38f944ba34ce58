"""How the nuclei of synthetic pairs differ from real ones in haematoxylin: contrast, inner texture and the dark rim
of vesicular nuclei (issue 19's question why synthetic pairs cost the segmenter on the held-out prostate tile).

    python benchmarks/bench_nucleus_texture.py [--synthetic bench-out/headline/synthetic_E_seed0.npz ...]
        [--edge-sigmas 0.8 0.01] [--every 3] [--recipes N] [--sian N]

Per nucleus of at least 20 px, in the haematoxylin channel (``stain.rgb_to_hed``):

* ``contrast``: the nucleus's mean density minus the mean density of the tile's background (its label-0 pixels);
* ``sd``: the standard deviation of the density inside the nucleus (chromatin texture);
* ``rim_minus_core``: the mean density of the nucleus's outer 2 px (distance to its boundary, instances separated
  by their boundaries) minus that of its pixels more than 3 px inside (nuclei with at least 10 px of each).
  Positive: the rim is darker than the centre, as in a vesicular nucleus with its chromatin at the membrane.

Sets: the 24 training tiles of the benchmark split (``_data.SEGMENT_HELDOUT`` left out), each held-out tile alone,
each ``--synthetic`` file under its stem (``imageK`` / ``labelsK`` arrays, as ``headline.py`` keeps an arm's
synthetic pairs), and for each ``--edge-sigmas`` value the classic renderer's render of every ``--every``-th
training tile's own masks (its top-left 512 x 512) in its own style, with the renderer's ``edge_sigma`` option set
to that value (0.8 is the default), beside the same real crops (``real_same_crops``): a paired comparison of the
renderer against the real tiles it copies. With ``--recipes N``, the first N synthetic pairs (1000 x 1000, seed 0:
pair i depends on (seed, i) only, so these are the first N pairs of the arm) of arm E's recipe
(``headline.py``: layouts and prior from the 3 contoured tiles, classic renders in the styles of all 24 tiles, only
the 3 with labels) and of the same recipe with all 24 style tiles' labels given (textures from annotated nuclei
instead of the nuclei the renderer detects), at each ``--edge-sigmas`` value; with ``--sian N``, the first N pairs
of arm B's recipe (sian, the shipped model). "pale" is a contrast below the 24 training tiles' 25th percentile.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _data import SEGMENT_HELDOUT, load_image, load_labels, tile_ids


def nucleus_stats(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-nucleus ``contrast`` and ``sd`` (nuclei >= 20 px) and ``rim_minus_core`` (see the module docstring)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    from napari_nucsynth.stain import rgb_to_hed

    h = rgb_to_hed(np.asarray(image)[..., :3])[..., 0].astype(np.float64).ravel()
    lab = np.asarray(labels)
    k = lab.ravel().astype(np.int64)
    n = int(k.max()) + 1

    def means(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.bincount(k[mask], minlength=n)
        return np.bincount(k[mask], weights=h[mask], minlength=n) / np.maximum(a, 1), a

    fg = k > 0
    mean, area = means(fg)
    sq = np.bincount(k[fg], weights=h[fg] ** 2, minlength=n) / np.maximum(area, 1)
    sd = np.sqrt(np.maximum(sq - mean**2, 0.0))
    background = float(h[~fg].mean()) if (~fg).any() else 0.0
    ok = area[1:] >= 20
    inner = (lab > 0) & ~find_boundaries(lab, mode="inner")
    dist = (ndi.distance_transform_edt(inner) + (lab > 0)).ravel()
    rim, n_rim = means(fg & (dist <= 2))
    core, n_core = means(fg & (dist > 3))
    ok_rc = (n_rim[1:] >= 10) & (n_core[1:] >= 10)
    return {"contrast": (mean[1:] - background)[ok], "sd": sd[1:][ok], "rim_minus_core": (rim - core)[1:][ok_rc]}


def summary(stats: list[dict[str, np.ndarray]], pale_below: float) -> dict:
    c = np.concatenate([s["contrast"] for s in stats])
    sd = np.concatenate([s["sd"] for s in stats])
    rc = np.concatenate([s["rim_minus_core"] for s in stats])
    return {"nuclei": int(c.size), "contrast_median": round(float(np.median(c)), 4),
            "pale_fraction": round(float(np.mean(c < pale_below)), 3), "sd_median": round(float(np.median(sd)), 4),
            "rim_darker_fraction": round(float(np.mean(rc > 0)), 3),
            "rim_minus_core_median": round(float(np.median(rc)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", nargs="*", default=[], help="npz files of synthetic pairs (imageK, labelsK)")
    ap.add_argument("--edge-sigmas", type=float, nargs="*", default=[0.8],
                    help="classic renders of the training tiles' own masks with these edge_sigma values")
    ap.add_argument("--every", type=int, default=3, help="render every N-th training tile (default 3)")
    ap.add_argument("--recipes", type=int, default=0, help="pairs of arm E's recipe (and all styles labelled)")
    ap.add_argument("--sian", type=int, default=0, help="pairs of arm B's recipe (sian)")
    args = ap.parse_args()

    from napari_nucsynth.render import render

    train = [t for t in tile_ids() if t not in SEGMENT_HELDOUT]
    real = {t: nucleus_stats(load_image(t), load_labels(t)) for t in train}
    pale_below = float(np.percentile(np.concatenate([s["contrast"] for s in real.values()]), 25))
    sets: dict[str, list] = {"real_training_24": list(real.values())}
    for t in SEGMENT_HELDOUT:
        sets[f"heldout_{t}"] = [nucleus_stats(load_image(t), load_labels(t))]
    for f in args.synthetic:
        with np.load(f) as d:
            n = len([k for k in d.files if k.startswith("image")])
            sets[Path(f).stem] = [nucleus_stats(d[f"image{i}"], d[f"labels{i}"]) for i in range(n)]
    rendered = train[:: args.every]
    tiles = [(load_image(t), load_labels(t)) for t in rendered]
    sets["real_same_crops"] = [nucleus_stats(img[:512, :512], lab[:512, :512]) for img, lab in tiles]
    for s in args.edge_sigmas:
        sets[f"classic_own_masks_edge_sigma_{s:g}"] = [
            nucleus_stats(render(lab[:512, :512], img, style_labels=lab, method="classic", seed=0,
                                 options={"edge_sigma": s}), lab[:512, :512])
            for img, lab in tiles]
    if args.recipes or args.sian:
        from headline import B_RENDERER, FEW_TILES

        from napari_nucsynth.generate import synthetic_pairs

        imgs, labs = [load_image(t) for t in train], [load_labels(t) for t in train]
        few = [i for i, t in enumerate(train) if t in FEW_TILES]
        recipes = {"E_recipe": [labs[i] if i in few else None for i in range(len(labs))],
                   "E_recipe_all_styles_labelled": labs}
        for name, style_labels in recipes.items() if args.recipes else ():
            for s in args.edge_sigmas:
                si, sl = synthetic_pairs(args.recipes, 1000, imgs, style_labels=style_labels,
                                         fit_labels=[labs[i] for i in few], layouts="mixed", method="classic",
                                         seed=0, options={"edge_sigma": s})
                sets[f"{name}_edge_sigma_{s:g}_{args.recipes}_pairs"] = [nucleus_stats(a, b) for a, b in zip(si, sl)]
        if args.sian:
            si, sl = synthetic_pairs(args.sian, 1000, imgs, style_labels=labs, fit_labels=labs, layouts="mixed",
                                     method=B_RENDERER, seed=0)
            sets[f"B_recipe_{B_RENDERER}_{args.sian}_pairs"] = [nucleus_stats(a, b) for a, b in zip(si, sl)]
    print(json.dumps({"benchmark": "nucleus texture (issue 19)", "pale_below_contrast": round(pale_below, 4),
                      "rendered_tiles": rendered,
                      "sets": {k: summary(v, pale_below) for k, v in sets.items()}}, indent=1))


if __name__ == "__main__":
    main()
