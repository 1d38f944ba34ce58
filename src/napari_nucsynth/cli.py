"""The ``nucsynth`` command: the plugin's operations, headless.

    nucsynth sample-masks --points P.csv --shape H W --out L.tif [--prior LABELS.png] [--seed N]
    nucsynth random-points --like LABELS.png --out P.csv [--process poisson|hardcore|cluster] [--seed N]
    nucsynth render --labels L --style S [--style-labels SL] [--method classic|adain|sian] [--checkpoint C]
                    [--seed N] --out OUT.png
    nucsynth evaluate --truth T --pred P [--json]
    nucsynth segment --image I [--method M] [--checkpoint C] [--tta] [--device D] --out L.tif
    nucsynth train --model hovernet|maskrcnn|adain|sian --images DIR --labels DIR --steps N --out CKPT [--resume CKPT]
                   [--device D] [--seed N]
    nucsynth napari            open napari with the plugin's sample data and the Points to masks widget
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _sample_masks(args) -> int:
    from .io import read_labels, read_points_csv, write_labels
    from .masks import ShapePrior, sample_masks

    points, classes = read_points_csv(args.points)
    prior = None
    if args.prior:
        prior = ShapePrior.fit(read_labels(args.prior), seed=args.seed if args.seed is not None else 0)
    labels = sample_masks(points, tuple(args.shape), classes=classes, prior=prior, seed=args.seed)
    out = write_labels(args.out, labels)
    n = int(len(set(labels[labels > 0].tolist()))) if labels.any() else 0
    print(f"wrote {out} ({labels.shape[0]} x {labels.shape[1]}, {n} nuclei from {len(points)} points)")
    return 0


def _random_points(args) -> int:
    from .io import read_labels, write_points_csv
    from .points import fit_point_process, random_points

    like = read_labels(args.like)
    params = fit_point_process(like)
    shape = tuple(args.shape) if args.shape else like.shape
    pts = random_points(shape, process=args.process, params=params, seed=args.seed)
    out = write_points_csv(args.out, pts)
    print(f"wrote {out} ({len(pts)} points, {args.process} process fitted to {Path(args.like).name})")
    return 0


def _render(args) -> int:
    import imageio.v3 as iio

    from .io import read_image, read_labels
    from .render import render

    labels = read_labels(args.labels)
    style = read_image(args.style)
    style_labels = read_labels(args.style_labels) if args.style_labels else None
    out = render(labels, style, method=args.method, style_labels=style_labels, seed=args.seed, device=args.device,
                 checkpoint=args.checkpoint)
    path = Path(args.out)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    iio.imwrite(tmp, out)
    tmp.replace(path)
    print(f"wrote {path} ({out.shape[0]} x {out.shape[1]}, method {args.method})")
    return 0


def _segment(args) -> int:
    from .io import read_image, write_labels
    from .segment import segment

    image, out = Path(args.image), Path(args.out)
    if not image.is_file():
        raise ValueError(f"image file not found: {image}")
    if out.suffix.lower() not in _LABEL_SUFFIXES:
        raise ValueError(f"unsupported label file {out.name}: use one of {', '.join(_LABEL_SUFFIXES)}")
    try:
        img = read_image(image)
    except Exception as e:  # noqa: BLE001 - imageio raises OSError, struct.error, ... for files that are not images
        raise ValueError(f"cannot read {image} as an image: {e}") from None
    labels = segment(img, method=args.method, checkpoint=args.checkpoint, device=args.device, tta=args.tta)
    write_labels(out, labels)
    print(f"wrote {out} ({labels.shape[0]} x {labels.shape[1]}, {int(labels.max())} nuclei, method {args.method}"
          + (", tta" if args.tta else "") + ")")
    return 0


def _train(args) -> int:
    from .train import train

    out = Path(args.out)
    if out.suffix != ".pt":
        raise ValueError(f"the checkpoint file must end in .pt, got {out.name}")
    last = [0.0]

    def progress(step: int, steps: int, msg: str) -> None:
        import time

        now = time.monotonic()
        if now - last[0] >= 10 or step == steps:  # a line every 10 s
            last[0] = now
            print(msg, flush=True)

    res = train(args.model, args.images, args.labels, steps=args.steps, out=out, resume=args.resume,
                device=args.device, seed=args.seed, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                val_fraction=args.val_fraction, progress=progress)
    val = ", ".join(f"{k} {v:.3f}" for k, v in res.metrics.items()
                    if k != "val_step" and isinstance(v, (int, float)))
    print(f"wrote {res.path} (step {res.step}{', stopped' if res.stopped else ''}"
          + (f"; validation {val}" if val else "") + f"; {res.seconds:.0f} s)")
    return 0


_LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


def _label_files(path: Path) -> dict[str, Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _LABEL_SUFFIXES and not p.name.startswith("."))
        stems: dict[str, Path] = {}
        for f in files:
            if f.stem in stems:
                raise ValueError(f"two label files share the stem {f.stem!r} in {path}: {stems[f.stem].name}, {f.name}")
            stems[f.stem] = f
        return stems
    if path.is_file():
        return {path.stem: path}
    raise ValueError(f"not found: {path}")


def _evaluate(args) -> int:
    import json

    from .io import read_labels
    from .metrics import METRICS, evaluate

    truth, pred = _label_files(Path(args.truth)), _label_files(Path(args.pred))
    if len(truth) == 1 and len(pred) == 1 and not Path(args.truth).is_dir():
        pairs = [(next(iter(truth)), next(iter(truth.values())), next(iter(pred.values())))]
    else:
        common = sorted(set(truth) & set(pred))
        missing = sorted(set(truth) - set(pred))
        if not common:
            raise ValueError(f"no file stems in common between {args.truth} and {args.pred}")
        if missing:
            print(f"warning: no prediction for {len(missing)} ground-truth file(s): {', '.join(missing[:5])}"
                  + (" ..." if len(missing) > 5 else ""), file=sys.stderr)
        pairs = [(s, truth[s], pred[s]) for s in common]
    names = [p[0] for p in pairs]
    ev = evaluate((read_labels(t) for _, t, _ in pairs), (read_labels(p) for _, _, p in pairs), names)
    if args.json:
        out = {k: ev.mean[k] for k in METRICS}
        out["n_images"] = len(ev.per_image)
        out["pooled"] = ev.pooled
        out["per_image"] = [{"image": n, **d} for n, d in zip(ev.names, ev.per_image)]
        print(json.dumps(out, indent=1))
    else:
        print(ev.table())
    return 0


def _napari(args) -> int:
    import napari

    viewer = napari.Viewer(title="napari-nucsynth")
    if not args.no_sample:
        viewer.open_sample("napari-nucsynth", "monuseg")
    viewer.window.add_plugin_dock_widget("napari-nucsynth", "Points to masks")
    if args.screenshot:
        import time

        from qtpy.QtWidgets import QApplication

        viewer.window._qt_window.resize(1400, 850)
        for _ in range(3):  # let the window settle, then fit the view to it
            t0 = time.time()
            while time.time() - t0 < 0.5:
                QApplication.processEvents()
            viewer.reset_view()
        viewer.screenshot(args.screenshot, canvas_only=False, flash=False)
        viewer.close()
        return 0
    napari.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nucsynth", description="Nuclei masks and synthetic H&E from points.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-masks", help="sample one nucleus mask per point")
    p.add_argument("--points", required=True, help="napari points CSV (index,axis-0,axis-1[,class])")
    p.add_argument("--shape", required=True, type=int, nargs=2, metavar=("H", "W"), help="output height and width")
    p.add_argument("--out", required=True, help="labels file: .tif (uint32), .png (16-bit) or .npy")
    p.add_argument("--prior", help="a real label map to fit the shape prior from (default: the MoNuSeg prior)")
    p.add_argument("--seed", type=int, default=None, help="random seed (the same seed gives the same masks)")
    p.set_defaults(func=_sample_masks)

    p = sub.add_parser("random-points", help="a random nucleus layout fitted to a real label map")
    p.add_argument("--like", required=True, help="a real instance label map to fit the point process to")
    p.add_argument("--out", required=True, help="napari points CSV to write")
    p.add_argument("--process", choices=("poisson", "hardcore", "cluster"), default="cluster")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"), help="layout size (default: that of --like)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_random_points)

    from .render import renderers

    p = sub.add_parser("render", help="a synthetic H&E image of instance masks in the style of a reference tile")
    p.add_argument("--labels", required=True, help="instance label map (.tif, .png, .npy)")
    p.add_argument("--style", required=True, help="a real H&E tile (RGB image) whose style to take")
    p.add_argument("--style-labels", help="the style tile's instance labels (default: its nuclei are detected)")
    p.add_argument("--method", default="classic", choices=renderers())
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", help="trained model of a learned renderer (default: the shipped one, if any)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (learned renderers)")
    p.add_argument("--out", required=True, help="output image (.png)")
    p.set_defaults(func=_render)

    p = sub.add_parser("evaluate", help="instance metrics (AJI, AJI+, Dice, Dice 2, DQ/SQ/PQ, F1) of predictions")
    p.add_argument("--truth", required=True, help="ground-truth label file, or a folder of them")
    p.add_argument("--pred", required=True, help="predicted label file, or a folder matched by file name stem")
    p.add_argument("--json", action="store_true", help="print one JSON object (mean over images, pooled, per image)")
    p.set_defaults(func=_evaluate)

    from .segment import segmenters

    p = sub.add_parser("segment", help="nucleus instance labels of an H&E image")
    p.add_argument("--image", required=True, help="an H&E image (RGB; grey, RGBA, 16-bit and float are converted)")
    p.add_argument("--method", default="watershed", choices=segmenters())
    p.add_argument("--checkpoint", help="model checkpoint for the methods that run one (default: the shipped one)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (8 flips/rotations, merged)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (network methods)")
    p.add_argument("--out", required=True, help="labels file: .tif (uint32), .png (16-bit) or .npy")
    p.set_defaults(func=_segment)

    p = sub.add_parser("train", help="train a segmenter (hovernet, maskrcnn) or generator (adain, sian) on pairs")
    p.add_argument("--model", required=True, help="the model kind: hovernet, maskrcnn, adain or sian")
    p.add_argument("--images", required=True, help="folder of H&E images")
    p.add_argument("--labels", required=True, help="folder of instance label maps (same file names as the images)")
    p.add_argument("--steps", type=int, required=True, help="total optimisation steps")
    p.add_argument("--out", required=True, help="the checkpoint to write (.pt), saved every 200 steps")
    p.add_argument("--resume", help="continue a stopped run from this checkpoint")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=256, help="training crop size (px)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the model's own)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the images held out for validation")
    p.set_defaults(func=_train)

    p = sub.add_parser("napari", help="open napari with the sample data and the Points to masks widget")
    p.add_argument("--no-sample", action="store_true", help="do not open the sample data")
    p.add_argument("--screenshot", help=argparse.SUPPRESS)
    p.set_defaults(func=_napari)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"nucsynth {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
