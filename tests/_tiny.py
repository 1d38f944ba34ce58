"""Tiny model configurations, a synthetic H&E-like pair and small helpers, shared by the tests (train in seconds on a
CPU).

Imported as ``from _tiny import ...``: pytest puts ``tests/`` on ``sys.path`` (it has no ``__init__.py``).
"""

from __future__ import annotations

import numpy as np

#: HoVer-Net on a ResNet-18 of 8 base channels, no pretrained weights
HOVERNET = {"backbone": "resnet18", "width": 8, "pretrained": None}
#: AdaIN: a decoder of an eighth of the encoder's channels (the shipped segmenter's encoder), a one-scale D
ADAIN = {"width": 0.125, "ndf": 8, "d_layers": 2, "num_d": 1}
#: SIAN: 2 upsamplings (multiples of 4), a few channels, the shipped segmenter as feature network
SIAN = {"ngf": 4, "ngf_max": 16, "n_up": 2, "hidden": 0.5, "noise_nc": 2, "style_dim": 8, "nef": 4,
        "enc_layers": 3, "ndf": 8, "d_layers": 2, "num_d": 2, "features": "hovernet",
        "tile": 128, "blend": 8}
#: Mask R-CNN with narrow heads and fewer proposals
MASKRCNN = {
    "fpn_channels": 32, "representation_size": 128, "mask_channels": 16, "mask_layers": 2, "semantic_channels": 16,
    "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300, "rpn_pre_nms_top_n_test": 600,
    "rpn_post_nms_top_n_test": 300, "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 128,
    "box_detections_per_img": 300,
}


def synthetic_pair(seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like tile (pink background, purple noisy nuclei) and its instance labels (14 discs at most)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    lab = np.zeros((size, size), np.uint32)
    for i in range(1, 15):
        r, c, rad = rng.uniform(6, size - 6), rng.uniform(6, size - 6), rng.uniform(3.5, 6.5)
        lab[((yy - r) ** 2 + (xx - c) ** 2 <= rad**2) & (lab == 0)] = i
    bg = np.array([235, 190, 215]) + rng.integers(-20, 20, 3)
    fg = np.array([95, 60, 150]) + rng.integers(-20, 20, 3)
    img = np.where((lab > 0)[..., None], fg, bg) + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8), lab


def discs(shape=(64, 64), seed: int = 0, n: int = 12, r=(4, 8)) -> np.ndarray:
    """Instance labels of up to ``n`` random discs (radius in ``r``), clipped by the edges, first come first kept."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        cy, cx, rr = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(*r)
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 <= rr**2) & (lab == 0)] = i
    return lab


def flat_style(seed: int = 0, shape=(48, 40)) -> np.ndarray:
    """A style reference: one random colour with noise (no nuclei), of a shape unlike the labels'."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(60, 230, 3) + rng.normal(0, 20, shape + (3,)), 0, 255).astype(np.uint8)


def lively(model, seed: int = 0, *, sync_ema: bool = False):
    """Unit-gain random weights (a GAN's initial ones are tiny or zero: SPADE's gain 0.02, attention gammas,
    zero-initialised style layers), so that every input visibly changes the output; spectrally normalised weights
    are left alone (their norm is 1 either way). ``sync_ema`` copies them into the moving-average generator too.
    Returns the model in eval mode."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "parametrizations" in name:
                continue
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if sync_ema:
            model.ema["generator"].load_state_dict(model.generator.state_dict())
    return model.eval()


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` (for the test's duration) so that each call appends to the returned list."""
    calls: list = []
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


def same_analysis(a, b) -> bool:
    """Two classic-renderer reference analyses (:class:`napari_nucsynth.presynthesis.ReferenceStyle`) hold the
    same arrays, dtypes included."""
    from napari_nucsynth.presynthesis import _LAYOUT

    return a.n_detected == b.n_detected and all(
        getattr(a, f).dtype == getattr(b, f).dtype and np.array_equal(getattr(a, f), getattr(b, f)) for f in _LAYOUT)


def stopped_then_resumed_equals_straight(kind: str, imgs, labs, tmp_path, config: dict, **kw):
    """Train ``kind`` 3 steps stopped after step 2, resume it to 3, and train 3 steps straight: assert the resumed
    and the straight weights agree (same data, same random state) and return the stopped run's result."""
    import torch

    from napari_nucsynth.models import load_checkpoint
    from napari_nucsynth.train import train

    events: list = []
    res = train(kind, imgs, labs, steps=3, out=tmp_path / "a.pt", config=dict(config), seed=1,
                on_update=events.append, should_stop=lambda: sum(e.kind == "step" for e in events) >= 2, **kw)
    assert res.step == 2 and res.stopped
    res2 = train(kind, imgs, labs, steps=3, out=tmp_path / "b.pt", resume=res.path, **kw)
    full = train(kind, imgs, labs, steps=3, out=tmp_path / "c.pt", config=dict(config), seed=1, **kw)
    a, b = load_checkpoint(full.path)["state_dict"], load_checkpoint(res2.path)["state_dict"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    return res


def assert_channels_last_inference(model, x) -> None:
    """``model`` (eval mode) runs its first convolution on channels-last input without autograd and on the plain
    layout with it, and both give the same contiguous output (to float rounding)."""
    import torch

    seen = []
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.enable_grad():
        plain = model(x).detach()
    with torch.inference_mode():
        fast = model(x)
    assert seen == [False, True]
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
