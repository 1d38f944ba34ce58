"""Average (a "model soup" of) segmenter checkpoints fine-tuned from the same weights, with BatchNorm statistics
re-estimated on the split's MoNuSeg training tiles; prints one JSON object.

    python benchmarks/average_hovernet.py --split bench --out bench-out/hovernet_bench_soup.pt \
        bench-out/hovernet_bench_ft2.pt bench-out/hovernet_bench_syn.pt bench-out/hovernet_bench_real1500.pt

``--split bench``: the 24 tiles not in ``_data.SEGMENT_HELDOUT`` (the checkpoints must not have seen those
either); ``--split all``: all 30 (for the shipped model). See :func:`napari_nucsynth.train.average_checkpoints`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _data import SEGMENT_HELDOUT, load_image, load_labels, tile_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--split", choices=["bench", "all"], default="bench")
    ap.add_argument("--out", required=True)
    ap.add_argument("--bn-batches", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from napari_nucsynth.models import load_checkpoint
    from napari_nucsynth.train import average_checkpoints

    tiles = tile_ids()
    if args.split == "bench":
        tiles = [t for t in tiles if t not in SEGMENT_HELDOUT]
        for c in args.checkpoints:
            seen = set(load_checkpoint(c)["train_data"].get("tiles", [])) & set(SEGMENT_HELDOUT)
            if seen:
                sys.exit(f"{c} was trained on held-out tiles {sorted(seen)}")
    t0 = time.perf_counter()
    command = "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    path = average_checkpoints(args.checkpoints, args.out, images=[load_image(t) for t in tiles],
                               labels=[load_labels(t) for t in tiles], bn_batches=args.bn_batches, seed=args.seed,
                               device=args.device, train_data={"command": command, "tiles": tiles})
    print(json.dumps({"out": str(path), "averaged": args.checkpoints, "split": args.split, "tiles": len(tiles),
                      "bn_batches": args.bn_batches, "seconds": round(time.perf_counter() - t0, 1),
                      "command": command}, indent=1))


if __name__ == "__main__":
    main()
