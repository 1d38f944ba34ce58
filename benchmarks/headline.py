"""The headline experiment (issue 19): does the project's own synthetic data make a better nuclei segmenter, and do
clicks alone nearly match contours? Prints one JSON table.

    OMP_NUM_THREADS=2 python benchmarks/headline.py --out bench-out/headline [--arms A,B,C,D,E] [--threads 2]

Every arm trains the same network (HoVer-Net, the shipped configuration, from scratch) with the same steps,
schedule, batch, crop, augmentation and seeds on the 24/6 split of ``_data.py``; only the training data differs.
Each final model is evaluated once on the 6 held-out tiles (AJI, PQ, Dice; mean over the tiles).

Arms (the recipe is fixed here, before any result is seen; docs/headline.md states it and the ship rule):

- **A real**: the 24 tiles with their contours.
- **B real + synthetic**: A plus ``SYNTHETIC_B`` synthetic 1000 x 1000 pairs from
  :func:`napari_nucsynth.generate.synthetic_pairs`: layouts alternately point-library augmentations of the 24
  tiles' real centroids and a cluster point process fitted to them, masks from a shape prior fitted to their
  labels, rendered by ``sian`` (the renderer that meets every target of issue 17, trained on these 24 tiles only)
  in the style of a random one of the 24. Crops are drawn uniformly over the 48 tiles: half real, half synthetic.
- **C points only**: no contour as a training target: ``SYNTHETIC_C`` pairs, pair ``i`` made from tile
  ``k = i mod 24`` alone: its nuclei centroids (a pathologist's clicks) augmented by the point library, masks from
  a shape prior (the summary statistics of nucleus size and shape of the 24 tiles, as the shipped prior's come
  from all 30), rendered by the classic renderer in tile ``k``'s own style with the renderer's own nucleus
  detection (no labels). The 24 real images are used only as styles.
- **D few contours**: ``FEW_TILES`` (3 of the 24, one breast, one liver, one prostate tile) with contours.
- **E few contours + synthetic**: D plus ``SYNTHETIC_E`` classic-rendered pairs whose layouts, prior and nuclei to
  fuse come from those 3 tiles' contours, in the styles of all 24 images (the 21 without labels used as styles
  only, with the renderer's own detection).

Two follow-up arms (added after B seed 0 scored below A, before any of them ran; docs/headline.md), asking *which*
part of B's synthetic data hurt or could help; each trains on the 24 real tiles listed ``REAL_REPEAT`` times
beside 24 synthetic pairs, so one crop in four is synthetic (B: one in two):

- **F ratio**: B's own synthetic pairs (seed 0's) at that ratio: does less synthetic data, and more real, help?
- **G real shapes**: the synthetic images are the 24 tiles' *own contours* (each flipped and rotated at random),
  rendered by ``sian`` in the style of another of the 24 (drawn at random): real touching and overlapping nuclei and
  the annotators' contour convention, in other stains; against F it isolates the masks.

Issue 21 asks for arm B with each new renderer (added before either ran; docs/headline.md): B's recipe exactly,
its renderer swapped, each model the one trained on the same 24 tiles: the shipped checkpoint, as B uses the shipped
sian (all three were trained with ``--split bench``, the 6 held-out tiles only their validation; checked when the
arm starts; ``RENDERER_ARMS``):

- **H** B with ``pix2pixhd`` (DAFF-GAN's masks -> H&E generator, stain-code style);
- **I** B with ``points2image`` (trained unpaired).

Issue 21 also asks for Liu et al.'s modality transfer as a training augmentation (added 2026-12-06, before it ran;
docs/headline.md):

- **J** A with ``augment="modality-drit"``: the 24 real tiles, half the crops restained by the shipped drit model
  (trained on these 24 tiles only) to another training tile's style code (``ARM_AUGMENT``).

And, after C fell short of 0.95 x A, the product's own points-only workflow (added 2026-12-06, before it ran):

- **K clicks on the real tiles**: the 24 real images with, as their labels, the masks that
  :func:`napari_nucsynth.annotate.fit_masks` fits to their true centroids by the ``watershed`` method (no model, no
  contour; its parameters were chosen on these 24 tiles' clicks), fallback nuclei from C's prior. No contour is a
  training target; unlike C, the real images are the training inputs, as when a pathologist clicks the nuclei of
  their own slides and trains on the result.

And, after E fell below D and the nuclei of E's pairs were measured (``bench_nucleus_texture.py``: almost never
rim-darker, textured from the dark blobs the renderer detects in the 21 unlabelled style tiles, whose undetected
pale nuclei stay in the inpainted background as unlabelled tissue), a follow-up to E (added 2026-12-06, before it
ran):

- **L few contours + synthetic from annotated nuclei only**: D plus ``SYNTHETIC_E`` pairs with E's layouts and
  prior, rendered by the classic renderer in the style of one of the 3 contoured tiles *with its contours* (every
  nucleus textured from is annotated, every annotated nucleus is inpainted away), edge ``L_EDGE_SIGMA``, then
  restained (``L_RESTAIN``) to the stain of a random one of the 24 tiles.

And a schedule rather than a mix for B's data (added 2026-12-06, before it ran and before F's result was seen):

- **M synthetic first, real last**: the steps' first ``M_MIXED_FRACTION`` on B's data (the 24 real tiles and B
  seed 0's 24 synthetic pairs, half the crops synthetic), the rest on the 24 real tiles only (A's data), one run of
  the same schedule (the second phase resumes the first's checkpoint with the real tiles): the final model is
  tuned on real crops only, as when synthetic pairs pretrain and real ones fine-tune.

Arms A and B run with seeds ``SEEDS_AB``, C-M with the first seed. The run is resumable: each arm writes its
checkpoint every 200 steps and its result once, under ``--out``; run the same command again to continue (a
finished arm is not evaluated again). ``--steps`` and the other training settings must match a resumed run's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from _data import SEGMENT_HELDOUT, load_image, load_labels, organ, tile_ids

SEEDS_AB = (0, 1)
SYNTHETIC_B = 24
SYNTHETIC_C = 72
SYNTHETIC_E = 24
SYNTHETIC_G = 24
SYNTHETIC_SIZE = 1000
FEW_TILES = ("TCGA-A7-A13F-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1", "TCGA-G9-6336-01Z-00-DX1")
B_RENDERER = "sian"
ARMS = ("A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M")
#: the arms trained with another augmentation than the settings' "basic" (arm J: Liu et al.'s, by the shipped drit)
ARM_AUGMENT = {"J": "modality-drit"}
#: arms H and I: arm B's recipe with another renderer, its model trained on the same 24 tiles (issue 21)
RENDERER_ARMS = {
    "H": ("pix2pixhd", "src/napari_nucsynth/data/models/pix2pixhd_monuseg.pt",
          "python benchmarks/train_pix2pixhd.py --split bench --steps 5000 --crop 128 --out bench-out/pix2pixhd_code.pt"
          " (then stripped)"),
    "I": ("points2image", "src/napari_nucsynth/data/models/points2image_monuseg.pt",
          "the lineage recorded in the shipped checkpoint (docs/points2image.md), all on --split bench"),
}
#: arms F and G list each real tile this many times beside their 24 synthetic pairs: one crop in four synthetic
REAL_REPEAT = 3
#: arm L: the classic renderer's ``edge_sigma`` (px), chosen before the arm ran by the rule in docs/headline.md
#: (of 0.8 and 0, the one whose pairs' share of rim-darker nuclei is nearer the 24 training tiles')
L_EDGE_SIGMA = 0.8
#: arm L: how its pairs are restained to another tile's stain (``stain.transfer``)
L_RESTAIN = "macenko"
#: arm M: the share of the steps trained on B's data (real + synthetic); the rest on the real tiles only
M_MIXED_FRACTION = 0.5


def _runs(arms: list[str]) -> list[tuple[str, int]]:
    return [(a, s) for a in arms for s in (SEEDS_AB if a in ("A", "B") else SEEDS_AB[:1])]


def _renderer_checkpoint(arm: str) -> Path:
    """The checkpoint of renderer arm ``arm`` (``RENDERER_ARMS``), relative to the repository. A missing one, or one
    whose training tiles include a held-out tile, stops the run (with how the model was trained)."""
    import torch

    from _data import REPO

    _, ck, command = RENDERER_ARMS[arm]
    path = REPO / ck
    others = ",".join(a for a in ARMS if a not in RENDERER_ARMS)
    if not path.is_file():
        raise SystemExit(f"headline.py: error: arm {arm} needs {ck} (the renderer trained on the 24 tiles: {command}); "
                         f"or leave the arm out (--arms {others})")
    tiles = torch.load(path, map_location="cpu", weights_only=True).get("train_data", {}).get("tiles")
    if isinstance(tiles, str):  # older checkpoints keep the list's repr
        import ast

        tiles = ast.literal_eval(tiles)
    seen = sorted(set(tiles or ()) & set(SEGMENT_HELDOUT))
    if not tiles or seen:
        raise SystemExit(f"headline.py: error: arm {arm}'s renderer {ck} was trained on "
                         f"{'held-out tiles ' + str(seen) if seen else 'tiles it does not list'}; it must be trained on "
                         f"the 24 training tiles only ({command}); or leave the arm out (--arms {others})")
    return path


def _synthetic(arm: str, seed: int, imgs, labs, cache: Path, progress) -> tuple[list, list, dict]:
    """The arm's synthetic pairs (cached in ``cache`` as .npz, so a resumed run trains on the same pairs)."""
    from napari_nucsynth.generate import synthetic_pairs
    from napari_nucsynth.masks import ShapePrior
    from napari_nucsynth.points import PointSet, centroids

    few = [i for i, (t, _) in enumerate(imgs) if t in FEW_TILES]
    images = [im for _, im in imgs]
    if arm == "B":
        kw = dict(n=SYNTHETIC_B, styles=images, style_labels=labs, fit_labels=labs, layouts="mixed",
                  method=B_RENDERER)
        info = {"renderer": B_RENDERER, "layouts": "library of the 24 tiles' centroids / cluster process",
                "styles": "the 24 tiles (with labels)"}
    elif arm == "C":
        prior = ShapePrior.fit_many(labs, seed=0)
        sets = [PointSet(centroids(lab), lab.shape) for lab in labs]
        kw = dict(n=SYNTHETIC_C, styles=images, style_labels=None, point_sets=sets, prior=prior, own_style=True,
                  layouts="library", method="classic")
        info = {"renderer": "classic", "layouts": "each tile's centroids, point-library augmented",
                "styles": "each layout's own tile, no labels", "prior": "fitted to the 24 tiles' label statistics"}
    elif arm in RENDERER_ARMS:
        method, ck, _ = RENDERER_ARMS[arm]
        kw = dict(n=SYNTHETIC_B, styles=images, style_labels=labs, fit_labels=labs, layouts="mixed",
                  method=method, checkpoint=str(_renderer_checkpoint(arm)))
        info = {"renderer": method, "checkpoint": ck, "layouts": "library of the 24 tiles' centroids / cluster process",
                "styles": "the 24 tiles (with labels)", "recipe": "arm B's, renderer swapped"}
    elif arm in ("F", "M"):
        s_imgs, s_labs, info = _synthetic("B", SEEDS_AB[0], imgs, labs, cache, progress)
        return s_imgs, s_labs, {**info, "from": f"arm B seed {SEEDS_AB[0]}'s pairs"}
    elif arm == "G":
        return _restyled_contours(seed, images, labs, cache, progress)
    elif arm == "L":
        return _contoured_styles(seed, images, labs, few, cache, progress)
    elif arm == "E":
        kw = dict(n=SYNTHETIC_E, styles=images, style_labels=[labs[i] if i in few else None for i in range(len(labs))],
                  fit_labels=[labs[i] for i in few], layouts="mixed", method="classic")
        info = {"renderer": "classic", "layouts": "library of the 3 tiles' centroids / cluster process",
                "styles": "the 24 tiles (labels of the 3 only)"}
    else:
        return [], [], {}
    path = cache / f"synthetic_{arm}_seed{seed}.npz"
    info = {**info, "n": kw["n"], "size": SYNTHETIC_SIZE}
    if path.exists():
        z = np.load(path)
        n = kw["n"]
        return [z[f"image{i}"] for i in range(n)], [z[f"labels{i}"] for i in range(n)], {**info, "cached": True}
    t0 = time.perf_counter()
    s_imgs, s_labs = synthetic_pairs(size=SYNTHETIC_SIZE, seed=seed, progress=progress, **kw)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    arrays = {f"image{i}": a for i, a in enumerate(s_imgs)} | {f"labels{i}": a for i, a in enumerate(s_labs)}
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return s_imgs, s_labs, info


