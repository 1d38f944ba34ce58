"""Image metrics: FID, KID, feature extractors, SSIM, diversity and the classifier two-sample test."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from napari_nucsynth.metrics import (
    C2STResult,
    InceptionExtractor,
    MetricResult,
    RandomConvExtractor,
    c2st,
    diversity,
    feature_extractor,
    fid,
    kid,
    ssim,
)
from napari_nucsynth.metrics import image as image_metrics

CROP = 128


# ----------------------------------------------------------------------------------------------------------------
# Data: crops of real MoNuSeg tiles and degraded copies of them
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiles(monuseg_tiles, load_tile):
    """The fixture's image tiles larger than a crop: two of 400 x 400 and two of 160 x 160, four patients."""
    images = [load_tile(t)[0] for t in monuseg_tiles]
    return [im for im in images if im is not None and min(im.shape[:2]) > CROP]


def _random_crops(tiles, per_tile, size, seed):
    rng = np.random.default_rng(seed)
    out = []
    for t in tiles:
        for _ in range(per_tile):
            r, c = rng.integers(0, t.shape[0] - size), rng.integers(0, t.shape[1] - size)
            out.append(t[r : r + size, c : c + size])
    return out


@pytest.fixture(scope="module")
def crops(tiles):
    """48 crops of 128 x 128 from the 4 tiles."""
    assert len(tiles) == 4
    return _random_crops(tiles, 12, CROP, seed=0)


@pytest.fixture(scope="module")
def extractor():
    return feature_extractor("random-conv")


