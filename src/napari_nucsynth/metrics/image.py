"""Image metrics for synthetic H&E: FID, KID, SSIM, sample diversity and a classifier two-sample test (C2ST).

This module imports torch; :mod:`napari_nucsynth.metrics` exposes its names lazily, so plugin discovery and the
instance metrics never pay for it.

Images
------
Every function takes RGB uint8 ``H x W x 3`` images. Other inputs are converted by one rule (GUIDE section 2):
grey ``H x W`` or ``H x W x 1`` is repeated into three channels; RGBA drops its alpha channel (no compositing);
float images must lie in ``[0, 1]`` and become ``round(255 x)``; uint16 becomes ``round(x / 257)`` (65535 -> 255).
Anything else (other integer dtypes, bool, NaN, other channel counts) is refused with a ``ValueError`` naming the
argument. An image *set* is a list (or tuple) of such images, of any sizes, or an ``(N, H, W, C)`` array.

Feature extractors (for FID and KID)
------------------------------------
- ``"inception"``: torchvision's ``inception_v3`` with its ImageNet weights (``Inception_V3_Weights.IMAGENET1K_V1``,
  file ``inception_v3_google-0cc3c7bd.pth``), the 2048-d pool3 features (the input of the final ``fc``). Each
  image is resized to 299 x 299 (bilinear with anti-aliasing, whole image, no cropping), scaled to ``[0, 1]`` and
  ImageNet-normalised. The weights are read only from a local file (``weights=``) or torch hub's cache
  (``torch.hub.get_dir()/checkpoints/``); nothing is ever downloaded. These are torchvision's weights, not the
  TensorFlow FID Inception of Heusel et al., so values are comparable between runs of this module but not with
  published FID figures.
- ``"random-conv"``: the offline fallback. A fixed small CNN (four 3 x 3 convolutions with ReLU, 32-64-128-128
  channels, the first three with stride 2) whose weights are drawn once from ``numpy.random.default_rng(seed)``
  (He-normal, zero bias), never trained. Images are ImageNet-normalised and seen at their *native* resolution
  (fully convolutional: no resizing, no cropping, so the pixel scale of the nuclei is kept); the features are the
  spatial mean and standard deviation of the last layer's 128 channels (256-d). Random convolutional features are
  a known, reasonable proxy for texture and colour statistics, but their values have no meaning outside this
  module: compare them only with each other (same extractor name, same seed).
- ``"auto"``: ``"inception"`` when its weights are given or cached, else ``"random-conv"``.

Every result records the extractor's name (``MetricResult.extractor``) so that a report says which produced it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np
import torch
from torch import nn

from .._checks import SeedLike, as_rgb as _as_rgb, as_rng
from ..devices import resolve_device as _resolve_device

__all__ = [
    "FeatureExtractor",
    "InceptionExtractor",
    "RandomConvExtractor",
    "feature_extractor",
    "inception_weights_path",
    "MetricResult",
    "fid",
    "kid",
    "ssim",
    "diversity",
    "C2STResult",
    "c2st",
]

#: The file name torchvision uses for ``Inception_V3_Weights.IMAGENET1K_V1``.
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
INCEPTION_URL = "https://download.pytorch.org/models/" + INCEPTION_FILE

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSet = Union[Sequence[np.ndarray], np.ndarray]  # noqa: UP007 - a runtime alias


# ----------------------------------------------------------------------------------------------------------------
# Input conversion
# ----------------------------------------------------------------------------------------------------------------
def _as_image_list(images, name: str) -> list[np.ndarray]:
    """An image set (list of images of any sizes, or an ``(N, H, W, C)`` array) as a list of RGB uint8 arrays."""
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            seq = list(images)
        else:
            raise ValueError(
                f"{name} must be a list of images or an (N, H, W, 3) array, got an array of shape {images.shape} "
                "(wrap a single image in a list)"
            )
    elif isinstance(images, (list, tuple)):
        seq = list(images)
    elif torch.is_tensor(images):
        raise ValueError(f"{name} must be numpy images (H x W x 3 uint8), got a torch tensor; use .numpy()")
    else:
        raise ValueError(f"{name} must be a list of images or an (N, H, W, 3) array, got {type(images).__name__}")
    if not seq:
        raise ValueError(f"{name} is empty: give at least one image")
    return [_as_rgb(im, f"{name}[{i}]") for i, im in enumerate(seq)]


def _seed_label(seed) -> int | str | None:
    """How a result records its seed: the int, None, or "generator" for a numpy Generator."""
    if seed is None or isinstance(seed, np.random.Generator):
        return None if seed is None else "generator"
    return int(seed)


def _is_features(x) -> bool:
    return isinstance(x, np.ndarray) and x.ndim == 2


def _to_tensor(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Stack same-shape uint8 images into a float ``N x 3 x H x W`` tensor in ``[0, 1]``."""
    t = torch.from_numpy(np.stack(images)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def _imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(_IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------------
@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything with a ``name`` and ``__call__(images) -> (N, D) float64`` features.

    ``images`` is an image set: a list of RGB uint8 images (any sizes) or an ``(N, H, W, 3)`` array.
    """

    name: str

    def __call__(self, images: ImageSet) -> np.ndarray: ...


class InceptionExtractor:
    """torchvision Inception-v3 (ImageNet weights), 2048-d pool3 features, loaded from a local file only.

    Parameters
    ----------
    weights : str or Path
        A file holding the state dict of ``torchvision.models.inception_v3`` (as torchvision saves
        ``inception_v3_google-0cc3c7bd.pth``), or a project checkpoint with a ``"state_dict"`` entry.
    device : str
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.
    batch_size : int
        Images per forward pass.

    Notes
    -----
    Each image is resized to 299 x 299 (bilinear, anti-aliased; the whole image, no crop), scaled to ``[0, 1]`` and
    ImageNet-normalised; the network's ``transform_input`` then maps it to what the Google weights expect, as
    torchvision does when it loads them.
    """

    name = "inception"
    dim = 2048
    size = 299

    def __init__(self, weights: str | os.PathLike, device: str = "cpu", batch_size: int = 16) -> None:
        from torchvision.models import inception_v3

        path = Path(weights)
        if not path.is_file():
            raise ValueError(
                f"weights: Inception-v3 weights file {str(path)!r} does not exist. Download {INCEPTION_URL} on a "
                f"machine with internet access and copy it there (or into {_hub_checkpoint_dir()}), or use "
                "feature_extractor('random-conv')"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise ValueError(f"weights: cannot read {str(path)!r} as a torch state dict: {e}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not state:
            raise ValueError(f"weights: {str(path)!r} does not hold a state dict")
        aux = any(str(k).startswith("AuxLogits.") for k in state)
        model = inception_v3(weights=None, aux_logits=aux, init_weights=False, transform_input=True)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"weights: {str(path)!r} is not an Inception-v3 state dict: {e}") from None
        model.fc = nn.Identity()
        self.device = _resolve_device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.weights = str(path)
        self.batch_size = int(batch_size)

    def __call__(self, images: ImageSet) -> np.ndarray:
        ims = _as_image_list(images, "images")
        out = []
        with torch.inference_mode():
            for start in range(0, len(ims), self.batch_size):
                batch = []
                for im in ims[start : start + self.batch_size]:
                    x = _to_tensor([im], self.device)
                    if x.shape[-2:] != (self.size, self.size):
                        x = torch.nn.functional.interpolate(
                            x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
                        )
                    batch.append(x)
                feats = self.model(_imagenet_normalise(torch.cat(batch)))
                out.append(feats.double().cpu().numpy())
        return np.concatenate(out).reshape(len(ims), -1)

    def __repr__(self) -> str:
        return f"InceptionExtractor(weights={self.weights!r}, device={str(self.device)!r})"


class RandomConvExtractor:
    """The offline fallback: a fixed, seeded, randomly initialised small CNN; 256-d mean + std pooled features.

    Parameters
    ----------
    seed : int
        Seeds ``numpy.random.default_rng``, which draws the weights (so they do not depend on torch's RNG or
        version). The name records a non-default seed: ``"random-conv"`` for 0, ``"random-conv(seed=S)"`` else.
    device : str
    batch_size : int

    Notes
    -----
    Four 3 x 3 convolutions (3-32-64-128-128 channels, stride 2, 2, 2, 1, padding 1), each followed by ReLU;
    He-normal weights, zero biases. The input is ImageNet-normalised at its native size (no resizing or cropping:
    images of different sizes are run separately, so the nuclei keep their pixel scale); the output is the
    spatial mean and (population) standard deviation of each of the 128 final channels. Deterministic: the same
    images give the same features on the same device.
    """

    dim = 256
    _CHANNELS = (3, 32, 64, 128, 128)
    _STRIDES = (2, 2, 2, 1)

    def __init__(self, seed: int = 0, device: str = "cpu", batch_size: int = 32) -> None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self.name = "random-conv" if self.seed == 0 else f"random-conv(seed={self.seed})"
        rng = np.random.default_rng(self.seed)
        layers: list[nn.Module] = []
        for cin, cout, stride in zip(self._CHANNELS[:-1], self._CHANNELS[1:], self._STRIDES):
            conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
            w = rng.normal(0.0, math.sqrt(2.0 / (cin * 9)), size=(cout, cin, 3, 3))
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(w))
                conv.bias.zero_()
            layers += [conv, nn.ReLU()]
        self.device = _resolve_device(device)
        self.model = nn.Sequential(*layers).eval().requires_grad_(False).to(self.device)
        self.batch_size = int(batch_size)

    def __call__(self, images: ImageSet) -> np.ndarray:
        ims = _as_image_list(images, "images")
        out = np.zeros((len(ims), self.dim), dtype=np.float64)
        by_shape: dict[tuple, list[int]] = {}
        for i, im in enumerate(ims):
            by_shape.setdefault(im.shape, []).append(i)
        with torch.inference_mode():
            for idx in by_shape.values():
                for start in range(0, len(idx), self.batch_size):
                    sel = idx[start : start + self.batch_size]
                    y = self.model(_imagenet_normalise(_to_tensor([ims[i] for i in sel], self.device)))
                    y = y.flatten(2).double()
                    feats = torch.cat([y.mean(-1), y.std(-1, unbiased=False)], dim=1)
                    out[sel] = feats.cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"RandomConvExtractor(seed={self.seed}, device={str(self.device)!r})"


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def inception_weights_path() -> Path | None:
    """Where torch hub's cache holds the Inception-v3 ImageNet weights, or ``None`` when they are not there."""
    path = _hub_checkpoint_dir() / INCEPTION_FILE
    return path if path.is_file() else None


def feature_extractor(kind: str = "auto", weights: str | os.PathLike | None = None, device: str = "cpu"):
    """Build a feature extractor for FID and KID.

    Parameters
    ----------
    kind : {"auto", "inception", "random-conv"}
        ``"auto"`` gives Inception-v3 when ``weights`` is given or its file is in torch hub's cache, else the
        ``"random-conv"`` fallback (see the module docstring).
    weights : str or Path, optional
        A local Inception-v3 weights file. Default: ``torch.hub.get_dir()/checkpoints/inception_v3_google-0cc3c7bd.pth``.
        Nothing is ever downloaded.
    device : str
        ``"cpu"`` (default), ``"cuda"``, ``"mps"`` or ``"auto"``.

    Returns
    -------
    FeatureExtractor
        Its ``name`` is ``"inception"`` or ``"random-conv"``.

    Raises
    ------
    ValueError
        If ``kind`` is unknown, or Inception is asked for (by ``kind`` or ``weights``) and its file is missing or
        unreadable; the message says where to put the file.
    """
    if kind not in ("auto", "inception", "random-conv"):
        raise ValueError(f"kind must be 'auto', 'inception' or 'random-conv', got {kind!r}")
    if kind == "random-conv":
        return RandomConvExtractor(device=device)
    if weights is None:
        weights = inception_weights_path()
        if weights is None:
            if kind == "auto":
                return RandomConvExtractor(device=device)
            target = _hub_checkpoint_dir() / INCEPTION_FILE
            raise ValueError(
                f"Inception-v3 weights are not available offline: download {INCEPTION_URL} on a machine with "
                f"internet access and copy it to {target}, or pass weights='path/to/{INCEPTION_FILE}', or use "
                "kind='random-conv' (or 'auto', which falls back to it)"
            )
    return InceptionExtractor(weights, device=device)


@lru_cache(maxsize=4)
def _cached_extractor(kind: str, weights: str | None, mtime: float, device: str):
    return feature_extractor(kind, weights, device)


def _resolve_extractor(extractor) -> Any:
    """``None`` -> the cached ``"auto"`` extractor on the CPU; a kind string -> that kind; an object -> itself."""
    if extractor is None or isinstance(extractor, str):
        kind = "auto" if extractor is None else extractor
        if kind not in ("auto", "inception", "random-conv"):
            raise ValueError(f"extractor must be None, 'auto', 'inception', 'random-conv' or a FeatureExtractor, "
                             f"got {extractor!r}")
        path = inception_weights_path() if kind != "random-conv" else None
        mtime = path.stat().st_mtime if path is not None else 0.0
        return _cached_extractor(kind, None if path is None else str(path), mtime, "cpu")
    if not callable(extractor) or not isinstance(getattr(extractor, "name", None), str):
        raise ValueError(f"extractor must be None, a kind name or a FeatureExtractor (a callable with a .name), "
                         f"got {type(extractor).__name__}")
    return extractor


def _feature_sets(real, fake, extractor) -> tuple[np.ndarray, np.ndarray, str]:
    """Features of both sets (each an image set or an (N, D) feature array) and the extractor's name."""
    need = not (_is_features(real) and _is_features(fake))
    ext = _resolve_extractor(extractor) if need or extractor is not None else None
    name = ext.name if ext is not None else "precomputed"
    feats = []
    for x, arg in ((real, "real"), (fake, "fake")):
        if _is_features(x):
            if isinstance(x, np.ndarray) and x.dtype == np.uint8:
                raise ValueError(f"{arg} is a 2-D uint8 array, which looks like one grey image; pass images as a "
                                 "list (features must be a float (N, D) array)")
            f = np.asarray(x, dtype=np.float64)
            if not np.all(np.isfinite(f)):
                raise ValueError(f"{arg} features hold NaN or infinite values")
        else:
            f = np.asarray(ext(_as_image_list(x, arg)), dtype=np.float64)
        if f.shape[0] < 2:
            raise ValueError(f"{arg} needs at least 2 images (or feature rows), got {f.shape[0]}")
        feats.append(f)
    if feats[0].shape[1] != feats[1].shape[1]:
        raise ValueError(f"real and fake features differ in dimension: {feats[0].shape[1]} vs {feats[1].shape[1]} "
                         "(were they made by the same extractor?)")
    return feats[0], feats[1], name


# ----------------------------------------------------------------------------------------------------------------
# FID and KID
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MetricResult:
    """A distribution metric and what produced it.

    Attributes
    ----------
    value : float
        The metric (FID, or KID's mean over subsets).
    extractor : str
        The feature extractor's name (``"inception"``, ``"random-conv"``, or ``"precomputed"``).
    n_real, n_fake : int
        Images (or feature rows) in each set.
    std : float or None
        KID's standard deviation over subsets; ``None`` for FID.
    metric : str
        ``"fid"`` or ``"kid"``.
    params : dict
        Settings that shaped the value (KID's subsets, subset size and seed; FID's epsilon if it had to add one).
    """

    value: float
    extractor: str
    n_real: int
    n_fake: int
    std: float | None = None
    metric: str = ""
    params: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict:
        return asdict(self)


def _frechet_distance(mu1, s1, mu2, s2, eps: float = 1e-6) -> tuple[float, float]:
    """Fréchet distance between two Gaussians; returns ``(distance, eps_used)`` (0 when none was needed)."""
    from scipy.linalg import sqrtm

    diff = mu1 - mu2
    used = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular products; handled below
        covmean = sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):
            used = eps
            offset = np.eye(s1.shape[0]) * eps
            covmean = sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0), used


