"""Training throughput inside napari (a worker thread, and the Train widget) against the main thread; prints JSON.

    OMP_NUM_THREADS=1 xvfb-run -a .venv/bin/python benchmarks/bench_training.py --steps 30 --crop 128 --batch 2 --repeats 3

The same small HoVer-Net training (default config, no pretrained weights, same data, same seed) runs in three
ways, interleaved and in a rotating order, ``repeats`` times each:

- ``main``: :func:`napari_nucsynth.train.train` called on the main thread (as a script would), the viewer idle;
- ``worker``: the same call in ``napari.qt.threading.create_worker`` while the main thread runs the Qt event loop
  of a shown viewer (Xvfb), as napari plugins do (micro-sam issue 740 reported torch much slower there);
- ``widget``: the Train widget itself (its event deque, 10 Hz UI drain, live loss plot and status line).

Throughput is steps per second between the first and the last step event (the first step, with its one-off
allocations, and the final checkpoint are excluded); ``ratio_*`` divide the median of a mode by the median of
``main`` in the same run, ``paired_ratio_*`` is the median over repeats of a mode's rate over the ``main`` rate of
the same repeat (GUIDE section 5: time here is noisy, compare within a run). Target: ratio >= 0.9.
Uses a MoNuSeg tile when one is found (``$NUCSYNTH_DATA``), a synthetic one otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _data(size: int = 256):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from _data import load_image, load_labels, monuseg_dir, tile_ids

        root = monuseg_dir()
        tile = tile_ids(root)[0]
        img, lab = load_image(tile, root), load_labels(tile, root)
        return [img[:size, :size], img[size : 2 * size, :size]], [lab[:size, :size], lab[size : 2 * size, :size]], tile
    except SystemExit:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[:size, :size]
        lab = np.zeros((size, size), np.uint32)
        for i, (r, c) in enumerate(rng.integers(8, size - 8, (60, 2)), 1):
            lab[((yy - r) ** 2 + (xx - c) ** 2 <= 40) & (lab == 0)] = i
        img = np.where(lab[..., None] > 0, (80, 50, 140), (235, 200, 220)).astype(np.uint8)
        return [img, img[::-1]], [lab, lab[::-1]], "synthetic"


def _rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="main,worker,widget")
    args = ap.parse_args(argv)

    import napari
    import torch  # GUIDE section 5: torch (and torchvision) before any viewer exists
    import torchvision  # noqa: F401
    from napari.qt.threading import create_worker
    from qtpy.QtCore import QEventLoop
    from qtpy.QtWidgets import QApplication

    from napari_nucsynth._widgets import train as train_widget
    from napari_nucsynth.train import train

    tmp = Path(tempfile.mkdtemp(prefix="bench_training_"))
    os.environ["NUCSYNTH_MODELS"] = str(tmp)
    images, labels, source = _data()
    kw = {"steps": args.steps, "config": {"pretrained": None}, "device": args.device, "seed": 0,
          "batch_size": args.batch, "crop": args.crop, "val_fraction": 0.0, "save_every": 10**9}

    viewer = napari.Viewer(show=True)
    viewer.add_image(images[0], rgb=True, name="H&E")
    viewer.add_labels(labels[0], name="nuclei")
    widget = train_widget.TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Train")
    QApplication.processEvents()
    threads = {"main": torch.get_num_threads()}

    def run_main(i):
        times = []
        train("hovernet", images, labels, out=tmp / f"m{i}.pt",
              on_update=lambda u: u.kind == "step" and times.append(time.perf_counter()), **kw)
        return times

    def run_worker(i):
        times = []

        def work():
            threads["worker"] = torch.get_num_threads()
            return train("hovernet", images, labels, out=tmp / f"w{i}.pt",
                         on_update=lambda u: u.kind == "step" and times.append(time.perf_counter()), **kw)

        loop = QEventLoop()
        worker = create_worker(work)
        worker.finished.connect(loop.quit)
        worker.start()
        loop.exec()
        return times

    def run_widget(i):
        times = []
        original = train_widget._Job.on_update

        def on_update(job, u):
            if u.kind == "step":
                times.append(time.perf_counter())
            original(job, u)

        train_widget._Job.on_update = on_update
        try:
            widget.model.value = "hovernet"
            widget.config.value = json.dumps(kw["config"])
            widget.source.value = "layers"
            widget.steps.value, widget.batch.value, widget.crop.value = args.steps, args.batch, args.crop
            widget.device.value, widget.seed.value = args.device, 0
            widget.val_fraction.value, widget.save_every.value = 0.0, 10**6
            widget.resume.value = None
            widget.out.value = tmp / f"g{i}.pt"
            loop = QEventLoop()
            widget.start()
            assert widget.running, widget.status.value
            widget._worker.finished.connect(loop.quit)
            loop.exec()
        finally:
            train_widget._Job.on_update = original
        return times

    runs = {"main": run_main, "worker": run_worker, "widget": run_widget}
    modes = [m for m in args.modes.split(",") if m in runs]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    t0 = time.perf_counter()
    run_main(-1)  # warm-up (first-call allocations, lazy imports), not counted
    for r in range(args.repeats):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        for m in order:
            rates[m].append(_rate(runs[m](r)))
    med = {m: statistics.median(v) for m, v in rates.items()}
    out = {
        "benchmark": "training throughput in napari (hovernet)",
        "data": source, "steps": args.steps, "crop": args.crop, "batch_size": args.batch, "device": args.device,
        "repeats": args.repeats, "torch_threads": threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "steps_per_s": {m: [round(x, 3) for x in v] for m, v in rates.items()},
        "median_steps_per_s": {m: round(v, 3) for m, v in med.items()},
        **{f"ratio_{m}": round(med[m] / med["main"], 3) for m in modes if m != "main" and "main" in med},
        # each repeat's mode against the main-thread run of the same repeat (robust to the load drifting)
        **{f"paired_ratio_{m}": round(statistics.median(a / b for a, b in zip(rates[m], rates["main"])), 3)
           for m in modes if m != "main" and "main" in rates},
        "target_ratio": 0.9, "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=1))
    viewer.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run") and not os.environ.get("_BENCH_XVFB"):
        os.environ["_BENCH_XVFB"] = "1"  # a shown viewer needs an X server: rerun under Xvfb
        os.execvp("xvfb-run", ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv])
    main()
