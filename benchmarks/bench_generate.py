"""Batch generation benchmark (prints JSON).

1. Throughput: pairs per second of ``generate`` at 256 x 256, classic renderer, ``--workers`` processes (png),
   over the whole run (spawn included) and in steady state (from the first written pair on).
2. Export: time to write pre-made pairs with ``PairAppender`` (files + one manifest flush per second, as
   ``generate`` does) per format, for ``--export-count`` writes, extrapolated linearly to 1,000 pairs.
3. Crash: ``nucsynth generate`` in a subprocess, SIGKILL (to its process group, workers included) once
   ``--kill-after`` pairs are listed, then ``--resume``; checks the dataset is complete, holds no stray file, and that
   every pair equals its regeneration from the manifest entry.
4. Styles (issue 20, item 9): ``nucsynth generate --n STYLES_N --size 256 256 --random-points --workers W`` as a
   command over ``--style-tiles`` whole 1000 x 1000 tiles with their labels: first with an empty cache folder
   (``NUCSYNTH_CACHE``: every style is new, as on a first run), then again with that cache (every style analysed).
   With ``--baseline-src DIR`` the same two runs are made from another source tree (``DIR/src``, e.g. a ``git
   archive`` of the commit before a change), back to back with this tree's (baseline fresh, fresh, analysed,
   baseline analysed; ``--repeats`` times, medians reported), so before and after share the machine's load; the
   datasets are compared pair by pair. Pairs per second are of the whole command (start-up included) and as the
   command reports them (from its first pair on); ``cpu_seconds`` is the CPU time of the command and its workers
   (user + system), a figure the machine's load changes much less than the wall time. The benchmark makes itself
   the subreaper of the command's processes (Linux), so a fork server that outlives the command by a moment, and
   the workers it forked, are counted too (``orphans_reaped``). ``machine`` is a yardstick of the day's cores (the
   CPU seconds of one ``analyse_reference`` of a whole tile) to read the figures beside.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generate.py [--n 40] [--workers 2] [--export-count 100]
        [--crash-n 24] [--kill-after 8] [--sections throughput,export,crash,styles] [--styles-n 60]
        [--style-tiles 14] [--baseline-src DIR] [--repeats 1]

Style tiles: 256 x 256 crops of MoNuSeg training tiles (``NUCSYNTH_DATA`` or ``../shared/data/monuseg/train``),
with their labels, written to a temporary folder (whole tiles for the styles section).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _data() -> Path:
    env = os.environ.get("NUCSYNTH_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "monuseg" / "train"]:
        if (cand / "images").is_dir():
            return cand
    sys.exit("MoNuSeg training tiles not found (set NUCSYNTH_DATA)")


def _become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``), so that
    processes the command leaves behind (its fork server, which outlives it by a moment) are waited for here and
    their CPU time counts in ``RUSAGE_CHILDREN``. False where the platform cannot."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap(timeout: float = 30.0) -> int:
    """Wait for every orphaned descendant (after :func:`_become_subreaper`); the number reaped."""
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return n
        if pid:
            n += 1
        else:
            time.sleep(0.01)
    return n


def _bank(root: Path, n_tiles: int) -> Path:
    import imageio.v3 as iio

    from napari_nucsynth.io import read_image, read_labels, write_labels

    data = _data()
    out = root / "styles"
    (out / "labels").mkdir(parents=True)
    for f in sorted((data / "images").glob("*.png"))[:n_tiles]:
        iio.imwrite(out / f.name, read_image(f)[:256, :256, :3])
        write_labels(out / "labels" / (f.stem + ".tif"), read_labels(data / "labels" / f.name)[:256, :256])
    return out


def _whole_tiles(root: Path, n_tiles: int) -> Path:
    """The first ``n_tiles`` whole tiles (1000 x 1000) and their labels, copied to ``root/whole``."""
    data = _data()
    out = root / "whole"
    (out / "labels").mkdir(parents=True)
    for f in sorted((data / "images").glob("*.png"))[:n_tiles]:
        shutil.copy(f, out / f.name)
        shutil.copy(data / "labels" / f.name, out / "labels" / f.name)
    return out


def _yardstick(bank: Path) -> dict:
    """How fast this machine is today, in the unit the styles runs spend most on: the CPU seconds of one
    ``analyse_reference`` of the bank's first tile (no cache; median of 3, in this process, before the runs). The
    same code took 0.30 s on one day and 0.45 s on another, so the pairs/s figures are read beside it. Also whether
    ``PYTHONDONTWRITEBYTECODE`` is set: then every process compiles the package's modules again at start-up."""
    from napari_nucsynth.io import read_image
    from napari_nucsynth.presynthesis import analyse_reference

    tile = read_image(sorted(bank.glob("*.png"))[0])[..., :3]
    times = []
    for _ in range(3):
        t0 = time.process_time()
        analyse_reference(tile)
        times.append(time.process_time() - t0)
    return {"analyse_reference_cpu_s": round(float(np.median(times)), 3),
            "python_dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))}


def styles(root: Path, n: int, workers: int, n_tiles: int, baseline_src: str | None, repeats: int = 1) -> dict:
    """``nucsynth generate`` over whole style tiles: fresh styles, the same styles again, and a baseline tree.

    Each repeat runs, back to back: the baseline fresh (an empty cache folder), this tree fresh, this tree with the
    styles analysed (its cache again), the baseline with its styles analysed (if the baseline caches at all), so
    before and after share the machine's load; the medians over the repeats are reported beside every run."""
    from napari_nucsynth.generate import read_pair

    bank = _whole_tiles(root, n_tiles)
    subreaper = _become_subreaper()
    cmd = [sys.executable, "-m", "napari_nucsynth.cli", "generate", "--n", str(n), "--styles", str(bank),
           "--random-points", "--size", "256", "256", "--workers", str(workers), "--seed", "0"]

    def run(name: str, cache: Path, src: str | None = None) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NUCSYNTH_CACHE": str(cache)}
        if src:
            env["PYTHONPATH"] = str(Path(src).resolve() / "src")
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, check=False)
        dt = time.perf_counter() - t0
        reaped = _reap() if subreaper else 0  # the fork server (and so its workers' time) once it has exited
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and all its processes
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        said = re.findall(r"(\d+)/(\d+) pairs, ([\d.]+) pairs/s", r.stdout)
        return {"exit": r.returncode, "seconds": round(dt, 2), "pairs_per_s": round(n / dt, 2),
                "pairs_per_s_reported": float(said[-1][2]) if said else None, "cpu_seconds": round(cpu, 2),
                "load_before": round(load, 2), "orphans_reaped": reaped,
                "cache_files": len(list((cache / "styles").glob("*.npz"))) if (cache / "styles").is_dir() else 0,
                **({"stderr": r.stderr[-1500:]} if r.returncode else {})}

    res = {"command": " ".join([*cmd[2:], "--out", "DIR"]), "style_tiles": n_tiles, "tile_size": [1000, 1000],
           "workers": workers, "repeats": repeats, "machine": _yardstick(bank), "runs": []}
    if baseline_src:
        res["baseline_src"] = str(Path(baseline_src).resolve())
    for k in range(repeats):
        rep = {}
        for c in ("cache-base", "cache"):
            shutil.rmtree(root / c, ignore_errors=True)
        if baseline_src:
            rep["baseline_fresh"] = run("base_fresh", root / "cache-base", baseline_src)
        rep["fresh_styles"] = run("fresh", root / "cache")
        rep["analysed_styles"] = run("again", root / "cache")
        if baseline_src:
            rep["baseline_analysed"] = run("base_again", root / "cache-base", baseline_src)
        names = ["fresh", "again"] + (["base_fresh", "base_again"] if baseline_src else [])
        ids = [f"syn_{i:06d}" for i in range(n)]
        rep["pairs_identical"] = all(
            all(np.array_equal(x, y) for x, y in zip(read_pair(root / names[0], i), read_pair(root / other, i)))
            for other in names[1:] for i in ids)
        res["runs"].append(rep)
    kinds = [key for key in res["runs"][0] if isinstance(res["runs"][0][key], dict)]
    res["median_pairs_per_s"] = {key: float(np.median([r[key]["pairs_per_s"] for r in res["runs"]])) for key in kinds}
    res["median_cpu_seconds"] = {key: float(np.median([r[key]["cpu_seconds"] for r in res["runs"]])) for key in kinds}
    res["pairs_identical"] = all(r["pairs_identical"] for r in res["runs"])
    return res