def _restyled_contours(seed: int, images, labs, cache: Path, progress) -> tuple[list, list, dict]:
    """Arm G's pairs: tile ``i``'s own contours under a random dihedral transform, rendered by ``B_RENDERER`` in
    the style of tile ``j != i`` (random), with ``j``'s contours as the style's nuclei; seeded per pair."""
    from napari_nucsynth.render import render

    info = {"renderer": B_RENDERER, "labels": "the 24 tiles' own contours, flipped/rotated at random",
            "styles": "another of the 24 tiles (with labels)", "n": SYNTHETIC_G,
            "size": "the tiles' own, at most SYNTHETIC_SIZE"}
    n, size = min(SYNTHETIC_G, len(labs)), SYNTHETIC_SIZE
    path = cache / f"synthetic_G_seed{seed}.npz"
    if path.exists():
        z = np.load(path)
        return [z[f"image{i}"] for i in range(n)], [z[f"labels{i}"] for i in range(n)], {**info, "cached": True}
    t0 = time.perf_counter()
    out_i, out_l = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 7])
        lab = np.rot90(labs[i][:size, :size], int(rng.integers(4)))
        lab = np.ascontiguousarray(lab[:, ::-1] if rng.integers(2) else lab)
        j = int(rng.choice([k for k in range(len(labs)) if k != i]))
        out_i.append(render(lab, images[j], method=B_RENDERER, style_labels=labs[j], seed=int(rng.integers(2**31)),
                            device="cpu"))
        out_l.append(lab)
        progress(i + 1, n, f"restyled contours {i + 1}/{n}")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{f"image{i}": a for i, a in enumerate(out_i)},
                        **{f"labels{i}": a for i, a in enumerate(out_l)})
    os.replace(tmp, path)
    return out_i, out_l, info


