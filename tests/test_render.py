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
