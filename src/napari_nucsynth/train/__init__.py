"""Training of the registered models (:mod:`napari_nucsynth.models`) on pairs of images and instance labels.

:func:`train` is one loop for every kind: random crops with flips, 90-degree rotations and stain jitter (the
targets are made after the geometric augmentation, from the augmented labels), a held-out validation split by
image, progress and cancel callbacks, typed :class:`TrainUpdate` events for loss plots, and checkpoints in the
one format (:func:`napari_nucsynth.models.save_checkpoint`) with the optimiser and random state, so a run stopped
at any point resumes where it stopped (``resume=``). Stopping (``should_stop``) saves before returning.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), the same call trains data-parallel: every rank
draws its own samples, the optimisers average the gradients over the ranks before each step, and rank 0 alone
reports, validates and saves (:mod:`napari_nucsynth.train.distributed`, ``docs/distributed.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._checks import SeedLike, as_labels, as_rgb, as_rng

__all__ = ["TrainResult", "TrainUpdate", "average_checkpoints", "load_pairs", "shipped_checkpoint", "train"]


@dataclass(frozen=True)
class TrainUpdate:
    """One event of a training run: ``kind`` is "step" (``losses`` of that step), "validation" (``metrics``),
    "checkpoint" (``path``) or "preview" (``image``: a generator's render of a held-out pair, RGB uint8)."""

    kind: str
    step: int
    steps: int
    losses: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    path: str | None = None
    seconds: float = 0.0
    image: np.ndarray | None = None


@dataclass(frozen=True)
class TrainResult:
    path: Path
    step: int
    stopped: bool
    metrics: dict
    seconds: float


def shipped_checkpoint(kind: str):
    """The path of the trained model that ships with the package for ``kind`` (the segmenter's or renderer's
    ``default_checkpoint``), or None when there is none (or its file is absent)."""
    from pathlib import Path

    from ..render import get_renderer, renderers
    from ..segment import get_segmenter, segmenters

    obj = get_segmenter(kind) if kind in segmenters() else get_renderer(kind) if kind in renderers() else None
    path = getattr(obj, "default_checkpoint", None)
    return Path(path) if path is not None and Path(path).is_file() else None


_EXTENSIONS = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy"}


def _no_labels(img: np.ndarray) -> np.ndarray:
    """An all-zero uint32 label map of ``img``'s height and width that costs no memory (a read-only view)."""
    return np.broadcast_to(np.zeros((), np.uint32), img.shape[:2])


def load_pairs(images, labels) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Pairs from two folders (files matched by stem) or two sequences of arrays; returns images (RGB uint8),
    labels (uint32) and names.

    ``labels=None`` (the unpaired kinds, :attr:`napari_nucsynth.models.ModelSpec.unpaired`): the images alone, a
    folder (every image file in it) or a sequence of arrays; the labels returned are all-zero placeholders
    (read-only views of the images' height and width)."""
    from ..io import read_image, read_labels

    if labels is None:
        if isinstance(images, (str, Path)):
            idir = Path(images)
            if not idir.is_dir():
                raise ValueError(f"images folder {idir} does not exist")
            files = sorted(p for p in idir.iterdir() if p.is_file() and p.suffix.lower() in _EXTENSIONS)
            if not files:
                raise ValueError(f"no image file ({', '.join(sorted(_EXTENSIONS))}) in {idir}")
            imgs = [as_rgb(read_image(p), f"image {p}") for p in files]
            names = [p.stem for p in files]
        else:
            imgs = [as_rgb(im, f"images[{i}]") for i, im in enumerate(images)]
            names = [f"image{i}" for i in range(len(imgs))]
            if not imgs:
                raise ValueError("need at least one image")
        return imgs, [_no_labels(im) for im in imgs], names
    if isinstance(images, (str, Path)) or isinstance(labels, (str, Path)):
        idir, ldir = Path(images), Path(labels)
        for d, what in ((idir, "images"), (ldir, "labels")):
            if not d.is_dir():
                raise ValueError(f"{what} folder {d} does not exist")
        imgs = {p.stem: p for p in idir.iterdir() if p.suffix.lower() in _EXTENSIONS}
        labs = {p.stem: p for p in ldir.iterdir() if p.suffix.lower() in _EXTENSIONS}
        names = sorted(set(imgs) & set(labs))
        if not names:
            raise ValueError(f"no image in {idir} has a label file of the same name in {ldir}")
        return ([as_rgb(read_image(imgs[n]), f"image {imgs[n]}") for n in names],
                [as_labels(read_labels(labs[n]), f"labels {labs[n]}").astype(np.uint32) for n in names], names)
    imgs = [as_rgb(im, f"images[{i}]") for i, im in enumerate(images)]
    labs = [as_labels(lb, f"labels[{i}]").astype(np.uint32) for i, lb in enumerate(labels)]
    if len(imgs) != len(labs) or not imgs:
        raise ValueError(f"need as many label maps as images (and at least one), got {len(imgs)} and {len(labs)}")
    for i, (im, lb) in enumerate(zip(imgs, labs)):
        if im.shape[:2] != lb.shape:
            raise ValueError(f"images[{i}] is {im.shape[:2]} but labels[{i}] is {lb.shape}")
    return imgs, labs, [f"pair{i}" for i in range(len(imgs))]


AUGMENTATIONS = ("basic", "strong", "modality", "modality-drit")
#: The augmentations that restain crops to the training images' stain modalities (Liu et al.), and how.
MODALITY_AUGMENTATIONS = {"modality": "macenko", "modality-drit": "drit"}
#: The share of the crops of ``augment="modality"`` that are restained to another training image's modality.
MODALITY_P = 0.5


@dataclass(frozen=True)
class DritModality:
    """A training image's stain modality for ``augment="modality-drit"``: its style code under a drit model
    (computed once per run), which :meth:`restain` decodes a crop's content with."""

    model: object
    style: np.ndarray

    def restain(self, img: np.ndarray) -> np.ndarray:
        from ..models.drit import transfer

        return transfer(self.model, img, None, style=self.style)


def _augment(img: np.ndarray, lab: np.ndarray, crop: int, rng: np.random.Generator,
             mode: str = "basic", references: Sequence | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One training sample from a pair.

    ``"basic"``: a random crop (reflect-padded if the image is smaller), a random dihedral transform, stain jitter
    in HED. ``"strong"`` adds what HoVer-Net's training adds (Graham et al. 2019, its ``dataset.py``): a random
    scale of 0.8-1.25 (the crop is cut at ``crop / scale`` and resized; labels by nearest neighbour), and in half
    the samples a Gaussian or median blur, then brightness, contrast, saturation and hue jitter in random order.
    ``"modality"`` (Liu, Wagner & Peng's multi-modality augmentation) is ``"basic"`` in which, with probability
    :data:`MODALITY_P`, the crop is restained (:func:`napari_nucsynth.stain.modality_augment`, Macenko) to the
    modality of one of ``references`` drawn at random, before the stain jitter; only colours change, so the
    labels stay as they are. ``"modality-drit"`` is the same with the restaining done by a drit model (the
    paper's own content/style network): ``references`` are then :class:`DritModality` style codes.
    ``references`` (images or :class:`~napari_nucsynth.stain.StainReference`) is needed for the modality modes
    only and ignored otherwise; "basic" and "strong" draw exactly the random numbers they drew before "modality"
    existed.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {mode!r}")
    if mode in MODALITY_AUGMENTATIONS and not references:
        raise ValueError(f"augment={mode!r} needs references: the stain modalities of the training images "
                         "(train._modality_references)")
    src = crop
    if mode == "strong":
        scale = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
        src = max(8, round(crop / scale))
    H, W = lab.shape
    if H < src or W < src:
        ph, pw = max(0, src - H), max(0, src - W)
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        lab = np.pad(lab, ((0, ph), (0, pw)), mode="constant")
        H, W = lab.shape
    r, c = int(rng.integers(0, H - src + 1)), int(rng.integers(0, W - src + 1))
    img, lab = img[r : r + src, c : c + src], lab[r : r + src, c : c + src]
    k = int(rng.integers(0, 4))
    img, lab = np.rot90(img, k), np.rot90(lab, k)
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    if src != crop:
        from skimage.transform import resize

        img = (resize(img, (crop, crop), order=1, preserve_range=True, anti_aliasing=src > crop) + 0.5).astype(np.uint8)
        lab = resize(lab, (crop, crop), order=0, preserve_range=True, anti_aliasing=False).astype(lab.dtype)
    img = np.ascontiguousarray(img)
    if mode == "modality" and rng.random() < MODALITY_P:
        from ..stain import modality_augment

        img = modality_augment(img, rng, list(references), method="macenko")
    elif mode == "modality-drit" and rng.random() < MODALITY_P:
        refs = list(references)
        img = refs[int(rng.integers(len(refs)))].restain(img)
    img = _stain_jitter(img, rng)
    if mode == "strong":
        img = _photometric_jitter(img, rng)
    return img, np.ascontiguousarray(lab)


def _modality_references(imgs, idx, progress=None, mode: str = "modality", device=None) -> dict:
    """``{i: modality of imgs[i]}`` for the training images ``idx``, computed once per run: the
    :class:`~napari_nucsynth.stain.StainReference` of each for ``augment="modality"``, its :class:`DritModality`
    under the shipped drit model (on ``device``, CPU by default) for ``"modality-drit"``."""
    if mode == "modality-drit":
        import torch

        from ..models import drit
        from ..stain import _drit_checkpoint

        model = drit.load_model(_drit_checkpoint(None), device or torch.device("cpu"))
        refs = {}
        for n, i in enumerate(idx):
            if progress:
                progress(0, 0, f"drit style codes of the training images: {n + 1}/{len(idx)}")
            refs[i] = DritModality(model, drit.style_code(model, imgs[i]))
        return refs
    from ..stain import stain_reference

    refs = {}
    for n, i in enumerate(idx):
        if progress:
            progress(0, 0, f"stain references of the training images: {n + 1}/{len(idx)}")
        refs[i] = stain_reference(imgs[i])
    return refs


def _modality_record(mode: str) -> dict:
    """What a checkpoint's ``train_data["modality"]`` says of a modality augmentation."""
    rec = {"method": MODALITY_AUGMENTATIONS[mode], "p": MODALITY_P, "references": "the other real training images"}
    if mode == "modality-drit":
        from ..stain import _drit_checkpoint

        ck = _drit_checkpoint(None)
        rec["checkpoint"] = ck.name
        rec["checkpoint_bytes"] = ck.stat().st_size
    return rec


def _photometric_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """HoVer-Net's input augmentation on a uint8 RGB crop: half the time a Gaussian (sigma up to 1) or 3 x 3 median
    blur; then brightness (+-26 of 255), contrast (x 0.75-1.25), saturation (x 0.8-1.2, a blend with the grey
    image as torchvision's ``adjust_saturation``) and hue (+-8 degrees, a rotation of the chroma plane in YIQ)
    changes in a random order."""
    from scipy import ndimage

    if rng.random() < 0.5:
        if rng.random() < 0.5:
            x = ndimage.gaussian_filter(img.astype(np.float32), sigma=(float(rng.uniform(0.1, 1.0)),) * 2 + (0,))
        else:
            x = ndimage.median_filter(img, size=(3, 3, 1)).astype(np.float32)
    else:
        x = img.astype(np.float32)
    x /= 255.0
    for op in rng.permutation(4):
        if op == 0:
            x += float(rng.uniform(-26, 26)) / 255.0
        elif op == 1:
            mean = x.mean(axis=(0, 1), keepdims=True)
            x = (x - mean) * float(rng.uniform(0.75, 1.25)) + mean
        elif op == 2:
            grey = x @ _LUMA[:, None]
            x = grey + (x - grey) * float(rng.uniform(0.8, 1.2))
        else:
            t = np.deg2rad(float(rng.uniform(-8, 8)))
            rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]], np.float32)
            x = x @ (_YIQ.T @ rot.T @ np.linalg.inv(_YIQ).T).astype(np.float32)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float64)


def _stain_jitter(img: np.ndarray, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    """Tellez et al.'s HED augmentation: each stain density scaled by 1 + N(0, sigma) and shifted by N(0, sigma)
    times a small bias; brightness and contrast left as the scanner gave them."""
    from ..stain import hed_to_rgb, rgb_to_hed

    hed = rgb_to_hed(img)
    a = rng.normal(1.0, sigma, 3).astype(np.float32)
    b = rng.normal(0.0, sigma * 0.05, 3).astype(np.float32)
    return hed_to_rgb(np.maximum(hed * a + b, 0))


def _rng_state(rng: np.random.Generator) -> dict:
    import torch

    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def _load_init_weights(model, state_dict: dict) -> None:
    """Load a fine-tuning run's starting weights: all of them, except that parts of ``model`` which start as the
    identity (its ``identity_prefixes``, e.g. nuclick's ``refine``) may be absent from ``state_dict`` and keep
    their initial values. Anything else missing or unexpected is the ``RuntimeError`` of a strict load."""
    prefixes = tuple(getattr(model, "identity_prefixes", ()))
    missing = [k for k in model.state_dict() if k not in state_dict]
    if prefixes and missing and all(k.startswith(prefixes) for k in missing):
        unexpected = model.load_state_dict(state_dict, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"unexpected keys {unexpected[:5]}")
        return
    model.load_state_dict(state_dict)


def train(kind: str, images, labels, *, steps: int, out, resume=None, init=None, config: dict | None = None,
          device: str = "auto", seed: SeedLike = 0, batch_size: int = 4, crop: int = 256, lr: float | None = None,
          augment: str | None = None, val_fraction: float = 0.2, val_images: Sequence | None = None,
          val_labels: Sequence | None = None,
          eval_every: int = 500, save_every: int = 200, preview_every: int = 0, progress: Callable[[int, int, str], None] | None = None,
          should_stop: Callable[[], bool] | None = None, on_update: Callable[[TrainUpdate], None] | None = None,
          train_data: dict | None = None, synthetic: int = 0, synthetic_size: int = 512,
          synthetic_renderer: str = "classic") -> TrainResult:
    """Train a model of kind ``kind`` on pairs; write the checkpoint ``out``.

    Parameters
    ----------
    kind : str
        A trainable kind (:func:`napari_nucsynth.models.model_kinds`): "hovernet", "maskrcnn", "adain", "sian",
        "points2image", ...
    images, labels : folders or sequences of arrays
        The pairs (see :func:`load_pairs`). Kinds that train unpaired (``ModelSpec.unpaired``: "points2image",
        whose masks come from the mask sampler) take the images alone: ``labels`` must be None (and
        ``val_labels`` too); the others need labels.
    steps : int
        Total optimisation steps (a resumed run continues up to this number).
    out : path
        The checkpoint written every ``save_every`` steps (0: only on stop and at the end), on stop and at the end
        (atomically).
    resume : path, optional
        A checkpoint of the same kind to continue from (model, optimiser, step and random state).
    init : path, optional
        A checkpoint of the same kind whose weights (and config) start a new run (fine-tuning): step 0, a new
        optimiser and schedule.
    lr : float, optional
        Peak learning rate (the kind's ``default_lr`` when None) of a warm-up and cosine schedule.
    config : dict, optional
        Model configuration (the kind's defaults otherwise); ignored when resuming (the checkpoint's is used);
        with ``init``, overrides of the checkpoint's configuration (loss weights, say: a key that changes the
        network's shape fails to load the weights).
    augment : {"basic", "strong", "modality", "modality-drit"}, optional
        The training augmentation (:func:`_augment`): crops, dihedral transforms and stain jitter; "strong" adds
        HoVer-Net's scale, blur and colour jitter; "modality" (Liu et al.'s multi-modality augmentation) restains
        half the crops, before the stain jitter, to the stain modality of another training image drawn at random
        (Macenko's stain vectors and concentration range, :func:`napari_nucsynth.stain.modality_augment`; the
        references are computed once per run from the training images, synthetic pairs excluded; labels are
        unchanged; seeded by ``seed`` like the rest, so a run is reproducible and a resumed one continues
        exactly). "modality-drit" does the same restaining with the shipped drit model (Liu et al.'s own
        content/style network: each training image's style code computed once, the crop decoded with another's
        at the model's strength; about 0.1 s a 256-px crop on one CPU thread). Not for ``drit``, whose crops
        carry their stain domain. Recorded in the checkpoint's
        ``train_data``; None means the resumed checkpoint's, else "basic".
    val_fraction : float
        Share of the images held out for validation (by image, seeded) unless ``val_images``/``val_labels`` are
        given; 0 for none. Validation runs the full inference (:attr:`ModelSpec.predict`) and reports AJI, PQ and
        Dice (mean over images) every ``eval_every`` steps (0: only at the end) and at the end (models with a
        ``validate`` hook report their own metrics).
    preview_every : int
        For models with a ``preview`` hook (generators): every this many steps, a "preview" update carries what
        the model makes of the first held-out pair (of the first training pair when none is held out). 0: never.
    progress, should_stop, on_update : callables, optional
        ``progress(step, steps, message)``; ``should_stop()`` ends the run after the current step (the
        checkpoint is saved); ``on_update(TrainUpdate)`` for loss plots.
    train_data : dict, optional
        What to record about the data in the checkpoint (defaults to the image names and counts).
    synthetic, synthetic_size, synthetic_renderer : int, int, str
        Recipe B of the headline experiment (docs/headline.md), for segmenters: before the first step, add
        ``synthetic`` pairs of ``synthetic_size`` px made from the training pairs alone
        (:func:`napari_nucsynth.generate.synthetic_pairs`: layouts alternately point-library augmentations of their
        centroids and a point process fitted to them, masks from a shape prior fitted to their labels, rendered by
        ``synthetic_renderer`` in the style of a random one of them). Crops are drawn uniformly over all training
        images, so ``synthetic`` equal to the number of real images trains on half real, half synthetic crops.
        Seeded by ``seed``, so a resumed run makes the same pairs again. Validation stays on real images only.

    Notes
    -----
    Under ``torchrun`` with more than one process, each rank trains on ``batch_size`` samples a step (the
    effective batch is ``batch_size`` times the number of processes) drawn with its own random stream; the weights
    start from rank 0's and stay equal; ``device`` "auto"/"cuda" means ``cuda:LOCAL_RANK`` (NCCL), "cpu" gloo.
    Only rank 0 calls ``progress`` and ``on_update``, validates and writes ``out``; ``should_stop`` is asked on
    every rank and the run stops on all ranks after the step where any rank said stop. The checkpoint holds every
    rank's random state, so a resumed run with the same number of processes continues exactly.
    """
    from ..models import get_model
    from .distributed import setup

    if int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if augment is not None and augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    for name, every in (("eval_every", eval_every), ("save_every", save_every), ("preview_every", preview_every)):
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 0:
            raise ValueError(f"{name} must be a whole number of steps (0: only at the end), got {every!r}")
    if augment in MODALITY_AUGMENTATIONS and kind == "drit":
        raise ValueError(f"augment={augment!r} restains crops to other training images' stain modalities, which "
                         "would mix drit's stain domains: train drit with augment='basic'")
    spec = get_model(kind)
    if isinstance(synthetic, bool) or not isinstance(synthetic, (int, np.integer)) or synthetic < 0:
        raise ValueError(f"synthetic must be a non-negative number of pairs, got {synthetic!r}")
    if synthetic and spec.train_step is not None:
        raise ValueError(f"synthetic pairs train segmenters; {kind} is a generator")
    if synthetic and int(synthetic_size) < 64:
        raise ValueError(f"synthetic_size must be at least 64 px, got {synthetic_size!r}")
    lr = spec.default_lr if lr is None else float(lr)
    _check_pairing(kind, spec, labels, val_images, val_labels)
    imgs, labs, names = load_pairs(images, labels)
    dctx, dev = setup(device)  # (None, the device) unless launched by torchrun with more than one process
    try:
        return _train(spec, kind, imgs, labs, names, dctx=dctx, dev=dev, steps=steps, out=out, resume=resume,
                      init=init, config=config, seed=seed, batch_size=batch_size, crop=crop, lr=lr,
                      augment=augment, val_fraction=val_fraction, val_images=val_images, val_labels=val_labels,
                      eval_every=eval_every, save_every=save_every, preview_every=preview_every, progress=progress,
                      should_stop=should_stop, on_update=on_update, train_data=train_data, synthetic=synthetic,
                      synthetic_size=synthetic_size, synthetic_renderer=synthetic_renderer)
    finally:
        if dctx is not None:
            dctx.close()


def _check_pairing(kind: str, spec, labels, val_images, val_labels) -> None:
    """Labels for the paired kinds, none for the unpaired ones (a ``ValueError`` that says which)."""
    unpaired = bool(getattr(spec, "unpaired", False))
    if unpaired and (labels is not None or val_labels is not None):
        raise ValueError(f"{kind} trains unpaired, on images alone (its masks come from the mask sampler): give "
                         "labels=None (no --labels, no Labels layer)")
    if not unpaired and labels is None:
        from ..models import get_model, model_kinds

        alone = [k for k in model_kinds() if getattr(get_model(k), "unpaired", False)]
        raise ValueError(f"{kind} trains on pairs of images and instance labels: give labels (a folder of label "
                         f"maps or a sequence of arrays)" + (f"; only {', '.join(alone)} trains on images alone"
                                                             if alone else ""))
    if not unpaired and val_images is not None and val_labels is None:
        raise ValueError(f"{kind} validates on pairs: give val_labels with val_images")


def _add_synthetic(imgs, labs, t_idx, data, n, size, renderer, dev, seed, progress, should_stop):
    """The training pairs plus ``n`` synthetic ones made from them alone (see :func:`train`)."""
    import time

    from ..generate import synthetic_pairs

    real_i, real_l = [imgs[i] for i in t_idx], [labs[i] for i in t_idx]
    if not any(np.any(lb) for lb in real_l):
        raise ValueError("synthetic pairs need training labels with nuclei (their layouts and shapes)")

    def tick(i, total, msg):
        if progress:
            progress(0, 0, f"making synthetic pairs: {msg}")

    t0 = time.perf_counter()
    s_imgs, s_labs = synthetic_pairs(n, size, real_i, style_labels=real_l, fit_labels=real_l, layouts="mixed",
                                     method=renderer, device=str(dev), seed=seed, progress=tick,
                                     should_stop=should_stop)
    first = len(imgs)
    imgs, labs = list(imgs) + s_imgs, list(labs) + s_labs
    t_idx = list(t_idx) + list(range(first, first + len(s_imgs)))
    data = {**data, "synthetic_pairs": {"n": len(s_imgs), "size": size, "renderer": renderer, "seed": seed,
                                        "made_from": "the training pairs only", "layouts": "mixed",
                                        "seconds": round(time.perf_counter() - t0, 1)}}
    return imgs, labs, t_idx, data


def _train(spec, kind, imgs, labs, names, *, dctx, dev, steps, out, resume, init, config, seed, batch_size, crop,
           lr, augment, val_fraction, val_images, val_labels, eval_every, save_every, preview_every, progress, should_stop,
           on_update, train_data, synthetic=0, synthetic_size=512, synthetic_renderer="classic") -> TrainResult:
    """The loop of :func:`train` on one process (one rank of a torchrun launch when ``dctx`` is given)."""
    import torch

    from ..metrics import instance_metrics
    from ..models import load_checkpoint, save_checkpoint

    main = dctx is None or dctx.is_main
    if not main:  # only rank 0 reports
        progress = on_update = None
    rank = 0 if dctx is None else dctx.rank
    rng = as_rng(seed)
    split_seed = int(seed) if isinstance(seed, (int, np.integer)) else 0
    if val_images is not None:
        v_imgs, v_labs, _ = load_pairs(val_images, val_labels)
        t_idx = list(range(len(imgs)))
    else:
        n_val = round(val_fraction * len(imgs)) if len(imgs) > 1 else 0
        perm = np.random.default_rng(split_seed).permutation(len(imgs))
        v_idx, t_idx = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
        v_imgs, v_labs = [imgs[i] for i in v_idx], [labs[i] for i in v_idx]
    data = train_data or {"images": [names[i] for i in t_idx], "n_train": len(t_idx), "n_val": len(v_imgs),
                          "crop": crop, "batch_size": batch_size}
    if getattr(spec, "unpaired", False):
        data = {**data, "unpaired": True}
    real_t_idx = list(t_idx)  # the real training images (the references of augment="modality")
    if synthetic:
        imgs, labs, t_idx, data = _add_synthetic(imgs, labs, t_idx, data, int(synthetic), int(synthetic_size),
                                                 synthetic_renderer, dev, split_seed, progress, should_stop)

    start = 0
    if resume is None:  # before building: the initial weights are drawn from torch's generator
        torch.manual_seed(int(rng.integers(2**31)))
    if resume is not None:
        ck = load_checkpoint(resume, kind=kind)
        cfg = dict(ck["config"])
        model = spec.build({**cfg, "pretrained": None} if "pretrained" in cfg else cfg)
        model.load_state_dict(ck["state_dict"])
        start = int(ck["step"])
        if augment is None:  # continue as the run was trained
            augment = ck.get("train_data", {}).get("augment", "basic")
    elif init is not None:
        ck0 = load_checkpoint(init, kind=kind)
        cfg = {**ck0["config"], **(config or {})}
        if "pretrained" in cfg:
            cfg["pretrained"] = None
        model = spec.build(cfg)
        try:
            _load_init_weights(model, ck0["state_dict"])
        except RuntimeError:
            changed = sorted(k for k in (config or {}) if ck0["config"].get(k) != config[k])
            raise ValueError(f"the config overrides {changed} change the network of {init}, so its weights do not "
                             "fit; fine-tuning can override settings that keep the network's shape (loss "
                             "weights, say)") from None
    else:
        cfg = {**spec.default_config(), **(config or {})}
        model = spec.build(cfg)
    augment = augment or "basic"
    data = {**data, "augment": augment}
    mod_refs = None
    if augment in MODALITY_AUGMENTATIONS:  # each training image's stain modality, once per run
        mod_refs = _modality_references(imgs, real_t_idx, progress, augment, dev)
        data = {**data, "modality": _modality_record(augment)}
    if rank > 0 and resume is None:  # same initial weights, but this rank's own samples and torch random stream
        rng = np.random.default_rng([int(rng.integers(2**62)), rank])
        torch.manual_seed(int(rng.integers(2**31)))
    model.to(dev)
    if dctx is not None:
        dctx.broadcast_module(model)  # equal weights even when the seed is not (seed=None, a Generator)
    if spec.optimizers is not None:
        opts = dict(spec.optimizers(model, lr))
    else:
        opts = {"opt": torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                         weight_decay=1e-4)}
    for o in opts.values():
        for g in o.param_groups:
            g.setdefault("base_lr", g["lr"])
        if dctx is not None:  # every optimiser averages its gradients over the ranks before it steps
            dctx.sync_gradients_before_step(o)
    warm = max(1, min(200, int(steps) // 20))

    def lr_at(i: int) -> float:
        """The schedule's factor at step ``i``: linear warm-up, then cosine decay to 1 % at ``steps``. A function
        of the step alone, so a resumed run (even one asked for more steps) continues the schedule without saved
        scheduler state."""
        if i < warm:
            return (i + 1) / warm
        return float(0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(1.0, (i - warm) / max(1, int(steps) - warm)))))

    metrics: dict = {}
    if resume is not None:
        for name, o in opts.items():
            if name in ck.get("optimizer", {}):
                o.load_state_dict(ck["optimizer"][name])
        if "rng" in ck:
            world = 1 if dctx is None else dctx.world_size
            ranks = ck["rng"].get("ranks") or [ck["rng"]]
            own = ranks[rank] if len(ranks) == world else ranks[0]
            rng.bit_generator.state = own["numpy"]
            torch.set_rng_state(own["torch"])
            if rank > 0 and len(ranks) != world:  # another number of processes: derive this rank's streams
                rng = np.random.default_rng([int(rng.integers(2**62)), rank])
                torch.manual_seed(int(rng.integers(2**31)))
        metrics = dict(ck.get("metrics", {}))
    collate = spec.collate or _default_collate

    def save(step: int) -> Path:
        """Write the checkpoint (rank 0; under torchrun a collective that gathers every rank's random state)."""
        rng_state = _rng_state(rng)
        if dctx is not None:
            rng_state = {**rng_state, "ranks": dctx.gather(rng_state)}
        if not main:
            return Path(out)
        p = save_checkpoint(out, kind=kind, config=cfg, state_dict={k: v.detach().cpu() for k, v in
                                                                     model.state_dict().items()},
                            step=step, metrics=metrics, train_data=data,
                            optimizer={n: o.state_dict() for n, o in opts.items()}, rng=rng_state)
        if on_update:
            on_update(TrainUpdate("checkpoint", step, steps, path=str(p), seconds=time.perf_counter() - t0))
        return p

    def validate(step: int) -> None:
        if not v_imgs or not main:
            return
        model.eval()
        if spec.validate is not None:
            metrics.update(spec.validate(model, v_imgs, v_labs, dev))
        else:
            res = [instance_metrics(lb, spec.predict(model, im, dev)) for im, lb in zip(v_imgs, v_labs)]
            metrics.update({k: float(np.mean([r[k] for r in res])) for k in ("aji", "pq", "dice")})
        model.train()
        metrics["val_step"] = step
        if on_update:
            on_update(TrainUpdate("validation", step, steps, metrics=dict(metrics), seconds=time.perf_counter() - t0))

    def preview(step: int) -> None:
        if spec.preview is None or not preview_every or on_update is None:
            return
        im, lb = (v_imgs[0], v_labs[0]) if v_imgs else (imgs[t_idx[0]], labs[t_idx[0]])
        model.eval()
        with torch.no_grad():
            out_img = spec.preview(model, im, lb, dev)
        model.train()
        on_update(TrainUpdate("preview", step, steps, image=out_img, seconds=time.perf_counter() - t0))

    t0 = time.perf_counter()
    model.train()
    step, stopped = start, False
    while step < steps:
        stop = bool(should_stop and should_stop())
        if dctx is not None:
            stop = dctx.any(stop)  # every rank stops after the same step
        if stop:
            stopped = True
            break
        samples = []
        for _ in range(batch_size):
            i = t_idx[int(rng.integers(0, len(t_idx)))]
            extra = {} if mod_refs is None else {"references": _other_references(mod_refs, i)}
            im, lb = _augment(imgs[i], labs[i], crop, rng, augment, **extra)
            samples.append((im, lb, spec.make_targets(im, lb, cfg)))
        batch = collate(samples, dev)
        factor = lr_at(step)
        for o in opts.values():
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * factor
        if spec.train_step is not None:
            logs = spec.train_step(model, batch, opts, step)
        else:
            loss, logs = spec.loss(model, batch)
            opts["opt"].zero_grad(set_to_none=True)
            loss.backward()
            opts["opt"].step()
        if dctx is not None:
            dctx.broadcast_module(model, buffers_only=True)  # BatchNorm statistics: rank 0's, as DDP does
        step += 1
        if on_update:
            on_update(TrainUpdate("step", step, steps, losses=logs, seconds=time.perf_counter() - t0))
        if progress:
            progress(step, steps, f"step {step}/{steps}, loss {logs.get('loss', float('nan')):.3f}")
        if (eval_every and step % eval_every == 0) or step == steps:
            validate(step)
        if preview_every and (step % preview_every == 0 or step == steps):
            preview(step)
        if save_every and step % save_every == 0 and step < steps:
            save(step)
    path = save(step)
    if dctx is not None:
        dctx.barrier()  # no rank returns before the checkpoint is written
    return TrainResult(path=path, step=step, stopped=stopped, metrics=dict(metrics), seconds=time.perf_counter() - t0)


def _other_references(refs: dict, i: int) -> list:
    """The references of every training image but ``i`` (all of them when ``i`` is the only one, or not among
    them: a synthetic pair)."""
    return [r for j, r in refs.items() if j != i] or list(refs.values())


def _default_collate(samples, device) -> dict:
    """Stack images (N x 3 x H x W float in [0, 1]) and every target array of the samples."""
    import torch

    batch = {"image": torch.from_numpy(np.stack([s[0] for s in samples]).transpose(0, 3, 1, 2).astype(np.float32)
                                       / 255.0).to(device)}
    for key in samples[0][2]:
        batch[key] = torch.from_numpy(np.stack([s[2][key] for s in samples])).to(device)
    return batch


from .average import average_checkpoints  # (at the end: it uses this module's helpers)
