"""Where a GAN training step's time goes on this CPU, and which settings make it faster; prints one JSON object.

    OMP_NUM_THREADS=1 python benchmarks/profile_gan_step.py [--model sian|adain] [--repeats 5]

One training step of the GAN core (:func:`napari_nucsynth.models.gan.train_step`: discriminator, generator, EMA)
of the default ``sian`` or ``adain`` model on a batch of 4 MoNuSeg crops, timed (median of ``--repeats`` after a
warm-up) in several variants measured in the same process, so that their ratios hold on a noisy machine:
float32 against bfloat16 autocast (the core's ``amp``), channels-last memory format, ``torch.compile`` of the
generator (where a C++ compiler is present), crops of 128 against 256 px, half and double width. Also: the
seconds of the data side per sample (augmentation and the model's ``targets``) and the top operators of one
profiled step. The project keeps what is faster (docs/generators.md records the figures).
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
from _data import load_image, load_labels, tile_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["sian", "adain"], default="sian")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from napari_nucsynth.models import gan, get_model
    from napari_nucsynth.train import _augment, _default_collate

    spec = get_model(args.model)
    tile = tile_ids()[0]
    img, lab = load_image(tile), load_labels(tile)
    rng = np.random.default_rng(0)

    def batch_of(crop: int):
        samples = []
        t0 = time.perf_counter()
        for _ in range(args.batch_size):
            a, b = _augment(img, lab, crop, rng)
            samples.append((a, b, spec.targets(a, b)))
        per_sample = (time.perf_counter() - t0) / args.batch_size
        return _default_collate(samples, "cpu"), per_sample

    def clock(cfg: dict, crop: int, *, channels_last=False, compiled=False) -> float:
        torch.manual_seed(0)
        model = spec.build({**spec.default_config(), **cfg})
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if compiled:
            for name in model.G_MODULES:
                setattr(model, name, torch.compile(getattr(model, name)))
        opts = spec.optimizers(model, None)
        batch, _ = batch_of(crop)
        if channels_last:
            batch = {k: (v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4
                         else v) for k, v in batch.items()}
        gan.train_step(model, batch, opts, 0)
        gan.train_step(model, batch, opts, 1)  # warm-up: oneDNN (and the compiler) pick their kernels
        ts = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            gan.train_step(model, batch, opts, i + 2)
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    out: dict = {"model": args.model, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                 "bf16_native": gan.amp_dtype({"amp": "auto"}, "cpu") is not None}
    _, out["data_seconds_per_sample_128"] = batch_of(128)
    width_key = "width" if args.model == "adain" else "ngf"
    base_width = spec.default_config()[width_key]
    variants = {
        "fp32_128": ({"amp": "none"}, 128, {}),
        "bf16_128": ({"amp": "bf16"}, 128, {}),
        "bf16_128_channels_last": ({"amp": "bf16"}, 128, {"channels_last": True}),
        "fp32_128_channels_last": ({"amp": "none"}, 128, {"channels_last": True}),
        "bf16_256": ({"amp": "bf16"}, 256, {}),
        "bf16_128_half_width": ({"amp": "bf16", width_key: base_width / 2 if args.model == "adain"
                                 else int(base_width) // 2}, 128, {}),
        "bf16_128_double_width": ({"amp": "bf16", width_key: base_width * 2}, 128, {}),
    }
    if not args.no_compile:
        variants["bf16_128_compiled"] = ({"amp": "bf16"}, 128, {"compiled": True})
    secs = {}
    for name, (cfg, crop, kw) in variants.items():
        try:
            secs[name] = round(clock(cfg, crop, **kw), 4)
        except Exception as exc:  # torch.compile needs a working C++ toolchain
            secs[name] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
    out["step_seconds_median"] = secs
    base = secs["fp32_128"]
    out["relative_to_fp32_128"] = {k: round(v / base, 3) for k, v in secs.items() if isinstance(v, float)}

    from torch.profiler import profile

    torch.manual_seed(0)
    model = spec.build(spec.default_config())
    opts = spec.optimizers(model, None)
    batch, _ = batch_of(128)
    gan.train_step(model, batch, opts, 0)
    with profile() as prof:
        gan.train_step(model, batch, opts, 1)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    out["profile_top_ops_share"] = {e.key: round(e.self_cpu_time_total / total, 3) for e in rows}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
