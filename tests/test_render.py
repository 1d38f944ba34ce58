"""Tests of the renderer registry and the classic renderer (contract and basic appearance)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_nucsynth.render import render, renderers
from napari_nucsynth.stain import rgb_to_hed

STYLE = "TCGA-49-4488-01Z-00-DX1"


@pytest.fixture(scope="module")
def small(load_tile):
    img, lab = load_tile(STYLE)
    _, target = load_tile("TCGA-38-6178-01Z-00-DX1")
    return img[:256, :256], lab[:256, :256], target[:200, :300]


def test_registry_lists_classic():
    assert "classic" in renderers()
    with pytest.raises(ValueError, match="unknown render method"):
        render(np.zeros((4, 4), np.uint32), np.zeros((4, 4, 3), np.uint8), method="nope")


def test_classic_render_contract(small):
    style, style_lab, target = small
    out = render(target, style, seed=0)
    assert out.shape == target.shape + (3,) and out.dtype == np.uint8
    assert np.array_equal(out, render(target, style, seed=0))
    assert not np.array_equal(out, render(target, style, seed=1))
    # nuclei carry more haematoxylin than the background, as in the reference
    h = rgb_to_hed(out)[..., 0]
    assert h[target > 0].mean() > h[target == 0].mean() + 0.02
    with_labels = render(target, style, style_labels=style_lab, seed=0)
    assert with_labels.shape == out.shape


def test_registered_classic_is_the_presynthesis(small):
    """render/classic.py only registers napari_nucsynth.presynthesis.ClassicRenderer: same class, same pixels."""
    from napari_nucsynth import presynthesis
    from napari_nucsynth.render import get_renderer
    from napari_nucsynth.render.classic import ClassicRenderer

    style, style_lab, target = small
    registered = get_renderer("classic")
    assert isinstance(registered, ClassicRenderer) and isinstance(registered, presynthesis.ClassicRenderer)
    assert (registered.name, registered.needs_checkpoint) == ("classic", False)
    assert np.array_equal(registered(target, style, style_labels=style_lab, seed=3),
                          presynthesis.ClassicRenderer()(target, style, style_labels=style_lab, seed=3))


def test_output_larger_than_the_reference(small):
    style, _, _ = small
    lab = np.zeros((600, 380), np.uint32)
    lab[100:120, 100:120] = 1
    out = render(lab, style, seed=0)
    assert out.shape == (600, 380, 3)


def test_bad_input(small):
    style, style_lab, target = small
    with pytest.raises(ValueError, match="no detectable nuclei"):
        render(target, np.full((64, 64, 3), 245, np.uint8), seed=0)
    with pytest.raises(ValueError, match="style"):
        render(target, np.zeros((64, 64, 2), np.uint8))
    with pytest.raises(ValueError, match="style_labels"):
        render(target, style, style_labels=style_lab[:10])
    with pytest.raises(ValueError, match="labels"):
        render(np.zeros((0, 5), np.uint32), style)


def test_alignment_and_stain_on_a_real_tile(small):
    """The rendered nuclei sit where the labels say (Otsu on haematoxylin, as in bench_render.py) and carry the
    reference's nucleus and background densities."""
    from skimage.filters import threshold_otsu

    from napari_nucsynth.metrics import pixel_f1

    style, style_lab, target = small
    out = render(target, style, style_labels=style_lab, seed=3)
    h = rgb_to_hed(out)[..., 0]
    f1 = pixel_f1((target > 0).astype(np.uint8), (h > threshold_otsu(h)).astype(np.uint8))
    assert f1 > 0.7
    ref_hed, out_hed = rgb_to_hed(style), rgb_to_hed(out)
    for ref_px, out_px in ((ref_hed[style_lab > 0], out_hed[target > 0]), (ref_hed[style_lab == 0], out_hed[target == 0])):
        rel = np.abs(out_px.mean(0)[:2] - ref_px.mean(0)[:2]) / ref_px.mean(0)[:2]
        assert rel.max() < 0.25, rel