def _contoured_styles(seed: int, images, labs, few: list[int], cache: Path, progress,
                      edge_sigma: float | None = None) -> tuple[list, list, dict]:
    """Arm L's pairs: arm E's layouts and prior (the 3 contoured tiles), rendered by the classic renderer in the style
    of one of those 3 tiles *with its contours* (so every nucleus textured from is an annotated one, and every
    annotated nucleus is inpainted out of the background), then restained (:data:`L_RESTAIN`) to the stain of a
    random one of the 24 tiles (pair ``i``: ``default_rng([seed, i, 11])``), as E's pairs take all 24 tiles' stains.
    ``edge_sigma`` defaults to :data:`L_EDGE_SIGMA`."""
    from napari_nucsynth.generate import synthetic_pairs
    from napari_nucsynth.stain import transfer

    edge = L_EDGE_SIGMA if edge_sigma is None else edge_sigma
    n = SYNTHETIC_E
    info = {"renderer": "classic", "edge_sigma": edge, "layouts": "library of the 3 tiles' centroids / cluster process",
            "styles": "the 3 contoured tiles (with their labels)", "restain": f"{L_RESTAIN} to a random one of the 24",
            "n": n, "size": SYNTHETIC_SIZE}
    path = cache / f"synthetic_L_seed{seed}.npz"
    if path.exists():
        z = np.load(path)
        return [z[f"image{i}"] for i in range(n)], [z[f"labels{i}"] for i in range(n)], {**info, "cached": True}
    t0 = time.perf_counter()
    few_imgs, few_labs = [images[i] for i in few], [labs[i] for i in few]
    s_imgs, s_labs = synthetic_pairs(n=n, size=SYNTHETIC_SIZE, seed=seed, styles=few_imgs, style_labels=few_labs,
                                     fit_labels=few_labs, layouts="mixed", method="classic",
                                     options={"edge_sigma": edge}, progress=progress)
    targets = []
    for i in range(n):
        j = int(np.random.default_rng([seed, i, 11]).integers(len(images)))
        s_imgs[i] = transfer(s_imgs[i], images[j], method=L_RESTAIN)
        targets.append(j)
        progress(i + 1, n, f"restained {i + 1}/{n}")
    info["stain_tiles"] = targets
    info["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{f"image{i}": a for i, a in enumerate(s_imgs)},
                        **{f"labels{i}": a for i, a in enumerate(s_labs)})
    os.replace(tmp, path)
    return s_imgs, s_labs, info