def colour_shift(images, s):
    """Add ``(s, -s, s/2)`` to R, G, B (clipped): a stain shift of size ``s``."""
    return [np.clip(im.astype(np.int16) + np.array([s, -s, s // 2]), 0, 255).astype(np.uint8) for im in images]


def blur(images, sigma):
    return [gaussian_filter(im, (sigma, sigma, 0)) for im in images]


# ----------------------------------------------------------------------------------------------------------------
# Extractors
# ----------------------------------------------------------------------------------------------------------------
def test_metrics_package_imports_image_metrics_lazily():
    code = ("import sys, napari_nucsynth.metrics as m\n"
            "assert 'torch' not in sys.modules and 'napari_nucsynth.metrics.image' not in sys.modules\n"
            "assert {'fid', 'kid', 'ssim', 'diversity', 'c2st', 'feature_extractor'} <= set(m.__all__)\n"
            "m.fid\n"
            "assert 'torch' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_random_conv_is_deterministic_and_named(crops):
    a = RandomConvExtractor()(crops[:6])
    b = feature_extractor("random-conv")(np.stack(crops[:6]))  # a fresh network, the images as one array
    assert a.shape == (6, 256) and a.dtype == np.float64 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    # the features of an image do not depend on the batch it came in (to float32 round-off)
    np.testing.assert_allclose(RandomConvExtractor()([crops[3]])[0], a[3], rtol=1e-5, atol=1e-6)
    # different images, different features; another seed, another network (and another name)
    assert not np.allclose(a[0], a[1])
    other = RandomConvExtractor(seed=1)
    assert other.name == "random-conv(seed=1)" and not np.allclose(other(crops[:1]), a[:1])
    # images of different sizes are run at their own size
    mixed = RandomConvExtractor()([crops[0], crops[1][:100, :90]])
    assert mixed.shape == (2, 256) and np.allclose(mixed[0], a[0], rtol=1e-5, atol=1e-6)
    # it reports its name in the results
    assert fid(crops[:8], crops[8:16], "random-conv").extractor == "random-conv"


@pytest.fixture(scope="module")
def inception_state_file(tmp_path_factory):
    """A randomly initialised Inception-v3 state dict saved as torchvision's weights file would be."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("weights") / image_metrics.INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


def test_inception_loads_from_a_local_file(inception_state_file, crops):
    ext = feature_extractor("inception", weights=inception_state_file)
    assert isinstance(ext, InceptionExtractor) and ext.name == "inception"
    feats = ext([crops[0], crops[1][:100, :77]])  # any size: each is resized to 299 x 299
    assert feats.shape == (2, 2048) and feats.dtype == np.float64 and np.all(np.isfinite(feats))
    assert not np.allclose(feats[0], feats[1])
    # the name travels into results (KID here: FID's 2048 x 2048 square root alone takes seconds)
    res = kid([crops[0], crops[2]], feats, ext, subsets=2)
    assert res.extractor == "inception" and np.isfinite(res.value)


def test_inception_from_hub_cache_auto_and_missing(inception_state_file, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    # nothing cached: auto falls back, an explicit request says where the file goes
    assert feature_extractor("auto").name == "random-conv"
    with pytest.raises(ValueError, match=r"inception_v3_google-0cc3c7bd\.pth") as err:
        feature_extractor("inception")
    assert str(tmp_path / "checkpoints") in str(err.value)
    with pytest.raises(ValueError, match="weights"):
        feature_extractor("inception", weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights"):
        feature_extractor("auto", weights=bad)
    # cached under torch hub's checkpoints folder: auto and inception both find it
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / image_metrics.INCEPTION_FILE).write_bytes(inception_state_file.read_bytes())
    assert feature_extractor("auto").name == "inception"
    assert feature_extractor("inception").name == "inception"
    with pytest.raises(ValueError, match="kind"):
        feature_extractor("vgg")


# ----------------------------------------------------------------------------------------------------------------
# FID and KID
# ----------------------------------------------------------------------------------------------------------------
def test_fid_zero_for_same_set_and_monotone_in_shift(tiles, crops, extractor):
    same = fid(crops, crops, extractor)
    assert isinstance(same, MetricResult) and same.metric == "fid"
    assert (same.extractor, same.n_real, same.n_fake, same.std) == ("random-conv", 48, 48, None)
    assert same.value < 1e-6
    shifted = [fid(crops, colour_shift(crops, s), extractor).value for s in (5, 10, 20, 40)]
    assert np.all(np.diff(shifted) > 0), shifted
    assert shifted[0] > 1e-3
    blurred = [fid(crops, blur(crops, s), extractor).value for s in (1, 2, 3)]
    assert np.all(np.diff(blurred) > 0), blurred
    # other crops of the same tiles are closer than a strong stain shift
    others = _random_crops(tiles, 12, CROP, seed=1)
    assert fid(crops, others, extractor).value < shifted[-1] / 10
    # features in, the same value out
    fr = extractor(crops)
    ff = extractor(colour_shift(crops, 20))
    assert fid(fr, ff).value == pytest.approx(shifted[2], rel=1e-9)
    assert fid(fr, ff).extractor == "precomputed"


def test_fid_hand_computed_gaussians():
    # 1-D features: FID = (mu1 - mu2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    a = np.array([[0.0], [2.0]])  # mean 1, variance 2 (N - 1)
    b = np.array([[3.0], [7.0]])  # mean 5, variance 8
    assert fid(a, b).value == pytest.approx(16.0 + (np.sqrt(2) - np.sqrt(8)) ** 2)


def test_kid_zero_for_same_set_and_monotone_in_shift(crops, extractor):
    fr = extractor(crops)
    shifted = [kid(fr, extractor(colour_shift(crops, s)), extractor, subsets=20, subset_size=32).value
               for s in (10, 20, 40)]
    assert np.all(np.diff(shifted) > 0), shifted
    same = kid(fr, fr, extractor, subsets=20, subset_size=32)
    assert same.metric == "kid" and same.extractor == "random-conv" and same.std is not None and same.std >= 0
    assert abs(same.value) < shifted[-1] / 20
    assert same.params["subset_size"] == 32
    # seeded
    again = kid(fr, fr, extractor, subsets=20, subset_size=32)
    assert again.value == same.value
    # subset size is capped at the smaller set
    assert kid(fr[:10], fr, subsets=3).params["subset_size"] == 10


def test_kid_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 4)), rng.normal(1.0, 1.0, size=(5, 4))
    k = lambda u, v: (u @ v / 4 + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25
    res = kid(x, y, subsets=3, subset_size=5)  # the whole set each time
    assert res.value == pytest.approx(xx + yy - 2 * xy) and res.std == pytest.approx(0, abs=1e-12)


def test_fid_kid_bad_input(crops):
    with pytest.raises(ValueError, match="real"):
        fid([], crops[:4])
    with pytest.raises(ValueError, match="fake"):
        fid(crops[:4], [crops[0]])
    with pytest.raises(ValueError, match=r"fake\[1\]"):
        fid(crops[:4], [crops[0], np.zeros((8, 8, 2), np.uint8)])
    with pytest.raises(ValueError, match="dimension"):
        fid(np.zeros((4, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="real"):
        kid(crops[0], crops[:4])  # a single image, not a set
    with pytest.raises(ValueError, match="subsets"):
        kid(crops[:4], crops[:4], subsets=0)


# ----------------------------------------------------------------------------------------------------------------
# SSIM and diversity
# ----------------------------------------------------------------------------------------------------------------
def test_ssim(crops):
    a = crops[0]
    assert ssim(a, a.copy()) == pytest.approx(1.0)
    assert ssim(a, blur([a], 2)[0]) < 0.95
    assert ssim(a, crops[1]) < ssim(a, blur([a], 1)[0]) < 1.0
    assert ssim(a, a.astype(np.float64) / 255.0) == pytest.approx(1.0)  # floats in [0, 1] are converted
    with pytest.raises(ValueError, match="b"):
        ssim(a, a[:100])
    with pytest.raises(ValueError, match="a"):
        ssim(np.zeros((32, 32, 5), np.uint8), a)
    with pytest.raises(ValueError, match="a"):
        ssim(a.astype(np.int64), a)


def test_diversity():
    base = np.full((4, 4, 3), 100, np.uint8)
    assert diversity([base, base.copy(), base.copy()]) == 0.0
    # one pixel in one channel differs across three renders: 0, 0, 30 -> population std sqrt(200)
    r3 = base.copy()
    r3[1, 2, 0] = 130
    assert diversity([base, base, r3]) == pytest.approx(np.sqrt(200.0) / 48)
    # two renders differing by d everywhere: std d / 2 at every pixel
    assert diversity(np.stack([base, base + 10])) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="renders"):
        diversity([base])
    with pytest.raises(ValueError, match="renders"):
        diversity([base, base[:3]])


# ----------------------------------------------------------------------------------------------------------------
# Classifier two-sample test
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def c2st_sets(tiles):
    """9 + 9 crops of 128 x 128: the 3 x 3 blocks of the two 400 x 400 tiles, dealt to the two sets like the squares
    of a chequerboard (5 + 4 of one tile, 4 + 5 of the other), and each crop's tile as its group."""
    real, other, real_groups, other_groups = [], [], [], []
    for k, t in enumerate(t for t in tiles if min(t.shape[:2]) >= 3 * CROP):
        for r in range(3):
            for c in range(3):
                block = t[r * CROP : (r + 1) * CROP, c * CROP : (c + 1) * CROP]
                if (r + c + k) % 2 == 0:
                    real.append(block)
                    real_groups.append(k)
                else:
                    other.append(block)
                    other_groups.append(k)
    assert len(real) == len(other) == 9
    return real, other, real_groups, other_groups


def test_c2st_same_distribution_is_chance(c2st_sets):
    real, other, real_groups, other_groups = c2st_sets
    # the crops of one tile stay on one side of the split (measured: 0.5, 0.5, 0.494, 0.5 for seeds 0-3)
    res = c2st(real, other, real_groups=real_groups, fake_groups=other_groups, seed=0)
    print("C2ST same tiles:", res)
    assert isinstance(res, C2STResult) and res.split == "group" and not res.stopped
    assert res.n_test > 100 and res.n_train > res.n_test
    assert abs(res.accuracy - 0.5) < 0.15


def test_c2st_detects_fakes(c2st_sets):
    real, other, *_ = c2st_sets
    rng = np.random.default_rng(1)
    noisy = [np.clip(im + rng.normal(0, 20, im.shape), 0, 255).astype(np.uint8) for im in other]
    shifted = colour_shift(other, 30)
    fake = noisy[:5] + shifted[5:]
    groups = list(range(len(real)))
    done = []
    # 32-px patches: a quarter of the default's work, and as sure (accuracy 0.96, 1.0, 1.0, 1.0 for seeds 0-3,
    # against 0.92 for seed 0 at 64 px)
    res = c2st(real, fake, real_groups=groups, fake_groups=groups, patch=32, seed=0,
               progress=lambda *a: done.append(a))
    print("C2ST fakes:", res)
    assert res.accuracy > 0.85 and res.p_value < 1e-6
    assert len(done) == res.epochs == 8 and done[-1][:2] == (8, 8)


def test_c2st_reproducible_and_stoppable(c2st_sets):
    real, other, *_ = c2st_sets
    fake = colour_shift(other, 8)
    kw = {"epochs": 2, "n_patches": 128, "seed": 3}  # an image split (no groups); small, for speed
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = c2st(real[:6], fake[:6], **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    b = c2st(real[:6], fake[:6], **kw)
    assert a.split == "image" and a == b
    # a single image per set: disjoint regions of it
    r = c2st(real[:1], fake[:1], epochs=1, n_patches=64, seed=0)
    assert r.split == "region" and r.n_test == 2 * 19
    # stopped before the first batch: no epochs, still a result
    s = c2st(real[:4], fake[:4], epochs=3, n_patches=64, should_stop=lambda: True)
    assert s.stopped and s.epochs == 0 and 0.0 <= s.accuracy <= 1.0


def test_c2st_bad_input(c2st_sets):
    real, other, *_ = c2st_sets
    with pytest.raises(ValueError, match="real"):
        c2st([], other)
    with pytest.raises(ValueError, match=r"fake\[0\]"):
        c2st(real, [other[0][:32, :32]])
    with pytest.raises(ValueError, match="groups"):
        c2st(real, other, real_groups=[0] * len(real))
    with pytest.raises(ValueError, match="groups"):
        c2st(real, other, real_groups=[0] * len(real), fake_groups=[0] * len(other))  # one group: no split
    with pytest.raises(ValueError, match="real_groups"):
        c2st(real[:3], other[:3], real_groups=[0, 1], fake_groups=[0, 1, 2])
    with pytest.raises(ValueError, match="patch"):
        c2st(real, other, patch=4)
