"""The ``nucsynth`` command: the plugin's operations, headless.

    nucsynth sample-masks --points P.csv --shape H W --out L.tif [--prior LABELS.png | --prior-image I.png] [--seed N]
    nucsynth sample-masks --points P.csv --image I.png --out L.tif [--method auto|hovernet|watershed] [--seed N]
    nucsynth random-points --like LABELS.png --out P.csv [--process poisson|hardcore|cluster] [--seed N]
    nucsynth render --labels L --style S [--style-labels SL] [--method classic|adain|sian] [--checkpoint C]
                    [--seed N] [--options JSON] --out OUT.png
    nucsynth evaluate --truth T --pred P [--json]
    nucsynth segment --image I [--method M] [--checkpoint C] [--tta [flips|modality|modality-drit]] [--tta-reference IMG ...]
                     [--device D] --out L.tif
    nucsynth train --model hovernet|maskrcnn|adain|sian --images DIR --labels DIR --steps N --out CKPT [--resume CKPT]
                   [--init CKPT|default] [--config JSON] [--device D] [--seed N] [--batch-size N] [--crop PX]
                   [--augment basic|strong|modality|modality-drit] [--save-every N]
    nucsynth train --model points2image --images DIR --steps N --out CKPT [...]    unpaired: images alone, no --labels
    nucsynth train --model joint --generator adain|sian --segmenter hovernet|maskrcnn [--adversarial reverse|acgan]
                   [--generator-checkpoint CKPT] [--segmenter-checkpoint CKPT] [--segmenter-lr LR]
                   [--pretrain-steps G S] --images DIR --labels DIR --steps N --out CKPT [--resume CKPT]
    torchrun --nproc_per_node=N -m napari_nucsynth.cli train ...      the same, data-parallel (docs/distributed.md)
    nucsynth average CKPT CKPT [CKPT ...] --out CKPT [--images DIR --labels DIR] [--bn-batches N] [--seed N]
                     a "model soup": the uniform mean of runs fine-tuned from the same weights
    nucsynth generate --n N --styles DIR --out DATASET [--points-from DIR] [--random-points] [--no-transforms]
                      [--method M] [--checkpoint C] [--size H W] [--format hovernet|coco|cellpose|stardist|png]
                      [--seed N] [--workers K|auto] [--domains K] [--resume]
    nucsynth regenerate DATASET ID [--out FILE_PREFIX]   make one pair again and compare it with the stored one
    nucsynth napari            open napari with the plugin's sample data and the Points to masks widget

``nucsynth train`` shows a progress bar (step, loss, it/s, ETA) on a terminal and a line every 10 s otherwise (logs).
Ctrl-C or SIGTERM stops after the current step, saves the checkpoint and prints how to resume (exit status 130 or
143); a second Ctrl-C aborts at once (the last saved checkpoint stays intact). ``--resume`` continues with the
same step count, optimiser and random state.

``nucsynth generate`` shows a progress bar on a terminal (a line every 5 s otherwise); an interrupted run (Ctrl-C,
``kill -9``) continues with the same command plus ``--resume`` (docs/generate.md). It reads every style tile before
it writes anything, and refuses to start when one cannot be read.

Errors, for every command: a file that cannot be read (missing, truncated, not what it should be), an output whose
extension its writer does not know, a size that cannot fit in memory, a setting that makes no sense: one line on
stderr, ``nucsynth <command>: error: <what is wrong, naming the file>``, and exit status 2, before any output is
written where that can be known in advance. ``NUCSYNTH_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


#: Bytes of memory a pixel costs at peak, measured: ``sample-masks`` (the uint32 map, its copy on the way to the
#: writer and the writer's) and ``generate`` (per rendering process, for one pair: image, labels, masks, the
#: renderer's float maps).
_BYTES_PER_PIXEL = {"sample-masks": 12, "generate": 150}


def _check_memory(option: str, shape, command: str, processes: int = 1) -> None:
    """Refuse an output size that cannot fit in the memory available now, before the work starts (numpy's
    ``MemoryError`` comes late, and on Linux an allocation that succeeds may still end with the process killed)."""
    h, w = (int(v) for v in shape)
    if h <= 0 or w <= 0:
        return  # the operation's own check says what is wrong
    need = h * w * _BYTES_PER_PIXEL[command] * processes
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except Exception:  # noqa: BLE001 - no way to know: MemoryError, if it comes, is reported by main()
        return
    if need > avail:
        gib = 2**30
        raise ValueError(f"{option} {h} {w}: {h} x {w} pixels need about {need / gib:,.1f} GiB of memory"
                         f"{f' ({processes} processes)' if processes > 1 else ''} and {avail / gib:,.1f} GiB are "
                         "available; ask for a smaller size")


#: ``sample-masks`` methods that sample masks without an image (the others fit them to ``--image``)
SAMPLE_METHODS = ("prior", "daff")


def _sample_masks(args) -> int:
    from .io import check_output, read_image, read_labels, read_points_csv, write_labels
    from .masks import ShapePrior, sample_masks

    out = check_output(args.out, "labels", name="--out")
    if args.image is not None:
        return _fit_masks(args, out)
    if args.method not in (None, *SAMPLE_METHODS):
        raise ValueError(f"--method {args.method}: fits masks to an image; give --image too")
    if args.checkpoint is not None and args.method != "daff":
        raise ValueError("--checkpoint: for --method daff (or a learned fit with --image)")
    if args.shape is None:
        raise ValueError("--shape H W is needed to sample masks (or --image I.png to fit them to an image)")
    if args.prior and args.prior_image:
        raise ValueError("--prior and --prior-image are two shape priors; give one of them")
    _check_memory("--shape", args.shape, "sample-masks")
    points, classes = read_points_csv(args.points)
    prior = None
    if args.prior:
        prior = ShapePrior.fit(read_labels(args.prior), seed=args.seed if args.seed is not None else 0)
    elif args.prior_image:
        try:
            prior = ShapePrior.from_image(read_image(args.prior_image), device=args.device,
                                          seed=args.seed if args.seed is not None else 0)
        except ValueError as e:
            raise ValueError(f"--prior-image {args.prior_image}: {e}") from None
    learned = {} if args.method in (None, "prior") else {"method": args.method, "checkpoint": args.checkpoint,
                                                          "device": args.device}
    labels = sample_masks(points, tuple(args.shape), classes=classes, prior=prior, seed=args.seed, **learned)
    out = write_labels(out, labels)
    n = len(set(labels[labels > 0].tolist())) if labels.any() else 0
    print(f"wrote {out} ({labels.shape[0]} x {labels.shape[1]}, {n} nuclei from {len(points)} points"
          + (f", prior from {Path(args.prior_image).name}" if args.prior_image else "") + ")")
    return 0


def _fit_masks(args, out: Path) -> int:
    """``sample-masks --image``: the masks of the nuclei under the points of a real image (issue 18)."""
    from .annotate import fit_masks
    from .io import read_image, read_points_csv, write_labels

    if args.method in SAMPLE_METHODS:
        raise ValueError(f"--method {args.method}: samples masks without an image; drop --image, or fit with "
                         "auto, hovernet, watershed or nuclick")
    for option, value in (("--shape", args.shape), ("--prior", args.prior), ("--prior-image", args.prior_image)):
        if value is not None:
            raise ValueError(f"{option}: --image fits the masks to the image (its size, its nuclei); "
                             f"{option} is for sampling masks without one")
    points, classes = read_points_csv(args.points)
    img = read_image(args.image)
    _check_memory("--image", img.shape[:2], "sample-masks")
    res = fit_masks(img, points, method=args.method or "auto", classes=classes, checkpoint=args.checkpoint,
                    device=args.device, seed=args.seed, return_result=True)
    out = write_labels(out, res.labels)
    h, w = res.labels.shape
    print(f"wrote {out} ({h} x {w}, {len(points)} points on {Path(args.image).name}): {res.summary()}")
    return 0


def _random_points(args) -> int:
    from .io import check_output, read_labels, write_points_csv
    from .points import fit_point_process, random_points

    check_output(args.out, "points", name="--out")
    like = read_labels(args.like)
    params = fit_point_process(like)
    shape = tuple(args.shape) if args.shape else like.shape
    pts = random_points(shape, process=args.process, params=params, seed=args.seed)
    out = write_points_csv(args.out, pts)
    print(f"wrote {out} ({len(pts)} points, {args.process} process fitted to {Path(args.like).name})")
    return 0


def _render(args) -> int:
    from .io import check_output, read_image, read_labels, write_image
    from .render import render

    path = check_output(args.out, "image", name="--out")
    labels = read_labels(args.labels)
    style = read_image(args.style)
    style_labels = read_labels(args.style_labels) if args.style_labels else None
    out = render(labels, style, method=args.method, style_labels=style_labels, seed=args.seed, device=args.device,
                 checkpoint=args.checkpoint, options=_json_config(args.options, "--options"))
    write_image(path, out)
    print(f"wrote {path} ({out.shape[0]} x {out.shape[1]}, method {args.method})")
    return 0


def _segment(args) -> int:
    from .io import check_output, read_image, write_labels
    from .segment import MODALITY_TTA, get_segmenter, modality_tta_methods, segment

    out = check_output(args.out, "labels", name="--out")
    if args.checkpoint is not None and not getattr(get_segmenter(args.method), "needs_checkpoint", True):
        raise ValueError(f"--checkpoint {args.checkpoint}: the {args.method} method runs no trained model; "
                         f"use a --method that does ({', '.join(_model_segmenters())})")
    refs = args.tta_reference or None
    modality = args.tta in MODALITY_TTA
    if refs is not None and not modality:
        raise ValueError("--tta-reference: the references are the stain modalities of --tta modality (or "
                         "modality-drit)")
    if modality:
        if args.method not in modality_tta_methods():
            raise ValueError(f"--tta {args.tta} averages dense network maps over restained copies; the {args.method} "
                             f"method has none: use --method {' or '.join(modality_tta_methods())}, or --tta flips")
        if refs is None and args.tta == "modality":
            raise ValueError("--tta modality needs --tta-reference IMAGE (repeat it for several): tiles of the stain "
                             "modalities to restain to, e.g. one per stain domain of the model's training data "
                             "(--tta modality-drit needs none: it uses the drit model's stain domains)")
        refs = None if refs is None else [read_image(r) for r in refs]
    img = read_image(args.image)
    labels = segment(img, method=args.method, checkpoint=args.checkpoint, device=args.device, tta=args.tta or False,
                     tta_references=refs)
    write_labels(out, labels)
    print(f"wrote {out} ({labels.shape[0]} x {labels.shape[1]}, {int(labels.max())} nuclei, method {args.method}"
          + (f", tta {args.tta}" if args.tta else "") + ")")
    return 0


def _model_segmenters() -> list[str]:
    from .segment import get_segmenter, segmenters

    return [m for m in segmenters() if getattr(get_segmenter(m), "needs_checkpoint", True)]


def _average(args) -> int:
    from .train import average_checkpoints

    out = Path(args.out)
    if out.suffix != ".pt":
        raise ValueError(f"the checkpoint file must end in .pt, got {out.name}")
    if (args.images is None) != (args.labels is None):
        raise ValueError("--images and --labels go together (the pairs over which BatchNorm statistics are "
                         "re-estimated)")
    for c in args.checkpoints:
        if not Path(c).is_file():
            raise ValueError(f"checkpoint not found: {c}")
    path = average_checkpoints(args.checkpoints, out, images=args.images, labels=args.labels,
                               bn_batches=args.bn_batches, seed=args.seed, device=args.device,
                               train_data={"command": " ".join(["nucsynth", *args.argv])})
    how = (f"BatchNorm statistics re-estimated on {args.bn_batches} batches" if args.images
           else "averaged statistics kept (no --images)")
    print(f"wrote {path} (mean of {len(args.checkpoints)} checkpoints; {how})")
    return 0


def _json_config(text: str | None, flag: str = "--config") -> dict | None:
    """``--config`` (or ``flag``): a JSON object, or the path of a file that holds one."""
    import json

    if text is None:
        return None
    src = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"{flag} must be a JSON object or a JSON file; {text!r} is neither")
        src = path.read_text()
    try:
        cfg = json.loads(src)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(  # noqa: TRY004 - the command reports ValueErrors as messages
            f"{flag} must be a JSON object ({{\"key\": value, ...}}), got {type(cfg).__name__}")
    return cfg


class _StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop: it finishes the step, saves and returns. A second
    SIGINT raises ``KeyboardInterrupt`` at once. Used as ``should_stop``; handlers are installed for the ``with``
    block (in the main thread only) and restored after it."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._old: dict = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self.announce:  # os.write: safe in a handler (print may be in the middle of writing)
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving the checkpoint"
                        f"{' (Ctrl-C again to abort at once)' if signum == signal.SIGINT else ''}\n".encode())

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, Ctrl-C behaves as usual
                break
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _terminal_width() -> int:
    """Columns of the terminal on stdout; 0 when stdout is not a terminal (a log file, a pipe) or has no size."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 0
    except (OSError, ValueError, AttributeError):
        return 0