def throughput(bank: Path, root: Path, n: int, workers: int) -> dict:
    from napari_nucsynth.generate import generate

    stamps = []
    t0 = time.perf_counter()
    m = generate(n, bank, root / "speed", random_points=True, size=(256, 256), fmt="png", workers=workers, seed=0,
                 progress=lambda d, t, w: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"pairs": len(m["pairs"]), "workers": workers, "size": [256, 256], "method": "classic", "format": "png",
            "seconds": round(total, 2), "pairs_per_s_overall": round(n / total, 2),
            "pairs_per_s_steady": round(steady, 2) if steady else None, "target_pairs_per_s": 10}


def export_times(bank: Path, root: Path, count: int) -> dict:
    from napari_nucsynth.generate import generate, read_pair
    from napari_nucsynth.io.export import FORMATS, PairAppender

    src = root / "premade"
    m = generate(10, bank, src, random_points=True, size=(256, 256), fmt="png", seed=1)
    pairs = [read_pair(src, p["id"]) + (p["meta"],) for p in m["pairs"]]
    res = {"writes_timed": count, "extrapolated_to": 1000,
           "note": f"{count} real writes per format (files + a manifest flush each second), scaled linearly to 1,000"}
    for fmt in FORMATS:
        app = PairAppender(root / f"export_{fmt}", fmt)
        last = t0 = time.perf_counter()
        for i in range(count):
            img, lab, meta = pairs[i % len(pairs)]
            app.add(f"p{i:06d}", img, lab, None, meta)
            if time.perf_counter() - last >= 1.0:
                app.flush()
                last = time.perf_counter()
        app.flush(complete=True)
        dt = time.perf_counter() - t0
        res[fmt] = {"seconds": round(dt, 3), "seconds_per_1000": round(dt * 1000 / count, 1)}
    return res