def fid(real: ImageSet | np.ndarray, fake: ImageSet | np.ndarray, extractor=None) -> MetricResult:
    """Fréchet Inception Distance (Heusel et al., 2017) between two image sets.

    ``||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` over the features' means and covariances (``np.cov``,
    N - 1). The matrix square root is ``scipy.linalg.sqrtm``; if it is not finite, ``1e-6 I`` is added to both
    covariances and it is computed again (recorded in ``params["eps"]``); its real part is kept, and the distance
    is clipped at 0 (round-off can make identical sets come out at about -1e-6).

    Parameters
    ----------
    real, fake : image set or (N, D) float array
        A list of RGB uint8 images of any sizes (see the module docstring for how each extractor sizes them), an
        ``(N, H, W, 3)`` array, or precomputed features (a 2-D float array). At least 2 of each.
    extractor : None, str or FeatureExtractor
        ``None`` uses ``feature_extractor("auto")`` (Inception when its weights are cached, else
        ``"random-conv"``); a string names a kind; an object is used as given.

    Returns
    -------
    MetricResult
        ``value``, ``extractor`` (name), ``n_real``, ``n_fake``. Values are only comparable with the same extractor
        and similar set sizes (FID is biased upwards for small sets).

    Raises
    ------
    ValueError
        On empty or single-image sets, non-RGB images, or features of different dimensions.
    """
    fr, ff, name = _feature_sets(real, fake, extractor)
    d, used = _frechet_distance(fr.mean(0), np.atleast_2d(np.cov(fr, rowvar=False)),
                                ff.mean(0), np.atleast_2d(np.cov(ff, rowvar=False)))
    return MetricResult(value=d, extractor=name, n_real=len(fr), n_fake=len(ff), metric="fid",
                        params={"eps": used} if used else {})


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m = x.shape[0]
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.mean())


