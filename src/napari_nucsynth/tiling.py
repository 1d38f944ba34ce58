"""Tiling and test-time augmentation for networks and segmenters (Qt-free, numpy/scipy; no torch).

A base layer: :mod:`napari_nucsynth.models` (network inference) and :mod:`napari_nucsynth.segment` (the
segmenters) both import it, and it imports neither of them (nor ``render`` or ``train``; ``tests/test_layers.py``).
Three functions that every segmenter shares, so that each only has to say what it does to one piece:

- :func:`predict_dense` runs a dense predictor (a network returning per-pixel maps) over an image of any size in
  overlapping tiles blended by a smooth window, optionally with the 8 dihedral transforms of each tile averaged
  (vector channels such as HoVer-Net's horizontal/vertical maps are transformed as vectors, not just moved);
- :func:`segment_tiled` runs an instance segmenter (returning labels) over an image of any size in overlapping
  tiles, each instance kept by the one tile whose core holds its centroid, so no nucleus is split at a seam;
- :func:`tta_instances` merges an instance segmenter's outputs on the 8 dihedral transforms of an image by
  matching instances across them and voting.

The dihedral group is written as ``(transpose, flip rows, flip columns)``, applied in that order; the 8
combinations are identity, the two flips, the 180-degree rotation, the two transposes and the two 90-degree
rotations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ._checks import as_labels, as_rgb

__all__ = ["DIHEDRAL", "predict_dense", "relabel_contiguous", "segment_tiled", "tta_instances"]

#: The 8 dihedral transforms as (transpose, flip rows, flip columns), identity first.
DIHEDRAL: tuple[tuple[bool, bool, bool], ...] = tuple(
    (bool(t), bool(r), bool(c)) for t in (0, 1) for r in (0, 1) for c in (0, 1)
)

Progress = Callable[[int, int, str], None] | None
ShouldStop = Callable[[], bool] | None


# ----------------------------------------------------------------------------------------------------------------
# dihedral transforms of arrays whose last two axes are (rows, columns)


def _forward(a: np.ndarray, g: tuple[bool, bool, bool], axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
    tr, fr, fc = g
    ar, ac = axes
    if tr:
        a = np.swapaxes(a, ar, ac)
    if fr:
        a = np.flip(a, ar)
    if fc:
        a = np.flip(a, ac)
    return a


def _inverse(a: np.ndarray, g: tuple[bool, bool, bool], axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
    tr, fr, fc = g
    ar, ac = axes
    if fc:
        a = np.flip(a, ac)
    if fr:
        a = np.flip(a, ar)
    if tr:
        a = np.swapaxes(a, ar, ac)
    return a


def _inverse_vectors(out: np.ndarray, g: tuple[bool, bool, bool], pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Bring the outputs ``(n, C, t, t)`` of transformed tiles back to the original frame: pixels moved back, and each
    (h, v) vector pair (h along columns, v along rows) mapped by the same steps: undoing a column flip negates h, a
    row flip negates v, a transpose swaps h and v."""
    tr, fr, fc = g
    out = _inverse(out, g).copy()
    for h, v in pairs:
        hv = out[:, h].copy(), out[:, v].copy()
        if fc:
            hv = (-hv[0], hv[1])
        if fr:
            hv = (hv[0], -hv[1])
        if tr:
            hv = (hv[1], hv[0])
        out[:, h], out[:, v] = hv
    return out


# ----------------------------------------------------------------------------------------------------------------
# dense predictions


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis of a (padded) length ``(n - 1) * stride + tile``."""
    n = 1 if length <= tile else -(-(length - tile) // stride) + 1
    return [i * stride for i in range(n)]


def _ramp(tile: int, overlap: int, before: bool, after: bool) -> np.ndarray:
    """1-D blending weights of one tile: a Hann (sin^2) rise over the first ``overlap`` px where a tile comes before,
    a fall over the last ``overlap`` px where one comes after, 1 elsewhere. Rises and falls of neighbours sum to 1,
    and the weight at a tile's inner edge is ``sin^2(pi / (4 overlap))`` (~0), so seams carry no weight."""
    w = np.ones(tile, np.float64)
    if overlap > 0:
        k = (np.arange(overlap) + 0.5) / overlap
        rise = np.sin(0.5 * np.pi * k) ** 2
        if before:
            w[:overlap] = rise
        if after:
            w[tile - overlap :] = rise[::-1]
    return w


