"""Train the SIAN generator on MoNuSeg training tiles and/or time its 256 x 256 render; prints one JSON object.

    python benchmarks/train_sian.py --split bench --steps 40000 --out bench-out/sian_bench.pt --log sian.jsonl
    python benchmarks/train_sian.py --split all --steps N --init bench-out/sian_bench.pt \
        --strip --out src/napari_nucsynth/data/models/sian_monuseg.pt
    OMP_NUM_THREADS=1 python benchmarks/train_sian.py --steps 0 --time-render     # the default config, untrained

``--split bench`` trains on the 24 tiles not in ``_data.SEGMENT_HELDOUT`` and validates (reconstruction L1 and
perceptual distance of the centre 256 x 256 of each) on those 6; ``--split all`` trains on all 30 (the shipped
default model). On the GAN core (:mod:`napari_nucsynth.models.gan`): Adam (0, 0.9), TTUR (generator lr / 2,
discriminator 2 lr with ``--lr`` 2e-4), hinge loss, feature matching 10, perceptual 10 in the shipped
segmenter's encoder (``--config '{"features": "vgg19-random"}'`` for the control), KL 0.05, EMA of the
generator. ``--resume`` continues a stopped run; ``--init`` starts from another checkpoint's weights (fresh
optimisers). ``--strip`` keeps only what rendering needs (the EMA generator and encoder). The checkpoint records
this command, the tiles and the feature network of the perceptual loss. The JSON reports training steps/s.

``--time-render`` times ``napari_nucsynth.models.sian.render`` of a 256 x 256 MoNuSeg crop in the style of
another tile on one thread (``torch.set_num_threads(1)``; set ``OMP_NUM_THREADS=1`` too), after two warm-up
renders: the median and minimum of ``--repeats`` runs, its parts (descriptor maps, style encoding, generator), and
the classic renderer on the same input as a baseline measured in the same run (these machines are noisy).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _gan_train import renderer_script, time_learned_render


def time_render(model, repeats: int) -> dict:
    """Seconds of one 256 x 256 render on one thread (see the module docstring)."""
    from napari_nucsynth.models import sian

    return time_learned_render(sian, model, repeats, style_code=sian.style_vector, style_part="style_encoding_s",
                               cond_part="descriptors_s", params=lambda n: not n.startswith("discriminator."))


def main() -> None:
    renderer_script("sian", __doc__, steps=40000, crop=256,
                    lr_help="SPADE's --lr (default 2e-4): G at lr/2, D at 2 lr",
                    config_help="JSON overrides of the SIAN config, e.g. '{\"ngf\": 24}'",
                    config_keys=("ngf", "ngf_max", "n_up", "hidden", "noise_nc", "style_dim", "tile"),
                    time_render=time_render)


if __name__ == "__main__":
    main()