def kid(
    real: ImageSet | np.ndarray,
    fake: ImageSet | np.ndarray,
    extractor=None,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: SeedLike = 0,
) -> MetricResult:
    """Kernel Inception Distance (Bińkowski et al., 2018): unbiased MMD^2 with a cubic polynomial kernel.

    ``k(x, y) = (x . y / d + 1)^3``. For each of ``subsets`` draws, ``m = min(subset_size, n_real, n_fake)``
    feature rows are sampled without replacement from each set (seeded) and the unbiased estimate
    ``sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (m (m-1)) - 2 mean k(x_i, y_j)`` is taken; the
    result is the mean and standard deviation over draws. Unbiased, so it can be slightly negative for sets from the
    same distribution; a set against *itself* comes out slightly negative (about ``-2/n`` times the gap between
    ``k(x, x)`` and ``k(x, y)``), since the estimator assumes the two samples share no rows. Reported as is (papers
    often multiply by 1000).

    Parameters
    ----------
    real, fake : image set or (N, D) float array
        As for :func:`fid`.
    extractor : None, str or FeatureExtractor
        As for :func:`fid`.
    subsets : int
        Number of random subsets (>= 1).
    subset_size : int
        Rows per subset, capped at the smaller set's size (>= 2).
    seed : int, numpy Generator or None

    Returns
    -------
    MetricResult
        ``value`` (mean), ``std`` (over subsets), ``params`` with ``subsets``, ``subset_size`` (as used), ``seed``.
    """
    if not isinstance(subsets, (int, np.integer)) or subsets < 1:
        raise ValueError(f"subsets must be a positive integer, got {subsets!r}")
    if not isinstance(subset_size, (int, np.integer)) or subset_size < 2:
        raise ValueError(f"subset_size must be an integer >= 2, got {subset_size!r}")
    fr, ff, name = _feature_sets(real, fake, extractor)
    rng = as_rng(seed)
    m = int(min(subset_size, len(fr), len(ff)))
    vals = np.array([
        _mmd2_unbiased(fr[rng.choice(len(fr), m, replace=False)], ff[rng.choice(len(ff), m, replace=False)])
        for _ in range(int(subsets))
    ])
    return MetricResult(value=float(vals.mean()), extractor=name, n_real=len(fr), n_fake=len(ff),
                        std=float(vals.std()), metric="kid",
                        params={"subsets": int(subsets), "subset_size": m,
                                "seed": _seed_label(seed)})


