"""Fresh styles in ``generate`` (issue 20, item 9): a style tile's analysis cached on disk by its files' sha256
(:func:`napari_nucsynth.presynthesis.reference_from_files`), damaged files rewritten, each new tile analysed once by
the workers before the pairs that draw it, the sped-up analysis equal bit for bit to the straightforward one, and
datasets identical with a cold and a warm cache."""

from __future__ import annotations

import filecmp
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from _tiny import count_calls, same_analysis

from napari_nucsynth import generate as G
from napari_nucsynth import presynthesis as P
from napari_nucsynth.io import read_image, read_labels, read_manifest, write_labels

STEMS = ("TCGA-A7-A13F-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder and an empty in-memory cache."""
    monkeypatch.setenv("NUCSYNTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "_CACHE", type(P._CACHE)())
    return tmp_path / "cache"


@pytest.fixture
def bank(tmp_path, load_tile) -> Path:
    """Three 160 x 160 style tiles with their labels."""
    import imageio.v3 as iio

    root = tmp_path / "bank"
    (root / "labels").mkdir(parents=True)
    for stem in STEMS:
        img, lab = load_tile(stem)
        iio.imwrite(root / f"{stem}.png", img[:160, :160])
        write_labels(root / "labels" / f"{stem}.png", lab[:160, :160])
    return root




def _tile(bank: Path, k: int = 0) -> tuple[Path, Path]:
    return bank / f"{STEMS[k]}.png", bank / "labels" / f"{STEMS[k]}.png"


def test_the_analysis_is_read_from_the_cache_on_the_second_call(cache, bank, tmp_path, monkeypatch):
    img, lab = _tile(bank)
    fresh = P.analyse_reference(read_image(img), read_labels(lab))
    calls = count_calls(monkeypatch, P, "analyse_reference")
    first = P.reference_from_files(img, lab)
    assert len(calls) == 1 and P.is_analysed(P.file_sha256(img), P.file_sha256(lab))
    (stored,) = (cache / "styles").glob("*.npz")
    P._CACHE.clear()
    again = P.reference_from_files(img, lab, image_sha256=P.file_sha256(img), labels_sha256=P.file_sha256(lab))
    assert len(calls) == 1  # read back, not analysed
    assert same_analysis(first, fresh) and same_analysis(again, fresh)
    # the same bytes under another name are the same entry; other labels (or none) another one
    P._CACHE.clear()
    shutil.copy(img, tmp_path / "renamed.png")
    assert same_analysis(P.reference_from_files(tmp_path / "renamed.png", lab), fresh) and len(calls) == 1
    P.reference_from_files(img, None)
    assert len(calls) == 2 and len(list((cache / "styles").glob("*.npz"))) == 2
    # the stored file is an ordinary .npz, its arrays mapped without copying: read-only, aligned
    with np.load(stored) as z:
        assert all(np.array_equal(z[f], getattr(fresh, f)) for f in P._LAYOUT)
    assert all(not getattr(again, f).flags.writeable and getattr(again, f).flags.aligned for f in P._LAYOUT)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "foreign"])
