"""Train the DRIT++-style stain/modality transfer model on MoNuSeg training tiles; prints one JSON object.

    python benchmarks/train_drit.py --split bench --steps 20000 --out bench-out/drit_bench.pt --log drit.jsonl
    python benchmarks/train_drit.py --split bench --steps 20000 --resume bench-out/drit_bench.pt \
        --out bench-out/drit_bench.pt
    python benchmarks/train_drit.py --split all --steps 5000 --init bench-out/drit_bench.pt --strip \
        --out src/napari_nucsynth/data/models/drit_monuseg.pt
    OMP_NUM_THREADS=1 python benchmarks/train_drit.py --steps 3 --crop 128 --out /tmp/drit_speed.pt   # step time

The tiles are first clustered into ``--domains`` stain/modality domains (Liu et al.: k-means on HSV statistics of
CLAHE-equalised tiles, :func:`napari_nucsynth.stain.stain_domains`); images only, no labels are read. ``--split
bench`` trains on the 24 tiles not in ``_data.SEGMENT_HELDOUT`` and validates on those 6 (each assigned to the
nearest training domain): self-reconstruction L1, and for held-out pairs of different domains the mean-optical-
density ratio (``od_ratio``, target <= 0.5) and the haematoxylin correlation of the result with its source
(``h_corr``); ``--split all`` trains on all 30 (the shipped model). The one training loop
(:func:`napari_nucsynth.train.train`) with :mod:`napari_nucsynth.models.drit`'s own step on the GAN core's pieces
(PatchGAN, hinge, EMA, two time-scale Adam, bf16 autocast). ``--resume`` continues a stopped run; ``--init``
starts from another checkpoint's weights (fresh optimisers). At the end the mean style code of each domain (EMA
style encoder, centre 512 x 512 of each training tile) is written into the checkpoint's config
(``domain_styles``), so ``stain.transfer(image, k, method="drit")`` restains to domain ``k`` without a reference
image. ``--strip`` keeps only what transfer needs (the EMA modules). The JSON reports steps/s.
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
from _data import SEGMENT_HELDOUT, load_image, organ, tile_ids


def cluster(train_imgs, val_imgs, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Domains of the training tiles (:func:`stain_domains`) and of the held-out ones (the nearest training
    domain's centre, in the features standardised by the training tiles)."""
    from napari_nucsynth.stain import stain_domains, stain_features

    f_tr = np.stack([stain_features(im) for im in train_imgs])
    d_tr = stain_domains(f_tr, k, seed=seed)
    if not val_imgs:
        return d_tr, np.zeros(0, np.int64)
    f_va = np.stack([stain_features(im) for im in val_imgs])
    mu, sd = f_tr.mean(0), f_tr.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z_tr, z_va = (f_tr - mu) / sd, (f_va - mu) / sd
    centres = np.stack([z_tr[d_tr == j].mean(0) for j in range(k)])
    d_va = ((z_va[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    return d_tr, d_va.astype(np.int64)


def domain_styles(ckpt_path, imgs, doms, k: int) -> list[list[float]]:
    """Mean style code (EMA encoder) of each domain over the centre 512 x 512 of its tiles."""
    from napari_nucsynth.models import drit

    model = drit.load_model(ckpt_path, "cpu")
    out = []
    for j in range(k):
        codes = [drit.encode_style(model, drit._center(im, 512))[0] for im, d in zip(imgs, doms) if d == j]
        out.append([round(float(v), 6) for v in np.mean(codes, 0)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["bench", "all"], default="bench")
    ap.add_argument("--domains", type=int, default=3, help="number of stain domains (k-means k)")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="default 2e-4: G at lr/2, D at 2 lr")
    ap.add_argument("--config", default="{}", help="JSON overrides of the drit config, e.g. '{\"ngf\": 24}'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", required=True, help="the checkpoint to write")
    ap.add_argument("--resume")
    ap.add_argument("--init", help="start from this checkpoint's weights (new optimisers and schedule)")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--log", help="append one JSON line per --log-every steps (and every validation) here")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--preview-every", type=int, default=0, help="write a preview PNG every N steps")
    ap.add_argument("--preview-dir", default="bench-out/drit_previews")
    ap.add_argument("--strip", action="store_true",
                    help="at the end, keep only what transfer needs (no optimiser, random state, discriminators)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_nucsynth.models import load_checkpoint, save_checkpoint
    from napari_nucsynth.models.drit import domain_maps
    from napari_nucsynth.train import train

    t0 = time.perf_counter()
    tiles = tile_ids()
    val = [t for t in SEGMENT_HELDOUT if t in tiles] if args.split == "bench" else []
    train_tiles = [t for t in tiles if t not in val]
    imgs, v_imgs = [load_image(t) for t in train_tiles], [load_image(t) for t in val]
    k = int(args.domains)
    if args.resume:  # the run's own domains (the clustering is seeded, but the tiles could have changed)
        ck0 = load_checkpoint(args.resume, kind="drit")
        saved = ck0["train_data"].get("domains", {})
        d_tr = np.array([saved[t] for t in train_tiles], np.int64)
        d_va = np.array([ck0["train_data"].get("val_domains", {})[t] for t in val], np.int64)
        k = int(ck0["config"]["n_domains"])
        start = int(ck0["step"])
    else:
        d_tr, d_va = cluster(imgs, v_imgs, k, args.seed)
        start = 0
    config = {**json.loads(args.config), "n_domains": k}

    clock: list[tuple[int, float]] = []  # (step, seconds) of the step events: steps/s without validation and saves

    def on_update(u):
        if u.kind == "step":
            clock.append((u.step, u.seconds))
        if args.log and (u.kind == "validation" or (u.kind == "step" and u.step % args.log_every == 0)):
            with open(args.log, "a") as log:
                log.write(json.dumps({"kind": u.kind, "step": u.step, "losses": u.losses, "metrics": u.metrics,
                                      "seconds": round(u.seconds, 1)}) + "\n")
        if u.kind == "preview" and u.image is not None:
            import imageio.v3 as iio

            Path(args.preview_dir).mkdir(parents=True, exist_ok=True)
            iio.imwrite(Path(args.preview_dir) / f"step{u.step:06d}.png", u.image)

    res = train("drit", imgs, domain_maps(imgs, d_tr), steps=args.steps, out=args.out, resume=args.resume,
                init=args.init, config=config, device=args.device, seed=args.seed, batch_size=args.batch_size,
                crop=args.crop, lr=args.lr, val_fraction=0, val_images=v_imgs or None,
                val_labels=domain_maps(v_imgs, d_va) if v_imgs else None, eval_every=args.eval_every,
                save_every=args.save_every, preview_every=args.preview_every, on_update=on_update,
                train_data={"dataset": "MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0), images only",
                            "tiles": train_tiles, "val_tiles": val,
                            "domains": {t: int(d) for t, d in zip(train_tiles, d_tr)},
                            "val_domains": {t: int(d) for t, d in zip(val, d_va)},
                            "clustering": f"stain.stain_domains(k={k}, seed={args.seed}) on the training tiles",
                            "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                            "init": args.init, "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr,
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    ck = load_checkpoint(res.path, kind="drit")
    cfg = {**ck["config"], "domain_styles": domain_styles(res.path, imgs, d_tr, k)}
    if args.strip:
        from napari_nucsynth.models.gan import SHIPPED_PREFIX

        save_checkpoint(res.path, kind="drit", config=cfg, step=ck["step"], metrics=ck["metrics"],
                        train_data=ck["train_data"],
                        state_dict={n: v for n, v in ck["state_dict"].items() if n.startswith(SHIPPED_PREFIX)})
    else:
        save_checkpoint(res.path, kind="drit", config=cfg, step=ck["step"], metrics=ck["metrics"],
                        train_data=ck["train_data"], state_dict=ck["state_dict"], optimizer=ck.get("optimizer"),
                        rng=ck.get("rng"))
    steps_run = res.step - start
    # the loop's rate from the first to the last step event: the final validation and save are not in it
    loop = (clock[-1][0] - clock[0][0]) / max(clock[-1][1] - clock[0][1], 1e-9) if len(clock) > 1 else None
    print(json.dumps({
        "checkpoint": str(res.path), "step": res.step, "stopped": res.stopped, "metrics": res.metrics,
        "domains": {str(j): [f"{t} ({organ(t)})" for t, d in zip(train_tiles, d_tr) if d == j] for j in range(k)},
        "val_domains": {t: int(d) for t, d in zip(val, d_va)},
        "train_seconds": round(res.seconds, 1), "steps_per_s": round(steps_run / max(res.seconds, 1e-9), 3),
        "steps_per_s_between_steps": None if loop is None else round(loop, 3),
        "batch_size": args.batch_size, "crop": args.crop,
        "threads": torch.get_num_threads(), "size_mb": round(Path(res.path).stat().st_size / 2**20, 2),
        "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