class _TrainReport:
    """The ``on_update`` of ``nucsynth train``: a tqdm bar (step/steps, loss, it/s, ETA) when stdout is a terminal
    and tqdm is installed, else a line every ``every`` seconds and at the last step (readable in logs)."""

    def __init__(self, every: float = 10.0, bar: bool | None = None) -> None:
        self.every = every
        self.bar = None
        self._want_bar = _terminal_width() > 0 if bar is None else bar
        self._first: tuple[int, float] | None = None  # (step, time) of the first step of this session
        self._last = 0.0

    def _rate(self, step: int) -> float | None:
        if self._first is None or step <= self._first[0]:
            return None
        dt = time.monotonic() - self._first[1]
        return (step - self._first[0]) / dt if dt > 0 else None

    def __call__(self, e) -> None:
        if e.kind == "step":
            loss = e.losses.get("loss")
            if self._first is None:
                self._first = (e.step, time.monotonic())
                if self._want_bar:
                    try:
                        from tqdm import tqdm
                    except ImportError:
                        self._want_bar = False
                    else:  # it/s and ETA from this session's steps (a resumed run starts at its step)
                        self.bar = tqdm(total=e.steps, initial=e.step - 1, unit="step", dynamic_ncols=True,
                                        file=sys.stdout, smoothing=0.1)
            if self.bar is not None:
                if loss is not None:
                    self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
                self.bar.update(e.step - self.bar.n)
                return
            now = time.monotonic()
            if now - self._last >= self.every or e.step == e.steps:
                self._last = now
                rate = self._rate(e.step)
                msg = f"step {e.step}/{e.steps}"
                if loss is not None:
                    msg += f", loss {loss:.4f}"
                if rate:
                    msg += f", {rate:.2f} it/s, ETA {_duration((e.steps - e.step) / rate)}"
                print(msg, flush=True)
        elif e.kind == "validation":
            val = ", ".join(f"{k} {v:.3f}" for k, v in e.metrics.items()
                            if k != "val_step" and isinstance(v, (int, float)))
            self.write(f"step {e.step}: validation {val}")

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _resume_command(argv: list[str], out: Path) -> str:
    """The command that continues this run: the same arguments with ``--resume OUT``."""
    import shlex

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    world = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    prefix = (["torchrun", f"--nproc_per_node={world}", "-m", "napari_nucsynth.cli"]
              if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ["nucsynth"])
    return shlex.join([*prefix, *args, "--resume", str(out)])


