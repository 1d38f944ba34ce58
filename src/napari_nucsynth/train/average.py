"""Weight averaging of checkpoints ("model soup", Wortsman et al., ICML 2022; stochastic weight averaging,
Izmailov et al., UAI 2018): the uniform mean of the weights of several runs fine-tuned from the same starting
weights, one model at the cost of one at inference.

Averaged weights do not match the averaged BatchNorm statistics, so these are re-estimated afterwards (Izmailov et
al.'s ``update_bn``): the model runs in training mode, without gradients, over random training crops drawn with the
training augmentation, and every BatchNorm layer keeps the cumulative mean of what it saw
(:func:`torch.optim.swa_utils.update_bn`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .._checks import SeedLike, as_rng

__all__ = ["average_checkpoints"]

#: kinds whose training-mode forward takes the image batch alone (Mask R-CNN's also wants targets)
_IMAGE_ONLY_FORWARD = {"hovernet"}


def average_checkpoints(paths: Sequence, out, *, images=None, labels=None, bn_batches: int = 64,
                        batch_size: int = 4, crop: int = 256, seed: SeedLike = 0, device: str = "auto",
                        progress: Callable[[int, int, str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None, train_data: dict | None = None) -> Path:
    """Write the uniform average of the models in ``paths`` to ``out``; returns ``out``.

    Parameters
    ----------
    paths : sequence of paths
        At least two checkpoints of one kind and one configuration (runs from the same starting weights: averaging
        unrelated runs gives a broken model).
    out : path
        The averaged checkpoint (no optimiser state: it starts new runs with ``init=``, it does not resume).
    images, labels : folders or sequences of arrays, optional
        Training pairs over which BatchNorm statistics are re-estimated (``bn_batches`` batches of ``batch_size``
        random ``crop``-px crops with the first checkpoint's training augmentation, seeded); for hovernet.
        Without them the averaged statistics are kept, and the checkpoint says so.
    progress, should_stop : callables, optional
        ``progress(done, total, message)`` during re-estimation; ``should_stop()`` ends it early with a
        ``RuntimeError`` and writes nothing.
    train_data : dict, optional
        More to record in the checkpoint's ``train_data`` (the command that made it, say).

    The checkpoint's ``train_data`` records the averaged checkpoints (path, step, and each one's own
    ``train_data``) and how the statistics were re-estimated.
    """
    import torch

    from ..devices import resolve_device
    from ..models import get_model, load_checkpoint, save_checkpoint
    from . import (MODALITY_AUGMENTATIONS, _augment, _default_collate, _modality_references, _other_references,
                   load_pairs)

    paths = [Path(p) for p in paths]
    if int(bn_batches) < 1:
        raise ValueError(f"bn_batches must be a positive integer, got {bn_batches!r}")
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(paths)}")
    cks = [load_checkpoint(p) for p in paths]
    kind, config = cks[0]["kind"], cks[0]["config"]
    for p, ck in zip(paths[1:], cks[1:]):
        if ck["kind"] != kind:
            raise ValueError(f"{p} holds a {ck['kind']!r} model, {paths[0]} a {kind!r} one: cannot average them")
        if ck["config"] != config:
            raise ValueError(f"{p} and {paths[0]} have different configurations ({ck['config']} vs {config})")
        if ck["state_dict"].keys() != cks[0]["state_dict"].keys():
            raise ValueError(f"{p} and {paths[0]} hold different parameters")
    avg = {}
    for key, ref in cks[0]["state_dict"].items():
        if ref.is_floating_point():
            avg[key] = torch.stack([ck["state_dict"][key].double() for ck in cks]).mean(0).to(ref.dtype)
        else:  # counters (BatchNorm's num_batches_tracked): the first's
            avg[key] = ref.clone()

    spec = get_model(kind)
    model = spec.build(config)
    model.load_state_dict(avg)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    bn_info: dict = {"reestimated": False}
    if bns and images is not None:
        if kind not in _IMAGE_ONLY_FORWARD:
            raise ValueError(f"re-estimating BatchNorm statistics needs a model that runs on an image alone "
                             f"({', '.join(sorted(_IMAGE_ONLY_FORWARD))}); a {kind!r} model does not: average it "
                             "without training pairs (the averaged statistics are then kept)")
        from torch.optim.swa_utils import update_bn

        imgs, labs, _ = load_pairs(images, labels)
        dev = resolve_device(device)
        model.to(dev)
        rng = as_rng(seed)
        collate = spec.collate or _default_collate
        total = int(bn_batches)
        augment = cks[0].get("train_data", {}).get("augment", "basic")  # the crops the first run trained on
        refs = (_modality_references(imgs, range(len(imgs)), mode=augment, device=dev)
                if augment in MODALITY_AUGMENTATIONS else None)

        def batches():
            for b in range(total):
                if should_stop and should_stop():
                    raise RuntimeError("averaging stopped before the BatchNorm statistics were re-estimated; "
                                       "nothing was written")
                samples = []
                for _ in range(batch_size):
                    i = int(rng.integers(0, len(imgs)))
                    extra = {} if refs is None else {"references": _other_references(refs, i)}
                    im, lb = _augment(imgs[i], labs[i], crop, rng, augment, **extra)
                    samples.append((im, lb, spec.make_targets(im, lb, config)))
                yield collate(samples, dev)["image"]
                if progress:
                    progress(b + 1, total, f"BatchNorm statistics: batch {b + 1}/{total}")

        update_bn(batches(), model)  # resets the statistics, cumulative average over the batches, no gradients
        model.eval()
        bn_info = {"reestimated": True, "batches": total, "batch_size": int(batch_size), "crop": int(crop),
                   "augment": augment, "images": len(imgs), "seed": seed if isinstance(seed, int) else None}
    elif bns:
        bn_info = {"reestimated": False, "why": "no training pairs given: the averaged statistics were kept"}
    record = {**(train_data or {}), "averaged": [{"path": str(p), "step": int(ck["step"]), "train_data": ck.get("train_data", {})}
                               for p, ck in zip(paths, cks)],
              "batchnorm": bn_info}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(out, kind=kind, config=config, state_dict=state, step=max(int(ck["step"]) for ck in cks),
                           train_data=record)
