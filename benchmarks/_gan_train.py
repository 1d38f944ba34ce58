"""What the generator training scripts (``train_sian.py``, ``train_adain.py``, ``train_pix2pixhd.py``,
``train_daff.py``, ``train_drit.py``) share: their common command-line options, the 24 / 6 MoNuSeg tile split, the
``on_update`` logger (JSON lines and preview PNGs), the run itself (:func:`napari_nucsynth.train.train` with the
``train_data`` record, ``--strip`` and the JSON fields with steps/s) and the timing helper of ``--time-render``.

Each script keeps what it does differently (extra options, its own JSON keys and their order, its evaluation or
timing); torch is imported only inside the functions that need it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from _data import SEGMENT_HELDOUT, load_image, load_labels, tile_ids

#: The ``dataset`` entry of a checkpoint's ``train_data`` (scripts training on something else name it themselves).
DATASET = "MoNuSeg 2018 training tiles (CC BY-NC-SA 4.0)"

#: The shared options, in the order most scripts list them (``add_common_args(order=...)`` may reorder or drop some).
COMMON_OPTIONS = ("--split", "--steps", "--batch-size", "--crop", "--lr", "--config", "--seed", "--device", "--out",
                  "--resume", "--init", "--eval-every", "--save-every", "--log", "--log-every", "--preview-every",
                  "--preview-dir", "--strip")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(ap: argparse.ArgumentParser, *, steps: int, crop: int, preview_dir: str, lr_help: str,
                    config_help: str, strip_help: str, steps_help: str | None = None, out_help: str | None = None,
                    out_required: bool = False, eval_every: int = 1000,
                    init_help: str = "start from this checkpoint's weights (new optimisers and schedule)",
                    log_help: str = "append one JSON line per --log-every steps (and every validation) here",
                    preview_help: str = "write a preview PNG every N steps", order: Sequence[str] = COMMON_OPTIONS,
                    before: Mapping[str, Callable[[argparse.ArgumentParser], None]] | None = None) -> None:
    """Add the options every generator training script has.

    Parameters
    ----------
    ap
        The script's parser.
    steps, crop, preview_dir, eval_every
        Defaults of ``--steps``, ``--crop``, ``--preview-dir`` and ``--eval-every`` (``--batch-size`` 4,
        ``--save-every`` 200, ``--log-every`` 50, ``--seed`` 0, ``--device`` auto everywhere).
    lr_help, config_help, strip_help, steps_help, out_help, init_help, log_help, preview_help
        The help texts that differ between scripts (None: no help text).
    out_required
        Whether ``--out`` is required (scripts that can run without training check it themselves).
    order
        The common options to add, in this order (a subset of :data:`COMMON_OPTIONS`): ``--help`` lists them so.
    before
        Script-specific options: ``{"--steps": fn}`` calls ``fn(ap)`` just before adding ``--steps``.
    """
    specs: dict[str, dict[str, Any]] = {
        "--split": dict(choices=["bench", "all"], default="bench"),
        "--steps": dict(type=int, default=steps, help=steps_help),
        "--batch-size": dict(type=int, default=4),
        "--crop": dict(type=int, default=crop),
        "--lr": dict(type=float, default=None, help=lr_help),
        "--config": dict(default="{}", help=config_help),
        "--seed": dict(type=int, default=0),
        "--device": dict(default="auto"),
        "--out": dict(help=out_help, **({"required": True} if out_required else {})),
        "--resume": dict(),
        "--init": dict(help=init_help),
        "--eval-every": dict(type=int, default=eval_every),
        "--save-every": dict(type=int, default=200),
        "--log": dict(help=log_help),
        "--log-every": dict(type=int, default=50),
        "--preview-every": dict(type=int, default=0, help=preview_help),
        "--preview-dir": dict(default=preview_dir),
        "--strip": dict(action="store_true", help=strip_help),
    }
    unknown = set(order) - set(specs)
    if unknown:
        raise ValueError(f"not common options: {sorted(unknown)}")
    for name in order:
        if before and name in before:
            before[name](ap)
        ap.add_argument(name, **specs[name])


def split_tiles(split: str, *, val_order: str = "heldout") -> tuple[list[str], list[str]]:
    """The training and validation tile ids of ``--split``.

    ``bench``: the 24 tiles not in ``_data.SEGMENT_HELDOUT`` train and those 6 validate; ``all``: all 30 train and
    none validate. ``val_order`` ``"heldout"`` lists the validation tiles in ``SEGMENT_HELDOUT``'s order,
    ``"sorted"`` by id (``train_adain.py``'s runs validate and preview in that order). Training tiles are sorted.
    """
    if val_order not in ("heldout", "sorted"):
        raise ValueError(f"val_order must be 'heldout' or 'sorted', got {val_order!r}")
    tiles = tile_ids()
    if split != "bench":
        val: list[str] = []
    elif val_order == "heldout":
        val = [t for t in SEGMENT_HELDOUT if t in tiles]
    else:
        val = [t for t in tiles if t in SEGMENT_HELDOUT]
    return [t for t in tiles if t not in val], val


def load_tiles(tiles: Sequence[str], *, labels: bool = True) -> tuple[list, list | None]:
    """The RGB images of ``tiles`` and (unless ``labels`` is False: None) their label maps."""
    return [load_image(t) for t in tiles], ([load_labels(t) for t in tiles] if labels else None)


def load_split(split: str, *, labels: bool = True,
               val_order: str = "heldout") -> tuple[list[str], list[str], list, list | None, list, list | None]:
    """``(train_tiles, val_tiles, images, labels, val_images, val_labels)`` of ``--split`` (see
    :func:`split_tiles`); the label lists are None when ``labels`` is False."""
    train_tiles, val_tiles = split_tiles(split, val_order=val_order)
    imgs, labs = load_tiles(train_tiles, labels=labels)
    v_imgs, v_labs = load_tiles(val_tiles, labels=labels)
    return train_tiles, val_tiles, imgs, labs, v_imgs, v_labs


def logger(args: argparse.Namespace, should_log: Callable[[Any], bool] | None = None) -> Callable[[Any], None]:
    """An ``on_update`` for :func:`napari_nucsynth.train.train`: appends one JSON line (kind, step, losses, metrics,
    seconds) to ``args.log`` for the updates ``should_log`` accepts (default: every validation and every
    ``args.log_every``-th step) and writes each preview image to ``args.preview_dir/stepNNNNNN.png``."""
    if should_log is None:
        def should_log(u):
            return u.kind == "validation" or (u.kind == "step" and u.step % args.log_every == 0)

    def on_update(u) -> None:
        if args.log and should_log(u):
            with open(args.log, "a") as log:
                log.write(json.dumps({"kind": u.kind, "step": u.step, "losses": u.losses, "metrics": u.metrics,
                                      "seconds": round(u.seconds, 1)}) + "\n")
        if u.kind == "preview" and u.image is not None:
            import imageio.v3 as iio

            Path(args.preview_dir).mkdir(parents=True, exist_ok=True)
            iio.imwrite(Path(args.preview_dir) / f"step{u.step:06d}.png", u.image)

    return on_update


def _or_none(xs):
    """``xs``, or None where it is None or empty (train() takes None for "no validation pairs")."""
    return xs if xs is not None and len(xs) else None


def run(kind: str, args: argparse.Namespace, images, labels, val_images, val_labels, *, config: dict,
        tiles: Sequence[str], val_tiles: Sequence[str], dataset: str = DATASET,
        extra_train_data: dict | None = None, on_update: Callable[[Any], None] | None = None,
        add_config: Callable[[Path], dict] | None = None) -> dict:
    """Train ``kind`` as the scripts do and return the JSON fields of the run.

    Calls :func:`napari_nucsynth.train.train` with the common options of ``args`` (steps, out, resume, init,
    device, seed, batch size, crop, lr, eval/save/preview intervals; ``val_fraction=0``: the given validation pairs
    only, none when empty) and a ``train_data`` record: ``dataset``, ``tiles``, ``val_tiles``, then
    ``extra_train_data``, then the command line, init, batch size, crop, lr, torch's threads and the CPU count.
    Afterwards the checkpoint is rewritten when ``add_config`` gives entries to add to its config (called with the
    checkpoint's path) or ``args.strip`` is set (only the state under ``gan.SHIPPED_PREFIX``: no optimiser, random
    state or discriminator).

    Parameters
    ----------
    on_update
        Default: :func:`logger` of ``args``.

    Returns
    -------
    dict
        ``checkpoint``, ``step``, ``stopped``, ``metrics``, ``features_source`` (the config's), ``config`` (as
        saved), ``train_seconds``, ``steps_per_s`` (steps of this run, from the step a resumed run started at, per
        second of training) and ``checkpoint_mb`` (the file's size at the end).
    """
    import torch

    from napari_nucsynth.models import load_checkpoint, save_checkpoint
    from napari_nucsynth.models.gan import SHIPPED_PREFIX
    from napari_nucsynth.train import train

    start = int(load_checkpoint(args.resume)["step"]) if args.resume else 0  # before the run overwrites it
    res = train(kind, images, labels, steps=args.steps, out=args.out, resume=args.resume, init=args.init,
                config=config, device=args.device, seed=args.seed, batch_size=args.batch_size, crop=args.crop,
                lr=args.lr, val_fraction=0, val_images=_or_none(val_images), val_labels=_or_none(val_labels),
                eval_every=args.eval_every, save_every=args.save_every, preview_every=args.preview_every,
                on_update=on_update or logger(args),
                train_data={"dataset": dataset, "tiles": list(tiles), "val_tiles": list(val_tiles),
                            **(extra_train_data or {}),
                            "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                            "init": args.init, "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr,
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    ck = load_checkpoint(res.path, kind=kind)
    cfg = {**ck["config"], **add_config(Path(res.path))} if add_config else ck["config"]
    if args.strip:
        save_checkpoint(res.path, kind=kind, config=cfg, step=ck["step"], metrics=ck["metrics"],
                        train_data=ck["train_data"],
                        state_dict={k: v for k, v in ck["state_dict"].items() if k.startswith(SHIPPED_PREFIX)})
    elif add_config:
        save_checkpoint(res.path, kind=kind, config=cfg, step=ck["step"], metrics=ck["metrics"],
                        train_data=ck["train_data"], state_dict=ck["state_dict"], optimizer=ck.get("optimizer"),
                        rng=ck.get("rng"))
    return {"checkpoint": str(res.path), "step": res.step, "stopped": res.stopped, "metrics": res.metrics,
            "features_source": cfg.get("features_source"), "config": cfg, "train_seconds": round(res.seconds, 1),
            "steps_per_s": round((res.step - start) / max(res.seconds, 1e-9), 3),
            "checkpoint_mb": round(Path(res.path).stat().st_size / 2**20, 2)}


def trained_or_default(kind: str, args: argparse.Namespace, load_model: Callable, checkpoint: str | None = None):
    """The model that ``--time-render`` times (or ``--eval`` evaluates), in eval mode, and the checkpoint it came from.

    The checkpoint this run wrote (``args.out`` when ``args.steps`` > 0), else ``checkpoint``, ``args.resume`` or
    ``args.init``, loaded by ``load_model(path, "cpu")``; without any, ``kind``'s default config with
    ``args.config``'s overrides, untrained (seeded by ``args.seed``), and None for the path.
    """
    path = args.out if args.steps > 0 else (checkpoint or args.resume or args.init)
    if path:
        return load_model(path, "cpu"), path
    import torch

    from napari_nucsynth.models import get_model

    spec = get_model(kind)
    torch.manual_seed(args.seed)
    return spec.build({**spec.default_config(), **json.loads(args.config)}).eval(), None


def pick(fields: Mapping[str, Any], keys: str) -> dict:
    """The entries of ``fields`` named in the space-separated ``keys``, in that order."""
    return {k: fields[k] for k in keys.split()}


class Timing(NamedTuple):
    """Seconds per call: the median and minimum wall time and the median CPU time of the process."""

    median: float
    min: float
    cpu_median: float


def clock(fn: Callable[[], Any], n: int, *, warmup: int = 2) -> Timing:
    """Time ``n`` calls of ``fn`` after ``warmup`` untimed ones (oneDNN picks its kernels on the first calls)."""
    import numpy as np

    for _ in range(warmup):
        fn()
    ts, cs = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return Timing(float(np.median(ts)), float(np.min(ts)), float(np.median(cs)))


def time_learned_render(module, model, repeats: int, *, style_code: Callable[[Any, Any], Any], style_part: str,
                        cond_part: str, params: Callable[[str], bool]) -> dict:
    """Seconds of one 256 x 256 render on one thread by a learned renderer's model module (``module.render``,
    ``module.conditioning``, ``module._render_float``; ``style_code(model, style)`` the style input of the
    generator), its parts, and the classic renderer on the same input as a baseline measured in the same run; a
    held-out tile's masks in another's style. ``params`` picks the parameters counted (by name)."""
    import torch

    from napari_nucsynth.render import render as render_method

    torch.set_num_threads(1)
    lab = load_labels(SEGMENT_HELDOUT[0])[:256, :256]
    style = load_image(SEGMENT_HELDOUT[1])[:256, :256]
    model = model.cpu().eval()
    t = clock(lambda: module.render(model, lab, style, seed=0), repeats)
    z = style_code(model, style)
    parts = {cond_part: clock(lambda: module.conditioning(lab), repeats).median,
             style_part: clock(lambda: style_code(model, style), repeats).median,
             "generator_s": clock(lambda: module._render_float(model, lab, z, 0), repeats).median}
    classic = clock(lambda: render_method(lab, style, method="classic", seed=0), max(3, repeats // 2)).median
    return {"render_256_median_s": round(t.median, 4), "render_256_min_s": round(t.min, 4),
            "render_256_cpu_median_s": round(t.cpu_median, 4), "repeats": repeats,
            **{k: round(v, 4) for k, v in parts.items()}, "classic_256_median_s": round(classic, 4),
            "ratio_to_classic": round(t.median / classic, 3), "target_s": 0.3, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "params_counted": sum(p.numel() for n, p in model.named_parameters() if params(n))}


def renderer_script(kind: str, doc: str | None, *, steps: int, crop: int, lr_help: str, config_help: str,
                    config_keys: Sequence[str], time_render: Callable[[Any, int], dict]) -> None:
    """The whole ``main`` of a paired masks -> H&E renderer's training script (``train_sian.py``,
    ``train_pix2pixhd.py``): train on ``--split`` (with the common options) and/or ``--time-render`` the trained
    model (or the default config, untrained) by ``time_render(model, repeats)``; prints one JSON object with the
    run's fields, the timed model's ``config_keys`` and its timing."""
    import importlib

    ap = parser(doc)
    add_common_args(ap, steps=steps, crop=crop, preview_dir=f"bench-out/{kind}_previews",
                    steps_help="0: no training (with --time-render: the default config, untrained)",
                    lr_help=lr_help, config_help=config_help,
                    out_help="the checkpoint to write (required unless --steps 0)",
                    strip_help="at the end, keep only what rendering needs (no optimiser, random state, "
                               "discriminator)")
    ap.add_argument("--time-render", action="store_true", help="time the 256 x 256 render on one thread")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    result: dict = {"kind": kind}
    t0 = time.perf_counter()
    if args.steps > 0:
        if not args.out:
            ap.error("--out is required when training")
        train_tiles, val, imgs, labs, v_imgs, v_labs = load_split(args.split)
        out = run(kind, args, imgs, labs, v_imgs, v_labs, config=json.loads(args.config), tiles=train_tiles,
                  val_tiles=val)
        result.update(pick(out, "checkpoint step stopped metrics features_source train_seconds steps_per_s "
                                "checkpoint_mb"))
    if args.time_render:
        load_model = importlib.import_module(f"napari_nucsynth.render.{kind}").load_model
        model, path = trained_or_default(kind, args, load_model)
        result["timed"] = "checkpoint" if path else "default config, untrained"
        result["config"] = {k: v for k, v in model.config.items() if k in config_keys}
        result.update(time_render(model, args.repeats))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