def _train(args) -> int:
    from .train.distributed import world_from_env

    out = Path(args.out)
    if out.suffix != ".pt":
        raise ValueError(f"the checkpoint file must end in .pt, got {out.name}")
    if args.steps < 1:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    config = _json_config(args.config)
    _check_labels_option(args)
    world, rank, _ = world_from_env()
    main = rank == 0  # under torchrun, rank 0 alone reports
    report = _TrainReport()
    kw = {"steps": args.steps, "out": out, "resume": args.resume, "device": args.device, "seed": args.seed,
          "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr, "save_every": args.save_every,
          "on_update": report if main else None}
    with _StopOnSignal(announce=main) as stop:
        try:
            if args.model == "joint":
                if args.augment not in (None, "basic"):
                    raise ValueError("--augment: the joint loop trains with the basic augmentation only")
                res = _train_joint(args, config, world, stop, kw)
            else:
                joint_only = [o for o, v in (("--generator", args.generator), ("--segmenter", args.segmenter),
                                             ("--generator-checkpoint", args.generator_checkpoint),
                                             ("--segmenter-checkpoint", args.segmenter_checkpoint),
                                             ("--segmenter-lr", args.segmenter_lr),
                                             ("--pretrain-steps", args.pretrain_steps)) if v is not None]
                if joint_only:
                    raise ValueError(f"{', '.join(joint_only)}: for --model joint only")
                from .train import train

                mix = {}
                if args.synthetic:
                    from .render import renderers

                    if args.synthetic_renderer not in renderers():
                        raise ValueError(f"--synthetic-renderer: unknown renderer {args.synthetic_renderer!r}; "
                                         f"choose from {', '.join(renderers())}")
                    mix = {"synthetic": args.synthetic, "synthetic_size": args.synthetic_size,
                           "synthetic_renderer": args.synthetic_renderer,
                           "progress": (lambda i, n, msg: print(msg, file=sys.stderr, flush=True)) if main else None}
                res = train(args.model, args.images, args.labels, config=config, val_fraction=args.val_fraction,
                            init=_init_checkpoint(args.model, args.init), augment=args.augment, should_stop=stop,
                            **mix, **kw)
        except KeyboardInterrupt:
            report.close()
            if main:
                saved = f"the last checkpoint saved is {out}" if out.is_file() else "no checkpoint was saved"
                print(f"\nnucsynth train: aborted; {saved}", file=sys.stderr)
            return 130
        finally:
            report.close()
    code = 128 + stop.signum if stop.signum else 0  # 130 (SIGINT) or 143 (SIGTERM): stopped, but saved
    if not main:
        return code
    val = ", ".join(f"{k} {v:.3f}" for k, v in res.metrics.items()
                    if k != "val_step" and isinstance(v, (int, float)))
    print(f"wrote {res.path} (step {res.step}{', stopped' if res.stopped else ''}"
          + (f"; validation {val}" if val else "") + f"; {res.seconds:.0f} s)", flush=True)
    if res.stopped and res.step < args.steps:
        print(f"stopped at step {res.step} of {args.steps}; to continue:\n  {_resume_command(args.argv, res.path)}",
              flush=True)
    return code


