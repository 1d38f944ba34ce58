"""The VGG-19 feature encoder shared by AdaIN (Gong et al.'s refine-synthesis) and the perceptual losses, offline.

ImageNet weights cannot be downloaded on these machines (nor, often, on a hospital workstation), so
:func:`load_vgg19` never downloads. It looks for torchvision's file ``vgg19-dcbb9e9d.pth`` (or any file given):

1. ``weights`` when it is a path (a torchvision VGG-19 state dict, whole model or ``features`` only);
2. ``$NUCSYNTH_VGG19``;
3. torch's hub cache (``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``, where
   ``torchvision.models.vgg19(weights="IMAGENET1K_V1")`` would have saved it);
4. the plugin's model folder (:func:`napari_nucsynth.models.checkpoint_dir`).

When none is found (or ``weights="random"``) the **documented fallback** is VGG-19 with torchvision's
initialisation drawn from a fixed seed: random convolutional features still carry the colour and texture
statistics AdaIN transfers (Ulyanov et al., 2018; He et al., "A powerful generative model using random weights
for the deep image representation", 2016), and a decoder trained against them inverts them well; what is lost is
ImageNet's semantic tuning of the deeper layers. Every encoder reports its ``source`` ("imagenet:<file>" or
"random:seed<N>"), which the models record in their checkpoints and outputs. Because models keep the encoder's
weights in their own checkpoints, a trained model renders identically wherever it is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .features import FeatureNet

__all__ = ["LAYERS", "VGG_FILE", "VGGEncoder", "find_vgg19_weights", "load_vgg19"]

#: torchvision's file name of the ImageNet VGG-19 weights
VGG_FILE = "vgg19-dcbb9e9d.pth"

#: the layers an encoder can stop at, with the index in ``torchvision.models.vgg19().features`` after which
#: each is available
LAYERS = {"relu1_1": 2, "relu2_1": 7, "relu3_1": 12, "relu4_1": 21, "relu5_1": 30}

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_CHANNELS = {"relu1_1": 64, "relu2_1": 128, "relu3_1": 256, "relu4_1": 512, "relu5_1": 512}
_STRIDES = {"relu1_1": 1, "relu2_1": 2, "relu3_1": 4, "relu4_1": 8, "relu5_1": 16}


class VGGEncoder(FeatureNet):
    """VGG-19 cut into slices ending at the ``layers`` ReLUs; ``forward(x)`` (N x 3 x H x W RGB in [0, 1]) returns
    the list of their activations, ImageNet normalisation applied inside. The weights are frozen
    (``requires_grad=False``) and the module stays in eval mode; gradients still flow to the input
    (a :class:`~napari_nucsynth.models.features.FeatureNet`; ``slices`` are its stages)."""

    def __init__(self, features: nn.Sequential, layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1"),
                 source: str = "random:seed0"):
        bad = [name for name in layers if name not in LAYERS]
        if bad:
            raise ValueError(f"unknown VGG layer(s) {bad}; known: {list(LAYERS)}")
        ends = [LAYERS[name] for name in layers]
        if ends != sorted(ends):
            raise ValueError(f"layers must be in network order, got {list(layers)}")
        slices, start = [], 0
        for end in ends:
            slices.append(nn.Sequential(*[features[i] for i in range(start, end)]))
            start = end
        super().__init__(slices, layers, [_CHANNELS[n] for n in layers], [_STRIDES[n] for n in layers], source,
                         mean=_MEAN, std=_STD)

    @property
    def slices(self) -> nn.ModuleList:
        return self.stages


def find_vgg19_weights(weights=None) -> Path | None:
    """The ImageNet VGG-19 weight file to use (see the module docstring for the search order), or None."""
    from . import checkpoint_dir

    cands = []
    if weights not in (None, "auto", "random"):
        p = Path(weights)
        if not p.is_file():
            raise ValueError(f"VGG-19 weights file {p} does not exist")
        return p
    if os.environ.get("NUCSYNTH_VGG19"):
        cands.append(Path(os.environ["NUCSYNTH_VGG19"]))
    cands.append(Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILE)
    cands.append(checkpoint_dir() / VGG_FILE)
    return next((p for p in cands if p.is_file()), None)


def load_vgg19(weights="auto", layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1"), seed: int = 0) -> VGGEncoder:
    """A frozen VGG-19 encoder (see :class:`VGGEncoder`), never downloading.

    ``weights``: "auto" (ImageNet weights when found, else the random fallback), a file path (ImageNet weights;
    an error if unreadable), or "random" (the fallback: torchvision's initialisation from ``seed``). The encoder's
    ``source`` says which was used.
    """
    from torchvision.models.vgg import cfgs, make_layers

    bad = [name for name in layers if name not in LAYERS]
    if bad or not layers:
        raise ValueError(f"unknown VGG layer(s) {bad or list(layers)}; known: {list(LAYERS)}")
    if weights == "random":
        path = None
    else:
        path = find_vgg19_weights(weights)
    with torch.random.fork_rng(devices=[]):  # only the convolutional part (torchvision's whole VGG-19 would
        torch.manual_seed(int(seed))          # draw 140 M classifier weights first)
        features = make_layers(cfgs["E"], batch_norm=False)[: LAYERS[layers[-1]]]
        for m in features.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
    source = f"random:seed{int(seed)}"
    if path is not None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read VGG-19 weights from {path}: {exc}") from exc
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        state = {k: v for k, v in state.items() if int(k.split(".")[0]) < len(features)}
        missing, unexpected = features.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a torchvision VGG-19 state dict (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        source = f"imagenet:{path.name}"
    return VGGEncoder(features, layers, source)
