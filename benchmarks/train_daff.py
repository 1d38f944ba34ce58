"""Train DAFF-GAN's points -> masks model on MoNuSeg label maps and/or evaluate it against the shape prior; prints
one JSON object.

    python benchmarks/train_daff.py --split bench --steps 10000 --crop 128 --out bench-out/daff_bench.pt \
        --log bench-out/daff.jsonl --preview-every 1000 --eval
    python benchmarks/train_daff.py --split bench --steps 10000 --crop 128 --resume bench-out/daff_bench.pt \
        --out bench-out/daff_bench.pt --log bench-out/daff.jsonl                # continue a stopped run
    python benchmarks/train_daff.py --split all --steps N --init bench-out/daff_bench.pt --strip \
        --out src/napari_nucsynth/data/models/daff_monuseg.pt
    python benchmarks/train_daff.py --steps 0 --eval --checkpoint bench-out/daff_bench.pt   # evaluate only
    OMP_NUM_THREADS=1 python benchmarks/train_daff.py --steps 0 --time-sample       # the default config, untrained

The points are the centroids of the label maps (the images are loaded only because the training loop takes
pairs; the model never sees them). ``--split bench`` trains on the 24 tiles not in ``_data.SEGMENT_HELDOUT`` and
validates on those 6 every ``--eval-every`` steps: the two-sample KS statistic between the areas of the nuclei
sampled at a tile's real centroids and of its real nuclei (``area_ks``, the issue's target <= 0.15), foreground
Dice and AJI against the real masks, and the share of points with a nucleus. ``--split all`` trains on all 30.
On the GAN core (:mod:`napari_nucsynth.models.gan`): Adam (0, 0.9), TTUR (generator at lr / 2, discriminator at
2 lr with ``--lr`` 2e-4), hinge loss, feature matching 10, L1 to the real maps 10, EMA of the generator, bf16
autocast where the CPU has it. ``--resume`` continues a stopped run; ``--init`` starts from another checkpoint's
weights; ``--strip`` keeps only what sampling needs (the EMA generator).

``--eval`` (after training, or of ``--checkpoint`` with ``--steps 0``) samples masks at the real centroids of
every held-out tile (whole tiles, seed 0) and reports per tile and as medians the area and eccentricity KS of
daff, of the shipped default shape prior (fitted on all 30 tiles, the held-out ones included) and of a prior
fitted on the training tiles only (the fair baseline), with Dice and AJI. ``--time-sample`` times one 256 x 256
and one whole-tile sample on one thread, with the prior sampler as the baseline of the same run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _data import SEGMENT_HELDOUT, load_labels
from _gan_train import add_common_args, clock, load_tiles, parser, pick, run, split_tiles, trained_or_default

KIND = "daff"


def _props(lab):
    import numpy as np
    from skimage.measure import regionprops

    rp = regionprops(lab)
    return np.array([r.area for r in rp], float), np.array([r.eccentricity for r in rp], float)


def evaluate(model, val_tiles: list[str], train_tiles: list[str], seed: int = 0) -> dict:
    """Area and eccentricity KS, Dice and AJI of daff and of the two shape priors at real centroids."""
    import numpy as np
    from scipy.stats import ks_2samp

    from napari_nucsynth.masks import ShapePrior, sample_masks
    from napari_nucsynth.metrics import instance_metrics
    from napari_nucsynth.models.daff import sample
    from napari_nucsynth.points import centroids

    fitted = ShapePrior.fit_many([load_labels(t) for t in train_tiles], seed=seed) if train_tiles else None
    methods = {"daff": lambda p, s: sample(model, p, s, seed=seed),
               "prior_default": lambda p, s: sample_masks(p, s, seed=seed)}
    if fitted is not None:
        methods["prior_train_tiles"] = lambda p, s: sample_masks(p, s, prior=fitted, seed=seed)
    rows = []
    for t in val_tiles:
        lab = load_labels(t)
        pts = centroids(lab)
        ra, re = _props(lab)
        row = {"tile": t, "nuclei": len(pts)}
        for name, fn in methods.items():
            t0 = time.perf_counter()
            syn = fn(pts, lab.shape)
            row[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
            sa, se = _props(syn)
            row[f"{name}_ks_area"] = float(ks_2samp(sa, ra).statistic)
            row[f"{name}_ks_eccentricity"] = float(ks_2samp(se, re).statistic)
            m = instance_metrics(lab, syn)
            row[f"{name}_dice"], row[f"{name}_aji"] = float(m["dice"]), float(m["aji"])
            row[f"{name}_with_nucleus"] = float(np.isin(np.arange(1, len(pts) + 1), syn).mean())
        rows.append(row)
    keys = [k for k in rows[0] if k not in ("tile", "nuclei")] if rows else []
    return {"per_tile": rows, "median": {k: float(np.median([r[k] for r in rows])) for k in keys},
            "target_ks_area": 0.15}


def time_sample(model, repeats: int) -> dict:
    import torch

    from napari_nucsynth.masks import sample_masks
    from napari_nucsynth.models.daff import sample
    from napari_nucsynth.points import centroids

    torch.set_num_threads(1)
    model = model.cpu().eval()
    lab = load_labels(SEGMENT_HELDOUT[0])
    crop = lab[:256, :256]
    pc, pf = centroids(crop), centroids(lab)

    def median(fn, n):
        return round(clock(fn, n, warmup=1).median, 4)

    return {"daff_256_median_s": median(lambda: sample(model, pc, crop.shape, seed=0), repeats),
            "prior_256_median_s": median(lambda: sample_masks(pc, crop.shape, seed=0), repeats),
            "daff_tile_median_s": median(lambda: sample(model, pf, lab.shape, seed=0), max(2, repeats // 4)),
            "prior_tile_median_s": median(lambda: sample_masks(pf, lab.shape, seed=0), max(2, repeats // 4)),
            "tile_shape": list(lab.shape), "tile_nuclei": len(pf), "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "params_generator": sum(p.numel() for p in model.inference("generator").parameters())}


def main() -> None:
    ap = parser(__doc__)
    add_common_args(ap, steps=10000, crop=128, preview_dir="bench-out/daff_previews",
                    steps_help="0: no training (evaluate or time --checkpoint, or the default config untrained)",
                    lr_help="the core's --lr (default 2e-4): G at lr/2, D at 2 lr",
                    config_help="JSON overrides of the daff config, e.g. '{\"ngf\": 12}'",
                    out_help="the checkpoint to write (required unless --steps 0)",
                    preview_help="write a preview PNG (real | sampled) every N steps",
                    strip_help="at the end, keep only what sampling needs (no optimiser, random state, "
                               "discriminator)",
                    before={"--eval-every": lambda ap: ap.add_argument(
                        "--checkpoint", help="with --steps 0: the model to evaluate or time")})
    ap.add_argument("--eval", action="store_true", help="compare with the shape priors on the held-out tiles")
    ap.add_argument("--time-sample", action="store_true", help="time sampling on one thread")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()

    from napari_nucsynth.models.daff import load_model

    train_tiles, val = split_tiles(args.split)
    result: dict = {"kind": KIND, "split": args.split}
    t0 = time.perf_counter()
    model = None
    if args.steps > 0:
        if not args.out:
            ap.error("--out is required when training")
        imgs, labs = load_tiles(train_tiles)
        v_imgs, v_labs = load_tiles(val)
        out = run(KIND, args, imgs, labs, v_imgs, v_labs, config=json.loads(args.config), tiles=train_tiles,
                  val_tiles=val, dataset="MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0): label maps, points = "
                                         "their centroids")
        result.update(pick(out, "checkpoint step stopped metrics train_seconds steps_per_s checkpoint_mb"))
    if args.eval or args.time_sample:
        model, path = trained_or_default(KIND, args, load_model, args.checkpoint)
        result["evaluated"] = str(path) if path else "default config, untrained"
    if args.eval:
        result["eval"] = evaluate(model, val or SEGMENT_HELDOUT, train_tiles if val else [], seed=args.seed)
    if args.time_sample:
        result["timing"] = time_sample(model, args.repeats)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
