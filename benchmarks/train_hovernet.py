"""Train a segmenter (HoVer-Net-style by default, ``--model maskrcnn`` for Mask R-CNN) on MoNuSeg training tiles;
prints one JSON object at the end.

    python benchmarks/train_hovernet.py --split bench --steps 6000 --out bench-out/hovernet_bench.pt
    python benchmarks/train_hovernet.py --split all --steps N --init bench-out/hovernet_bench.pt \
        --strip --out src/napari_nucsynth/data/models/hovernet_monuseg.pt

``--split bench`` trains on the 24 tiles not in ``_data.SEGMENT_HELDOUT`` (what bench_segment.py evaluates);
``--split all`` on all 30 (the shipped default model).
``--synthetic N`` adds N synthetic pairs (``--synthetic-size`` px) made from the split's tiles alone: DAFF-GAN
point-library layouts of their centroids, masks from a shape prior fitted to their labels, rendered by the classic
renderer in the style of a random one of them (with its labels): ``napari_nucsynth.generate.synthetic_pairs``.
``--model maskrcnn`` trains Mask R-CNN the same way for ``bench_segment.py --maskrcnn``. ``--resume`` continues a stopped run; ``--init`` starts
from another checkpoint's weights (fresh optimiser). The checkpoint records this command and the tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _data import SEGMENT_HELDOUT, load_image, load_labels, tile_ids

from napari_nucsynth.train import AUGMENTATIONS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["hovernet", "maskrcnn"], default="hovernet")
    ap.add_argument("--split", choices=["bench", "all"], default="bench")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--augment", choices=AUGMENTATIONS, default="basic",
                    help="training augmentation (napari_nucsynth.train._augment)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume")
    ap.add_argument("--init", help="start from this checkpoint's weights (new optimiser and schedule)")
    ap.add_argument("--log", help="append one JSON line per 50 steps here")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="also train on N classic-rendered synthetic pairs made from the split's tiles only")
    ap.add_argument("--synthetic-size", type=int, default=1000)
    ap.add_argument("--strip", action="store_true",
                    help="at the end, drop the optimiser and random state (a smaller file to ship; cannot resume)")
    args = ap.parse_args()

    import torch

    from napari_nucsynth.train import train

    tiles = tile_ids()
    if args.split == "bench":
        tiles = [t for t in tiles if t not in SEGMENT_HELDOUT]
    imgs, labs = [load_image(t) for t in tiles], [load_labels(t) for t in tiles]
    synthetic = None
    if args.synthetic:
        t_syn = time.perf_counter()
        from napari_nucsynth.generate import synthetic_pairs

        s_imgs, s_labs = synthetic_pairs(args.synthetic, args.synthetic_size, imgs, style_labels=labs,
                                         fit_labels=labs, layouts="library", seed=args.seed)
        imgs, labs = imgs + s_imgs, labs + s_labs
        synthetic = {"n": args.synthetic, "size": args.synthetic_size, "renderer": "classic", "seed": args.seed,
                     "made_from": "the training tiles only (layouts, shape prior, styles)",
                     "seconds": round(time.perf_counter() - t_syn, 1)}
    init_data = None
    if args.init:  # record how the starting weights were made too: the shipped model's provenance is both runs
        from napari_nucsynth.models import load_checkpoint as _load

        ck0 = _load(args.init, kind=args.model)
        init_data = {**ck0["train_data"], "step": ck0["step"]}
    t0 = time.perf_counter()

    def on_update(u):
        if args.log and (u.kind != "step" or u.step % 50 == 0):
            with open(args.log, "a") as log:
                log.write(json.dumps({"kind": u.kind, "step": u.step, "losses": u.losses, "metrics": u.metrics,
                                      "seconds": round(u.seconds, 1)}) + "\n")

    res = train(args.model, imgs, labs, steps=args.steps, out=args.out, resume=args.resume, init=args.init,
                device=args.device, seed=args.seed, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                augment=args.augment,
                val_fraction=0, save_every=200, on_update=on_update,
                train_data={"dataset": "MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0)", "tiles": tiles,
                            "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                            "synthetic": synthetic, "init": args.init, "init_train_data": init_data, "batch_size": args.batch_size, "crop": args.crop,
                            "augment": args.augment,
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    if args.strip:
        from napari_nucsynth.models import load_checkpoint, save_checkpoint

        ck = load_checkpoint(res.path, kind=args.model)
        save_checkpoint(res.path, kind=args.model, config=ck["config"], step=ck["step"], metrics=ck["metrics"],
                        train_data=ck["train_data"],
                        state_dict={k: v for k, v in ck["state_dict"].items()})
    print(json.dumps({"checkpoint": str(res.path), "step": res.step, "stopped": res.stopped,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