# ----------------------------------------------------------------------------------------------------------------
# SSIM and diversity
# ----------------------------------------------------------------------------------------------------------------
def ssim(a, b) -> float:
    """Structural similarity of two RGB images (``skimage.metrics.structural_similarity``).

    Computed on uint8 RGB (``channel_axis=-1``, ``data_range=255``, skimage's defaults otherwise: 7 x 7 uniform
    window), the mean SSIM over pixels and channels. 1.0 for identical images.

    Raises
    ------
    ValueError
        If either is not an image (see the module's conversion rule) or their shapes differ (``b`` is named), or
        they are smaller than the 7 x 7 window.
    """
    from skimage.metrics import structural_similarity

    a = _as_rgb(a, "a")
    b = _as_rgb(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"b must have the shape of a: got {b.shape} and {a.shape}")
    if min(a.shape[:2]) < 7:
        raise ValueError(f"a and b must be at least 7 x 7 pixels (SSIM's window), got {a.shape[:2]}")
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def diversity(renders: ImageSet) -> float:
    """Sample diversity of several renders of the same mask (as Points2Image reports it).

    The per-pixel, per-channel standard deviation across the renders (population standard deviation, ``ddof=0``),
    averaged over all pixels and the three channels, on the **0-255 intensity scale** of RGB uint8:
    ``mean_{y,x,c} std_k(render_k[y, x, c])``. 0 when every render is the same; for two renders it is half their
    mean absolute difference.

    Parameters
    ----------
    renders : image set
        At least two RGB images of one shape (the same mask rendered with different seeds).

    Raises
    ------
    ValueError
        If fewer than two renders are given or their shapes differ.
    """
    ims = _as_image_list(renders, "renders")
    if len(ims) < 2:
        raise ValueError(f"renders must hold at least 2 images of the same mask, got {len(ims)}")
    for i, im in enumerate(ims[1:], 1):
        if im.shape != ims[0].shape:
            raise ValueError(f"renders must all have one shape: renders[{i}] is {im.shape}, renders[0] is "
                             f"{ims[0].shape}")
    stack = np.stack(ims).astype(np.float64)
    return float(stack.std(axis=0).mean())


