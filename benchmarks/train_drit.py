"""Train the DRIT++-style stain/modality transfer model on MoNuSeg training tiles; prints one JSON object.

    python benchmarks/train_drit.py --split bench --steps 20000 --out bench-out/drit_bench.pt --log drit.jsonl
    python benchmarks/train_drit.py --split bench --steps 20000 --resume bench-out/drit_bench.pt \
        --out bench-out/drit_bench.pt
    python benchmarks/train_drit.py --split all --steps 5000 --init bench-out/drit_bench.pt --strip \
        --out src/napari_nucsynth/data/models/drit_monuseg.pt
    OMP_NUM_THREADS=1 python benchmarks/train_drit.py --steps 20 --crop 128 --threads 1 --eval-every 0 \
        --out /tmp/drit_speed.pt                                                                # step time

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
image. ``--strip`` keeps only what transfer needs (the EMA modules). The JSON reports steps/s (wall time, which
another job on the machine slows) and ``cpu_s_per_step_between_steps``, the process's CPU time (``time.process_time``,
all its threads) per step from the first to the last step of the loop, without the validation at the end: the
figure to compare across runs on a shared machine (with ``--threads 1`` it is the single thread's time).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
from _data import organ
from _gan_train import add_common_args, load_split, logger, parser, pick, run


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
    ap = parser(__doc__)
    add_common_args(ap, steps=20000, crop=128, preview_dir="bench-out/drit_previews",
                    lr_help="default 2e-4: G at lr/2, D at 2 lr",
                    config_help="JSON overrides of the drit config, e.g. '{\"ngf\": 24}'",
                    out_required=True, out_help="the checkpoint to write",
                    strip_help="at the end, keep only what transfer needs (no optimiser, random state, "
                               "discriminators)",
                    before={"--steps": lambda ap: ap.add_argument("--domains", type=int, default=3,
                                                                  help="number of stain domains (k-means k)"),
                            "--out": lambda ap: ap.add_argument("--threads", type=int, default=None,
                                                                help="torch.set_num_threads (default: torch's)")})
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from napari_nucsynth.models import load_checkpoint
    from napari_nucsynth.models.drit import domain_maps

    t0 = time.perf_counter()
    train_tiles, val, imgs, _, v_imgs, _ = load_split(args.split, labels=False)
    k = int(args.domains)
    if args.resume:  # the run's own domains (the clustering is seeded, but the tiles could have changed)
        ck0 = load_checkpoint(args.resume, kind="drit")
        saved = ck0["train_data"].get("domains", {})
        d_tr = np.array([saved[t] for t in train_tiles], np.int64)
        d_va = np.array([ck0["train_data"].get("val_domains", {})[t] for t in val], np.int64)
        k = int(ck0["config"]["n_domains"])
    else:
        d_tr, d_va = cluster(imgs, v_imgs, k, args.seed)
    config = {**json.loads(args.config), "n_domains": k}

    clock: list[tuple[int, float, float]] = []  # (step, wall s, CPU s) of the step events: without the final validation
    log = logger(args)

    def on_update(u):
        if u.kind == "step":
            clock.append((u.step, u.seconds, time.process_time()))
        log(u)

    out = run("drit", args, imgs, domain_maps(imgs, d_tr), v_imgs, domain_maps(v_imgs, d_va) if v_imgs else None,
              config=config, tiles=train_tiles, val_tiles=val, on_update=on_update,
              dataset="MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0), images only",
              extra_train_data={"domains": {t: int(d) for t, d in zip(train_tiles, d_tr)},
                                "val_domains": {t: int(d) for t, d in zip(val, d_va)},
                                "clustering": f"stain.stain_domains(k={k}, seed={args.seed}) on the training tiles"},
              add_config=lambda path: {"domain_styles": domain_styles(path, imgs, d_tr, k)})
    # the loop's rate from the first to the last step event: the final validation and save are not in it
    loop = (clock[-1][0] - clock[0][0]) / max(clock[-1][1] - clock[0][1], 1e-9) if len(clock) > 1 else None
    cpu = (clock[-1][2] - clock[0][2]) / (clock[-1][0] - clock[0][0]) if len(clock) > 1 else None
    print(json.dumps({
        **pick(out, "checkpoint step stopped metrics"),
        "domains": {str(j): [f"{t} ({organ(t)})" for t, d in zip(train_tiles, d_tr) if d == j] for j in range(k)},
        "val_domains": {t: int(d) for t, d in zip(val, d_va)}, **pick(out, "train_seconds steps_per_s"),
        "steps_per_s_between_steps": None if loop is None else round(loop, 3),
        "cpu_s_per_step_between_steps": None if cpu is None else round(cpu, 3),
        "batch_size": args.batch_size, "crop": args.crop,
        "threads": torch.get_num_threads(), "size_mb": out["checkpoint_mb"],
        "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
