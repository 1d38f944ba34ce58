"""Frozen feature networks for the generators' perceptual and style losses and for adain's encoder: histology
features trained here, ImageNet VGG-19 only where its weights are present locally.

The GUIDE (section 3) asks for features trained on H&E rather than ImageNet ones, which cannot be downloaded on
these machines. The shipped segmenter (:mod:`napari_nucsynth.models.hovernet`, a ResNet-18 encoder trained from
scratch on the MoNuSeg tiles) saw thousands of nuclei: its encoder's activations respond to nuclear shape,
chromatin texture, membranes and stain, which is what a render should get right, and it costs about a tenth of
VGG-19 to ``relu4_1`` on a CPU. :func:`load_features` returns one of:

- ``"hovernet"`` (the default, also ``"auto"``): the encoder of the shipped ``hovernet_monuseg.pt`` (or of any
  hovernet checkpoint given as ``"hovernet:<path>"``), cut into its four stages: ``stem`` (64 channels, stride 2),
  ``layer1`` (64, 4), ``layer2`` (128, 8), ``layer3`` (256, 16);
- ``"vgg19"``: VGG-19 with ImageNet weights (:func:`napari_nucsynth.models.vgg.load_vgg19`) to ``relu1_1`` ..
  ``relu4_1``; a ``ValueError`` when the weights are not on this machine (never a download);
- ``"vgg19-random"``: VGG-19 with torchvision's initialisation from a fixed seed: the old fallback, kept as the
  control that shows the histology features carry signal (``benchmarks/bench_features.py``).

Every network is frozen (no gradients into its weights, always in eval mode; gradients still flow to the input),
takes N x 3 x H x W RGB in [0, 1] and returns the list of its stages' activations. Its ``source`` names what it
is (``"hovernet:hovernet_monuseg.pt#<sha256 prefix>"``, ``"imagenet:vgg19-dcbb9e9d.pth"``, ``"random:seed0"``):
the generators record it in their checkpoints' config (``"features_source"``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

__all__ = ["FEATURES", "FeatureNet", "feature_source", "load_features", "shipped_hovernet"]

#: the feature networks :func:`load_features` knows
FEATURES = ("hovernet", "vgg19", "vgg19-random")


def shipped_hovernet() -> Path:
    """The path of the segmenter shipped with the package (the default feature network's weights)."""
    return Path(__file__).resolve().parents[1] / "data" / "models" / "hovernet_monuseg.pt"


class FeatureNet(nn.Module):
    """A frozen network cut into ``stages``; ``forward(x)`` (RGB in [0, 1]) returns each stage's output.

    Attributes: ``layers`` (stage names), ``channels``, ``strides`` and ``source`` (see the module docstring).
    """

    def __init__(self, stages: list[nn.Module], layers, channels, strides, source: str,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.layers, self.channels, self.strides = tuple(layers), tuple(channels), tuple(strides)
        self.source = source
        for m in self.modules():  # in-place ReLUs would overwrite returned activations
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen, always eval (BatchNorm keeps its trained statistics)
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.mean) / self.std
        out = []
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    # the source travels with the state dict (uint8 tensor), so a model that keeps its encoder in its checkpoint
    # (adain) knows what the encoder is wherever it is loaded
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(self.source.encode("utf-8")), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            self.source = bytes(state.to(torch.uint8).tolist()).decode("utf-8")


_SHA: dict = {}


def _sha(path: Path) -> str:
    """The first 12 hex digits of the file's SHA-256 (cached per path and modification time)."""
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = _sha_file(path)
    return _SHA[key]


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _hovernet_features(path: Path) -> FeatureNet:
    from . import load_checkpoint
    from .hovernet import HoVerNet, _out_channels

    ck = load_checkpoint(path, kind="hovernet")
    cfg = ck["config"]
    net = HoVerNet(backbone=cfg.get("backbone", "resnet18"), width=int(cfg.get("width", 32)), pretrained=None)
    net.load_state_dict(ck["state_dict"])
    stem = net.stem
    stages = [stem, nn.Sequential(net.pool, net.layer1), net.layer2, net.layer3]
    ch = [stem[0].out_channels] + [_out_channels(layer) for layer in (net.layer1, net.layer2, net.layer3)]
    return FeatureNet(stages, ("stem", "layer1", "layer2", "layer3"), ch, (2, 4, 8, 16),
                      f"hovernet:{path.name}#{_sha(path)}", mean=HoVerNet.MEAN, std=HoVerNet.STD)


def _vgg_features(weights: str) -> FeatureNet:
    from .vgg import find_vgg19_weights, load_vgg19

    if weights != "random" and find_vgg19_weights() is None:
        raise ValueError("features='vgg19' needs ImageNet VGG-19 weights on this machine (vgg19-dcbb9e9d.pth in "
                         "$NUCSYNTH_VGG19, torch's hub cache or the model folder), and none were found: nothing "
                         "is downloaded. Use features='hovernet' (the default: the shipped segmenter's encoder, "
                         "trained on H&E) instead")
    return load_vgg19("random" if weights == "random" else "auto")


def _hovernet_path(name: str) -> Path:
    if name in ("auto", "hovernet"):
        path = shipped_hovernet()
        if not path.is_file():
            raise ValueError(f"the shipped hovernet model ({path}) is missing, and it is the default feature "
                             "network; reinstall the package or pass features='hovernet:<a hovernet checkpoint>'")
        return path
    path = Path(name.split(":", 1)[1])
    if not path.is_file():
        raise ValueError(f"feature network checkpoint {path} does not exist")
    return path


def feature_source(name: str = "auto") -> str:
    """The ``source`` that :func:`load_features` of ``name`` would report, without building the network."""
    name = str(name)
    if name in ("auto", "hovernet") or name.startswith("hovernet:"):
        path = _hovernet_path(name)
        return f"hovernet:{path.name}#{_sha(path)}"
    if name == "vgg19":
        from .vgg import find_vgg19_weights

        path = find_vgg19_weights()
        if path is None:
            _vgg_features("imagenet")  # raises the message that says what to do
        return f"imagenet:{path.name}"
    if name == "vgg19-random":
        return "random:seed0"
    raise ValueError(f"unknown feature network {name!r}; choose from {', '.join(FEATURES)} or 'hovernet:<path>'")


def load_features(name: str = "auto") -> FeatureNet:
    """A frozen feature network (see the module docstring): ``"auto"``/``"hovernet"`` (the shipped segmenter's
    encoder), ``"hovernet:<checkpoint path>"``, ``"vgg19"`` (ImageNet weights, local only) or ``"vgg19-random"``.
    Errors are ``ValueError`` saying what to do. Building draws nothing from torch's global random generator (the
    network may be built lazily in the middle of a seeded training run: a resumed run must draw what an
    uninterrupted one does)."""
    name = str(name)
    with torch.random.fork_rng(devices=[]):
        if name in ("auto", "hovernet") or name.startswith("hovernet:"):
            return _hovernet_features(_hovernet_path(name))
        if name == "vgg19":
            return _vgg_features("imagenet")
        if name == "vgg19-random":
            return _vgg_features("random")
    raise ValueError(f"unknown feature network {name!r}; choose from {', '.join(FEATURES)} or 'hovernet:<path>'")