# ----------------------------------------------------------------------------------------------------------------
# Classifier two-sample test
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class C2STResult:
    """The outcome of :func:`c2st`.

    Attributes
    ----------
    accuracy : float
        Held-out accuracy of the real-vs-synthetic classifier (0.5 = indistinguishable, 1.0 = always told apart).
    n_train, n_test : int
        Patches used for training and for the held-out test (half real, half synthetic in each).
    p_value : float
        One-sided binomial test of the held-out correct count against chance (``accuracy > 0.5``). It treats
        patches as independent, which patches of one image are not: read it as optimistic.
    train_accuracy : float
        Accuracy on the training patches (far above ``accuracy`` means overfitting).
    split : str
        How train and test were separated: ``"image"`` (by source image, per set), ``"group"`` (by the given
        groups) or ``"region"`` (disjoint top/bottom regions of each image, when a set has a single image).
    epochs : int
        Epochs actually run (fewer than asked if ``should_stop`` stopped training).
    stopped : bool
        Whether ``should_stop`` ended training early.
    patch, seed, n_real_images, n_fake_images, device
        The settings and inputs.
    """

    accuracy: float
    n_train: int
    n_test: int
    p_value: float
    train_accuracy: float
    split: str
    epochs: int
    stopped: bool
    patch: int
    seed: Any
    n_real_images: int
    n_fake_images: int
    device: str

    def __float__(self) -> float:
        return float(self.accuracy)

    def to_dict(self) -> dict:
        return asdict(self)