def _clicked_masks(imgs, labs, cache: Path, progress) -> list[np.ndarray]:
    """Arm K's labels: ``fit_masks(image, true centroids, method="watershed")`` of each tile (no model, no contour;
    fallback nuclei from arm C's prior), cached in ``cache`` so that a resumed run trains on the same masks."""
    from napari_nucsynth.annotate import fit_masks
    from napari_nucsynth.masks import ShapePrior
    from napari_nucsynth.points import centroids

    path = cache / "clicked_K.npz"
    if path.exists():
        z = np.load(path)
        return [z[f"labels{i}"] for i in range(len(imgs))]
    prior = ShapePrior.fit_many(labs, seed=0)  # C's: the 24 tiles' size and shape statistics
    out = []
    for i, ((t, im), lab) in enumerate(zip(imgs, labs)):
        out.append(fit_masks(im, centroids(lab), method="watershed", prior=prior, seed=i, device="cpu"))
        progress(i + 1, len(imgs), f"masks fitted to the clicks of {t}")
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{f"labels{i}": a for i, a in enumerate(out)})
    os.replace(tmp, path)
    return out


def _data(arm: str, seed: int, tiles: list[str], cache: Path, progress):
    """(images, labels, description) of an arm's training set."""
    imgs = [(t, load_image(t)) for t in tiles]
    labs = [load_labels(t) for t in tiles]
    syn_imgs, syn_labs, syn = _synthetic(arm, seed, imgs, labs, cache, progress)
    if arm in ("A", "B", "J", "M", *RENDERER_ARMS):
        real = list(zip([im for _, im in imgs], labs))
        used = tiles
    elif arm in ("F", "G"):  # the same arrays listed REAL_REPEAT times: crops drawn uniformly over the list
        real = list(zip([im for _, im in imgs], labs)) * REAL_REPEAT
        used = tiles
    elif arm in ("D", "E", "L"):
        real = [(im, lb) for (t, im), lb in zip(imgs, labs) if t in FEW_TILES]
        used = list(FEW_TILES)
    elif arm == "K":
        from napari_nucsynth.metrics import instance_metrics

        fitted = _clicked_masks(imgs, labs, cache, progress)
        real = list(zip([im for _, im in imgs], fitted))
        used = tiles
        clicked = {"labels": "fit_masks(watershed) at the true centroids", "aji_against_contours": round(float(
            np.mean([instance_metrics(lb, f)["aji"] for lb, f in zip(labs, fitted)])), 4)}
    else:
        real, used = [], []
    images = [im for im, _ in real] + list(syn_imgs)
    labels = [lb for _, lb in real] + list(syn_labs)
    return images, labels, {"real_tiles": used, "n_real": len(real), "synthetic": syn or None,
                            **({"real_repeat": REAL_REPEAT} if arm in ("F", "G") else {}),
                            **({"augment": ARM_AUGMENT[arm]} if arm in ARM_AUGMENT else {}),
                            **({"clicked": clicked} if arm == "K" else {}),
                            **({"phases": _phase_note(arm)} if arm == "M" else {})}


