"""Train the AdaIN refine-synthesis model (Gong et al. 2021) on MoNuSeg training tiles; prints one JSON object.

    python benchmarks/train_adain.py --split bench --steps 4000 --out bench-out/adain_bench.pt
    python benchmarks/train_adain.py --split all --steps N --init bench-out/adain_bench.pt \
        --strip --out src/napari_nucsynth/data/models/adain_monuseg.pt

``--split bench`` trains on the 24 tiles not in ``_data.SEGMENT_HELDOUT`` and reports the validation losses
(content, style) on those six; ``--split all`` trains on all 30 (the shipped default model). ``--resume`` continues
a stopped run; ``--init`` starts from another checkpoint's weights (fresh optimiser). ``--vgg`` names the VGG-19
weights (default "auto": ImageNet's ``vgg19-dcbb9e9d.pth`` when cached or in ``$NUCSYNTH_VGG19``, else the seeded
random fallback; the JSON and the checkpoint say which). The checkpoint records this command and the tiles.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["bench", "all"], default="bench")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=None, help="Adam's peak learning rate (default: the model's, 1e-3)")
    ap.add_argument("--width", type=float, default=None, help="decoder channel multiplier (default: the model's)")
    ap.add_argument("--classic-fraction", type=float, default=None,
                    help="share of training contents that are classic renders (default: the model's, 0.5)")
    ap.add_argument("--vgg", default="auto", help="VGG-19 weights: auto, random, or a torchvision weights file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume")
    ap.add_argument("--init", help="start from this checkpoint's weights (new optimiser and schedule)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--log", help="append one JSON line per 10 steps (and every validation) here")
    ap.add_argument("--strip", action="store_true",
                    help="at the end, drop the optimiser and random state (a smaller file to ship; cannot resume)")
    args = ap.parse_args()

    import torch

    from napari_nucsynth.models import get_model, load_checkpoint, save_checkpoint
    from napari_nucsynth.train import train

    tiles = tile_ids()
    val_tiles = [t for t in tiles if t in SEGMENT_HELDOUT] if args.split == "bench" else []
    train_tiles = [t for t in tiles if t not in val_tiles]
    imgs, labs = [load_image(t) for t in train_tiles], [load_labels(t) for t in train_tiles]
    v_imgs, v_labs = [load_image(t) for t in val_tiles], [load_labels(t) for t in val_tiles]
    config = {"pretrained": args.vgg}
    if args.width is not None:
        config["width"] = args.width
    if args.classic_fraction is not None:
        config["classic_fraction"] = args.classic_fraction
    lr = get_model("adain").default_lr if args.lr is None else args.lr
    t0 = time.perf_counter()
    last = {}

    def on_update(u):
        if u.kind == "step":
            last.update(u.losses)
        if args.log and (u.kind != "step" or u.step % 10 == 0):
            with open(args.log, "a") as log:
                log.write(json.dumps({"kind": u.kind, "step": u.step, "losses": u.losses, "metrics": u.metrics,
                                      "seconds": round(u.seconds, 1)}) + "\n")

    res = train("adain", imgs, labs, steps=args.steps, out=args.out, resume=args.resume, init=args.init,
                config=config, device=args.device, seed=args.seed, batch_size=args.batch_size, crop=args.crop,
                lr=lr, val_images=v_imgs or None, val_labels=v_labs or None, val_fraction=0,
                eval_every=args.eval_every, save_every=200, on_update=on_update,
                train_data={"dataset": "MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0)", "tiles": train_tiles,
                            "val_tiles": val_tiles,
                            "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                            "init": args.init, "batch_size": args.batch_size, "crop": args.crop, "lr": lr,
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    ck = load_checkpoint(res.path, kind="adain")
    if args.strip:
        save_checkpoint(res.path, kind="adain", config=ck["config"], step=ck["step"], metrics=ck["metrics"],
                        train_data=ck["train_data"], state_dict=dict(ck["state_dict"]))
    seconds = time.perf_counter() - t0
    print(json.dumps({"checkpoint": str(res.path), "step": res.step, "stopped": res.stopped,
                      "vgg": ck["config"].get("vgg"), "config": ck["config"], "last_losses": last,
                      "metrics": res.metrics, "train_seconds": round(res.seconds, 1),
                      "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