def _check_labels_option(args) -> None:
    """``--labels`` is required, except for the kinds that train unpaired on images alone (points2image), which
    refuse it."""
    from .models import get_model, model_kinds

    unpaired = args.model != "joint" and getattr(get_model(args.model), "unpaired", False)
    if unpaired and args.labels is not None:
        raise ValueError(f"--labels: {args.model} trains unpaired, on --images alone (its masks come from the mask "
                         "sampler); leave --labels out")
    if not unpaired and args.labels is None:
        alone = [k for k in model_kinds() if getattr(get_model(k), "unpaired", False)]
        raise ValueError(f"--labels is required for --model {args.model} (it trains on pairs of images and "
                         "instance labels: a folder of label maps with the images' file names)"
                         + (f"; only {', '.join(alone)} trains on --images alone" if alone else ""))


def _init_checkpoint(kind: str, init: str | None) -> Path | None:
    """``--init``: a checkpoint file, or ``default`` for the kind's shipped model."""
    if init is None:
        return None
    if init != "default":
        path = Path(init)
        if not path.is_file():
            raise ValueError(f"--init: checkpoint not found: {path}")
        return path
    from .train import shipped_checkpoint

    shipped = shipped_checkpoint(kind)
    if shipped is None:
        raise ValueError(f"--init default: {kind} ships no trained model; give a checkpoint file")
    return shipped


