"""Style exploration (render.explore): the gallery of one mask set in every style of a folder, and the style
interpolation of renderers that can blend styles (a tiny, untrained SIAN checkpoint). Small synthetic tiles only."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
from _tiny import synthetic_pair

from napari_nucsynth.render import (
    GalleryResult,
    gallery,
    interpolatable_methods,
    interpolate,
    render,
)
from napari_nucsynth.render.explore import GUTTER

SIZE = 96


@pytest.fixture
def labels():
    return synthetic_pair(10, SIZE)[1]


@pytest.fixture
def style_folder(tmp_path):
    """Three synthetic H&E tiles (b, a, c: listed out of order), a corrupt PNG and a text file."""
    folder = tmp_path / "styles"
    folder.mkdir()
    for name, seed in (("b_tile", 1), ("a_tile", 2), ("c_tile", 3)):
        iio.imwrite(folder / f"{name}.png", synthetic_pair(seed, SIZE)[0])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("where the tiles came from")
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are not looked at
    return folder


def test_gallery_of_a_folder(labels, style_folder):
    calls = []
    res = gallery(labels, style_folder, seed=4, progress=lambda i, n, what: calls.append((i, n, what)))
    assert isinstance(res, GalleryResult)
    assert res.names == ["a_tile", "b_tile", "c_tile"]  # sorted by file name
    assert [name for name, _ in res.skipped] == ["broken.png", "notes.txt"]
    assert "unreadable" in res.skipped[0][1] and "not an image file" in res.skipped[1][1]
    # 3 renders in rows of ceil(sqrt(3)) = 2, white gutter between cells and in the empty last cell
    assert res.grid.shape == (2 * SIZE + GUTTER, 2 * SIZE + GUTTER, 3) and res.grid.dtype == np.uint8
    step = SIZE + GUTTER
    assert res.cells == [(0, 0), (0, step), (step, 0)] and res.cell_shape == (SIZE, SIZE)
    assert (res.grid[SIZE : SIZE + GUTTER] == 255).all() and (res.grid[step:, step:] == 255).all()
    for (r, c), out, name in zip(res.cells, res.renders, res.names):
        assert np.array_equal(res.grid[r : r + SIZE, c : c + SIZE], out)
        # each cell is the renderer's own output for that style, with the one seed
        assert np.array_equal(out, render(labels, iio.imread(style_folder / f"{name}.png"), seed=4))
    assert not np.array_equal(res.renders[0], res.renders[1])  # the styles differ
    assert [c[:2] for c in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)] and "a_tile" in calls[0][2]


def test_gallery_same_seed_same_grid(labels, style_folder):
    a = gallery(labels, style_folder, seed=7)
    b = gallery(labels, style_folder, seed=7)
    assert np.array_equal(a.grid, b.grid)
    assert not np.array_equal(a.grid, gallery(labels, style_folder, seed=8).grid)


def test_gallery_of_images_with_names_columns_and_thumbnails(labels):
    imgs = [synthetic_pair(s, SIZE)[0] for s in (1, 2, 3)]
    res = gallery(labels, imgs, names=["x", "y", "z"], columns=3, thumb=48, seed=1)
    assert res.names == ["x", "y", "z"] and not res.skipped
    assert res.grid.shape == (48, 3 * 48 + 2 * GUTTER, 3) and res.cell_shape == (48, 48)
    assert res.cells == [(0, 0), (0, 48 + GUTTER), (0, 2 * (48 + GUTTER))]
    assert all(r.shape == (SIZE, SIZE, 3) for r in res.renders)  # the renders keep their full size
    assert gallery(labels, imgs[:2], seed=1).names == ["style 1", "style 2"]
    # a reference the renderer refuses is skipped and named; the rest is rendered
    white = np.full((SIZE, SIZE, 3), 245, np.uint8)
    res = gallery(labels, [imgs[0], white], names=["tile", "white"], seed=1)
    assert res.names == ["tile"] and res.skipped[0][0] == "white" and "nuclei" in res.skipped[0][1]
    with pytest.raises(ValueError, match="no detectable nuclei"):  # every style refused: the reason, once
        gallery(labels, [white, white], seed=1)


def test_gallery_cancel(labels, style_folder):
    seen = []

    def progress(i, n, what):
        seen.append(i)

    with pytest.raises(InterruptedError):
        gallery(labels, style_folder, progress=progress, should_stop=lambda: len(seen) >= 1)
    assert seen == [0]  # stopped before the second style


def test_gallery_clear_errors(labels, tmp_path, style_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is empty"):
        gallery(labels, empty)
    (empty / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable image.*bad.png"):
        gallery(labels, empty)
    with pytest.raises(ValueError, match="not found"):
        gallery(labels, tmp_path / "missing")
    with pytest.raises(ValueError, match="labels must be a 2-D"):
        gallery(np.zeros((4, 4, 3), np.uint32), style_folder)
    with pytest.raises(ValueError, match="labels is empty"):
        gallery(np.zeros((0, 5), np.uint32), style_folder)
    with pytest.raises(ValueError, match="one name per style"):
        gallery(labels, [synthetic_pair(1, SIZE)[0]], names=["a", "b"])
    with pytest.raises(ValueError, match="names are taken from the file names"):
        gallery(labels, style_folder, names=["a"])
    with pytest.raises(ValueError, match="columns"):
        gallery(labels, style_folder, columns=0)
    with pytest.raises(ValueError, match="unknown render method"):
        gallery(labels, style_folder, method="nope")
    with pytest.raises(ValueError, match="for one image pass"):
        gallery(labels, synthetic_pair(1, SIZE)[0])


# ----------------------------------------------------------------------------------------------------------------
# interpolation


def test_interpolate_ends_are_the_two_styles(labels, tiny_sian_checkpoint):
    a, b = synthetic_pair(1, 64)[0], synthetic_pair(5, 80)[0]
    lab = labels[:64, :64]
    kw = dict(method="sian", checkpoint=tiny_sian_checkpoint, seed=3, device="cpu")
    assert interpolatable_methods() == ["sian"] or "sian" in interpolatable_methods()
    assert "classic" not in interpolatable_methods()
    ra, rb = render(lab, a, **kw), render(lab, b, **kw)
    t0 = interpolate(lab, a, b, 0.0, **kw)
    assert t0.shape == (64, 64, 3) and t0.dtype == np.uint8
    assert np.array_equal(t0, ra)  # t = 0 is the main style's render (its mean style vector, the same noise)
    assert np.array_equal(interpolate(lab, a, b, 1, **kw), rb)
    mid = interpolate(lab, a, b, 0.5, **kw)
    assert np.array_equal(mid, interpolate(lab, a, b, 0.5, **kw))  # seeded
    if not np.array_equal(ra, rb):
        assert not np.array_equal(mid, ra) and not np.array_equal(mid, rb)
    stops = []
    with pytest.raises(InterruptedError):
        interpolate(lab, a, b, 0.5, should_stop=lambda: stops.append(1) or True, **kw)


def test_interpolate_refuses_what_it_cannot_do(labels, tiny_sian_checkpoint, monkeypatch, tmp_path):
    a = synthetic_pair(1, 64)[0]
    with pytest.raises(ValueError, match="'classic' renderer cannot interpolate.*sian"):
        interpolate(labels, a, a, 0.5, method="classic")
    with pytest.raises(ValueError, match="unknown render method"):
        interpolate(labels, a, a, 0.5, method="nope")
    with pytest.raises(ValueError, match="finite"):
        interpolate(labels, a, a, float("nan"), checkpoint=tiny_sian_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="t must be a number"):
        interpolate(labels, a, a, "half", checkpoint=tiny_sian_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="style_b"):
        interpolate(labels, a, np.zeros((8, 8, 2), np.uint8), 0.5, checkpoint=tiny_sian_checkpoint, device="cpu")
    from napari_nucsynth.render import sian as RS

    monkeypatch.setattr(RS, "default_checkpoint", lambda: tmp_path / "none.pt")
    with pytest.raises(ValueError, match="nucsynth train --model sian"):
        interpolate(labels, a, a, 0.5)
