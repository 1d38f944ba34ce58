"""Does Gong et al.'s joint adversarial loop make a better segmenter? Prints one JSON object.

This is the paper's central claim (Gong et al., WACV 2021: a segmenter trained jointly with a style-consistent
generator and discriminator, the generator ascending the segmenter's loss through a gradient reversal layer, beats
the same segmenter trained on the real pairs alone). This script tests it on MoNuSeg and **must be reported
honestly either way**: a joint segmenter that is no better, or worse, than its real-only twin is a result, not a
failure of the script; quote both numbers, the scale (steps, crop, device) and the seed, and do not tune the joint
run on the held-out tiles.

The comparison (``benchmarks/_data.py``'s split of the segmenter benchmark): both segmenters train on the 24
MoNuSeg training tiles not in ``SEGMENT_HELDOUT`` and are evaluated on the 6 held-out tiles, full size, with
:func:`napari_nucsynth.segment.segment` and :func:`napari_nucsynth.metrics.instance_metrics` (AJI, PQ per tile,
then the mean over tiles):

- **real only**: :func:`napari_nucsynth.train.train` for ``--steps`` segmenter updates (no validation split);
- **joint**: :func:`napari_nucsynth.train.joint.train_joint` with ``pretrain_steps = (--gen-pretrain,
  --seg-pretrain)`` and ``steps = --gen-pretrain + --steps``, so the segmenter makes exactly ``--steps`` updates
  too (``--seg-pretrain`` on real pairs, the rest on real and synthetic pairs), with the same learning rate, schedule,
  batch size, crop and seed. The generator's pretraining does not count against the segmenter.

Both use the segmenter kind's default config unless ``--tiny`` (a few channels: for smoke tests only). The
generator starts from ``--generator-checkpoint`` when given (then ``--gen-pretrain`` may be 0). With
``--segmenter-checkpoint`` *both* segmenters start from that checkpoint (trained on the same 24 tiles: Algorithm
1's segmenter pretraining done once for both arms) and train ``--steps`` more updates at ``--seg-lr``; then
``--seg-pretrain`` is 0 by default, and the comparison is a fine-tuning on real pairs against a fine-tuning in the
joint loop.

    # smoke test (seconds; numbers meaningless)
    python benchmarks/bench_joint.py --tiny --steps 2 --gen-pretrain 1 --seg-pretrain 1 --crop 64 --eval-size 128
    # full scale (a GPU; hours on a CPU)
    python benchmarks/bench_joint.py --generator adain --segmenter hovernet --steps 6000 --gen-pretrain 2000 \
        --seg-pretrain 1500 --crop 256 --out-dir bench-out/joint
    # from pretrained parts (Algorithm 1's stages 1 and 2 done by train_adain.py / train_hovernet.py)
    python benchmarks/bench_joint.py --generator-checkpoint bench-out/adain_bench.pt --gen-pretrain 0 \
        --segmenter-checkpoint bench-out/hovernet_bench.pt --seg-lr 3e-4 --steps 400 --out-dir bench-out/joint_ft
    # the AC-GAN ablation (the generator descends the segmenter's loss)
    python benchmarks/bench_joint.py ... --adversarial acgan --baseline bench-out/joint/real_only.pt
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _data import SEGMENT_HELDOUT, load_image, load_labels, organ, tile_ids

TINY_GEN = {"adain": {"width": 0.125, "ndf": 8, "d_layers": 2, "num_d": 1},
            "sian": {"ngf": 4, "ngf_max": 16, "n_up": 2, "noise_nc": 2, "style_dim": 8, "nef": 4, "enc_layers": 3,
                     "ndf": 8, "d_layers": 2, "num_d": 2, "tile": 256, "blend": 8}}
TINY_SEG = {"hovernet": {"width": 8},
            "maskrcnn": {"fpn_channels": 32, "representation_size": 128, "mask_channels": 16, "mask_layers": 2,
                         "semantic_channels": 16}}


def evaluate(method: str, checkpoint, images, labels, device: str) -> dict:
    """Mean AJI and PQ over the held-out tiles (HoVer-Net's convention: per image, then the mean), and each tile's."""
    import numpy as np

    from napari_nucsynth.metrics import instance_metrics
    from napari_nucsynth.segment import segment

    per = {}
    for name, im, lb in zip(SEGMENT_HELDOUT, images, labels):
        m = instance_metrics(lb, segment(im, method=method, checkpoint=checkpoint, device=device))
        per[name] = {"aji": round(float(m["aji"]), 4), "pq": round(float(m["pq"]), 4)}
    return {"aji": float(np.mean([p["aji"] for p in per.values()])),
            "pq": float(np.mean([p["pq"] for p in per.values()])), "per_tile": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", choices=["adain", "sian"], default="adain")
    ap.add_argument("--segmenter", choices=["hovernet", "maskrcnn"], default="hovernet")
    ap.add_argument("--steps", type=int, default=6000, help="segmenter updates of both runs")
    ap.add_argument("--gen-pretrain", type=int, default=None, help="generator pretraining steps (default steps/4)")
    ap.add_argument("--seg-pretrain", type=int, default=None, help="segmenter pretraining steps, real pairs only "
                                                                   "(default steps/4)")
    ap.add_argument("--adversarial", choices=["reverse", "acgan"], default="reverse")
    ap.add_argument("--lam", type=float, default=None, help="GRL weight at the end of its ramp (joint.LAMBDA)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--generator-checkpoint", help="start the generator from this checkpoint")
    ap.add_argument("--segmenter-checkpoint", help="start both segmenters from this checkpoint (trained on the "
                                                   "same 24 tiles; --seg-pretrain then defaults to 0)")
    ap.add_argument("--seg-lr", type=float, default=None, help="segmenter peak learning rate of both runs "
                                                               "(default: the kind's default_lr)")
    ap.add_argument("--baseline", help="reuse this real-only segmenter checkpoint (same kind, steps and seed)")
    ap.add_argument("--out-dir", default="bench-out/joint")
    ap.add_argument("--tiny", action="store_true", help="tiny networks (smoke tests only)")
    ap.add_argument("--eval-size", type=int, default=0, help="evaluate on the top-left N x N of each held-out tile "
                                                             "(smoke tests; 0 = full tiles)")
    args = ap.parse_args()

    import torch

    from napari_nucsynth.devices import resolve_device
    from napari_nucsynth.train import train
    from napari_nucsynth.train.joint import LAMBDA, train_joint

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles = tile_ids()
    train_tiles = [t for t in tiles if t not in SEGMENT_HELDOUT]
    imgs, labs = [load_image(t) for t in train_tiles], [load_labels(t) for t in train_tiles]
    ev_imgs, ev_labs = [load_image(t) for t in SEGMENT_HELDOUT], [load_labels(t) for t in SEGMENT_HELDOUT]
    if args.eval_size:
        n = args.eval_size
        ev_imgs, ev_labs = [im[:n, :n] for im in ev_imgs], [lb[:n, :n] for lb in ev_labs]
    S = int(args.steps)
    pg = S // 4 if args.gen_pretrain is None else int(args.gen_pretrain)
    ps = (0 if args.segmenter_checkpoint else S // 4) if args.seg_pretrain is None else int(args.seg_pretrain)
    if ps > S:
        raise SystemExit(f"--seg-pretrain ({ps}) cannot exceed --steps ({S})")
    seg_cfg = TINY_SEG[args.segmenter] if args.tiny else None
    gen_cfg = TINY_GEN[args.generator] if args.tiny else None
    common = {"device": args.device, "seed": args.seed, "batch_size": args.batch_size, "crop": args.crop}
    result: dict = {
        "benchmark": "joint", "claim": "Gong et al. WACV 2021: joint G-D-S training improves the segmenter",
        "generator": args.generator, "segmenter": args.segmenter, "adversarial": args.adversarial,
        "lambda": LAMBDA if args.lam is None else args.lam, "segmenter_steps": S,
        "pretrain_steps": [pg, ps], "generator_checkpoint": args.generator_checkpoint,
        "segmenter_checkpoint": args.segmenter_checkpoint, "segmenter_lr": args.seg_lr, "batch_size": args.batch_size, "crop": args.crop, "seed": args.seed,
        "tiny": args.tiny, "eval_size": args.eval_size or "full", "device": str(resolve_device(args.device)),
        "torch": torch.__version__, "python": platform.python_version(),
        "train_tiles": len(train_tiles), "heldout": {t: organ(t) for t in SEGMENT_HELDOUT},
    }

    t0 = time.perf_counter()
    if args.baseline:
        base_ck = Path(args.baseline)
        result["real_only_seconds"] = None
    else:
        base = train(args.segmenter, imgs, labs, steps=S, out=out_dir / "real_only.pt", config=seg_cfg,
                     init=args.segmenter_checkpoint, lr=args.seg_lr, val_fraction=0.0, eval_every=10**9, save_every=max(200, S), **common)
        base_ck = base.path
        result["real_only_seconds"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    kw = {} if args.lam is None else {"lam": args.lam}
    res = train_joint(args.generator, args.segmenter, imgs, labs, steps=pg + S, out=out_dir / "joint.pt",
                      pretrain_steps=(pg, ps), adversarial=args.adversarial,
                      generator_checkpoint=args.generator_checkpoint, generator_config=gen_cfg,
                      segmenter_checkpoint=args.segmenter_checkpoint, segmenter_lr=args.seg_lr,
                      segmenter_config=seg_cfg, save_every=max(200, pg + S), **common, **kw)
    result["joint_seconds"] = round(time.perf_counter() - t1, 1)
    seg_ck = res.metrics["segmenter_checkpoint"]
    result["checkpoints"] = {"real_only": str(base_ck), "joint": str(res.path), "joint_segmenter": seg_ck,
                             "joint_generator": res.metrics["generator_checkpoint"]}
    result["real_only"] = evaluate(args.segmenter, base_ck, ev_imgs, ev_labs, args.device)
    result["joint"] = evaluate(args.segmenter, seg_ck, ev_imgs, ev_labs, args.device)
    result["delta"] = {k: result["joint"][k] - result["real_only"][k] for k in ("aji", "pq")}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