def test_nucleus_texture_comes_from_the_reference(small):
    """Inside the nuclei the render has the chromatin spread of real nuclei, not a flat fill."""
    style, style_lab, target = small
    out = rgb_to_hed(render(target, style, style_labels=style_lab, seed=0))[..., 0]
    from scipy import ndimage as ndi

    inner_t = ndi.binary_erosion(target > 0, iterations=2)
    inner_r = ndi.binary_erosion(style_lab > 0, iterations=2)
    real_sd = rgb_to_hed(style)[..., 0][inner_r].std()
    assert 0.5 * real_sd < out[inner_t].std() < 2.0 * real_sd


def test_strips_equal_the_one_piece_render(small, monkeypatch):
    """Large outputs are computed in strips; the strips must not change a single pixel (no seams)."""
    from napari_nucsynth import presynthesis

    style, style_lab, target = small
    lab = np.concatenate([target, target[::-1]], 0)  # 400 x 300, nuclei across every strip border
    whole = render(lab, style, style_labels=style_lab, seed=5)
    monkeypatch.setattr(presynthesis, "TILE", 64)
    strips = render(lab, style, style_labels=style_lab, seed=5)
    assert np.array_equal(whole, strips)


def test_edge_sigma_softens_the_nuclei_edges_only(small, monkeypatch):
    """``edge_sigma``: its default is EDGE_SIGMA; 0 pastes the nuclei with hard edges, so every pixel off the masks
    is the background the same seed draws without nuclei; a soft edge reaches past the masks; the strips stay
    seamless at the largest value; other values are refused."""
    from scipy import ndimage as ndi

    from napari_nucsynth import presynthesis

    style, style_lab, target = small
    kw = dict(style_labels=style_lab, seed=3)
    soft = render(target, style, **kw)
    assert np.array_equal(soft, render(target, style, options={"edge_sigma": presynthesis.EDGE_SIGMA}, **kw))
    hard = render(target, style, options={"edge_sigma": 0}, **kw)
    background = render(np.zeros_like(target), style, **kw)
    off = target == 0
    assert np.array_equal(hard[off], background[off])
    ring = off & ndi.binary_dilation(target > 0)  # the pixels just outside the masks
    assert np.mean(np.any(soft[ring] != background[ring], axis=-1)) > 0.5
    edge = (target > 0) & ~ndi.binary_erosion(target > 0)  # the masks' outermost pixels: denser without the blend
    assert rgb_to_hed(hard)[..., 0][edge].mean() > rgb_to_hed(soft)[..., 0][edge].mean()
    lab = np.concatenate([target, target[::-1]], 0)
    whole = render(lab, style, options={"edge_sigma": presynthesis.MAX_EDGE_SIGMA}, **kw)
    monkeypatch.setattr(presynthesis, "TILE", 64)
    assert np.array_equal(whole, render(lab, style, options={"edge_sigma": presynthesis.MAX_EDGE_SIGMA}, **kw))
    for bad in (-0.1, presynthesis.MAX_EDGE_SIGMA + 0.1, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="edge_sigma must be a number from 0 to 2"):
            render(target, style, options={"edge_sigma": bad}, **kw)


def test_empty_labels_render_the_background(small):
    style, style_lab, _ = small
    out = render(np.zeros((120, 90), np.uint32), style, style_labels=style_lab, seed=0)
    assert out.shape == (120, 90, 3)
    h = rgb_to_hed(out)[..., 0]
    assert h.mean() < rgb_to_hed(style)[..., 0][style_lab > 0].mean()


def test_huge_and_sparse_ids(small):
    style, _, target = small
    sparse = np.where(target > 0, target.astype(np.uint64) * 1_000_003 + 2**33, 0)
    a = render(sparse, style, seed=2)
    b = render(target, style, seed=2)
    assert a.shape == b.shape
    h = rgb_to_hed(a)[..., 0]
    assert h[target > 0].mean() > h[target == 0].mean() + 0.02


