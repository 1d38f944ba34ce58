"""Do the histology features carry signal? SIAN trained twice on the same data with the same seed, its perceptual
loss computed in the shipped segmenter's encoder (the default) or in a random VGG-19 (the old fallback where no
ImageNet weights exist); prints one JSON object.

    OMP_NUM_THREADS=1 python benchmarks/bench_features.py --steps 800 --out-dir bench-out/features

Both runs: the default SIAN config on 128-px crops of the 24 training tiles of ``_data.SEGMENT_HELDOUT``'s split,
batch 4, the core's defaults; they differ only in ``features``. Each run is stopped at 0, 1/4, 1/2, 3/4 and all of
``--steps`` (an exact resume continues it) and its EMA generator evaluated on the 6 held-out tiles: the centre
256 x 256 of each, rendered from its own labels in its own style (seed 0), against the real crop:

- ``l1``: mean absolute difference (intensities in [0, 1]);
- ``perc_hovernet`` and ``perc_vgg_random``: the perceptual distance in each feature network (the core's
  weighting), so each run is also judged in the other's features;
- ``pq``: the shipped segmenter's PQ on the render against the labels it was rendered from (mask fidelity), a
  measure neither run trains on.

The claim checked: with the histology features these distances fall during training (and mask fidelity rises)
more than with random VGG features.
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
from _data import SEGMENT_HELDOUT, load_image, load_labels, tile_ids


def _evaluate(path, v_imgs, v_labs, nets) -> dict:
    import torch

    from napari_nucsynth.metrics import instance_metrics
    from napari_nucsynth.models import gan
    from napari_nucsynth.models import sian as S
    from napari_nucsynth.render.sian import load_model
    from napari_nucsynth.segment import segment

    model = load_model(path, "cpu")
    rows = []
    for img, lab in zip(v_imgs, v_labs):
        r0, c0 = (img.shape[0] - 256) // 2, (img.shape[1] - 256) // 2
        im, lb = img[r0 : r0 + 256, c0 : c0 + 256], lab[r0 : r0 + 256, c0 : c0 + 256]
        out = S.render(model, lb, im, seed=0)
        fake = torch.from_numpy(out.transpose(2, 0, 1).astype(np.float32) / 255)[None]
        real = torch.from_numpy(im.transpose(2, 0, 1).astype(np.float32) / 255)[None]
        row = {"l1": float((fake - real).abs().mean())}
        with torch.no_grad():
            for name, net in nets.items():
                row[f"perc_{name}"] = float(gan.perceptual(net, fake, real, model.config["perc_weights"]))
        row["pq"] = float(instance_metrics(lb, segment(out, method="hovernet"))["pq"])
        rows.append(row)
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--points", type=int, default=4, help="evaluations after step 0")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--config", default="{}", help="JSON overrides of the SIAN config (both runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="bench-out/features")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from napari_nucsynth.models import load_checkpoint
    from napari_nucsynth.models.features import load_features
    from napari_nucsynth.train import train

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles = tile_ids()
    train_tiles = [t for t in tiles if t not in SEGMENT_HELDOUT]
    imgs, labs = [load_image(t) for t in train_tiles], [load_labels(t) for t in train_tiles]
    v_imgs, v_labs = [load_image(t) for t in SEGMENT_HELDOUT], [load_labels(t) for t in SEGMENT_HELDOUT]
    nets = {"hovernet": load_features("hovernet"), "vgg_random": load_features("vgg19-random")}
    t_start = time.perf_counter()
    result: dict = {"benchmark": "feature networks of the perceptual loss (SIAN, same data and seed)",
                    "steps": args.steps, "crop": args.crop, "batch_size": args.batch_size, "runs": {}}
    for features in ("hovernet", "vgg19-random"):
        path = out_dir / f"sian_{features}.pt"
        cfg = {**json.loads(args.config), "features": features}
        kw = {"steps": args.steps, "out": path, "crop": args.crop, "batch_size": args.batch_size, "seed": args.seed,
              "val_fraction": 0, "eval_every": 10**9, "save_every": 10**9, "device": "cpu"}
        done = [0]

        def on_update(u, done=done):
            if u.kind == "step":
                done[0] = u.step

        curve = []
        t0 = time.perf_counter()
        train("sian", imgs, labs, **kw, config=cfg, should_stop=lambda: True)  # step 0: the initial weights
        assert load_checkpoint(path)["step"] == 0
        curve.append({"step": 0, **_evaluate(path, v_imgs, v_labs, nets)})
        for k in range(1, args.points + 1):
            target = args.steps * k // args.points
            res = train("sian", imgs, labs, **kw, resume=path, on_update=on_update,
                        should_stop=lambda t=target: done[0] >= t)
            curve.append({"step": res.step, **_evaluate(path, v_imgs, v_labs, nets)})
            print(json.dumps({"features": features, **curve[-1]}), file=sys.stderr, flush=True)
        result["runs"][features] = {"curve": curve, "train_seconds": round(time.perf_counter() - t0, 1),
                                    "features_source": load_checkpoint(path)["config"]["features_source"]}
    first = {f: r["curve"][0] for f, r in result["runs"].items()}
    last = {f: r["curve"][-1] for f, r in result["runs"].items()}
    result["change_first_to_last"] = {f: {k: round(last[f][k] - first[f][k], 4) for k in last[f] if k != "step"}
                                      for f in last}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
