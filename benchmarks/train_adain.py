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

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _gan_train import add_common_args, load_split, logger, parser, pick, run


def main() -> None:
    ap = parser(__doc__)

    def model_args(ap):
        ap.add_argument("--width", type=float, default=None, help="decoder channel multiplier (default: the model's)")
        ap.add_argument("--encoder", default="hovernet", help="feature network: hovernet, vgg19 (ImageNet weights, "
                        "local only) or vgg19-random")

    add_common_args(ap, steps=4000, crop=256, preview_dir="bench-out/adain_previews", eval_every=500,
                    lr_help="the GAN core's lr (default: the model's, 2e-4)",
                    config_help="JSON overrides of the adain config", out_required=True,
                    init_help="start from this checkpoint's weights (new optimiser and schedule)",
                    log_help="append one JSON line per 10 steps (and every validation) here",
                    strip_help="at the end, drop the optimiser and random state (a smaller file to ship; cannot "
                               "resume)",
                    order=("--split", "--steps", "--batch-size", "--crop", "--lr", "--config", "--save-every",
                           "--preview-every", "--preview-dir", "--seed", "--device", "--out", "--resume", "--init",
                           "--eval-every", "--log", "--strip"),
                    before={"--config": model_args})
    args = ap.parse_args()

    from napari_nucsynth.models import get_model

    # the held-out tiles in id order: the first one is the preview tile of adain's runs
    train_tiles, val_tiles, imgs, labs, v_imgs, v_labs = load_split(args.split, val_order="sorted")
    config = {"features": args.encoder, **json.loads(args.config)}
    if args.width is not None:
        config["width"] = args.width
    if args.lr is None:  # recorded in the checkpoint as the value used
        args.lr = get_model("adain").default_lr
    t0 = time.perf_counter()
    last = {}
    log = logger(args, should_log=lambda u: u.kind not in ("step", "preview") or u.step % 10 == 0)

    def on_update(u):
        if u.kind == "step":
            last.update(u.losses)
        log(u)

    out = run("adain", args, imgs, labs, v_imgs, v_labs, config=config, tiles=train_tiles, val_tiles=val_tiles,
              on_update=on_update)
    seconds = time.perf_counter() - t0
    print(json.dumps({**pick(out, "checkpoint step stopped"), "features": out["features_source"],
                      "config": out["config"], "last_losses": last,
                      **pick(out, "metrics train_seconds steps_per_s"), "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
