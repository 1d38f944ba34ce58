"""The on-disk caches of analysed styles (napari_nucsynth.presynthesis) and point-process fits (generate): the same
bits as without them, keyed by content and code, damaged files ignored and rewritten, one analysis across
processes, and a second ``generate`` run that analyses and fits nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _tiny import count_calls, same_analysis

from napari_nucsynth import generate as G
from napari_nucsynth import presynthesis as P
from napari_nucsynth.io import write_labels
from napari_nucsynth.render import render


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty cache folder, an empty in-memory cache, and small references (the tests' crops) on disk too
    (in this process; spawned processes keep the 384 x 384 floor)."""
    monkeypatch.setenv("NUCSYNTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "_CACHE", type(P._CACHE)())
    monkeypatch.setattr(P, "DISK_CACHE_MIN_PIXELS", 0)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def style(load_tile):
    img, lab = load_tile("TCGA-A7-A13F-01Z-00-DX1")
    return img[:160, :160].copy(), lab[:160, :160].copy()




def test_a_cached_analysis_renders_bit_for_bit_as_a_fresh_one(cache, load_tile, monkeypatch):
    img, lab = load_tile("TCGA-A7-A13F-01Z-00-DX1")  # 400 x 400: on disk in any process
    target = load_tile("TCGA-38-6178-01Z-00-DX1")[1][:96, :128]
    fresh = P.analyse_reference(img, lab)
    calls = count_calls(monkeypatch, P, "analyse_reference")
    first = render(target, img, style_labels=lab, seed=4)  # analysed and stored
    (stored,) = (cache / "styles").glob("*.npz")
    P._CACHE.clear()
    again = render(target, img, style_labels=lab, seed=4)  # read back from disk
    assert len(calls) == 1
    assert same_analysis(P._cached_reference(img, lab), fresh)
    monkeypatch.setenv("NUCSYNTH_CACHE", "off")
    P._CACHE.clear()
    without = render(target, img, style_labels=lab, seed=4)
    assert np.array_equal(first, again) and np.array_equal(first, without)
    assert stored.is_file() and len(calls) == 2  # off: analysed again, nothing read
    # the same arrays from another process (the file is all it shares with this one)
    code = ("import numpy as np, sys\n"
            "from napari_nucsynth import presynthesis as P\n"
            "from napari_nucsynth.render import render\n"
            "P.analyse_reference = None  # a cache miss would fail\n"
            "d = np.load(sys.argv[1])\n"
            "np.save(sys.argv[2], render(d['target'], d['img'], style_labels=d['lab'], seed=4))\n")
    np.savez(cache.parent / "in.npz", img=img, lab=lab, target=target)
    env = {**__import__("os").environ, "NUCSYNTH_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-c", code, str(cache.parent / "in.npz"), str(cache.parent / "out.npy")],
                       capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(np.load(cache.parent / "out.npy"), first)


def test_the_key_is_the_content_the_labels_and_the_code(cache, style, monkeypatch):
    img, lab = style
    P._cached_reference(img, lab)
    P._cached_reference(img.copy(), lab.copy())  # the same content: the same entry
    assert len(list((cache / "styles").glob("*.npz"))) == 1
    P._cached_reference(img, None)  # detected nuclei instead of the labels
    P._cached_reference(img, lab.astype(np.uint16))  # the labels' dtype is part of the key
    brighter = np.clip(img.astype(int) + 1, 0, 255).astype(np.uint8)
    P._cached_reference(brighter, lab)
    assert len(list((cache / "styles").glob("*.npz"))) == 4
    # other analysis code: other files, never the old ones
    P._CACHE.clear()
    monkeypatch.setattr(P, "_analysis_version", lambda: "another version")
    calls = count_calls(monkeypatch, P, "analyse_reference")
    P._cached_reference(img, lab)
    assert len(calls) == 1 and len(list((cache / "styles").glob("*.npz"))) == 5
    assert P.code_version(P.analyse_reference) != P.code_version(P.reference_background)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "other_key"])
def test_a_damaged_cache_file_is_ignored_and_rewritten(cache, style, monkeypatch, damage):
    img, lab = style
    fresh = P._cached_reference(img, lab)
    (path,) = (cache / "styles").glob("*.npz")
    data = path.read_bytes()
    if damage == "flip":
        data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
    elif damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "garbage":
        data = b"not a cache file" * 100
    elif damage == "empty":
        data = b""
    else:  # a valid file of another reference under this name
        P._CACHE.clear()
        P._cached_reference(img[:128, :128].copy(), lab[:128, :128].copy())
        other = next(p for p in (cache / "styles").glob("*.npz") if p != path)
        data = other.read_bytes()
    path.write_bytes(data)
    P._CACHE.clear()
    calls = count_calls(monkeypatch, P, "analyse_reference")
    assert same_analysis(P._cached_reference(img, lab), fresh)
    assert len(calls) == 1  # analysed again ...
    P._CACHE.clear()
    assert same_analysis(P._cached_reference(img, lab), fresh) and len(calls) == 1  # ... and the file rewritten