def _phase_note(arm: str) -> str:
    return (f"the first {M_MIXED_FRACTION:g} of the steps on the real tiles and the synthetic pairs (B's crops, half "
            "synthetic), the rest on the real tiles only (A's), one schedule (resumed from the switch)")


def _phases(arm: str, steps: int, images: list, labels: list, data: dict) -> list[tuple[int, list, list, dict]]:
    """The training phases of an arm: ``(until_step, images, labels, data)``; one phase, except for arm M, whose
    second phase resumes the first's checkpoint (optimiser, schedule and random state) on the real tiles only."""
    if arm != "M":
        return [(steps, images, labels, data)]
    n_real = data["n_real"]
    switch = int(round(steps * M_MIXED_FRACTION))
    return [(switch, images, labels, {**data, "phase": f"1: steps 0-{switch}, real + synthetic"}),
            (steps, images[:n_real], labels[:n_real], {**data, "phase": f"2: steps {switch}-{steps}, real only"})]


def _evaluate(ckpt: Path, threads: int, device: str = "cpu") -> dict:
    import torch

    from napari_nucsynth.metrics import instance_metrics
    from napari_nucsynth.segment import segment

    torch.set_num_threads(threads)
    per = []
    for t in SEGMENT_HELDOUT:
        pred = segment(load_image(t), method="hovernet", checkpoint=str(ckpt), device=device)
        m = instance_metrics(load_labels(t), pred)
        per.append({"tile": t, "organ": organ(t), **{k: round(float(m[k]), 4) for k in ("aji", "pq", "dice")}})
    return {**{k: round(float(np.mean([p[k] for p in per])), 4) for k in ("aji", "pq", "dice")}, "per_tile": per}


