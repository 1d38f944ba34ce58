"""One error rule for every ``nucsynth`` command (issue 20, item 5): a file that cannot be read, an output extension
no writer knows, a size that cannot fit in memory, a file that is no checkpoint: one line on stderr that names the
file (or the option) and what is wrong, exit status 2, no traceback, and nothing written.

Each case runs the real command in a fresh process, on 32 x 32 files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_nucsynth.cli import main

# --------------------------------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Good and truncated images and label maps, a style folder with one truncated tile among good ones, a training
    pair folder, a points CSV and a file of random bytes."""
    import imageio.v3 as iio

    d = tmp_path_factory.mktemp("cli_errors")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    lab = np.zeros((32, 32), np.uint16)
    lab[4:12, 4:12], lab[18:28, 16:26] = 1, 2
    iio.imwrite(d / "img.png", img)
    iio.imwrite(d / "lab.png", lab)
    for name in ("img", "lab"):
        data = (d / f"{name}.png").read_bytes()
        (d / f"bad_{name}.png").write_bytes(data[: len(data) // 2])
    (d / "styles").mkdir()
    iio.imwrite(d / "styles" / "a.png", img)
    (d / "styles" / "b.png").write_bytes((d / "bad_img.png").read_bytes())
    iio.imwrite(d / "styles" / "c.png", img[::-1])
    (d / "good_styles").mkdir()
    iio.imwrite(d / "good_styles" / "a.png", img)
    for sub, src in (("images", "img.png"), ("labels", "lab.png")):
        (d / "pairs" / sub).mkdir(parents=True)
        (d / "pairs" / sub / "a.png").write_bytes((d / src).read_bytes())
    (d / "pts.csv").write_text("index,axis-0,axis-1\n0,10,10\n1,20,20\n")
    (d / "junk.pt").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    return d


def _cli(d: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NUCSYNTH_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "napari_nucsynth.cli", *args], capture_output=True, text=True,
                          cwd=d, env=env, timeout=120)


def _one_line_error(out: subprocess.CompletedProcess, command: str, *names: str) -> str:
    """The rule: status 2, a single stderr line ``nucsynth <command>: error: ...`` naming ``names``, no traceback."""
    err = out.stderr.strip()
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and len(err.splitlines()) == 1, out.stderr[-3000:]
    assert err.startswith(f"nucsynth {command}: error: "), err
    for name in names:
        assert name in err, (name, err)
    assert len(err) < 400, err
    return err


def _memory_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


# ------------------------------------------------------------------------------------------ unreadable inputs

TRUNCATED = "image file is truncated"

CASES = {  # id: (arguments, the file named, what the message says)
    "render --labels": (["render", "--labels", "bad_lab.png", "--style", "img.png", "--out", "o.png"],
                        "bad_lab.png", TRUNCATED),
    "render --style": (["render", "--labels", "lab.png", "--style", "bad_img.png", "--out", "o.png"],
                       "bad_img.png", TRUNCATED),
    "render --style-labels": (["render", "--labels", "lab.png", "--style", "img.png", "--style-labels",
                               "bad_lab.png", "--out", "o.png"], "bad_lab.png", TRUNCATED),
    "random-points --like": (["random-points", "--like", "bad_lab.png", "--out", "p.csv"], "bad_lab.png", TRUNCATED),
    "evaluate --truth": (["evaluate", "--truth", "bad_lab.png", "--pred", "lab.png"], "bad_lab.png", TRUNCATED),
    "evaluate --pred": (["evaluate", "--truth", "lab.png", "--pred", "bad_lab.png"], "bad_lab.png", TRUNCATED),
    "segment --image": (["segment", "--image", "bad_img.png", "--out", "l.tif"], "bad_img.png", TRUNCATED),
    "sample-masks --points": (["sample-masks", "--points", "junk.pt", "--shape", "32", "32", "--out", "m.tif"],
                              "junk.pt", "cannot read junk.pt as a napari points CSV"),
    "generate: a bad tile": (["generate", "--n", "2", "--size", "32", "32", "--styles", "styles", "--random-points",
                              "--out", "ds"], "b.png", "1 of 3 tiles cannot be read, so nothing was written"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unreadable_file_is_named_in_one_line(files, case):
    args, name, what = CASES[case]
    err = _one_line_error(_cli(files, *args), args[0], name, what)
    assert not any((files / f).exists() for f in ("o.png", "p.csv", "l.tif", "m.tif", "ds")), err


# -------------------------------------------------------------------------------- outputs, sizes, checkpoints

OTHER = {  # id: (arguments, what the message names and says)
    "render --out o.txt": (["render", "--labels", "lab.png", "--style", "img.png", "--out", "o.txt"],
                           ("--out o.txt: unsupported extension .txt; an image must end in .png, .tif, .tiff, .jpg",)),
    "render --out into a missing folder": (["render", "--labels", "lab.png", "--style", "img.png", "--out",
                                            "nowhere/o.png"], ("--out nowhere/o.png", "folder nowhere does not exist")),
    "render --options for a method without them": (["render", "--labels", "lab.png", "--style", "img.png",
                                                     "--options", '{"strength": 0.5}', "--out", "o.png"],
                                                    ("'classic' takes no option 'strength'",)),
    "render --options not JSON": (["render", "--labels", "lab.png", "--style", "img.png", "--options", "{strength",
                                   "--out", "o.png"], ("--options is not valid JSON",)),
    "segment --out o.jpg": (["segment", "--image", "img.png", "--out", "o.jpg"],
                            ("--out o.jpg", "a label map must end in .tif, .tiff, .png, .npy")),
    "sample-masks --out o.txt": (["sample-masks", "--points", "pts.csv", "--shape", "32", "32", "--out", "o.txt"],
                                 ("--out o.txt", "a label map must end in")),
    "random-points --out o.txt": (["random-points", "--like", "lab.png", "--out", "o.txt"],
                                  ("--out o.txt", "a napari points CSV file must end in .csv")),
    "sample-masks --shape 100000 100000": (["sample-masks", "--points", "pts.csv", "--shape", "100000", "100000",
                                            "--out", "o.tif"], ("--shape 100000 100000", "GiB of memory",
                                                                "available; ask for a smaller size")),
    "generate --size 100000 100000": (["generate", "--n", "1", "--size", "100000", "100000", "--styles", "styles",
                                       "--random-points", "--out", "o"], ("--size 100000 100000", "GiB of memory")),
    "render --checkpoint random bytes": (["render", "--labels", "lab.png", "--style", "img.png", "--method", "adain",
                                          "--checkpoint", "junk.pt", "--out", "o.png"],
                                         ("junk.pt is not a napari-nucsynth checkpoint",)),
    "render --checkpoint a PNG": (["render", "--labels", "lab.png", "--style", "img.png", "--method", "sian",
                                   "--checkpoint", "img.png", "--out", "o.png"],
                                  ("img.png is not a napari-nucsynth checkpoint",)),
    "segment --checkpoint a PNG": (["segment", "--image", "img.png", "--method", "hovernet", "--checkpoint",
                                    "img.png", "--out", "o.tif"], ("img.png is not a napari-nucsynth checkpoint",)),
    "segment --checkpoint to watershed": (["segment", "--image", "img.png", "--checkpoint", "img.png", "--out",
                                           "o.tif"], ("--checkpoint img.png", "watershed method runs no trained")),
    "generate --checkpoint a PNG": (["generate", "--n", "1", "--size", "32", "32", "--styles", "good_styles",
                                     "--random-points", "--method", "adain", "--checkpoint", "img.png", "--out", "o"],
                                    ("img.png is not a napari-nucsynth checkpoint",)),
    "train --init a PNG": (["train", "--model", "hovernet", "--images", "pairs/images", "--labels", "pairs/labels",
                            "--steps", "1", "--device", "cpu", "--out", "o.pt", "--init", "img.png"],
                           ("img.png is not a napari-nucsynth checkpoint",)),
    "train --resume random bytes": (["train", "--model", "hovernet", "--images", "pairs/images", "--labels",
                                     "pairs/labels", "--steps", "1", "--device", "cpu", "--out", "o.pt", "--resume",
                                     "junk.pt"], ("junk.pt is not a napari-nucsynth checkpoint",)),
}


@pytest.mark.parametrize("case", list(OTHER))
def test_bad_output_size_or_checkpoint_is_one_line(files, case):
    args, says = OTHER[case]
    if "100000" in args and _memory_gib() > 1000:  # pragma: no cover - a machine that could do it
        pytest.skip("this machine has the memory for 100000 x 100000 pixels")
    _one_line_error(_cli(files, *args), args[0], *says)
    assert not any(p.name.startswith("o") for p in files.iterdir()), sorted(p.name for p in files.iterdir())


def test_good_files_still_work(files, tmp_path):
    """The same files, read well: the checks refuse only what is wrong (a JPEG output, a truncated tile removed)."""
    out = _cli(files, "render", "--labels", "lab.png", "--style", "img.png", "--out", str(tmp_path / "r.jpg"))
    assert out.returncode == 0 and (tmp_path / "r.jpg").is_file(), out.stderr[-2000:]
    out = _cli(files, "sample-masks", "--points", "pts.csv", "--shape", "32", "32", "--out", str(tmp_path / "m.npy"))
    assert out.returncode == 0 and (tmp_path / "m.npy").is_file(), out.stderr[-2000:]


# ------------------------------------------------------------------------------------ main(): the one wrapper


@pytest.mark.parametrize(("exc", "says", "code"), [
    (OSError(13, "Permission denied", "/data/x.png"), "/data/x.png: Permission denied", 2),
    (MemoryError("Unable to allocate 37.3 GiB for an array with shape (100000, 100000) and data type uint32"),
     "out of memory: Unable to allocate 37.3 GiB", 2),
    (ValueError("first line\n   second line"), "first line second line", 2),
    (KeyboardInterrupt(), "interrupted", 130),
])
def test_main_turns_user_errors_into_one_line(monkeypatch, capsys, exc, says, code):
    def _fail(args):
        raise exc

    monkeypatch.delenv("NUCSYNTH_DEBUG", raising=False)
    monkeypatch.setattr("napari_nucsynth.cli._evaluate", _fail)
    assert main(["evaluate", "--truth", "t", "--pred", "p"]) == code
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("nucsynth evaluate: ") and says in err, err


@pytest.mark.parametrize(("exc", "debug"), [(KeyError("a bug"), None), (ValueError("a user error"), "1")])
def test_bugs_keep_their_traceback_and_debug_shows_all(monkeypatch, exc, debug):
    def _fail(args):
        raise exc

    monkeypatch.delenv("NUCSYNTH_DEBUG", raising=False)
    if debug:
        monkeypatch.setenv("NUCSYNTH_DEBUG", debug)
    monkeypatch.setattr("napari_nucsynth.cli._evaluate", _fail)
    with pytest.raises(type(exc)):
        main(["evaluate", "--truth", "t", "--pred", "p"])


def test_io_names_the_file(files):
    from napari_nucsynth.io import check_output, read_image, read_labels, verify_image

    for fn, name in ((read_image, "bad_img.png"), (read_labels, "bad_lab.png"), (verify_image, "bad_img.png")):
        with pytest.raises(ValueError, match=f"cannot read .*{name}"):
            fn(files / name)
    assert verify_image(files / "img.png") == files / "img.png"
    with pytest.raises(ValueError, match="file not found"):
        read_image(files / "missing.png")
    with pytest.raises(ValueError, match=r"points: no extension; a napari points CSV file must end in \.csv"):
        check_output(files / "points", "points")


def test_a_png_checked_once_is_not_read_again_until_it_changes(files, tmp_path, monkeypatch):
    """``png_info`` remembers a verified PNG by path, size and modification time (``generate``'s CLI checks the
    style tiles, then reads their shapes): the same file is read once; a file changed since is checked again, and a
    damaged one is never remembered."""
    import shutil

    from PIL import Image

    from napari_nucsynth.io import _files

    monkeypatch.setattr(_files, "_PNG_CHECKED", {})
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1])
    tile = tmp_path / "tile.png"
    shutil.copy(files / "img.png", tile)
    h, w, mode = _files.png_info(tile)
    assert _files.png_info(tile) == (h, w, mode) and len(opened) == 1
    shutil.copy(files / "bad_img.png", tile)  # replaced by a damaged file: checked again, and refused
    with pytest.raises(ValueError, match="cannot read .*tile.png"):
        _files.png_info(tile)
    with pytest.raises(ValueError, match="cannot read .*tile.png"):
        _files.png_info(tile)
    assert len(opened) == 3


def test_generate_workers_takes_a_count_or_auto():
    from napari_nucsynth.cli import build_parser

    p = build_parser()
    base = ["generate", "--n", "1", "--styles", "s", "--out", "o"]
    assert p.parse_args(base).workers == "auto"  # the default
    assert p.parse_args([*base, "--workers", "3"]).workers == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            p.parse_args([*base, "--workers", bad])