def predict_dense(fn, image, *, channels: int, tile: int = 256, overlap: int = 64, batch: int = 4, tta: bool = False,
                  vector_pairs: Sequence[tuple[int, int]] = (), progress: Progress = None,
                  should_stop: ShouldStop = None) -> np.ndarray:
    """Dense per-pixel predictions of an image of any size, in overlapping tiles blended without seams.

    Parameters
    ----------
    fn : callable
        ``fn(x) -> y``: ``x`` float32 ``(n, 3, tile, tile)`` in [0, 1] (RGB / 255), ``y`` array-like
        ``(n, channels, tile, tile)``. Called with at most ``batch`` tiles at a time.
    image : array
        RGB uint8 ``H x W x 3`` (converted by :func:`napari_nucsynth._checks.as_rgb`).
    channels : int
        Number of output channels.
    tile, overlap : int
        Tile size and the overlap of neighbouring tiles (``0 <= overlap < tile``). Tiles advance by
        ``tile - overlap``; an image not filling a whole number of tiles (or smaller than one) is padded at the
        bottom and right by reflection, and the result cropped back.
    batch : int
        Tiles per call of ``fn``.
    tta : bool
        Test-time augmentation: each tile is predicted under the 8 dihedral transforms, each output transformed back
        (see ``vector_pairs``) and the 8 averaged.
    vector_pairs : sequence of (h, v) channel pairs
        Channels that are the components of a vector field: ``h`` along columns (x), ``v`` along rows (y), as
        HoVer-Net's horizontal and vertical maps (:func:`napari_nucsynth.masks.hv_maps`). Under TTA they are negated
        and swapped as vectors (a column flip negates h, a row flip negates v, a transpose swaps them).
    progress : callable, optional
        ``progress(done, total, "predicting")``, once per call of ``fn``.
    should_stop : callable, optional
        Checked before each call of ``fn``; when it returns True the work stops with ``InterruptedError``.

    Returns
    -------
    ``(H, W, channels)`` float32.

    Notes
    -----
    Each tile's output is weighted by the outer product of 1-D windows (:func:`_ramp`) that fall smoothly to ~0 at
    the tile's inner edges, where networks see the least context, and stay 1 on the image's own borders; the blend
    is the weighted sum divided by the summed weights (1 by construction, up to rounding), accumulated in float64
    over one band of tile rows at a time: a per-pixel ``fn`` (or a constant one) gives exactly its one-piece result,
    and the memory beyond the float32 output is one band of ``tile`` rows.
    """
    img = as_rgb(image, "image")
    tile, overlap, batch, channels = int(tile), int(overlap), int(batch), int(channels)
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    pairs = [(int(h), int(v)) for h, v in vector_pairs]
    for h, v in pairs:
        if not (0 <= h < channels and 0 <= v < channels and h != v):
            raise ValueError(f"vector_pairs must hold pairs of distinct channels in [0, {channels}), got {(h, v)}")
    H, W = img.shape[:2]
    stride = tile - overlap
    rows, cols = _starts(H, tile, stride), _starts(W, tile, stride)
    Hp, Wp = rows[-1] + tile, cols[-1] + tile
    padded = np.pad(img, ((0, Hp - H), (0, Wp - W), (0, 0)), mode="reflect") if (Hp, Wp) != (H, W) else img
    out = np.empty((H, W, channels), np.float32)
    # weighted sums over a band of rows [b0, b0 + tile) in float64 (so the blend of equal outputs is exactly that
    # output), flushed into ``out`` as soon as no later tile reaches them: memory is one band, not the image
    band = min(tile, H)
    acc = np.zeros((channels, band, W), np.float64)
    norm = np.zeros((band, W), np.float64)
    b0 = 0

    def flush(upto: int) -> None:
        nonlocal b0
        n = upto - b0
        if n <= 0:
            return
        out[b0:upto] = (acc[:, :n] / norm[:n]).transpose(1, 2, 0)
        acc[:, : band - n] = acc[:, n:].copy()
        acc[:, band - n :] = 0
        norm[: band - n] = norm[n:].copy()
        norm[band - n :] = 0
        b0 = upto

    coords = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    transforms = DIHEDRAL if tta else DIHEDRAL[:1]
    total, done = -(-len(coords) // batch) * len(transforms), 0
    wr = [_ramp(tile, overlap, i > 0, i < len(rows) - 1) for i in range(len(rows))]
    wc = [_ramp(tile, overlap, j > 0, j < len(cols) - 1) for j in range(len(cols))]
    for c0 in range(0, len(coords), batch):
        chunk = coords[c0 : c0 + batch]
        x = np.stack([padded[rows[i] : rows[i] + tile, cols[j] : cols[j] + tile] for i, j in chunk])
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
        y = np.zeros((len(chunk), channels, tile, tile), np.float64)
        for g in transforms:
            if should_stop is not None and should_stop():
                raise InterruptedError("prediction cancelled")
            res = np.asarray(fn(np.ascontiguousarray(_forward(x, g))))
            if res.shape != (len(chunk), channels, tile, tile):
                raise ValueError(f"fn returned shape {res.shape}; expected {(len(chunk), channels, tile, tile)} "
                                 f"for an input of shape {x.shape}")
            y += _inverse_vectors(res.astype(np.float32, copy=False), g, pairs)
            done += 1
            if progress is not None:
                progress(done, total, "predicting")
        y /= len(transforms)
        for k, (i, j) in enumerate(chunk):
            r0, cs = rows[i], cols[j]
            flush(min(r0, H))  # rows above this tile row are complete
            h, w = min(tile, H - r0), min(tile, W - cs)
            if h <= 0 or w <= 0:
                continue
            wgt = wr[i][:h, None] * wc[j][None, :w]
            acc[:, r0 - b0 : r0 - b0 + h, cs : cs + w] += y[k, :, :h, :w] * wgt
            norm[r0 - b0 : r0 - b0 + h, cs : cs + w] += wgt
    flush(H)
    return out


# ----------------------------------------------------------------------------------------------------------------
# instance outputs


def relabel_contiguous(labels: np.ndarray) -> np.ndarray:
    """uint32 labels with ids made ``1..N`` in the order of the input ids (0 stays background)."""
    lab = as_labels(labels, "labels")
    if lab.size == 0 or not lab.any():
        return np.zeros(lab.shape, np.uint32)
    top = int(lab.max())
    if top < 1 << 24:
        present = np.bincount(lab.ravel(), minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present).astype(np.uint32)
        lut[0] = 0
        return lut[lab]
    _, inv = np.unique(lab, return_inverse=True)
    out = inv.reshape(lab.shape).astype(np.uint32)
    return out if lab.min() == 0 else out + 1


def _centroids(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mean rows, mean columns) of the instances present in ``lab``."""
    rr, cc = np.nonzero(lab)
    if rr.size == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    k = lab[rr, cc].astype(np.int64)
    area = np.bincount(k)
    ids = np.flatnonzero(area)
    mr = np.bincount(k, weights=rr)[ids] / area[ids]
    mc = np.bincount(k, weights=cc)[ids] / area[ids]
    return ids, mr, mc


def _instance_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis, the last tile flush with the end (no padding)."""
    if length <= tile:
        return [0]
    n = -(-(length - tile) // stride) + 1
    starts = [i * stride for i in range(n - 1)] + [length - tile]
    return sorted(set(starts))


def _cores(starts: list[int], tile: int, length: int) -> list[tuple[float, float]]:
    """Each tile's core along one axis: from the middle of its overlap with the tile before to the middle of its
    overlap with the tile after (the image's ends on outer sides). The cores partition ``[0, length)``."""
    cuts = [0.0] + [(starts[i + 1] + starts[i] + tile) / 2.0 for i in range(len(starts) - 1)] + [float(length)]
    return [(cuts[i], cuts[i + 1]) for i in range(len(starts))]


def _check_tile_labels(lab, shape, what: str = "fn") -> np.ndarray:
    lab = as_labels(lab, f"the labels returned by {what}")
    if lab.shape != tuple(shape):
        raise ValueError(f"{what} returned labels of shape {lab.shape} for an image of shape {tuple(shape)}")
    return lab


def segment_tiled(fn, image, *, tile: int = 1024, overlap: int = 128, progress: Progress = None,
                  should_stop: ShouldStop = None) -> np.ndarray:
    """Instance labels of an image of any size from an instance segmenter run on overlapping tiles.

    Parameters
    ----------
    fn : callable
        ``fn(tile_rgb) -> labels``: RGB uint8 ``h x w x 3`` in, integer instance labels ``h x w`` out (0 =
        background, any ids).
    image : array
        RGB uint8 ``H x W x 3`` (converted by :func:`napari_nucsynth._checks.as_rgb`). Images no larger than
        ``tile`` in both dimensions go to ``fn`` in one piece.
    tile, overlap : int
        Tile size and the overlap of neighbouring tiles (``0 <= overlap < tile``); the last tile of a row or column
        is moved back to end at the image's edge (so it may overlap more). Nuclei up to about ``overlap / 2`` px
        across are never cut: give an overlap of at least twice the largest nucleus diameter.
    progress : callable, optional
        ``progress(done, total, "segmenting tiles")``, once per tile.
    should_stop : callable, optional
        Checked before each tile; when it returns True the work stops with ``InterruptedError``.

    Returns
    -------
    ``(H, W)`` uint32 labels, ids ``1..N``.

    Notes
    -----
    Every tile owns a core: the tile less half its overlap with each neighbour (the cores partition the image). From
    each tile's labels only the instances whose centroid lies in its core are kept, and they are pasted without
    overwriting pixels an earlier tile already assigned. An instance is thus taken whole from the tile that sees it
    furthest from a seam, and nuclei cut by a tile's border are left to the neighbour that holds them whole.
    """
    img = as_rgb(image, "image")
    tile, overlap = int(tile), int(overlap)
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    H, W = img.shape[:2]
    if H <= tile and W <= tile:
        if should_stop is not None and should_stop():
            raise InterruptedError("segmentation cancelled")
        lab = _check_tile_labels(fn(img), (H, W))
        if progress is not None:
            progress(1, 1, "segmenting tiles")
        return relabel_contiguous(lab)
    stride = tile - overlap
    rows, cols = _instance_starts(H, tile, stride), _instance_starts(W, tile, stride)
    rcore, ccore = _cores(rows, tile, H), _cores(cols, tile, W)
    out = np.zeros((H, W), np.uint32)
    next_id = 1
    total, done = len(rows) * len(cols), 0
    for i, r0 in enumerate(rows):
        for j, c0 in enumerate(cols):
            if should_stop is not None and should_stop():
                raise InterruptedError("segmentation cancelled")
            r1, c1 = min(H, r0 + tile), min(W, c0 + tile)
            lab = _check_tile_labels(fn(img[r0:r1, c0:c1]), (r1 - r0, c1 - c0))
            ids, mr, mc = _centroids(lab)
            if ids.size:
                gr, gc = mr + r0, mc + c0
                keep = ((gr >= rcore[i][0]) & (gr < rcore[i][1]) & (gc >= ccore[j][0]) & (gc < ccore[j][1]))
                ids = ids[keep]
            if ids.size:
                lut = np.zeros(int(lab.max()) + 1, np.uint32)
                lut[ids] = np.arange(next_id, next_id + ids.size, dtype=np.uint32)
                new = lut[lab]
                view = out[r0:r1, c0:c1]
                put = (new > 0) & (view == 0)
                view[put] = new[put]
                next_id += ids.size
            done += 1
            if progress is not None:
                progress(done, total, "segmenting tiles")
    return relabel_contiguous(out)


def _pair_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (id in a, id in b, IoU) of overlapping instances of two label maps of the same shape (ids 1..n)."""
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    key = a[both].astype(np.int64) * nb + b[both]
    keys, inter = np.unique(key, return_counts=True)
    ia, ib = keys // nb, keys % nb
    area_a = np.bincount(a.ravel(), minlength=na)
    area_b = np.bincount(b.ravel(), minlength=nb)
    iou = inter / (area_a[ia] + area_b[ib] - inter)
    return ia, ib, iou


def tta_instances(fn, image, *, min_votes: int | None = None, progress: Progress = None,
                  should_stop: ShouldStop = None) -> np.ndarray:
    """Test-time augmentation for instance segmenters: merge the outputs on the 8 dihedral transforms by voting.

    Instance-level TTA in the manner of Liu et al. and of Moshkov et al. ("Test-time augmentation for deep
    learning-based cell segmentation on microscopy images", Sci. Rep. 2020): instances, not pixels, are merged.

    1. ``fn`` segments each of the 8 dihedral transforms of the image (:data:`DIHEDRAL`); each label map is
       transformed back to the image's frame.
    2. Instances of different augmentations are matched when their IoU exceeds 0.5 (such a partner is unique within
       one label map); the connected groups of matched instances are the clusters.
    3. A cluster is kept when it holds instances from at least ``min_votes`` augmentations (default: half of them,
       4). Its mask is the pixels covered by at least half of its members.
    4. A pixel claimed by several kept clusters goes to the one whose members cover it most often (ties: the cluster
       with more votes, then the one found first).

    Parameters
    ----------
    fn : callable
        ``fn(rgb) -> labels`` for RGB uint8 images of any shape (transposed images are ``W x H``).
    image : array
        RGB uint8 ``H x W x 3`` (converted by :func:`napari_nucsynth._checks.as_rgb`).
    min_votes : int, optional
        Augmentations that must find an instance for it to be kept (1..8; default 4).
    progress, should_stop : callables, optional
        ``progress(done, 8, "test-time augmentation")`` after each augmentation; ``should_stop()`` checked before
        each, raising ``InterruptedError`` when True.

    Returns
    -------
    ``(H, W)`` uint32 labels, ids ``1..N``.
    """
    img = as_rgb(image, "image")
    n_aug = len(DIHEDRAL)
    if min_votes is None:
        min_votes = -(-n_aug // 2)
    min_votes = int(min_votes)
    if not 1 <= min_votes <= n_aug:
        raise ValueError(f"min_votes must be in [1, {n_aug}], got {min_votes}")
    H, W = img.shape[:2]
    maps = []
    for k, g in enumerate(DIHEDRAL):
        if should_stop is not None and should_stop():
            raise InterruptedError("segmentation cancelled")
        t = np.ascontiguousarray(_forward(img, g, axes=(0, 1)))
        lab = _check_tile_labels(fn(t), t.shape[:2])
        maps.append(relabel_contiguous(np.ascontiguousarray(_inverse(lab, g, axes=(0, 1)))))
        if progress is not None:
            progress(k + 1, n_aug, "test-time augmentation")
    # global instance indices: augmentation k's id i is offsets[k] + i - 1
    counts = [int(m.max()) for m in maps]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_inst = int(offsets[-1])
    if n_inst == 0:
        return np.zeros((H, W), np.uint32)
    # union-find over instances linked by IoU > 0.5
    parent = np.arange(n_inst)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a in range(n_aug):
        for b in range(a + 1, n_aug):
            ia, ib, iou = _pair_iou(maps[a], maps[b])
            sel = iou > 0.5
            for x, y in zip(offsets[a] + ia[sel] - 1, offsets[b] + ib[sel] - 1):
                rx, ry = find(int(x)), find(int(y))
                if rx != ry:
                    parent[max(rx, ry)] = min(rx, ry)
    cluster = np.array([find(i) for i in range(n_inst)])
    _, cluster = np.unique(cluster, return_inverse=True)  # 0..n_clusters-1, in order of first instance
    n_cl = int(cluster.max()) + 1
    aug_of = np.repeat(np.arange(n_aug), counts)
    members = np.bincount(cluster, minlength=n_cl)
    votes = np.zeros(n_cl, np.int64)  # distinct augmentations per cluster
    seen = np.unique(cluster * n_aug + aug_of)
    np.add.at(votes, seen // n_aug, 1)
    kept = votes >= min_votes
    # pixel votes per cluster: (cluster, pixel) pairs over all augmentations
    keys = []
    for k, m in enumerate(maps):
        px = np.flatnonzero(m)
        cl = cluster[offsets[k] + m.ravel()[px].astype(np.int64) - 1]
        ok = kept[cl]
        keys.append(cl[ok].astype(np.int64) * (H * W) + px[ok])
    if not keys or sum(k.size for k in keys) == 0:
        return np.zeros((H, W), np.uint32)
    key, cover = np.unique(np.concatenate(keys), return_counts=True)
    cl, px = key // (H * W), key % (H * W)
    ok = 2 * cover >= members[cl]
    cl, px, cover = cl[ok], px[ok], cover[ok]
    # one cluster per pixel: most cover, then most votes, then the first cluster
    order = np.lexsort((cl, -votes[cl], -cover, px))
    cl, px = cl[order], px[order]
    first = np.ones(px.size, bool)
    first[1:] = px[1:] != px[:-1]
    out = np.zeros(H * W, np.uint32)
    out[px[first]] = (cl[first] + 1).astype(np.uint32)
    return relabel_contiguous(out.reshape(H, W))

