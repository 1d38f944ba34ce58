"""Train DAFF-GAN's masks -> H&E renderer (pix2pixHD + criss-cross attention) on MoNuSeg tiles and/or time its
256 x 256 render; prints one JSON object.

    python benchmarks/train_pix2pixhd.py --split bench --steps 20000 --crop 128 --out bench-out/pix2pixhd_bench.pt \
        --log bench-out/pix2pixhd.jsonl --preview-every 1000
    python benchmarks/train_pix2pixhd.py --split bench --steps 20000 --crop 128 --resume bench-out/pix2pixhd_bench.pt \
        --out bench-out/pix2pixhd_bench.pt --log bench-out/pix2pixhd.jsonl          # continue a stopped run
    python benchmarks/train_pix2pixhd.py --split all --steps N --init bench-out/pix2pixhd_bench.pt --strip \
        --out src/napari_nucsynth/data/models/pix2pixhd_monuseg.pt
    OMP_NUM_THREADS=1 python benchmarks/train_pix2pixhd.py --steps 0 --time-render   # the default config, untrained

``--split bench`` trains on the 24 tiles not in ``_data.SEGMENT_HELDOUT`` and validates (reconstruction L1 and
perceptual distance of the centre 256 x 256 of each) on those 6; ``--split all`` trains on all 30 (the shipped
default model). On the GAN core (:mod:`napari_nucsynth.models.gan`): Adam (0, 0.9), TTUR (generator and style
encoder at lr / 2, discriminator at 2 lr with ``--lr`` 2e-4), hinge loss, feature matching 10, perceptual 10 in the
shipped segmenter's encoder, KL 0.05, EMA of the generator and encoder, bf16 autocast where the CPU has it.
``--resume`` continues a stopped run (same config, optimiser and random state); ``--init`` starts from another
checkpoint's weights (fresh optimisers). ``--strip`` keeps only what rendering needs (the EMA generator and
encoder). The checkpoint records this command and the tiles. The JSON reports training steps/s.

``--time-render`` times ``napari_nucsynth.models.pix2pixhd.render`` of a 256 x 256 MoNuSeg crop in the style of
another tile on one thread (``torch.set_num_threads(1)``; set ``OMP_NUM_THREADS=1`` too), after two warm-up
renders: the median and minimum of ``--repeats`` runs (and the median CPU time of the process, which other jobs
on the machine do not inflate), its parts, and the classic renderer on the same input as a baseline measured in the
same run (these machines are noisy). Target: <= 0.3 s.
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

KIND = "pix2pixhd"


def time_render(model, repeats: int) -> dict:
    """Seconds of one 256 x 256 render on one thread (see the module docstring)."""
    import numpy as np
    import torch

    from napari_nucsynth.models import pix2pixhd as P
    from napari_nucsynth.render import render as render_method

    torch.set_num_threads(1)
    lab = load_labels(SEGMENT_HELDOUT[0])[:256, :256]
    style = load_image(SEGMENT_HELDOUT[1])[:256, :256]
    model = model.cpu().eval()

    cpu: list[float] = []

    def clock(fn, n):
        fn()
        fn()  # warm-up: oneDNN picks its kernels on the first calls
        ts, cs = [], []
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            ts.append(time.perf_counter() - t0)
            cs.append(time.process_time() - c0)
        cpu[:] = [float(np.median(cs))]
        return float(np.median(ts)), float(np.min(ts))

    med, mn = clock(lambda: P.render(model, lab, style, seed=0), repeats)
    med_cpu = cpu[0]
    z = P.style_vector(model, style)
    parts = {"conditioning_s": clock(lambda: P.conditioning(lab), repeats)[0],
             "style_encoding_s": clock(lambda: P.style_vector(model, style), repeats)[0],
             "generator_s": clock(lambda: P._render_float(model, lab, z, 0), repeats)[0]}
    classic = clock(lambda: render_method(lab, style, method="classic", seed=0), max(3, repeats // 2))[0]
    return {"render_256_median_s": round(med, 4), "render_256_min_s": round(mn, 4),
            "render_256_cpu_median_s": round(med_cpu, 4), "repeats": repeats,
            **{k: round(v, 4) for k, v in parts.items()}, "classic_256_median_s": round(classic, 4),
            "ratio_to_classic": round(med / classic, 3), "target_s": 0.3, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "params_generator_encoder": sum(p.numel() for n, p in model.named_parameters()
                                            if n.startswith(("generator.", "encoder.")))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["bench", "all"], default="bench")
    ap.add_argument("--steps", type=int, default=20000, help="0: no training (with --time-render: the default "
                                                               "config, untrained)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="the core's --lr (default 2e-4): G at lr/2, D at 2 lr")
    ap.add_argument("--config", default="{}", help="JSON overrides of the pix2pixhd config, e.g. '{\"ngf\": 12}'")
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
    ap.add_argument("--preview-dir", default="bench-out/pix2pixhd_previews")
    ap.add_argument("--strip", action="store_true",
                    help="at the end, keep only what rendering needs (no optimiser, random state, discriminator)")
    ap.add_argument("--time-render", action="store_true", help="time the 256 x 256 render on one thread")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    import torch

    from napari_nucsynth.models import get_model, load_checkpoint, save_checkpoint

    result: dict = {"kind": KIND}
    t0 = time.perf_counter()
    if args.steps > 0:
        if not args.out:
            ap.error("--out is required when training")
        from napari_nucsynth.train import train

        tiles = tile_ids()
        val = [t for t in SEGMENT_HELDOUT if t in tiles] if args.split == "bench" else []
        train_tiles = [t for t in tiles if t not in val]
        imgs, labs = [load_image(t) for t in train_tiles], [load_labels(t) for t in train_tiles]
        v_imgs, v_labs = [load_image(t) for t in val], [load_labels(t) for t in val]

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
        res = train(KIND, imgs, labs, steps=args.steps, out=args.out, resume=args.resume, init=args.init,
                    config=json.loads(args.config), device=args.device, seed=args.seed, batch_size=args.batch_size,
                    crop=args.crop, lr=args.lr, val_fraction=0, val_images=v_imgs or None,
                    val_labels=v_labs or None, eval_every=args.eval_every, save_every=args.save_every,
                    preview_every=args.preview_every, on_update=on_update,
                    train_data={"dataset": "MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0)", "tiles": train_tiles,
                                "val_tiles": val,
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
                       "metrics": res.metrics, "features_source": ck["config"].get("features_source"),
                       "train_seconds": round(res.seconds, 1),
                       "steps_per_s": round((res.step - start) / max(res.seconds, 1e-9), 3),
                       "checkpoint_mb": round(Path(res.path).stat().st_size / 2**20, 2)})
    if args.time_render:
        spec = get_model(KIND)
        if args.steps > 0 or args.resume or args.init:
            from napari_nucsynth.render.pix2pixhd import load_model

            model = load_model(args.out if args.steps > 0 else (args.resume or args.init), "cpu")
            result["timed"] = "checkpoint"
        else:
            torch.manual_seed(args.seed)
            model = spec.build({**spec.default_config(), **json.loads(args.config)})
            result["timed"] = "default config, untrained"
        result["config"] = {k: v for k, v in model.config.items() if k in (
            "ngf", "ngf_max", "n_down", "n_blocks", "n_local_blocks", "cca_recurrence", "noise_nc", "style_dim",
            "tile")}
        result.update(time_render(model, args.repeats))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