def test_a_damaged_cache_file_is_ignored_and_rewritten(cache, bank, monkeypatch, damage):
    img, lab = _tile(bank)
    fresh = P.reference_from_files(img, lab)
    (path,) = (cache / "styles").glob("*.npz")
    data = path.read_bytes()
    if damage == "flip":  # a bit of the arrays' data: the zip CRC no longer matches
        data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0x10]) + data[len(data) // 2 + 1 :]
    elif damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "garbage":
        data = b"not an analysis" * 100
    elif damage == "empty":
        data = b""
    else:  # a sound file of another tile under this name
        P.reference_from_files(*_tile(bank, 1))
        data = next(p for p in (cache / "styles").glob("*.npz") if p != path).read_bytes()
    path.write_bytes(data)
    P._CACHE.clear()
    calls = count_calls(monkeypatch, P, "analyse_reference")
    assert same_analysis(P.reference_from_files(img, lab), fresh) and len(calls) == 1  # analysed again ...
    P._CACHE.clear()
    assert same_analysis(P.reference_from_files(img, lab), fresh) and len(calls) == 1  # ... and the file rewritten


def test_a_tile_changed_since_its_sha256_was_taken_is_refused(cache, bank):
    img, lab = _tile(bank)
    stale = "0" * 64
    with pytest.raises(ValueError, match="changed"):
        P.reference_from_files(img, lab, image_sha256=stale)
    assert not list((cache / "styles").glob("*.npz")) and not P.is_analysed(stale, P.file_sha256(lab))


def test_cold_and_warm_cache_and_workers_write_the_same_files(cache, bank, tmp_path, monkeypatch):
    analyses = count_calls(monkeypatch, P, "analyse_reference")
    kw = {"random_points": True, "size": (96, 96), "seed": 4}
    cold = G.generate(8, bank, tmp_path / "cold", **kw)
    used = {p["meta"]["style"]["index"] for p in cold["pairs"]}
    assert len(analyses) == len(used)  # each tile drawn analysed once
    P._CACHE.clear()
    warm = G.generate(8, bank, tmp_path / "warm", **kw)
    assert len(analyses) == len(used)  # nothing analysed again
    shutil.rmtree(cache / "styles")
    P._CACHE.clear()
    two = G.generate(8, bank, tmp_path / "two", workers=2, **kw)  # cold again, the tiles analysed by the workers
    assert len(list((cache / "styles").glob("*.npz"))) == len(used)
    files = [f for p in cold["pairs"] for f in p["files"].values()]
    for other, m in (("warm", warm), ("two", two)):
        assert [p["meta"] for p in m["pairs"]] == [p["meta"] for p in cold["pairs"]]
        assert all(filecmp.cmp(tmp_path / "cold" / f, tmp_path / other / f, shallow=False) for f in files)
    assert G.verify(tmp_path / "two") == []
    img, lab = G.regenerate(tmp_path / "cold", "syn_000003")
    assert np.array_equal(img, G.read_pair(tmp_path / "cold", "syn_000003")[0])


def test_workers_analyse_each_new_style_once_before_the_pairs_that_draw_it(cache, bank, tmp_path, monkeypatch):
    """The pool's dealing, with its tasks run by threads of this process (the tasks and their order are the same
    as with spawned workers)."""
    n = 10
    analyses = count_calls(monkeypatch, P, "analyse_reference")
    cfg, points = G._config(n, bank, points_from=None, random_points=True, library_transforms=True,
                            method="classic", checkpoint=None, size=[96, 96], fmt="png", seed=2, domains=None,
                            device="cpu", process="cluster", n_transforms=3)
    P.reference_from_files(cfg["styles"][1]["file"], cfg["styles"][1]["labels"])  # analysed already: not again
    analysed_before = len(analyses)
    G._init_worker(cfg, points)
    log: list[tuple[str, int]] = []
    pool = G._Pool(cfg, points, 2, executor=ThreadPoolExecutor(2))
    submit = pool._submit
    monkeypatch.setattr(pool, "_submit", lambda kind, k, arg: (log.append((kind, k)), submit(kind, k, arg))[1])
    written = []
    try:
        assert pool.prefetch(cfg, range(n)) == len(set(G._styles_needed(cfg, range(n))) - {1})
        with ThreadPoolExecutor(1) as tx:
            cfg["fits"] = pool.analyse_until(tx.submit(G._fits, cfg["sources"], points, cfg["styles"]))
        pool.run(cfg, list(range(n)), lambda i, img, lab, k, plan: written.append((i, img, lab)), None)
    finally:
        pool.close()
    needed = G._styles_needed(cfg, range(n))
    sent = [k for kind, k in log if kind == "style"]
    assert sorted(sent) == sorted(set(needed) - {1})  # each new tile once; the analysed one never
    assert len(analyses) - analysed_before == len(sent)
    for at, (kind, i) in enumerate(log):
        style = G._plan(cfg, i)["style"]["index"] if kind == "pair" else None
        assert kind == "style" or style == 1 or ("style", style) in log[:at]
    assert [i for i, _, _ in written] == list(range(n))
    one = G.generate(n, bank, tmp_path / "one", random_points=True, size=(96, 96), seed=2)
    for (i, img, lab), p in zip(written, one["pairs"]):
        ref_img, ref_lab = G.read_pair(tmp_path / "one", p["id"])
        assert np.array_equal(img, ref_img) and np.array_equal(lab, ref_lab)


# ----------------------------------------------------------------------------------------------------------------
# the faster analysis is the same computation


def test_ranks_equal_numpy_unique():
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 50, (40, 30)), rng.integers(3, 9, (20, 20)).astype(np.uint16),  # no background
             (rng.integers(0, 5, (30, 30)) * 10**12).astype(np.uint64),  # huge sparse ids: the sort
             np.zeros((5, 7), np.uint32), rng.integers(0, 2**20, (64, 64)).astype(np.int64)]
    for lab in cases:
        got = P._ranks(lab)
        want = np.unique(lab, return_inverse=True)[1].reshape(lab.shape)
        assert got.dtype == want.dtype and np.array_equal(got, want)


