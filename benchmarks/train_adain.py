"""Train the AdaIN refine-synthesis model (Gong et al. 2021) on MoNuSeg training tiles; prints one JSON object.

    python benchmarks/train_adain.py --split bench --steps 5000 --crop 128 --out bench-out/adain_bench.pt
    python benchmarks/train_adain.py --split all --steps N --init bench-out/adain_bench.pt \
        --strip --out src/napari_nucsynth/data/models/adain_monuseg.pt

A residual refinement of the classic pre-synthesis on the GAN core (:mod:`napari_nucsynth.models.adain`): it
starts as the identity. ``--split bench`` trains on the 24 tiles not in ``_data.SEGMENT_HELDOUT`` and validates on
those six (perceptual distance and L1 to the real tile of the refined render and of the classic render it started
from); ``--split all`` trains on all 30 (the shipped default model). ``--resume`` continues a stopped run;
``--init`` starts from another checkpoint's weights (fresh optimisers). ``--encoder`` is the feature network
(default: the shipped segmenter's encoder; ``vgg19`` only where ImageNet weights are local). The checkpoint records
this command and the tiles; the JSON reports training steps/s.
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
    ap.add_argument("--lr", type=float, default=None, help="the GAN core's lr (default: the model's, 2e-4)")
    ap.add_argument("--width", type=float, default=None, help="decoder channel multiplier (default: the model's)")
    ap.add_argument("--encoder", default="hovernet", help="feature network: hovernet, vgg19 (ImageNet weights, local "
                    "only) or vgg19-random")
    ap.add_argument("--config", default="{}", help="JSON overrides of the adain config")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--preview-every", type=int, default=0, help="write a preview PNG every N steps")
    ap.add_argument("--preview-dir", default="bench-out/adain_previews")
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
    config = {"features": args.encoder, **json.loads(args.config)}
    if args.width is not None:
        config["width"] = args.width
    lr = get_model("adain").default_lr if args.lr is None else args.lr
    t0 = time.perf_counter()
    last = {}

    def on_update(u):
        if u.kind == "step":
            last.update(u.losses)
        if args.log and (u.kind not in ("step", "preview") or u.step % 10 == 0):
            with open(args.log, "a") as log:
                log.write(json.dumps({"kind": u.kind, "step": u.step, "losses": u.losses, "metrics": u.metrics,
                                      "seconds": round(u.seconds, 1)}) + "\n")
        if u.kind == "preview" and u.image is not None:
            import imageio.v3 as iio

            Path(args.preview_dir).mkdir(parents=True, exist_ok=True)
            iio.imwrite(Path(args.preview_dir) / f"step{u.step:06d}.png", u.image)

    start = int(load_checkpoint(args.resume)["step"]) if args.resume else 0  # before the run overwrites it
    res = train("adain", imgs, labs, steps=args.steps, out=args.out, resume=args.resume, init=args.init,
                config=config, device=args.device, seed=args.seed, batch_size=args.batch_size, crop=args.crop,
                lr=lr, val_images=v_imgs or None, val_labels=v_labs or None, val_fraction=0,
                eval_every=args.eval_every, save_every=args.save_every, preview_every=args.preview_every,
                on_update=on_update,
                train_data={"dataset": "MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0)", "tiles": train_tiles,
                            "val_tiles": val_tiles,
                            "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                            "init": args.init, "batch_size": args.batch_size, "crop": args.crop, "lr": lr,
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    ck = load_checkpoint(res.path, kind="adain")
    if args.strip:
        from napari_nucsynth.models.gan import SHIPPED_PREFIX

        save_checkpoint(res.path, kind="adain", config=ck["config"], step=ck["step"], metrics=ck["metrics"],
                        train_data=ck["train_data"],
                        state_dict={k: v for k, v in ck["state_dict"].items() if k.startswith(SHIPPED_PREFIX)})
    seconds = time.perf_counter() - t0
    print(json.dumps({"checkpoint": str(res.path), "step": res.step, "stopped": res.stopped,
                      "features": ck["config"].get("features_source"), "config": ck["config"], "last_losses": last,
                      "metrics": res.metrics, "train_seconds": round(res.seconds, 1),
                      "steps_per_s": round((res.step - start) / max(res.seconds, 1e-9), 3),
                      "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