def _summary(results: dict) -> dict:
    table = {}
    for arm in ARMS:
        rows = [r for r in results.values() if r["arm"] == arm]
        if not rows:
            continue
        table[arm] = {"seeds": [r["seed"] for r in rows]}
        for k in ("aji", "pq", "dice"):
            v = [r["eval"][k] for r in rows]
            table[arm][k] = round(float(np.mean(v)), 4)
            table[arm][f"{k}_spread"] = round(float(np.max(v) - np.min(v)), 4) if len(v) > 1 else None
        hours = [r.get("cpu_hours") for r in rows]  # None for a run trained on another device
        table[arm]["cpu_hours"] = round(sum(hours), 2) if None not in hours else None
        table[arm]["devices"] = sorted({r.get("device", "cpu") for r in rows})
    targets = {}
    if "A" in table and "B" in table:
        targets["B>=A+0.015_aji"] = table["B"]["aji"] >= table["A"]["aji"] + 0.015
        targets["ship_B (B > A in mean AJI and PQ)"] = (table["B"]["aji"] > table["A"]["aji"]
                                                        and table["B"]["pq"] > table["A"]["pq"])
    if "A" in table and "C" in table:
        targets["C>=0.95A_aji"] = table["C"]["aji"] >= 0.95 * table["A"]["aji"]
    if "D" in table and "E" in table:
        targets["E>D_aji"] = table["E"]["aji"] > table["D"]["aji"]
    if "D" in table and "L" in table:  # E's target, for E's recipe with annotated textures (reported, follow-up)
        targets["L>D_aji (follow-up)"] = table["L"]["aji"] > table["D"]["aji"]
    if "A" in table and "K" in table:  # C's target, for the clicks-on-real-tiles workflow (reported, follow-up)
        targets["K>=0.95A_aji (follow-up)"] = table["K"]["aji"] >= 0.95 * table["A"]["aji"]
    for arm in ("F", "G", "M", *RENDERER_ARMS, *ARM_AUGMENT):  # reported; they decide nothing alone (a winner gets a second seed first)
        if "A" in table and arm in table:
            targets[f"{arm}>=A+0.015_aji (follow-up)"] = table[arm]["aji"] >= table["A"]["aji"] + 0.015
    return {"table": table, "targets": targets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/headline", help="folder of the arms' checkpoints and results")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--device", default="cpu", help="where the arms train, render and are evaluated (default cpu; "
                    "cuda where a GPU is lent: the recipe is the same, the figures say the device)")
    ap.add_argument("--only-report", action="store_true", help="print the table of the finished arms; train nothing")
    ap.add_argument("--smoke", action="store_true", help="a check of the pipeline, not the experiment: 2 synthetic "
                    "pairs of 256 px per arm (use a few --steps and another --out)")
    args = ap.parse_args()
    if args.smoke:
        global SYNTHETIC_B, SYNTHETIC_C, SYNTHETIC_E, SYNTHETIC_G, SYNTHETIC_SIZE
        SYNTHETIC_B = SYNTHETIC_C = SYNTHETIC_E = SYNTHETIC_G = 2
        SYNTHETIC_SIZE = 256
    arms = [a.strip().upper() for a in args.arms.split(",") if a.strip()]
    bad = sorted(set(arms) - set(ARMS))
    if bad:
        raise SystemExit(f"headline.py: error: unknown arm(s) {bad}; choose from {', '.join(ARMS)}")

    for arm in [] if args.only_report else arms:  # before hours of other arms: a renderer arm's model must exist
        if arm in RENDERER_ARMS and not (Path(args.out) / f"{arm}_seed{SEEDS_AB[0]}.json").exists():
            _renderer_checkpoint(arm)

    import torch

    from napari_nucsynth.train import train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = [t for t in tile_ids() if t not in SEGMENT_HELDOUT]
    settings = {"model": "hovernet (shipped configuration, from scratch)", "steps": args.steps,
                "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr, "augment": "basic",
                "schedule": "warm-up + cosine (train())",
                "synthetic": {"B": SYNTHETIC_B, "C": SYNTHETIC_C, "E": SYNTHETIC_E, "size": SYNTHETIC_SIZE}}
    results = {}
    for arm, seed in _runs(list(ARMS)):
        f = out / f"{arm}_seed{seed}.json"
        if f.exists():
            results[f.stem] = json.loads(f.read_text())
    for arm, seed in ([] if args.only_report else _runs(arms)):
        name = f"{arm}_seed{seed}"
        if name in results:
            continue
        ckpt = out / f"{name}.pt"

        def progress(i, n, msg, _name=name):
            print(f"[{_name}] {msg}", file=sys.stderr, flush=True)

        images, labels, data = _data(arm, seed, tiles, out, progress)
        res, before, done = None, 0.0, True
        for until, p_images, p_labels, p_data in _phases(arm, args.steps, images, labels, data):
            resume = None
            if ckpt.exists():
                from napari_nucsynth.models import load_checkpoint

                ck = load_checkpoint(ckpt)
                if ck["train_data"].get("headline_settings") != settings:
                    raise SystemExit(f"headline.py: error: {ckpt} was trained with other settings "
                                     f"({ck['train_data'].get('headline_settings')}); use another --out")
                if int(ck["step"]) >= until and until < args.steps:
                    continue  # a finished phase
                resume = str(ckpt)
            t_log = [time.perf_counter()]
            clock = out / f"{name}.seconds.json"  # training seconds up to the last checkpoint, over every session
            before = float(json.loads(clock.read_text())["seconds"]) if resume and clock.exists() else 0.0
            at = [0]

            def on_update(u, _name=name, _clock=clock, _before=before, _at=at):
                _at[0] = u.step
                if u.kind == "checkpoint":
                    _clock.write_text(json.dumps({"seconds": _before + u.seconds, "step": u.step}))
                if u.kind == "step" and (u.step % 100 == 0 or time.perf_counter() - t_log[0] > 300):
                    t_log[0] = time.perf_counter()
                    print(f"[{_name}] step {u.step}/{u.steps} loss {u.losses.get('loss', float('nan')):.3f} "
                          f"({u.seconds:.0f} s this session)", file=sys.stderr, flush=True)

            # a phase that ends before the last step stops there (saved, then resumed with the next phase's data)
            phase_end = (lambda _at=at, _until=until: _at[0] >= _until) if until < args.steps else None
            res = train("hovernet", p_images, p_labels, steps=args.steps, out=ckpt, resume=resume, device=args.device,
                        seed=seed,
                        batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                        augment=ARM_AUGMENT.get(arm, settings["augment"]), val_fraction=0,
                        save_every=200, on_update=on_update, should_stop=phase_end,
                        train_data={"dataset": "MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0)", "arm": arm,
                                    "headline_settings": settings, **p_data,
                                    "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name]
                                                                               + sys.argv[1:])})
            if res.step < until:
                done = False
                break
        if res is None or not done or res.step < args.steps:
            print(f"[{name}] stopped at step {res.step if res else '?'}; run again to resume", file=sys.stderr)
            break
        train_s = before + res.seconds
        result = {"arm": arm, "seed": seed, "data": data, "steps": res.step, "train_seconds_last_run":
                  round(res.seconds, 1),
                  # CPU-hours (training seconds x threads) only where the CPU trained it; the wall hours always
                  "cpu_hours": round(train_s * args.threads / 3600, 2) if args.device == "cpu" else None,
                  "train_hours": round(train_s / 3600, 2),
                  "threads": args.threads, "device": args.device, "eval": _evaluate(ckpt, args.threads, args.device),
                  "settings": settings}
        tmp = out / f"{name}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, out / f"{name}.json")
        results[name] = result
    print(json.dumps({"benchmark": "headline (issue 19)", "held_out": SEGMENT_HELDOUT, "settings": settings,
                      "pending": [f"{a}_seed{s}" for a, s in _runs(arms) if f"{a}_seed{s}" not in results],
                      **_summary(results), "runs": {k: {kk: v[kk] for kk in ("arm", "seed", "eval", "cpu_hours",
                                                                              "data")} for k, v in results.items()}},
                     indent=1))


if __name__ == "__main__":
    main()
