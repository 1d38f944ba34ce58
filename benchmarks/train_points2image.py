"""Train the Points2Image generator unpaired on MoNuSeg training images (their labels unused) and/or time its 256 x
256 render; prints one JSON object.

    python benchmarks/train_points2image.py --split bench --steps 20000 --crop 128 --out bench-out/p2i_bench.pt \
        --log bench-out/p2i.jsonl --preview-every 500
    python benchmarks/train_points2image.py ... --resume bench-out/p2i_bench.pt        # continue a stopped run
    python benchmarks/train_points2image.py --split all --steps N --init bench-out/p2i_bench.pt \
        --strip --out src/napari_nucsynth/data/models/points2image_monuseg.pt
    OMP_NUM_THREADS=1 python benchmarks/train_points2image.py --steps 0 --time-render    # default config, untrained

``--split bench`` trains on the images of the 24 tiles not in ``_data.SEGMENT_HELDOUT`` and validates on the images
of those 6; ``--split all`` trains on all 30 images (the shipped model). **No label file is read for training**:
the generator's masks come from the project's sampler (random layouts and shape prior, seeded per crop), the real
crops' classes for the discriminator are Otsu pseudo-labels (:mod:`napari_nucsynth.models.points2image`).
Validation is label-free too: Dice of the render's Otsu nuclei against the sampled masks (``mask_dice``), the share
of centroids the render stains (``point_hit``), and the style-code distance to the held-out crop (``style_l1``).
``--strip`` keeps only what rendering needs (the EMA generator). The JSON reports training steps/s.

``--time-render`` times ``napari_nucsynth.models.points2image.render`` of a 256 x 256 crop of a held-out tile's
masks in the style of another held-out tile on one thread (``torch.set_num_threads(1)``; set
``OMP_NUM_THREADS=1`` too), after two warm-up renders: the median and minimum of ``--repeats`` runs, its parts
(style code, label map, generator) and the classic renderer on the same input as a baseline measured in the same
run (these machines are noisy). It reads that tile's label file (the masks rendered), as bench_generators.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _data import SEGMENT_HELDOUT, load_image, tile_ids
from _gan_train import time_learned_render

KIND = "points2image"


def time_render(model, repeats: int) -> dict:
    """Seconds of one 256 x 256 render on one thread (see the module docstring)."""
    from napari_nucsynth.models import points2image as p2i

    return time_learned_render(p2i, model, repeats, style_code=lambda _m, s: p2i.style_code(s), style_part="style_code_s",
                  cond_part="label_map_s", params=lambda n: n.startswith("ema."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["bench", "all"], default="bench")
    ap.add_argument("--steps", type=int, default=20000, help="0: no training (with --time-render: the default "
                                                               "config, untrained)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128, help="training crop (a multiple of 16 with the default config)")
    ap.add_argument("--lr", type=float, default=None, help="the core's lr (default 2e-4): G at lr/2, D at 2 lr")
    ap.add_argument("--config", default="{}", help="JSON overrides of the config, e.g. '{\"lambda_labelmix\": 10}'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="the checkpoint to write (required unless --steps 0)")
    ap.add_argument("--resume")
    ap.add_argument("--init", help="start from this checkpoint's weights (new optimisers and schedule)")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--log", help="append one JSON line per --log-every steps (and every validation) here")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--preview-every", type=int, default=0, help="write a preview PNG every N steps")
    ap.add_argument("--preview-dir", default="bench-out/p2i_previews")
    ap.add_argument("--strip", action="store_true",
                    help="at the end, keep only what rendering needs (no optimiser, random state, discriminator)")
    ap.add_argument("--time-render", action="store_true", help="time the 256 x 256 render on one thread")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    import torch

    from napari_nucsynth.models import get_model, load_checkpoint, save_checkpoint

    result: dict = {}
    t0 = time.perf_counter()
    if args.steps > 0:
        if not args.out:
            ap.error("--out is required when training")
        from napari_nucsynth.train import train

        tiles = tile_ids()
        val = [t for t in SEGMENT_HELDOUT if t in tiles] if args.split == "bench" else []
        train_tiles = [t for t in tiles if t not in val]
        imgs = [load_image(t) for t in train_tiles]  # images only: no label file is read
        v_imgs = [load_image(t) for t in val]

        def on_update(u):
            if args.log and (u.kind == "validation" or (u.kind == "step" and u.step % args.log_every == 0)):
                with open(args.log, "a") as log:
                    log.write(json.dumps({"kind": u.kind, "step": u.step, "losses": u.losses, "metrics": u.metrics,
                                          "seconds": round(u.seconds, 1)}) + "\n")
            if u.kind == "preview" and u.image is not None:
                import imageio.v3 as iio

                Path(args.preview_dir).mkdir(parents=True, exist_ok=True)
                iio.imwrite(Path(args.preview_dir) / f"step{u.step:06d}.png", u.image)

        start = int(load_checkpoint(args.resume)["step"]) if args.resume else 0  # before the run overwrites it
        res = train(KIND, imgs, None, steps=args.steps, out=args.out, resume=args.resume, init=args.init,
                    config=json.loads(args.config), device=args.device, seed=args.seed, batch_size=args.batch_size,
                    crop=args.crop, lr=args.lr, val_fraction=0, val_images=v_imgs or None,
                    eval_every=args.eval_every, save_every=args.save_every, preview_every=args.preview_every,
                    on_update=on_update,
                    train_data={"dataset": "MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0), images only (unpaired)",
                                "tiles": train_tiles, "val_tiles": val, "unpaired": True,
                                "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                                "init": args.init, "batch_size": args.batch_size, "crop": args.crop,
                                "lr": args.lr, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
        ck = load_checkpoint(res.path, kind=KIND)
        if args.strip:
            from napari_nucsynth.models.gan import SHIPPED_PREFIX

            save_checkpoint(res.path, kind=KIND, config=ck["config"], step=ck["step"], metrics=ck["metrics"],
                            train_data=ck["train_data"],
                            state_dict={k: v for k, v in ck["state_dict"].items() if k.startswith(SHIPPED_PREFIX)})
        result.update({"checkpoint": str(res.path), "step": res.step, "stopped": res.stopped,
                       "metrics": res.metrics, "train_seconds": round(res.seconds, 1),
                       "steps_per_s": round((res.step - start) / max(res.seconds, 1e-9), 3)})
    if args.time_render:
        spec = get_model(KIND)
        if args.steps > 0 or args.resume or args.init:
            from napari_nucsynth.render.points2image import load_model

            model = load_model(args.out if args.steps > 0 else (args.resume or args.init), "cpu")
            result["timed"] = "checkpoint"
        else:
            torch.manual_seed(args.seed)
            model = spec.build({**spec.default_config(), **json.loads(args.config)})
            result["timed"] = "default config, untrained"
        result["config"] = {k: v for k, v in model.config.items() if k in ("ngf", "ngf_max", "n_up", "hidden",
                                                                         "z_dim", "noise_down", "tile")}
        result.update(time_render(model, args.repeats))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
