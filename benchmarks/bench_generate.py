"""Batch generation benchmark (prints JSON).

1. Throughput: pairs per second of ``generate`` at 256 x 256, classic renderer, ``--workers`` processes (png),
   over the whole run (spawn included) and in steady state (from the first written pair on).
2. Export: time to write pre-made pairs with ``PairAppender`` (files + one manifest flush per second, as
   ``generate`` does) per format, for ``--export-count`` writes, extrapolated linearly to 1,000 pairs.
3. Crash: ``nucsynth generate`` in a subprocess, SIGKILL (to its process group, workers included) once
   ``--kill-after`` pairs are listed, then ``--resume``; checks the dataset is complete, holds no stray file, and that
   every pair equals its regeneration from the manifest entry.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generate.py [--n 40] [--workers 2] [--export-count 100]
        [--crash-n 24] [--kill-after 8]

Style tiles: 256 x 256 crops of MoNuSeg training tiles (``NUCSYNTH_DATA`` or ``../shared/data/monuseg/train``),
with their labels, written to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tiles", type=int, default=8, help="style tiles in the bank")
    ap.add_argument("--export-count", type=int, default=100, help="writes per format (extrapolated to 1,000)")
    ap.add_argument("--crash-n", type=int, default=24)
    ap.add_argument("--kill-after", type=int, default=8)
    args = ap.parse_args()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bank = _bank(root, args.tiles)
        out = {"command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python",
                                    *sys.argv]),
               "cpus": os.cpu_count(), "loadavg_before": [round(v, 2) for v in load0]}
        out["throughput"] = throughput(bank, root, args.n, args.workers)
        out["export"] = export_times(bank, root, args.export_count)
        out["crash_resume"] = crash(bank, root, args.crash_n, args.kill_after, args.workers)
        out["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(out, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)))


if __name__ == "__main__":
    main()