def test_unwritable_or_off_cache_still_renders(tmp_path, style, monkeypatch):
    img, lab = style
    monkeypatch.setattr(P, "_CACHE", type(P._CACHE)())
    (tmp_path / "file").write_text("a file where the cache folder would be")
    monkeypatch.setenv("NUCSYNTH_CACHE", str(tmp_path / "file"))
    a = P._cached_reference(img, lab)
    for off in ("off", "0", ""):
        monkeypatch.setenv("NUCSYNTH_CACHE", off)
        assert P.cache_dir() is None and P.style_cache_dir() is None
    monkeypatch.delenv("NUCSYNTH_CACHE")
    assert P.style_cache_dir() == Path.home() / ".cache" / "napari-nucsynth" / "styles"
    assert same_analysis(a, P.analyse_reference(img, lab))


def test_least_recently_used_files_are_evicted(cache, style, monkeypatch):
    img, lab = style
    crops = [(img[i : i + 100, :100].copy(), lab[i : i + 100, :100].copy()) for i in (0, 20, 40)]
    P._cached_reference(*crops[0])
    (first,) = (cache / "styles").glob("*.npz")
    monkeypatch.setattr(P, "DISK_CACHE_BYTES", int(first.stat().st_size * 2.5))
    P._cached_reference(*crops[1])
    P._CACHE.clear()
    P._cached_reference(*crops[0])  # read back: now the more recently used of the two
    import os
    import time

    os.utime(first, (time.time() + 5, time.time() + 5))
    P._cached_reference(*crops[2])
    files = list((cache / "styles").glob("*.npz"))
    assert len(files) == 2 and first in files


def test_processes_that_need_a_new_style_analyse_it_once(cache, load_tile, tmp_path):
    """Two processes asking for the same new reference at once: one analyses it, the other waits and reads it."""
    img, lab = load_tile("TCGA-A7-A13F-01Z-00-DX1")
    np.savez(tmp_path / "style.npz", img=img, lab=lab)
    code = ("import sys, numpy as np\n"
            "from napari_nucsynth import presynthesis as P\n"
            "real = P.analyse_reference\n"
            "def counted(*a, **k):\n"
            "    open(sys.argv[2], 'a').write('analysed\\n')\n"
            "    return real(*a, **k)\n"
            "P.analyse_reference = counted\n"
            "d = np.load(sys.argv[1])\n"
            "r = P._cached_reference(d['img'], d['lab'])\n"
            "np.save(sys.argv[3], r.background)\n")
    env = {**__import__("os").environ, "NUCSYNTH_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "style.npz"), str(tmp_path / "log.txt"),
                               str(tmp_path / f"bg{i}.npy")], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    assert (tmp_path / "log.txt").read_text().count("analysed") == 1
    assert np.array_equal(np.load(tmp_path / "bg0.npy"), np.load(tmp_path / "bg1.npy"))


# ----------------------------------------------------------------------------------------------------------------
# generate: a second run over the same styles analyses and fits nothing, and writes the same pairs


@pytest.fixture
def bank(tmp_path, load_tile) -> Path:
    import imageio.v3 as iio

    root = tmp_path / "bank"
    (root / "labels").mkdir(parents=True)
    for stem in ("TCGA-A7-A13F-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1"):
        img, lab = load_tile(stem)
        iio.imwrite(root / f"{stem}.png", img[:160, :160])
        write_labels(root / "labels" / f"{stem}.png", lab[:160, :160])
    return root


def test_generate_twice_analyses_and_fits_once(cache, bank, tmp_path, monkeypatch):
    from napari_nucsynth import points

    analyses = count_calls(monkeypatch, P, "analyse_reference")
    fits = count_calls(monkeypatch, points, "fit_point_process")
    kw = {"random_points": True, "size": (96, 96), "seed": 3}
    a = G.generate(8, bank, tmp_path / "a", **kw)
    used = len({p["meta"]["style"]["index"] for p in a["pairs"]})
    assert len(analyses) == used and len(fits) == 3  # each style tile once (styles' labels fit the layouts)
    assert len(list((cache / "styles").glob("*.npz"))) == used and len(list((cache / "fits").glob("*.json"))) == 3
    P._CACHE.clear()
    b = G.generate(8, bank, tmp_path / "b", **kw)
    assert len(analyses) == used and len(fits) == 3  # nothing new
    assert [p["meta"] for p in a["pairs"]] == [p["meta"] for p in b["pairs"]]
    assert a["generate"]["fits"] == b["generate"]["fits"]
    for p in a["pairs"]:
        for x, y in zip(G.read_pair(tmp_path / "a", p["id"]), G.read_pair(tmp_path / "b", p["id"])):
            assert np.array_equal(x, y)
    # the same as a run without any cache, and regenerate reproduces the pairs
    monkeypatch.setenv("NUCSYNTH_CACHE", "off")
    P._CACHE.clear()
    c = G.generate(8, bank, tmp_path / "c", **kw)
    assert a["generate"]["fits"] == json.loads(json.dumps(c["generate"]["fits"]))
    for p in a["pairs"]:
        for x, y in zip(G.read_pair(tmp_path / "a", p["id"]), G.read_pair(tmp_path / "c", p["id"])):
            assert np.array_equal(x, y)
    assert G.verify(tmp_path / "b") == []


