"""A compact HoVer-Net (Graham et al., MedIA 2019): a shared encoder, a nuclear-pixel (NP) decoder and a
horizontal/vertical distance (HV) decoder, with HoVer-Net's losses and post-processing.

The encoder is torchvision's ResNet (``resnet18`` by default) cut after ``layer3`` (stride 16): nuclei are small, and
the last stage would hold three quarters of the weights. Each decoder upsamples through the encoder's skips back
to full resolution (U-Net style; HoVer-Net's own decoders use dense blocks and "valid" convolutions). Output
channels: NP logits (2: background, nucleus) and HV (2: horizontal, vertical, in [-1, 1]).

Losses (HoVer-Net): NP cross-entropy + Dice; HV mean squared error + mean squared gradient error (Sobel
derivatives, inside nuclei). Post-processing (:func:`postprocess`) is HoVer-Net's ``process_np_hv``: Sobel of the
HV maps (21 px kernels) marks the boundaries between touching nuclei; markers are the nuclear pixels away from
them; a marker-controlled watershed of the smoothed "energy" grows them back to the nuclear foreground.
ImageNet weights cannot be downloaded here: ``config["pretrained"]`` may name a local torchvision ResNet state
dict file; otherwise the encoder starts from scratch (and the checkpoint records which).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi
from torch import nn
from torch.nn import functional as F

from . import ModelSpec, register_model

__all__ = ["SPEC", "HoVerNet", "hv_energy", "postprocess", "sobel21"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class _Decoder(nn.Module):
    def __init__(self, skips: list[int], widths: list[int], out_ch: int):
        super().__init__()
        # skips: channels of the encoder features from deepest to shallowest (the deepest is the input)
        self.stages = nn.ModuleList()
        cin = skips[0]
        for skip, w in zip(skips[1:], widths):
            self.stages.append(_block(cin + skip, w))
            cin = w
        # full resolution: one light convolution over the upsampled features and the input image (the expensive
        # part of a decoder is whatever runs at full resolution)
        self.final = nn.Sequential(nn.Conv2d(cin + 3, cin // 2, 3, padding=1, bias=False), nn.BatchNorm2d(cin // 2),
                                   nn.ReLU(inplace=True))
        self.head = nn.Conv2d(cin // 2, out_ch, 1)

    def forward(self, feats: list[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        x = feats[0]
        for stage, skip in zip(self.stages, feats[1:]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], 1))
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.final(torch.cat([x, image], 1)))


class HoVerNet(nn.Module):
    """Encoder (ResNet to ``layer3``) + NP and HV decoders. ``forward`` takes N x 3 x H x W in [0, 1] (H, W
    multiples of 16 are best; others work) and returns N x 4 x H x W: NP logits (2) then HV (2, tanh)."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, backbone: str = "resnet18", width: int = 64, pretrained: str | None = None):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, backbone)(weights=None)
        if pretrained:
            net.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)  # 1/2, 64
        self.pool = net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3  # 1/4, 1/8, 1/16
        c1 = _out_channels(self.layer1)
        c2 = _out_channels(self.layer2)
        c3 = _out_channels(self.layer3)
        c0 = net.conv1.out_channels
        skips = [c3, c2, c1, c0]
        widths = [4 * width, 2 * width, width]
        self.np_dec = _Decoder(skips, widths, 2)
        self.hv_dec = _Decoder(skips, widths, 2)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.device.type == "cpu" and not torch.is_grad_enabled():
            # inference on the CPU: oneDNN's convolutions are faster on channels-last input (a tile ~1.3x); not in
            # training, where it gained nothing (a step 3.41 against 3.43 s) and torch 2.14's CPU backward of
            # small channels-last convolutions corrupted memory in the nuclick net
            image = image.contiguous(memory_format=torch.channels_last)
        x = (image - self.mean) / self.std
        f0 = self.stem(x)
        f1 = self.layer1(self.pool(f0))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        feats = [f3, f2, f1, f0]
        np_logits = self.np_dec(feats, image)
        hv = torch.tanh(self.hv_dec(feats, image))
        return torch.cat([np_logits, hv], 1).contiguous()


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    for name in ("bn3", "bn2"):
        if hasattr(last, name):
            return getattr(last, name).num_features
    raise ValueError("unsupported backbone block")