def _train_joint(args, config, world, stop, kw):
    """``--model joint``: :func:`napari_nucsynth.train.joint.train_joint` (Gong et al.'s G-D-S loop)."""
    if args.synthetic:
        raise ValueError("--synthetic: for a segmenter's training; the joint loop makes its own synthetic pairs")
    if not args.generator or not args.segmenter:
        raise ValueError("--model joint needs --generator (adain or sian) and --segmenter (hovernet or maskrcnn)")
    if args.init is not None:
        raise ValueError("--init is for one model; --model joint takes --generator-checkpoint and "
                         "--segmenter-checkpoint")
    if world > 1:
        raise ValueError("--model joint trains in one process; launch it without torchrun")
    try:
        from .train.joint import train_joint
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.train.joint":
            raise
        raise ValueError("--model joint needs napari_nucsynth.train.joint, which this installation lacks; "
                         "update napari-nucsynth") from None
    extra = {}
    if config:  # {"generator": {...}, "segmenter": {...}}: the networks' configurations
        unknown = set(config) - {"generator", "segmenter"}
        if unknown:
            raise ValueError("--config of --model joint takes the keys 'generator' and 'segmenter', not "
                             + ", ".join(sorted(unknown)))
        extra = {f"{k}_config": v for k, v in config.items()}
    for opt, kind in (("generator_checkpoint", args.generator), ("segmenter_checkpoint", args.segmenter)):
        extra[opt] = _init_checkpoint(kind, getattr(args, opt))
    return train_joint(args.generator, args.segmenter, args.images, args.labels, adversarial=args.adversarial,
                       segmenter_lr=args.segmenter_lr, pretrain_steps=args.pretrain_steps, should_stop=stop,
                       **extra, **kw)


def _label_files(path: Path) -> dict[str, Path]:
    from .io import EXTENSIONS

    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in EXTENSIONS["labels"] and not p.name.startswith("."))
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