def _inpaint_straightforward(hed, hole, rng, *, piece=24, candidates=24, rounds=4):
    """:func:`napari_nucsynth.presynthesis.reference_background` as it was first written (every shift checked on
    every pixel of every piece, the context dilated over the whole image): the oracle of the faster version."""
    H, W = hole.shape
    out = hed.copy()
    keep = ~hole
    if not hole.any():
        return out
    lam, phase = rng.uniform(2, 4, 2) * piece, rng.uniform(0, 2 * np.pi, 2)
    gr = np.floor((np.arange(H)[:, None] + piece / 4 * np.sin(np.arange(W)[None, :] / lam[0] * 2 * np.pi + phase[0]))
                  / piece).astype(np.int64) + 2
    gc = np.floor((np.arange(W)[None, :] + piece / 4 * np.sin(np.arange(H)[:, None] / lam[1] * 2 * np.pi + phase[1]))
                  / piece).astype(np.int64) + 2
    comp, _ = ndi.label(hole)
    key = np.where(hole, (comp.astype(np.int64) * (H // piece + 6) + gr) * (W // piece + 6) + gc, 0)
    present = np.bincount(key.ravel()) > 0
    present[0] = False
    remap = np.cumsum(present)
    pieces = remap[key]
    n_pieces = int(remap[-1]) + 1
    flat_keep, flat_hed, flat_out = keep.ravel(), hed.reshape(-1, 3), out.reshape(-1, 3)
    src_h, src_e = np.ascontiguousarray(hed[..., 0]).ravel(), np.ascontiguousarray(hed[..., 1]).ravel()
    hy, hx = np.nonzero(hole)
    hp = pieces[hy, hx]
    size = np.bincount(hp, minlength=n_pieces)
    filled = np.zeros(n_pieces, bool)
    filled[0] = True
    known = keep.copy()
    reach = max(8, min(H, W) // 3)
    for _ in range(rounds):
        near = ndi.grey_dilation(np.where(filled[pieces], 0, pieces), size=7)
        cy, cx = np.nonzero(known & (near > 0))
        cp = near[cy, cx]
        if cp.size == 0:
            break
        todo_px = ~filled[hp]
        py, px, pp = hy[todo_px], hx[todo_px], hp[todo_px]
        best = np.full(n_pieces, np.inf)
        shift = np.zeros((n_pieces, 2), np.int64)
        ctx_count = np.bincount(cp, minlength=n_pieces)
        cy, cx, cp = cy[::2], cx[::2], cp[::2]
        ctx_h, ctx_e = flat_out[cy * W + cx, 0], flat_out[cy * W + cx, 1]
        for _c in range(candidates):
            dy, dx = (int(v) for v in rng.integers(-reach, reach + 1, 2))
            sy, sx = py + dy, px + dx
            ok = (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
            ok[ok] = flat_keep[sy[ok] * W + sx[ok]]
            valid = np.bincount(pp, weights=ok, minlength=n_pieces) == size
            src = np.clip(cy + dy, 0, H - 1) * W + np.clip(cx + dx, 0, W - 1)
            diff = np.abs(ctx_h - src_h[src]) + np.abs(ctx_e - src_e[src])
            score = np.bincount(cp, weights=diff, minlength=n_pieces) / np.maximum(ctx_count, 1)
            better = valid & (ctx_count > 0) & ~filled & (score < best)
            best[better] = score[better]
            shift[better] = (dy, dx)
        take = np.isfinite(best)
        if not take.any():
            break
        sel = take[hp]
        ty, tx = hy[sel] + shift[hp[sel], 0], hx[sel] + shift[hp[sel], 1]
        flat_out[hy[sel] * W + hx[sel]] = flat_hed[ty * W + tx]
        known[hy[sel], hx[sel]] = True
        filled |= take
    todo = ~known
    if todo.any():
        f = 4
        hp4, wp4 = -(-H // f) * f, -(-W // f) * f
        kn = np.pad(known.astype(np.float32), ((0, hp4 - H), (0, wp4 - W)))
        val = np.pad(out * known[..., None], ((0, hp4 - H), (0, wp4 - W), (0, 0)))
        kn = ndi.gaussian_filter(kn.reshape(hp4 // f, f, wp4 // f, f).mean((1, 3)), 16.0 / f)
        val = ndi.gaussian_filter(val.reshape(hp4 // f, f, wp4 // f, f, 3).mean((1, 3)), (16.0 / f, 16.0 / f, 0))
        smooth = val / np.maximum(kn, 1e-3)[..., None]
        ty, tx = np.nonzero(todo)
        out[ty, tx] = smooth[ty // f, tx // f]
    seam = ndi.grey_dilation(pieces, size=3) != ndi.grey_erosion(pieces, size=3)
    soft = np.stack([ndi.gaussian_filter(out[..., c], 1.0) for c in range(3)], -1)
    out[seam] = soft[seam]
    return out


def test_the_inpainting_equals_the_straightforward_one_bit_for_bit(load_tile):
    from napari_nucsynth.stain import rgb_to_hed

    img, lab = load_tile("TCGA-A7-A13F-01Z-00-DX1")
    hed = rgb_to_hed(img[:200, :240])
    nuclei = ndi.binary_dilation((lab[:200, :240] > 0) | P._nuclei_mask(hed), iterations=2)
    rng = np.random.default_rng(3)
    cases = [(hed, nuclei, 24), (hed[:90, :130].astype(np.float64), nuclei[:90, :130], 12),
             (np.asfortranarray(hed[50:, 20:]), nuclei[50:, 20:], 24)]
    for k in range(5):  # random holes: sparse specks to nearly all of the image (pieces nothing fits)
        h, w = rng.integers(24, 120, 2)
        cases.append((rng.random((h, w, 3)).astype(np.float32), rng.random((h, w)) < rng.uniform(0.05, 0.95),
                      int(rng.integers(5, 30))))
    for k, (x, hole, piece) in enumerate(cases):
        got = P.reference_background(x, hole, np.random.default_rng(k), piece=piece)
        want = _inpaint_straightforward(x, hole, np.random.default_rng(k), piece=piece)
        assert got.dtype == want.dtype and np.array_equal(got, want), k


def _analyse_straightforward(ref, style_labels):
    """:func:`napari_nucsynth.presynthesis.analyse_reference` as it was first written (np.unique, detect_nuclei
    twice over, the distance transform's distances too, the oracle inpainting)."""
    detected = P.detect_nuclei(ref)
    nuclei = detected if style_labels is None else style_labels
    _, nuclei = np.unique(nuclei, return_inverse=True)
    nuclei = nuclei.reshape(ref.shape[:2])
    n = int(nuclei.max()) + 1
    hed = P.rgb_to_hed(ref)
    area, centroid, cov = P._moments(nuclei, n)
    fg = nuclei > 0
    k = nuclei[fg]
    mean_h = np.bincount(k, weights=hed[..., 0][fg], minlength=n) / np.maximum(area, 1)
    mean_d = np.bincount(k, weights=hed[..., 2][fg], minlength=n) / np.maximum(area, 1)
    ids = np.arange(1, n)
    order = ids[(mean_h[ids] >= np.percentile(mean_h[ids], 10)) & (mean_d[ids] <= np.percentile(mean_d[ids], 90))
                & (area[ids] >= 20)]
    if order.size < 3:
        order = ids
    evals, evecs = np.linalg.eigh(cov[order])
    _, idx = ndi.distance_transform_edt(~fg, return_indices=True)
    field = hed[idx[0], idx[1]]
    hole = ndi.binary_dilation(fg | (detected > 0), iterations=2)
    background = _inpaint_straightforward(hed, hole, np.random.default_rng(0))

    def wmean(w, x):
        return np.einsum("n,nk->k", w, x.reshape(-1, 3), dtype=np.float64) / max(float(w.sum()), 1.0)

    background += wmean((~fg).ravel(), hed - background).astype(np.float32)
    field *= (wmean(fg.ravel(), hed) / np.maximum(wmean(np.isin(nuclei, order).ravel(), hed), 1e-6)
              ).astype(np.float32)
    return P.ReferenceStyle(field=field, background=background, centroid=centroid[order], axes=evecs,
                            sd=np.sqrt(np.maximum(evals, 0.25)), log_area=np.log(area[order]), n_detected=n - 1)


def test_the_analysis_equals_the_straightforward_one_bit_for_bit(load_tile):
    img, lab = load_tile("TCGA-21-5784-01Z-00-DX1")
    img, lab = img[:180, :200], lab[:180, :200]
    no_background = np.where(lab > 0, lab, lab.max() + 7)  # every pixel some nucleus's: the smallest id is dropped
    for labels in (lab, lab.astype(np.uint16), no_background, None):
        assert same_analysis(P.analyse_reference(img, labels), _analyse_straightforward(img, labels))


def test_block_means_equal_numpy_mean():
    rng = np.random.default_rng(5)
    shapes = [(4, 4), (4, 400), (400, 4), (252, 252), (1004, 996)] + [tuple(rng.integers(1, 60, 2) * 4)
                                                                      for _ in range(40)]
    for k, (h, w) in enumerate(shapes):
        for c in (3, 2, 1):
            x = (rng.standard_normal((h, w, c)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32 if k % 2 else float)
            want = x.reshape(h // 4, 4, w // 4, 4, c).mean((1, 3))
            got = P._block_means(x, 4)
            assert got.dtype == want.dtype and np.array_equal(got, want), (h, w, c)


def test_grey_dilate_equals_scipy():
    rng = np.random.default_rng(6)
    shapes = [(1, 1), (2, 2), (5, 7), (3, 200), (37, 2), (250, 310)]
    for size in (1, 3, 5, 7, 9, 15):
        for h, w in shapes:
            for dtype in (np.int32, np.int64, np.uint8):
                x = rng.integers(0, 50, (h, w)).astype(dtype)
                x[rng.random((h, w)) < 0.5] = 0
                want = ndi.grey_dilation(x, size=size)
                got = P._grey_dilate(x, size)
                assert got.dtype == want.dtype and np.array_equal(got, want), (size, h, w, dtype)


def test_binary_dilate_equals_scipy():
    rng = np.random.default_rng(7)
    for h, w in [(1, 1), (1, 9), (2, 2), (5, 7), (3, 200), (37, 2), (250, 310)]:
        for density in (0.001, 0.05, 0.5):
            x = rng.random((h, w)) < density
            for it in (1, 2, 3, 5):
                want = ndi.binary_dilation(x, iterations=it)
                got = P._binary_dilate(x, it)
                assert got.dtype == bool and np.array_equal(got, want), (h, w, density, it)


def test_auto_workers_follow_the_work_the_run_has_left(cache, bank, monkeypatch):
    """``workers="auto"``: one process for a short run (the styles analysed) or a learned renderer or one core;
    one per core (at most 4) when new style tiles make the run long enough to pay for the workers' start-up, which
    forked workers pay back sooner than spawned ones."""
    kw = dict(points_from=None, random_points=True, library_transforms=True, checkpoint=None, fmt="png", seed=2,
              domains=None, device="cpu", process="cluster", n_transforms=3)
    cfg, _ = G._config(120, bank, method="classic", size=[256, 256], **kw)
    monkeypatch.setattr(G, "_cpu_count", lambda: 2)
    monkeypatch.setattr(G, "_start_method", lambda: "fork")
    with monkeypatch.context() as m:
        m.setattr(P, "is_analysed", lambda *a: True)
        assert G.auto_workers(cfg, range(60)) == 2  # every style analysed: 1.2 CPU s of pairs, more than 1 s
        assert G.auto_workers(cfg, range(40)) == 1  # 0.8 s
    monkeypatch.setattr(G, "_start_method", lambda: "spawn")
    assert len(G._styles_needed(cfg, range(120))) == 3  # 120 pairs (2.4 CPU s) + 3 new tiles (0.9 s) > 3 s
    assert G.auto_workers(cfg, range(120)) == 2
    assert G.auto_workers(cfg, range(60)) == 1  # half the pairs: 2.1 s
    monkeypatch.setattr(P, "is_analysed", lambda *a: True)
    assert G.auto_workers(cfg, range(120)) == 1  # the same run, every style analysed: 2.4 s
    assert G.auto_workers(cfg, range(1000)) == 2  # a long one
    assert G.auto_workers({**cfg, "size": [1024, 1024]}, range(10)) == 2  # 16 x the pixels a pair
    monkeypatch.setattr(G, "_cpu_count", lambda: 16)
    assert G.auto_workers(cfg, range(1000)) == G._AUTO_MAX_WORKERS
    assert G.auto_workers(cfg, []) == 1
    monkeypatch.setattr(G, "_cpu_count", lambda: 1)
    assert G.auto_workers(cfg, range(1000)) == 1
    monkeypatch.setattr(G, "_cpu_count", lambda: 2)
    assert G.auto_workers({**cfg, "method": "adain"}, range(1000)) == 1  # torch's threads, one process
    with pytest.raises(ValueError, match="workers must be an integer"):
        G.generate(2, bank, bank.parent / "x", workers="many", random_points=True)
    m = G.generate(2, bank, bank.parent / "auto", workers="auto", random_points=True, size=(64, 64))
    assert m["complete"] and len(m["pairs"]) == 2


# ----------------------------------------------------------------------------------------------------------------
# forked workers (the CLI's): the same dataset as spawned ones and as one process


def test_workers_are_forked_only_where_it_is_safe(monkeypatch):
    """Fork on Linux from a process of one thread without torch or Qt (the CLI); else spawn (napari runs
    ``generate`` in a worker thread, with Qt loaded); ``NUCSYNTH_WORKER_START=spawn`` always spawns."""
    import subprocess
    import sys
    import threading

    if not sys.platform.startswith("linux"):
        pytest.skip("forking is used on Linux only")
    code = "from napari_nucsynth import generate as G; print(G._start_method())"
    env = {k: v for k, v in __import__("os").environ.items() if k != G.START_METHOD_ENV}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert fresh.stdout.strip() == "fork"  # a fresh process, as the CLI's
    env[G.START_METHOD_ENV] = "spawn"
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert forced.stdout.strip() == "spawn"
    assert {"torch", "PyQt5", "PySide6"} <= set(G._NO_FORK_MODULES)
    monkeypatch.delenv(G.START_METHOD_ENV, raising=False)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(G, "_NO_FORK_MODULES", ("sys",))  # a module of that list loaded (as torch or Qt would be)
    assert G._start_method() == "spawn"
    monkeypatch.setattr(G, "_NO_FORK_MODULES", ("no_such_module_here",))
    assert G._start_method() == "fork"
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    assert G._start_method() == "spawn"  # another thread runs (napari's worker threads, a tqdm monitor)
    out = []
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    t = threading.Thread(target=lambda: out.append(G._start_method()))
    t.start()
    t.join()
    assert out == ["spawn"]  # not from the main thread


def test_the_cli_writes_the_same_dataset_with_forked_spawned_and_no_workers(bank, tmp_path):
    """``nucsynth generate`` forks its workers (and tunes malloc); the files are byte for byte those of spawned
    workers and of one process, each run with an empty style cache (the workers analyse the tiles)."""
    import os
    import subprocess
    import sys

    runs = {"fork": ("2", {}), "spawn": ("2", {G.START_METHOD_ENV: "spawn"}), "one": ("1", {})}
    for name, (workers, extra) in runs.items():
        env = {k: v for k, v in os.environ.items() if k != G.START_METHOD_ENV}
        env.update(NUCSYNTH_CACHE=str(tmp_path / f"cache-{name}"), OMP_NUM_THREADS="1", **extra)
        cmd = [sys.executable, "-m", "napari_nucsynth.cli", "generate", "--n", "6", "--styles", str(bank),
               "--random-points", "--size", "64", "64", "--workers", workers, "--seed", "3", "--out",
               str(tmp_path / name)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        assert "6 of 6 pairs" in res.stdout
    m = read_manifest(tmp_path / "one")
    files = [f for p in m["pairs"] for f in p["files"].values()]
    assert len(files) == 12
    for name in ("fork", "spawn"):
        assert [p["meta"] for p in read_manifest(tmp_path / name)["pairs"]] == [p["meta"] for p in m["pairs"]]
        assert all(filecmp.cmp(tmp_path / "one" / f, tmp_path / name / f, shallow=False) for f in files), name
    assert len(list((tmp_path / "cache-fork" / "styles").glob("*.npz"))) == len(
        {p["meta"]["style"]["index"] for p in m["pairs"]})


def test_tune_malloc_is_taken_by_glibc():
    """glibc's malloc keeps freed memory for reuse in the processes ``generate`` owns (the settings are within
    glibc's bounds: ``mallopt`` refuses an mmap threshold above 32 MB on 64-bit); elsewhere nothing is changed."""
    import platform
    import sys

    ok = G.tune_malloc()
    assert ok == (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")


def test_a_worker_dead_while_its_result_never_arrives_breaks_the_pool(monkeypatch):
    """The executor waits forever for the rest of a result a killed worker was sending, without marking its futures
    failed: ``_collect`` takes a worker seen dead twice, a second apart, as a broken pool (``run`` then ends the
    run with one line), and ``close`` does not wait for the stuck executor."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool
    from types import SimpleNamespace

    shut = []
    dead = SimpleNamespace(exitcode=-9, is_alive=lambda: False)
    alive = SimpleNamespace(exitcode=None, is_alive=lambda: True, kill=lambda: shut.append("killed"))
    ex = SimpleNamespace(_processes={1: dead, 2: alive}, _broken=False,
                         shutdown=lambda wait, cancel_futures: shut.append(("shutdown", wait)))
    pool = G._Pool.__new__(G._Pool)  # the dealing state only: the executor is the fake above
    pool.ex, pool.stuck, pool._env, pool.inflight = ex, False, {}, {Future(): ("pair", 0)}
    t0 = time.monotonic()
    with pytest.raises(BrokenProcessPool, match="died while it sent a result"):
        pool._collect({})
    assert 1.5 < time.monotonic() - t0 < 10 and pool.stuck
    pool.close()
    assert shut == ["killed", ("shutdown", False)]  # the live worker killed, the stuck executor not waited for
    dead.exitcode = None  # every worker alive: a slow task is no failure
    pool.stuck, pool.inflight = False, {Future(): ("pair", 0)}
    fut = next(iter(pool.inflight))
    threading.Timer(2.5, lambda: fut.set_result((0, None, None, 0))).start()
    results = {}
    pool._collect(results)
    assert results == {0: (0, None, None, 0)} and not pool.stuck


@pytest.mark.parametrize("how", ["term_parent", "term_group", "kill_worker", "kill_parent"])
def test_a_cli_run_stopped_or_losing_a_worker_ends_cleanly(bank, tmp_path, how):
    """``nucsynth generate`` with forked workers: SIGTERM to it (``kill PID``) or to its whole process group (the
    workers ignore it; the command ends them) stops the run cleanly, exit status 143; a worker killed alone (the
    system's out-of-memory killer) is one line and exit status 2, not a traceback nor a run that never ends; the
    command killed (``kill -9``) takes its workers with it. The manifest lists the pairs written, each whole, and no
    worker is left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    psutil = pytest.importorskip("psutil")
    if not sys.platform.startswith("linux"):
        pytest.skip("forking is used on Linux only")
    env = {k: v for k, v in os.environ.items() if k != G.START_METHOD_ENV}
    env.update(NUCSYNTH_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "napari_nucsynth.cli", "generate", "--n", "2000", "--styles", str(bank),
           "--random-points", "--size", "48", "48", "--workers", "2", "--seed", "5", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "manifest.json").is_file() or not read_manifest(out)["pairs"]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        if how == "term_parent":
            proc.send_signal(signal.SIGTERM)
        elif how == "term_group":
            os.killpg(proc.pid, signal.SIGTERM)
        elif how == "kill_worker":
            workers[0].kill()
        else:
            proc.kill()
        stdout, stderr = proc.communicate(timeout=120)
        if how == "kill_parent":  # the workers are another session's children now: wait for the kernel to end them
            deadline = time.monotonic() + 10
            while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
                assert time.monotonic() < deadline, "the workers outlived their killed parent"
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if how == "kill_parent":
        assert proc.returncode == -signal.SIGKILL
    elif how == "kill_worker":
        assert proc.returncode == 2 and "Traceback" not in stderr
        assert stderr.count("\n") == 1 and "a worker process ended abruptly" in stderr and "--resume" in stderr
    else:
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        assert "incomplete" in stdout and "--resume" in stdout and "Traceback" not in stderr
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    m = read_manifest(out)
    assert 0 < len(m["pairs"]) < 2000 and not m["complete"]
    assert G.verify(out, [m["pairs"][0]["id"], m["pairs"][-1]["id"]]) == []  # (resume: test_generate.py)