def crash(bank: Path, root: Path, n: int, kill_after: int, workers: int) -> dict:
    from napari_nucsynth.generate import verify
    from napari_nucsynth.io import read_manifest

    ds = root / "crash"
    cmd = [sys.executable, "-m", "napari_nucsynth.cli", "generate", "--n", str(n), "--styles", str(bank), "--out",
           str(ds), "--random-points", "--size", "256", "256", "--format", "stardist", "--workers", str(workers),
           "--seed", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    listed, files_at_kill, t0 = 0, 0, time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        try:
            listed = len(read_manifest(ds)["pairs"])
        except (ValueError, json.JSONDecodeError):
            listed = 0
        if listed >= kill_after:
            files_at_kill = len(list((ds / "images").glob("*.tif")))
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9 of the CLI and its worker processes
            break
        time.sleep(0.05)
    proc.wait()
    killed = proc.returncode == -signal.SIGKILL
    before = read_manifest(ds)
    t1 = time.time()
    r = subprocess.run([*cmd, "--resume"], check=False, capture_output=True, text=True, env=env)
    resume_s = time.time() - t1
    after = read_manifest(ds)
    ids = [p["id"] for p in after["pairs"]]
    owned = {f for p in after["pairs"] for f in p["files"].values()}
    on_disk = {str(p.relative_to(ds)) for p in ds.rglob("*") if p.is_file()} - {"manifest.json"}
    t2 = time.time()
    bad = verify(ds)
    return {"n": n, "workers": workers, "killed_with_sigkill": killed, "listed_at_kill": len(before["pairs"]),
            "image_files_at_kill": files_at_kill, "complete_at_kill": before["complete"],
            "resume_exit": r.returncode, "resume_seconds": round(resume_s, 2), "pairs_after_resume": len(ids),
            "unique_ids": len(set(ids)) == n, "complete_after_resume": after["complete"],
            "stray_files": sorted(on_disk - owned), "pairs_differing_from_regeneration": bad,
            "verify_seconds": round(time.time() - t2, 2), "ok": killed and after["complete"] and not bad
            and len(set(ids)) == n and on_disk == owned}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="pairs of the throughput run")
    ap.add_argument("--workers", type=lambda v: v if v == "auto" else int(v), default=2, help="a count or auto")
    ap.add_argument("--tiles", type=int, default=8, help="style tiles in the bank")
    ap.add_argument("--export-count", type=int, default=100, help="writes per format (extrapolated to 1,000)")
    ap.add_argument("--crash-n", type=int, default=24)
    ap.add_argument("--kill-after", type=int, default=8)
    ap.add_argument("--sections", default="throughput,export,crash,styles",
                    help="comma-separated: throughput, export, crash, styles")
    ap.add_argument("--styles-n", type=int, default=60, help="pairs of each styles run")
    ap.add_argument("--style-tiles", type=int, default=14, help="whole tiles in the styles runs' bank")
    ap.add_argument("--baseline-src", help="a source tree (DIR/src) to run the styles command from as the baseline")
    ap.add_argument("--repeats", type=int, default=1, help="repeats of the styles runs (medians reported)")
    args = ap.parse_args()
    if args.baseline_src and not (Path(args.baseline_src) / "src" / "napari_nucsynth").is_dir():
        # else the baseline's PYTHONPATH names nothing and its runs import this tree's (installed) package
        ap.error(f"--baseline-src {args.baseline_src}: no src/napari_nucsynth in it (give the folder above src)")
    sections = set(args.sections.split(","))
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("NUCSYNTH_CACHE", str(root / "cache-inprocess"))  # not the user's cache
        bank = _bank(root, args.tiles)
        out = {"command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python",
                                    *sys.argv]),
               "cpus": os.cpu_count(), "loadavg_before": [round(v, 2) for v in load0]}
        if "throughput" in sections:
            out["throughput"] = throughput(bank, root, args.n, args.workers)
        if "export" in sections:
            out["export"] = export_times(bank, root, args.export_count)
        if "crash" in sections:
            out["crash_resume"] = crash(bank, root, args.crash_n, args.kill_after, args.workers)
        if "styles" in sections:
            out["styles"] = styles(root, args.styles_n, args.workers, args.style_tiles, args.baseline_src,
                                   args.repeats)
        out["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(out, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))


if __name__ == "__main__":
    main()