def test_cancel_and_progress(small):
    style, style_lab, target = small
    seen = []
    render(target, style, style_labels=style_lab, seed=0, progress=lambda i, n, what: seen.append((i, n)))
    assert seen[-1][0] == seen[-1][1]
    with pytest.raises(InterruptedError):
        render(target, style, style_labels=style_lab, seed=0, should_stop=lambda: True)


def test_reference_cache_tells_references_apart(small):
    """Two references must never share a cached analysis (different stain gives a different render)."""
    style, style_lab, target = small
    darker = (style.astype(np.float32) * 0.7).astype(np.uint8)
    a = render(target, style, style_labels=style_lab, seed=0)
    b = render(target, darker, style_labels=style_lab, seed=0)
    assert rgb_to_hed(b)[..., 0].mean() > rgb_to_hed(a)[..., 0].mean()


def test_output_larger_than_the_reference_keeps_its_stain(small):
    """An output larger than the reference is a quilt of its background: same mean densities, no dark or pale
    block seams (row and column means stay close to the overall mean)."""
    style, style_lab, _ = small
    out = rgb_to_hed(render(np.zeros((700, 520), np.uint32), style, style_labels=style_lab, seed=1))
    ref = rgb_to_hed(style)[style_lab == 0]
    rel = np.abs(out.reshape(-1, 3).mean(0)[:2] - ref.mean(0)[:2]) / ref.mean(0)[:2]
    assert rel.max() < 0.15, rel
    for axis in (0, 1):
        prof = out[..., 0].mean(axis=1 - axis)
        assert np.abs(prof - prof.mean()).max() < 4 * prof.std() + 1e-3


_RENDER_SCRIPT = """
import sys
import numpy as np
from napari_nucsynth._sample_data import load_monuseg_crop
from napari_nucsynth.render import render
img, lab = load_monuseg_crop()
big = np.tile(img, (3, 3, 1))  # a 1200 x 1200 reference: large enough for BLAS to use several threads
big_lab = np.zeros(big.shape[:2], np.uint32)
for i in range(3):
    for j in range(3):
        part = lab.astype(np.uint32)
        big_lab[i * 400:(i + 1) * 400, j * 400:(j + 1) * 400] = np.where(part > 0, part + (3 * i + j) * 10000, 0)
out = render(lab, big, style_labels=big_lab, seed=1)
np.save(sys.argv[1], out)
"""


def test_classic_render_does_not_depend_on_the_thread_count(tmp_path):
    """The reference's weighted means once went through a multi-threaded BLAS, whose summation order changed some
    pixels by 1 between 1 and 2 threads: a dataset regenerated on another machine differed from the original."""
    import os
    import subprocess
    import sys

    outs = []
    for threads in ("1", "2"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        out = tmp_path / f"r{threads}.npy"
        subprocess.run([sys.executable, "-c", _RENDER_SCRIPT, str(out)], env=env, check=True, timeout=300)
        outs.append(np.load(out))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_render_options_reach_the_method_and_unknown_ones_are_refused():
    from _tiny import synthetic_pair

    from napari_nucsynth.render import gallery

    img, lab = synthetic_pair(0)
    with pytest.raises(ValueError, match=r"'classic' takes no option 'strength'; its options: edge_sigma"):
        render(lab, img, options={"strength": 0.5})
    with pytest.raises(ValueError, match=r"'adain' takes no option 'bogus'; its options: alpha, strength, tile"):
        render(lab, img, method="adain", options={"bogus": 1})
    with pytest.raises(ValueError, match="takes no option 'seed'"):  # common arguments are not options
        render(lab, img, method="adain", options={"seed": 1})
    # adain's strength 0 is the classic render; the gallery passes options on, and checks them before any work
    assert np.array_equal(render(lab, img, method="adain", seed=1, options={"strength": 0.0}), render(lab, img, seed=1))
    g = gallery(lab, [img], method="adain", seed=1, options={"strength": 0.0})
    assert np.array_equal(g.renders[0], render(lab, img, seed=1))
    with pytest.raises(ValueError, match="takes no option"):
        gallery(lab, [img], options={"strength": 0.5})
