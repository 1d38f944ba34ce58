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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _gan_train import renderer_script, time_learned_render


def time_render(model, repeats: int) -> dict:
    """Seconds of one 256 x 256 render on one thread (see the module docstring)."""
    from napari_nucsynth.models import pix2pixhd as P

    return time_learned_render(P, model, repeats, style_code=P.style_vector, style_part="style_encoding_s",
                               cond_part="conditioning_s", params=lambda n: n.startswith(("generator.", "encoder.")))


def main() -> None:
    renderer_script("pix2pixhd", __doc__, steps=20000, crop=128,
                    lr_help="the core's --lr (default 2e-4): G at lr/2, D at 2 lr",
                    config_help="JSON overrides of the pix2pixhd config, e.g. '{\"ngf\": 12}'",
                    config_keys=("ngf", "ngf_max", "n_down", "n_blocks", "n_local_blocks", "cca_recurrence", "noise_nc",
                                 "style_dim", "style_source", "tile"),
                    time_render=time_render)


if __name__ == "__main__":
    main()