class _C2STNet(nn.Module):
    """A small CNN (4 conv blocks, 16-32-64-64 channels, global average pooling, one logit)."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin, cout, pool=True):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.body = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), *block(64, 64, pool=False),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(1)


def _split_counts(total: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` split over ``k`` bins as evenly as possible, the remainder going to random bins."""
    counts = np.full(k, total // k, dtype=np.int64)
    counts[rng.choice(k, total % k, replace=False)] += 1
    return counts


def _sample_patches(images, regions, n: int, patch: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` patches (``n x patch x patch x 3``) spread evenly over ``images``, each inside its ``region``
    ``(r0, r1, c0, c1)``; top-left corners are uniform over the region."""
    out = np.empty((n, patch, patch, 3), dtype=np.uint8)
    counts = _split_counts(n, len(images), rng)
    j = 0
    for im, (r0, r1, c0, c1), c in zip(images, regions, counts):
        rows = rng.integers(r0, r1 - patch + 1, size=c)
        cols = rng.integers(c0, c1 - patch + 1, size=c)
        for r, cc in zip(rows, cols):
            out[j] = im[r : r + patch, cc : cc + patch]
            j += 1
    return out


def _check_groups(groups, n: int, name: str) -> list:
    groups = list(groups)
    if len(groups) != n:
        raise ValueError(f"{name} must hold one group per image ({n}), got {len(groups)}")
    for g in groups:
        if not isinstance(g, Hashable):
            raise ValueError(f"{name} must hold hashable group ids (ints or strings), got {type(g).__name__}")
    return groups


def _make_split(n_real, n_fake, real_groups, fake_groups, test_fraction, rng):
    """Per set, boolean masks of the test images, and the split's name; ``None`` masks mean a region split."""
    if real_groups is not None:
        uniq = sorted(set(real_groups) | set(fake_groups), key=repr)
        total = n_real + n_fake
        for _ in range(200):
            order = rng.permutation(len(uniq))
            test, n_test = set(), 0
            size = {g: real_groups.count(g) + fake_groups.count(g) for g in uniq}
            for i in order:
                if n_test >= test_fraction * total:
                    break
                test.add(uniq[i])
                n_test += size[uniq[i]]
            tr = np.array([g in test for g in real_groups])
            tf = np.array([g in test for g in fake_groups])
            if 0 < tr.sum() < n_real and 0 < tf.sum() < n_fake:
                return tr, tf, "group"
        raise ValueError("real_groups/fake_groups: cannot split the groups so that both sets have images on both "
                         "sides of the train/test split; give more groups (or none, to split by image)")
    if n_real >= 2 and n_fake >= 2:
        masks = []
        for n in (n_real, n_fake):
            k = min(max(1, round(test_fraction * n)), n - 1)
            m = np.zeros(n, bool)
            m[rng.choice(n, k, replace=False)] = True
            masks.append(m)
        return masks[0], masks[1], "image"
    return None, None, "region"


def _region_split(im: np.ndarray, patch: int, test_fraction: float, name: str):
    """Train and test regions ``(r0, r1, c0, c1)`` of one image: rows split (else columns), each >= ``patch``."""
    h, w = im.shape[:2]
    for axis, size in ((0, h), (1, w)):
        cut = round(size * (1.0 - test_fraction))
        cut = min(max(cut, patch), size - patch)
        if cut >= patch and size - cut >= patch:
            if axis == 0:
                return (0, cut, 0, w), (cut, h, 0, w)
            return (0, h, 0, cut), (0, h, cut, w)
    raise ValueError(f"{name} ({h} x {w}) is too small to split into train and test regions of {patch}-pixel "
                     "patches; give at least 2 images per set, larger images, or a smaller patch")


def c2st(
    real: ImageSet,
    fake: ImageSet,
    *,
    patch: int = 64,
    seed: SeedLike = 0,
    epochs: int = 8,
    n_patches: int = 512,
    test_fraction: float = 0.3,
    batch_size: int = 64,
    lr: float = 2e-3,
    real_groups: Sequence[Hashable] | None = None,
    fake_groups: Sequence[Hashable] | None = None,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> C2STResult:
    """Classifier two-sample test (Lopez-Paz & Oquab, 2017): can a small CNN tell real patches from synthetic ones?

    1. **Split** (seeded), so that no image contributes to both training and test:
       - ``"group"``: if ``real_groups``/``fake_groups`` are given, whole groups go to the test side (until about
         ``test_fraction`` of all images are there). Images sharing a group id, across both sets, stay together:
         use it when images are related, e.g. crops of one tile, or a synthetic image and the real tile whose mask
         it was rendered from. Without it, a classifier that memorises such a source can score *below* 0.5;
       - ``"image"``: otherwise, if both sets hold >= 2 images, ``round(test_fraction * n)`` images of each set
         (at least 1, at most n - 1) are held out;
       - ``"region"``: otherwise each image's top ``1 - test_fraction`` of rows is for training and the rest for
         testing (columns if the image is too short).
    2. **Patches**: ``n_patches`` per set, ``round(test_fraction * n_patches)`` of them from the test side, spread
       evenly over that side's images, at uniform random positions (they may overlap). Both classes have equal
       counts in training and in test, so chance is exactly 0.5.
    3. **Classifier**: a 4-block CNN (16-32-64-64 channels, batch norm, global average pooling), randomly
       initialised, no pretrained weights; input RGB / 255 - 0.5 (colour is kept: it is part of realism);
       Adam (``lr``), binary cross-entropy, random flips and 90-degree rotations, ``epochs`` epochs.
    4. **Score**: accuracy on the held-out patches, and a one-sided binomial p-value against 0.5.

    Reproducible: the same seed gives the same accuracy on the same device and torch build (torch's RNG is seeded
    inside ``torch.random.fork_rng``, so the caller's RNG state is untouched, and deterministic algorithms are
    switched on for the call). With defaults, 10 + 10 images of 256 x 256 take about 5-10 s on two CPU cores.

    Parameters
    ----------
    real, fake : image set
        Lists of RGB images (any sizes, each at least ``patch`` x ``patch``) or ``(N, H, W, 3)`` arrays.
    patch : int
        Patch side in pixels (>= 8).
    seed : int, numpy Generator or None
        Seeds the split, the patch positions, the network's initialisation and the batch order.
    epochs : int
        Training epochs (>= 1).
    n_patches : int
        Patches per set, training and test together (>= 4).
    test_fraction : float
        Share of images (or of each image, for ``"region"``) and of patches held out, in (0, 1).
    batch_size, lr
        Optimiser settings.
    real_groups, fake_groups : sequences of hashable, optional
        Source ids, one per image; both or neither.
    device : str
        ``"cpu"`` (default), ``"cuda"``, ``"mps"`` or ``"auto"``.
    progress : callable(done, total, message), optional
        Called after every epoch.
    should_stop : callable() -> bool, optional
        Checked before every batch; when it returns True training ends and the classifier trained so far is
        scored (``stopped=True``).

    Returns
    -------
    C2STResult

    Raises
    ------
    ValueError
        On empty sets, non-RGB images, images smaller than ``patch``, bad settings, or groups that cannot be split.
    """
    from scipy.stats import binomtest

    if not isinstance(patch, (int, np.integer)) or patch < 8:
        raise ValueError(f"patch must be an integer >= 8, got {patch!r}")
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(n_patches, (int, np.integer)) or n_patches < 4:
        raise ValueError(f"n_patches must be an integer >= 4, got {n_patches!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    if (real_groups is None) != (fake_groups is None):
        raise ValueError("real_groups and fake_groups must be given together (or neither)")
    reals = _as_image_list(real, "real")
    fakes = _as_image_list(fake, "fake")
    for ims, name in ((reals, "real"), (fakes, "fake")):
        for i, im in enumerate(ims):
            if min(im.shape[:2]) < patch:
                raise ValueError(f"{name}[{i}] ({im.shape[0]} x {im.shape[1]}) is smaller than patch={patch}")
    if real_groups is not None:
        real_groups = _check_groups(real_groups, len(reals), "real_groups")
        fake_groups = _check_groups(fake_groups, len(fakes), "fake_groups")
    dev = _resolve_device(device)
    rng = as_rng(seed)

    # -- split and patches ---------------------------------------------------------------------------------------
    n_test = min(max(1, round(test_fraction * n_patches)), n_patches - 1)
    n_train = n_patches - n_test
    test_r, test_f, split = _make_split(len(reals), len(fakes), real_groups, fake_groups, float(test_fraction), rng)
    sets = {}
    for cls, (ims, test_mask, name) in enumerate(((reals, test_r, "real"), (fakes, test_f, "fake"))):
        if test_mask is None:  # region split
            regions = [_region_split(im, patch, float(test_fraction), f"{name}[{i}]") for i, im in enumerate(ims)]
            tr_ims, tr_reg, te_ims, te_reg = ims, [r[0] for r in regions], ims, [r[1] for r in regions]
        else:
            full = [(0, im.shape[0], 0, im.shape[1]) for im in ims]
            tr_ims = [im for im, t in zip(ims, test_mask) if not t]
            te_ims = [im for im, t in zip(ims, test_mask) if t]
            tr_reg = [r for r, t in zip(full, test_mask) if not t]
            te_reg = [r for r, t in zip(full, test_mask) if t]
        sets[("train", cls)] = _sample_patches(tr_ims, tr_reg, n_train, patch, rng)
        sets[("test", cls)] = _sample_patches(te_ims, te_reg, n_test, patch, rng)

    def tensors(side):
        x = np.concatenate([sets[(side, 0)], sets[(side, 1)]])
        y = np.concatenate([np.zeros(len(sets[(side, 0)])), np.ones(len(sets[(side, 1)]))])
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).float()

    x_train, y_train = tensors("train")
    x_test, y_test = tensors("test")
    torch_seed = int(rng.integers(0, 2**62))

    def prep(xb: torch.Tensor) -> torch.Tensor:
        return xb.to(dev).float().div_(255.0).sub_(0.5)

    def predict(model, x) -> torch.Tensor:
        model.eval()
        out = []
        with torch.inference_mode():
            for s in range(0, len(x), 256):
                out.append(model(prep(x[s : s + 256])).cpu())
        return torch.cat(out)

    # -- training ------------------------------------------------------------------------------------------------
    det_before = torch.are_deterministic_algorithms_enabled()
    warn_only_before = torch.is_deterministic_algorithms_warn_only_enabled()
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    stopped, done = False, 0
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(torch_seed)
            gen = torch.Generator().manual_seed(torch_seed)
            model = _C2STNet().to(dev)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            loss_fn = nn.BCEWithLogitsLoss()
            for epoch in range(int(epochs)):
                model.train()
                order = torch.randperm(len(x_train), generator=gen)
                total = 0.0
                for s in range(0, len(order), batch_size):
                    if should_stop is not None and should_stop():
                        stopped = True
                        break
                    idx = order[s : s + batch_size]
                    if len(idx) < 2:  # batch norm needs two samples
                        continue
                    xb = x_train[idx]
                    if torch.rand(1, generator=gen).item() < 0.5:
                        xb = xb.flip(3)
                    if torch.rand(1, generator=gen).item() < 0.5:
                        xb = xb.flip(2)
                    xb = torch.rot90(xb, int(torch.randint(0, 4, (1,), generator=gen)), dims=(2, 3))
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(prep(xb)), y_train[idx].to(dev))
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                if stopped:
                    break
                done = epoch + 1
                if progress is not None:
                    progress(done, int(epochs), f"C2ST epoch {done}/{epochs}: loss {total / len(order):.4f}")
            pred_test = predict(model, x_test) > 0
            pred_train = predict(model, x_train) > 0
    finally:
        torch.use_deterministic_algorithms(det_before, warn_only=warn_only_before)

    correct = int((pred_test.float() == y_test).sum())
    acc = correct / len(y_test)
    train_acc = float((pred_train.float() == y_train).float().mean())
    p = float(binomtest(correct, len(y_test), 0.5, alternative="greater").pvalue)
    del model, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return C2STResult(
        accuracy=float(acc), n_train=len(y_train), n_test=len(y_test), p_value=p, train_accuracy=train_acc,
        split=split, epochs=done, stopped=stopped, patch=int(patch),
        seed=_seed_label(seed),
        n_real_images=len(reals), n_fake_images=len(fakes), device=str(dev),
    )