def test_small_references_stay_in_memory(cache, style, monkeypatch):
    monkeypatch.setattr(P, "DISK_CACHE_MIN_PIXELS", 384 * 384)
    P._cached_reference(*style)  # 160 x 160: a training crop's size
    assert not (cache / "styles").exists()


def test_generate_workers_share_the_cache(cache, tmp_path, load_tile):
    """Spawned workers analyse the style tiles (400 x 400, above the size the disk cache starts at), once each."""
    import imageio.v3 as iio

    bank = tmp_path / "bank"
    (bank / "labels").mkdir(parents=True)
    for stem in ("TCGA-A7-A13F-01Z-00-DX1", "TCGA-49-4488-01Z-00-DX1"):
        img, lab = load_tile(stem)
        assert img.shape[0] * img.shape[1] >= 384 * 384
        iio.imwrite(bank / f"{stem}.png", img)
        write_labels(bank / "labels" / f"{stem}.png", lab)
    kw = {"random_points": True, "size": (96, 96), "seed": 5}
    one = G.generate(6, bank, tmp_path / "one", workers=1, **kw)
    for f in (cache / "styles").glob("*.npz"):
        f.unlink()
    two = G.generate(6, bank, tmp_path / "two", workers=2, **kw)  # the workers analyse the styles, once each
    used = {p["meta"]["style"]["index"] for p in two["pairs"]}
    assert len(list((cache / "styles").glob("*.npz"))) == len(used)
    for p in one["pairs"]:
        for x, y in zip(G.read_pair(tmp_path / "one", p["id"]), G.read_pair(tmp_path / "two", p["id"])):
            assert np.array_equal(x, y)


def test_a_damaged_fit_file_is_refitted(cache, bank, tmp_path, monkeypatch):
    from napari_nucsynth import points

    kw = {"random_points": True, "size": (96, 96), "seed": 1}
    a = G.generate(2, bank, tmp_path / "a", **kw)
    for i, f in enumerate(sorted((cache / "fits").glob("*.json"))):
        doc = json.loads(f.read_text())
        if i == 0:
            f.write_text("{ not json")
        elif i == 1:
            doc["params"]["intensity"] *= 2  # no longer matches its check
            f.write_text(json.dumps(doc))
    fits = count_calls(monkeypatch, points, "fit_point_process")
    b = G.generate(2, bank, tmp_path / "b", **kw)
    assert len(fits) == 2 and a["generate"]["fits"] == b["generate"]["fits"]


def test_style_bank_checks_shapes_and_damage_without_decoding(bank, tmp_path):
    import shutil

    (stem,) = [p.stem for p in bank.glob("*.png")][:1]
    assert len(G.load_style_bank(bank)) == 3
    bad = tmp_path / "bad"
    shutil.copytree(bank, bad)
    lab = bad / "labels" / f"{stem}.png"
    lab.write_bytes(lab.read_bytes()[:-40])  # truncated: the PNG checksums catch it
    with pytest.raises(ValueError, match=stem):
        G.load_style_bank(bad)
    write_labels(lab, np.ones((150, 160), np.uint32))
    with pytest.raises(ValueError, match="shape"):
        G.load_style_bank(bad)
    assert G._tile_shape(bank / f"{stem}.png", "image") == (160, 160)
    write_labels(bad / "labels" / f"{stem}.tif", np.ones((160, 160), np.uint32))
    assert G._tile_shape(bad / "labels" / f"{stem}.tif", "labels") == (160, 160)


def test_pinned_references_are_hashed_once(cache, style, load_tile, monkeypatch):
    import gc

    img, lab = style
    target = load_tile("TCGA-38-6178-01Z-00-DX1")[1][:64, :64]
    ref, ref_lab = P.pin_reference(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)]), lab)  # RGBA: to RGB
    assert ref.shape == img.shape and not ref.flags.writeable and not ref_lab.flags.writeable
    assert lab.flags.writeable  # the caller's own arrays are left as they were
    keys = count_calls(monkeypatch, P, "_content_key")
    a = [render(target, ref, style_labels=ref_lab, seed=s) for s in range(3)]
    assert keys == []  # never hashed again
    assert np.array_equal(a[1], render(target, img, style_labels=lab, seed=1)) and len(keys) == 1
    render(target, ref, style_labels=lab, seed=1)  # other labels than the pinned ones: hashed
    assert len(keys) == 2
    n = len(P._PINNED)
    del ref, ref_lab, a
    gc.collect()
    assert len(P._PINNED) == n - 1  # forgotten with the arrays