# ----------------------------------------------------------------------------------------------------------------
# targets and losses


def targets(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """HoVer-Net's targets of one sample: ``np`` (H x W int64, 1 = nucleus) and ``hv`` (2 x H x W float32)."""
    from ..masks import hv_maps

    lab = np.asarray(labels)
    return {"np": (lab > 0).astype(np.int64), "hv": hv_maps(lab)}


def _sobel_torch(x: torch.Tensor, size: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical Sobel derivatives (HoVer-Net's 5 x 5 kernels, normalised) of N x 1 x H x W."""
    r = torch.arange(-(size // 2), size // 2 + 1, dtype=x.dtype, device=x.device)
    h = r.view(1, -1).expand(size, size)
    v = r.view(-1, 1).expand(size, size)
    kh = h / (h * h + v * v + 1e-15)
    kv = v / (h * h + v * v + 1e-15)
    gh = F.conv2d(x, kh.view(1, 1, size, size), padding=size // 2)
    gv = F.conv2d(x, kv.view(1, 1, size, size), padding=size // 2)
    return gh, gv


def loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """HoVer-Net's loss: NP cross-entropy + Dice, HV MSE + 2 x MSGE (gradients inside nuclei only)."""
    out = model(batch["image"])
    np_logits, hv = out[:, :2], out[:, 2:]
    t_np, t_hv = batch["np"], batch["hv"]
    ce = F.cross_entropy(np_logits, t_np)
    p = torch.softmax(np_logits, 1)[:, 1]
    t = t_np.float()
    dice = 1 - (2 * (p * t).sum((1, 2)) + 1e-3) / (p.sum((1, 2)) + t.sum((1, 2)) + 1e-3)
    dice = dice.mean()
    mse = F.mse_loss(hv, t_hv)
    focus = t.unsqueeze(1)
    gh_p, _ = _sobel_torch(hv[:, :1])
    _, gv_p = _sobel_torch(hv[:, 1:])
    gh_t, _ = _sobel_torch(t_hv[:, :1])
    _, gv_t = _sobel_torch(t_hv[:, 1:])
    msge = (((gh_p - gh_t) ** 2 + (gv_p - gv_t) ** 2) * focus).sum() / (focus.sum() + 1e-8)
    total = ce + dice + mse + 2 * msge
    logs = {"loss": total, "np_ce": ce, "np_dice": dice, "hv_mse": mse, "hv_msge": msge}
    return total, {k: float(v.detach()) for k, v in logs.items()}


# ----------------------------------------------------------------------------------------------------------------
# post-processing (HoVer-Net's process_np_hv, without OpenCV)


def sobel21(x: np.ndarray, axis: int) -> np.ndarray:
    """OpenCV's 21 x 21 Sobel derivative of ``x`` along ``axis`` (1 = columns / x, 0 = rows / y), reflect-101
    borders: a binomial smoothing across, a binomial derivative along."""
    n = 21
    smooth = np.array([1.0])
    for _ in range(n - 1):
        smooth = np.convolve(smooth, [1.0, 1.0])
    deriv = np.array([1.0])
    for _ in range(n - 2):
        deriv = np.convolve(deriv, [1.0, 1.0])
    deriv = np.convolve(deriv, [-1.0, 1.0])  # as a correlation kernel: -1 ... +1, left to right
    out = ndi.correlate1d(x.astype(np.float64), deriv, axis=axis, mode="mirror")
    return ndi.correlate1d(out, smooth, axis=1 - axis, mode="mirror")


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


_ELLIPSE5 = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], bool)


def hv_energy(blb: np.ndarray, hv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HoVer-Net's boundary map and watershed energy from the nuclear foreground ``blb`` (H x W bool) and the HV
    maps (2 x H x W): ``overall`` (the Sobel response of the min-max scaled maps, high on borders between touching
    nuclei, 0 outside the foreground) and ``energy`` (minus its complement inside the foreground, smoothed), which
    a marker-controlled watershed floods."""
    sobelh = 1 - _minmax(sobel21(_minmax(hv[0]), axis=1))
    sobelv = 1 - _minmax(sobel21(_minmax(hv[1]), axis=0))
    overall = np.maximum(np.maximum(sobelh, sobelv) - (1 - blb), 0)
    inner = (1.0 - overall) * blb
    k = [0.25, 0.5, 0.25]
    return overall, -ndi.correlate1d(ndi.correlate1d(inner, k, axis=0, mode="mirror"), k, axis=1, mode="mirror")


def postprocess(np_prob: np.ndarray, hv: np.ndarray, *, np_threshold: float = 0.5, edge_threshold: float = 0.4,
                min_area: int = 10) -> np.ndarray:
    """Instances from HoVer-Net's outputs: ``np_prob`` (H x W nucleus probability) and ``hv`` (2 x H x W:
    horizontal, vertical). HoVer-Net's ``process_np_hv`` with its constants; returns uint32 labels 1..N."""
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    blb = np_prob >= np_threshold
    blb = remove_small_objects(blb, max_size=min_area - 1)
    if not blb.any():
        return np.zeros(np_prob.shape, np.uint32)
    overall, dist = hv_energy(blb, hv)
    marker = blb & ~(overall >= edge_threshold)
    marker = ndi.binary_fill_holes(marker)
    marker = ndi.binary_opening(marker, structure=_ELLIPSE5)
    marker = remove_small_objects(marker, max_size=min_area - 1)
    markers, _ = ndi.label(marker)
    lab = watershed(dist, markers=markers, mask=blb)
    # contiguous ids (watershed keeps the marker ids, some of which may be gone)
    _, inv = np.unique(lab, return_inverse=True)
    return inv.reshape(lab.shape).astype(np.uint32)


# ----------------------------------------------------------------------------------------------------------------
# inference


_MODELS: dict = {}


def load_model(checkpoint, device) -> nn.Module:
    """The model of a hovernet checkpoint on ``device`` in eval mode, cached per (path, modification time,
    device); one model at a time (they are large)."""
    from pathlib import Path

    from . import load_checkpoint

    path = Path(checkpoint)
    key = (str(path.resolve()), path.stat().st_mtime if path.exists() else None, str(device))
    if key not in _MODELS:
        ck = load_checkpoint(path, kind="hovernet")
        model = build({**ck["config"], "pretrained": None})
        model.load_state_dict(ck["state_dict"])
        model.to(device).eval()
        _MODELS.clear()
        _MODELS[key] = model
    return _MODELS[key]


def predict_maps(model: nn.Module, image: np.ndarray, device, *, tta: bool = False, tile: int = 1024,
                 overlap: int = 128, batch: int = 1, progress=None, should_stop=None) -> np.ndarray:
    """NP probability and HV maps of an image of any size: H x W x 3 float32 (nucleus probability, h, v).

    Tiles of ``tile`` px (at most the image's size rounded up to a multiple of 32) overlapping by ``overlap``:
    a 1000 x 1000 tile runs in one piece, which costs a third of 256-px tiles' overlaps."""
    from ..tiling import predict_dense

    model.eval()
    tile = int(min(tile, -(-max(image.shape[:2]) // 32) * 32))
    overlap = min(overlap, tile // 4)

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(x).to(device))
            prob = torch.softmax(out[:, :2], 1)[:, 1:]
            return torch.cat([prob, out[:, 2:]], 1).float().cpu().numpy()

    return predict_dense(fn, image, channels=3, tile=tile, overlap=overlap, batch=batch, tta=tta,
                         vector_pairs=((1, 2),), progress=progress, should_stop=should_stop)


def predict(model: nn.Module, image: np.ndarray, device, tta: bool = False, progress=None, should_stop=None,
            **params) -> np.ndarray:
    """Instance labels of an image of any size (:func:`predict_maps` then :func:`postprocess`); ``params`` go to
    :func:`postprocess` (``np_threshold``, ``edge_threshold``, ``min_area``)."""
    maps = predict_maps(model, image, device, tta=tta, progress=progress, should_stop=should_stop)
    return postprocess(maps[..., 0], maps[..., 1:].transpose(2, 0, 1), **params)


def default_config() -> dict:
    return {"backbone": "resnet18", "width": 32, "pretrained": None}


def build(config: dict) -> HoVerNet:
    cfg = {**default_config(), **(config or {})}
    return HoVerNet(backbone=cfg["backbone"], width=int(cfg["width"]), pretrained=cfg["pretrained"])


SPEC = register_model(ModelSpec(kind="hovernet", build=build, default_config=default_config, targets=targets,
                                loss=loss, predict=predict))