class _GenerateReport:
    """``progress`` of ``nucsynth generate``: tqdm on a terminal, else a line every ``every`` seconds and at the end."""

    def __init__(self, every: float = 5.0) -> None:
        self.every, self.bar, self._last, self._t0, self._first = every, None, 0.0, time.monotonic(), None
        self._want_bar = _terminal_width() > 0

    def __call__(self, done: int, total: int, what: str) -> None:
        if self._first is None:
            self._first = done - 1
            if self._want_bar:
                try:
                    from tqdm import tqdm
                except ImportError:
                    self._want_bar = False
                else:
                    self.bar = tqdm(total=total, initial=done - 1, unit="pair", dynamic_ncols=True, file=sys.stdout)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if now - self._last >= self.every or done == total:
            self._last = now
            rate = (done - self._first) / max(now - self._t0, 1e-9)
            eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 and done < total else ""
            print(f"{done}/{total} pairs, {rate:.2f} pairs/s{eta}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _check_styles(styles: Path) -> None:
    """Every image file of the style folder can be read: a bad tile is named before anything is written (rather than
    failing the run when a pair first draws it)."""
    from .io import EXTENSIONS, verify_image

    if not styles.is_dir():
        return  # generate() says what --styles must be
    tiles = sorted(p for p in styles.iterdir()
                   if p.is_file() and p.suffix.lower() in EXTENSIONS["image"] and not p.name.startswith("."))
    bad = []
    for p in tiles:
        try:
            verify_image(p)
        except ValueError as e:
            bad.append(str(e))
    if bad:
        raise ValueError(f"--styles {styles}: {len(bad)} of {len(tiles)} tiles cannot be read, so nothing was "
                         f"written (remove or replace them): {'; '.join(bad)}")


def _workers(text: str):
    """``--workers``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return k


def _generate(args) -> int:
    from .generate import _AUTO_MAX_WORKERS, _cpu_count, generate, tune_malloc

    tune_malloc()  # this process is the command's own

    most = min(_cpu_count(), _AUTO_MAX_WORKERS) if args.workers == "auto" else args.workers
    _check_memory("--size", args.size, "generate", processes=max(1, most))
    _check_styles(Path(args.styles))
    if args.checkpoint is not None and Path(args.checkpoint).is_file():
        from .models import load_checkpoint

        load_checkpoint(args.checkpoint)  # a file that is no checkpoint is refused before anything is written
    report = _GenerateReport()
    global _EXIT_AT_ONCE
    _EXIT_AT_ONCE = True  # whatever happens below, the dataset ends closed and nothing is left to finalize (run())
    with _StopOnSignal(announce=False) as stop:
        try:
            m = generate(args.n, args.styles, args.out, points_from=args.points_from, random_points=args.random_points,
                         library_transforms=not args.no_transforms, method=args.method, checkpoint=args.checkpoint,
                         size=tuple(args.size), fmt=args.format, seed=args.seed, workers=args.workers,
                         domains=args.domains, resume=args.resume, device=args.device, progress=report,
                         should_stop=stop)
        except FileExistsError as e:
            raise ValueError(str(e)) from None
        finally:
            report.close()
    n_done = len(m["pairs"])
    print(f"wrote {args.out} ({n_done} of {args.n} pairs, format {args.format}"
          + ("" if m["complete"] else ", incomplete") + ")", flush=True)
    if not m["complete"]:
        print("to continue: the same command with --resume", flush=True)
        return 128 + stop.signum if stop.signum else 1
    return 0


def _regenerate(args) -> int:
    import numpy as np

    from .generate import read_pair, regenerate

    image, labels = regenerate(args.dataset, args.id, out=args.out, device="cpu")
    simg, slab = read_pair(args.dataset, args.id)
    same = np.array_equal(image, simg) and np.array_equal(labels, slab)
    where = f"; wrote {args.out}_image.png and {args.out}_labels.tif" if args.out else ""
    print(f"{args.id}: {'identical to' if same else 'DIFFERS from'} the stored pair{where}")
    return 0 if same else 1


def _napari(args) -> int:
    from ._widgets._launch import launch_viewer

    return launch_viewer(sample=not args.no_sample, screenshot=args.screenshot)


def build_parser() -> argparse.ArgumentParser:
    from .train import AUGMENTATIONS  # numpy only: torch stays out of --help

    ap = argparse.ArgumentParser(prog="nucsynth", description="Nuclei masks and synthetic H&E from points.")
    sub = ap.add_subparsers(dest="command", required=True)

    from .annotate import fit_methods

    p = sub.add_parser("sample-masks", help="one nucleus mask per point: sampled, or fitted to a real image")
    p.add_argument("--points", required=True, help="napari points CSV (index,axis-0,axis-1[,class])")
    p.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                   help="output height and width (sampling; with --image the image's size)")
    p.add_argument("--image", help="a real H&E image: fit each point's mask to the nucleus under it")
    p.add_argument("--method", choices=["auto", *fit_methods(), *SAMPLE_METHODS], default=None,
                   help="with --image, how its nuclei are found (default auto: hovernet where its model is "
                   "present); without, how masks are sampled: prior (default) or daff (the learned sampler)")
    p.add_argument("--checkpoint", help="the model of a learned --method (nuclick, daff; default: the shipped one)")
    p.add_argument("--out", required=True, help="labels file: .tif (uint32), .png (16-bit) or .npy")
    p.add_argument("--prior", help="a real label map to fit the shape prior from (default: the MoNuSeg prior)")
    p.add_argument("--prior-image", help="a real H&E image to fit the shape prior to (its nuclei, segmented)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (--image, --prior-image)")
    p.add_argument("--seed", type=int, default=None, help="random seed (the same seed gives the same masks)")
    p.set_defaults(func=_sample_masks)

    p = sub.add_parser("random-points", help="a random nucleus layout fitted to a real label map")
    p.add_argument("--like", required=True, help="a real instance label map to fit the point process to")
    p.add_argument("--out", required=True, help="napari points CSV to write (.csv)")
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
    p.add_argument("--options", help='the method\'s own keywords as JSON, e.g. \'{"strength": 0.5}\' for adain')
    p.add_argument("--out", required=True, help="output image: .png, .tif, .tiff, .jpg, .jpeg or .bmp")
    p.set_defaults(func=_render)

    p = sub.add_parser("evaluate", help="instance metrics (AJI, AJI+, Dice, Dice 2, DQ/SQ/PQ, F1) of predictions")
    p.add_argument("--truth", required=True, help="ground-truth label file, or a folder of them")
    p.add_argument("--pred", required=True, help="predicted label file, or a folder matched by file name stem")
    p.add_argument("--json", action="store_true", help="print one JSON object (mean over images, pooled, per image)")
    p.set_defaults(func=_evaluate)

    from .segment import TTA_MODES, segmenters

    p = sub.add_parser("segment", help="nucleus instance labels of an H&E image")
    p.add_argument("--image", required=True, help="an H&E image (RGB; grey, RGBA, 16-bit and float are converted)")
    p.add_argument("--method", default="watershed", choices=segmenters())
    p.add_argument("--checkpoint", help="model checkpoint for the methods that run one (default: the shipped one)")
    p.add_argument("--tta", nargs="?", const="flips", choices=TTA_MODES, default=None,
                   help="test-time augmentation: flips (the default of a bare --tta: 8 flips/rotations, merged), "
                   "modality (network maps averaged over the image and its copies restained by Macenko's method to "
                   "each --tta-reference; hovernet only) or modality-drit (the copies made by the shipped drit "
                   "model, in each --tta-reference or, without any, in each of its stain domains)")
    p.add_argument("--tta-reference", action="append", metavar="IMAGE",
                   help="--tta modality (required with it) or modality-drit: a reference tile of a stain modality "
                   "to restain to (repeat for several)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (network methods)")
    p.add_argument("--out", required=True, help="labels file: .tif (uint32), .png (16-bit) or .npy")
    p.set_defaults(func=_segment)

    p = sub.add_parser("train", help="train a segmenter (hovernet, maskrcnn) or generator (adain, sian) on pairs, "
                       "or points2image on images alone",
                       description="Train a model on pairs of images and instance labels (points2image: on images "
                       "alone, unpaired). Ctrl-C or SIGTERM stops "
                       "after the current step and saves (a second Ctrl-C aborts); --resume continues. Under "
                       "torchrun it trains data-parallel (docs/distributed.md).")
    p.add_argument("--model", required=True,
                   help="the model kind: hovernet, maskrcnn, nuclick, adain, sian, pix2pixhd, daff, drit, "
                   "points2image (unpaired: images alone), or "
                   "joint (a generator and a segmenter trained together: --generator, --segmenter)")
    p.add_argument("--images", required=True, help="folder of H&E images")
    p.add_argument("--labels", help="folder of instance label maps (same file names as the images); required, "
                   "except for points2image, which trains on --images alone")
    p.add_argument("--steps", type=int, required=True, help="total optimisation steps")
    p.add_argument("--out", required=True, help="the checkpoint to write (.pt), saved every --save-every steps")
    p.add_argument("--resume", help="continue a stopped run from this checkpoint (same step count, optimiser and "
                   "random state; its configuration is used)")
    p.add_argument("--init", help="start from this checkpoint's weights and configuration with a new optimiser and "
                   "schedule (fine-tuning; --config then overrides keys of its configuration, e.g. loss weights); "
                   "'default' = the kind's shipped model")
    p.add_argument("--config", help="model configuration merged into the kind's defaults: a JSON object or a JSON "
                   "file (for --model joint: {\"generator\": {...}, \"segmenter\": {...}})")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=256, help="training crop size (px)")
    p.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                   help="training augmentation: crops, flips, 90-degree rotations and stain jitter; 'strong' adds "
                   "HoVer-Net's scale, blur and colour jitter; 'modality' restains half the crops to another "
                   "training image's stain modality (Macenko; Liu et al.), 'modality-drit' the same by the shipped drit "
                   "model (default: basic; with --resume, the run's own)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the model's own)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the images held out for validation")
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (default: 200)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="segmenters: add N synthetic pairs made from the training pairs alone (layouts, shapes and "
                   "styles; docs/headline.md's recipe B); N equal to the number of training images gives half real, "
                   "half synthetic crops (default: 0, real pairs only)")
    p.add_argument("--synthetic-size", type=int, default=512, help="side of the synthetic pairs in px (default: 512)")
    p.add_argument("--synthetic-renderer", default="classic",
                   help=f"renderer of the synthetic pairs: {', '.join(renderers())} (learned ones use their shipped "
                   "model; default: classic)")
    p.add_argument("--generator", help="--model joint: the generator kind (adain or sian)")
    p.add_argument("--segmenter", help="--model joint: the segmenter kind (hovernet or maskrcnn)")
    p.add_argument("--adversarial", choices=("reverse", "acgan"), default="reverse",
                   help="--model joint: the generator ascends (reverse, the paper) or descends (acgan) the "
                   "segmenter's loss")
    p.add_argument("--generator-checkpoint", help="--model joint: start the generator from this checkpoint "
                   "('default' = the shipped model)")
    p.add_argument("--segmenter-checkpoint", help="--model joint: start the segmenter from this checkpoint "
                   "('default' = the shipped model)")
    p.add_argument("--segmenter-lr", type=float, default=None,
                   help="--model joint: the segmenter's learning rate (--lr is the generator's)")
    p.add_argument("--pretrain-steps", type=int, nargs=2, metavar=("G", "S"), default=None,
                   help="--model joint: generator and segmenter pretraining steps within --steps (default: a fifth "
                   "each, 0 for a part started from a checkpoint)")
    p.set_defaults(func=_train)

    p = sub.add_parser("average", help="the uniform mean of checkpoints fine-tuned from the same weights",
                       description="Average the weights of two or more checkpoints of one kind and configuration "
                       "(a \"model soup\": runs fine-tuned from the same starting weights; unrelated runs give a "
                       "broken model). With --images/--labels, BatchNorm statistics are re-estimated on random "
                       "training crops (hovernet).")
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints (.pt)")
    p.add_argument("--out", required=True, help="the averaged checkpoint to write (.pt)")
    p.add_argument("--images", help="folder of training H&E images (for the BatchNorm statistics)")
    p.add_argument("--labels", help="folder of their instance label maps")
    p.add_argument("--bn-batches", type=int, default=64, help="batches of 4 random 256-px crops (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.set_defaults(func=_average)

    from .io.export import FORMATS

    p = sub.add_parser("generate", help="a dataset of synthetic (image, labels) pairs: layouts, masks, renders",
                       description="Generate N synthetic pairs (docs/generate.md). Each pair is reproducible from its "
                       "manifest entry (nucsynth regenerate); an interrupted run continues with --resume.")
    p.add_argument("--n", type=int, required=True, help="number of pairs")
    p.add_argument("--styles", required=True, help="folder of reference H&E tiles (labels in labels/ or same-stem "
                   "files, optional)")
    p.add_argument("--out", required=True, help="the dataset folder (must not hold a dataset unless --resume)")
    p.add_argument("--points-from", help="folder of label maps or napari points CSV files (the real layouts)")
    p.add_argument("--random-points", action="store_true",
                   help="layouts from point processes fitted to real tissue (the layouts of --points-from, else the "
                   "style tiles' labels, else the MoNuSeg default)")
    p.add_argument("--no-transforms", action="store_true",
                   help="with --points-from: use the real layouts as they are (cropped), without the point-library "
                   "transforms")
    p.add_argument("--method", default="classic", choices=renderers())
    p.add_argument("--checkpoint", help="trained model of a learned renderer (default: the shipped one, if any)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (learned renderers)")
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    p.add_argument("--format", default="png", choices=FORMATS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_workers, default="auto",
                   help="rendering processes, or 'auto' (the default: one for a short run or a learned renderer, "
                        "else one per CPU core, at most 4)")
    p.add_argument("--domains", type=int, default=None,
                   help="cluster the style tiles into K stain domains and sample them evenly")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same settings")
    p.set_defaults(func=_generate)

    p = sub.add_parser("regenerate", help="make one pair of a generated dataset again, compare with the stored one")
    p.add_argument("dataset", help="the dataset folder")
    p.add_argument("id", help="the pair id (e.g. syn_000003)")
    p.add_argument("--out", help="file prefix: write <prefix>_image.png and <prefix>_labels.tif")
    p.set_defaults(func=_regenerate)

    p = sub.add_parser("napari", help="open napari with the sample data and the Points to masks widget")
    p.add_argument("--no-sample", action="store_true", help="do not open the sample data")
    p.add_argument("--screenshot", help=argparse.SUPPRESS)
    p.set_defaults(func=_napari)
    return ap


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a command reports as a message: bad input or settings (ValueError), files (OSError), memory (numpy's
    MemoryError, torch's out-of-memory error when torch is loaded). Anything else is a bug and keeps its traceback."""
    errors: list[type[BaseException]] = [ValueError, OSError, MemoryError]
    oom = getattr(getattr(sys.modules.get("torch"), "cuda", None), "OutOfMemoryError", None)
    if isinstance(oom, type):
        errors.append(oom)
    return tuple(errors)


def _message(e: BaseException) -> str:
    """One line that says what is wrong (and names the file: OSError carries it in ``filename``)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}" + (f" ({e.filename2})" if e.filename2 is not None else "")
    elif isinstance(e, (ValueError, OSError)):
        msg = str(e)
    else:  # out of memory: numpy says what it tried to allocate; torch adds a paragraph of allocator advice
        msg = "out of memory: " + ". ".join(str(e).split(". ")[:2])
    return " ".join(msg.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors a user can fix are one line on stderr and exit status 2 (see the module docstring);
    Ctrl-C is exit status 130 (``train`` and ``generate`` first stop cleanly and save)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if os.environ.get("NUCSYNTH_DEBUG"):
            raise
        print(f"\nnucsynth {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("NUCSYNTH_DEBUG"):
            raise
        print(f"nucsynth {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2


#: Set by a command whose process holds nothing left to finalize when it returns (``generate``: its files closed, its
#: pool shut down; an executor thread stuck on a killed worker is not waited for): :func:`run` then ends the process
#: without Python's teardown of its modules.
_EXIT_AT_ONCE = False


def run() -> None:
    """The ``nucsynth`` console script and ``python -m napari_nucsynth.cli``: :func:`main`, then exit with its status.
    After ``generate`` the exit handlers run, the output is flushed and the process ends at once, without the
    interpreter's teardown of numpy, scipy, scikit-image and the rest (0.12-0.22 s of a 2-s run on the 2-core
    machine, measured from the command's return to the process's end; 0.015 s this way)."""
    rc = main()
    run_exitfuncs = getattr(__import__("atexit"), "_run_exitfuncs", None)
    if _EXIT_AT_ONCE and run_exitfuncs is not None:
        run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    run()
