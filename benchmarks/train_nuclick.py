"""Train the NuClick-style click-to-mask network (``napari_nucsynth.models.nuclick``) on MoNuSeg training tiles;
prints one JSON object at the end.

    OMP_NUM_THREADS=2 python benchmarks/train_nuclick.py --split bench --steps 20000 \
        --out bench-out/nuclick_bench.pt --log bench-out/nuclick_bench.jsonl
    python benchmarks/bench_clicks.py --nuclick bench-out/nuclick_bench.pt --methods nuclick,hovernet
    python benchmarks/train_nuclick.py --split all --steps 20000 --strip \
        --out src/napari_nucsynth/data/models/nuclick_monuseg.pt

``--split bench`` trains on the 24 tiles not in ``_data.SEGMENT_HELDOUT`` (what ``bench_clicks.py`` evaluates);
``--split all`` on all 30 (the model to ship); ``--add-heldout N`` adds the first N held-out tiles to the bench
split, to measure on the other 6 - N what more tiles give. A step is ``--batch-size`` crops of ``--crop`` px with up
to 8 clicked nuclei each (``nuclick.CLICKS_PER_CROP``): ``--batch-size 4`` trains on up to 32 patches a step.
``--config`` sets the model (JSON over ``nuclick.default_config()``, e.g. ``'{"context": "hovernet", "width": 8}'``:
the shipped HoVer-Net's maps as extra input channels). ``--init CKPT`` fine-tunes a trained model (with ``--config
'{"refine": 16}'``: a full-resolution refinement added to it, starting as the identity). ``--resume`` continues a
stopped run (Ctrl-C or SIGTERM saves first; so does ``--minutes M`` after M minutes); ``--eval-every N`` fits the
true centroids of the held-out tiles not trained on every N steps (AJI, PQ, Dice in the log; monitoring only: choose
nothing on them). The checkpoint records this command and the tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _data import SEGMENT_HELDOUT, load_image, load_labels, tile_ids

from napari_nucsynth.train import AUGMENTATIONS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["bench", "all"], default="bench")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=4, help="crops per step (default 4)")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--config", default="", help="model config as JSON over the defaults")
    ap.add_argument("--augment", choices=AUGMENTATIONS, default="basic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume")
    ap.add_argument("--init", help="fine-tune from this nuclick checkpoint (its weights; step 0, a new schedule); "
                                   "--config may add a refinement ('{\"refine\": 16}'), which starts as the identity")
    ap.add_argument("--log", help="append one JSON line per 50 steps (and each validation) here")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="with --split bench: fit the true centroids of the held-out tiles not trained on every N "
                    "steps (0: never)")
    ap.add_argument("--add-heldout", type=int, default=0, metavar="N",
                    help="with --split bench: train on the first N held-out tiles too, so that what more tiles give "
                    "is measured on the other 6 - N (bench_clicks.py's per_tile)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=0,
                    help="stop (and save) after this many minutes of wall time; --resume continues (0: no limit)")
    ap.add_argument("--strip", action="store_true",
                    help="at the end, drop the optimiser and random state (a smaller file to ship; cannot resume)")
    args = ap.parse_args()

    import torch

    from napari_nucsynth.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = json.loads(args.config) if args.config else None
    tiles = tile_ids()
    if args.add_heldout and (args.split != "bench" or not 0 < args.add_heldout < len(SEGMENT_HELDOUT)):
        raise SystemExit(f"--add-heldout needs --split bench and 1-{len(SEGMENT_HELDOUT) - 1} tiles")
    if args.split == "bench":
        tiles = [t for t in tiles if t not in SEGMENT_HELDOUT[args.add_heldout:]]
    imgs, labs = [load_image(t) for t in tiles], [load_labels(t) for t in tiles]
    val = {}
    if args.eval_every:
        if args.split != "bench":
            raise SystemExit("--eval-every needs --split bench (the held-out tiles)")
        unseen = SEGMENT_HELDOUT[args.add_heldout:]
        val = {"val_images": [load_image(t) for t in unseen], "val_labels": [load_labels(t) for t in unseen],
               "eval_every": args.eval_every}
    t0 = time.perf_counter()
    first = {}

    def on_update(u):
        if u.kind == "step" and "step" not in first:
            first.update(step=u.step, seconds=u.seconds)
        if args.log and (u.kind != "step" or u.step % 50 == 0):
            with open(args.log, "a") as log:
                log.write(json.dumps({"kind": u.kind, "step": u.step, "losses": u.losses, "metrics": u.metrics,
                                      "seconds": round(u.seconds, 1)}) + "\n")

    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    res = train("nuclick", imgs, labs, steps=args.steps, out=args.out, resume=args.resume, init=args.init,
                config=config, device=args.device, seed=args.seed, batch_size=args.batch_size, crop=args.crop,
                lr=args.lr, augment=args.augment, val_fraction=0, save_every=args.save_every, on_update=on_update,
                should_stop=lambda: stop["flag"] or (args.minutes > 0 and time.perf_counter() - t0 > 60 * args.minutes),
                **val,
                train_data={"dataset": "MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0)", "tiles": tiles,
                            "split": args.split,
                            "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                            "batch_size": args.batch_size, "crop": args.crop, "augment": args.augment,
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    if args.strip:
        from napari_nucsynth.models import load_checkpoint, save_checkpoint

        ck = load_checkpoint(res.path, kind="nuclick")
        save_checkpoint(res.path, kind="nuclick", config=ck["config"], step=ck["step"], metrics=ck["metrics"],
                        train_data=ck["train_data"], state_dict=dict(ck["state_dict"]))
    done = res.step - (first.get("step", 1) - 1)
    secs = res.seconds
    print(json.dumps({"checkpoint": str(res.path), "step": res.step, "stopped": res.stopped,
                      "steps_this_run": done, "seconds": round(time.perf_counter() - t0, 1),
                      "steps_per_s": round(done / secs, 3) if secs > 0 else None,
                      "threads": torch.get_num_threads(), "metrics": res.metrics}))


if __name__ == "__main__":
    main()
